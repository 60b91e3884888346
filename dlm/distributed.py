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
  step_XXXXXXXX.tmp, sealed with manifest.json (every file's size and sha256; each rank
  hashes the files it wrote, rank 0 writes it last), renamed to step_XXXXXXXX once complete,
  so a kill never leaves a half-written latest checkpoint. Loading compares the files with the
  manifest first (bit rot, a bad copy: one line naming the file and the other checkpoints);
  checkpoints written before manifests load unchecked. The last `keep` are kept; a pruned one
  is renamed step_XXXXXXXX.deleting before its files go, so a kill mid-deletion never leaves a
  complete-looking half; .tmp and .deleting folders a kill left behind are never loaded and are
  removed when the next run starts; resuming an earlier step moves the later ones into
  checkpoints/abandoned/. A failed write (a full disk) on any rank stops all with one
  ValueError line: the path, the space needed and free, the last complete checkpoint.
- Export: the online backbone gathered to rank 0 and written with save_pretrained into
  final.tmp, renamed final once complete, so `from_pretrained` loads it in one process; in
  the dtype asked for (train.py: the loaded checkpoint's), config.json saying which, with a
  transform of the state (LoRA: the adapter merged in) and files added before the rename.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
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


def init_distributed(device: str, timeout: timedelta | None = None) -> Env:
    """Join torchrun's process group, or make a one-process group on the spot. `timeout`: how
    long a collective waits for the other ranks before it fails (torch's default if None), so a
    stopped or hung rank ends the run with an error instead of a hang (see is_timeout)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():  # a second run in the same process (tests, notebooks)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group(backend, **({"timeout": timeout} if timeout else {}))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        local_rank = 0
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Env(dist.get_rank(), dist.get_world_size(),
               torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
               dist.new_group(backend="gloo", timeout=START_UP_TIMEOUT))


def is_timeout(error: BaseException) -> bool:
    """A collective that gave up waiting for another rank (gloo: "Timed out waiting ... for recv";
    NCCL's watchdog: "Watchdog caught collective operation timeout"): the peer stopped, hung or died."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


def exit_on_timeout(env: Env, minutes: float, then: str = ""):
    """After is_timeout: one line naming the rank and the flag, then out at once: the group is
    broken, and tearing it down at exit aborts in gloo's threads (exit -6)."""
    print(f"error: rank {env.rank}: another process did not join a collective within --collective-timeout "
          f"{minutes:g} minutes (stopped, hung or died: see its output){then}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


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
        if module is None or next(module.parameters(), None) is None:
            continue  # absent, or owns no weights (lora.EMAAdapterTarget runs the backbone's blocks)
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
# Checkpoints and export: written to a .tmp folder, sealed with a manifest, renamed when complete

MANIFEST = "manifest.json"  # every other file's size and sha256, written last: the checkpoint's seal
# What a failed write raises from deep inside torch and safetensors: a full disk is an OSError
# (inside dcp's CheckpointException), a RuntimeError from torch.save's zip writer, or a SafetensorError.
WRITE_ERRORS = (OSError, RuntimeError, CheckpointException, SafetensorError)
READ_ERRORS = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, CheckpointException)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoints under root, oldest first (a .tmp folder is an unfinished write, a .deleting
    one a pruned checkpoint whose deletion a kill may have cut short: neither counts)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"step_\d{8}", p.name))


def is_complete(path: Path) -> bool:
    """dcp's .metadata and rank 0's extra state are there (both written before the rename)."""
    return (path / ".metadata").is_file() and (path / "extra_rank0.pt").is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    return next((path for path in reversed(checkpoint_dirs(root)) if is_complete(path)), None)


def check_checkpoint(path: Path):
    """Raise ValueError (one line, with what to do) unless `path` is a complete checkpoint whose
    files have the names and sizes its manifest lists (cheap: no file is read; load_checkpoint
    also compares their bytes)."""
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
    if problem := manifest_problem(path, read_manifest(path)):
        raise ValueError(damaged(path, problem))


def read_manifest(path: Path) -> dict[str, tuple[int, str]] | None:
    """The manifest as {file: (bytes, sha256)}; None for a checkpoint written before manifests
    existed (it loads unchecked, as it always did)."""
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        return {name: (int(entry["bytes"]), str(entry["sha256"]))
                for name, entry in json.loads(file.read_text())["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(damaged(path, f"{MANIFEST}: unreadable ({type(e).__name__})")) from None


def manifest_problem(path: Path, manifest: dict | None, hashed=()) -> str | None:
    """The first way the folder differs from its manifest, as 'file: what is wrong' (None: it
    matches, or there is no manifest): a missing file, one the write did not make, another size,
    or (for the files named in `hashed`; reading them all is the costly part) other bytes."""
    if manifest is None:
        return None
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    problems = (
        [f"{name}: missing (the manifest lists it)" for name in sorted(manifest.keys() - present)]
        + [f"{name}: not in the manifest (the checkpoint's write did not make it)"
           for name in sorted(present - manifest.keys())])
    if problems:
        return problems[0]
    for name in sorted(manifest):
        size, written = (path / name).stat().st_size, manifest[name][0]
        if size != written:
            return f"{name}: {size} bytes, written as {written} ({'truncated' if size < written else 'grown'})"
    for name in sorted(hashed):
        if sha256_of(path / name) != manifest[name][1]:
            return f"{name}: its bytes changed since it was written: their sha256 differs from the manifest's"
    return None


def sha256_of(file: Path) -> str:
    """sha256 of a file, read in 8 MiB pieces (about 2 GB/s: a few seconds per rank's shard)."""
    digest, buffer = hashlib.sha256(), bytearray(8 << 20)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
    return digest.hexdigest()


def owner(name: str, world_size: int) -> int:
    """The rank that hashes a checkpoint file: the one that wrote it (dcp's __<rank>_<i>.distcp,
    extra_rank<rank>.pt), so the work is shared and each rank reads its own bytes (on a save,
    still in its page cache); rank 0 takes the rest (.metadata)."""
    match = re.fullmatch(r"__(\d+)_\d+\.distcp|extra_rank(\d+)\.pt", name)
    return int(match[1] or match[2]) % world_size if match else 0


def damaged(path: Path, problem: str) -> str:
    """One line for a checkpoint whose file `problem` names is not as written."""
    return f"{path}: an unreadable checkpoint ({problem}); move it aside and {resume_hint(path)}"


def unreadable(path: Path, error: BaseException) -> str:
    """One line for a checkpoint that exists but cannot be read (truncated, overwritten)."""
    return f"{path}: an unreadable checkpoint ({cause(error)}); move it aside and {resume_hint(path)}"


def resume_hint(path: Path) -> str:
    """Where to resume from instead of `path`: the other complete checkpoints beside it."""
    others = [p.name for p in checkpoint_dirs(path.parent) if p != path and is_complete(p)]
    if not others:
        return f"resume from an older step_XXXXXXXX (there is no other in {path.parent})"
    return f"resume from another in {path.parent} ({', '.join(others)}; --resume auto takes the newest)"


def cause(error: BaseException) -> str:
    """'Type: first line' of an error, unwrapping dcp's CheckpointException (each failed rank's
    error and stack) to the error underneath, e.g. 'OSError: [Errno 28] No space left on device'."""
    if isinstance(error, CheckpointException):
        failure = next(iter(error.failures.values()), (error,))
        error = failure[0] if isinstance(failure, tuple) else failure
    detail = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}{': ' + detail if detail else ''}"


def attempt(write, env: Env) -> str | None:
    """Run this rank's part of a write; its failure as one line (None: it succeeded), for
    agreed_error, so every rank stops together instead of waiting at a barrier for one that failed."""
    try:
        write()
    except WRITE_ERRORS as e:
        return f"rank {env.rank}: {cause(e)}" if env.world_size > 1 else cause(e)
    return None


def checkpoint_extra(path: Path, rank: int = 0) -> dict:
    """A checkpoint's small per-rank state: step, RNG, run config."""
    extra_file = path / f"extra_rank{rank}.pt"
    if not extra_file.exists():
        raise ValueError(f"{path}: has no {extra_file.name}; it was written by a run with a "
                         "different number of processes (resume with the same world size)")
    try:
        return torch.load(extra_file, weights_only=False)
    except READ_ERRORS as e:
        raise ValueError(unreadable(path, e)) from None


def save_checkpoint(root: Path, step: int, model, optimizer, extra: dict, keep: int, env: Env):
    """Write model (with predictor, EMA target, anchor) and optimizer shards and each rank's extra
    state into step_X.tmp, seal it with the manifest, then rename it step_X and prune the oldest.

    A kill leaves a .tmp folder, never a half-written step_X. A failed write on any rank (a full
    disk) stops every rank with the same ValueError line, after the .tmp folder is removed."""
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    error = agreed_error(attempt(lambda: fresh_folder(tmp), env) if env.is_main else None, env)
    if not error:
        error = agreed_error(attempt(lambda: write_state(tmp, state, extra, env), env), env)
    if not error:
        error = seal(tmp, env)
    if not error and env.is_main:
        error = attempt(lambda: replace_folder(tmp, final), env)
    if error := agreed_error(error, env):
        message = None
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            message = write_failed(final, "the checkpoint", error, tensor_bytes(state) * env.world_size, root)
        raise ValueError(agreed_error(message, env))
    if env.is_main:
        for old in [path for path in checkpoint_dirs(root) if path != final][:1 - keep or None]:
            discard(old)  # the keep - 1 newest others stay, and this one
    dist.barrier()
    return final


def fresh_folder(path: Path):
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def write_state(tmp: Path, state: dict, extra: dict, env: Env):
    """This rank's files: its dcp shard (dcp fsyncs it; rank 0 also writes .metadata) and its
    extra state (RNG; dropout's random state on a GPU), flushed to disk before the rename."""
    dcp.save(state, checkpoint_id=str(tmp))
    extra_file = tmp / f"extra_rank{env.rank}.pt"
    torch.save({"rng": torch.get_rng_state(), **extra,
                "cuda_rng": torch.cuda.get_rng_state() if env.device.type == "cuda" else None}, extra_file)
    fsync(extra_file)


def seal(folder: Path, env: Env) -> str | None:
    """Write the manifest, once every rank has written its files: each rank hashes the files it
    wrote (owner), rank 0 writes the sizes and hashes of all down. Returns a failure line or None."""
    names = [sorted(p.name for p in folder.iterdir()) if env.is_main else None]
    dist.broadcast_object_list(names, src=0, group=env.start_up)
    mine = {}
    error = attempt(lambda: mine.update({name: {"bytes": (folder / name).stat().st_size,
                                                "sha256": sha256_of(folder / name)}
                                         for name in names[0] if owner(name, env.world_size) == env.rank}), env)
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, (mine, error), group=env.start_up)
    if error := next(filter(None, (e for _, e in gathered)), None):
        return error
    if env.is_main:
        files = {name: entry for entries, _ in gathered for name, entry in sorted(entries.items())}
        return attempt(lambda: write_synced(folder / MANIFEST, json.dumps(
            {"format": 1, "files": dict(sorted(files.items()))}, indent=1) + "\n"), env)
    return None


def verify_checkpoint(path: Path, env: Env):
    """Raise ValueError, the same line on every rank, if a file differs from the manifest
    (missing, not in it, another size, other bytes: bit rot, a bad copy). Each rank hashes the
    files its rank wrote. A checkpoint without a manifest (older code) passes."""
    try:
        manifest = read_manifest(path)
        mine = [name for name in manifest or () if owner(name, env.world_size) == env.rank]
        problem = manifest_problem(path, manifest, hashed=mine)
        error = problem and damaged(path, problem)
    except ValueError as e:
        error = str(e)
    except OSError as e:
        error = unreadable(path, e)
    if error := agreed_error(error, env):
        raise ValueError(error)


def load_checkpoint(path: Path, model, optimizer, env: Env) -> dict:
    """Verify the files against the manifest, then restore shards in place; returns the rank's
    extra state (step, rng, ...)."""
    verify_checkpoint(path, env)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except READ_ERRORS as e:
        raise ValueError(unreadable(path, e)) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra = checkpoint_extra(path, env.rank)
    torch.set_rng_state(extra.pop("rng"))
    cuda_rng = extra.pop("cuda_rng", None)  # dropout's random state on a GPU (masks use their own generators)
    if cuda_rng is not None and env.device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng)
    return extra


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
    """Delete what a kill interrupted (rank 0): .tmp folders of checkpoint writes, and .deleting
    folders of pruned checkpoints whose deletion it cut short."""
    for path in [*root.glob("step_*.tmp"), *root.glob("step_*.deleting")] if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def discard(path: Path):
    """Delete a folder, renaming it out of the checkpoint namespace first (to X.deleting), so a
    kill mid-deletion never leaves a half-deleted folder under a name that looks complete."""
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def replace_folder(new: Path, final: Path):
    """Put the complete folder `new` in the place of `final` by renames only: at every moment
    `final` is whole (the old or the new one) or absent, never half-written or half-deleted."""
    doomed = final.with_name(final.name + ".deleting")
    if final.exists():
        shutil.rmtree(doomed, ignore_errors=True)
        final.rename(doomed)
    new.rename(final)
    fsync(final.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def export_pretrained(backbone, tokenizer, out_dir: Path, env: Env, metadata: dict,
                      checkpoints: Path | None = None, transform=None, dtype: torch.dtype | None = None,
                      finish=None):
    """Gather the online backbone's full weights on rank 0 and save_pretrained them into
    out_dir.tmp, renamed to out_dir once complete: a kill or a full disk never leaves a
    half-written out_dir. A failed write stops every rank with one ValueError line naming the
    last complete checkpoint (in `checkpoints`, by default out_dir's sibling checkpoints/).
    transform: full state -> the state to save (lora.merged_state: the adapter merged in).
    dtype: the floating tensors are written in it (None: as they are); config.json says which.
    finish: called on rank 0 with the folder before it is renamed, to add files (an adapter)."""
    state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    for key in aliased_keys(backbone):  # save a module registered twice once: tie_weights re-ties on load
        state.pop(key, None)
    if transform is not None:
        state = transform(state)
    for key, value in state.items() if dtype is not None else ():  # one tensor at a time: no second full copy
        if value.is_floating_point():
            state[key] = value.to(dtype)
    tmp, message = out_dir.with_name(out_dir.name + ".tmp"), None
    if env.is_main:
        error = attempt(lambda: write_pretrained(backbone, tokenizer, state, tmp, metadata, finish), env)
        error = error or attempt(lambda: replace_folder(tmp, out_dir), env)
        if error:
            shutil.rmtree(tmp, ignore_errors=True)
            message = write_failed(out_dir, "the exported model", error, tensor_bytes(state),
                                   checkpoints or out_dir.parent / "checkpoints")
    if message := agreed_error(message, env):
        raise ValueError(message)


def write_pretrained(backbone, tokenizer, state: dict, folder: Path, metadata: dict, finish=None):
    """save_pretrained into a fresh `folder` (rank 0), every file flushed to disk; config.json's
    dtype is the one the weights are written in (save_pretrained records the live model's)."""
    fresh_folder(folder)
    # fully_shard swapped the class for a generated FSDP<Name>; save_pretrained would record
    # that class (and torch's files) as the remote code to load, so save as the original.
    sharded_class = type(backbone)
    backbone.__class__ = next(c for c in sharded_class.__bases__ if c is not FSDPModule)
    dtypes = {value.dtype for value in state.values() if value.is_floating_point()}  # save_pretrained empties state
    try:
        backbone.save_pretrained(folder, state_dict=state)
    finally:
        backbone.__class__ = sharded_class
    if len(dtypes) == 1:
        config = json.loads((folder / "config.json").read_text())
        config.pop("torch_dtype", None)
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(folder)
    (folder / "training_config.json").write_text(metadata_json(metadata))
    if finish is not None:
        finish(folder)
    for file in folder.rglob("*"):
        if file.is_file():
            fsync(file)


def write_failed(path: Path, what: str, error: str, needed: int, checkpoints: Path) -> str:
    """One line for a write that failed (a full disk): what, why, the space it needs and the
    space left, and the checkpoint to resume from once there is room."""
    free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    latest = latest_checkpoint(checkpoints)
    then = (f"the last complete checkpoint is {latest}: free some space, then --resume auto continues from it"
            if latest else f"there is no complete checkpoint in {checkpoints} yet: free some space and start again")
    return (f"{path}: could not write {what} ({error}); it needs about {human(needed)}, {human(free)} "
            f"are free there; the half-written {path.name}.tmp was removed; {then}")


def tensor_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state dict: this rank's shards of sharded ones."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def atomic_write_text(path: Path, text: str):
    """Replace a file's content all at once (config.json, log.jsonl rewritten on resume): write a
    sibling .tmp file, fsync it, os.replace it over `path`, so a reader or a kill sees the old
    content or the new, never a cut one. A failed write (a full disk) leaves the old content and
    raises ValueError with one line."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_synced(tmp, text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(next(p for p in path.parents if p.exists())).free
        raise ValueError(f"{path}: could not write ({cause(e)}); {human(free)} are free there; "
                         "its previous content is unchanged") from None
    fsync(path.parent)


def write_synced(path: Path, text: str):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync(path: Path):
    """Flush a file's bytes (or a folder's entries) to the disk, so that a rename publishing them
    cannot survive a power cut without them. Some filesystems refuse a folder's fsync: harmless."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def metadata_json(metadata: dict) -> str:
    return strict_json(metadata, indent=2) + "\n"  # NaN/inf as strings: valid JSON

# -----------------------------------------------------------------------------
# Before anything loads (issue 15): inputs never written over, outputs writable, ranks holding
# the same run, strict JSON, a second signal that stops a process stuck in a collective


def strict_json(obj, **kwargs) -> str:
    """json.dumps that strict parsers accept: a non-finite float (a skipped step's NaN loss, an
    infinite gradient norm, --grad-clip inf) is written as the string "NaN", "Infinity" or
    "-Infinity" (Python's spelling: float() reads it back), never as bare NaN/Infinity, which
    are not JSON (RFC 8259) and which json.loads(..., parse_constant=...) and JSON.parse refuse."""
    return json.dumps(finite_floats(obj), allow_nan=False, default=str, **kwargs)


def finite_floats(obj):
    """obj with every non-finite float, at any depth of dicts, lists and tuples, as a string."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else "Infinity" if obj > 0 else "-Infinity"
    if isinstance(obj, dict):
        return {key: finite_floats(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_floats(value) for value in obj]
    return obj


def real_path(path) -> Path:
    """The absolute path with links resolved, for comparing two names of one place."""
    return Path(os.path.realpath(Path(path).expanduser()))


def output_overlap(out, out_flag: str, inputs) -> str | None:
    """One line if the output path `out` is, lies inside or contains one of `inputs` ((flag,
    path) pairs; a None path is skipped): writing there would overwrite or mix with an input.
    None if every input lies apart from it."""
    where = real_path(out)
    for flag, path in inputs:
        if path is None:
            continue
        other = real_path(path)
        relation = ("is" if where == other else "lies inside" if other in where.parents
                    else "contains" if where in other.parents else None)
        if relation:
            return (f"{out_flag} {out}: {relation} {flag} {path}; the outputs would be written over "
                    f"or among the inputs: give an {out_flag} apart from them")
    return None


def is_model_folder(path: Path) -> bool:
    """A save_pretrained folder: config.json beside weight files."""
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                             "pytorch_model.bin", "pytorch_model.bin.index.json"))


def is_checkpoint_folder(path: Path) -> bool:
    """A checkpoint (step_XXXXXXXX, also its .tmp/.deleting forms) or a run's checkpoints/ folder."""
    if re.fullmatch(r"step_\d{8}(\.tmp|\.deleting)?", path.name):
        return (path / ".metadata").exists() or (path / MANIFEST).exists() or path.parent.name == "checkpoints"
    return path.name == "checkpoints" and bool(checkpoint_dirs(path))


def inside_other_files(out, out_flag: str) -> str | None:
    """One line if `out` is or lies inside a model folder or a run's checkpoint (files another
    run or another tool owns); None otherwise."""
    where = real_path(out)
    for folder in (where, *where.parents):
        what = ("the model folder" if is_model_folder(folder) else
                "the checkpoint folder" if is_checkpoint_folder(folder) else None)
        if what:
            return (f"{out_flag} {out}: {'is' if folder == where else 'lies inside'} {what} {folder}; "
                    f"writing there would damage it: give an {out_flag} outside it")
    return None


def check_writable(path, flag: str, folder: bool = True):
    """Raise ValueError, one line naming the flag, unless `path` can be written: a folder
    (folder=True) or a file. Nothing is created: the nearest existing folder at or above it must
    be a folder (not a file in the way) that accepts a new file (a probe file is made there and
    removed): a read-only place, a full permission denial or a file in the way is found before
    anything loads, not when the first result is written."""
    path = Path(path).expanduser()
    if os.path.lexists(path):
        if not path.exists():
            raise ValueError(f"{flag} {path}: is a link to nothing; remove it or give another {flag}")
        if folder and not path.is_dir():
            raise ValueError(f"{flag} {path}: is a file, not a folder")
        if not folder and path.is_dir():
            raise ValueError(f"{flag} {path}: is a folder; give a file name (e.g. {path / 'results.json'})")
    start = path if folder else path.parent
    existing = next(p for p in (start, *start.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is {'a link to nothing' if not existing.exists() else 'a file'}"
                         f", so no folder can be made there; give another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {existing} ({cause(e)}); give another {flag}") from None


def check_same_run(fingerprint: dict, env: Env):
    """Every rank compares its fingerprint of the run ({part: (hash, summary)}: settings,
    training rows, held-out rows, model) with rank 0's, on the gloo start-up group, before any
    collective depends on them: ranks that read other data (another file of the same name on
    another node, another row count) would otherwise wait for each other forever. Raises
    ValueError with the same line on every rank."""
    if env.world_size == 1:
        return
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, fingerprint, group=env.start_up)
    first = gathered[0]
    for rank, other in enumerate(gathered):
        differ = [part for part in first if other.get(part) != first[part]]
        if differ:
            details = "; ".join(
                f"{part}: {first[part][1]} on rank 0, {other[part][1]} on rank {rank}"
                if first[part][1] != other[part][1] else f"{part}: same size, other content" for part in differ)
            raise ValueError(f"rank {rank} does not hold the same run as rank 0 ({details}); every process must "
                             "be started with the same flags and read the same data files and model")


def fingerprint_of(*parts) -> str:
    """sha256 (16 hex digits) of tensors, strings and bytes, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = str((tuple(part.shape), part.dtype)).encode() + part.detach().cpu().contiguous().numpy().tobytes()
        digest.update(part if isinstance(part, bytes) else str(part).encode())
    return digest.hexdigest()[:16]


_SIGNAL_WATCH: dict = {}


def stop_on_second_signal(grace_s: float = 3.0):
    """A second SIGTERM or SIGINT ends the process even while it is stuck inside a collective.

    train.py's handler (first signal: finish the step, save, exit; second: die) is Python code,
    which runs only when the main thread comes back to the interpreter: a rank blocked in a
    collective whose peer died or hangs (an orphaned torchrun worker) never does, and ignores
    every SIGTERM. The C-level handler still writes each signal's number to the wakeup fd; a
    thread reading it counts them and, `grace_s` after the second one (time for the handler to
    act if the main thread is free), exits with 128 + the signal number. Started once per
    process (main thread only); each call resets the count."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _SIGNAL_WATCH:
        _SIGNAL_WATCH["count"] = 0
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:  # an event loop (asyncio, a notebook kernel) owns the wakeup fd: leave it to it
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return
    _SIGNAL_WATCH.update(count=0)

    def watch():
        while True:
            number = os.read(read, 1)
            if not number:
                return
            if number[0] not in (signal.SIGTERM, signal.SIGINT):
                continue
            _SIGNAL_WATCH["count"] += 1
            if _SIGNAL_WATCH["count"] >= 2:
                time.sleep(grace_s)
                print(f"signal {number[0]} again: stopping now, inside a collective that cannot complete "
                      "(the last complete checkpoint stays intact)", file=sys.stderr, flush=True)
                os._exit(128 + number[0])

    threading.Thread(target=watch, name="second-signal", daemon=True).start()


def available_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes free, where) on a CUDA device (torch.cuda.mem_get_info) or in host memory (the
    smaller of /proc/meminfo's MemAvailable and a cgroup's limit less its usage); (0, '') if
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"GPU {device.index or 0}"
    free = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            free.append(int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    return (min(free), "host memory") if free else (0, "")


def leave(env: Env):
    """Before a rank exits on an error every rank agreed on: take the process group down in
    order (gloo's threads joined, rank 0's store closed), so the exit is the error line alone,
    not a C++ 'terminate called' abort from threads destroyed at interpreter exit."""
    if env.world_size > 1 and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier(group=env.start_up)  # no rank closes the store while another still talks to it
            dist.destroy_process_group()
