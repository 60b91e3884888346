"""
The paper's datasets by name: where each is published, and how one of its rows becomes ours.

    rows = hub.load_rows("gsm8k", "train")          # [{"question", "answer"}, ...]
    examples = hub.training_examples("nl-rx-synth")  # data.Example rows: train.py --data nl-rx-synth
    python -m scripts.prepare --out data                     # all of them, in the layout experiments.py reads

DATASETS holds one entry per dataset of the paper: its source, its splits, and ONE adapter
from a source row to our row (what prepare.py writes and train.py trains on):

    gsm8k        {"question", "answer"}                  the answer keeps its reasoning and '#### n'
    nl-rx-synth  {"messages": [system, user, assistant]} LLM-JEPA's chat rows, unchanged
    nl-rx-turk   the same
    spider       {"question", "query", "db_id"}          prompts need tables.json (SPIDER_TABLES)
    django       {"anno", "code"}                        one line each
    mmlu         {"subject", "question", "choices", "answer"}   4 choices, answer 0-3
    wikitext2    {"text"}                                one line of the text, newline included

A source is a Hugging Face hub id and config, read with datasets.load_dataset. NL-RX has no
copy on the hub: it is read with the same call, datasets' json builder on the LLM-JEPA
repository's files at a pinned commit; Spider's tables.json is not on its hub copy either and
comes from the official repository at a pinned commit. Every failure is one line (ValueError)
naming the dataset, its source and split (and the row), and what to do. The one call to the
network is `load_dataset` (and `download` for tables.json): the tests replace them with local
files in each source's row shape.

read_corpus is what train.py's --data and --eval-data read (built-in task, a local file, a name
here or any hub id), tokenised at full length into a Corpus; train.settle chooses --seq-len
and the steps of --epochs from it, and Corpus.rows cuts the rows at that length.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dlm import data

LLM_JEPA = "https://raw.githubusercontent.com/galilai-group/llm-jepa/6d7d0d1f296441beff39a95c801db7f683e3b353/datasets/"
SPIDER_TABLES = ("https://raw.githubusercontent.com/taoyds/spider/b7b5b8c890cd30e35427348bb9eb8c6d1350ca7c/"
                 "evaluation_examples/examples/tables.json")
OFFLINE = ("run `python -m scripts.prepare --out data --datasets {name}` on a machine that has it and copy data/ here, "
           "then give its files (docs/datasets.md: The local folder)")
# A --seq-len this many times the longest row is warned about: every row is padded with EOS to
# --seq-len (LLaDA's SFT recipe), so most of each step would be spent on padding.
PADDED = 4
CHANGED = "the source's rows are not in the shape hub.py expects: check the source, or write the files by hand"

# -----------------------------------------------------------------------------
# Adapters: one source row -> our row. `where` names the row in every error.


def need(row: dict, key: str, where: str, kind=str, expected: str | None = None):
    """row[key], which must be there and of `kind`."""
    if key not in row:
        raise ValueError(f"{where}: missing field {key!r} (the row has {', '.join(sorted(row)) or 'none'}); {CHANGED}")
    if not isinstance(row[key], kind) or isinstance(row[key], bool):
        raise ValueError(f"{where}: field {key!r} is {type(row[key]).__name__}, expected "
                         f"{expected or kind.__name__}; {CHANGED}")
    return row[key]


def one_line(text: str, key: str, where: str) -> str:
    """A field written as one line of a line-aligned file (Django's .anno/.code)."""
    if len(text.splitlines()) > 1 or text.endswith(("\n", "\r")):
        raise ValueError(f"{where}: field {key!r} holds a line break; the .anno/.code files need one line per "
                         f"example; {CHANGED}")
    return text


def gsm8k_row(row: dict, where: str) -> dict:
    return {"question": need(row, "question", where), "answer": need(row, "answer", where)}


def chat_row(row: dict, where: str) -> dict:
    """NL-RX: LLM-JEPA's {"messages": [system, user, assistant]}, checked by data.py's reader."""
    messages = need(row, "messages", where, list)
    messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages]
    data.example_from_row({"messages": messages}, where)  # roles, contents, the answer last: one line if not
    return {"messages": messages}


def spider_row(row: dict, where: str) -> dict:
    return {key: need(row, key, where) for key in ("question", "query", "db_id")}


def django_row(row: dict, where: str) -> dict:
    return {"anno": one_line(need(row, "nl", where), "nl", where),
            "code": one_line(need(row, "code", where), "code", where)}


def mmlu_row(row: dict, where: str) -> dict:
    choices = need(row, "choices", where, list)
    if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: field 'choices' must be 4 strings, got {choices!r:.120}; {CHANGED}")
    answer = need(row, "answer", where, (int, str), "0-3 or A-D")  # cais/mmlu: a ClassLabel, read as 0-3
    index = answer if isinstance(answer, int) else {**dict(zip("ABCD", range(4))), **dict(zip("0123", range(4)))}.get(
        answer.strip().upper(), -1)
    if index not in range(4):
        raise ValueError(f"{where}: field 'answer' is {answer!r}, expected 0-3 (or A-D); {CHANGED}")
    subject = need(row, "subject", where)
    if not subject or not all(c.isalnum() or c == "_" for c in subject):
        raise ValueError(f"{where}: field 'subject' is {subject!r}, expected a name like 'abstract_algebra' "
                         f"(it names the CSV file); {CHANGED}")
    return {"subject": subject, "question": need(row, "question", where), "choices": list(choices), "answer": index}


def text_row(row: dict, where: str) -> dict:
    text = need(row, "text", where)
    return {"text": text if text.endswith("\n") else text + "\n"}  # the hub's blank lines are ""

# -----------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Dataset:
    name: str                 # our short name: train.py --data NAME, prepare.py --datasets NAME, the folder
    path: str                 # datasets.load_dataset's first argument: a hub id, or "json" for data_files
    config: str | None        # its second (the hub config)
    splits: tuple             # the splits one can ask for
    adapter: Callable         # (source row, where) -> our row
    paper: str                # the dataset and its paper
    data_files: dict | None = None  # split -> URL, for a source with no hub copy
    options: dict | None = None     # more load_dataset keywords (the builder's config)
    note: str = ""

    def source(self, split: str | None = None) -> str:
        if self.data_files:  # no hub copy: files read with datasets' json builder
            where = self.data_files[split] if split else f"{self.path} files {', '.join(self.data_files.values())}"
        else:
            where = self.path + (f" config {self.config}" if self.config else "")
        return where + (f", split {split}" if split else "")


DATASETS = {d.name: d for d in [
    Dataset("gsm8k", "openai/gsm8k", "main", ("train", "test"), gsm8k_row,
            "GSM8K, Cobbe et al. 2021"),
    Dataset("nl-rx-synth", "json", None, ("train", "test"), chat_row,
            "NL-RX-SYNTH, Locascio et al. 2016 (LLM-JEPA's 8000/2000 split)",
            {"train": LLM_JEPA + "synth_train.jsonl", "test": LLM_JEPA + "synth_test.jsonl"},
            note="no Hugging Face hub copy: datasets' json builder reads galilai-group/llm-jepa's files"),
    Dataset("nl-rx-turk", "json", None, ("train", "test"), chat_row,
            "NL-RX-TURK, Locascio et al. 2016 (LLM-JEPA's 8000/2000 split)",
            {"train": LLM_JEPA + "turk_train.jsonl", "test": LLM_JEPA + "turk_test.jsonl"},
            note="no Hugging Face hub copy: datasets' json builder reads galilai-group/llm-jepa's files"),
    Dataset("spider", "xlangai/spider", "spider", ("train", "validation"), spider_row,
            "Spider 1.0, Yu et al. 2018",
            note="tables.json from taoyds/spider (not on the hub copy); no SQLite databases (execution match "
                 "needs them: the official spider_data.zip)"),
    Dataset("django", "AhmedSSoliman/DJANGO", None, ("train", "validation", "test"), django_row,
            "Django, Oda et al. 2015 (16000/1000/1805 split)",
            options={"na_filter": False}),  # CSV: a line "None" or "NA" stays text, not a missing value
    Dataset("mmlu", "cais/mmlu", "all", ("dev", "validation", "test"), mmlu_row,
            "MMLU, Hendrycks et al. 2021"),
    Dataset("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", ("train", "validation", "test"), text_row,
            "WikiText-2 raw, Merity et al. 2016",
            note="config wikitext-2-v1 is the tokenized text (<unk>, @-@)"),
]}


def registered(name: str) -> bool:
    """Whether NAME or NAME:split is one of ours (not a hub id: ours have no '/')."""
    return name.partition(":")[0] in DATASETS


def entry(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: the registered names are {', '.join(DATASETS)} "
                         "(or give a local file, or a Hugging Face id[:config] to train.py --data)")
    return DATASETS[name]

# -----------------------------------------------------------------------------
# Loading: the only calls that reach the network


def load_dataset(path: str, config: str | None = None, *, split: str, data_files: dict | None = None, **options):
    """datasets.load_dataset, the one way rows come in (the tests replace it with local files)."""
    import datasets
    return datasets.load_dataset(path, config, split=split, **({"data_files": data_files} if data_files else {}),
                                 **options)


def download(url: str) -> Path:
    """One file by URL, cached by datasets (Spider's tables.json; the tests replace it)."""
    import datasets
    return Path(datasets.DownloadManager().download(url))


def cause(e: Exception) -> str:
    text = " ".join(str(e).split()) or "no message"
    return f"{type(e).__name__}: {text[:300]}{'...' * (len(text) > 300)}"


def load_split(path: str, config: str | None, split: str, what: str, hint: str, data_files: dict | None = None,
               options: dict | None = None):
    """The rows of one split, or one line saying why not."""
    try:
        return load_dataset(path, config, split=split, data_files=data_files, **(options or {}))
    except ImportError as e:
        raise ValueError(f"{what}: reading a Hugging Face dataset needs `pip install datasets` ({cause(e)}); "
                         "or give a local .jsonl, .json or .txt file") from None
    except Exception as e:  # no network, unknown id or config, a file that is not there: one line each
        raise ValueError(f"{what}: could not load it ({cause(e)}); {hint}") from None


def check_split(dataset: Dataset, split: str):
    if split not in dataset.splits:
        raise ValueError(f"{dataset.name}: no split {split!r}; its splits are {', '.join(dataset.splits)}")


def load_rows(name: str, split: str) -> list[dict]:
    """Our rows of one split of a registered dataset (through its adapter)."""
    dataset = entry(name)
    check_split(dataset, split)
    source = dataset.source(split)
    hint = ("it needs network access (GitHub: NL-RX has no Hugging Face hub copy); " if dataset.data_files else
            "it needs network access to the Hugging Face hub; ") + OFFLINE.format(name=name)
    rows = load_split(dataset.path, dataset.config, split, f"{name} ({source})", hint, dataset.data_files,
                      dataset.options)
    adapted = [dataset.adapter(dict(row), f"{name} ({source}) row {i}") for i, row in enumerate(rows)]
    if not adapted:
        raise ValueError(f"{name} ({source}): holds no rows; {CHANGED}")
    return adapted


def spider_tables() -> Path:
    """Spider's tables.json (the database schemas the prompts show), downloaded once."""
    what = f"spider tables.json ({SPIDER_TABLES})"
    try:
        path = download(SPIDER_TABLES)
    except Exception as e:
        raise ValueError(f"{what}: could not download it ({cause(e)}); it needs network access to GitHub; "
                         f"{OFFLINE.format(name='spider')}") from None
    try:
        tables = json.loads(data.read_text(path))
    except ValueError as e:
        raise ValueError(f"{what}: not readable JSON ({cause(e)}); {CHANGED}") from None
    if not (isinstance(tables, list) and tables and all(isinstance(t, dict) and "db_id" in t for t in tables)):
        raise ValueError(f"{what}: not a list of database schemas; {CHANGED}")
    return path

# -----------------------------------------------------------------------------
# Training rows: train.py --data NAME[:split], and --data/--eval-data whatever they name


def spider_schema(tables_path: Path) -> dict[str, str]:
    """db_id -> "table(column, ...); ..." from Spider's tables.json (original names)."""
    schemas = {}
    for i, db in enumerate(data.read_json(tables_path)):
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
    the question. Training rows and tasks/spider.py's evaluation items both come from here."""
    lines = [f"Database: {db_id}"] + ([f"Schema: {schema}"] if schema else []) + [f"Question: {question}"]
    return [{"role": "user", "content": "\n".join(lines)}]


def training_examples(name: str, split: str = "train") -> list[data.Example]:
    """train.py --data NAME: a registered dataset's rows as data.Example, the prompts the
    evaluation uses (Spider: database, schema, question; Django: the description). NAME:split
    picks a split (--eval-data gsm8k:test), else `split`."""
    name, _, picked = name.partition(":")
    dataset = entry(name)
    if picked and picked not in dataset.splits:
        raise ValueError(f"{name}:{picked}: after ':' give a split of {name} ({', '.join(dataset.splits)}); "
                         f"for a Hugging Face id with a config write it in full, e.g. {dataset.path}:{dataset.config}")
    split = picked or split
    if name == "mmlu":
        raise ValueError("mmlu is an evaluation set (forgetting), not training data: run `python -m scripts.prepare --out "
                         "data --datasets mmlu`, then evaluate.py --task mmlu --data data/mmlu/test")
    if name == "wikitext2":
        raise ValueError("wikitext2 is plain text, not prompt/answer rows: run `python -m scripts.prepare --out data "
                         "--datasets wikitext2`, then train.py --data data/wikitext2/valid.txt "
                         "(diffusion pre-training)")
    rows = load_rows(name, split)
    where = [f"{name}[{split}] row {i}" for i in range(len(rows))]
    if name == "spider":  # the prompt tasks/spider.py evaluates with: database, schema, question
        schemas = spider_schema(spider_tables())
        missing = next((i for i, row in enumerate(rows) if row["db_id"] not in schemas), None)
        if missing is not None:
            raise ValueError(f"{where[missing]}: db_id {rows[missing]['db_id']!r} is not in tables.json "
                             f"({SPIDER_TABLES}); {CHANGED}")
        return [data.Example(spider_messages(row["question"], row["db_id"], schemas[row["db_id"]]), row["query"], w)
                for row, w in zip(rows, where)]
    if name == "django":
        return [data.Example([{"role": "user", "content": row["anno"].strip()}], row["code"].strip(), w)
                for row, w in zip(rows, where)]
    return [data.example_from_row(row, w) for row, w in zip(rows, where)]


def load_examples(name: str, split: str, fields: tuple[str, str] | None = None) -> list[data.Example]:
    """train.py --data NAME: a dataset of the paper by its name here (NAME:split picks a split),
    through its adapter; or any Hugging Face dataset, e.g. "openai/gsm8k:main" (id[:config]),
    whose rows have one of data.SHAPES (or the `fields` named). Needs network; a failure is one line."""
    if registered(name):
        return training_examples(name, split)
    dataset_name, _, config = name.partition(":")
    rows = load_split(dataset_name, config or None, split, f"{name} (split {split})",
                      "check the name, config and split, and network access to the Hugging Face hub; "
                      f"or give a local {', '.join(data.FILE_TYPES)} file")
    return [data.example_from_row(dict(row), f"{name}[{split}] row {i}", fields) for i, row in enumerate(rows)]


@dataclass
class Source:
    """One of --data and --eval-data, read and tokenised but not yet cut to a length."""
    name: str                                   # as given, for messages
    encoded: list | None = None                 # (prompt ids, answer ids then EOS) per example
    examples: list[data.Example] | None = None  # their text: the held-out questions answered at the end
    ids: list[int] | None = None                # or a .txt file's tokens: rows of seq_len consecutive ones

    def size(self, seq_len: int) -> int:
        return len(self.encoded) if self.ids is None else len(self.ids) // seq_len

    @property
    def longest(self) -> int:
        return max(len(prompt) + len(answer) for prompt, answer in self.encoded)


@dataclass
class Corpus:
    """train.py's data: --data and --eval-data read and tokenised, not yet cut to a length (what
    train.settle reads to choose --seq-len and the steps of --epochs), then cut there by rows()."""
    train: Source
    eval: Source | None  # None: --eval-fraction of --data's rows is held out
    kind: str            # "builtin", "text" (.txt: pre-training) or "examples" (the user's prompt/answer rows)
    eos: int
    notes: list[str]     # rows skipped as blank or duplicate

    @property
    def longest(self) -> int | None:
        """Tokens the longest example needs whole (prompt, answer, EOS); None for plain text."""
        return None if self.kind == "text" else max(s.longest for s in (self.train, self.eval) if s is not None)

    def split(self, seq_len: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Training and held-out row indices of --data's rows at seq_len; None with --eval-data."""
        if self.eval is not None:
            return None
        if self.train.size(seq_len) < 2:
            raise ValueError(f"--data {self.train.name}: one example cannot be split; add --eval-data")
        return data.split_indices(self.train.size(seq_len), fraction, seed)

    def train_size(self, seq_len: int, fraction: float, seed: int) -> int:
        split = self.split(seq_len, fraction, seed)
        return self.train.size(seq_len) if split is None else len(split[0])

    def rows(self, seq_len: int, fraction: float, seed: int, given: bool = True, positions: int | None = None):
        """(training rows, held-out rows, held-out examples: prompt and answer text, None for plain
        text; notes on what was cut or chosen, cut rows) at seq_len. given: --seq-len was; if not,
        the length was chosen from the data, capped at the model's `positions`."""
        cut, warnings = 0, []
        flag = "--seq-len" if given else f"the model's {positions} positions"

        def tokenized(source):
            nonlocal cut
            if source.ids is not None:
                return data.text_tokenized(data.chunk(source.ids, seq_len, source.name, flag))
            rows = data.pack(source.encoded, self.eos, seq_len)
            if rows.prompts_cut == len(source.encoded):
                raise ValueError(f"{flag} {seq_len}: no prompt of {source.name} fits (rows need up to "
                                 f"{rows.longest} tokens); use --seq-len {rows.longest}")
            if rows.truncated:
                cut += rows.truncated
                warnings.append(f"warning: {source.name}: {rows.truncated} of {len(source.encoded)} examples were "
                                f"longer than {flag} {seq_len} and were cut ({rows.prompts_cut} at the prompt's start; "
                                f"answers kept at least in part); --seq-len {rows.longest} keeps all whole")
            return rows

        train_rows, eval_examples = tokenized(self.train), self.eval and self.eval.examples
        if self.eval is not None:
            eval_rows = tokenized(self.eval)
        else:
            train_idx, eval_idx = self.split(seq_len, fraction, seed)
            train_rows, eval_rows = data.select(train_rows, train_idx), data.select(train_rows, eval_idx)
            eval_examples = self.train.examples and [self.train.examples[i] for i in eval_idx.tolist()]
        if not given and self.kind == "examples" and not cut:
            warnings.append(f"--seq-len {seq_len}: the longest row (prompt, answer, EOS) of the data, so no row is "
                            "cut; give --seq-len to choose another")
        if given and self.kind == "examples" and seq_len > PADDED * self.longest:  # rows are padded to seq_len
            warnings.append(f"warning: --seq-len {seq_len} is {seq_len / self.longest:.0f}x the longest row of the data "
                            f"({self.longest} tokens): every row is padded with EOS to it, so a step costs at least "
                            f"{seq_len / self.longest:.0f}x what it would at --seq-len {self.longest}, which keeps "
                            "every row whole")
        return train_rows, eval_rows, eval_examples, warnings, cut

    def epoch_steps(self, epochs: float, global_batch: int, seq_len: int, fraction: float, seed: int) -> int:
        """Optimizer steps for `epochs` passes over the training rows, global_batch rows a step."""
        return math.ceil(epochs * self.train_size(seq_len, fraction, seed) / global_batch)


def read_corpus(flags, tokenizer) -> Corpus:
    """train.py's --data and --eval-data, each 'builtin', a file (data.FILE_TYPES; .txt: plain
    text) or a dataset by name, read and tokenised at full length (flags: data, eval_data, split,
    builtin_size, seed, prompt_field, answer_field). Blank and duplicate rows are skipped and
    noted; a malformed row stops with its file and row."""
    notes, fields = [], (flags.prompt_field, flags.answer_field) if flags.prompt_field else None

    def read(source: str) -> Source:
        path = Path(source)
        if path.suffix == ".txt":
            return Source(source, ids=tokenizer(data.read_text(path), add_special_tokens=False)["input_ids"])
        if source == "builtin":
            examples = data.builtin_task(flags.builtin_size, flags.seed)
        else:
            examples = (data.read_examples(path, fields) if path.suffix in data.BUILDERS
                        else load_examples(source, flags.split, fields))
            examples, skipped = data.clean_examples(examples, source)
            notes.append(skipped and f"note: {skipped}")
        return Source(source, data.encode_examples(examples, tokenizer), examples)

    train = read(flags.data)
    kind = "text" if train.ids is not None else "builtin" if flags.data == "builtin" else "examples"
    return Corpus(train, flags.eval_data and read(flags.eval_data), kind, tokenizer.eos_token_id,
                  list(filter(None, notes)))
