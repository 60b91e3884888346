"""
Download the paper's datasets once, on a machine with network, into the local folder that
experiments.py (--data-dir), evaluate.py and train.py read offline.

    python -m scripts.prepare --out data                          # all seven datasets
    python -m scripts.prepare --out data --datasets gsm8k spider  # some of them
    python -m scripts.prepare --list                              # where each comes from (hub.py)

What it writes under --out (docs/datasets.md: The local folder):

    gsm8k/train.jsonl, gsm8k/test_dev.jsonl     {"question", "answer"}; test_dev: the first 300 test rows
    nl-rx-synth/synth_train.jsonl               {"messages": [system, user, assistant]}
    nl-rx-turk/turk_train.jsonl                 the same
    spider/train_spider.json, spider/tables.json   a JSON list of {"question", "query", "db_id"}; the schemas
    django/train.anno, train.code, dev.anno, dev.code   one example per line, line-aligned
    mmlu/dev/<subject>_dev.csv, mmlu/test/<subject>_test.csv   header question,choice0..3,answer (0-3)
    wikitext2/valid.txt                         WikiText-2 (raw) validation text

and a PROVENANCE.txt in each folder (source, splits, rows). Each folder is written to
--out/.NAME.tmp and renamed when complete, so it is whole or absent; a folder that already
holds files is refused unless --force (then replaced once the new one is complete). One line
per dataset with its row counts; a failure is one line, the other datasets still run, and the
exit status is 1.
"""

import csv
import json
import shutil
import sys
from pathlib import Path

from dlm import flags  # imports no torch: --help and a mistyped flag answer at once


def parse_args(argv=None):
    p = flags.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data", help="the folder to write (experiments.py --data-dir)")
    p.add_argument("--datasets", nargs="+", default=["all"], metavar="NAME",
                   help=f"'all' or some of: {' '.join(flags.DATASETS)}")
    p.add_argument("--force", action="store_true", help="replace dataset folders that already hold files")
    p.add_argument("--list", action="store_true", help="print each dataset's source and exit")
    args = p.parse_args(argv)
    if unknown := [name for name in args.datasets if name not in ("all", *flags.DATASETS)]:
        p.error(f"--datasets {unknown[0]}: unknown; choose 'all' or some of {', '.join(flags.DATASETS)}")
    return args


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads (seconds)
    parse_args()

from dlm import data, files, hub

GSM8K_DEV_ROWS = 300  # test_dev.jsonl: the first 300 test rows (the dev slice experiments.py scores)


def text_file(path: Path):
    return path.open("w", encoding="utf-8", newline="")  # "\n" line ends on every system


# -----------------------------------------------------------------------------
# One writer per dataset: its folder (empty) -> {file: its rows, or what it holds}


def gsm8k(folder: Path) -> dict:
    train, test = hub.load_rows("gsm8k", "train"), hub.load_rows("gsm8k", "test")
    return {"train.jsonl": data.write_jsonl(folder / "train.jsonl", train),
            "test_dev.jsonl": data.write_jsonl(folder / "test_dev.jsonl", test[:GSM8K_DEV_ROWS])}


def nl_rx(name: str):
    def write(folder: Path) -> dict:
        file = f"{name.split('-')[-1]}_train.jsonl"
        return {file: data.write_jsonl(folder / file, hub.load_rows(name, "train"))}
    return write


def spider(folder: Path) -> dict:
    rows = hub.load_rows("spider", "train")
    tables = hub.spider_tables()
    known = {schema["db_id"] for schema in json.loads(tables.read_text(encoding="utf-8-sig"))}
    missing = sorted({row["db_id"] for row in rows} - known)
    if missing:
        raise ValueError(f"spider: {len(missing)} databases of the train split are not in tables.json "
                         f"({hub.SPIDER_TABLES}): {', '.join(missing[:5])}; {hub.CHANGED}")
    with text_file(folder / "train_spider.json") as f:
        f.write(json.dumps(rows, indent=2) + "\n")
    shutil.copyfile(tables, folder / "tables.json")
    return {"train_spider.json": len(rows), "tables.json": f"{len(known)} schemas"}


def django(folder: Path) -> dict:
    counts = {}
    for split, stem in (("train", "train"), ("validation", "dev")):
        rows = hub.load_rows("django", split)
        for field in ("anno", "code"):
            with text_file(folder / f"{stem}.{field}") as f:
                f.writelines(row[field] + "\n" for row in rows)
            counts[f"{stem}.{field}"] = len(rows)
    return counts


def mmlu(folder: Path) -> dict:
    counts = {}
    for split in ("dev", "test"):
        (folder / split).mkdir()
        by_subject = {}
        for row in hub.load_rows("mmlu", split):
            by_subject.setdefault(row["subject"], []).append(row)
        for subject, rows in sorted(by_subject.items()):
            with text_file(folder / split / f"{subject}_{split}.csv") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                writer.writerows([row["question"], *row["choices"], row["answer"]] for row in rows)
        counts[f"{split}/"] = f"{sum(map(len, by_subject.values()))} rows in {len(by_subject)} subject files"
    return counts


def wikitext2(folder: Path) -> dict:
    rows = hub.load_rows("wikitext2", "validation")
    with text_file(folder / "valid.txt") as f:
        f.writelines(row["text"] for row in rows)
    return {"valid.txt": f"{len(rows)} lines"}


WRITERS = {"gsm8k": gsm8k, "nl-rx-synth": nl_rx("nl-rx-synth"), "nl-rx-turk": nl_rx("nl-rx-turk"),
           "spider": spider, "django": django, "mmlu": mmlu, "wikitext2": wikitext2}
SPLITS = {"gsm8k": "train, test (first 300)", "nl-rx-synth": "train", "nl-rx-turk": "train",
          "spider": "train", "django": "train, validation (as dev)", "mmlu": "dev, test",
          "wikitext2": "validation"}
assert set(WRITERS) == set(hub.DATASETS) == set(SPLITS)

# -----------------------------------------------------------------------------


def size(n) -> str:
    return f"{n} rows" if isinstance(n, int) else n


def origin(dataset: hub.Dataset) -> str:
    """Where the files come from (NL-RX: the train file; the test file is not written)."""
    return dataset.source("train") if dataset.data_files else dataset.source()


def remove(path: Path):
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def prepare(name: str, out: Path) -> dict:
    """Write one dataset's folder: into out/.NAME.tmp, renamed to out/NAME when complete."""
    folder, tmp, old = out / name, out / f".{name}.tmp", out / f".{name}.old"
    if old.exists() and not folder.exists():  # a run stopped between the two renames below
        old.rename(folder)
    for leftover in (tmp, old):
        if leftover.exists() or leftover.is_symlink():
            remove(leftover)
    tmp.mkdir(parents=True)
    try:
        counts = WRITERS[name](tmp)
        dataset = hub.DATASETS[name]
        with text_file(tmp / "PROVENANCE.txt") as f:
            f.write(f"{dataset.paper}\nsource: {origin(dataset)}\nsplits: {SPLITS[name]}\n"
                    + "".join(f"{file}: {size(n)}\n" for file, n in counts.items())
                    + (f"note: {dataset.note}\n" if dataset.note else "") + "written by prepare.py (hub.py)\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists() or folder.is_symlink():  # --force, or an empty folder
        folder.rename(old)
    tmp.rename(folder)
    if old.exists() or old.is_symlink():
        remove(old)
    return counts


def main(argv=None) -> int:
    """Returns the exit status: 0, or 1 when a dataset failed or was refused (one line each)."""
    args = parse_args(argv)
    if args.list:
        for d in hub.DATASETS.values():
            print(f"{d.name:12} {d.source()}; splits {', '.join(d.splits)}" + (f"; {d.note}" if d.note else ""))
        return 0
    names = list(hub.DATASETS) if "all" in args.datasets else list(dict.fromkeys(args.datasets))
    out = Path(args.out)
    try:
        files.check_writable(args.out, "--out")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    busy = [n for n in names if (out / n).exists() and (not (out / n).is_dir() or any((out / n).iterdir()))]
    if busy and not args.force:
        print(f"error: --out {out}: {', '.join(f'{n}/' for n in busy)} already hold{'s' * (len(busy) == 1)} files; "
              "give --force to replace them, or another --out", file=sys.stderr)
        return 1
    failed = 0
    for name in names:
        try:
            counts = prepare(name, out)
        except (ValueError, OSError) as e:
            failed += 1
            print(f"error: {e if isinstance(e, ValueError) else f'{name}: writing {out}: {hub.cause(e)}'}",
                  file=sys.stderr, flush=True)
            continue
        print(f"{name}: {out / name}/ " + ", ".join(f"{file} {size(n)}" for file, n in counts.items())
              + f" ({origin(hub.DATASETS[name])})", flush=True)
    if failed and len(names) > 1:
        print(f"{failed} of {len(names)} datasets failed (above)"
              + ("; the others are complete" if failed < len(names) else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
