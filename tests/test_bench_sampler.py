"""bench_sampler.py: LLaDA's loop restated gives the same tokens as dlm.sampler.generate (so the
throughput comparison compares equal work), and the benchmark reports its figures."""

import pytest
import torch

import tiny_model
from dlm.sampler import SamplerConfig, generate
from scripts import bench_sampler


@pytest.mark.parametrize("gen_length, block_length, steps", [(16, 16, 16), (16, 8, 8), (12, 4, 6)])
def test_reference_loop_matches_our_sampler(gen_length, block_length, steps):
    torch.manual_seed(0)
    tokenizer = tiny_model.make_tokenizer()
    model = tiny_model.make_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=2, intermediate_size=64).eval()
    prompts = torch.randint(0, 256, (3, 5))
    with torch.no_grad():
        ours = generate(model, list(prompts), tokenizer.mask_token_id,
                        SamplerConfig(gen_length=gen_length, block_length=block_length, steps=steps))
        ref = bench_sampler.reference_generate(model, prompts.clone(), tokenizer.mask_token_id,
                                               gen_length, block_length, steps)
    assert torch.equal(ref[:, :5], prompts)
    assert torch.equal(ours, ref[:, 5:])
    assert not (ours == tokenizer.mask_token_id).any()


def test_benchmark_reports_equal_tokens_and_the_time_split(capsys):
    result = bench_sampler.main(["--batch-size", "2", "--prompt-length", "4", "--gen-length", "8",
                                 "--block-length", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert result["same"] == 1.0
    assert 0 < result["ours_forward_fraction"] <= 1 and 0 < result["reference_forward_fraction"] <= 1
    assert "ours / LLaDA's loop" in out and "tokens/s" in out


def test_bad_flags_are_one_line():
    with pytest.raises(SystemExit, match="--gen-length 10 is not a multiple of --block-length 4"):
        bench_sampler.main(["--gen-length", "10", "--block-length", "4"])


def test_fast_mode_compares_settings_on_a_task(tmp_path, capsys):
    """--fast on a saved one-layer model (its prefix cache is exact) and 5 questions, gen 8 in
    one block, batch 2: the exact sampler takes 8 forwards per answer; threshold 1 is the exact
    sampler (the same answers and forwards); the cache changes no answer and runs fewer
    positions (where a block takes more than one step); a low threshold takes fewer forwards."""
    import json

    from dlm import backbones
    torch.manual_seed(1)
    backbone = backbones.new_tiny_backbone(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=128, initializer_range=0.3)
    backbone.model.save_pretrained(tmp_path / "model")
    backbone.tokenizer.save_pretrained(tmp_path / "model")
    words = ["cab", "bead", "fig", "hide", "jam"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"reverse {w}", "answer": w[::-1]}) + "\n"
                                                 for w in words))
    rows = bench_sampler.main(["--fast", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "rows.jsonl"),
                               "--gen-length", "8", "--block-length", "8", "--batch-size", "2", "--repeats", "1",
                               "--thresholds", "1.0", "0.05"])
    out = capsys.readouterr().out
    assert list(rows) == ["exact", "exact + cache", "threshold 1", "threshold 1 + cache", "threshold 0.05",
                          "threshold 0.05 + cache"]
    assert rows["exact"]["forwards"] == 8 and rows["exact"]["changed"] == [] and rows["exact"]["points"] == 0
    assert rows["threshold 1"]["changed"] == [] and rows["threshold 1"]["forwards"] == 8
    for name in ("exact", "threshold 1", "threshold 0.05"):
        cached = rows[name + " + cache"]
        assert cached["changed"] == rows[name]["changed"] and cached["forwards"] == rows[name]["forwards"]
        assert cached["positions"] < rows[name]["positions"] or cached["forwards"] == 1  # one step: no cached one
    assert rows["threshold 0.05"]["forwards"] < 8 and rows["threshold 0.05"]["fewer"] > 1
    assert "goal (>= 2x fewer forwards" in out and "exact match" in out
    with pytest.raises(SystemExit, match="--gen-length 128 leaves no room for a prompt in the model's 128 positions"):
        bench_sampler.main(["--fast", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "rows.jsonl"),
                            "--gen-length", "128", "--block-length", "128", "--repeats", "1"])


def test_fast_mode_bad_flags_are_one_line(capsys):
    for argv, message in ((["--fast"], "--fast needs --model and --data"),
                          (["--fast", "--model", "m", "--data", "d", "--steps", "8"], "give no --steps")):
        with pytest.raises(SystemExit):
            bench_sampler.parse_args(argv)
        assert message in capsys.readouterr().err
