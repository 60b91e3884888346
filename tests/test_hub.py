"""
hub.py (the paper's datasets by name), prepare.py (the local layout) and train.py --data NAME,
offline: each source is a small local file in the hub dataset's own row shape (parquet, CSV,
JSON lines), read through the real datasets.load_dataset and the real adapters; only the
registry id -> file step is replaced (hub.load_dataset, hub.download).

    python -m pytest -q tests/test_hub.py
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

import train
from dlm import data, hub
from scripts import prepare

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = {"role": "system", "content": "Convert natural language to regular expression."}


def chat(user, regex):
    return {"messages": [SYSTEM, {"role": "user", "content": user}, {"role": "assistant", "content": regex}]}

# -----------------------------------------------------------------------------
# The sources, in each hub dataset's row shape: two hand-written rows first, then filler


GSM8K = {
    "train": [{"question": "Ann has 2 apples and buys 3 more. How many apples does she have?",
               "answer": "She has 2 + 3 = <<2+3=5>>5 apples.\n#### 5"},
              {"question": "A café sells 4 cakes at €3 each. How much money?",
               "answer": "4 * 3 = <<4*3=12>>12 euros.\n#### 12"}]
    + [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(10)],
    "test": [{"question": "Tom reads 5 pages a day for 3 days. How many pages?", "answer": "5 * 3 = 15\n#### 15"}]
    + [{"question": f"What is {i} times 2?", "answer": f"#### {2 * i}"} for i in range(9)],
}
NL_RX = {
    "synth_train": [chat("lines with a vowel", ".*[AEIOUaeiou].*"),
                    chat("lines containing the string 'dog'", ".*dog.*")]
    + [chat(f"lines with {i} or more numbers", f".*([0-9]){{{i},}}.*") for i in range(1, 11)],
    "synth_test": [chat("lines with a letter", ".*[A-Za-z].*"), chat("lines ending in 'truck'", ".*truck")],
    "turk_train": [chat("find lines that have a vowel", ".*[AEIOUaeiou].*"),
                   chat("lines where 'dog' appears", ".*dog.*")]
    + [chat(f"lines using at least {i} digits", f".*([0-9]){{{i},}}.*") for i in range(1, 11)],
    "turk_test": [chat("any letter", ".*[A-Za-z].*")],
}


def spider_source(db_id, question, query):
    return {"db_id": db_id, "query": query, "question": question, "query_toks": query.split(),
            "query_toks_no_value": query.lower().split(), "question_toks": question.split()}


SPIDER = {
    "train": [spider_source("concert_singer", "How many singers do we have?", "SELECT count(*) FROM singer"),
              spider_source("pets_1", "Find the weight of the youngest dog.",
                            "SELECT weight FROM pets ORDER BY pet_age LIMIT 1")]
    + [spider_source("concert_singer", f"Singers older than {i}?", f"SELECT name FROM singer WHERE age > {i}")
       for i in range(10)],
    "validation": [spider_source("pets_1", "How many pets?", "SELECT count(*) FROM pets")],
}
TABLES = [
    {"db_id": "concert_singer", "table_names_original": ["singer", "concert"], "table_names": ["singer", "concert"],
     "column_names_original": [[-1, "*"], [0, "Singer_ID"], [0, "Name"], [0, "Age"], [1, "concert_ID"]],
     "column_names": [[-1, "*"], [0, "singer id"], [0, "name"], [0, "age"], [1, "concert id"]],
     "column_types": ["text", "number", "text", "number", "number"], "primary_keys": [1, 4], "foreign_keys": []},
    {"db_id": "pets_1", "table_names_original": ["Pets"], "table_names": ["pets"],
     "column_names_original": [[-1, "*"], [0, "PetID"], [0, "pet_age"], [0, "weight"]],
     "column_names": [[-1, "*"], [0, "pet id"], [0, "pet age"], [0, "weight"]],
     "column_types": ["text", "number", "number", "number"], "primary_keys": [1], "foreign_keys": []},
]
DJANGO = {  # the hub copy is CSV with columns nl, code; lines keep the original's leading whitespace
    "train": [(" from threading import local into default name space.", " from threading import local"),
              ('call the function f with arguments a, b and "c".', 'f(a, b, "c")')]
    + [(f"substitute {i} for x.", f"x = {i}") for i in range(9)] + [("NA", "None")],  # text, not missing values
    "validation": [("return result.", "return result"), ("import module os.", "import os")],
    "test": [("pass.", "pass")],
}
MMLU = {  # cais/mmlu "all": question, subject, choices (4), answer a ClassLabel A-D
    "dev": [{"question": "Find x, if x+1=2.", "subject": "abstract_algebra", "choices": ["0", "1", "2", "3"],
             "answer": 1},
            {"question": 'Which bone is "hyoid"?\n(one answer)', "subject": "anatomy",
             "choices": ["first arch", "second, third arches", "none", "all"], "answer": 3}],
    "test": [{"question": f"Is {i} even?", "subject": ["abstract_algebra", "anatomy"][i % 2],
              "choices": ["yes", "no", "maybe", "unknown"], "answer": i % 2} for i in range(10)],
    "validation": [{"question": "1+1?", "subject": "anatomy", "choices": ["1", "2", "3", "4"], "answer": 1}],
}
WIKITEXT = {  # the hub's rows: a blank line is "", every other row ends with its newline
    "validation": ["", " = Valkyria Chronicles = \n", "",
                   " The game , released in 2011 , sold <unk> copies . \n"]
    + [f" Sentence number {i} of the article tells the story of a lobster named Homarus {i} . \n"
       for i in range(200)],
    "train": [" = Train = \n"], "test": [" = Test = \n"],
}


def write_parquet(path, rows, features=None):
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def write_sources(folder: Path) -> dict:
    """Every source as local files; the map from what hub.py asks for to the file."""
    folder.mkdir()
    files = {}
    for split, rows in GSM8K.items():
        write_parquet(folder / f"gsm8k-{split}.parquet", rows)
        files["openai/gsm8k", "main", split] = folder / f"gsm8k-{split}.parquet"
    for stem, rows in NL_RX.items():
        (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[hub.LLM_JEPA + f"{stem}.jsonl"] = folder / f"{stem}.jsonl"
    for split, rows in SPIDER.items():
        write_parquet(folder / f"spider-{split}.parquet", rows)
        files["xlangai/spider", "spider", split] = folder / f"spider-{split}.parquet"
    (folder / "tables.json").write_text(json.dumps(TABLES, indent=3))
    files[hub.SPIDER_TABLES] = folder / "tables.json"
    for split, pairs in DJANGO.items():
        with (folder / f"django-{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("nl", "code"), *pairs])
        files["AhmedSSoliman/DJANGO", None, split] = folder / f"django-{split}.csv"
    features = datasets.Features({"question": datasets.Value("string"), "subject": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.ClassLabel(names=["A", "B", "C", "D"])})
    for split, rows in MMLU.items():
        write_parquet(folder / f"mmlu-{split}.parquet", rows, features)
        files["cais/mmlu", "all", split] = folder / f"mmlu-{split}.parquet"
    for split, lines in WIKITEXT.items():
        write_parquet(folder / f"wikitext-{split}.parquet", [{"text": t} for t in lines])
        files["Salesforce/wikitext", "wikitext-2-raw-v1", split] = folder / f"wikitext-{split}.parquet"
    return files


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "sources"
    return folder, write_sources(folder), snapshot(folder)


@pytest.fixture
def fake_hub(sources, tmp_path, monkeypatch):
    """hub.load_dataset resolves the registry's ids (or NL-RX's URLs) to the local files, through
    the real datasets.load_dataset; `calls` records what hub.py asked for."""
    folder, files, before = sources
    calls = []

    def load_dataset(path, config=None, *, split, data_files=None, **options):
        key = data_files[split] if data_files else (path, config, split)
        calls.append(key)
        local = files[key]
        builder = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json"}[local.suffix]
        return datasets.load_dataset(builder, data_files={split: str(local)}, split=split,
                                     cache_dir=str(tmp_path / "cache"), **options)

    monkeypatch.setattr(hub, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "download", lambda url: files[url])
    datasets.disable_progress_bars()  # stderr holds our lines only
    yield calls
    datasets.enable_progress_bars()
    assert snapshot(folder) == before, "something was written into the sources"

# -----------------------------------------------------------------------------
# Adapters


def test_every_adapter_against_hand_written_rows(fake_hub):
    rows = {name: hub.load_rows(name, "train") for name in ("gsm8k", "nl-rx-synth", "nl-rx-turk", "spider", "django")}
    assert rows["gsm8k"][:2] == [
        {"question": "Ann has 2 apples and buys 3 more. How many apples does she have?",
         "answer": "She has 2 + 3 = <<2+3=5>>5 apples.\n#### 5"},
        {"question": "A café sells 4 cakes at €3 each. How much money?",
         "answer": "4 * 3 = <<4*3=12>>12 euros.\n#### 12"}]
    assert rows["nl-rx-synth"][1] == {"messages": [
        {"role": "system", "content": "Convert natural language to regular expression."},
        {"role": "user", "content": "lines containing the string 'dog'"},
        {"role": "assistant", "content": ".*dog.*"}]}
    assert rows["nl-rx-turk"][0]["messages"][1:] == [{"role": "user", "content": "find lines that have a vowel"},
                                                     {"role": "assistant", "content": ".*[AEIOUaeiou].*"}]
    assert rows["spider"][:2] == [  # the token lists are dropped
        {"question": "How many singers do we have?", "query": "SELECT count(*) FROM singer", "db_id": "concert_singer"},
        {"question": "Find the weight of the youngest dog.",
         "query": "SELECT weight FROM pets ORDER BY pet_age LIMIT 1", "db_id": "pets_1"}]
    assert rows["django"][:2] == [
        {"anno": " from threading import local into default name space.", "code": " from threading import local"},
        {"anno": 'call the function f with arguments a, b and "c".', "code": 'f(a, b, "c")'}]
    assert rows["django"][-1] == {"anno": "NA", "code": "None"}
    assert hub.load_rows("mmlu", "dev") == [
        {"subject": "abstract_algebra", "question": "Find x, if x+1=2.", "choices": ["0", "1", "2", "3"], "answer": 1},
        {"subject": "anatomy", "question": 'Which bone is "hyoid"?\n(one answer)',
         "choices": ["first arch", "second, third arches", "none", "all"], "answer": 3}]
    assert hub.load_rows("wikitext2", "validation")[:4] == [
        {"text": "\n"}, {"text": " = Valkyria Chronicles = \n"}, {"text": "\n"},
        {"text": " The game , released in 2011 , sold <unk> copies . \n"}]
    assert [len(r) for r in rows.values()] == [12, 12, 12, 12, 12]
    assert ("openai/gsm8k", "main", "train") in fake_hub and hub.LLM_JEPA + "synth_train.jsonl" in fake_hub


def test_training_examples_match_what_the_evaluation_reads(fake_hub, tmp_path):
    """train.py --data NAME trains on the prompts the task loaders build from prepare.py's files."""
    assert prepare.main(["--out", str(tmp_path / "data"), "--datasets", "spider", "django", "gsm8k"]) == 0
    from tasks import load_items
    from tasks.spider import load_spider
    spider = hub.load_examples("spider", "train")
    items = load_spider(tmp_path / "data/spider/train_spider.json", tmp_path / "data/spider/tables.json")
    assert [(e.prompt, e.answer) for e in spider] == [(i.prompt, i.reference) for i in items]
    assert spider[0].prompt == [{"role": "user", "content": "Database: concert_singer\n"
                                 "Schema: singer(Singer_ID, Name, Age); concert(concert_ID)\n"
                                 "Question: How many singers do we have?"}]
    django = hub.load_examples("django:validation", "train")  # NAME:split wins over --split
    items = load_items("django", tmp_path / "data/django/dev.anno")
    assert [(e.prompt, e.answer) for e in django] == [(i.prompt, i.reference) for i in items]
    assert django[0].prompt == [{"role": "user", "content": "return result."}] and django[0].answer == "return result"
    gsm8k = hub.load_examples("gsm8k", "test")
    assert [(e.prompt, e.answer) for e in gsm8k] == [(e.prompt, e.answer) for e in data.read_examples(
        tmp_path / "data/gsm8k/test_dev.jsonl")]
    assert gsm8k[0].where == "gsm8k[test] row 0"

# -----------------------------------------------------------------------------
# prepare.py: the layout, read back by experiments.py's readers


def test_prepare_writes_the_layout_experiments_reads(fake_hub, tmp_path, capsys):
    out = tmp_path / "data"
    assert prepare.main(["--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    assert lines[0].startswith(f"gsm8k: {out / 'gsm8k'}/ train.jsonl 12 rows, test_dev.jsonl 10 rows")
    assert lines[1] == (f"nl-rx-synth: {out / 'nl-rx-synth'}/ synth_train.jsonl 12 rows ({hub.LLM_JEPA}"
                        "synth_train.jsonl, split train)")
    assert lines[3] == (f"spider: {out / 'spider'}/ train_spider.json 12 rows, tables.json 2 schemas "
                        "(xlangai/spider config spider)")
    assert lines[5] == (f"mmlu: {out / 'mmlu'}/ dev/ 2 rows in 2 subject files, test/ 10 rows in 2 subject files "
                        "(cais/mmlu config all)")
    assert lines[6] == (f"wikitext2: {out / 'wikitext2'}/ valid.txt 204 lines "
                        "(Salesforce/wikitext config wikitext-2-raw-v1)")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [f"{name}/PROVENANCE.txt" for name in hub.DATASETS] + [
            "gsm8k/train.jsonl", "gsm8k/test_dev.jsonl", "nl-rx-synth/synth_train.jsonl", "nl-rx-turk/turk_train.jsonl",
            "spider/train_spider.json", "spider/tables.json", "django/train.anno", "django/train.code",
            "django/dev.anno", "django/dev.code", "mmlu/dev/abstract_algebra_dev.csv", "mmlu/dev/anatomy_dev.csv",
            "mmlu/test/abstract_algebra_test.csv", "mmlu/test/anatomy_test.csv", "wikitext2/valid.txt"])
    # each file's content, against the sources
    read_jsonl = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    assert read_jsonl(out / "gsm8k/train.jsonl") == GSM8K["train"]
    assert read_jsonl(out / "gsm8k/test_dev.jsonl") == GSM8K["test"]
    assert (out / "gsm8k/train.jsonl").read_text().splitlines()[1] == (
        '{"question": "A caf\\u00e9 sells 4 cakes at \\u20ac3 each. How much money?", '
        '"answer": "4 * 3 = <<4*3=12>>12 euros.\\n#### 12"}')  # json.dumps, as the original file
    for stem in ("synth_train", "turk_train"):  # LLM-JEPA's files, byte for byte
        folder = "nl-rx-" + stem.split("_")[0]
        assert (out / folder / f"{stem}.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in NL_RX[stem])
    assert json.loads((out / "spider/train_spider.json").read_text()) == [
        {k: r[k] for k in ("question", "query", "db_id")} for r in SPIDER["train"]]
    assert json.loads((out / "spider/tables.json").read_text()) == TABLES
    assert (out / "django/train.anno").read_text().splitlines()[:2] == [
        " from threading import local into default name space.", 'call the function f with arguments a, b and "c".']
    assert (out / "django/dev.code").read_text() == "return result\nimport os\n"
    assert (out / "mmlu/dev/anatomy_dev.csv").read_text() == (
        "question,choice0,choice1,choice2,choice3,answer\n"
        '"Which bone is ""hyoid""?\n(one answer)",first arch,"second, third arches",none,all,3\n')
    assert (out / "mmlu/dev/abstract_algebra_dev.csv").read_text() == (
        'question,choice0,choice1,choice2,choice3,answer\n"Find x, if x+1=2.",0,1,2,3,1\n')
    assert (out / "wikitext2/valid.txt").read_text() == "\n = Valkyria Chronicles = \n\n" + "".join(
        WIKITEXT["validation"][3:])
    assert "openai/gsm8k config main" in (out / "gsm8k/PROVENANCE.txt").read_text()
    # experiments.py --data-dir out: every file read and checked, as before any training
    from scripts import experiments
    profile = dataclasses.replace(experiments.PROFILES["smoke"], task_seq_len=512, n_test=0)  # room for Spider's schemas; 12 rows leave no test split
    inputs = experiments.read_inputs(out, list(experiments.TASKS), profile)
    assert {task: (len(train_items), len(dev)) for task, (train_items, dev, _) in inputs.splits.items()} == {
        "nl-rx-synth": (4, 8), "nl-rx-turk": (4, 8), "gsm8k": (12, 8), "spider": (4, 8), "django": (12, 2)}
    assert len(inputs.mmlu) == 8 and len(inputs.mmlu_dev) == 2 and inputs.mmlu_dev[1].answer == 3
    assert inputs.heldout_text.endswith("named Homarus 199 . \n") and set(inputs.gen_lengths) == set(experiments.TASKS)
    assert not list(out.glob(".*")), "a .tmp or .old folder was left"


def test_prepare_refuses_a_folder_with_files_unless_force(fake_hub, tmp_path, capsys):
    out = tmp_path / "data"
    (out / "gsm8k").mkdir(parents=True)
    (out / "gsm8k" / "mine.txt").write_text("keep me")
    (out / "django").mkdir()  # empty: fine
    assert prepare.main(["--out", str(out), "--datasets", "gsm8k", "django"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {out}: gsm8k/ already holds files; give --force to replace them, or another --out"
    assert (out / "gsm8k" / "mine.txt").read_text() == "keep me" and not fake_hub  # nothing downloaded
    assert prepare.main(["--out", str(out), "--datasets", "gsm8k", "django", "--force"]) == 0
    assert sorted(p.name for p in (out / "gsm8k").iterdir()) == ["PROVENANCE.txt", "test_dev.jsonl", "train.jsonl"]
    assert (out / "django" / "train.anno").is_file() and not list(out.glob(".*"))


def test_a_failed_dataset_leaves_no_folder_and_the_others_complete(fake_hub, tmp_path, capsys, monkeypatch):
    out = tmp_path / "data"
    (out / ".spider.tmp").mkdir(parents=True)  # a stopped run's leftover
    broken = dict(SPIDER["train"][0])
    del broken["query"]
    real = hub.load_dataset
    monkeypatch.setattr(hub, "load_dataset", lambda path, config=None, *, split, data_files=None, **options: (
        [broken] if path == "xlangai/spider" else real(path, config, split=split, data_files=data_files, **options)))
    assert prepare.main(["--out", str(out), "--datasets", "spider", "nl-rx-turk"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "error: spider (xlangai/spider config spider, split train) row 0: missing field 'query' (the row has db_id, "
        "query_toks, query_toks_no_value, question, question_toks); the source's rows are not in the shape hub.py "
        "expects: check the source, or write the files by hand",
        "1 of 2 datasets failed (above); the others are complete"]
    assert captured.out.startswith("nl-rx-turk: ")
    assert sorted(p.name for p in out.iterdir()) == ["nl-rx-turk"]

# -----------------------------------------------------------------------------
# One line for every failure


def test_failures_are_one_line(fake_hub, monkeypatch):
    with pytest.raises(ValueError) as e:
        hub.load_rows("gsm9k", "train")
    assert str(e.value) == ("unknown dataset 'gsm9k': the registered names are gsm8k, nl-rx-synth, nl-rx-turk, spider, "
                            "django, mmlu, wikitext2 (or give a local file, or a Hugging Face id[:config] to "
                            "train.py --data)")
    with pytest.raises(ValueError, match=r"^gsm8k: no split 'validation'; its splits are train, test$"):
        hub.load_rows("gsm8k", "validation")
    with pytest.raises(ValueError, match=r"^gsm8k:main: after ':' give a split of gsm8k \(train, test\); for a "
                                         r"Hugging Face id with a config write it in full, e.g. openai/gsm8k:main$"):
        hub.load_examples("gsm8k:main", "train")
    with pytest.raises(ValueError, match=r"^mmlu is an evaluation set .* --datasets mmlu`"):
        hub.load_examples("mmlu", "test")
    bad_rows = {
        "gsm8k": ({"question": "q", "answer": 5}, "field 'answer' is int, expected str"),
        "nl-rx-synth": ({"messages": [{"role": "user", "content": "q"}]}, "'messages' must be a list of >= 2"),
        "django": ({"nl": "two\nlines", "code": "x"}, "field 'nl' holds a line break"),
        "mmlu": ({"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 0}, "'choices' must be 4 strings"),
        "wikitext2": ({"page": "x"}, "missing field 'text' (the row has page)"),
    }
    for name, (row, message) in bad_rows.items():
        monkeypatch.setattr(hub, "load_dataset", lambda *a, row=row, **k: [row, row])
        split = hub.DATASETS[name].splits[0]
        with pytest.raises(ValueError) as e:
            hub.load_rows(name, split)
        assert "\n" not in str(e.value) and message in str(e.value), str(e.value)
        assert str(e.value).startswith(f"{name} ({hub.DATASETS[name].source(split)}) row 0: ")

    def offline(path, config=None, *, split, data_files=None, **options):  # datasets' error without network
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(hub, "load_dataset", offline)
    with pytest.raises(ValueError) as e:
        hub.load_examples("gsm8k", "train")
    assert str(e.value) == (
        "gsm8k (openai/gsm8k config main, split train): could not load it (ConnectionError: Couldn't reach "
        "'openai/gsm8k' on the Hub (LocalEntryNotFoundError)); it needs network access to the Hugging Face hub; run "
        "`python -m scripts.prepare --out data --datasets gsm8k` on a machine that has it and copy data/ here, then give its "
        "files (docs/datasets.md: The local folder)")
    with pytest.raises(ValueError, match=r"^someone/thing:cfg \(split train\): could not load it \(ConnectionError: "
                                         r".*\); check the name, config and split"):
        hub.load_examples("someone/thing:cfg", "train")


def test_prepare_refuses_an_unknown_name_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # a usage error, before anything loads
        prepare.main(["--out", str(tmp_path / "data"), "--datasets", "gsm8k", "gsm9k"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --datasets gsm9k: unknown; choose 'all' or some of gsm8k, nl-rx-synth, "
                                       "nl-rx-turk, spider, django, mmlu, wikitext2 (see --help)\n")
    assert not (tmp_path / "data").exists()


def test_no_network_is_one_line_per_dataset(tmp_path):
    """The real datasets.load_dataset with no network (offline mode): prepare.py says what to do."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "scripts.prepare", "--out", str(tmp_path / "data"), "--datasets",
                             "gsm8k", "nl-rx-synth"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith("error: gsm8k (openai/gsm8k config main, split train): could not load it (")
    assert errors[1].startswith(f"error: nl-rx-synth ({hub.LLM_JEPA}synth_train.jsonl, split train): could not load it")
    assert "NL-RX has no Hugging Face hub copy" in errors[1]
    assert all("run `python -m scripts.prepare --out data --datasets" in line for line in errors)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())

# -----------------------------------------------------------------------------
# train.py --data NAME


def test_train_on_a_registered_name(fake_hub, tmp_path):
    out = tmp_path / "run"
    final = train.main(["--tiny-width", "32", "--tiny-layers", "2", "--batch-size", "4", "--seq-len", "160",
                        "--no-progress", "--out", str(out), "--data", "nl-rx-synth", "--eval-data",
                        "nl-rx-synth:test", "--steps", "2", "--eval-every", "100", "--save-every", "100"])
    assert (final / "model.safetensors").is_file()
    held_out = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert len(held_out) == 2 and "lines with a letter" in json.dumps(held_out[0])
    assert json.loads((out / "config.json").read_text())["args"]["data"] == "nl-rx-synth"
    assert hub.LLM_JEPA + "synth_test.jsonl" in fake_hub


def test_train_refuses_a_registered_evaluation_set_in_one_line(fake_hub, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--tiny-width", "32", "--tiny-layers", "2", "--no-progress", "--out", str(tmp_path / "run"),
                    "--data", "wikitext2", "--steps", "1"])
    assert str(e.value) == ("error: wikitext2 is plain text, not prompt/answer rows: run `python -m scripts.prepare --out "
                            "data --datasets wikitext2`, then train.py --data data/wikitext2/valid.txt (diffusion "
                            "pre-training)")

# -----------------------------------------------------------------------------
# evaluate.py --data NAME


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch
    import tiny_model
    torch.manual_seed(0)
    tokenizer = tiny_model.make_tokenizer()
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_model.make_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=2, intermediate_size=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_evaluate_reads_datasets_by_name(fake_hub, tiny_model_dir, capsys):
    from scripts import evaluate
    common = ["--model", tiny_model_dir, "--no-progress"]
    gsm8k = evaluate.main(common + ["--task", "gsm8k", "--data", "gsm8k", "--limit", "3", "--gen-length", "8",
                                    "--block-length", "8", "--shots", "1", "--fewshot-data", "gsm8k:train"])
    assert gsm8k["n"] == 3 and [a["reference"] for a in gsm8k["answers"]] == [r["answer"] for r in GSM8K["test"][:3]]
    assert ("openai/gsm8k", "main", "test") in fake_hub and ("openai/gsm8k", "main", "train") in fake_hub
    mmlu = evaluate.main(common + ["--task", "mmlu", "--data", "mmlu", "--limit", "4"])
    assert mmlu["n"] == 4 and ("cais/mmlu", "all", "test") in fake_hub
    probe = evaluate.main(common + ["--task", "probe", "--data", "wikitext2:validation", "--probe-seq-len", "32",
                                    "--probe-windows", "2", "--probe-grid", "2"])
    assert probe["probe_loss"] > 0 and ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation") in fake_hub
    with pytest.raises(SystemExit) as e:
        evaluate.main(common + ["--task", "mmlu", "--data", "gsm8k"])
    assert str(e.value) == "error: --data gsm8k: --task mmlu reads mmlu, not gsm8k"


def test_experiments_prepare_fetches_only_what_the_data_dir_lacks(fake_hub, tmp_path):
    from scripts import experiments
    data_dir = tmp_path / "data"
    (data_dir / "mmlu").mkdir(parents=True)  # present (even empty): never fetched again
    experiments.fetch_missing(data_dir, ["wikitext2", "mmlu", "nl-rx-synth"])
    assert (data_dir / "wikitext2" / "valid.txt").is_file() and (data_dir / "nl-rx-synth" / "synth_train.jsonl").is_file()
    assert not any(key[0] == "cais/mmlu" for key in fake_hub if isinstance(key, tuple))
