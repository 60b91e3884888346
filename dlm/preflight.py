"""
train.py's guards, each one call from the trainer: every refusal in one line naming the flag,
file or rank and what to do, made as early as it can be; never a traceback from deep inside a
library, never lost work.

- `check_start`: before anything loads (flags.parse_args has checked each flag's value), the
  objective and the device (exit 2), the --report-to package, the files and folders the flags
  name, --out (never over an input, writable) and whether the model can fit in the memory that
  is free; `check_embed_layer` once the model's blocks are known.
- `opening_warnings`: what is said before training starts: a held-out set of few distinct
  rows, --resume auto finding nothing, a resume with changed settings.
- `check_loaded`: once the model and data are loaded, every rank holds the same run (a
  fingerprint of flags, rows and tensors), a micro-batch fits, every rank gets held-out rows.
- `out_of_memory_in_one_line`: an out-of-memory error as one line naming the flag to lower.
- `check_bad_steps`, `check_weights_finite`, `check_some_step_applied`: too many non-finite
  steps in a row stop the run, as does a step that left non-finite weights; a run whose every
  step was skipped exports nothing.
- `load_resumable`: a checkpoint loaded only if this run can continue it (check_resume: the
  same objective, model and number of processes; other changes only warn).
- `prepare_output`: what a kill left in --out cleared and the log cut to the resumed step, so
  a resumed run logs as an uninterrupted one; config.json and held_out.jsonl written whole.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import tiny_model
from dllm_jepa import METHODS, check
from dlm import bounds, checkpoints, data, files, flags, sharding, tracking
from dlm.backbones import new_tiny_backbone

# -----------------------------------------------------------------------------
# Before anything loads: flags, paths, --out, sizes


def check_start(parser, args):
    """Every refusal that needs no model (flags.parse_args has checked each value): a bad flag
    exits 2 with argparse's usage line; bad files, a missing --report-to package or a model that
    cannot fit exit 1 with 'error: ...'."""
    check_settings(parser, args)
    with files.in_one_line():
        tracking.check_installed(args.report_to)
        check_paths(args)
        check_fits(args)  # a model that cannot fit is refused before it is allocated


def check_settings(parser, args):
    """What the flags' values alone cannot say (exit 2 with argparse's usage line): the device
    and the objective's own checks."""
    try:
        cuda = sharding.pick_device(args.device) == "cuda"
        check(args.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is visible; "
              "use --device cpu")
        check(cuda or not args.cpu_offload, "--cpu-offload: needs a CUDA device (it offloads GPU parameters to CPU)")
        check(not args.grad_cosine or METHODS[args.method]["target_pass"],
              f"--grad-cosine: --method {args.method} has no JEPA term to compare; use dllm-jepa or two-pass")
        flags.objective(vars(args))  # the objective's own checks
    except ValueError as e:  # name the flag, not the dataclass field
        parser.error(re.sub(r"(?<![\w-])([a-z]+(?:_[a-z]+)*)=", lambda m: f"--{m[1].replace('_', '-')}=", str(e)))
    bounds.check(parser, args)  # overflows and typos: --lr 1e300, --tiny-layers 1000000000, ...


def check_paths(args):
    """Check the files and folders the flags name, before anything loads (ValueError)."""
    if args.model is not None:  # a local folder (not a hub id "org/name") must be a save_pretrained one
        problem = checkpoints.model_folder_problem(args.model)
        check(problem is None, problem)
    for flag in ("data", "eval_data"):
        source = getattr(args, flag)
        if source not in (None, "builtin") and (Path(source).suffix in data.FILE_TYPES or Path(source).exists()):
            check(Path(source).is_file(), f"--{flag.replace('_', '-')} {source}: "
                  + ("not a file" if Path(source).exists() else "no such file"))
            check(Path(source).suffix in data.FILE_TYPES, f"--{flag.replace('_', '-')} {source}: unsupported file "
                  f"type; use {', '.join(data.FILE_TYPES)}")
    if args.resume not in (None, "auto"):
        try:
            checkpoints.check_checkpoint(Path(args.resume))
        except ValueError as e:
            raise ValueError(f"--resume {e}") from None
    check_output(args)
    if args.resume == "auto":  # a damaged latest checkpoint is refused, not passed over
        checkpoints.check_latest(Path(args.out) / "checkpoints")
    out = Path(args.out)
    check(not out.exists() or out.is_dir(), f"--out {out}: is a file, not a folder")
    done = checkpoints.checkpoint_dirs(out / "checkpoints")
    check(args.resume or not done, f"--out {out}: already holds checkpoints (latest {done[-1].name if done else ''}); "
          "add --resume auto to continue that run, or give a new --out")


def check_output(args):
    """--out never touches an input and can be written (ValueError, one line naming the flags):
    it must not be, contain or lie inside --model, --data, --eval-data or --resume's checkpoint
    and run (continuing that run in place, --out being the run, is fine), nor a model folder or
    another run's checkpoint; no file may stand where its folders go, and the nearest existing
    folder must accept a new file (a probe, removed). Nothing is created."""
    files.check_name(args.out, "--out")  # first, the flag as given: '' is refused, not read as '.'
    out = Path(args.out)
    inputs = [("--model", args.model if args.model and Path(args.model).expanduser().exists() else None)]
    inputs += [(f"--{flag.replace('_', '-')}", getattr(args, flag)) for flag in ("data", "eval_data")
               if getattr(args, flag) not in (None, "builtin") and Path(getattr(args, flag)).exists()]
    if args.resume not in (None, "auto"):
        resume = Path(args.resume)
        run = resume.parent.parent if resume.parent.name == "checkpoints" else None
        if run is None or files.real_path(out) != files.real_path(run):  # else: continued in place
            inputs += [("--resume", resume)] + ([("the run of --resume", run)] if run is not None else [])
    problem = files.output_overlap(out, "--out", inputs) or checkpoints.inside_other_files(out, "--out")
    check(problem is None, problem)
    files.check_writable(out, "--out")
    for name in ("checkpoints", "final"):  # folders the run makes in --out
        check(not (out / name).exists() or (out / name).is_dir(), f"--out {out}: {out / name} is a file, not a "
              "folder; move it aside or give another --out")
    for name in ("log.jsonl", "config.json", "held_out.jsonl"):  # files the run writes there
        check(not (out / name).is_dir(), f"--out {out}: {out / name} is a folder, not a file; move it aside "
              "or give another --out")
    if (out / "checkpoints").is_dir():
        files.check_writable(out / "checkpoints", "--out")

# -----------------------------------------------------------------------------
# Sizes that cannot fit: one line before allocating


ACTIVATION_BYTES = 96  # per token x width x block, fp32, for backward: measured 116-177 on the tiny model (a lower bound)


def processes() -> tuple[int, int, int]:
    """(local rank, world size, processes on this host), from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return int(os.environ.get("LOCAL_RANK", 0)), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def model_shape(args) -> tuple[int, int, int, int] | None:
    """(parameters, width, blocks, vocabulary) of the model to train, without allocating: the new
    tiny model built on the meta device, a local folder's config.json and safetensors headers;
    None when unknown (a hub id: its out-of-memory error is caught instead)."""
    if args.model is None:
        with torch.device("meta"):
            model = new_tiny_backbone(**tiny_model.shape(args.tiny_width, args.tiny_layers, args.seq_len or 0)).model
        return sum(p.numel() for p in model.parameters()), args.tiny_width, args.tiny_layers, model.config.vocab_size
    folder = Path(args.model).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text())
        width = next(config[k] for k in ("hidden_size", "d_model", "n_embd") if k in config)
        blocks = next(config[k] for k in ("num_hidden_layers", "n_layers", "n_layer") if k in config)
        vocab = next(config[k] for k in ("vocab_size", "embedding_size") if k in config)
        parameters = 0
        for file in folder.glob("*.safetensors"):  # the header: 8 bytes of length, then JSON shapes
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            parameters += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        return (parameters, int(width), int(blocks), int(vocab)) if parameters else None
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None  # load_backbone names what is wrong with the folder


def state_bytes(args, parameters: int, width: int) -> tuple[float, float]:
    """(bytes per parameter of the training state, bytes of the full weights and frozen copies
    rank 0 holds before sharding): fp32 master weights, gradients and two AdamW moments, plus
    an EMA target or anchor copy; a LoRA base only its frozen weights."""
    copies = (flags.objective(vars(args)).target_kind == "ema") + bool(METHODS[args.method]["anchor"])
    per_layer = (2 * args.predictor_mult + 4 * (args.predictor == "transformer")) * width * width  # MLP (+ attention)
    predictor = args.predictor_depth * per_layer if METHODS[args.method]["target_pass"] else 0
    if getattr(args, "lora_rank", 0):
        weight = 2 if args.dtype == "bfloat16" else 4
        return weight + 16 * predictor / parameters, weight * parameters
    return 16 + 4 * copies + 16 * predictor / parameters, 4 * (1 + copies) * parameters


def check_fits(args):
    """Before anything loads: the model's weights, gradients, AdamW moments and EMA copy must fit
    in the memory that is free (a lower bound, so a refusal is certain to be right); ValueError
    naming the flag to lower: the flags that dominate the estimate (dominant_flags: a predictor
    of a billion layers is --predictor-depth's doing, not --tiny-width's), else the model's size."""
    shape = model_shape(args)
    if shape is None:
        return
    parameters, width, blocks, vocab = shape
    local_rank, world, local_world = processes()
    per_parameter, start_up = state_bytes(args, parameters, width)
    cuda = sharding.pick_device(args.device) == "cuda"
    host = start_up if cuda else max(start_up, per_parameter * parameters * local_world / world)
    needs = [(host, "cpu")] + ([(per_parameter * parameters / world, torch.device("cuda", local_rank))]
                               if cuda and not args.cpu_offload else [])
    for needed, device in needs:
        free, where = files.available_memory(device)
        if free and needed > free:
            if culprits := dominant_flags(args):
                flag, fix = culprits[0], f"lower {' or '.join(culprits)}"
            elif args.model is None:
                flag, fix = f"--tiny-width {args.tiny_width}", "lower --tiny-width (or --tiny-layers)"
            else:
                flag, fix = f"--model {args.model}", ("train it on more processes (torchrun: FSDP shards it), with "
                                                      "--cpu-offload on a GPU, with LoRA (--lora-rank), or choose a "
                                                      "smaller --model")
            raise ValueError(f"{flag}: the model has {parameters:,} parameters ({blocks} blocks of width {width}); "
                             f"training needs at least {files.human(needed)} for its weights, gradients, "
                             f"AdamW moments and EMA/anchor copies, more than the {files.human(free)} free in "
                             f"{where}: {fix}")


def activation_problem(args, shape, rows, env) -> str | None:
    """After the data loaded, before the first forward: a micro-batch's activations (lower bound:
    --batch-size x canvas x width x blocks x ACTIVATION_BYTES, the canvas being --seq-len or, for
    a random/batch canvas, the median row) and logits, plus the training state still to be
    allocated, against the memory free now; the line names --batch-size, or None if it fits."""
    if shape is None:
        return None
    parameters, width, blocks, vocab = shape
    _, world, local_world = processes()
    lengths = (rows.prompt_lengths + rows.answer_lengths).float()
    canvas = args.seq_len if args.canvas == "fixed" else min(args.seq_len, int(lengths.median()))
    per_block = ACTIVATION_BYTES * (2 if args.method == "two-pass" else 1) * (0.5 if args.dtype == "bfloat16" else 1)
    held_blocks = 1 + 4 / per_block * (blocks - 1) if args.activation_checkpointing else blocks
    per_row = canvas * (width * held_blocks * per_block + vocab * 8)
    per_parameter, _ = state_bytes(args, parameters, width)
    later = (per_parameter - 4) * parameters / world + (0 if env.is_main else 4 * parameters / world)
    free, where = files.available_memory(env.device)
    if env.device.type == "cpu":
        free //= local_world  # the processes on this host share its memory
    needed = args.batch_size * per_row + later
    if not free or needed <= free:
        return None
    fits = int(max(0, free - later) // per_row)
    return (f"--batch-size {args.batch_size}: a micro-batch of {args.batch_size} rows x {canvas} tokens needs at least "
            f"{files.human(args.batch_size * per_row)} of activations and logits (width {width}, {blocks} "
            f"blocks), plus {files.human(later)} of training state still to allocate: more than the "
            f"{files.human(free)} free in {where}; lower --batch-size to about {fits} or less"
            + (" (it would not fit even at 1: lower --seq-len)" if fits < 1 else
               " (--grad-accum keeps the global batch" + (")" if args.activation_checkpointing
                                                          else "; --activation-checkpointing stores less)")))

MEMORY_FLAGS = ("tiny_width", "tiny_layers", "seq_len", "batch_size", "grad_accum", "predictor_depth", "predictor_mult",
                "lora_rank")


def memory_estimate(args) -> float | None:
    """Bytes a run of these flags needs at least, None when the model's shape is unknown: the
    training state (check_fits), LoRA's adapters (about 12 x width inputs and outputs per block
    and rank, each 16 bytes of training state and 4 of EMA adapter), a micro-batch's activations,
    logits and one attention score matrix per block (activation_problem's, canvas --seq-len), and
    the global batch's row indices (data.batch_rows: a few int64 tensors of that length)."""
    shape = model_shape(args)
    if shape is None:
        return None
    parameters, width, blocks, vocab = shape
    per_parameter, _ = state_bytes(args, parameters, width)
    canvas = args.seq_len or 32  # the built-in task's
    adapters = 20 * 12 * width * blocks * (getattr(args, "lora_rank", 0) or 0)
    per_row = canvas * (width * blocks * ACTIVATION_BYTES + vocab * 8 + 4 * canvas * blocks)
    return per_parameter * parameters + adapters + args.batch_size * per_row + 32 * args.batch_size * args.grad_accum


def dominant_flags(args) -> list[str]:
    """The flags (at most two, largest first, as '--flag value') above their defaults that,
    set back to them, would at least halve memory_estimate: what an out-of-memory line names.
    Empty when none does (the model or the machine is the cause)."""
    total = memory_estimate(args)
    if not total:
        return []
    _, defaults = flags.parse_args([])
    shrink = {}
    for name in MEMORY_FLAGS:
        value, default = getattr(args, name, None), 32 if name == "seq_len" else getattr(defaults, name)
        if value is None or value <= default or (name.startswith("tiny_") and args.model is not None):
            continue
        smaller = memory_estimate(argparse.Namespace(**vars(args) | {name: default}))
        if smaller and total / smaller >= 2:
            shrink[name] = total / smaller
    return [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in sorted(shrink, key=shrink.get)[::-1][:2]]


# -----------------------------------------------------------------------------
# Once loaded: every rank holds the same run


def run_fingerprint(args, model, train_rows, eval_rows) -> dict:
    """What every rank must hold alike: {part: (hash, summary)}."""
    rows = lambda r: (fingerprint_of(r.input_ids, r.prompt_lengths, r.answer_lengths),
                      f"{len(r.input_ids)} rows")
    parameters = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    settings = json.dumps(vars(args), sort_keys=True, default=str)
    return {"settings": (fingerprint_of(settings), "flags hash " + fingerprint_of(settings)),
            "training rows": rows(train_rows), "held-out rows": rows(eval_rows),
            "model": (fingerprint_of(parameters), f"{len(parameters)} tensors, "
                      f"{sum(math.prod(s) for _, s in parameters):,} parameters")}


def check_same_run(fingerprint: dict, env: sharding.Env):
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


def check_embed_layer(backbone, layer: int):
    """--embed-layer names a hidden state of the loaded model (ValueError)."""
    n_blocks = len(backbone.family.blocks(backbone.model))
    check(-n_blocks - 1 <= layer <= n_blocks, f"--embed-layer {layer}: the model has {n_blocks} blocks, so hidden "
          f"states 0..{n_blocks} (or {-n_blocks - 1}..-1)")


def check_loaded(settings, model, train_rows, eval_rows, env):
    """Every rank holds the same run (flags, tokenised rows, parameter names and shapes), a
    micro-batch fits and every rank has held-out rows, else every rank stops with the same line
    (SystemExit); a --seq-len past the model's positions is a warning."""
    try:
        if env.world_size > 1:  # hashing every row costs seconds on a large set: only when ranks must agree
            check_same_run(run_fingerprint(settings, model, train_rows, eval_rows), env)
        error = activation_problem(settings, model_shape(settings), train_rows, env)
    except ValueError as e:
        error = str(e)
    if error := sharding.agreed_error(error and f"error: {error}", env):
        sharding.leave(env)
        raise SystemExit(error)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if env.is_main and max_positions and settings.seq_len > max_positions:
        print(f"warning: --seq-len {settings.seq_len} exceeds the model's max_position_embeddings {max_positions}")
    if len(eval_rows.input_ids) < env.world_size:
        raise SystemExit(f"error: {len(eval_rows.input_ids)} held-out rows for {env.world_size} processes; "
                         "give more data or a larger --eval-fraction")


FEW_HELD_OUT = 32  # distinct held-out rows below which the held-out figures describe a handful of examples


def opening_warnings(settings, eval_rows, checkpoint: Path | None, changed: list[str]) -> list[str]:
    """What the run says under its config before the first step: a held-out set too small to
    read, --resume auto finding nothing, a resume with settings changed (check_resume)."""
    lines = held_out_warnings(eval_rows, settings)
    if settings.resume == "auto" and checkpoint is None:
        lines.append(f"note: --resume auto: no checkpoint in {Path(settings.out) / 'checkpoints'}; starting fresh")
    if changed:
        lines.append(f"warning: resuming with changed settings ({'; '.join(changed)}): the run will not "
                     "reproduce an uninterrupted one")
    return lines


def held_out_warnings(eval_rows, settings) -> list[str]:
    """A warning when the held-out set has fewer than FEW_HELD_OUT distinct rows: its loss and
    embedding_rank (at most the number of rows) then say little about the model."""
    distinct = len(torch.unique(eval_rows.input_ids, dim=0))
    if distinct >= FEW_HELD_OUT:
        return []
    fix = ("give a larger --eval-fraction or more data" if settings.eval_data is None
           else f"give more rows in --eval-data {settings.eval_data}")
    return [f"warning: the held-out set has {distinct} distinct rows (fewer than {FEW_HELD_OUT}): its loss is noisy "
            f"and its embedding_rank cannot exceed {distinct}, whatever the model learns; {fix}"]

# -----------------------------------------------------------------------------
# Out of memory, in one line


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


@contextlib.contextmanager
def out_of_memory_in_one_line(args):
    """An out-of-memory error inside (torch.OutOfMemoryError, the CPU allocator's RuntimeError,
    MemoryError) as one line naming the flag to lower: the flags that dominate the memory
    estimate (dominant_flags) when some are far above their defaults; else --batch-size when it
    struck in a forward or backward pass, else the model's size."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, (MemoryError, torch.OutOfMemoryError))
                or any(text in str(e).lower() for text in OUT_OF_MEMORY)):
            raise
        frames = {frame.f_code.co_name for frame, _ in traceback.walk_tb(e.__traceback__)}
        text = " ".join(str(e).split())
        what = re.search(r"CUDA out of memory|out of memory|can't allocate memory", text)
        tried = re.search(r"[Tt]ried to allocate ([\d.]+) ?(bytes|[KMGT]i?B)", text)
        size = tried and (files.human(int(tried[1])) if tried[2] == "bytes" else f"{tried[1]} {tried[2]}")
        detail = (what[0] if what else type(e).__name__) + (f", tried to allocate {size}" if size else "")
        if culprits := dominant_flags(args):
            fix = f"lower {' or '.join(culprits)} (the largest part of the memory this run needs)"
        elif frames & {"forward", "backward", "_engine_run_backward", "held_out_eval", "held_out_answers"}:
            fix = (f"lower --batch-size {args.batch_size} (--grad-accum keeps the global batch), or --seq-len"
                   + (f" {args.seq_len}" if args.seq_len else "")
                   + ("" if args.activation_checkpointing else ", or add --activation-checkpointing"))
        else:
            fix = (f"lower --tiny-width {args.tiny_width} (or --tiny-layers)" if args.model is None else
                   f"--model {args.model} does not fit: use more processes, --cpu-offload, LoRA or a smaller model")
        raise SystemExit(f"error: out of memory ({detail}): {fix}") from None

# -----------------------------------------------------------------------------
# Resuming: what a checkpoint allows, and --out as an uninterrupted run left it


def check_resume(saved: dict, current: dict) -> list[str]:
    """Compare a checkpoint's run config with this run's. A different objective, model or
    number of processes cannot continue it (ValueError); other changes are allowed and
    returned as warnings: the run goes on but no longer reproduces an uninterrupted one."""
    saved, current = (json.loads(json.dumps(c, default=str)) for c in (saved, current))  # tuples == lists
    saved["args"] = {"lora_rank": 0, "lora_dropout": 0.0} | saved["args"]  # a run from before LoRA had none
    saved["objective"] = {"target_view": "heavier", "predictor": "mlp", "predictor_init": "identity"} | saved["objective"]
    diff = lambda a, b, keys: [f"{k} {a.get(k)} -> {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    fatal = (diff(saved["objective"], current["objective"], current["objective"])
             + diff(saved, current, ("world_size", "model_family", "model_parameters"))
             + diff(saved["args"], current["args"],
                    ("model",) + (("tiny_width", "tiny_layers") if current["args"]["model"] is None else ()))
             # LoRA: rank and targets shape the adapters' tensors, alpha their scale; the frozen base
             # is stored in --dtype
             + diff(saved["args"], current["args"],
                    ("lora_rank", "lora_alpha", "lora_targets") + (("dtype",) if current["args"].get("lora_rank") else ())))
    if fatal:
        raise ValueError(f"the checkpoint's run had other settings ({'; '.join(fatal)}); resume with "
                         "its settings (its config.json) and as many processes, or start a new --out")
    return diff(saved["args"], current["args"], ("data", "eval_data", "split", "eval_fraction", "seq_len",
                                                 "builtin_size", "batch_size", "grad_accum", "lr", "steps",
                                                 "warmup_steps", "min_lr_ratio", "weight_decay",
                                                 "grad_clip", "seed", "dtype", "lora_dropout"))


def trim_log(path: Path, step: int):
    """Resuming at `step`: drop log rows of later steps (lost work that is redone) and a line
    cut by a kill, so the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) < step or (row.get("step") == step and "loss" in row):
            rows.append(files.strict_json(row) + "\n")  # an older log's bare NaN as "NaN"
    files.atomic_write_text(path, "".join(rows))  # a kill here leaves the old log or the new


def load_resumable(checkpoint: Path, run_config: dict, model, optimizer, env: sharding.Env, steps: int):
    """The checkpoint loaded into model and optimizer (predictor, EMA target, RNG), if this run can
    continue it (check_resume), -> (its extra state: step, skipped; the settings changed since).
    A checkpoint this run cannot continue, or one past --steps, stops it in one line."""
    try:  # checkpoints' errors name the checkpoint; check_resume's do not
        saved = checkpoints.checkpoint_extra(checkpoint)["config"]
        try:
            changed = check_resume(saved, run_config)
        except ValueError as e:
            raise ValueError(f"{checkpoint}: {e}") from None
        extra = checkpoints.load_checkpoint(checkpoint, model, optimizer, env)
    except ValueError as e:
        raise SystemExit(f"error: --resume {e}") from None
    if extra["step"] > steps:
        raise SystemExit(f"error: --resume {checkpoint}: the checkpoint is at step {extra['step']}, past "
                         f"--steps {steps}; raise --steps to train on")
    return extra, changed


def prepare_output(out: Path, resume: Path | None, step: int, run_config: dict, eval_examples, env: sharding.Env):
    """Rank 0 lays out --out: clears what a kill left while saving, cuts the log at the resumed
    `step` (later checkpoints set aside, nothing deleted; a fresh start drops an old log), writes
    config.json and the held-out examples (held_out.jsonl, for evaluate.py --task exact), each
    file whole or not at all. A failure stops every rank with its line, none left at a barrier."""
    error = None
    if env.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            checkpoints.remove_unfinished(out / "checkpoints")
            if resume:
                trim_log(out / "log.jsonl", step)
                for path in checkpoints.set_aside_later(out / "checkpoints", step):
                    print(f"note: {path.name} is past the resumed step {step}: moved to {path}")
            else:
                (out / "log.jsonl").unlink(missing_ok=True)
            files.atomic_write_text(out / "config.json", files.metadata_json(run_config))
            if eval_examples:
                files.atomic_write_text(out / "held_out.jsonl", "".join(
                    json.dumps(data.chat_row(ex.prompt, ex.answer)) + "\n" for ex in eval_examples))
        except (ValueError, OSError) as e:
            error = f"error: {e}"
    if error := sharding.agreed_error(error, env):
        raise SystemExit(error)


def check_bad_steps(in_a_row: int, step: int, max_bad_steps: int):
    """Stop after max_bad_steps non-finite steps in a row (each skipped, the weights untouched)."""
    if in_a_row >= max_bad_steps:
        raise SystemExit(f"error: {in_a_row} non-finite steps in a row (steps {step - in_a_row + 1}-{step}), each "
                         "skipped: stopping. Lower --lr or --grad-clip, check the data, or raise --max-bad-steps; "
                         "the checkpoints hold the weights from before")


def check_weights_finite(model, step: int):
    """After an optimizer step whose loss and gradients were finite: AdamW's update itself can
    overflow (--weight-decay 1e300 scales every weight by 1 - lr x 1e300). Stop, every rank with
    the same line, before an evaluation, a checkpoint or the export reads such weights."""
    shards = [p.to_local() if hasattr(p, "to_local") else p for p in model.trainable_parameters()]  # this rank's
    bad = torch.stack([~torch.isfinite(shard).all() for shard in shards]).sum().float()  # tensors with a NaN or inf
    if sharding.all_reduce_sum(bad).item():
        raise SystemExit(f"error: step {step} left non-finite weights although its loss and gradients were finite "
                         "(the optimizer's update overflowed): lower --lr or --weight-decay; the checkpoints hold "
                         "the weights from before")


def check_some_step_applied(skipped: int, steps: int):
    """Refuse to export a model no step has changed: every step non-finite and skipped."""
    if skipped >= steps:
        raise SystemExit(f"error: all {steps} steps were non-finite and skipped: the model is not "
                         "fine-tuned, so nothing is exported; lower --lr, --jepa-lambda or --anchor-mu, or check "
                         "the data (log.jsonl holds each step's loss)")
