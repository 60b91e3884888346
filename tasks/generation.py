"""
Task metrics on generated answers: each item answered by the LLaDA sampler (dlm/sampler.py) and
scored by its task's metrics (tasks/__init__.py), following the protocol of LLM-JEPA (Huang et
al., 2025) that the paper compares with; also the decoding-free scores of the reference
answers (tasks/probe.py).
"""

import time
from dataclasses import asdict
from pathlib import Path

import torch

from dlm import data
from dlm.sampler import SamplerConfig, check_room, generate_text, sampler_for
from tasks import score_answers
from tasks.common import Item, Shard, exact_match, fit_prompt, map_batches, max_positions
from tasks.probe import ProbeConfig, answer_scores


def canvas_for(backbone, items: list[Item], sampler_args: dict, trained: int | None) -> SamplerConfig:
    """sampler.sampler_for with the longest of the items' chat prompts."""
    longest = max(len(data.prompt_ids(backbone.tokenizer, item.prompt)) for item in items)
    return sampler_for(longest, sampler_args, trained)


def generate_sharded(backbone, prompts: list, sampler: SamplerConfig, batch_size: int, rank: int = 0,
                     world_size: int = 1, seed: int = 0, progress: bool = False, desc: str = "generating") -> list[str]:
    """generate_text over several processes (tasks.common.map_batches): the batches are one
    process's, rank r answers every world_size-th of them, every rank returns all answers in
    order: the same answers as one process. Each batch draws from its own generator, seeded
    seed + 1000003 x its index (the first batch: `seed`, as generate_text's), so that its
    answers do not depend on which rank samples it (temperature > 0, random remasking). Every
    rank runs the same forwards (a rank with one batch fewer answers the first again), as
    train.py's FSDP-sharded model needs. progress: rank 0's bar."""
    def answer(start, stop):
        return generate_text(backbone, prompts[start:stop], sampler, batch_size,
                             seed + 1_000_003 * (start // batch_size))  # batch 0: generate_text's
    shard = Shard(rank, world_size, progress)
    return [a for batch in map_batches(answer, len(prompts), batch_size, shard, desc, same_forwards=True)
            for a in batch]


def evaluate_generation(backbone, task: str, items: list[Item], sampler: SamplerConfig,
                        batch_size=8, seed=0, spider_db: Path | None = None,
                        probe: ProbeConfig | None = None, shard: Shard = Shard()) -> dict:
    """Generate an answer to every item and score it; also the diffusion loss of the
    reference answers and their teacher-forced token accuracy (answer_scores, on probe's grid
    and seed). Returns metrics, answers, and tokens_per_s: the canvas positions of all answers
    (items x gen_length) over the wall-clock of their generation, all processes together.
    Under torchrun (shard), each process answers a share and every process returns it all."""
    tokenizer = backbone.tokenizer
    prompts = [data.prompt_ids(tokenizer, item.prompt) for item in items]
    limit = max_positions(backbone.model)
    cut = 0
    if limit is not None:
        check_room(sampler.gen_length, limit)
        cut = sum(len(p) > limit - sampler.gen_length for p in prompts)
        prompts = [fit_prompt(p, limit - sampler.gen_length) for p in prompts]
    if shard.world > 1:
        torch.distributed.barrier()  # the clock starts when every process does
    start = time.perf_counter()
    answers = generate_sharded(backbone, prompts, sampler, batch_size, shard.rank, shard.world, seed,
                               shard.progress, f"{task}: generating")
    seconds = time.perf_counter() - start
    metrics = score_answers(task, items, answers, spider_db)
    metrics |= answer_scores(backbone, items, probe or ProbeConfig(batch_size=batch_size), shard)
    return {"task": task, "n": len(items), **metrics, "prompts_cut": cut, "sampler": asdict(sampler),
            "generation_s": seconds, "tokens_per_s": len(items) * sampler.gen_length / max(seconds, 1e-9),
            "answers": [{"prediction": a, "reference": i.reference} for a, i in zip(answers, items)]}


def held_out_answers(backbone, examples: list[data.Example], seq_len: int, batch_size: int, rank: int = 0,
                     world_size: int = 1) -> dict:
    """train.py's last stage: the held-out examples answered with the sampler and scored by exact
    match, what the model can do, which the loss does not show. The canvas is the longest one
    trained (seq_len): each prompt is followed by seq_len minus the longest prompt masks, one
    block, one token per step (canvas_for, evaluate.py's default for this model). Every rank
    answers an equal share (FSDP runs every forward on all ranks)."""
    try:
        sampler = canvas_for(backbone, examples, {"gen_length": None, "block_length": None}, seq_len)
    except ValueError as e:
        return {"skipped": str(e)}
    prompts = [data.prompt_ids(backbone.tokenizer, ex.prompt) for ex in examples]
    answers = generate_sharded(backbone, prompts, sampler, batch_size, rank, world_size)
    right = [exact_match(a, ex.answer) for a, ex in zip(answers, examples)]
    return {"exact_match": sum(right) / len(right), "n": len(right), "gen_length": sampler.gen_length,
            "samples": [{"prompt": ex.prompt[-1]["content"], "answer": a, "reference": ex.answer, "right": r}
                        for ex, a, r in zip(examples, answers, right)]}
