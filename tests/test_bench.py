"""Tests of scripts/bench.py: structure and FLOP accounting, never timings.

Run: python -m pytest tests/test_bench.py -q
"""

import json

import pytest
import torch

from scripts import bench

# A bench model small enough for a few steps in well under a second on one core.
BENCH_FLAGS = ["--width", "64", "--layers", "4", "--heads", "2", "--ffn", "128",
               "--batch-size", "2", "--seq-len", "32", "--steps", "2", "--warmup", "0"]

# -----------------------------------------------------------------------------
# bench.py


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench.main(BENCH_FLAGS + ["--no-isolate", "--threads", "1", "--json", str(path)])
    return result, json.loads(path.read_text())


def test_bench_table_and_json(bench_result, capsys):
    result, saved = bench_result
    assert set(saved["rows"]) == set(bench.RUNS)
    for row in saved["rows"].values():
        for key in ("flops", "model_flops", "step_s", "tokens_per_s", "peak_mem_bytes", "peak_tensor_bytes",
                    "achieved_flops_per_s", "mfu", "losses"):
            assert key in row
        assert len(row["step_s_samples"]) == 2 and row["flops"] > 0
    for key in ("flops", "step_s", "peak_mem_bytes", "tokens_per_s"):
        for base in ("diffusion", "two-pass"):
            assert saved["ratios"][key][base][base] == pytest.approx(1.0)
            assert set(saved["ratios"][key][base]) == set(bench.RUNS)
    assert {c["target"] for c in saved["targets"]} >= {"time dllm-jepa / diffusion", "FLOPs dllm-jepa / two-pass"}
    assert not any("peak" in c["target"] for c in saved["targets"])  # --no-isolate: peaks mix, not judged
    assert saved["matmul"]["flops_per_s"] > 0 and saved["costs"]["F"] > saved["costs"]["h"] > 0
    assert "full pass (paper)" in saved["study"]
    bench.report(result)
    out = capsys.readouterr().out
    for text in ("ms/step", "tensors", "dllm-jepa-online", "two-pass", "cost targets:", "F (one forward)",
                 "target pass alone", "memory targets need --isolate"):
        assert text in out


def test_memory_targets_by_hand():
    """RSS and tensor targets from hand-made rows: online 108/100, EMA (130 - 25)/100, judged
    against 1.10 only when each run had its own process."""
    row = lambda mem, weights=25: dict(flops=1.0, step_s=1.0, peak_mem_bytes=mem, peak_tensor_bytes=mem,
                                       weight_bytes=weights, achieved_flops_per_s=1.0)
    rows = {"diffusion": row(100), "dllm-jepa-online": row(108), "dllm-jepa": row(130)}
    costs = {"F": 3.0, "h": 0.0}
    checks = {c["target"]: (c["value"], c["met"]) for c in bench.check_targets(rows, costs, 1.0, "cpu")}
    assert checks["peak RSS dllm-jepa-online / diffusion"] == (pytest.approx(1.08), True)
    assert checks["peak tensors (dllm-jepa (EMA) - one weight copy) / diffusion"] == (pytest.approx(1.05), True)
    rows["dllm-jepa-online"] = row(111)
    checks = {c["target"]: c["met"] for c in bench.check_targets(rows, costs, 1.0, "cpu")}
    assert checks["peak RSS dllm-jepa-online / diffusion"] is False
    assert not any("peak" in c["target"] for c in bench.check_targets(rows, costs, 1.0, "cpu", isolated=False))


def test_bench_flop_ratios(bench_result):
    """Target passes skip the LM head, so dllm-jepa adds F - h to diffusion (plus the small
    predictor), the online and EMA targets cost the same, and reading the embedding at L/2
    halves the target pass."""
    _, saved = bench_result
    rows, F_, h = saved["rows"], saved["costs"]["F"], saved["costs"]["h"]
    extra = rows["dllm-jepa"]["flops"] - rows["diffusion"]["flops"]
    assert F_ - h <= extra <= (F_ - h) * 1.03  # the predictor: under 3% of a forward here
    assert rows["dllm-jepa"]["flops"] == rows["dllm-jepa-online"]["flops"]
    assert rows["l2-anchor"]["flops"] == rows["diffusion"]["flops"]
    half = rows["dllm-jepa-l/2"]["flops"] - rows["diffusion"]["flops"]
    assert half - (extra - (F_ - h)) == pytest.approx((F_ - h) / 2, rel=1e-9)
    assert rows["two-pass"]["flops"] > rows["dllm-jepa"]["flops"] + 2 * (F_ - h)
    r = saved["ratios"]["flops"]
    assert r["diffusion"]["dllm-jepa"] == pytest.approx((4 * F_ - h) / (3 * F_), rel=0.03)
    assert r["two-pass"]["dllm-jepa"] == pytest.approx((4 * F_ - h) / (6 * F_ - 3 * h), rel=0.03)
    study = saved["study"]
    assert study["no LM head"]["flops"] == F_ - h
    assert study["layer L/2, truncated"]["flops_vs_full"] == pytest.approx((F_ - h) / 2 / F_)
    assert study["no LM head"]["max_abs_diff"] == 0 and study["layer L/2, truncated"]["max_abs_diff"] == 0
    assert study["no LM head, 2 batches packed"]["flops"] == 2 * (F_ - h)
    assert study["no LM head, 2 batches packed"]["max_abs_diff"] < 1e-5  # same rows, other matmul tiling


def test_bench_isolated_runs_report_their_own_memory():
    """Each run in its own process (forkserver): results come back, peaks are positive."""
    rows = bench.measure_runs(["diffusion", "dllm-jepa"],
                              bench.parse_args(BENCH_FLAGS + ["--threads", "1", "--steps", "1"]))
    assert set(rows) == {"diffusion", "dllm-jepa"}
    assert all(r["peak_mem_bytes"] > 0 and len(r["step_s_samples"]) == 1 for r in rows.values())
    assert rows["diffusion"]["losses"]["jepa"] == 0 and rows["dllm-jepa"]["losses"]["jepa"] > 0

def test_bench_fsdp_counts_the_same_flops_and_losses(bench_result):
    """--fsdp shards as train.py does (one process): the same model, batch and masks give the
    same first-step losses and FLOPs as the unsharded run."""
    _, plain = bench_result
    rows = bench.measure_runs(["diffusion", "dllm-jepa"],
                              bench.parse_args(BENCH_FLAGS + ["--threads", "1", "--steps", "1", "--no-isolate",
                                                              "--fsdp"]))
    for run in ("diffusion", "dllm-jepa"):
        assert rows[run]["flops"] == plain["rows"][run]["flops"]
        for part, value in rows[run]["losses"].items():
            assert value == pytest.approx(plain["rows"][run]["losses"][part], rel=1e-5, abs=1e-7)


def test_model_flops_leave_out_recomputation(bench_result):
    """Model FLOPs (MFU's numerator) are 3 x the forward phase less 2 x a no-grad target pass:
    within attention's extra half backward of the FLOPs counted without checkpointing, and the
    same with it, while the counted FLOPs grow by the recomputation of every checkpointed block."""
    _, plain = bench_result
    runs = ["diffusion", "dllm-jepa", "two-pass"]
    rows = bench.measure_runs(runs, bench.parse_args(BENCH_FLAGS + ["--threads", "1", "--steps", "1", "--no-isolate",
                                                                    "--fsdp", "--activation-checkpointing"]))
    F_, h = plain["costs"]["F"], plain["costs"]["h"]
    for run in runs:
        counted, model = plain["rows"][run]["flops"], plain["rows"][run]["model_flops"]
        assert 0.97 * counted < model < counted  # attention's backward is 2.5x its forward, not 2x
        assert rows[run]["model_flops"] == model
    # recomputation: at most one forward of the blocks (F - h) per gradient-carrying pass; less,
    # as torch stops recomputing once every saved tensor is back (a block's last matmul is not rerun)
    recomputed = rows["diffusion"]["flops"] - plain["rows"]["diffusion"]["flops"]
    assert 0.5 * (F_ - h) < recomputed <= F_ - h
    assert rows["two-pass"]["flops"] - plain["rows"]["two-pass"]["flops"] == 2 * recomputed
    # the no-grad target pass is counted once: dllm-jepa's model FLOPs exceed diffusion's by about F - h
    extra = plain["rows"]["dllm-jepa"]["model_flops"] - plain["rows"]["diffusion"]["model_flops"]
    assert F_ - h <= extra <= (F_ - h) * 1.03


def test_mfu_needs_a_known_peak(bench_result, monkeypatch, capsys):
    result, saved = bench_result
    bench.report(result)  # CPU, no --peak-tflops: no peak to divide by, no MFU column
    assert saved["peak_flops_per_s"] is None and "MFU" not in capsys.readouterr().out
    args = bench.parse_args(BENCH_FLAGS + ["--peak-tflops", "2.5"])
    assert bench.peak_flops_per_s(args, torch.device("cpu")) == (2.5e12, "--peak-tflops")
    with pytest.raises(SystemExit, match="--peak-tflops -1.0: give the device's peak"):
        bench.peak_flops_per_s(bench.parse_args(["--peak-tflops", "-1"]), torch.device("cpu"))
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
                         ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        peak, _ = bench.peak_flops_per_s(bench.parse_args(["--dtype", "bfloat16"]), torch.device("cuda"))
        assert peak == (tflops * 1e12 if tflops else None)
        assert bench.peak_flops_per_s(bench.parse_args([]), torch.device("cuda")) == (None, None)  # fp32: no guess
    with_peak = bench.main(BENCH_FLAGS + ["--no-isolate", "--threads", "1", "--no-study", "--runs", "diffusion",
                                          "--peak-tflops", "1"])
    row = with_peak["rows"]["diffusion"]
    assert row["mfu"] == pytest.approx(row["model_flops"] / row["step_s"] / 1e12)
    assert "peak for MFU: 1.0 TFLOP/s (--peak-tflops)" in capsys.readouterr().out


def test_bench_builds_llada_8b_shape():
    """The GPU command's shape: LLaDA-8B's vocabulary and block layout (narrowed here: flags
    override width and depth), 8.0 B parameters at full size."""
    args = bench.parse_args(["--model", "llada-8b-shape", "--width", "64", "--layers", "1", "--heads", "2",
                             "--ffn", "128"])
    model, blocks_of, mask_id = bench.build_backbone(args, torch.device("cpu"), torch.float32)
    assert model.get_input_embeddings().weight.shape == (126464, 64) and len(blocks_of(model)) == 1
    assert model.config.max_position_embeddings == 4096 and mask_id == model.config.mask_token_id
    with torch.device("meta"):
        full, _, _ = bench.build_backbone(bench.parse_args(["--model", "llada-8b-shape"]), torch.device("meta"),
                                          torch.bfloat16)
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(8.0e9, rel=0.01)


def test_bench_steps_as_train_does(monkeypatch):
    """A bench step is train.py's: backward, then the gradients clipped to train.py's default
    --grad-clip 1.0 before AdamW steps (the clipping's cost is in every row)."""
    clipped = []
    monkeypatch.setattr(bench, "clip_gradients", lambda model, grad_clip: clipped.append(grad_clip))
    args = bench.parse_args(BENCH_FLAGS)
    trainer = bench.Trainer("diffusion", args, torch.device("cpu"), torch.float32)
    trainer.step()
    assert clipped == [1.0] and trainer.count == 1


def test_bench_refuses_checkpointing_without_fsdp(capsys):
    with pytest.raises(SystemExit) as e:  # a usage error, before anything is built
        bench.main(BENCH_FLAGS + ["--activation-checkpointing"])
    assert e.value.code == 2
    assert "error: --activation-checkpointing and --cpu-offload go with --fsdp" in capsys.readouterr().err
