"""
Bring your own data: the formats read. Every file is built here, in a tmp folder.

    python -m pytest tests/test_user_data.py -q
"""

import json

import pandas as pd
import pytest

from dlm import data

# -----------------------------------------------------------------------------
# Formats: the same two examples in every shape and file type read


def ask(prompt):
    return [{"role": "user", "content": prompt}]


EXPECTED = [(ask("Reverse.\n\nabc"), "cba"), (ask("Say 007."), "007")]  # Alpaca: instruction, blank line, input
ALPACA = [{"instruction": "Reverse.", "input": "abc", "output": "cba"},
          {"instruction": "Say 007.", "input": "", "output": "007"}]


def write_rows(path, rows):
    """rows (a list of dicts) in the file type of path's suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("shape", ["alpaca", "prompt-completion", "question-answer", "messages", "fields"])
def test_every_shape_reads_in_every_file_type(tmp_path, suffix, shape):
    if shape == "messages" and suffix == ".csv":
        pytest.skip("a CSV cell holds text, not a list of messages")
    rows = {"alpaca": ALPACA,
            "prompt-completion": [{"prompt": p[0]["content"], "completion": a} for p, a in EXPECTED],
            "question-answer": [{"question": p[0]["content"], "answer": a} for p, a in EXPECTED],
            "messages": [{"messages": p + [{"role": "assistant", "content": a}]} for p, a in EXPECTED],
            "fields": [{"src": p[0]["content"], "tgt": a, "id": i} for i, (p, a) in enumerate(EXPECTED)]}[shape]
    fields = ("src", "tgt") if shape == "fields" else None
    examples = data.read_examples(write_rows(tmp_path / f"d{suffix}", rows), fields)
    assert [(e.prompt, e.answer) for e in examples] == EXPECTED  # a CSV's "007" stays text


def test_a_row_that_fits_no_shape_is_one_line_naming_file_row_and_fields(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", ALPACA + [{"query": "q", "reply": "r"}])
    with pytest.raises(ValueError, match=r"d.jsonl:3: no usable fields \(found \['query', 'reply'\]\); give .*"
                                         r"--prompt-field and --answer-field"):
        data.read_examples(path)
    table = write_rows(tmp_path / "d.parquet", [{"query": "q", "reply": "r"}])
    with pytest.raises(ValueError, match=r"d.parquet row 1: no usable fields \(found \['query', 'reply'\]\)"):
        data.read_examples(table)
    with pytest.raises(ValueError, match=r"d.parquet row 1: .*--prompt-field 'query' and --answer-field 'answer'"):
        data.read_examples(table, ("query", "answer"))
