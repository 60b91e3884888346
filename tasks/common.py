"""
What the tasks share: the item to answer (a chat prompt and a reference answer), few-shot
turns, fitting a prompt into the model's positions, exact match (the metric LLM-JEPA, Huang et
al., 2025, reports for NL-RX and Django and the `exact` task's), and how the batches of a task are split across processes under torchrun (Shard, map_batches).
"""

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm


@dataclass
class Item:
    prompt: list              # chat messages before the answer, as data.Example.prompt
    reference: str            # the gold answer text
    db_id: str | None = None  # Spider: the database the query runs on


def non_empty(examples: list, path: Path) -> list:
    """An empty evaluation set would score 0 (or crash later) without saying why."""
    if not examples:
        raise ValueError(f"{path}: holds no examples")
    return examples


def with_shots(items: list[Item], exemplars: list[Item], shots: int) -> list[Item]:
    """Few-shot prompting for chat models: the first `shots` exemplars become earlier turns
    of the conversation (user question, assistant answer), then the real question."""
    turns = []
    for ex in exemplars[:shots]:
        turns += [m for m in ex.prompt if m["role"] != "system"]
        turns.append({"role": "assistant", "content": ex.reference})
    out = []
    for item in items:
        system = [m for m in item.prompt if m["role"] == "system"]
        rest = [m for m in item.prompt if m["role"] != "system"]
        out.append(Item(system + turns + rest, item.reference, item.db_id))
    return out


def exact_match(prediction: str, reference: str) -> bool:
    """LLM-JEPA's metric for NL-RX and Django: string equality after stripping the outer
    whitespace (it strips its generations; we strip both sides, which matters for Django
    lines that keep their indentation)."""
    return prediction.strip() == reference.strip()


def fit_prompt(ids: list[int], budget: int) -> list[int]:
    """Keep a prompt's last `budget` tokens (its end holds the question and the assistant tag)."""
    return ids[len(ids) - budget:] if len(ids) > budget else ids  # not ids[-budget:]: -0 keeps all


def max_positions(model) -> int | None:
    """How many positions the model takes (its config's limit), None when the config names none."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "max_sequence_length", None)


# -----------------------------------------------------------------------------
# Several processes (torchrun): each computes a share of the batches, all get every result


@dataclass(frozen=True)
class Shard:
    """Which share of a task's batches this process computes (rank r of `world` takes batches
    r, r + world, r + 2 world, ...), and whether it shows the progress bar (rank 0 only)."""
    rank: int = 0
    world: int = 1
    progress: bool = False  # a tqdm bar on stderr (shown on rank 0 alone)


@contextlib.contextmanager
def progress_bar(shard: Shard, total: int, desc: str):
    """advance(k): k of this rank's items are done. Rank 0's bar counts its own items times
    the world size (the ranks run at one pace; capped at the total): an estimate under
    torchrun, the exact count in one process. tqdm's rate is the items/s of all ranks."""
    if not (shard.progress and shard.rank == 0):
        yield lambda k: None
        return
    with tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True) as bar:
        yield lambda k: bar.update(min(k * shard.world, total - bar.n))


def map_batches(work: Callable[[int, int], object], n: int, batch_size: int, shard: Shard = Shard(),
                desc: str = "", same_forwards: bool = False) -> list:
    """[work(start, stop) for each batch of range(n)], computed across processes: the batches
    are exactly one process's (same rows, same padding, same masks or seeds, which work derives
    from `start`), rank r computes every world-th of them, and every rank gets all results, in
    batch order (torch.distributed.all_gather_object), so scores computed from them equal one
    process's bit for bit. same_forwards: a rank with one batch fewer runs the first batch again
    (its result dropped), so that every rank runs the same forwards, as a model sharded with
    FSDP needs (train.py)."""
    starts = range(0, n, batch_size)
    mine = starts[shard.rank::shard.world]
    rounds = -(-len(starts) // shard.world) if same_forwards else len(mine)
    results = {}
    with progress_bar(shard, n, desc) as advance:
        for i in range(rounds):
            if i < len(mine):
                stop = min(mine[i] + batch_size, n)
                results[mine[i]] = work(mine[i], stop)
                advance(stop - mine[i])
            else:
                work(0, min(batch_size, n))
    if shard.world > 1:
        parts = [None] * shard.world
        torch.distributed.all_gather_object(parts, results)
        results = {start: result for part in parts for start, result in part.items()}
    return [results[start] for start in starts]
