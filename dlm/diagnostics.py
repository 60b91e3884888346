"""
Why the JEPA term helps or hurts the task: does its gradient point with the diffusion loss's?

`gradient_cosines` accumulates, over several fixed batches, the gradient of the diffusion loss
and the gradient of lambda x JEPA on the backbone's trainable parameters, separately, and
returns their cosine, overall and per block, and the ratio of their norms. A negative cosine
means the JEPA term pulls the weights against what the task asks; a large norm ratio means it
dominates the update (and the shared gradient clip). One batch is too noisy to read: the
cosine of single-batch gradients swings in sign from batch to batch, so the gradients are
summed over `batches` first (train.py --grad-cosine N, at every held-out evaluation:
`held_out_cosines`).

This is the multi-task "gradient conflict" measure (Yu et al., 2020, "Gradient Surgery for
Multi-Task Learning"), applied to the two terms of one objective.
"""

import math

import torch


def block_groups(backbone, blocks) -> dict[str, list[torch.nn.Parameter]]:
    """The backbone's trainable parameters by where they live: "block_0", "block_1", ... and
    "rest" (embeddings, final norm, LM head)."""
    groups, seen = {}, set()
    for i, block in enumerate(blocks):
        groups[f"block_{i}"] = [p for p in block.parameters() if p.requires_grad]
        seen |= {id(p) for p in groups[f"block_{i}"]}
    groups["rest"] = [p for p in backbone.parameters() if p.requires_grad and id(p) not in seen]
    return {name: params for name, params in groups.items() if params}


def cosines(grads_a: dict[str, list[torch.Tensor]], grads_b: dict[str, list[torch.Tensor]],
            all_reduce=lambda t: t) -> dict[str, float]:
    """cos(a, b) per group and over all groups, and |b| / |a| overall. Each group is a list of
    tensors (a rank's shards under FSDP: `all_reduce` sums the dot products and squared norms
    over ranks, so the result is the full gradients')."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    stats = torch.stack([torch.stack([sum((local(a).double() * local(b).double()).sum() for a, b in zip(A, B)),
                                      sum(local(a).double().pow(2).sum() for a in A),
                                      sum(local(b).double().pow(2).sum() for b in B)])
                         for A, B in zip(grads_a.values(), grads_b.values())])  # (groups, 3): a.b, |a|^2, |b|^2
    stats = all_reduce(stats)
    cos = lambda dot, aa, bb: float(dot / (aa * bb).sqrt()) if aa > 0 and bb > 0 else float("nan")
    total = stats.sum(0)
    out = {"grad_cosine": cos(*total), "jepa_grad_ratio": float((total[2] / total[1]).sqrt()) if total[1] > 0
           else float("nan")}
    return out | {f"grad_cosine_{name}": cos(*row) for name, row in zip(grads_a, stats)}


@torch.enable_grad()
def gradient_cosines(model, batches, groups: dict[str, list[torch.nn.Parameter]], all_reduce) -> dict[str, float]:
    """model: a DLLMJEPA with a JEPA term; batches: a function returning a fresh iterable of
    (forward args, generator), the same batches and masks each call; groups: block_groups.
    Two passes over the batches, one backpropagating the diffusion loss, one lambda x JEPA;
    every .grad is None again afterwards (call it between optimizer steps)."""
    summed = {}
    for part in ("diffusion", "jepa"):
        model.zero_grad(set_to_none=True)
        for inputs, generator in batches():
            out = model(*inputs, generator=generator)
            (out.diffusion if part == "diffusion" else model.config.jepa_lambda * out.jepa).backward()
        summed[part] = {name: [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                               for p in params] for name, params in groups.items()}
    model.zero_grad(set_to_none=True)
    return cosines(summed["diffusion"], summed["jepa"], all_reduce)


def held_out_cosines(model, blocks, batch_of, n: int, rank: int, world_size: int, all_reduce) -> dict[str, float]:
    """gradient_cosines over held-out batches batch_of(0..n-1), n rounded up to a multiple of the
    processes, each rank its share. blocks: the backbone's blocks (Family.blocks)."""
    chunks = range(rank, math.ceil(n / world_size) * world_size, world_size)
    return gradient_cosines(model, lambda: (batch_of(c) for c in chunks), block_groups(model.backbone, blocks),
                            all_reduce)
