"""
Distributed plumbing for train.py: one code path from a laptop CPU to a GPU cluster.

- Process group: NCCL on CUDA, gloo on CPU; a one-process group when not under torchrun,
  so world size 1 runs the very same sharded code (torchtitan's rule).
- FSDP2 (`fully_shard`) on each transformer block, then on the root, for the online
  backbone and for each frozen copy (EMA target, L2 anchor); activation checkpointing is
  applied before sharding; optional bf16 mixed precision (fp32 reduction) and CPU offload.
- Start-up: only rank 0 holds the weights; the other ranks build the model on the meta
  device and receive their shards from it (`materialize`): one full copy per node, not one
  per process. They wait for rank 0's loading on a gloo group with a 2-hour timeout (NCCL's
  default is 10 minutes), and a loading error on any rank stops all with its line.
- Checkpoints: `torch.distributed.checkpoint` (each rank writes its shards) into
  step_XXXXXXXX.tmp, renamed to step_XXXXXXXX once complete, so a kill never leaves a
  half-written latest checkpoint; the last `keep` are kept; .tmp folders a kill left behind
  are never loaded and are removed when the next run starts; resuming an earlier step moves
  the later ones into checkpoints/abandoned/.
- Export: the online backbone gathered to rank 0 and written with save_pretrained, so
  `from_pretrained` loads it in one process.
"""

import os
import re
import pickle
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


# Rank 0 reads the weights (perhaps downloading them first) while the other ranks only build
# shapes; they wait for it on a gloo group with this timeout, not on NCCL's default 10 minutes.
START_UP_TIMEOUT = timedelta(hours=2)


@dataclass
class Env:
    rank: int
    world_size: int
    device: torch.device
    start_up: dist.ProcessGroup  # gloo, START_UP_TIMEOUT: where ranks wait for rank 0's loading

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Env:
    """Join torchrun's process group, or make a one-process group on the spot."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():  # a second run in the same process (tests, notebooks)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group(backend)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        local_rank = 0
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Env(dist.get_rank(), dist.get_world_size(),
               torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
               dist.new_group(backend="gloo", timeout=START_UP_TIMEOUT))


def agreed_error(error: str | None, env: Env) -> str | None:
    """Wait for every rank; return the first error any rank met (None if none), so that all
    stop together with the same line, none left waiting for a rank that has exited."""
    errors = [None] * env.world_size
    dist.all_gather_object(errors, error, group=env.start_up)
    return next(filter(None, errors), None)


def checkpoint_activations(block: torch.nn.Module):
    """Recompute the block's activations in backward instead of storing them. The block's
    forward is wrapped in place, so parameter names (and save_pretrained files) are unchanged."""
    inner = block.forward
    block.forward = lambda *args, **kwargs: checkpoint(inner, *args, use_reentrant=False, **kwargs)


def shard_model(model, blocks_of, param_dtype=None, cpu_offload=False, activation_checkpointing=False):
    """fully_shard every block, then each root: backbone, EMA target, anchor, then the whole.

    Frozen copies never run backward, so they reshard right after their forward (otherwise
    their roots would keep full parameters gathered until the next step).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs = dict(mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else None)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for module in (model.backbone, model.target_encoder, model.anchor):
        if module is None:
            continue
        frozen = module is not model.backbone
        for block in blocks_of(module):
            if activation_checkpointing and not frozen:
                checkpoint_activations(block)
            fully_shard(block, **kwargs)
        fully_shard(module, reshard_after_forward=True, **kwargs)
    fully_shard(model, **kwargs)  # the predictor's parameters live in this root group
    return model


def weights_to_send(model) -> dict:
    """Rank 0's weights to send (take them before sharding): the state dict without the
    second name of a module registered twice (LLaDA's `ff_out` is its `wte` when weight_tying),
    which set_model_state_dict neither expects nor fills."""
    aliases = aliased_keys(model)
    return {key: value for key, value in model.state_dict().items() if key not in aliases}


def aliased_keys(model) -> set[str]:
    modules = dict(model.named_modules())  # each module once, under its first name
    return {key for key in model.state_dict(keep_vars=True) if key.rpartition(".")[0] not in modules}


def materialize(model, full_state: dict | None, env: Env, cpu_offload: bool = False):
    """After shard_model, give every rank its shards of rank 0's weights.

    Rank 0 built the model with weights (`full_state`: weights_to_send(model), taken before
    sharding, which keeps the full tensors alive until they are sent); the other ranks built
    the same modules on the meta device. So a node holds one full copy of the weights at
    start-up, not one per process. Rank 0 sends each tensor in turn; each rank keeps its shard.
    """
    if env.world_size == 1:
        if not cpu_offload:
            model.to(env.device)  # after sharding: only this rank's shards move
        return
    # plain attributes that name a buffer (Dream's rotary original_inv_freq) must follow it
    buffer_attributes = [(module, attribute, name) for module in model.modules()
                         for name, buffer in module.named_buffers(recurse=False)
                         for attribute, value in vars(module).items() if value is buffer]
    if env.is_main:
        if not cpu_offload:
            model.to(env.device)
    else:  # allocate (uninitialised) shards and buffers; their values come from rank 0
        model.to_empty(device="cpu" if cpu_offload else env.device)
    check_same_tensors(model, full_state, env)
    set_model_state_dict(model, full_state if env.is_main else {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=False))  # strict: aliases get nothing
    for module in model.modules():  # non-persistent buffers (rotary tables) are in no state dict
        for name, buffer in module.named_buffers(recurse=False):
            buffer = buffer.to(env.device)  # the process group's device (CPU offload leaves them on CPU)
            dist.broadcast(buffer, src=0)
            setattr(module, name, buffer)
    for module, attribute, name in buffer_attributes:
        setattr(module, attribute, getattr(module, name))


def check_same_tensors(model, full_state: dict | None, env: Env):
    """Every rank must expect exactly the tensors rank 0 sends: set_model_state_dict with
    strict=False would leave one it was not sent as to_empty's uninitialised memory. Raises
    on every rank together."""
    spec = lambda state: {key: (tuple(value.shape), value.dtype) for key, value in state.items()}
    sent = [spec(full_state) if env.is_main else None]
    dist.broadcast_object_list(sent, src=0, group=env.start_up)
    aliases = aliased_keys(model)
    here = {key: value for key, value in spec(model.state_dict()).items() if key not in aliases}
    differ = sorted(key for key in sent[0].keys() | here.keys() if sent[0].get(key) != here.get(key))
    first = differ[0] if differ else None
    if error := agreed_error(differ and (f"{first}: rank 0 sends {sent[0].get(first, 'nothing')}, rank {env.rank} "
                                         f"expects {here.get(first, 'nothing')} ({len(differ)} tensors differ)"), env):
        raise RuntimeError(error)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().clone()
    dist.all_reduce(values)
    return values


def agreed_signal(signum: int, device) -> int:
    """The largest signal number any rank caught (0: none), so that all ranks stop after the
    same step even when the signal reaches them at different moments."""
    value = torch.tensor(signum, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def barrier():
    dist.barrier()

# -----------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (a .tmp folder is an unfinished write)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"step_\d{8}", p.name))


def check_checkpoint(path: Path):
    """Raise ValueError (one line, with what to do) unless `path` is a complete checkpoint."""
    latest = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
    if latest is not None:  # a run folder or its checkpoints/ folder
        raise ValueError(f"{path}: is not a checkpoint but holds some; give one (latest: {latest}) "
                         "or --resume auto with --out set to the run")
    if path.name.endswith(".tmp"):
        raise ValueError(f"{path}: an unfinished write (the run was killed while saving); give a "
                         "step_XXXXXXXX folder or --resume auto")
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint folder")
    missing = [name for name in (".metadata", "extra_rank0.pt") if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path}: an incomplete checkpoint (no {', '.join(missing)}); give a "
                         "complete step_XXXXXXXX folder or --resume auto")


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    for path in reversed(checkpoint_dirs(root)):
        if (path / ".metadata").is_file() and (path / "extra_rank0.pt").is_file():
            return path
    return None


def set_aside_later(root: Path, step: int) -> list[Path]:
    """Resuming at `step` (rank 0): move checkpoints of later steps, from the run being redone,
    into root/abandoned/ so that --resume auto and pruning never pick them up; nothing is
    deleted. Returns their new paths."""
    later = [path for path in checkpoint_dirs(root) if int(path.name[5:]) > step]
    folder = root / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
    if later:
        folder.mkdir(parents=True, exist_ok=True)
    return [path.rename(folder / path.name) for path in later]


def remove_unfinished(root: Path):
    """Delete the .tmp folders of checkpoint writes that a kill interrupted (rank 0)."""
    for path in root.glob("step_*.tmp") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_extra(path: Path, rank: int = 0) -> dict:
    """A checkpoint's small per-rank state: step, RNG, run config."""
    extra_file = path / f"extra_rank{rank}.pt"
    if not extra_file.exists():
        raise ValueError(f"{path}: has no {extra_file.name}; it was written by a run with a "
                         "different number of processes (resume with the same world size)")
    try:
        return torch.load(extra_file, weights_only=False)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise ValueError(unreadable(path, e)) from None


def unreadable(path: Path, error: BaseException) -> str:
    """One line for a checkpoint that exists but cannot be read (truncated, overwritten)."""
    if isinstance(error, CheckpointException):  # dcp wraps each rank's error as (error, stack)
        failure = next(iter(error.failures.values()), (error,))
        error = failure[0] if isinstance(failure, tuple) else failure
    detail = (str(error).splitlines() or [""])[0]
    return (f"{path}: an unreadable checkpoint ({type(error).__name__}{': ' + detail if detail else ''}); "
            "move it aside and resume from an older step_XXXXXXXX")


def save_checkpoint(root: Path, step: int, model, optimizer, extra: dict, keep: int, env: Env):
    """Write model (with predictor, EMA target, anchor) and optimizer shards, then rename."""
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save({"rng": torch.get_rng_state(), **extra,
                "cuda_rng": torch.cuda.get_rng_state() if env.device.type == "cuda" else None},
               tmp / f"extra_rank{env.rank}.pt")
    dist.barrier()
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: readers see a complete checkpoint or none
        for old in [path for path in checkpoint_dirs(root) if path != final][:1 - keep or None]:
            shutil.rmtree(old, ignore_errors=True)  # the keep - 1 newest others stay, and this one
    dist.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, env: Env) -> dict:
    """Restore shards in place; returns the rank's extra state (step, rng, ...)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, CheckpointException) as e:
        raise ValueError(unreadable(path, e)) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra = checkpoint_extra(path, env.rank)
    torch.set_rng_state(extra.pop("rng"))
    cuda_rng = extra.pop("cuda_rng", None)  # dropout's random state on a GPU (masks use their own generators)
    if cuda_rng is not None and env.device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng)
    return extra


def export_pretrained(backbone, tokenizer, out_dir: Path, env: Env, metadata: dict):
    """Gather the online backbone's full weights on rank 0 and save_pretrained them (into a
    .tmp folder renamed once complete, as checkpoints are)."""
    state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    for key in aliased_keys(backbone):  # save a module registered twice once: tie_weights re-ties on load
        state.pop(key, None)
    if env.is_main:
        final, out_dir = out_dir, out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        # fully_shard swapped the class for a generated FSDP<Name>; save_pretrained would record
        # that class (and torch's files) as the remote code to load, so save as the original.
        sharded_class = type(backbone)
        backbone.__class__ = next(c for c in sharded_class.__bases__ if c is not FSDPModule)
        try:
            backbone.save_pretrained(out_dir, state_dict=state)
        finally:
            backbone.__class__ = sharded_class
        tokenizer.save_pretrained(out_dir)
        (out_dir / "training_config.json").write_text(metadata_json(metadata))
        shutil.rmtree(final, ignore_errors=True)
        out_dir.rename(final)
    dist.barrier()


def metadata_json(metadata: dict) -> str:
    import json
    return json.dumps(metadata, indent=2, default=str) + "\n"
