"""
Training loop, data handling and checkpoints, on a very small tiny model (CPU, offline).

    python -m pytest tests/test_train.py -q
"""

import json
import math

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModel, AutoTokenizer

import tiny_model
import train
from dlm import data, hub, preflight
from dlm.flags import parse_args

SMALL = ["--tiny-width", "32", "--tiny-layers", "2", "--batch-size", "8", "--seq-len", "32",
         "--builtin-size", "400", "--no-progress"]


def run(tmp_path, name, *flags):
    out = tmp_path / name
    final = train.main(SMALL + ["--out", str(out), *flags])
    return out, final


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def checkpoint_state(path, tmp_path):
    dcp_to_torch_save(str(path), str(tmp_path / "consolidated.pt"))
    return torch.load(tmp_path / "consolidated.pt", weights_only=False)


def test_short_run_lowers_heldout_loss(tmp_path):
    out, final = run(tmp_path, "run", "--steps", "60", "--lr", "3e-3", "--warmup-steps", "5",
                     "--eval-every", "60", "--save-every", "60")
    evals = [row["held_out"] for row in read_log(out) if "held_out" in row]
    assert len(evals) == 2
    assert evals[-1]["diffusion"] < 0.75 * evals[0]["diffusion"], evals
    steps = [row for row in read_log(out) if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, 61))
    assert all(row["jepa"] > 0 for row in steps)  # the JEPA term is live in dllm-jepa
    assert (final / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["objective"]["method"] == "dllm-jepa"


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "4", "--lora-dropout", "0.1", "--lr", "1e-2"]],
                         ids=["full", "lora"])
def test_resume_is_bitwise_exact(tmp_path, extra):
    """6 uninterrupted steps == 3 steps, (lost progress), resume from step 3, 3 more steps; with
    LoRA too (adapter dropout on: its RNG is restored; the EMA adapter is saved and restored)."""
    flags = ["--steps", "6", "--eval-every", "100", "--save-every", "3", *extra]
    _, straight = run(tmp_path, "straight", *flags)
    out, _ = run(tmp_path, "resumed", *flags)
    step6 = checkpoint_state(out / "checkpoints" / "step_00000006", tmp_path)
    for lost in (out / "checkpoints" / "step_00000006", out / "final"):
        for f in sorted(lost.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        lost.rmdir()
    _, resumed = run(tmp_path, "resumed", *flags, "--resume", "auto")
    a, b = AutoModel.from_pretrained(straight), AutoModel.from_pretrained(resumed)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    again = checkpoint_state(out / "checkpoints" / "step_00000006", tmp_path)
    assert any(".lora_B.ema." in k for k in step6["model"]) == bool(extra)
    for key, value in step6["model"].items():  # EMA target and predictor too
        assert torch.equal(value, again["model"][key]), key


def test_export_round_trip_matches_checkpoint(tmp_path):
    out, final = run(tmp_path, "run", "--steps", "2", "--eval-every", "100", "--save-every", "100")
    model = AutoModel.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.mask_token_id == model.config.mask_token_id
    state = checkpoint_state(out / "checkpoints" / "step_00000002", tmp_path)["model"]
    for name, p in model.named_parameters():
        assert torch.equal(p, state["backbone." + name]), name
    assert set(state) >= {k for k in state if k.startswith("target_encoder.")} != set()
    json.loads((final / "training_config.json").read_text())


def test_checkpoints_keep_last_n_and_leave_no_tmp(tmp_path):
    out, _ = run(tmp_path, "run", "--steps", "4", "--eval-every", "100", "--save-every", "1", "--keep", "2")
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("method", ["diffusion", "two-pass", "l2-anchor"])
def test_every_method_trains(tmp_path, method):
    out, _ = run(tmp_path, method, "--method", method, "--steps", "3", "--eval-every", "100",
                 "--save-every", "100")
    steps = [row for row in read_log(out) if "loss" in row]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(row["loss"])) for row in steps)
    if method != "two-pass":
        assert all(row["jepa"] == 0 for row in steps)


# -----------------------------------------------------------------------------
# Row shapes read (bad flags and bad rows: tests/test_faults.py)


def test_accepted_row_shapes(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]},
            {"prompt": "p", "answer": "a"}, {"question": "q", "answer": "a"},
            {"prompt": "p", "completion": "c"}]
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(rows))
    examples = data.read_examples(path)
    assert [len(e.prompt) for e in examples] == [2, 1, 1, 1]
    assert [e.answer for e in examples] == ["a", "a", "a", "c"]


# -----------------------------------------------------------------------------
# Tokenisation and batches


def test_rows_are_prompt_answer_eos_padding():
    tok = tiny_model.make_tokenizer()
    ex = data.Example([{"role": "user", "content": "add 1 2"}], "3")
    rows = data.tokenize_examples([ex], tok, 24)
    prompt = data.prompt_ids(tok, ex.prompt)
    P, A = rows.prompt_lengths[0].item(), rows.answer_lengths[0].item()
    assert P == len(prompt) and A == 2  # "3" then EOS
    ids = rows.input_ids[0].tolist()
    assert ids[:P] == prompt and ids[P] == ord("3")
    assert ids[P + 1:] == [tok.eos_token_id] * (24 - P - 1)


def test_truncation_never_drops_the_answer():
    tok = tiny_model.make_tokenizer()
    long_prompt = data.Example([{"role": "user", "content": "x" * 200}], "answer")
    long_answer = data.Example([{"role": "user", "content": "q"}], "y" * 200)
    rows = data.tokenize_examples([long_prompt, long_answer], tok, 32)
    assert rows.truncated == 2
    assert rows.answer_lengths.tolist()[0] == 7  # "answer" + EOS kept whole
    assert rows.answer_lengths.tolist()[1] == 32 - rows.prompt_lengths.tolist()[1]
    assert (rows.prompt_lengths + rows.answer_lengths <= 32).all()
    assert tok.decode(rows.input_ids[0, rows.prompt_lengths[0] - 1:rows.prompt_lengths[0]]) == "<|assistant|>"


def test_each_epoch_visits_every_row_once():
    seen = torch.cat([data.batch_rows(step, 10, 5, seed=3) for step in range(4)])
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # a fresh permutation per epoch
    assert torch.equal(data.batch_rows(2, 10, 5, seed=3), data.batch_rows(2, 10, 5, seed=3))


def test_plain_text_rows(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abcdefgh" * 10)
    rows = data.tokenize_text(path, tiny_model.make_tokenizer(), 16)
    assert rows.input_ids.shape == (5, 16)
    assert rows.prompt_lengths.tolist() == [1] * 5 and rows.answer_lengths.tolist() == [15] * 5
    with pytest.raises(ValueError, match="fewer than one row"):
        data.tokenize_text(path, tiny_model.make_tokenizer(), 100)


def test_settle_fills_the_defaults_and_leaves_the_flags_as_parsed():
    """The defaults that depend on the model are settled once, into a new namespace: the parsed
    flags stay as given (None where unset), and an explicit flag always wins."""
    builtin, examples = corpus("builtin"), corpus("examples")
    _, args = parse_args(["--steps", "50", "--lora-rank", "4", "--lora-targets", " down, qkv,down "])
    parsed = dict(vars(args))
    settings = train.settle(args, "tiny-dlm", builtin)
    assert vars(args) == parsed and args.lr is None and args.lora_alpha is None
    assert (settings.loss_weight, settings.lr, settings.warmup_steps, settings.final_eval) == ("flat", 1e-3, 5, 200)
    assert (settings.lora_alpha, settings.lora_targets) == (8.0, "down,qkv")
    loaded = train.settle(parse_args(["--model", "m", "--data", "d.jsonl", "--lr", "3e-4", "--steps", "2000"])[1],
                          "llada", examples)
    assert (loaded.loss_weight, loaded.lr, loaded.warmup_steps, loaded.final_eval) == ("inverse-t", 3e-4, 30, 50)
    assert loaded.lora_alpha is None and loaded.lora_targets is None  # no LoRA: nothing to settle
    targets = train.settle(parse_args(["--lora-rank", "2"])[1], "llada", builtin).lora_targets
    assert targets == "q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out"  # the family's own


def test_the_embedding_is_read_at_the_middle_block_unless_told():
    """--embed-layer's default is the middle block's output, whatever the depth (the dev sweep's
    pick); a given layer, the last (-1) included, wins."""
    builtin = corpus("builtin")
    middle = {blocks: train.settle(parse_args([])[1], "tiny-dlm", builtin, blocks=blocks).embed_layer
              for blocks in (1, 4, 5, 32)}
    assert middle == {1: 1, 4: 2, 5: 3, 32: 16}  # hidden states 0..blocks: block (blocks + 1) // 2's output
    assert train.settle(parse_args(["--embed-layer", "-1"])[1], "tiny-dlm", builtin, blocks=32).embed_layer == -1
    assert parse_args([])[1].embed_layer is None  # the flag as parsed stays unset


def test_the_default_run_is_the_built_in_task_at_2000_steps_of_32_tokens():
    """`python train.py` with no flags: what the README's first command shows."""
    settings = train.settle(parse_args([])[1], "tiny-dlm", corpus("builtin"))
    assert (settings.steps, settings.seq_len, settings.warmup_steps, settings.final_eval, settings.epochs) == (
        2000, 32, 30, 200, None)


def corpus(kind, longest=40, rows=100):
    """A hub.Corpus as read_corpus returns it, of `rows` examples the longest of which needs
    `longest` tokens (kind: builtin, examples or text)."""
    if kind == "text":
        return hub.Corpus(hub.Source("t.txt", ids=list(range(rows * 32))), None, kind, 0, [])
    encoded = [([1] * 10, [2] * (longest - 10 if i == 0 else 5)) for i in range(rows)]
    return hub.Corpus(hub.Source("d", encoded, [None] * rows), None, kind, 0, [])


def test_learning_rate_schedule_by_hand(tmp_path):
    """Default warmup: min(30, steps / 10) = 4 steps for 40, linear to the peak 1e-3, then
    cosine to 0.1 of it: lr(k) = 1e-3 (0.1 + 0.9 (1 + cos(pi (k - 4) / 36)) / 2)."""
    out, _ = run(tmp_path, "run", "--steps", "40", "--eval-every", "100")
    lrs = [row["lr"] for row in read_log(out) if "loss" in row]
    assert json.loads((out / "config.json").read_text())["args"]["warmup_steps"] == 4
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[22] == pytest.approx(0.55e-3)  # half way: cos = 0
    assert lrs[39] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 35 / 36))))


def test_held_out_evaluation_runs_in_eval_mode(tmp_path, monkeypatch):
    modes, evaluate = [], train.held_out_eval
    def recording_evaluate(model, *args):
        modes.append(model.training)
        return evaluate(model, *args)
    monkeypatch.setattr(train, "held_out_eval", recording_evaluate)
    run(tmp_path, "run", "--steps", "2", "--eval-every", "1")
    assert modes == [False, False, False]  # before step 1, after steps 1 and 2


def test_ema_target_follows_the_online_weights_each_step(tmp_path):
    """After optimizer step k, target <- m_k target + (1 - m_k) online, m_k linear from START to
    END over --steps: 0.5 -> 0.9 over 2 steps gives m_1 = 0.7, m_2 = 0.9. Checked on the
    checkpoints of steps 1 and 2, whose backbones are the online weights after those steps."""
    out, _ = run(tmp_path, "run", "--steps", "2", "--ema-momentum", "0.5", "0.9", "--save-every", "1",
                 "--eval-every", "100")
    step1 = checkpoint_state(out / "checkpoints" / "step_00000001", tmp_path)["model"]
    step2 = checkpoint_state(out / "checkpoints" / "step_00000002", tmp_path)["model"]
    targets = [k for k in step2 if k.startswith("target_encoder.")]
    assert len(targets) == len([k for k in step2 if k.startswith("backbone.")]) > 0
    for key in targets:
        online = step2["backbone." + key[len("target_encoder."):]]
        assert torch.allclose(step2[key], 0.9 * step1[key] + 0.1 * online, atol=1e-6, rtol=0), key
    # and it moved: by a tenth of its gap to the online weights
    moved = sum((step2[k] - step1[k]).abs().sum().item() for k in targets)
    assert moved > 1e-3, moved


@pytest.mark.parametrize("clip", [0.05, 1e3])
def test_gradients_are_clipped_to_grad_clip_before_each_step(tmp_path, monkeypatch, clip):
    """The optimizer steps on gradients of global norm min(grad_norm, --grad-clip), grad_norm
    (logged) being the norm before clipping: 0.05 is below every step's norm, 1e3 above."""
    seen, make = [], train.make_optimizer

    def recording_optimizer(model, lr, weight_decay):
        optimizer = make(model, lr, weight_decay)
        step = optimizer.step

        def recording_step(*args, **kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            local = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]
            seen.append(math.sqrt(sum(g.double().pow(2).sum().item() for g in local)))
            return step(*args, **kwargs)
        optimizer.step = recording_step
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", recording_optimizer)
    out, _ = run(tmp_path, "run", "--steps", "3", "--grad-clip", str(clip), "--eval-every", "100")
    logged = [row["grad_norm"] for row in read_log(out) if "loss" in row]
    assert len(seen) == len(logged) == 3
    for before, after in zip(logged, seen):
        assert (before > clip) == (clip < 1)  # each setting is on the side it is meant to test
        assert after == pytest.approx(min(before, clip), rel=1e-4), (before, after)


def test_masks_are_a_function_of_seed_step_and_shard():
    """The same (seed, step, shard) draws the same masks (exact resume); any other step
    (-1 = held-out), shard or seed draws other ones."""
    def masks(seed, step, shard):
        return torch.rand((8, 32), generator=train.mask_generator(seed, step, shard, "cpu")) < 0.5
    keys = [(seed, step, shard) for seed in (0, 1, 7) for step in (-1, 0, 1, 2, 100) for shard in (0, 1, 2)]
    drawn = {key: masks(*key) for key in keys}
    for key in keys:
        assert torch.equal(drawn[key], masks(*key)), key
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(drawn[a], drawn[b]), (a, b)


def split_eval(rows, fraction, seed):
    return [data.select(rows, idx) for idx in data.split_indices(len(rows.input_ids), fraction, seed)]


def test_held_out_split_is_disjoint_covers_every_row_and_has_the_right_sizes():
    n = 40
    row_id = torch.arange(n)
    rows = data.Tokenized(row_id[:, None].repeat(1, 6), row_id % 3 + 1, row_id % 5 + 1)
    train_rows, eval_rows = split_eval(rows, 0.25, seed=3)
    train_ids, eval_ids = train_rows.input_ids[:, 0].tolist(), eval_rows.input_ids[:, 0].tolist()
    assert (len(train_ids), len(eval_ids)) == (30, 10)
    assert not set(train_ids) & set(eval_ids)
    assert sorted(train_ids + eval_ids) == list(range(n))
    assert sorted(eval_ids) != list(range(10))  # drawn from the seed, not the first rows
    for part in (train_rows, eval_rows):  # each row keeps its own tokens and lengths
        ids = part.input_ids[:, 0]
        assert torch.equal(part.input_ids, ids[:, None].repeat(1, 6))
        assert torch.equal(part.prompt_lengths, ids % 3 + 1) and torch.equal(part.answer_lengths, ids % 5 + 1)
    assert torch.equal(split_eval(rows, 0.25, seed=3)[1].input_ids, eval_rows.input_ids)
    assert not torch.equal(split_eval(rows, 0.25, seed=4)[1].input_ids, eval_rows.input_ids)
    # at least one row on each side
    assert [len(p.input_ids) for p in split_eval(rows, 0.001, seed=3)] == [39, 1]
    assert [len(p.input_ids) for p in split_eval(rows, 0.999, seed=3)] == [1, 39]

# -----------------------------------------------------------------------------
# LoRA (--lora-rank) and exports (--export-dtype, --export-adapter)

LORA = ["--lora-rank", "4", "--eval-every", "100", "--final-eval", "0"]


def save_base(path, dtype=torch.float32):
    """A saved tiny model to fine-tune (an adapter needs a base that exists outside the run)."""
    torch.manual_seed(0)
    tok = tiny_model.make_tokenizer()
    tiny_model.make_tiny_model(tok, hidden_size=32, num_hidden_layers=2, intermediate_size=96).to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def safetensors_dtypes(folder):
    from safetensors import safe_open
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {f.get_slice(key).get_dtype() for key in f.keys()}


def test_lora_trains_only_the_adapters_and_exports_base_plus_adapter(tmp_path, capsys):
    """Base weights in the checkpoint are the saved base's, bit for bit; only adapters (and the
    predictor) have optimizer state; final/ is the base plus scaling * B A in each adapted layer,
    the rest untouched; it computes what base + adapter (peft, final/adapter) computes."""
    from peft import PeftModel
    base_path = save_base(tmp_path / "base")
    out, final = run(tmp_path, "lora", "--model", str(base_path), *LORA, "--steps", "4", "--lr", "1e-2",
                     "--save-every", "4", "--export-adapter")
    printed = capsys.readouterr().out
    assert "LoRA rank 4, alpha 8 on qkv, attn_out, gate_up, down (8 layers): 4,352 trainable parameters" in printed
    assert "load with `import tiny_model; AutoModel.from_pretrained(path)`" in printed
    base = AutoModel.from_pretrained(base_path).eval()
    base_state = base.state_dict()
    saved = checkpoint_state(out / "checkpoints" / "step_00000004", tmp_path)
    model = {k[len("backbone."):]: v for k, v in saved["model"].items() if k.startswith("backbone.")}
    frozen = {k.replace(".base_layer", ""): v for k, v in model.items() if ".lora_" not in k}
    assert frozen.keys() == base_state.keys()
    assert all(torch.equal(frozen[k], v) for k, v in base_state.items())  # the base never moved
    assert all(".lora_" in k and ".default." in k or k.startswith("predictor.") for k in saved["optim"]["state"])
    layers = {k.split(".lora_B.")[0] for k in model if ".lora_B.default." in k}
    assert len(layers) == 8 and all(model[f"{l}.lora_B.default.weight"].abs().sum() > 0 for l in layers)

    merged = AutoModel.from_pretrained(final).eval()
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    for name, value in merged.state_dict().items():
        layer = name.removesuffix(".weight")
        if layer in layers:  # W + alpha / r * B A, alpha = 2 r by default
            delta = 2.0 * model[f"{layer}.lora_B.default.weight"] @ model[f"{layer}.lora_A.default.weight"]
            assert torch.allclose(value, base_state[name] + delta, atol=1e-6), name
            assert not torch.allclose(value, base_state[name], atol=1e-4), name
        else:
            assert torch.equal(value, base_state[name]), name
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base_path.resolve()) and adapter["r"] == 4
    with_adapter = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), final / "adapter").eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, plain = (m(input_ids=ids).logits for m in (with_adapter, merged, base))
    assert torch.allclose(got, want, atol=1e-5) and (want - plain).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["diffusion", "two-pass", "l2-anchor", "dllm-jepa-online"])
def test_every_method_trains_under_lora(tmp_path, method, capsys):
    flags = ["--method", "dllm-jepa", "--target", "online"] if method == "dllm-jepa-online" else ["--method", method]
    out, _ = run(tmp_path, method, *LORA, *flags, "--steps", "3", "--save-every", "100", "--lr", "1e-2")
    steps = [row for row in read_log(out) if "loss" in row]
    assert len(steps) == 3 and all(math.isfinite(row["loss"]) for row in steps)
    assert (steps[-1]["anchor"] > 0) == (method == "l2-anchor")  # the adapters' exact weight change
    assert (all(row["jepa"] > 0 for row in steps)) == (method in ("two-pass", "dllm-jepa-online"))
    printed = capsys.readouterr().out
    assert "4,352 trainable parameters" in printed and "EMA adapter" not in printed


def test_lora_settings_are_fatal_on_resume():
    """Rank and targets shape the adapters, alpha scales them, and the frozen base is stored in
    --dtype: a change stops the resume; a new dropout only warns; runs from before LoRA resume."""
    def config(**args):
        return {"args": {"model": "m", "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": "qkv", "lora_dropout": 0.0,
                         "dtype": "float32"} | args, "objective": {}, "world_size": 1, "model_family": "tiny-dlm",
                "model_parameters": 10}
    for change in ({"lora_rank": 8}, {"lora_alpha": 4.0}, {"lora_targets": "qkv,down"}, {"dtype": "bfloat16"},
                   {"lora_rank": 0, "lora_alpha": None, "lora_targets": None}):
        with pytest.raises(ValueError, match=next(iter(change))):
            preflight.check_resume(config(), config(**change))
    assert preflight.check_resume(config(), config(lora_dropout=0.1)) == ["lora_dropout 0.0 -> 0.1"]
    before_lora = config()
    for key in ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout"):
        del before_lora["args"][key]
    plain = config(lora_rank=0, lora_alpha=None, lora_targets=None)
    assert preflight.check_resume(before_lora, plain) == []
    assert preflight.check_resume(before_lora, plain | {"args": plain["args"] | {"dtype": "bfloat16"}}) == [
        "dtype float32 -> bfloat16"]


def test_bad_lora_flags_are_one_line_errors(tmp_path, capsys):
    """A target name that matches no layer (peft would ignore it silently): one line, exit 1,
    before anything is written; bad values and LoRA-only flags without --lora-rank: usage, exit 2."""
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "bad", *LORA, "--lora-targets", "qkv,q_proj")
    assert stop.value.code == ("error: --lora-targets: 'q_proj' names no linear layer in the tiny-dlm blocks; "
                               "available: attn_out, down, gate_up, qkv")
    assert not (tmp_path / "bad").exists()
    for flags, message in ((["--lora-rank", "-1"], "--lora-rank: -1: must be >= 0"),
                           (["--lora-dropout", "0.2"], "--lora-dropout: only with LoRA"),
                           (["--lora-rank", "2", "--lora-dropout", "1"], "must be >= 0 and < 1"),
                           (["--lora-rank", "2", "--export-adapter"], "--export-adapter: an adapter needs a base")):
        with pytest.raises(SystemExit) as stop:
            run(tmp_path, "bad", *flags)
        assert stop.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def test_export_is_in_the_checkpoints_dtype(tmp_path):
    """A bf16 checkpoint exports bf16 (fine-tuned with fp32 masters, or with LoRA on a bf16 base),
    --export-dtype float32 overrides; a new tiny model exports fp32."""
    base = save_base(tmp_path / "base", torch.bfloat16)
    short = ["--steps", "1", "--eval-every", "100", "--save-every", "100", "--final-eval", "0"]
    _, final = run(tmp_path, "full", "--model", str(base), *short)
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert safetensors_dtypes(final) == {"BF16"}
    assert AutoModel.from_pretrained(final).dtype == torch.bfloat16
    _, final = run(tmp_path, "fp32", "--model", str(base), *short, "--export-dtype", "float32")
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32" and safetensors_dtypes(final) == {"F32"}
    out, final = run(tmp_path, "lora", "--model", str(base), *short, *LORA, "--dtype", "bfloat16", "--save-every", "1")
    assert safetensors_dtypes(final) == {"BF16"}
    state = checkpoint_state(out / "checkpoints" / "step_00000001", tmp_path)["model"]
    assert {v.dtype for k, v in state.items() if ".lora_" in k or k.startswith("predictor.")} == {torch.float32}
    assert {v.dtype for k, v in state.items() if k.startswith("backbone.") and ".lora_" not in k} == {torch.bfloat16}
    _, final = run(tmp_path, "new", *short)
    assert safetensors_dtypes(final) == {"F32"}
