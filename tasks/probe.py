"""
The held-out diffusion-loss probe (the paper's Wikitext probe): LLaDA's pre-training loss,
estimated on a fixed grid of t with masks drawn from a fixed seed, so every checkpoint is
scored on the very same masked inputs. The same masks score reference answers given their
prompts (answer_scores). Every forward goes through generate.aligned_logits, so
shifted-logit families (Dream) are scored right.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from dllm_jepa import answer_regions, diffusion_loss, mask_probability, masked_logits
from dlm import data
from dlm.sampler import aligned_logits, conventions
from tasks.common import Item, Shard, map_batches, max_positions


@dataclass
class ProbeConfig:
    seq_len: int = 128      # tokens per window of held-out text
    windows: int = 32       # windows scored
    grid: int = 8           # t on the midpoints (k + 1/2) / grid, k < grid
    seed: int = 0           # the masks' seed: the same for every checkpoint
    eps: float = 1e-3       # LLaDA's mask-probability floor
    batch_size: int = 8


def read_text_file(path: Path) -> str:
    """The held-out text of the probe and of drift, read (and its UTF-8 checked) before any
    model loads."""
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    return data.read_text(path)


def probe_masks(shape, config: ProbeConfig):
    """Masks for every grid point, a function of (shape, seed) only: (G, N, T) bool and the
    mask probabilities (G,). Position 0 stays clean, as in data.tokenize_text, so shifted-logit
    backbones always see a real first token and all families score the same positions."""
    t = (torch.arange(config.grid, dtype=torch.float64) + 0.5) / config.grid
    p = mask_probability(t, config.eps)                                              # (G,)
    u = torch.rand((config.grid, *shape), generator=torch.Generator().manual_seed(config.seed),
                   dtype=torch.float64)
    masks = u < p[:, None, None]
    masks[..., 0] = False
    return masks, p.float()


@torch.no_grad()
def masked_loss(backbone, ids: torch.Tensor, scored: torch.Tensor, config: ProbeConfig,
                shard: Shard = Shard(), desc: str = "probe") -> tuple[list, float]:
    """The diffusion loss of rows `ids` (N, T), masking only `scored` positions, at each grid
    t -> a list (G,), and the share of masked tokens whose argmax is right over all of them.
    Per row: CE on the masked tokens / p, summed, / the row's scored count (LLaDA's
    per-sequence normalisation); rows averaged. The masks are probe_masks': a function of
    (shape, seed), identical for every checkpoint, and drawn whole on every process, so a row
    gets the same masks whichever process scores it. Under torchrun (shard) each process scores
    a share of the batches (map_batches) and the per-batch sums are added in batch order on every
    process: the very numbers one process computes."""
    model, device = backbone.model.eval(), next(backbone.model.parameters()).device
    masks, p = probe_masks(ids.shape, config)

    def batch(start, stop):  # per grid point: the batch's summed row losses; argmax hits, masked count
        x, score = ids[start:stop].to(device), scored[start:stop].to(device)
        sums, right, total_masked = [], 0, 0
        for g in range(config.grid):
            masked = masks[g, start:stop].to(device) & score
            logits = aligned_logits(model, torch.where(masked, backbone.mask_token_id, x), **conventions(backbone))
            loss = diffusion_loss(logits, x, masked, p[g].expand(len(x)).to(device), score, "answer")
            sums.append(loss.item() * len(x))
            right += int((masked_logits(logits, masked).argmax(-1) == x[masked]).sum())
            total_masked += int(masked.sum())
        return sums, right, total_masked

    parts = map_batches(batch, len(ids), config.batch_size, shard, desc)
    per_t = []
    for g in range(config.grid):
        total = 0.0
        for sums, _, _ in parts:  # in batch order, as one process adds them
            total += sums[g]
        per_t.append(total / len(ids))
    right, total_masked = sum(part[1] for part in parts), sum(part[2] for part in parts)
    return per_t, right / max(total_masked, 1)


def grid_points(config: ProbeConfig) -> list[float]:
    return [(k + 0.5) / config.grid for k in range(config.grid)]


def diffusion_probe(backbone, windows: torch.Tensor, config: ProbeConfig, shard: Shard = Shard(),
                    desc: str = "probe") -> dict:
    """LLaDA's pre-training loss on held-out text windows (N, T), every token but the first
    scored. The mean over the grid is the midpoint rule for the integral over t in (0, 1):
    a deterministic estimate of the negative diffusion ELBO per token."""
    scored = torch.ones(windows.shape, dtype=torch.bool)
    scored[:, 0] = False
    per_t, _ = masked_loss(backbone, windows, scored, config, shard, desc)
    return {"probe_loss": sum(per_t) / len(per_t), "per_t": dict(zip(grid_points(config), per_t)),
            "windows": len(windows), "seq_len": windows.shape[1], "grid": config.grid, "seed": config.seed}


def answer_scores(backbone, items: list[Item], config: ProbeConfig, shard: Shard = Shard()) -> dict:
    """Decoding-free task metrics on the reference answers given their prompts, on fixed
    masks: the diffusion loss (LLaDA's SFT loss, answer tokens and their EOS scored, padding
    not) and the teacher-forced token accuracy (argmax right at a masked answer token, the
    rest of the answer given). They move smoothly even where exact match is still 0."""
    tokenizer = backbone.tokenizer
    examples = [data.Example(item.prompt, item.reference) for item in items]
    longest = max(len(data.prompt_ids(tokenizer, ex.prompt)) + len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
                  for ex in examples) + 1
    rows = data.tokenize_examples(examples, tokenizer, min(longest, max_positions(backbone.model) or longest))
    _, scored = answer_regions(rows.prompt_lengths, rows.answer_lengths, rows.input_ids.shape[1], pad_is_answer=False)
    per_t, accuracy = masked_loss(backbone, rows.input_ids, scored, config, shard, "answer loss")
    return {"answer_loss": sum(per_t) / len(per_t), "answer_accuracy": accuracy}
