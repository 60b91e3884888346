"""The gradient-cosine diagnostic (diagnostics.py, train.py --grad-cosine) against hand
computations, and the promise that measuring it changes nothing in training."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import train
from dlm import diagnostics


class TwoParameters(nn.Module):
    """A 'model' with one weight in a block and one outside, whose two losses have gradients
    known by hand: diffusion = x0 a + x1 b, jepa = a^2 - 3 b (at a = 1: gradient (2, -3))."""

    def __init__(self, jepa_lambda):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(2.0))
        self.config = SimpleNamespace(jepa_lambda=jepa_lambda)

    def forward(self, x, generator=None):
        a, b = self.blocks[0].a, self.b
        return SimpleNamespace(diffusion=x[0] * a + x[1] * b, jepa=a ** 2 - 3 * b)


def test_cosine_of_summed_gradients_by_hand():
    """Two batches: diffusion gradients (1, 0) and (0, 1), summed (1, 1); lambda x JEPA = 2 x
    (2, -3) per batch, summed (8, -12). cos = (8 - 12) / (sqrt 2 sqrt 208); per group the signs;
    the ratio of norms sqrt(208) / sqrt(2). Single-batch cosines (0.55 and -0.83) average to
    something else: the sum is what is measured."""
    model = TwoParameters(jepa_lambda=2.0)
    batches = lambda: iter([((torch.tensor([1.0, 0.0]),), None), ((torch.tensor([0.0, 1.0]),), None)])
    groups = diagnostics.block_groups(model, model.blocks)
    assert list(groups) == ["block_0", "rest"]
    got = diagnostics.gradient_cosines(model, batches, groups, lambda t: t)
    assert got["grad_cosine"] == pytest.approx(-4 / (math.sqrt(2) * math.sqrt(208)))
    assert got["jepa_grad_ratio"] == pytest.approx(math.sqrt(208) / math.sqrt(2))
    assert got["grad_cosine_block_0"] == pytest.approx(1.0) and got["grad_cosine_rest"] == pytest.approx(-1.0)
    assert all(p.grad is None for p in model.parameters())  # nothing left for the optimizer to see


def test_cosines_sum_over_ranks_before_dividing():
    """Under FSDP each rank holds a shard: the dot products and squared norms are summed over
    ranks, then divided. Rank 0 holds a = (1, 0), b = (1, 1); rank 1 (the fake all_reduce adds
    its a.b = -2, |a|^2 = 4, |b|^2 = 1) holds a = (0, 2), b = (0, -1): the full vectors give
    cos = -1 / sqrt(5 x 3), not the mean of the ranks' cosines (0.707 and -1)."""
    a, b = {"g": [torch.tensor([1.0, 0.0])]}, {"g": [torch.tensor([1.0, 1.0])]}
    assert diagnostics.cosines(a, b)["grad_cosine"] == pytest.approx(1 / math.sqrt(2))
    rank1 = torch.tensor([[-2.0, 4.0, 1.0]], dtype=torch.float64)
    both = diagnostics.cosines(a, b, all_reduce=lambda stats: stats + rank1)
    assert both["grad_cosine"] == pytest.approx(-1 / math.sqrt(15))
    assert both["jepa_grad_ratio"] == pytest.approx(math.sqrt(3 / 5))
    zero = diagnostics.cosines(a, {"g": [torch.zeros(2)]})
    assert math.isnan(zero["grad_cosine"])  # no JEPA gradient: undefined, not 0 or 1


def test_train_logs_grad_cosine_and_trains_exactly_as_without(tmp_path):
    """--grad-cosine adds the cosines to each held-out evaluation and leaves every training step
    as it was: same losses and gradient norms, step for step, as the same run without it."""
    common = ["--steps", "4", "--eval-every", "2", "--batch-size", "4", "--tiny-width", "32", "--tiny-layers", "2",
              "--builtin-size", "200", "--no-progress", "--final-eval", "0"]
    train.main(common + ["--out", str(tmp_path / "with"), "--grad-cosine", "2"])
    train.main(common + ["--out", str(tmp_path / "without")])
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
    with_, without = read("with"), read("without")
    steps = lambda log: [(r["loss"], r["grad_norm"]) for r in log if "grad_norm" in r]
    assert steps(with_) == steps(without) and len(steps(with_)) == 4
    held_out = [r["held_out"] for r in with_ if "held_out" in r]
    assert len(held_out) == 3 and all(-1 <= h["grad_cosine"] <= 1 for h in held_out)
    assert {"grad_cosine_block_0", "grad_cosine_block_1", "grad_cosine_rest", "jepa_grad_ratio"} <= set(held_out[0])
    assert all("grad_cosine" not in r["held_out"] for r in without if "held_out" in r)


def test_grad_cosine_needs_a_jepa_term(capsys):
    with pytest.raises(SystemExit):
        train.main(["--method", "diffusion", "--grad-cosine", "4"])
    assert "--grad-cosine" in capsys.readouterr().err
