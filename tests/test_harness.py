"""
harness.py, the lm-eval model: its likelihoods against hand computations from the logits, and
small local lm-eval tasks (YAML + jsonl written here) run end to end through
lm_eval.simple_evaluate, whose scores must equal evaluate.py's (tasks/) on the same items.

    python -m pytest tests/test_harness.py -q
"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import tiny_model  # noqa: E402
from dlm import backbones  # noqa: E402
from dlm.held_logs import HeldLogs  # noqa: E402
from dlm.sampler import SamplerConfig  # noqa: E402
from scripts import harness  # noqa: E402
from tasks import load_items  # noqa: E402
from tasks.common import with_shots  # noqa: E402
from tasks.generation import evaluate_generation  # noqa: E402
from tasks.mmlu import Question, letter_tokens, mmlu_accuracy, mmlu_prompt  # noqa: E402

# initializer_range 0.3, not 0.02: a random model whose predictions depend on the context (at 0.02
# it picks the same MMLU letter for every question, and a test could not tell positions apart)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=256, initializer_range=0.3)
SAMPLER = dict(gen_length=24, block_length=8, steps=24)  # three blocks, one token per step


@pytest.fixture(scope="module")
def tok():
    """The byte-level tokenizer with four merges, " A" .. " D": like LLaDA's, it writes an answer
    letter after "Answer:" as one token, so lm-eval's (context, " A") pair is one masked position,
    the one evaluate.py's MMLU scores."""
    return tiny_model.make_tokenizer([" A B C D"] * 10, merges=4)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("harness") / "ckpt"
    torch.manual_seed(0)
    tiny_model.make_tiny_model(tok, **SMALL).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(ckpt):
    return harness.DiffusionLM(pretrained=str(ckpt), batch_size=3, mc_samples=64, device="cpu")


def requests(kind, *args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@torch.no_grad()
def logprobs_at(lm, ids: list[int], masked: list[int]) -> torch.Tensor:
    """By hand: log-softmax of the model's logits at `masked` positions of `ids` masked, (len(masked), V)."""
    x = torch.tensor([ids])
    x[0, masked] = lm.backbone.mask_token_id
    return torch.log_softmax(lm.backbone.model(input_ids=x).logits[0, masked].double(), -1)

# -----------------------------------------------------------------------------
# (a) Likelihoods


def test_one_token_loglikelihood_is_the_log_prob_at_one_masked_position(lm, tok):
    pairs = [("Which letter? Answer:", " A"), ("Q", " C"), ("A much longer context, padded in its batch:", " B"),
             ("Answer: ", "D")]  # lm-eval moves the trailing space into the continuation: " D", one token
    out = lm.loglikelihood(requests("loglikelihood", *pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, out):
        ids = tok(context.rstrip())["input_ids"]
        token = tok(continuation if not context.endswith(" ") else " " + continuation)["input_ids"]
        assert len(token) == 1
        hand = logprobs_at(lm, ids + [lm.backbone.mask_token_id], [len(ids)])[0]
        assert logprob == pytest.approx(float(hand[token[0]]), abs=1e-5)
        assert greedy == (int(hand.argmax()) == token[0])
    (empty, _), = lm.loglikelihood(requests("loglikelihood", ("", "x")))  # empty context: EOS first
    assert empty == pytest.approx(float(logprobs_at(lm, [tok.eos_token_id, 0], [1])[0, ord("x")]), abs=1e-5)


def test_exact_elbo_by_hand_and_the_monte_carlo_estimate(lm, tok):
    context, cont = tok("The sky is")["input_ids"], tok(" blue")["input_ids"][:2]  # " ", "b"
    P, a, b = len(context), cont[0], cont[1]
    ids = context + cont
    single_a, single_b = float(logprobs_at(lm, ids, [P])[0, a]), float(logprobs_at(lm, ids, [P + 1])[0, b])
    both = logprobs_at(lm, ids, [P, P + 1])
    # E over l in {1, 2} (1/2 each), S of size l: (L / l) * the masked tokens' log-probs, L = 2:
    # l = 1: 2 * (one of the two tokens masked, the other seen); l = 2: 1 * (both masked)
    hand = 0.5 * 2 * (single_a + single_b) / 2 + 0.5 * (float(both[0, a]) + float(both[1, b]))
    assert harness.exact_elbo(lm.backbone, context, cont) == pytest.approx(hand, abs=1e-9)
    alone = float(logprobs_at(lm, context + [a], [P])[0, a])  # L = 1: the log-prob at one masked position
    assert harness.exact_elbo(lm.backbone, context, cont[:1]) == pytest.approx(alone, abs=1e-9)

    cont = tok(" blue sky")["input_ids"][:4]
    exact = harness.exact_elbo(lm.backbone, context, cont)
    draws = harness.elbo_samples(lm.backbone, context, cont, 64, seed=0)
    assert torch.equal(draws, harness.elbo_samples(lm.backbone, context, cont, 64, seed=0))  # the seed fixes it
    assert torch.allclose(draws, harness.elbo_samples(lm.backbone, context, cont, 64, seed=0, batch_size=5), atol=1e-4)
    other = harness.elbo_samples(lm.backbone, context, cont, 64, seed=1)
    assert not torch.equal(draws, other)
    for d in (draws, other):  # unbiased: within 4 standard errors of the enumerated bound
        assert abs(float(d.mean()) - exact) < 4 * float(d.std()) / 8
    (estimate, _), = lm.loglikelihood(requests("loglikelihood", ("The sky is", " blue")))
    full = tok(" blue")["input_ids"]
    assert estimate == pytest.approx(float(harness.elbo_samples(lm.backbone, context, full, 64, seed=0).mean()))
    assert harness.elbo_samples(lm.backbone, context, cont[:1], 8).unique().numel() == 1  # L = 1: no randomness


def test_rolling_sums_the_windows(tok, ckpt):
    lm = harness.DiffusionLM(pretrained=str(ckpt), batch_size=8, mc_samples=8, device="cpu")
    text = "rolling text"
    (total,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    ids = tok(text)["input_ids"]
    assert total == pytest.approx(float(harness.elbo_samples(lm.backbone, [tok.eos_token_id], ids, 8).mean()))
    lm.limit = 5  # windows of 5 positions: the sum of each window's estimate
    (windowed,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert windowed != total and windowed < 0


def test_generate_until_cuts_at_until_and_bad_model_args(lm, ckpt):
    contexts = ["hello", "world!"]
    plain = lm.generate_until(requests("generate_until", *[(c, {"until": []}) for c in contexts]))
    stops = [a[1:3] for a in plain if len(a) > 2]
    cut = lm.generate_until(requests("generate_until", *[(c, {"until": stops, "max_gen_toks": 5}) for c in contexts]))
    assert cut == [harness.cut_at(a, stops) for a in plain] and cut != plain
    with pytest.raises(ValueError, match="unknown gen_len"):
        harness.DiffusionLM(pretrained=str(ckpt), gen_len=3)
    with pytest.raises(ValueError, match="--gen-length 20 is not a multiple of --block-length 8"):
        harness.DiffusionLM(pretrained=str(ckpt), gen_length=20, block_length=8)
    with pytest.raises(ValueError, match="threshold='high': give a number"):
        harness.DiffusionLM(pretrained=str(ckpt), threshold="high")
    with pytest.raises(ValueError, match=r"--threshold 2.0: must be a probability in \(0, 1\]"):
        harness.DiffusionLM(pretrained=str(ckpt), threshold=2)

def test_a_train_py_model_answers_on_its_trained_canvas(ckpt, tmp_path, monkeypatch):
    """No gen_length: the canvas train.py trained on (its --seq-len minus the run's longest prompt,
    one block), as evaluate.py's canvas_for picks it for the same prompts."""
    import shutil
    from tasks.common import Item
    from tasks.generation import canvas_for
    model = shutil.copytree(ckpt, tmp_path / "final")
    (model / "training_config.json").write_text(json.dumps({"args": {"seq_len": 48}}))
    lm = harness.DiffusionLM(pretrained=str(model), device="cpu")
    chats = [[{"role": "user", "content": q}] for q in ("short", "a longer question")]
    used = []
    monkeypatch.setattr(harness, "generate_text", lambda backbone, prompts, sampler, *a: used.append(sampler) or
                        [""] * len(prompts))
    lm.generate_until(requests("generate_until", *[(lm.apply_chat_template(c), {"until": []}) for c in chats]))
    expected = canvas_for(lm.backbone, [Item(c, "") for c in chats], {**lm.sampler_args}, 48)
    assert used == [expected] and expected.gen_length == expected.block_length == 48 - (2 + len("a longer question"))


# -----------------------------------------------------------------------------
# (b, c) Local lm-eval tasks end to end, scored like evaluate.py on the same items

UTILS = '''
from tasks.gsm8k import gsm8k_correct
from tasks.mmlu import Question, mmlu_prompt


def mmlu_text(doc):  # evaluate.py's MMLU prompt, zero-shot
    return mmlu_prompt(Question(doc["subject"], doc["question"], doc["choices"], doc["answer"]), [])


def gsm8k_results(doc, results):  # evaluate.py's GSM8K metric (strict: the number after ####)
    return {"exact_match": float(gsm8k_correct(results[0], doc["answer"]))}
'''

GSM8K_YAML = '''
task: local_gsm8k
dataset_path: json
dataset_kwargs:
  data_files: {{train: "{dir}/gsm8k_train.jsonl", test: "{dir}/gsm8k_test.jsonl"}}
  cache_dir: "{dir}/hf_cache"
training_split: train
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:"]
  max_gen_toks: 256
process_results: !function dllm_harness_utils.gsm8k_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''

MMLU_YAML = '''
task: local_mmlu
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{dir}/mmlu_test.jsonl"}}
  cache_dir: "{dir}/hf_cache"
test_split: test
output_type: multiple_choice
doc_to_text: !function dllm_harness_utils.mmlu_text
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''

# The rigged answerer below answers with the last digit of the question: right for 1 and 3.
GSM8K_TEST = [{"question": "Tom has 2 apples and gets 5 more. How many?", "answer": "2 + 5 = 7\n#### 7"},
              {"question": "Add 0 to 6.", "answer": "#### 6"},
              {"question": "What is 4 times 1?", "answer": "#### 4"},
              {"question": "Half of 18 is 9; what is 9?", "answer": "#### 9"}]
GSM8K_TRAIN = [{"question": "What is 1 plus 2?", "answer": "1 + 2 = 3\n#### 3"}]
MMLU = [Question("astronomy", "Which planet is largest?", ["Mars", "Jupiter", "Venus", "Earth"], 1),
        Question("astronomy", "What orbits the Earth?", ["The Sun", "Mars", "The Moon", "Pluto"], 2),
        Question("logic", "If all A are B, and x is A, then x is", ["B", "not B", "C", "unknown"], 0),
        Question("logic", "Which is a tautology?", ["p", "p or not p", "p and not p", "q"], 1),
        Question("logic", "2 + 2 =", ["3", "4", "5", "22"], 1),
        Question("astronomy", "The closest star to Earth is", ["Sirius", "Vega", "the Sun", "Polaris"], 2)]


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "dllm_harness_utils.py").write_text(UTILS)
    (d / "local_gsm8k.yaml").write_text(GSM8K_YAML.format(dir=d))
    write_lines(d / "gsm8k_test.jsonl", GSM8K_TEST)
    write_lines(d / "gsm8k_train.jsonl", GSM8K_TRAIN)
    return d


def run(model, task_dir, task, **kwargs):
    """simple_evaluate on one local task -> (its metrics, its samples in document order)."""
    out = lm_eval.simple_evaluate(model=model, tasks=[task], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  **kwargs)
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


class Answerer(nn.Module):
    """A rigged LM: after the last <|assistant|> token it answers "#### d Question: x" (d: the last
    digit before that token, so the question's), then EOS; anywhere else, uniform logits. Without
    the chat template's assistant token in the prompt it has nothing to answer."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.w = tok, nn.Parameter(torch.zeros(1))
        self.assistant = tok.convert_tokens_to_ids("<|assistant|>")
        self.config = SimpleNamespace(max_position_embeddings=256, eos_token_id=tok.eos_token_id)

    def forward(self, input_ids, **kwargs):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, len(self.tok))
        for b, row in enumerate(input_ids.tolist()):
            if self.assistant not in row:
                continue
            start = len(row) - row[::-1].index(self.assistant)
            digit = [chr(t) for t in row[:start] if chr(t).isdigit()][-1] if row[:start] else "?"
            answer = self.tok(f"#### {digit} Question: x", add_special_tokens=False)["input_ids"]
            for k in range(T - start):
                logits[b, start + k, answer[k] if k < len(answer) else self.tok.eos_token_id] = 30.0
        return SimpleNamespace(logits=logits)


def test_gsm8k_style_generation_scores_as_evaluate_py(tok, task_dir):
    """What is compared: the same jsonl items, one-shot (first training row as an earlier chat
    turn), the chat template, the same sampler settings (gen_length 24, block 8, 24 steps,
    greedy) and batch size, the same metric (tasks.gsm8k.gsm8k_correct). lm-eval's side renders
    the chat through the harness and cuts the answers at its `until`; evaluate.py's side is
    tasks.generation.evaluate_generation. The rigged model answers right exactly on items 1, 3."""
    backbone = backbones.Backbone(Answerer(tok), tok, backbones.FAMILIES["tiny-dlm"], tok.mask_token_id,
                                  tok.eos_token_id)
    lm = harness.DiffusionLM(backbone=backbone, batch_size=2, **SAMPLER)
    metrics, samples = run(lm, task_dir, "local_gsm8k", apply_chat_template=True, num_fewshot=1)
    items = with_shots(load_items("gsm8k", task_dir / "gsm8k_test.jsonl"),
                       load_items("gsm8k", task_dir / "gsm8k_train.jsonl"), 1)
    ours = evaluate_generation(backbone, "gsm8k", items, SamplerConfig(**SAMPLER), batch_size=2)
    answers = [a["prediction"] for a in ours["answers"]]
    assert answers == ["#### 5 Question: x", "#### 6 Question: x", "#### 1 Question: x", "#### 9 Question: x"]
    assert [s["resps"][0][0] for s in samples] == [harness.cut_at(a, ["Question:"]) for a in answers]
    assert [s["exact_match"] for s in samples] == [0.0, 1.0, 0.0, 1.0]
    assert metrics["exact_match,none"] == ours["accuracy"] == 0.5


@pytest.mark.parametrize("sampler", [SAMPLER, dict(gen_length=24, block_length=8, threshold=0.1, prefix_cache=True)])
def test_generation_from_a_saved_model_equals_evaluate_py(ckpt, task_dir, sampler):
    """The same one-shot chat prompts and sampler on a saved (random) tiny model loaded by
    model_args: every answer, token for token, is evaluate.py's, so are the (zero) scores; the
    exact sampler and the fast one (threshold, prefix_cache)."""
    args = f"pretrained={ckpt},batch_size=2," + ",".join(f"{k}={v}" for k, v in sampler.items())
    metrics, samples = run("dllm", task_dir, "local_gsm8k", model_args=args, apply_chat_template=True,
                           num_fewshot=1)
    backbone = backbones.load_backbone(str(ckpt))
    items = with_shots(load_items("gsm8k", task_dir / "gsm8k_test.jsonl"),
                       load_items("gsm8k", task_dir / "gsm8k_train.jsonl"), 1)
    ours = evaluate_generation(backbone, "gsm8k", items, SamplerConfig(**sampler), batch_size=2)
    answers = [harness.cut_at(a["prediction"], ["Question:"]) for a in ours["answers"]]
    assert [s["resps"][0][0] for s in samples] == answers and any(answers)
    assert metrics["exact_match,none"] == ours["accuracy"]


def test_mmlu_style_accuracy_equals_evaluate_py(lm, tok, ckpt, task_dir):
    """What is compared: evaluate.py's zero-shot MMLU prompt (tasks.mmlu.mmlu_prompt, no chat
    template), the four letters scored at one masked position after it; accuracy from lm-eval's
    multiple_choice (argmax of the harness's loglikelihoods of " A" .. " D") against
    tasks.mmlu.mmlu_accuracy, per question and in all. The gold letters are set from a hand
    computation with the model's logits so that exactly half are the model's choice."""
    hand = []
    for q in MMLU:
        ids, letters = letter_tokens(tok, mmlu_prompt(q, []))
        assert tok.decode(ids).endswith("Answer:")  # " A" is one token, as lm-eval's pair writes it
        hand.append(int(logprobs_at(lm, ids + [tok.mask_token_id], [len(ids)])[0, letters].argmax()))
    assert len(set(hand)) > 1  # the model's choice depends on the question
    questions = [Question(q.subject, q.question, q.choices, c if i % 2 == 0 else (c + 1) % 4)
                 for i, (q, c) in enumerate(zip(MMLU, hand))]
    write_lines(task_dir / "mmlu_test.jsonl", [vars(q) for q in questions])
    (task_dir / "local_mmlu.yaml").write_text(MMLU_YAML.format(dir=task_dir))
    metrics, samples = run("dllm", task_dir, "local_mmlu", model_args=f"pretrained={ckpt}", batch_size=4)
    backbone = backbones.load_backbone(str(ckpt))
    per_question = [mmlu_accuracy(backbone, [q])["accuracy"] for q in questions]
    assert [s["acc"] for s in samples] == per_question == [1.0, 0.0] * 3
    assert metrics["acc,none"] == mmlu_accuracy(backbone, questions, batch_size=4)["accuracy"] == 0.5


@pytest.mark.parametrize("args, message", [
    ([], "No tasks specified"),
    (["--model_args", "pretrained=MISSING", "--tasks", "arc_easy"], "model_args: pretrained MISSING: no such folder"),
    (["--model_args", "pretrained=MODEL,dtype=int8", "--tasks", "arc_easy"], "model_args: dtype='int8'"),
    (["--model_args", "pretrained=MODEL,batch_size=auto", "--tasks", "arc_easy"], "give lm-eval's --batch_size N"),
    (["--model_args", "pretrained=MODEL", "--tasks", "no_such_task"], "Tasks not found: no_such_task"),
    (["--model_args", "pretrained=MODEL", "--tasks", "arc_easy", "--limit", "-1"], "--limit -1: must be > 0"),
    (["--model_args", "pretrained=MODEL", "--tasks", "arc_easy", "--output_path", "AFILE/results"],
     "AFILE is a file, so no folder can be made there"),
], ids=["no-tasks", "missing-model", "dtype", "batch-in-model-args", "unknown-task", "limit",
        "output-under-a-file"])
def test_bad_arguments_are_one_line(ckpt, tmp_path, monkeypatch, args, message):
    """lm-eval's command line with our model: each bad argument one line (exit 1), no traceback."""
    monkeypatch.setattr("sys.argv", ["harness"])  # main sets it for lm-eval's parser
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    afile = tmp_path / "afile"
    afile.write_text("x")
    fill = {"MODEL": str(ckpt), "MISSING": str(tmp_path / "missing"), "AFILE": str(afile)}
    *args, message = [re.sub("|".join(fill), lambda m: fill[m[0]], a) for a in args + [message]]
    with pytest.raises(SystemExit) as e:
        harness.main(args)
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line and message in line, line


def test_lm_evals_log_waits_for_the_model_and_is_dropped_when_an_argument_stops_the_run():
    """lm-eval logs the run's setup before it builds the model: held, those lines print once
    DiffusionLM loads (in order, then later ones pass straight through), and vanish when a bad
    argument ends the run first, so that its error is the one line."""
    seen = []
    catch = logging.Handler()
    catch.emit = lambda record: seen.append(record.getMessage())
    lm_eval_log = logging.getLogger("lm_eval")
    lm_eval_log.addHandler(catch)
    other = logging.Handler()  # a second handler (as lm-eval's own, once set up): each record still once
    other.emit = lambda record: None
    lm_eval_log.addHandler(other)
    level, lm_eval_log.level = lm_eval_log.level, logging.INFO
    try:
        held = HeldLogs(*lm_eval_log.handlers)
        logging.getLogger("lm_eval.cli").info("selected tasks")  # a child logger's record, as lm-eval's are
        logging.getLogger("lm_eval.evaluator").info("seeds")
        assert seen == []
        held.release()
        logging.getLogger("lm_eval.evaluator").info("running")
        assert seen == ["selected tasks", "seeds", "running"]
        held.hold(*lm_eval_log.handlers)
        logging.getLogger("lm_eval.cli").info("selected tasks")
        held.drop()
        assert seen == ["selected tasks", "seeds", "running"]
    finally:
        lm_eval_log.removeHandler(catch)
        lm_eval_log.removeHandler(other)
        lm_eval_log.level = level


def test_a_bad_argument_is_the_only_line_on_stderr(tmp_path):
    """The command as a user runs it: no lm-eval log line before the error."""
    root = Path(harness.__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "scripts.harness", "--model_args", f"pretrained={tmp_path / 'missing'}",
                           "--tasks", "arc_easy"], cwd=root, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model_args: pretrained {tmp_path / 'missing'}: no such "
                                                   "folder"), done.stderr

