"""
Checkpoints and export for train.py: written whole or not at all, sealed, checked on load.

- Checkpoints: `torch.distributed.checkpoint` (each rank writes its shards) into
  step_XXXXXXXX.tmp, sealed with manifest.json (every file's size and sha256; each rank
  hashes the files it wrote, rank 0 writes it last), renamed to step_XXXXXXXX once complete,
  so a kill never leaves a half-written latest checkpoint. Loading compares the files with the
  manifest first (bit rot, a bad copy: one line naming the file and the other checkpoints);
  a checkpoint without its manifest is refused (its files cannot be checked). The last `keep` are kept; a pruned one
  is renamed step_XXXXXXXX.deleting before its files go, so a kill mid-deletion never leaves a
  complete-looking half; .tmp and .deleting folders a kill left behind are never loaded and are
  removed when the next run starts; resuming an earlier step moves the later ones into
  checkpoints/abandoned/. A failed write (a full disk) on any rank stops all with one
  ValueError line: the path, the space needed and free, the last complete checkpoint.
- Export: the online backbone gathered to rank 0 and written with save_pretrained into
  final.tmp, renamed final once complete, so `from_pretrained` loads it in one process; in
  the dtype asked for (train.py: the loaded checkpoint's), config.json saying which, with a
  transform of the state (LoRA: the adapter merged in) and files added before the rename.
- Folders other runs own (a model folder, a run's checkpoints), which no output may enter.
"""

import hashlib
import json
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule

from dlm import backbones, files, lora, sharding

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


def check_latest(root: Path):
    """--resume auto: raise ValueError (one line) if the newest step_XXXXXXXX folder under root is
    not a complete, intact checkpoint. Saves are renamed into place only once whole, so such a
    folder is damage (a bad copy, a deletion, bit rot), never a kill's leftover: continuing from an
    older checkpoint, or from step 0 over the log, would pass over it without a word."""
    found = checkpoint_dirs(root)
    if not found:
        return
    try:
        check_checkpoint(found[-1])
    except ValueError as e:
        before = next((str(p) for p in reversed(found[:-1]) if is_complete(p)), None)
        raise ValueError(f"--resume auto: {e}" + (f"; or continue from the one before it: --resume {before}"
                                                  if before else "; move it aside to start again")) from None


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
        raise ValueError(f"{path}: {'not a folder' if path.exists() else 'no such checkpoint folder'}")
    missing = [name for name in (".metadata", "extra_rank0.pt") if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path}: an incomplete checkpoint (no {', '.join(missing)}); give a "
                         "complete step_XXXXXXXX folder or --resume auto")
    if problem := manifest_problem(path, read_manifest(path)):
        raise ValueError(damaged(path, problem))


def read_manifest(path: Path) -> dict[str, tuple[int, str]]:
    """The manifest as {file: (bytes, sha256)}. ValueError (one line) when it is missing: every
    save seals its checkpoint, so a folder without one lost it (a partial copy, a deletion) and
    a changed byte in a shard could no longer be told from the bytes written."""
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"{path}: a checkpoint without its {MANIFEST} (each save writes one, so it was lost in a "
                         f"copy or deleted), whose files cannot be checked: copy its {MANIFEST} from where the "
                         f"checkpoint came from, or move it aside and {resume_hint(path)}")
    try:
        return {name: (int(entry["bytes"]), str(entry["sha256"]))
                for name, entry in json.loads(file.read_text())["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(damaged(path, f"{MANIFEST}: unreadable ({type(e).__name__})")) from None


def manifest_problem(path: Path, manifest: dict, hashed=()) -> str | None:
    """The first way the folder differs from its manifest, as 'file: what is wrong' (None: it
    matches): a missing file, one the write did not make, another size, or (for the files named
    in `hashed`; reading them all is the costly part) other bytes."""
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
    return f"{path}: an unreadable checkpoint ({files.cause(error)}); move it aside and {resume_hint(path)}"


def resume_hint(path: Path) -> str:
    """Where to resume from instead of `path`: the other complete checkpoints beside it."""
    others = [p.name for p in checkpoint_dirs(path.parent) if p != path and is_complete(p)]
    if not others:
        return f"resume from an older step_XXXXXXXX (there is no other in {path.parent})"
    return f"resume from another in {path.parent} ({', '.join(others)}; --resume auto takes the newest)"


def attempt(write, env: sharding.Env) -> str | None:
    """Run this rank's part of a write; its failure as one line (None: it succeeded), for
    sharding.agreed_error, so every rank stops together instead of waiting at a barrier for one that failed."""
    try:
        write()
    except WRITE_ERRORS as e:
        return f"rank {env.rank}: {files.cause(e)}" if env.world_size > 1 else files.cause(e)
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


def save_checkpoint(root: Path, step: int, model, optimizer, extra: dict, keep: int, env: sharding.Env):
    """Write model (with predictor, EMA target, anchor) and optimizer shards and each rank's extra
    state into step_X.tmp, seal it with the manifest, then rename it step_X and prune the oldest.

    A kill leaves a .tmp folder, never a half-written step_X. A failed write on any rank (a full
    disk) stops every rank with the same ValueError line, after the .tmp folder is removed."""
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    error = sharding.agreed_error(attempt(lambda: fresh_folder(tmp), env) if env.is_main else None, env)
    if not error:
        error = sharding.agreed_error(attempt(lambda: write_state(tmp, state, extra, env), env), env)
    if not error:
        error = seal(tmp, env)
    if not error and env.is_main:
        error = attempt(lambda: replace_folder(tmp, final), env)
    if error := sharding.agreed_error(error, env):
        message = None
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            message = write_failed(final, "the checkpoint", error, tensor_bytes(state) * env.world_size, root)
        raise ValueError(sharding.agreed_error(message, env))
    if env.is_main:
        for old in [path for path in checkpoint_dirs(root) if path != final][:1 - keep or None]:
            discard(old)  # the keep - 1 newest others stay, and this one
    dist.barrier()
    return final


def fresh_folder(path: Path):
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def write_state(tmp: Path, state: dict, extra: dict, env: sharding.Env):
    """This rank's files: its dcp shard (dcp fsyncs it; rank 0 also writes .metadata) and its
    extra state (RNG; dropout's random state on a GPU), flushed to disk before the rename."""
    dcp.save(state, checkpoint_id=str(tmp))
    extra_file = tmp / f"extra_rank{env.rank}.pt"
    torch.save({"rng": torch.get_rng_state(), **extra,
                "cuda_rng": torch.cuda.get_rng_state() if env.device.type == "cuda" else None}, extra_file)
    files.fsync(extra_file)


def seal(folder: Path, env: sharding.Env) -> str | None:
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
        sealed = {name: entry for entries, _ in gathered for name, entry in sorted(entries.items())}
        return attempt(lambda: files.write_synced(folder / MANIFEST, json.dumps(
            {"format": 1, "files": dict(sorted(sealed.items()))}, indent=1) + "\n"), env)
    return None


def verify_checkpoint(path: Path, env: sharding.Env):
    """Raise ValueError, the same line on every rank, if a file differs from the manifest
    (missing, not in it, another size, other bytes: bit rot, a bad copy) or the manifest is
    missing. Each rank hashes the files its rank wrote."""
    try:
        manifest = read_manifest(path)
        mine = [name for name in manifest if owner(name, env.world_size) == env.rank]
        problem = manifest_problem(path, manifest, hashed=mine)
        error = problem and damaged(path, problem)
    except ValueError as e:
        error = str(e)
    except OSError as e:
        error = unreadable(path, e)
    if error := sharding.agreed_error(error, env):
        raise ValueError(error)


def load_checkpoint(path: Path, model, optimizer, env: sharding.Env) -> dict:
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
    files.fsync(final.parent)
    shutil.rmtree(doomed, ignore_errors=True)

# -----------------------------------------------------------------------------
# Export: final/, in one process's save_pretrained layout


def export_model(model, backbone, final: Path, flags, run_config: dict,
                 env: sharding.Env) -> tuple[torch.dtype, str | None]:
    """train.py's final/: the fine-tuned backbone of DLLMJEPA `model` and its tokenizer (a
    backbones.Backbone's), save_pretrained into `final` (export_pretrained: whole or not at all)
    -> (its dtype, the auto_map entry of remote_fixes/ its code loads with, or None). In the
    loaded checkpoint's dtype unless --export-dtype (LLaDA/Dream: bf16, 16 GB for 8B, not 32);
    with LoRA the adapter merged in (a plain model, no peft needed), and with --export-adapter
    the adapter alone too, in final/adapter. flags: model, export_dtype, export_adapter, lora_rank."""
    export_dtype = ((backbone.saved_dtype or torch.float32) if flags.export_dtype == "auto"
                    else getattr(torch, flags.export_dtype))
    adapter = lora.adapter_state(model.backbone) if flags.export_adapter else None  # every rank gathers it
    if flags.model is not None and Path(flags.model).expanduser().is_dir():  # the adapter names its base by
        model.backbone.name_or_path = str(Path(flags.model).expanduser().resolve())  # a path valid anywhere
    load_code = []

    def finish(folder):  # rank 0, inside final.tmp
        load_code.append(backbones.install_remote_fixes(folder, backbone.family))
        if adapter is not None:
            lora.save_adapter(model.backbone, folder / "adapter", state=adapter)
            (folder / "adapter" / "training_config.json").write_text(files.metadata_json(run_config))
    export_pretrained(model.backbone, backbone.tokenizer, final, env, run_config, dtype=export_dtype, finish=finish,
                      transform=(lambda state: lora.merged_state(model.backbone, state)) if flags.lora_rank else None)
    return export_dtype, load_code[0] if load_code else None


def how_to_load(final: Path, dtype: torch.dtype, remote_code: str | None, family: str, flags) -> str:
    """train.py's closing lines on final/: its dtype, how to load it, where the checkpoints and
    the adapter (--export-adapter) are. flags: lora_rank, export_adapter."""
    how = ("`import tiny_model; AutoModel.from_pretrained(path)`" if family == "tiny-dlm" else
           "`AutoModel.from_pretrained(path, trust_remote_code=True)`" if remote_code else
           "`backbones.load_backbone(path).model`")  # remote code this repo's fixes do not cover
    lines = [f"fine-tuned model: {final} ({str(dtype).removeprefix('torch.')}"
             f"{', LoRA adapter merged in' if flags.lora_rank else ''}; load with {how}, or "
             f"`backbones.load_backbone(path)` for the model and its tokenizer); resumable checkpoints: "
             f"{final.parent / 'checkpoints'}"]
    if flags.export_adapter:
        lines.append(f"adapter alone: {final / 'adapter'} (peft: PeftModel.from_pretrained(base, path); "
                     f"evaluate.py --model {final / 'adapter'}, or --model BASE --adapter {final / 'adapter'})")
    return "\n".join(lines)


def as_shipped(backbone, final: Path, export_dtype: torch.dtype, lora_rank: int, dtype: str,
               device: torch.device):
    """The model whose held-out answers train.py reports: the one in memory when final/ holds its
    weights bit for bit (an fp32 export of full fine-tuning); otherwise final/ read back as
    `evaluate.py --model final --dtype DTYPE` reads it (bf16-rounded weights, or LoRA merged in,
    give other answers than the model in memory) -> (a Backbone, what the closing line says)."""
    if export_dtype == torch.float32 and not lora_rank:
        return backbone, ""
    shipped = backbones.load_backbone(str(final), getattr(torch, dtype))
    shipped.model.to(device)
    return shipped, f" (answered by {final} as saved: evaluate.py --model {final} --dtype {dtype} gives the same)"


def export_pretrained(backbone, tokenizer, out_dir: Path, env: sharding.Env, metadata: dict,
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
    for key in sharding.aliased_keys(backbone):  # save a module registered twice once: tie_weights re-ties on load
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
    if message := sharding.agreed_error(message, env):
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
    (folder / "training_config.json").write_text(files.metadata_json(metadata))
    if finish is not None:
        finish(folder)
    for file in folder.rglob("*"):
        if file.is_file():
            files.fsync(file)


def write_failed(path: Path, what: str, error: str, needed: int, checkpoints: Path) -> str:
    """One line for a write that failed (a full disk): what, why, the space it needs and the
    space left, and the checkpoint to resume from once there is room."""
    free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    latest = latest_checkpoint(checkpoints)
    then = (f"the last complete checkpoint is {latest}: free some space, then --resume auto continues from it"
            if latest else f"there is no complete checkpoint in {checkpoints} yet: free some space and start again")
    return (f"{path}: could not write {what} ({error}); it needs about {files.human(needed)}, {files.human(free)} "
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

# -----------------------------------------------------------------------------
# Folders other runs own


def model_folder_problem(model: str, flag: str = "--model") -> str | None:
    """One line if `model` names a local folder (it exists, starts with '.', '/' or '~', or has
    more '/' than a hub id 'org/name') that is not a save_pretrained one; None for a good folder
    or a hub id."""
    path = Path(model).expanduser()
    if not (path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1):
        return None
    if not path.is_dir():
        return f"{flag} {model}: no such folder (nor a hub id 'org/name')"
    if not (path / "config.json").is_file():
        return (f"{flag} {model}: the folder has no config.json; give a save_pretrained folder (a run's final/) "
                "or a hub id")
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
    where = files.real_path(out)
    for folder in (where, *where.parents):
        what = ("the model folder" if is_model_folder(folder) else
                "the checkpoint folder" if is_checkpoint_folder(folder) else None)
        if what:
            return (f"{out_flag} {out}: {'is' if folder == where else 'lies inside'} {what} {folder}; "
                    f"writing there would damage it: give an {out_flag} outside it")
    return None
