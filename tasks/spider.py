"""
Spider (Yu et al., 2018): questions about a database, answered in SQL. The prompt holds the
database's name, its schema (from tables.json) and the question (dlm/hub.py builds it, for
training and evaluation alike); the metrics are exact match of normalised SQL, and execution accuracy with sqlite3 when the databases are given.
"""

import re
import sqlite3
import time
from collections import Counter
from pathlib import Path

from dlm.data import read_json
from dlm.hub import spider_messages, spider_schema
from tasks.common import Item, non_empty


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


def spider_database(folder: Path, db_id: str | None) -> Path:
    """Spider's layout: FOLDER/<db_id>/<db_id>.sqlite."""
    if db_id is None:
        raise ValueError("execution accuracy needs each example's db_id: give Spider's own .json file")
    path = folder / db_id / f"{db_id}.sqlite"
    if not path.is_file():
        raise ValueError(f"--spider-db {folder}: no database {path}")
    return path
