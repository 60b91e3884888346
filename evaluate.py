"""
Evaluate a masked-diffusion LM checkpoint on everything the DLLM-JEPA paper measures.

    python evaluate.py --model out/run/final --task nl-rx-synth --data synth_dev.jsonl
    python evaluate.py --model GSAI-ML/LLaDA-8B-Instruct --task gsm8k --data test.jsonl \
        --shots 4 --fewshot-data train.jsonl --gen-length 256 --block-length 8 --steps 256
    python evaluate.py --model out/run/final --task probe --data wikitext2/valid.txt
    python evaluate.py --model out/run/final --task mmlu --data mmlu/test --shots 5 --fewshot-data mmlu/dev
    python evaluate.py --model out/run/final --task drift --base out/base/final --data valid.txt

What it measures:
1. Task metrics, each on answers from the LLaDA sampler (generate.py), following the
   protocol of LLM-JEPA (Huang et al., 2025) that the paper compares with:
   - GSM8K (Cobbe et al., 2021): the final answer after `####`, compared as numbers (commas,
     `$`, units and trailing zeros do not matter); a "flexible" variant takes the last number,
   - NL-RX-SYNTH / TURK (Locascio et al., 2016): exact match, as LLM-JEPA reports it, plus an
     equivalence score on a canonical form of the regex (sound, not complete: see
     `regex_canonical`),
   - Spider (Yu et al., 2018): exact match of normalised SQL, and execution accuracy with
     sqlite3 when the databases are given,
   - Django (Oda et al., 2015): exact match.
2. The held-out diffusion-loss probe (the paper's Wikitext probe): LLaDA's pre-training loss,
   estimated on a fixed grid of t with masks drawn from a fixed seed, so every checkpoint is
   scored on the very same masked inputs.
3. MMLU (Hendrycks et al., 2021) as a sanity check: the likelihood of each answer letter at
   one masked position after the prompt (exact for a one-token answer), zero- or few-shot.
4. Drift from the base checkpoint, per layer: relative weight distance (geometric drift),
   linear CKA of hidden states on held-out text (Kornblith et al., 2019; representation
   drift), and functional forgetting = probe loss minus the base's. JSON and a PNG plot.

Every backbone goes through backbones.load_backbone (the tiny model, LLaDA, Dream), and every
forward through generate.aligned_logits, so shifted-logit families (Dream) are scored right.
"""

import argparse
import contextlib
import csv
import io
import json
import os
import re
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

import data
import distributed
from dllm_jepa import answer_regions, diffusion_loss, mask_probability, masked_logits
from generate import (SamplerConfig, aligned_logits, conventions, generate_text, left_pad, sampler_for,
                      trained_seq_len)

GENERATION_TASKS = ("exact", "gsm8k", "nl-rx-synth", "nl-rx-turk", "spider", "django")
TASKS = GENERATION_TASKS + ("probe", "mmlu", "drift")

# -----------------------------------------------------------------------------
# Items to answer: a chat prompt and a reference answer


@dataclass
class Item:
    prompt: list              # chat messages before the answer, as data.Example.prompt
    reference: str            # the gold answer text
    db_id: str | None = None  # Spider: the database the query runs on


def read_json(path: Path):
    try:
        return json.loads(data.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def non_empty(examples: list, path: Path) -> list:
    """An empty evaluation set would score 0 (or crash later) without saying why."""
    if not examples:
        raise ValueError(f"{path}: holds no examples")
    return examples


def spider_schema(tables_path: Path) -> dict[str, str]:
    """db_id -> "table(column, ...); ..." from Spider's tables.json (original names)."""
    schemas = {}
    for i, db in enumerate(read_json(tables_path)):
        try:
            columns = {t: [] for t in range(len(db["table_names_original"]))}
            for table, column in db["column_names_original"]:
                if table >= 0:  # -1 is the "*" pseudo-column
                    columns[table].append(column)
            schemas[db["db_id"]] = "; ".join(f"{name}({', '.join(columns[t])})"
                                             for t, name in enumerate(db["table_names_original"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{tables_path} item {i}: not a Spider schema ({e!r})") from None
    return schemas


def spider_messages(question: str, db_id: str, schema: str | None) -> list:
    """The prompt of a Spider example (our format): database name, its schema when known,
    the question. The runner trains with this very function, so train and test agree."""
    lines = [f"Database: {db_id}"] + ([f"Schema: {schema}"] if schema else []) + [f"Question: {question}"]
    return [{"role": "user", "content": "\n".join(lines)}]


def load_spider(path: Path, tables: Path | None, rows=None) -> list[Item]:
    """Spider's own JSON: a list of {question, query, db_id}. tables: tables.json, default
    the one beside the data file if there is one (the official layout). rows: the file's
    JSON when the caller has parsed it already."""
    tables = tables or (path.parent / "tables.json" if (path.parent / "tables.json").is_file() else None)
    schemas = spider_schema(tables) if tables else {}
    rows = read_json(path) if rows is None else rows
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a Spider file holds a list of examples")
    items = []
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("question", "query", "db_id"))):
            raise ValueError(f"{path} item {i}: a Spider example needs string fields question, query, db_id")
        if schemas and row["db_id"] not in schemas:
            raise ValueError(f"{path} item {i}: db_id {row['db_id']!r} is not in {tables}")
        items.append(Item(spider_messages(row["question"], row["db_id"], schemas.get(row["db_id"])),
                          row["query"], row["db_id"]))
    return non_empty(items, path)


def load_django(path: Path) -> list[Item]:
    """Django's line-aligned pair of files: X.anno (descriptions) and X.code (Python lines);
    either may be given."""
    anno, code = path.with_suffix(".anno"), path.with_suffix(".code")
    for p in (anno, code):
        if not p.is_file():
            raise ValueError(f"{path}: Django data needs both {anno.name} and {code.name}; {p} is missing")
    descriptions = data.read_text(anno).splitlines()
    lines = data.read_text(code).splitlines()
    if len(descriptions) != len(lines):
        raise ValueError(f"{anno} has {len(descriptions)} lines but {code} has {len(lines)}: "
                         "they must be line-aligned")
    return non_empty([Item([{"role": "user", "content": d.strip()}], c.strip())
                      for d, c in zip(descriptions, lines)], anno)


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
        rows = read_json(path)
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "query" in rows[0]:
            return load_spider(path, spider_tables, rows)
    return [Item(ex.prompt, ex.answer) for ex in data.read_examples(path)]


def with_shots(items: list[Item], exemplars: list[Item], shots: int) -> list[Item]:
    """Few-shot prompting for chat models: the first `shots` exemplars become earlier turns
    of the conversation (user question, assistant answer), then the real question."""
    turns = []
    for ex in exemplars[:shots]:
        turns += [m for m in ex.prompt if m["role"] != "system"]
        turns.append({"role": "assistant", "content": ex.reference})
    out = []
    for item in items:
        system = [m for m in item.prompt if m["role"] == "system"]
        rest = [m for m in item.prompt if m["role"] != "system"]
        out.append(Item(system + turns + rest, item.reference, item.db_id))
    return out

# -----------------------------------------------------------------------------
# Task metrics


NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d*)?|\.\d+)")


def normalize_number(text: str | None) -> str | None:
    """The first number in `text` in a canonical form: "$1,000.50 dollars" -> "1000.5",
    "18.00" -> "18", "-3" -> "-3"; None when there is no number."""
    if text is None:
        return None
    match = NUMBER.search(text.replace("$", "").replace("\u2212", "-"))  # also the Unicode minus
    if not match:
        return None
    try:
        value = Decimal(match.group().replace(",", "").rstrip("."))
    except InvalidOperation:
        return None
    value = value.normalize()
    return format(value if value != 0 else Decimal(0), "f")  # "f": never 1E+2; -0 -> 0


def gsm8k_final(text: str) -> str | None:
    """What follows the last `####` (GSM8K's answer marker), up to the end of that line."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().split("\n", 1)[0]


def gsm8k_gold(reference: str) -> str:
    """A GSM8K reference's final answer, normalised: the number after `####`, or the whole
    reference when it is a bare number. Anything else is refused (ValueError): the first
    number of a worked solution is an intermediate value, and scoring against it is wrong."""
    final = gsm8k_final(reference)
    if final is None and not NUMBER.fullmatch(reference.strip()):
        raise ValueError(f"the GSM8K reference {reference[:60]!r} has no '#### answer' and is not a bare "
                         "number; end each reference with '#### <number>'")
    gold = normalize_number(reference if final is None else final)
    if gold is None:
        raise ValueError(f"the GSM8K reference's final answer {final!r} (after ####) is not a number")
    return gold


def gsm8k_correct(prediction: str, reference: str, flexible=False) -> bool:
    """Equal final answers, compared as numbers. strict (LLM-JEPA's protocol): the prediction
    must give its answer after ####. flexible: else its last number counts."""
    gold = gsm8k_gold(reference)
    final = gsm8k_final(prediction)
    if final is None and flexible:
        numbers = NUMBER.findall(prediction)
        final = numbers[-1] if numbers else None
    return normalize_number(final) == gold


def exact_match(prediction: str, reference: str) -> bool:
    """LLM-JEPA's metric for NL-RX and Django: string equality after stripping the outer
    whitespace (it strips its generations; we strip both sides, which matters for Django
    lines that keep their indentation)."""
    return prediction.strip() == reference.strip()


SQL_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|!=|<>|<=|>=|\|\||[A-Za-z_][\w.]*|\d+(?:\.\d+)?|\S")


def normalize_sql(query: str) -> str:
    """A canonical string of a SQL query: tokens joined by one space, keywords and names
    lowercased, string literals kept verbatim but always single-quoted, `<>` as `!=`, no
    trailing semicolon. "SELECT count(*) FROM head WHERE age  >  56" and
    "select COUNT( * ) from head where age > 56;" normalise alike. Spider's official exact
    match compares parsed clauses as sets; this is the stricter string form of it."""
    out = []
    for tok in SQL_TOKEN.findall(query.strip().rstrip(";")):
        if tok[0] in "'\"":
            body = tok[1:-1].replace(tok[0] * 2, tok[0])
            out.append("'" + body.replace("'", "''") + "'")
        else:
            out.append("!=" if tok == "<>" else tok.lower())
    return " ".join(out)


def run_sql(db_path: Path, query: str, timeout_s: float = 10.0):
    """Rows of `query` on a read-only connection; a progress handler aborts runaway queries."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def gold_rows(db_path: Path, reference: str):
    """The gold query's rows. A failing gold query is the data's fault: an error, not a 0."""
    try:
        return run_sql(db_path, reference)
    except (sqlite3.Error, sqlite3.Warning) as e:  # Warning: e.g. two statements in one query
        raise ValueError(f"{db_path}: the gold query fails ({e}): {reference}") from None


def execution_match(db_path: Path, prediction: str, reference: str) -> bool:
    """Spider's execution accuracy: the two queries return the same rows; as a list when the
    gold query orders its result, else as a multiset. A failing prediction scores 0."""
    gold = gold_rows(db_path, reference)
    try:
        guess = run_sql(db_path, prediction)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
        return False
    if "order by" in normalize_sql(reference):
        return guess == gold
    return Counter(map(repr, guess)) == Counter(map(repr, gold))


# NL-RX regexes use brics-automaton syntax (Locascio et al. evaluate with a brics DFA check):
# `&` is intersection and `~` complement, neither of which Python's `re` knows. A complete
# DFA-equivalence check would need the meaning of `\b`, which brics does not define as a word
# boundary and NL-RX's Java evaluator does not document; any choice would be ours, not theirs.
# So we compare canonical forms instead, using only laws that hold whatever `\b` means:
# grouping, associativity, commutativity and idempotence of | and &, (X*)* = X*, and
# X*X* = X*. Equal canonical forms imply equal languages (sound); some equal languages
# keep different forms (incomplete), so the score is a lower bound on DFA equivalence.
REGEX_TOKEN = re.compile(r"\\.|\[[^\]]*\]|\{\d*,?\d*\}|.", re.S)


def regex_canonical(regex: str):
    """Parse an NL-RX regex (brics precedence: | < & < concatenation < postfix < ~) into a
    canonical tree of tuples. Raises ValueError on malformed input."""
    tokens = REGEX_TOKEN.findall(regex)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def nary(op, parts):  # flatten, dedupe, sort: | and & are associative, commutative, idempotent
        flat = set()
        for p in parts:
            flat.update(p[1] if p[0] == op else (p,))
        return next(iter(flat)) if len(flat) == 1 else (op, tuple(sorted(flat, key=repr)))

    def union():
        parts = [inter()]
        while peek() == "|":
            take()
            parts.append(inter())
        return nary("|", parts)

    def inter():
        parts = [concat()]
        while peek() == "&":
            take()
            parts.append(concat())
        return nary("&", parts)

    def concat():
        parts = []
        while peek() not in (None, "|", "&", ")"):
            node = repeat()
            parts += node[1] if node[0] == "cat" else [node]
        merged = []
        for node in parts:  # X*X* = X*
            if not (merged and node == merged[-1] and node[0] == "rep" and node[2:] == (0, None)):
                merged.append(node)
        if not merged:
            return ("empty",)  # "()" or an empty alternative: the empty string
        return merged[0] if len(merged) == 1 else ("cat", tuple(merged))

    def repeat():
        node = complement()
        while peek() is not None and (peek() in "*+?" or peek().startswith("{")):
            lo, hi = bounds(take())
            if node[0] == "rep" and node[3] is None and hi is None and {node[2], lo} <= {0, 1}:
                node = ("rep", node[1], node[2] * lo, None)  # (X*)+ = (X+)* = X*, (X+)+ = X+
            else:
                node = ("rep", node, lo, hi)
        return node

    def complement():
        if peek() == "~":
            take()
            return ("not", complement())
        return atom()

    def atom():
        tok = take() if peek() is not None else None
        if tok == "(":
            node = union()
            if peek() != ")":
                raise ValueError(f"regex {regex!r}: unbalanced parenthesis")
            take()
            return node
        if tok is None or tok in ")|&*+?" or tok.startswith("{"):
            raise ValueError(f"regex {regex!r}: unexpected {tok or 'end'}")
        if tok.startswith("[") and len(tok) > 2:
            chars = char_class(tok[1:-1])
            return ("lit", chars) if len(chars) == 1 else ("class", chars)
        return ("any",) if tok == "." else ("lit", tok)

    def bounds(tok):
        if tok in "*+?":
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[tok]
        lo, comma, hi = tok[1:-1].partition(",")
        if not lo.isdigit():
            raise ValueError(f"regex {regex!r}: bad repetition {tok}")
        return int(lo), (int(hi) if hi else None) if comma else int(lo)

    def char_class(body):
        if body.startswith("^"):
            raise ValueError(f"regex {regex!r}: negated classes are not NL-RX syntax")
        chars, i = set(), 0
        while i < len(body):
            if i + 2 < len(body) and body[i + 1] == "-":
                chars.update(map(chr, range(ord(body[i]), ord(body[i + 2]) + 1)))
                i += 3
            else:
                chars.add(body[i])
                i += 1
        return "".join(sorted(chars))

    tree = union()
    if pos != len(tokens):
        raise ValueError(f"regex {regex!r}: unexpected {tokens[pos]!r} at token {pos}")
    return tree


def regex_equivalent(prediction: str, reference: str) -> bool:
    try:
        return regex_canonical(prediction.strip()) == regex_canonical(reference.strip())
    except ValueError:
        return False  # an unparsable prediction is wrong


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


def spider_database(folder: Path, db_id: str | None) -> Path:
    """Spider's layout: FOLDER/<db_id>/<db_id>.sqlite."""
    if db_id is None:
        raise ValueError("execution accuracy needs each example's db_id: give Spider's own .json file")
    path = folder / db_id / f"{db_id}.sqlite"
    if not path.is_file():
        raise ValueError(f"--spider-db {folder}: no database {path}")
    return path


def check_references(task: str, items: list[Item], source: Path, spider_db: Path | None = None):
    """Refuse, before any generation, references the metric cannot score: a GSM8K answer
    with no final number, a Spider gold query that fails on its database (or has none)."""
    for i, item in enumerate(items):
        try:
            if task == "gsm8k":
                gsm8k_gold(item.reference)
            elif task == "spider" and spider_db is not None:
                gold_rows(spider_database(spider_db, item.db_id), item.reference)
        except ValueError as e:
            raise ValueError(f"{source} item {i}: {e}") from None


def fit_prompt(ids: list[int], budget: int) -> list[int]:
    """Keep a prompt's last `budget` tokens (its end holds the question and the assistant tag)."""
    return ids[len(ids) - budget:] if len(ids) > budget else ids  # not ids[-budget:]: -0 keeps all


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "max_sequence_length", None)


def generate_sharded(backbone, prompts: list, sampler: SamplerConfig, batch_size: int, rank: int = 0,
                     world_size: int = 1, seed: int = 0) -> list[str]:
    """generate_text over several processes: rank r answers the r-th of `world_size` equal
    shares (the last padded with repeats, so every rank runs the same forwards, as a sharded
    model needs) and every rank returns all answers, in order."""
    share = -(-len(prompts) // world_size)
    mine = prompts[rank * share:(rank + 1) * share]
    answers = generate_text(backbone, mine + [prompts[0]] * (share - len(mine)), sampler, batch_size, seed)
    if world_size > 1:
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, answers)
        answers = [a for part in gathered for a in part]
    return answers[:len(prompts)]


def evaluate_generation(backbone, task: str, items: list[Item], sampler: SamplerConfig,
                        batch_size=8, seed=0, spider_db: Path | None = None,
                        probe: "ProbeConfig | None" = None) -> dict:
    """Generate an answer to every item and score it; also the diffusion loss of the
    reference answers and their teacher-forced token accuracy (answer_scores, on probe's grid
    and seed). Returns metrics and answers."""
    tokenizer = backbone.tokenizer
    prompts = [data.prompt_ids(tokenizer, item.prompt) for item in items]
    limit = max_positions(backbone.model)
    cut = 0
    if limit is not None:
        if sampler.gen_length >= limit:
            raise ValueError(f"--gen-length {sampler.gen_length} leaves no room for a prompt in the model's "
                             f"{limit} positions: give a smaller --gen-length")
        cut = sum(len(p) > limit - sampler.gen_length for p in prompts)
        prompts = [fit_prompt(p, limit - sampler.gen_length) for p in prompts]
    answers = generate_text(backbone, prompts, sampler, batch_size, seed)
    metrics = score_answers(task, items, answers, spider_db)
    metrics |= answer_scores(backbone, items, probe or ProbeConfig(batch_size=batch_size))
    return {"task": task, "n": len(items), **metrics, "prompts_cut": cut, "sampler": asdict(sampler),
            "answers": [{"prediction": a, "reference": i.reference} for a, i in zip(answers, items)]}

# -----------------------------------------------------------------------------
# The held-out diffusion-loss probe


@dataclass
class ProbeConfig:
    seq_len: int = 128      # tokens per window of held-out text
    windows: int = 32       # windows scored
    grid: int = 8           # t on the midpoints (k + 1/2) / grid, k < grid
    seed: int = 0           # the masks' seed: the same for every checkpoint
    eps: float = 1e-3       # LLaDA's mask-probability floor
    batch_size: int = 8


def read_text_file(path: Path) -> str:
    """The held-out text of the probe and of drift, read (and its UTF-8 checked) before any
    model loads."""
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    return data.read_text(path)


def probe_masks(shape, config: ProbeConfig):
    """Masks for every grid point, a function of (shape, seed) only: (G, N, T) bool and the
    mask probabilities (G,). Position 0 stays clean, as in data.tokenize_text, so shifted-logit
    backbones always see a real first token and all families score the same positions."""
    t = (torch.arange(config.grid, dtype=torch.float64) + 0.5) / config.grid
    p = mask_probability(t, config.eps)                                              # (G,)
    u = torch.rand((config.grid, *shape), generator=torch.Generator().manual_seed(config.seed),
                   dtype=torch.float64)
    masks = u < p[:, None, None]
    masks[..., 0] = False
    return masks, p.float()


@torch.no_grad()
def masked_loss(backbone, ids: torch.Tensor, scored: torch.Tensor, config: ProbeConfig) -> tuple[list, float]:
    """The diffusion loss of rows `ids` (N, T), masking only `scored` positions, at each grid
    t -> a list (G,), and the share of masked tokens whose argmax is right over all of them.
    Per row: CE on the masked tokens / p, summed, / the row's scored count (LLaDA's
    per-sequence normalisation); rows averaged. The masks are probe_masks': a function of
    (shape, seed), identical for every checkpoint."""
    model, device = backbone.model.eval(), next(backbone.model.parameters()).device
    masks, p = probe_masks(ids.shape, config)
    per_t, right, total_masked = [], 0, 0
    for g in range(config.grid):
        total = 0.0
        for start in range(0, len(ids), config.batch_size):
            rows = slice(start, start + config.batch_size)
            x, score = ids[rows].to(device), scored[rows].to(device)
            masked = masks[g, rows].to(device) & score
            logits = aligned_logits(model, torch.where(masked, backbone.mask_token_id, x), **conventions(backbone))
            loss = diffusion_loss(logits, x, masked, p[g].expand(len(x)).to(device), score, "answer")
            total += loss.item() * len(x)
            right += int((masked_logits(logits, masked).argmax(-1) == x[masked]).sum())
            total_masked += int(masked.sum())
        per_t.append(total / len(ids))
    return per_t, right / max(total_masked, 1)


def grid_points(config: ProbeConfig) -> list[float]:
    return [(k + 0.5) / config.grid for k in range(config.grid)]


def diffusion_probe(backbone, windows: torch.Tensor, config: ProbeConfig) -> dict:
    """LLaDA's pre-training loss on held-out text windows (N, T), every token but the first
    scored. The mean over the grid is the midpoint rule for the integral over t in (0, 1):
    a deterministic estimate of the negative diffusion ELBO per token."""
    scored = torch.ones(windows.shape, dtype=torch.bool)
    scored[:, 0] = False
    per_t, _ = masked_loss(backbone, windows, scored, config)
    return {"probe_loss": sum(per_t) / len(per_t), "per_t": dict(zip(grid_points(config), per_t)),
            "windows": len(windows), "seq_len": windows.shape[1], "grid": config.grid, "seed": config.seed}


def answer_scores(backbone, items: list[Item], config: ProbeConfig) -> dict:
    """Decoding-free task metrics on the reference answers given their prompts, on fixed
    masks: the diffusion loss (LLaDA's SFT loss, answer tokens and their EOS scored, padding
    not) and the teacher-forced token accuracy (argmax right at a masked answer token, the
    rest of the answer given). They move smoothly even where exact match is still 0."""
    tokenizer = backbone.tokenizer
    examples = [data.Example(item.prompt, item.reference) for item in items]
    longest = max(len(data.prompt_ids(tokenizer, ex.prompt)) + len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
                  for ex in examples) + 1
    rows = data.tokenize_examples(examples, tokenizer, min(longest, max_positions(backbone.model) or longest))
    _, scored = answer_regions(rows.prompt_lengths, rows.answer_lengths, rows.input_ids.shape[1], pad_is_answer=False)
    per_t, accuracy = masked_loss(backbone, rows.input_ids, scored, config)
    return {"answer_loss": sum(per_t) / len(per_t), "answer_accuracy": accuracy}

# -----------------------------------------------------------------------------
# MMLU by the likelihood of the answer letter


LETTERS = "ABCD"


@dataclass
class Question:
    subject: str
    question: str
    choices: list
    answer: int  # 0..3


def read_mmlu_csv(path: Path) -> list[Question]:
    """One subject's CSV: either with the header question,choice0..3,answer (answer 0-3) or
    the original headerless layout (question, A, B, C, D, letter)."""
    subject = re.sub(r"_(dev|val|test)$", "", path.stem)
    try:
        rows = list(csv.reader(io.StringIO(data.read_text(path), newline="")))  # "": quoted newlines stay
    except csv.Error as e:  # e.g. a field past csv's size limit: an unclosed quote swallows the file
        raise ValueError(f"{path}: not a readable CSV file ({e}); check its quotes") from None
    if rows and [c.strip().lower() for c in rows[0]] == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
        rows = rows[1:]
    questions = []
    for lineno, row in enumerate(rows, start=1):
        if len(row) != 6:
            raise ValueError(f"{path} row {lineno}: expected 6 columns (question, 4 choices, answer), got {len(row)}")
        answer = row[5].strip()
        index = "0123".find(answer) if answer in ("0", "1", "2", "3") else LETTERS.find(answer.upper())
        if not answer or index < 0:
            raise ValueError(f"{path} row {lineno}: answer {answer!r} is neither 0-3 nor A-D")
        questions.append(Question(subject, row[0], row[1:5], index))
    return non_empty(questions, path)


def load_mmlu(path: Path) -> list[Question]:
    """A CSV file or a folder of them (one per subject)."""
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise ValueError(f"{path}: no MMLU .csv file(s) there")
    return [q for f in files for q in read_mmlu_csv(f)]


def mmlu_block(q: Question, with_answer: bool) -> str:
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return f"{q.question}{choices}\nAnswer:" + (f" {LETTERS[q.answer]}\n\n" if with_answer else "")


def mmlu_prompt(q: Question, exemplars: list[Question]) -> str:
    """The standard MMLU format (Hendrycks et al.): a subject header, solved exemplars, the
    question, "Answer:"."""
    header = f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
    return header + "".join(mmlu_block(e, True) for e in exemplars) + mmlu_block(q, False)


def letter_tokens(tokenizer, prompt: str):
    """(prompt ids, the four letters' ids) such that prompt ids + [letter id] is exactly how
    the tokenizer writes the prompt followed by that letter. BPE vocabularies fold the space
    into the letter (" A"); byte-level ones need the space in the prompt."""
    for text, sep in ((prompt, " "), (prompt + " ", "")):
        base = tokenizer(text)["input_ids"]
        full = [tokenizer(text + sep + letter)["input_ids"] for letter in LETTERS]
        if all(len(f) == len(base) + 1 and f[:-1] == base for f in full):
            return base, [f[-1] for f in full]
    raise ValueError("the tokenizer does not write the answer letters as one token after "
                     "'Answer:', so one masked position cannot score them")


@torch.no_grad()
def mmlu_accuracy(backbone, questions: list[Question], shots: int = 0,
                  exemplars: list[Question] = (), batch_size: int = 8) -> dict:
    """Accuracy by argmax over the four letters' logits at one masked position after the
    prompt. Few-shot exemplars come from the same subject, in file order; when the model's
    context cannot hold them all, exemplars are dropped from the front (counted)."""
    model, tokenizer = backbone.model.eval(), backbone.tokenizer
    device = next(model.parameters()).device
    by_subject = {}
    for e in exemplars:
        by_subject.setdefault(e.subject, []).append(e)
    limit = max_positions(model)
    rows, letters, shots_used = [], [], []
    for q in questions:
        pool = by_subject.get(q.subject, [])[:shots]
        while True:  # fewer exemplars until prompt + the masked answer fit
            ids, ids_of_letters = letter_tokens(tokenizer, mmlu_prompt(q, pool))
            if limit is None or len(ids) < limit or not pool:
                break
            pool = pool[1:]
        rows.append((fit_prompt(ids, limit - 1) if limit else ids) + [backbone.mask_token_id])
        letters.append(ids_of_letters)
        shots_used.append(len(pool))
    correct, by_subject_hits = [], {}
    pad = backbone.eos_token_id
    for start in range(0, len(rows), batch_size):
        ids, attention = left_pad(rows[start:start + batch_size], pad)   # mask last: column -1
        attention = attention if not bool(attention.all()) else None
        logits = aligned_logits(model, ids.to(device), None if attention is None else attention.to(device),
                                **conventions(backbone))[:, -1]                      # (b, V)
        choice = logits.gather(1, torch.tensor(letters[start:start + batch_size], device=device)).argmax(1)
        for q, c in zip(questions[start:start + batch_size], choice.tolist()):
            correct.append(c == q.answer)
            by_subject_hits.setdefault(q.subject, []).append(c == q.answer)
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct), "shots": shots,
            "mean_shots_used": sum(shots_used) / max(len(shots_used), 1),
            "by_subject": {s: sum(h) / len(h) for s, h in sorted(by_subject_hits.items())}}

# -----------------------------------------------------------------------------
# Drift from the base checkpoint


def layer_groups(backbone) -> dict[str, list[str]]:
    """Parameter names per layer, in order: "block i" for each transformer block, then
    "other" for the rest (embeddings, final norm, output head)."""
    owner = {id(p): f"block {i}" for i, block in enumerate(backbone.blocks) for p in block.parameters()}
    groups = {f"block {i}": [] for i in range(len(backbone.blocks))} | {"other": []}
    for name, p in backbone.model.named_parameters():
        groups[owner.get(id(p), "other")].append(name)
    return groups


@torch.no_grad()
def weight_drift(backbone, base) -> dict[str, float]:
    """Relative distance ||theta - theta_base|| / ||theta_base|| per layer group."""
    params, base_params = dict(backbone.model.named_parameters()), dict(base.model.named_parameters())
    drift = {}
    for group, names in layer_groups(backbone).items():
        missing = [n for n in names if n not in base_params or base_params[n].shape != params[n].shape]
        if missing:
            raise ValueError(f"the base checkpoint has no parameter {missing[0]} of matching shape: "
                             "drift needs the base the model was fine-tuned from")
        diff = sum((params[n].double() - base_params[n].double().to(params[n].device)).pow(2).sum() for n in names)
        norm = sum(base_params[n].double().pow(2).sum() for n in names)
        drift[group] = (diff.sqrt() / norm.sqrt().clamp_min(1e-12)).item()
    return drift


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) of two representations of the same n examples,
    x (n, d1) and y (n, d2): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc centred.
    1 for identical representations; invariant to orthogonal maps and isotropic scaling."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).pow(2).sum()
    return (cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-300)).item()


@torch.no_grad()
def hidden_states(backbone, windows: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Every layer's hidden states on clean text, tokens as rows: a list of (N * T, C)."""
    model, device = backbone.model.eval(), next(backbone.model.parameters()).device
    batches = [model(input_ids=windows[start:start + batch_size].to(device), output_hidden_states=True).hidden_states
               for start in range(0, len(windows), batch_size)]
    return [torch.cat([b[layer].flatten(0, 1).float().cpu() for b in batches]) for layer in range(len(batches[0]))]


def representation_drift(backbone, base, windows: torch.Tensor, max_tokens: int = 4096) -> list[float]:
    """Linear CKA of base vs fine-tuned hidden states per layer (index 0 = embeddings, i =
    output of block i; the last is after the final norm), on the first max_tokens tokens."""
    windows = windows[: max(1, max_tokens // windows.shape[1])]
    return [linear_cka(a, b) for a, b in zip(hidden_states(base, windows), hidden_states(backbone, windows))]


def drift_report(backbone, base, windows: torch.Tensor, probe: ProbeConfig) -> dict:
    """Geometric, representational and functional drift of a fine-tuned model from its base."""
    model_probe = diffusion_probe(backbone, windows, probe)["probe_loss"]
    base_probe = diffusion_probe(base, windows, probe)["probe_loss"]
    return {"weight_distance": weight_drift(backbone, base),
            "cka": representation_drift(backbone, base, windows),
            "probe_loss": model_probe, "base_probe_loss": base_probe,
            "forgetting": model_probe - base_probe}


def plot_drift(reports: dict[str, dict], path: Path, title: str = ""):
    """Per-block weight distance and CKA of each block's output, one line per run
    (name -> a drift_report, or anything with its "weight_distance" and "cka")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (ax_w, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, report in reports.items():
        blocks = [k for k in report["weight_distance"] if k != "other"]
        ax_w.plot(range(len(blocks)), [report["weight_distance"][b] for b in blocks], marker="o", label=name)
        ax_c.plot(range(len(report["cka"]) - 1), report["cka"][1:], marker="o", label=name)  # [0] = embeddings
    ax_w.set(xlabel="block", ylabel="||W - W_base|| / ||W_base||", title="geometric drift")
    ax_c.set(xlabel="block (its output)", ylabel="linear CKA with base", title="representation drift")
    for ax in (ax_w, ax_c):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a save_pretrained folder (train.py's final/) or a hub id "
                   "(GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B, ...), or a peft adapter folder "
                   "(train.py's final/adapter: its adapter_config.json names the base)")
    g.add_argument("--adapter", default=None, help="a peft LoRA adapter folder to apply to --model (merged into "
                   "its weights before evaluating; --base, if any, is loaded without it)")
    g.add_argument("--base", default=None, help="the checkpoint fine-tuning started from: needed by "
                   "--task drift; with --task probe, also reports forgetting (probe loss - base's)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights' dtype (bfloat16 for LLaDA/Dream on a GPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if visible")
    g = p.add_argument_group("task and data")
    g.add_argument("--task", required=True, choices=TASKS,
                   help="a generation task, probe (held-out diffusion loss), mmlu, or drift (from --base)")
    g.add_argument("--data", required=True, help="exact: any .jsonl/.json train.py reads (e.g. a run's "
                   "held_out.jsonl), scored by exact match; gsm8k: .jsonl (question/answer); nl-rx-*: .jsonl (chat "
                   "messages); spider: Spider's .json or .jsonl; django: X.anno (with X.code beside it) or .jsonl; "
                   "probe/drift: a plain-text file; mmlu: a .csv or a folder of them")
    g.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    g.add_argument("--shots", type=int, default=0, help="few-shot exemplars (gsm8k, nl-rx, spider, django, mmlu)")
    g.add_argument("--fewshot-data", default=None, help="where the exemplars come from (same format as --data; "
                   "mmlu: the dev folder, exemplars of the question's subject)")
    g.add_argument("--spider-tables", default=None, help="Spider's tables.json for schemas in the prompt "
                   "(default: tables.json beside --data, if any)")
    g.add_argument("--spider-db", default=None, help="Spider's database folder (DIR/<db_id>/<db_id>.sqlite): "
                   "adds execution accuracy")
    g = p.add_argument_group("generation (LLaDA sampler, generate.py)")
    g.add_argument("--gen-length", type=int, default=None,
                   help="masked positions after the prompt; default: for a train.py model, the canvas it was "
                        "trained on (its --seq-len minus the longest prompt), else 128")
    g.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive block size; default: --gen-length for a train.py model, else 32")
    g.add_argument("--steps", type=int, default=None, help="default: --gen-length (one token per step)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (LLM-JEPA's protocol)")
    g.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"],
                   help="which predictions each step commits: the most confident, or random ones")
    g.add_argument("--suppress-eos", action="store_true", help="never place EOS in the canvas")
    g.add_argument("--batch-size", type=int, default=8, help="prompts (or windows) per forward")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0, random remasking)")
    g = p.add_argument_group("probe and drift")
    g.add_argument("--probe-seq-len", type=int, default=128, help="tokens per held-out window")
    g.add_argument("--probe-windows", type=int, default=32, help="windows from the start of the text")
    g.add_argument("--probe-grid", type=int, default=8, help="t grid points (midpoints of equal bins)")
    g.add_argument("--probe-seed", type=int, default=0, help="the masks' seed: keep it to compare checkpoints")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="write the results as JSON here (default: print only)")
    g.add_argument("--plot", default=None, help="drift: PNG path (default: beside --out)")
    return p, p.parse_args(argv)


def canvas_for(backbone, items: list[Item], sampler_args: dict, trained: int | None) -> SamplerConfig:
    """generate.sampler_for with the longest of the items' chat prompts."""
    longest = max(len(data.prompt_ids(backbone.tokenizer, item.prompt)) for item in items)
    return sampler_for(longest, sampler_args, trained)


def pick_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def load(name: str, args):
    """A model folder or hub id (train.py's final/, a merged LoRA export too); a peft adapter
    folder, loaded onto the base its adapter_config.json names; or, the first time --model is
    loaded, --model with --adapter. An adapter is merged into the base's weights
    (PeftModel.merge_and_unload), so what follows sees a plain model, as from a merged export."""
    from backbones import load_backbone
    adapter = None
    if getattr(args, "adapter", None) and name == args.model and not getattr(args, "adapter_loaded", False):
        adapter, args.adapter_loaded = Path(args.adapter), True  # --base, even if the same, goes without
        if not (adapter / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {adapter}: no adapter_config.json there; give a peft adapter folder "
                             "(train.py --export-adapter writes final/adapter)")
    elif (Path(name) / "adapter_config.json").is_file() and not (Path(name) / "config.json").is_file():
        adapter = Path(name)
        try:
            name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{adapter}: adapter_config.json unreadable ({type(e).__name__}: {e})") from None
        if not name:
            raise ValueError(f"{adapter}: its adapter_config.json names no base model; give --model BASE "
                             f"--adapter {adapter}")
    backbone = load_backbone(name, dtype=getattr(torch, args.dtype))
    if adapter is not None:
        from peft import PeftModel
        backbone.model = PeftModel.from_pretrained(backbone.model, adapter).merge_and_unload()
    backbone.model.to(pick_device(args.device)).eval()
    return backbone


def run(args) -> dict:
    """One evaluation, as the command line describes it -> a JSON-ready dict. The data are
    read and checked before the model loads: a bad --data costs seconds, not an 8B load."""
    path = Path(args.data)
    probe = ProbeConfig(args.probe_seq_len, args.probe_windows, args.probe_grid, args.probe_seed,
                        batch_size=args.batch_size)
    if args.task == "drift" and not args.base:
        raise ValueError("--task drift needs --base (the checkpoint fine-tuning started from)")
    if args.shots and args.task not in ("probe", "drift") and not args.fewshot_data:
        raise ValueError("--shots needs --fewshot-data (where the exemplars come from)")
    if args.task in GENERATION_TASKS:
        trained = trained_seq_len(args.adapter or args.model)
        default = 128 if trained is None else None  # None: from the trained canvas, once prompts are known
        sampler_args = dict(gen_length=args.gen_length or default, steps=args.steps, temperature=args.temperature,
                            remasking=args.remasking, suppress_eos=args.suppress_eos,
                            block_length=args.block_length or (32 if trained is None else args.gen_length))
        if sampler_args["gen_length"] is not None:  # flags checked before the model loads
            SamplerConfig(**sampler_args)
        tables = Path(args.spider_tables) if args.spider_tables else None
        spider_db = Path(args.spider_db) if args.spider_db else None
        items = load_items(args.task, path, tables)[: args.limit]
        check_references(args.task, items, path, spider_db)
        if args.shots:
            items = with_shots(items, load_items(args.task, Path(args.fewshot_data), tables), args.shots)
    elif args.task == "mmlu":
        questions = load_mmlu(path)[: args.limit]
        exemplars = load_mmlu(Path(args.fewshot_data)) if args.shots else []
    else:
        text = read_text_file(path)
    backbone = load(args.model, args)
    result = {"model": args.model, "task": args.task, "data": str(path)}
    if args.task in GENERATION_TASKS:
        sampler = canvas_for(backbone, items, sampler_args, trained)
        result |= evaluate_generation(backbone, args.task, items, sampler, args.batch_size, args.seed,
                                      spider_db, probe)
    elif args.task == "mmlu":
        result |= mmlu_accuracy(backbone, questions, args.shots, exemplars, args.batch_size)
    else:
        limit = max_positions(backbone.model)
        if limit is not None and probe.seq_len > limit:
            raise ValueError(f"--probe-seq-len {probe.seq_len} is longer than the model's {limit} positions: "
                             f"give at most {limit}")
        windows = data.text_rows(text, backbone.tokenizer, probe.seq_len, path, "--probe-seq-len", probe.windows)
        if args.task == "probe":
            result |= diffusion_probe(backbone, windows, probe)
            if args.base:
                base_loss = diffusion_probe(load(args.base, args), windows, probe)["probe_loss"]
                result |= {"base_probe_loss": base_loss, "forgetting": result["probe_loss"] - base_loss}
        else:
            result |= drift_report(backbone, load(args.base, args), windows, probe)
    return result


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    for flag in ("limit", "batch_size", "gen_length", "block_length", "probe_seq_len", "probe_windows", "probe_grid"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')}={value}: must be >= 1")
    if args.shots < 0:
        parser.error(f"--shots={args.shots}: must be >= 0")
    try:
        check_outputs(args)
        result = run(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    summary = {k: v for k, v in result.items() if k not in ("answers", "by_subject", "per_t")}
    print(distributed.strict_json(summary, indent=2))
    write_outputs(args, result)
    return result


def plot_path(args) -> Path | None:
    """Where --task drift draws its plot (--plot, else beside --out, else drift.png); None for other tasks."""
    if args.task != "drift":
        return None
    return Path(args.plot) if args.plot else (Path(args.out).with_suffix(".png") if args.out else Path("drift.png"))


def check_outputs(args):
    """Before the data and the model load (ValueError, one line naming the flags): --out and the
    plot must be files that can be written (not an existing folder, no file in the way of their
    folder, a place that accepts a new file), apart from each other and from every input, and not
    inside a model folder or a checkpoint."""
    inputs = [(f"--{flag.replace('_', '-')}", getattr(args, flag, None))
              for flag in ("model", "adapter", "base", "data", "fewshot_data", "spider_tables", "spider_db")]
    inputs = [(flag, path) for flag, path in inputs if path is not None and Path(path).expanduser().exists()]
    outputs = [(flag, path) for flag, path in (("--out", args.out), ("--plot", plot_path(args))) if path is not None]
    for i, (flag, path) in enumerate(outputs):
        distributed.check_writable(path, flag, folder=False)  # first: an existing folder is not a results file
        problem = (distributed.output_overlap(path, flag, inputs + outputs[:i])
                   or distributed.inside_other_files(path, flag))
        if problem:
            raise ValueError(problem)


def write_outputs(args, result: dict):
    """Write the results (atomically: the old file or the new, never a cut one) and the drift
    plot (drawn beside it, then renamed). A write that still fails costs no finished work: the
    full results are printed to stdout first (unless --out holds them), then one error line."""
    text = distributed.strict_json(result, indent=2)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            distributed.atomic_write_text(out, text)
        except (OSError, ValueError) as e:
            print(text)
            line = str(e) if isinstance(e, ValueError) else f"{out}: could not write ({distributed.cause(e)})"
            raise SystemExit(f"error: --out {line}; the results are printed above in full") from None
        print(f"results: {out}")
    if plot := plot_path(args):
        tmp = plot.with_name(f"{plot.stem}.tmp{plot.suffix}")
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_drift({Path(args.model).name: result}, tmp, f"drift of {args.model} from {args.base}")
            os.replace(tmp, plot)
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not args.out:
                print(text)
            raise SystemExit(f"error: --plot {plot}: could not write the plot ({distributed.cause(e)}); the results "
                             f"are {'in ' + str(args.out) if args.out else 'printed above in full'}") from None
        print(f"plot: {plot}")

if __name__ == "__main__":
    main(sys.argv[1:])
