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
