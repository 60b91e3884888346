"""Metrics on hand-made cases, loaders and their errors, the probe, MMLU, drift, the CLI."""

import dataclasses
import json
import math
import shutil
import sqlite3
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn

from dlm import backbones, data
from dlm.sampler import SamplerConfig
from scripts import evaluate as E
from tasks import load_items, score_answers
from tasks.common import Item, exact_match, fit_prompt, with_shots
from tasks.drift import drift_report, linear_cka, plot_drift, weight_drift
from tasks.generation import evaluate_generation
from tasks.gsm8k import gsm8k_correct, gsm8k_final, normalize_number
from tasks.mmlu import Question, letter_tokens, load_mmlu, mmlu_accuracy, mmlu_prompt
from tasks.nl_rx import regex_equivalent
from tasks.probe import ProbeConfig, diffusion_probe, probe_masks, read_text_file
from tasks.spider import execution_match, load_spider, normalize_sql, spider_database

TINY = backbones.FAMILIES["tiny-dlm"]


def backbone_of(model, tokenizer, family=TINY):
    return backbones.Backbone(model, tokenizer, family, tokenizer.mask_token_id, tokenizer.eos_token_id)

# -----------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize("text,number", [
    ("1,000", "1000"), ("$18", "18"), ("18.00", "18"), ("7.50", "7.5"), ("$1,234.50 dollars", "1234.5"),
    ("70%", "70"), ("-3 degrees", "-3"), ("0.0", "0"), ("100", "100"), ("5.", "5"), ("no number", None),
])
def test_normalize_number(text, number):
    assert normalize_number(text) == number


@pytest.mark.parametrize("prediction,correct", [
    ("She sells 9 eggs.\n#### 18", True),
    ("#### $18.00", True),
    ("#### 18 dollars", True),
    ("So 9 * 2 = 18 dollars.\n#### 1,8", True),       # commas vanish: "1,8" reads 18
    ("#### 19", False),
    ("The answer is 18", False),                       # strict: no #### marker
    ("", False),
])
def test_gsm8k_strict(prediction, correct):
    assert gsm8k_correct(prediction, "Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18") is correct


def test_gsm8k_flexible_and_large_numbers():
    assert gsm8k_correct("The answer is 18", "#### 18", flexible=True)
    assert not gsm8k_correct("The answer is 17 or so", "#### 18", flexible=True)
    assert gsm8k_correct("#### 1,000,000", "x\n#### 1000000")
    assert gsm8k_final("a #### 3\n#### 5\nextra") == "5"


def test_gsm8k_reference_without_marker_must_be_a_bare_number():
    assert gsm8k_correct("#### 16", " 16\n") and gsm8k_correct("#### 1000", "1,000")
    with pytest.raises(ValueError, match="no '#### answer' and is not a bare number"):
        gsm8k_correct("#### 16", "Janet has 16 ducks and earns 18 dollars")  # was: gold 16
    with pytest.raises(ValueError, match=r"final answer 'many' \(after ####\) is not a number"):
        gsm8k_correct("#### 16", "She has 16.\n#### many")

# -----------------------------------------------------------------------------
# Exact match, SQL, regexes


def test_exact_match_strips_outer_whitespace_only():
    assert exact_match("  return result \n", "return result")
    assert not exact_match("return  result", "return result")
    assert not exact_match("Return result", "return result")


@pytest.mark.parametrize("a,b", [
    ("SELECT count(*) FROM head WHERE age  >  56", "select COUNT( * )\nfrom head where age > 56;"),
    ('SELECT name FROM singer WHERE country = "France"', "select name from singer where country = 'France'"),
    ("SELECT a FROM t WHERE b <> 1", "select a from t where b != 1"),
    ("SELECT T1.name FROM t AS T1", "select t1.name from t as t1"),
])
def test_sql_normalisation_equal(a, b):
    assert normalize_sql(a) == normalize_sql(b)


def test_sql_normalisation_keeps_values():
    assert normalize_sql("SELECT a FROM t WHERE n = 'France'") != normalize_sql("SELECT a FROM t WHERE n = 'france'")
    assert normalize_sql("SELECT a FROM t WHERE x > 5") != normalize_sql("SELECT a FROM t WHERE x > 6")


def test_fit_prompt_keeps_the_end():
    assert fit_prompt([1, 2, 3], 5) == [1, 2, 3]
    assert fit_prompt([1, 2, 3], 2) == [2, 3]
    assert fit_prompt([1, 2, 3], 0) == []  # ids[-0:] would keep them all


def test_generation_needs_room_for_a_prompt(make_model, tokenizer):
    backbone = backbone_of(make_model(max_position_embeddings=16), tokenizer)
    items = [Item([{"role": "user", "content": "q"}], "a")]
    with pytest.raises(ValueError, match="--gen-length 16 leaves no room for a prompt in the model's 16 positions"):
        evaluate_generation(backbone, "django", items, SamplerConfig(16, 8, 16))


def test_execution_accuracy(tmp_path):
    db = tmp_path / "shop" / "shop.sqlite"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.executescript("CREATE TABLE item(name TEXT, price INT);"
                           "INSERT INTO item VALUES ('a', 3), ('b', 1), ('c', 2);")
    assert spider_database(tmp_path, "shop") == db
    assert execution_match(db, "select name from item where price > 1", "SELECT name FROM item WHERE price >= 2")
    assert execution_match(db, "select name from item order by price desc", "SELECT name FROM item")  # multiset
    assert not execution_match(db, "select name from item", "SELECT name FROM item ORDER BY price")  # order counts
    assert not execution_match(db, "select nonsense from", "SELECT name FROM item")
    with pytest.raises(ValueError, match="no database"):
        spider_database(tmp_path, "missing")


@pytest.mark.parametrize("a,b,equal", [
    ("((dog)|([a-z]))+", "(([a-z])|(dog))+", True),            # | commutes, groups vanish
    ("(dog)&(.*)", "(.*)&(dog)", True),                         # & commutes
    (".*.*dog", ".*dog", True),                                 # X*X* = X*
    ("((.*)*)", ".*", True),                                    # (X*)* = X*
    ("[AEIOUaeiou]", "[aeiouAEIOU]", True),                     # a class is a set
    ("(dog)|(dog)", "dog", True),                               # idempotence
    ("[a-z]{3,}", "[a-z]{3}", False),
    ("(dog)+", "(dog)*", False),
    ("\\b(dog)&(.*)\\b", "(\\b(dog))&((.*)\\b)", True),           # & binds looser than concatenation
    ("\\b(dog)&(.*)\\b", "\\b((dog)&(.*))\\b", False),
    ("(dog", "(dog)", False),                                    # unparsable prediction
])
def test_regex_equivalence(a, b, equal):
    assert regex_equivalent(a, b) is equal


def test_score_answers_per_task():
    items = [Item([], "#### 5"), Item([], "#### 7")]
    assert score_answers("gsm8k", items, ["#### 5.0", "7"]) == {"accuracy": 0.5, "accuracy_flexible": 1.0}
    items = [Item([], "(dog)|(truck)")]
    assert score_answers("nl-rx-synth", items, ["(truck)|(dog)"]) == {"exact_match": 0.0, "regex_equivalence": 1.0}

# -----------------------------------------------------------------------------
# Loaders and their errors


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loaders(tmp_path):
    gsm = write_lines(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    assert load_items("gsm8k", gsm) == [Item([{"role": "user", "content": "1+1?"}], "1+1=2\n#### 2")]
    chat = write_lines(tmp_path / "rx.jsonl", [{"messages": [
        {"role": "system", "content": "Convert."}, {"role": "user", "content": "lines with dog"},
        {"role": "assistant", "content": ".*dog.*"}]}])
    item, = load_items("nl-rx-synth", chat)
    assert item.reference == ".*dog.*" and [m["role"] for m in item.prompt] == ["system", "user"]
    (tmp_path / "tables.json").write_text(json.dumps([{
        "db_id": "shop", "table_names_original": ["item"],
        "column_names_original": [[-1, "*"], [0, "name"], [0, "price"]]}]))
    spider = tmp_path / "dev.json"
    spider.write_text(json.dumps([{"question": "Names?", "query": "SELECT name FROM item", "db_id": "shop"}]))
    item, = load_items("spider", spider)
    assert item.db_id == "shop" and item.reference == "SELECT name FROM item"
    assert "Schema: item(name, price)" in item.prompt[0]["content"]
    (tmp_path / "dev.anno").write_text("  call the function f.\ndefine x.\n")
    (tmp_path / "dev.code").write_text("f ( )\n  x = 1\n")
    assert [i.reference for i in load_items("django", tmp_path / "dev.code")] == ["f ( )", "x = 1"]


def test_few_shot_turns_come_before_the_question():
    q = Item([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "A")
    shot = Item([{"role": "user", "content": "q1"}], "a1")
    prompt = with_shots([q], [shot, shot], 1)[0].prompt
    assert [m["content"] for m in prompt] == ["S", "q1", "a1", "Q"]


@pytest.mark.parametrize("name,content,task,match", [
    ("bad.jsonl", '{"question": "q", "answer": "a"}\n{oops\n', "gsm8k", r"bad.jsonl:2: invalid JSON"),
    ("nofields.jsonl", '{"q": 1}\n', "gsm8k", r"nofields.jsonl:1: no usable fields"),
    ("sp.json", '[{"question": "q", "db_id": "x"}]', "spider", r"sp.json:1|sp.json item 0"),
])
def test_bad_rows_name_file_and_row(tmp_path, name, content, task, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        load_items(task, tmp_path / name)


def test_empty_sets_are_errors(tmp_path):
    (tmp_path / "e.anno").write_text("")
    (tmp_path / "e.code").write_text("")
    with pytest.raises(ValueError, match=r"e.anno: holds no examples"):
        load_items("django", tmp_path / "e.anno")
    (tmp_path / "sp.json").write_text("[]")
    with pytest.raises(ValueError, match=r"sp.json: holds no examples"):
        load_spider(tmp_path / "sp.json", None)
    for content in ("", "question,choice0,choice1,choice2,choice3,answer\n"):
        (tmp_path / "x_test.csv").write_text(content)
        with pytest.raises(ValueError, match=r"x_test.csv: holds no examples"):
            load_mmlu(tmp_path)


@pytest.mark.parametrize("name,task", [("d.anno", "django"), ("d.code", "django"), ("sp.json", "spider"),
                                       ("m_test.csv", "mmlu"), ("held.txt", "probe")])
def test_files_that_are_not_utf8_are_named(tmp_path, name, task):
    for suffix in (".anno", ".code"):
        (tmp_path / "d").with_suffix(suffix).write_text("ok\n")
    (tmp_path / name).write_bytes(b"fine\ncaf\xe9\n")  # Latin-1, not UTF-8
    load = {"mmlu": load_mmlu, "probe": read_text_file}.get(task, lambda p: load_items(task, p))
    with pytest.raises(ValueError, match=rf"{name}: not UTF-8 text at line 2"):
        load(tmp_path / name)


def test_mmlu_csv_with_a_byte_order_mark(tmp_path):
    (tmp_path / "b_test.csv").write_bytes("\ufeffquestion,choice0,choice1,choice2,choice3,answer\n"
                                          'Q?,a,"b\nb",c,d,3\n'.encode())
    question, = load_mmlu(tmp_path)
    assert question.answer == 3 and question.choices[1] == "b\nb"


def test_django_misaligned_and_missing(tmp_path):
    (tmp_path / "a.anno").write_text("one\ntwo\n")
    (tmp_path / "a.code").write_text("1\n")
    with pytest.raises(ValueError, match="2 lines but .*a.code has 1"):
        load_items("django", tmp_path / "a.anno")
    (tmp_path / "b.anno").write_text("one\n")
    with pytest.raises(ValueError, match="b.code is missing"):
        load_items("django", tmp_path / "b.anno")


def test_mmlu_loader(tmp_path):
    (tmp_path / "algebra_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\n"
                                               '"2+2?",3,4,5,6,1\n')
    (tmp_path / "old_test.csv").write_text("Q?,a,b,c,d,C\n")
    questions = load_mmlu(tmp_path)
    assert [(q.subject, q.answer) for q in questions] == [("algebra", 1), ("old", 2)]
    (tmp_path / "bad_test.csv").write_text("Q?,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"bad_test.csv row 1: answer 'E'"):
        load_mmlu(tmp_path)

# -----------------------------------------------------------------------------
# The probe


class Spy(nn.Module):
    """Wraps a model and keeps its inputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.inputs = model, model.config, []

    def forward(self, input_ids, **kwargs):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids=input_ids, **kwargs)


def test_probe_is_deterministic_and_masks_are_shared(make_model, tokenizer):
    windows = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    cfg = ProbeConfig(seq_len=24, windows=5, grid=4, seed=3, batch_size=2)
    a, b = Spy(make_model(seed=0)), Spy(make_model(seed=1))
    first = diffusion_probe(backbone_of(a, tokenizer), windows, cfg)
    again = diffusion_probe(backbone_of(a, tokenizer), windows, cfg)
    other = diffusion_probe(backbone_of(b, tokenizer), windows, cfg)
    assert first["probe_loss"] == again["probe_loss"]
    assert first["probe_loss"] != other["probe_loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))  # identical masked inputs
    assert not (a.inputs[0][:, 0] == tokenizer.mask_token_id).any()     # position 0 stays clean
    masks, _ = probe_masks((5, 24), cfg)
    assert not torch.equal(masks, probe_masks((5, 24), dataclasses.replace(cfg, seed=4))[0])


def test_probe_matches_hand_computation(tokenizer):
    """Uniform logits: every masked token costs log V, so the probe is the grid average of
    (masked count * log V / p) / scored length, which we recompute from the masks."""
    class Uniform(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.config = nn.Parameter(torch.zeros(1)), SimpleNamespace()

        def forward(self, input_ids, **kwargs):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(tokenizer)))

    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    cfg = ProbeConfig(seq_len=16, windows=3, grid=4)
    masks, p = probe_masks(windows.shape, cfg)
    expected = (masks.sum(-1).double() * math.log(len(tokenizer)) / p[:, None] / 15).mean().item()
    got = diffusion_probe(backbone_of(Uniform(), tokenizer), windows, cfg)["probe_loss"]
    assert got == pytest.approx(expected, rel=1e-5)


def test_text_rows_first_windows(tmp_path, tokenizer):
    """The probe's windows: the first max_rows consecutive rows (data.text_rows, shared with
    data.tokenize_text, which takes them all)."""
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 10)
    text = read_text_file(path)
    assert data.text_rows(text, tokenizer, 16, path, max_rows=3).tolist()[1] == list(b"ghijabcdefghijab")  # bytes 16..31
    assert data.text_rows(text, tokenizer, 16, path, max_rows=100).shape == (6, 16)  # what the file holds
    with pytest.raises(ValueError, match=r"t.txt: 100 tokens, fewer than one row of --probe-seq-len 1000; "
                                         r"give more text or a smaller --probe-seq-len$"):
        data.text_rows(text, tokenizer, 1000, path, "--probe-seq-len", max_rows=1)


def test_text_rows_tokenise_a_growing_prefix():
    """With max_rows, the text is tokenised on 2 x (tokens needed) characters, doubled until
    enough tokens come out: here 1 token per 4 characters, 40 tokens needed -> 80, then 160
    characters, never the whole 1000."""
    seen = []

    def quarter(text, add_special_tokens):
        seen.append(len(text))
        return {"input_ids": list(range(len(text) // 4))}
    rows = data.text_rows("x" * 1000, quarter, 4, "t.txt", max_rows=10)
    assert seen == [80, 160]
    assert rows.tolist() == torch.arange(40).view(10, 4).tolist()
    seen.clear()
    assert data.text_rows("x" * 1000, quarter, 4, "t.txt").shape == (62, 4)  # no max_rows: all 250 tokens
    assert seen == [1000]

# -----------------------------------------------------------------------------
# MMLU


class Rigged(nn.Module):
    """Puts all its confidence in `token` at one position of every row (the last, or the
    one before it for a shifted model), and junk elsewhere."""

    def __init__(self, vocab, token, shifted=False):
        super().__init__()
        self.vocab, self.token, self.shifted = vocab, token, shifted
        self.w, self.config = nn.Parameter(torch.zeros(1)), SimpleNamespace(max_position_embeddings=4096)

    def forward(self, input_ids, **kwargs):
        B, T = input_ids.shape
        logits = torch.randn(B, T, self.vocab, generator=torch.Generator().manual_seed(0))
        logits[:, T - 2 if self.shifted else T - 1, self.token] = 50.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("shifted", [False, True])
def test_mmlu_picks_the_likeliest_letter(tokenizer, shifted):
    questions = [Question("s", "Which?", ["w", "x", "y", "z"], 2),
               Question("s", "And this much longer one?", ["w", "x", "y", "z"], 0)]
    _, letters = letter_tokens(tokenizer, mmlu_prompt(questions[0], []))
    family = dataclasses.replace(TINY, shift_logits=shifted)
    model = Rigged(len(tokenizer), letters[2], shifted)
    result = mmlu_accuracy(backbone_of(model, tokenizer, family), questions, batch_size=2)
    assert result["accuracy"] == 0.5 and result["by_subject"] == {"s": 0.5}


def test_mmlu_letters_are_single_tokens(tokenizer):
    prompt = mmlu_prompt(Question("s", "Q", ["a", "b", "c", "d"], 0), [])
    ids, letters = letter_tokens(tokenizer, prompt)
    assert tokenizer.decode(ids).endswith("Answer: ")
    assert [tokenizer.decode([i]) for i in letters] == list("ABCD")


def test_mmlu_few_shot_fits_the_context(make_model, tokenizer):
    exemplars = [Question("s", "x" * 100, ["a", "b", "c", "d"], 1)] * 5
    questions = [Question("s", "Q", ["a", "b", "c", "d"], 1)]
    model = make_model(max_position_embeddings=256)  # holds about one exemplar
    result = mmlu_accuracy(backbone_of(model, tokenizer), questions, shots=5, exemplars=exemplars)
    assert 0 < result["mean_shots_used"] < 5

# -----------------------------------------------------------------------------
# Drift


def test_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)       # orthogonal map, isotropic scale
    assert linear_cka(x, x + 5.0) == pytest.approx(1.0)            # centring
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2  # unrelated


def test_weight_drift_per_layer(make_model, tokenizer):
    base, tuned = make_model(seed=0), make_model(seed=0)
    with torch.no_grad():
        w = tuned.layers[1].qkv.weight
        w.add_(0.5 * w)
    drift = weight_drift(backbone_of(tuned, tokenizer), backbone_of(base, tokenizer))
    assert list(drift) == ["block 0", "block 1", "other"]
    assert drift["block 0"] == 0 and drift["other"] == 0
    block = base.layers[1]
    total = sum(p.pow(2).sum() for p in block.parameters()).sqrt()
    assert drift["block 1"] == pytest.approx((0.5 * block.qkv.weight.norm() / total).item(), rel=1e-5)


def test_drift_report_and_plot(make_model, tokenizer, tmp_path):
    base, tuned = backbone_of(make_model(seed=0), tokenizer), backbone_of(make_model(seed=1), tokenizer)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = ProbeConfig(seq_len=16, windows=2, grid=2)
    same = drift_report(base, base, windows, cfg)
    assert same["forgetting"] == 0 and all(c == pytest.approx(1.0) for c in same["cka"])
    report = drift_report(tuned, base, windows, cfg)
    assert len(report["cka"]) == 3 and report["weight_distance"]["block 0"] > 0
    plot_drift({"same": same, "tuned": report}, tmp_path / "drift.png")
    assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"

# -----------------------------------------------------------------------------
# The command line, on a saved tiny checkpoint


@pytest.fixture
def checkpoint(make_model, tokenizer, tmp_path):
    path = tmp_path / "ckpt"
    make_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_probe_and_generation(checkpoint, tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "probe.json"
    result = E.main(["--model", str(checkpoint), "--task", "probe", "--data", str(text), "--probe-seq-len", "32",
                     "--probe-windows", "2", "--probe-grid", "2", "--base", str(checkpoint), "--out", str(out)])
    assert json.loads(out.read_text())["forgetting"] == 0 == result["forgetting"]
    rows = write_lines(tmp_path / "dev.jsonl", [{"question": "1+1?", "answer": "#### 2"}] * 3)
    result = E.main(["--model", str(checkpoint), "--task", "gsm8k", "--data", str(rows), "--limit", "2",
                     "--gen-length", "8", "--block-length", "4", "--steps", "4"])
    assert result["n"] == 2 and len(result["answers"]) == 2 and 0 <= result["accuracy"] <= 1


def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"error: .*bad.jsonl:1: invalid JSON"):
        E.main(["--model", str(checkpoint), "--task", "gsm8k", "--data", str(bad)])
    with pytest.raises(SystemExit, match="needs --base"):
        E.main(["--model", str(checkpoint), "--task", "drift", "--data", str(bad)])
    with pytest.raises(SystemExit, match="no such file"):
        E.main(["--model", str(checkpoint), "--task", "probe", "--data", str(tmp_path / "none.txt")])
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    with pytest.raises(SystemExit, match="error: --probe-seq-len 200 is longer than the model's 128 positions"):
        E.main(["--model", str(checkpoint), "--task", "probe", "--data", str(text), "--probe-seq-len", "200"])
    rows = write_lines(tmp_path / "dev.jsonl", [{"question": "q", "answer": "#### 2"},
                                                {"question": "q", "answer": "Janet has 16 ducks"}])
    with pytest.raises(SystemExit, match=r"error: .*dev.jsonl item 1: the GSM8K reference 'Janet has 16 ducks'"):
        E.main(["--model", str(checkpoint), "--task", "gsm8k", "--data", str(rows)])
    for flag in ("--model", "--base"):  # a missing folder, not transformers' "Repo id must be in the form ..."
        argv = {"--model": str(checkpoint), "--base": str(checkpoint)} | {flag: str(tmp_path / "missing")}
        with pytest.raises(SystemExit) as e:
            E.main([*sum(argv.items(), ()), "--task", "probe", "--data", str(text)])
        assert str(e.value.code) == f"error: {flag} {tmp_path / 'missing'}: no such folder (nor a hub id 'org/name')"


NO_MODEL = "/nonexistent/model"  # loading it fails: errors below prove the data were checked first


@pytest.mark.parametrize("task,name,content,match", [
    ("gsm8k", "bad.jsonl", "{not json\n", r"bad.jsonl:1: invalid JSON"),
    ("mmlu", "m_test.csv", "Q?,a,b,c,d,E\n", r"m_test.csv row 1: answer 'E'"),
    ("mmlu", "m_test.csv", 'Q?,a,b,c,d,A\n"unclosed quote' + "x" * 140_000,  # one field past csv's limit
     r"m_test.csv: not a readable CSV file \(field larger than field limit"),
    ("probe", "held.txt", None, r"held.txt: no such file"),
], ids=["bad-json", "bad-mmlu-answer", "unreadable-csv", "missing-text"])
def test_data_are_checked_before_the_model_loads(tmp_path, task, name, content, match):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(SystemExit, match=match):
        E.main(["--model", NO_MODEL, "--task", task, "--data", str(tmp_path / name)])


def test_sampler_flags_are_checked_before_the_model_loads(tmp_path, capsys):
    rows = write_lines(tmp_path / "dev.jsonl", [{"question": "q", "answer": "#### 2"}])
    with pytest.raises(SystemExit) as stop:  # a bad flag: argparse's usage line and exit 2
        E.main(["--model", NO_MODEL, "--task", "gsm8k", "--data", str(rows), "--steps", "0"])
    assert stop.value.code == 2
    assert "error: --steps 0: must lie in [1, " in capsys.readouterr().err


def test_failing_gold_queries_stop_the_run_before_generation(tmp_path):
    db = tmp_path / "db" / "shop" / "shop.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.executescript("CREATE TABLE item(name TEXT, price INT);")
    spider = tmp_path / "dev.json"
    spider.write_text(json.dumps([{"question": "q", "query": q, "db_id": "shop"}
                                  for q in ("SELECT name FROM item", "SELECT nonsense FROM item")]))
    with pytest.raises(SystemExit, match=r"dev.json item 1: .*shop.sqlite: the gold query fails \(no such column"):
        E.main(["--model", NO_MODEL, "--task", "spider", "--data", str(spider), "--spider-db", str(tmp_path / "db")])

# -----------------------------------------------------------------------------
# LoRA exports: the merged model, the adapter folder, base + --adapter


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """train.py with LoRA on a saved tiny base, exporting the merged model and the adapter."""
    import tiny_model
    import train
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    tok = tiny_model.make_tokenizer()
    tiny_model.make_tiny_model(tok, hidden_size=32, num_hidden_layers=2, intermediate_size=96).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    final = train.main(["--model", str(root / "base"), "--tiny-layers", "2", "--batch-size", "8", "--seq-len", "32",
                        "--builtin-size", "400", "--no-progress", "--steps", "20", "--lr", "1e-2", "--lora-rank", "4",
                        "--eval-every", "100", "--save-every", "100", "--final-eval", "0", "--export-adapter",
                        "--out", str(root / "run")])
    return root / "base", final


def test_adapter_folder_and_base_plus_adapter_answer_as_the_merged_export(lora_run, tmp_path):
    base, final = lora_run
    data_file = final.parent / "held_out.jsonl"
    flags = ["--task", "exact", "--data", str(data_file), "--limit", "6", "--gen-length", "8", "--block-length", "8"]
    merged = E.main(["--model", str(final), *flags])
    adapter = E.main(["--model", str(final / "adapter"), *flags])
    pair = E.main(["--model", str(base), "--adapter", str(final / "adapter"), *flags])
    plain = E.main(["--model", str(base), *flags])
    answers = lambda result: [a["prediction"] for a in result["answers"]]
    assert answers(adapter) == answers(pair) == answers(merged)
    assert adapter["answer_loss"] == pytest.approx(merged["answer_loss"], abs=1e-5)
    assert pair["answer_loss"] == pytest.approx(merged["answer_loss"], abs=1e-5)
    assert abs(plain["answer_loss"] - merged["answer_loss"]) > 1e-3  # the adapter matters


def test_adapter_applies_to_model_not_base(lora_run, tmp_path):
    """--model BASE --adapter DIR --base BASE: the base is loaded without the adapter (forgetting
    is measured against it), the model with it; an adapter folder without adapter_config.json or
    without a named base is one line."""
    base, final = lora_run
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    flags = ["--task", "probe", "--data", str(text), "--probe-seq-len", "32", "--probe-windows", "2",
             "--probe-grid", "2", "--base", str(base)]
    with_adapter = E.main(["--model", str(base), "--adapter", str(final / "adapter"), *flags])
    merged = E.main(["--model", str(final), *flags])
    assert with_adapter["forgetting"] != 0
    assert with_adapter["probe_loss"] == pytest.approx(merged["probe_loss"], abs=1e-5)
    assert with_adapter["base_probe_loss"] == merged["base_probe_loss"]
    with pytest.raises(SystemExit, match=r"error: --adapter .*: no adapter_config.json there"):
        E.main(["--model", str(base), "--adapter", str(base), *flags])
    nameless = tmp_path / "nameless"
    shutil.copytree(final / "adapter", nameless)
    config = json.loads((final / "adapter" / "adapter_config.json").read_text()) | {"base_model_name_or_path": None}
    (nameless / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="names no base model; give --model BASE --adapter"):
        E.main(["--model", str(nameless), *flags])


def probe_flags(tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    return ["--task", "probe", "--data", str(text), "--probe-seq-len", "32", "--probe-windows", "2", "--probe-grid", "2"]


def adapter_refusal(capfd, argv) -> str:
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    line = str(e.value.code)
    err = capfd.readouterr().err
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in err, (line, err)
    return line


def other_width_adapter(folder, base):
    """An adapter trained on a tiny model of width 64, its config naming the width-32 base."""
    import tiny_model
    from peft import LoraConfig, get_peft_model
    wide = tiny_model.make_tiny_model(tiny_model.make_tokenizer(), hidden_size=64, num_hidden_layers=2,
                                      intermediate_size=96)
    get_peft_model(wide, LoraConfig(r=4, target_modules=["qkv", "down"])).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text()) | {"base_model_name_or_path": str(base)}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def edit_adapter_config(**values):
    def edit(folder, base):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | values))
    return edit


ADAPTER_DAMAGES = {
    "other-width": (other_width_adapter, "the adapter does not fit the base model {base}: base_model.model.layers.0."
                                         "qkv.lora_A.default.weight is [4, 64] in the adapter but [4, 32] in the model "
                                         "(6 tensors differ); give the base it was trained on (--model)"),
    "config-not-json": (lambda f, b: (f / "adapter_config.json").write_text("{oops"),
                        "adapter_config.json: not valid JSON (Expecting property name"),
    "config-a-list": (lambda f, b: (f / "adapter_config.json").write_text("[1]"),
                      "adapter_config.json: holds a list, not a JSON object"),
    "no-weights": (lambda f, b: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "truncated-weights": (lambda f, b: (f / "adapter_model.safetensors").write_bytes(b"\0" * 20),
                          "adapter_model.safetensors is damaged"),
    "targets-the-base-lacks": (edit_adapter_config(target_modules=["nosuch"]),
                               "peft could not apply the adapter to {base} (Target modules {{'nosuch'}} not found"),
}


@pytest.mark.parametrize("damage", list(ADAPTER_DAMAGES))
def test_a_damaged_adapter_is_one_line_naming_it(lora_run, tmp_path, capfd, damage):
    """peft's own errors were 53 lines of size mismatches, a JSON error without the file, a
    PosixPath type error; each is one line naming the adapter folder or file, both ways in."""
    base, final = lora_run
    folder = tmp_path / "adapter"
    harm, said = ADAPTER_DAMAGES[damage]
    if damage != "other-width":
        shutil.copytree(final / "adapter", folder)
    harm(folder, base)
    said = said.format(base=base)
    for argv, prefix in ((["--model", str(folder)], ""), (["--model", str(base), "--adapter", str(folder)], "--adapter ")):
        line = adapter_refusal(capfd, argv + probe_flags(tmp_path))
        assert line.startswith(f"error: {prefix if 'adapter_config' in said or 'no adapter_model' in said else ''}"
                               f"{folder}"), line
        assert said in line, line


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["r", "lora_alpha", "target_modules", "base_model_name_or_path"]),
       value=st.one_of(st.text(max_size=5), st.integers(-3, 3), st.booleans(), st.floats(allow_nan=False),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_wrong_types_in_adapter_config_are_one_line_naming_the_file(lora_run, tmp_path_factory, capfd, field, value):
    base, final = lora_run
    kinds = {"r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             "lora_alpha": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
             "target_modules": lambda v: isinstance(v, (list, str)),  # a list of numbers peft refuses later
             "base_model_name_or_path": lambda v: isinstance(v, str)}
    assume(not kinds[field](value))
    folder = tmp_path_factory.mktemp("typed") / "adapter"
    shutil.copytree(final / "adapter", folder)
    edit_adapter_config(**{field: value})(folder, base)
    line = adapter_refusal(capfd, ["--model", str(base), "--adapter", str(folder)] + probe_flags(folder.parent))
    assert line.startswith(f"error: --adapter {folder / 'adapter_config.json'}: {field} is "), line
