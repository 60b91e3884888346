"""
The evaluation tasks, one module each: its loader, prompt and metric together, so "how is
Spider scored" is answered by tasks/spider.py alone. This file is the registry evaluate.py's
--task picks from: which tasks exist, and each task's loader and metrics by name (a file, or a
dataset of the paper by name through dlm/hub.py).

    common.py      the item to answer, few-shot turns, prompt fitting, exact match
                   (the metric LLM-JEPA, Huang et al., 2025, reports for NL-RX and Django), and
                   batches split across processes under torchrun, gathered back in order
    gsm8k.py       GSM8K (Cobbe et al., 2021): the final answer after ####, compared as numbers
    nl_rx.py       NL-RX-SYNTH / TURK (Locascio et al., 2016): equivalence of canonical regexes
    spider.py      Spider (Yu et al., 2018): schema prompts, normalised-SQL match, execution accuracy
    django.py      Django (Oda et al., 2015): line-aligned .anno/.code files
    generation.py  answers from the LLaDA sampler (dlm/sampler.py), scored by the task's metrics
    probe.py       the held-out diffusion-loss probe (the paper's Wikitext probe)
    mmlu.py        MMLU (Hendrycks et al., 2021) by the likelihood of the answer letter
    drift.py       drift from the base checkpoint: weight distance, linear CKA (Kornblith et
                   al., 2019), forgetting, and its plot
"""

from pathlib import Path

from dlm import data, hub
from tasks.common import Item, exact_match
from tasks.django import load_django
from tasks.gsm8k import gsm8k_correct, gsm8k_gold
from tasks.mmlu import Question
from tasks.nl_rx import regex_equivalent
from tasks.spider import execution_match, gold_rows, load_spider, normalize_sql, spider_database

GENERATION_TASKS = ("exact", "gsm8k", "nl-rx-synth", "nl-rx-turk", "spider", "django")
TASKS = GENERATION_TASKS + ("probe", "mmlu", "drift")


def load_items(task: str, path: Path, spider_tables: Path | None = None) -> list[Item]:
    """A task's examples. Native formats: Spider .json, Django .anno/.code. Any task also
    reads data.py's formats (.jsonl/.json with chat messages, prompt/answer or
    question/answer), the ones the trainer reads. GSM8K references keep their reasoning
    (the metric reads the number after ####)."""
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    if task == "django" and path.suffix in (".anno", ".code"):
        return load_django(path)
    if task == "spider" and path.suffix == ".json":
        rows = data.read_json(path)
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "query" in rows[0]:
            return load_spider(path, spider_tables, rows)
    return [Item(ex.prompt, ex.answer) for ex in data.read_examples(path)]


def hub_items(name: str, task: str):
    """What evaluate.py --task TASK reads from a dataset of the paper by name (dlm/hub.py): its
    test split unless NAME:split picks one (Spider: validation). Generation tasks -> Items (the
    prompts training uses), mmlu -> Questions, probe/drift -> the text."""
    name, _, picked = name.partition(":")
    dataset = hub.entry(name)
    split = picked or next(s for s in ("test", "validation") if s in dataset.splits)
    hub.check_split(dataset, split)
    wanted = {"mmlu": "mmlu", "probe": "wikitext2", "drift": "wikitext2"}.get(task)
    if (name in ("mmlu", "wikitext2") or wanted) and name != wanted:
        raise ValueError(f"--data {name}: --task {task} reads "
                         f"{wanted or 'a task dataset (gsm8k, nl-rx-synth, nl-rx-turk, spider, django)'}, not {name}")
    if task == "mmlu":
        return [Question(row["subject"], row["question"], row["choices"], row["answer"])
                for row in hub.load_rows(name, split)]
    if wanted == "wikitext2":
        return "".join(row["text"] for row in hub.load_rows(name, split))
    return [Item(ex.prompt, ex.answer) for ex in hub.training_examples(name, split)]


def score_answers(task: str, items: list[Item], answers: list[str], spider_db: Path | None = None) -> dict:
    """Per-example correctness for every metric of the task -> {metric: mean, ...}."""
    refs = [item.reference for item in items]
    metrics = {}
    if task == "gsm8k":
        metrics["accuracy"] = [gsm8k_correct(a, r) for a, r in zip(answers, refs)]
        metrics["accuracy_flexible"] = [gsm8k_correct(a, r, flexible=True) for a, r in zip(answers, refs)]
    elif task == "spider":
        metrics["exact_match"] = [normalize_sql(a) == normalize_sql(r) for a, r in zip(answers, refs)]
        if spider_db is not None:
            metrics["execution_accuracy"] = [
                execution_match(spider_database(spider_db, item.db_id), a, item.reference)
                for item, a in zip(items, answers)]
    else:
        metrics["exact_match"] = [exact_match(a, r) for a, r in zip(answers, refs)]
        if task.startswith("nl-rx"):
            metrics["regex_equivalence"] = [regex_equivalent(a, r) for a, r in zip(answers, refs)]
    return {name: sum(hits) / max(len(hits), 1) for name, hits in metrics.items()}


def check_references(task: str, items: list[Item], source: Path, spider_db: Path | None = None):
    """Refuse, before any generation, references the metric cannot score: a blank one (empty or
    whitespace only: train.py refuses such rows too), a GSM8K answer with no final number, a
    Spider gold query that fails on its database (or has none)."""
    for i, item in enumerate(items):
        try:
            if not item.reference.strip():
                raise ValueError("blank reference answer: no answer can be scored against it; fix or drop the row")
            if task == "gsm8k":
                gsm8k_gold(item.reference)
            elif task == "spider" and spider_db is not None:
                gold_rows(spider_database(spider_db, item.db_id), item.reference)
        except ValueError as e:
            raise ValueError(f"{source} item {i}: {e}") from None
