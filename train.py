"""
Fine-tune a masked-diffusion LM with DLLM-JEPA (or a baseline) from the command line.

    python train.py                                   # tiny model, built-in task, CPU, ~3 min
    python train.py --method diffusion                # the baseline, same everything else
    python train.py --data my.csv --epochs 3          # your own rows (README.md: Bring your own data)
    torchrun --nproc_per_node 8 train.py --model GSAI-ML/LLaDA-8B-Instruct \
        --data train.jsonl --epochs 2 --dtype bfloat16 --activation-checkpointing
    python train.py --model GSAI-ML/LLaDA-8B-Instruct --lora-rank 32 --data train.jsonl \
        --epochs 2 --dtype bfloat16 --activation-checkpointing   # LoRA, one GPU (dlm/lora.py)

One code path: the model is always sharded by FSDP2 (a one-process group when not under
torchrun), so the run that teaches on a laptop is the run that shards LLaDA-8B. main() reads
top to bottom, as I-JEPA's and torchtitan's trainers do:
  flags     parsed and checked before torch loads; the defaults that depend on the model and
            the data (--seq-len, the steps of --epochs) settled once (settle)
  load      --model (weights on rank 0 only), the data, a new tiny model sized to it, LoRA, the rows
  build     DLLMJEPA around it, sharded, rank 0's weights sent to every rank, AdamW
  open_run  a checkpoint continued (--resume) or a fresh start; --out laid out, config.json
  train     the steps (below), held-out evaluations, checkpoints; a signal saves and stops
  export    final/ (save_pretrained), the held-out questions answered, the closing lines
Each step, as in I-JEPA's train loop: 1. target view forward, no grad and 2. context view
forward, diffusion + JEPA loss (both inside DLLMJEPA.forward); 3. backward (accumulated), clip,
AdamW; 4. EMA update of the target encoder. Every guard is one call into dlm/preflight.py.
--out holds config.json, log.jsonl, checkpoints/ (resumable) and final/, which loads with
`AutoModel.from_pretrained` (`import tiny_model` first for the tiny model) or
`backbones.load_backbone`.
"""

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

from dlm import flags

if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch and transformers load (seconds)
    flags.parse_args()

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

import tiny_model
from dllm_jepa import DLLMJEPA, JEPAConfig, effective_rank
from dlm import checkpoints, data, diagnostics, files, lora, preflight, sharding, tracking
from dlm.backbones import FAMILIES, Backbone, load_backbone, new_tiny_backbone
from dlm.hub import Corpus, read_corpus
from tasks.common import max_positions
from tasks.generation import held_out_answers

# -----------------------------------------------------------------------------
# Flags (dlm/flags.py: parse_args), settled once


def settle(args: argparse.Namespace, family: str, corpus: Corpus, positions: int | None = None, blocks: int = 4,
           world_size: int = 1) -> argparse.Namespace:
    """The flags with every default that depends on others, on the model or on the data settled:
    what config.json records and everything after reads; `args` stays as parsed. family: the
    model's (backbones.Family.name), whose layers LoRA adapts by default; corpus: the data read
    (hub.Corpus), whose longest row sets --seq-len (at most the model's `positions`; None: a new
    tiny model, sized to it) and whose training rows set the steps of --epochs; blocks: the
    model's, whose middle one --embed-layer reads by default."""
    user_rows = corpus.kind == "examples"  # the user's prompt/answer rows (not the built-in task, not plain text)
    seq_len = args.seq_len or (min(corpus.longest, positions or corpus.longest) if user_rows else 32)
    steps = args.steps
    if steps is None and (args.epochs is not None or user_rows):  # one epoch unless told
        steps = corpus.epoch_steps(args.epochs or 1, args.batch_size * args.grad_accum * world_size, seq_len,
                                   args.eval_fraction, args.seed)
    steps = steps or 2000
    return argparse.Namespace(**vars(args) | dict(
        seq_len=seq_len, steps=steps, epochs=args.epochs or (1 if user_rows and args.steps is None else None),
        embed_layer=(blocks + 1) // 2 if args.embed_layer is None else args.embed_layer,  # the middle block
        loss_weight=args.loss_weight or ("flat" if args.model is None else "inverse-t"),
        lr=args.lr or (1e-3 if args.model is None else 1e-4 if args.lora_rank else 1e-5),
        warmup_steps=min(30, steps // 10) if args.warmup_steps is None else args.warmup_steps,
        final_eval=dict(builtin=200, examples=50, text=0)[corpus.kind] if args.final_eval is None else args.final_eval,
    ) | lora.settled(args.lora_rank, args.lora_alpha, args.lora_targets, family))  # alpha, targets

# -----------------------------------------------------------------------------
# load, build, open_run


@dataclasses.dataclass
class Loaded:
    """What load() returns: the settled flags, the model and the rows."""
    settings: argparse.Namespace
    backbone: Backbone
    rows: tuple           # (training rows, held-out rows, held-out examples: None for plain text)
    notes: list[str]      # what was skipped, cut, chosen: printed after the config
    cut: int              # rows cut to --seq-len, repeated in the closing lines


def load(args, env) -> Loaded:
    """--model (weights on rank 0 only), the data read at full length, the flags settled, a new
    tiny model sized to --seq-len, LoRA's adapters when asked, the rows cut at --seq-len. Every
    rank waits for rank 0's loading, so a bad file, name or row stops all with its one line;
    then they check they hold the same run."""
    error = loaded = None
    try:  # bad files, names or rows: one line that says what and where, no traceback
        backbone = load_model(args, env) if args.model is not None else None  # a new one once its length is known
        corpus = read_corpus(args, backbone.tokenizer if backbone else tiny_model.make_tokenizer())
        family = backbone.family.name if backbone else FAMILIES[tiny_model.TinyDLMConfig.model_type].name
        positions = max_positions(backbone.model) if backbone else None
        blocks = len(backbone.family.blocks(backbone.model)) if backbone else args.tiny_layers
        settings = settle(args, family, corpus, positions, blocks, env.world_size)
        backbone = backbone or load_model(settings, env)
        preflight.check_embed_layer(backbone, settings.embed_layer)
        if settings.lora_rank:  # the base frozen, the adapters trained
            with sharding.on_meta(env):
                lora.apply_lora(backbone.model, backbone.family.name, settings.lora_rank, settings.lora_alpha,
                                settings.lora_dropout, settings.lora_targets)
        *rows, notes, cut = corpus.rows(settings.seq_len, settings.eval_fraction, settings.seed,
                                        given=args.seq_len is not None, positions=positions)
        loaded = Loaded(settings, backbone, rows, corpus.notes + notes, cut)
    except (ValueError, OSError, ImportError) as e:
        error = f"error: {e}"
    if error := sharding.agreed_error(error, env):  # the other ranks wait here for rank 0's loading
        raise SystemExit(error)
    preflight.check_loaded(loaded.settings, loaded.backbone.model, *loaded.rows[:2], env)
    return loaded


def load_model(args, env) -> Backbone:
    """A new tiny backbone (sized for --seq-len) or --model's, weights on rank 0 only. Full
    fine-tuning keeps fp32 master weights (FSDP casts to --dtype for compute); a LoRA base is
    frozen, so it is stored in --dtype itself (bf16: 2 bytes a weight) and only adapters,
    predictor and EMA adapter keep fp32."""
    base_dtype = getattr(torch, args.dtype) if args.lora_rank else torch.float32
    with sharding.on_meta(env):
        backbone = (new_tiny_backbone(**tiny_model.shape(args.tiny_width, args.tiny_layers, args.seq_len))
                    if args.model is None else load_backbone(args.model, dtype=base_dtype, weights=env.is_main))
        for parameter in backbone.model.parameters() if args.model is None else ():  # a new tiny model's;
            parameter.data = parameter.data.to(base_dtype)  # its buffers (rotary tables) stay fp32
    return backbone


def build(settings, backbone, env) -> tuple[DLLMJEPA, torch.optim.AdamW]:
    """DLLMJEPA (predictor, EMA target or anchor copy; under LoRA an EMA adapter), sharded by
    FSDP2, every rank's shards filled from rank 0's weights, and AdamW over what trains."""
    objective = flags.objective(vars(settings))
    with sharding.on_meta(env):
        model = DLLMJEPA(backbone.model, objective, backbone.mask_token_id, backbone.family.shift_logits,
                         truncated_forward=sharding.truncated_forward(backbone.family.blocks),
                         **(lora.dllm_jepa_kwargs(backbone.model, objective) if settings.lora_rank else {}))
        if model.predictor is not None:
            model.predictor.float()  # fp32 masters (built in the backbone's dtype: a LoRA base may be bf16)
    if env.is_main and settings.lora_rank:
        print(lora.summary(model, settings.lora_rank, settings.lora_alpha, settings.lora_targets))
    full_state = sharding.weights_to_send(model) if env.is_main and env.world_size > 1 else None
    dtype = getattr(torch, settings.dtype)
    sharding.shard_model(model, backbone.family.blocks, param_dtype=dtype if dtype != torch.float32 else None,
                         cpu_offload=settings.cpu_offload, activation_checkpointing=settings.activation_checkpointing)
    sharding.materialize(model, full_state, env, settings.cpu_offload)
    del full_state  # rank 0's full copy: freed now that every rank holds its shards
    return model, make_optimizer(model, settings.lr, settings.weight_decay)


def make_optimizer(model: DLLMJEPA, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over what trains (backbone and predictor). fused=True: one kernel per step on CPU and CUDA,
    DTensors too (the default on CPU, a per-tensor loop, is ~3x slower: bench.py's step 20-36 -> 7 ms)."""
    return torch.optim.AdamW(model.trainable_parameters(), lr=lr, betas=(0.9, 0.95),
                             weight_decay=weight_decay, fused=True)


@dataclasses.dataclass
class Run:
    """What the training loop and the export read, complete once the run is open."""
    settings: argparse.Namespace  # the flags, defaults settled: config.json's "args"
    env: sharding.Env
    backbone: Backbone
    model: DLLMJEPA
    optimizer: torch.optim.AdamW
    train_rows: data.Tokenized
    eval_rows: data.Tokenized
    eval_examples: list[data.Example] | None  # prompt and answer text; None for plain text
    run_config: dict  # config.json; every checkpoint holds it too
    cut: int = 0  # rows cut to --seq-len, for the closing lines
    log: tracking.Log | None = None  # log.jsonl (and --report-to), open while the run trains and exports
    start_step: int = 0
    skipped: int = 0  # non-finite steps skipped in all, the resumed checkpoint's included
    started: float = 0.0  # time.time() at the first step here, for the closing line

    @property
    def out(self) -> Path:
        return Path(self.settings.out)


def open_run(loaded: Loaded, model, optimizer, env) -> Run:
    """The run: its config, the checkpoint it continues (--resume; none on a fresh start), --out
    laid out by rank 0 (config.json, held_out.jsonl), the opening lines: the config, then what
    the data gave (rows skipped or cut, --seq-len and the steps chosen), where they stay in view."""
    settings, backbone = loaded.settings, loaded.backbone
    run_config = {"args": vars(settings), "objective": dataclasses.asdict(model.config), "world_size": env.world_size,
                  "model_family": backbone.family.name, "compatibility_fixes": backbone.fixes,
                  "model_parameters": sum(p.numel() for p in backbone.model.parameters())}
    run = Run(settings, env, backbone, model, optimizer, *loaded.rows, run_config, loaded.cut)
    checkpoint = (checkpoints.latest_checkpoint(run.out / "checkpoints") if settings.resume == "auto"
                  else Path(settings.resume) if settings.resume else None)
    changed = []
    if checkpoint is not None:  # model, predictor, EMA target, optimizer, RNG; the step
        extra, changed = preflight.load_resumable(checkpoint, run_config, model, optimizer, env, settings.steps)
        run.start_step, run.skipped = extra["step"], extra.get("skipped", 0)
    preflight.prepare_output(run.out, checkpoint, run.start_step, run_config, run.eval_examples, env)
    if env.is_main:
        print(json.dumps(run_config, indent=2, default=str))
        for line in loaded.notes + preflight.opening_warnings(settings, run.eval_rows, checkpoint, changed):
            print(line)
        global_batch = settings.batch_size * settings.grad_accum * env.world_size
        epochs = f"--epochs {settings.epochs:g}: {settings.steps} steps of {global_batch} rows; " if settings.epochs else ""
        print(f"{len(run.train_rows.input_ids)} training rows, {len(run.eval_rows.input_ids)} held-out rows; {epochs}"
              f"{'resuming from ' + str(checkpoint) if checkpoint else 'starting'} at step {run.start_step}")
    sharding.barrier()
    return run

# -----------------------------------------------------------------------------
# train: the steps


def lr_at(step, settings):
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    low = settings.min_lr_ratio
    return settings.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))


def micro_batch(rows, idx, settings, step, shard, device):
    """Rows `idx` cut to their canvas (data.canvas_length), on the device: (input_ids (B, T),
    prompt lengths (B,), answer lengths (B,)). The canvas length, like the masks, is a pure
    function of (seed, step, shard), drawn from a stream of its own."""
    prompt_lengths, answer_lengths = rows.prompt_lengths[idx], rows.answer_lengths[idx]
    canvas = data.canvas_length(prompt_lengths, answer_lengths, settings.seq_len, settings.canvas,
                                random.Random(f"canvas {settings.seed} {step} {shard}"))
    return rows.input_ids[idx, :canvas].to(device), prompt_lengths.to(device), answer_lengths.to(device)


def mask_generator(seed, step, shard, device):
    """Masks are a pure function of (seed, step, shard): exact resume, and N processes
    draw what one process draws with N accumulation micro-batches."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 65_537 + shard)


PARTS = ("diffusion", "jepa", "anchor", "answer_loss", "answer_accuracy")


def loss_parts(output) -> torch.Tensor:
    return torch.stack([getattr(output, name) for name in PARTS]).detach().float()


def reduce_parts(parts: torch.Tensor, config: JEPAConfig, world_size: int) -> dict:
    """Average every part over ranks but the anchor, which is summed: each rank holds the
    share of its own parameter shards; the loss from them as DLLMJEPA totals it."""
    per_rank = torch.tensor([1 if name == "anchor" else world_size for name in PARTS], device=parts.device)
    values = dict(zip(PARTS, (sharding.all_reduce_sum(parts) / per_rank).tolist()))
    return {"loss": config.total(values["diffusion"], values["jepa"], values["anchor"]), **values}


def clip_gradients(model, grad_clip) -> torch.Tensor:
    """3. The global gradient norm over every rank's shards, before clipping it to grad_clip."""
    norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), grad_clip)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train(run: Run):
    """Steps start_step..--steps (1-4 of the module docstring): one log.jsonl row a step, held-out
    evaluations every --eval-every steps, checkpoints every --save-every. A non-finite step is
    skipped (--max-bad-steps in a row stop the run); SIGTERM/SIGINT save and exit after the step."""
    settings, env, model, optimizer, rows = run.settings, run.env, run.model, run.optimizer, run.train_rows
    global_batch = settings.batch_size * settings.grad_accum * env.world_size
    bar = tqdm(range(run.start_step, settings.steps), initial=run.start_step, total=settings.steps,
               disable=not env.is_main or settings.no_progress, dynamic_ncols=True)
    bad_in_a_row, run.started = 0, time.time()
    with files.stop_requests() as stop_signal, bar:
        start = run.start_step  # a resumed run logs what the uninterrupted one logged at this step, no more
        if start == 0 or start % settings.eval_every == 0 or start == settings.steps:
            log_eval(run, start)
        for step in bar:
            model.train()
            batch = data.batch_rows(step, len(rows.input_ids), global_batch, settings.seed)
            parts = torch.zeros(len(PARTS), device=env.device)
            for micro in range(settings.grad_accum):
                shard = env.rank * settings.grad_accum + micro
                idx = batch[shard * settings.batch_size:(shard + 1) * settings.batch_size]
                output = model(*micro_batch(rows, idx, settings, step, shard, env.device),  # 1-2. target, context
                               generator=mask_generator(settings.seed, step, shard, env.device))
                (output.loss / settings.grad_accum).backward()  # FSDP averages over ranks: the global mean
                parts += loss_parts(output) / settings.grad_accum
            grad_norm = clip_gradients(model, settings.grad_clip)
            parts, done, lr = reduce_parts(parts, model.config, env.world_size), step + 1, lr_at(step, settings)
            if torch.isfinite(grad_norm) and math.isfinite(parts["loss"]):
                bad_in_a_row = 0
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                preflight.check_weights_finite(model, done)  # AdamW's own overflow: stop, never save it
                model.update_target(done, settings.steps)  # 4. EMA
            else:  # skip: weights, optimizer moments and EMA stay exactly as they were
                bad_in_a_row, run.skipped = bad_in_a_row + 1, run.skipped + 1
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix({k: f"{parts[k]:.3f}" for k in ("loss", "diffusion", "jepa", "answer_loss")}
                            | {"lr": f"{lr:.1e}"})
            run.log.write({"step": done, **parts, "lr": lr, "grad_norm": grad_norm.item(), "skipped": bad_in_a_row > 0})
            preflight.check_bad_steps(bad_in_a_row, done, settings.max_bad_steps)  # too many in a row: stop
            if done % settings.eval_every == 0 or done == settings.steps:
                log_eval(run, done)
            stop = sharding.agreed_signal(stop_signal[0] if stop_signal else 0, env.device)  # all ranks together
            if done % settings.save_every == 0 or done == settings.steps or stop:
                path = save(run, done)
                if stop:
                    if env.is_main:
                        print(f"stopped by signal {stop} after step {done}; continue with --resume auto "
                              f"(or --resume {path})")
                    sys.exit(128 + stop)


def held_out_batch(eval_rows, chunk, settings, device):
    """Held-out chunk c (rows c*B..c*B+B-1, wrapping) with the canvas and masks of (seed, -1, c),
    whatever the step or the number of processes, so evaluations compare: (forward args, generator)."""
    rows = torch.arange(chunk * settings.batch_size, (chunk + 1) * settings.batch_size) % len(eval_rows.input_ids)
    return (micro_batch(eval_rows, rows, settings, -1, chunk, device),
            mask_generator(settings.seed, -1, chunk, device))


@torch.no_grad()
def held_out_eval(model, eval_rows, settings, env):
    """Held-out loss parts, answer-token loss and accuracy, and the effective rank of the pooled
    embeddings (the paper's collapse check), on fixed masks and canvases (held_out_batch). The rank
    reads each held-out row once (copies fill the last batch of a small held-out set)."""
    n_chunks = min(settings.eval_batches, len(eval_rows.input_ids) // settings.batch_size)
    n_chunks = max(n_chunks - n_chunks % env.world_size, env.world_size)  # every rank runs every forward
    totals = torch.zeros(len(PARTS), device=env.device)
    embeddings = None  # (n_chunks, B, C): each rank fills its chunks, a sum gathers them
    for chunk in range(env.rank, n_chunks, env.world_size):
        inputs, generator = held_out_batch(eval_rows, chunk, settings, env.device)
        out = model(*inputs, generator=generator)
        totals += loss_parts(out)
        if embeddings is None:
            embeddings = out.embedding.new_zeros((n_chunks, *out.embedding.shape), dtype=torch.float32)
        embeddings[chunk] = out.embedding.float()
    held_out = reduce_parts(totals * env.world_size / n_chunks, model.config, env.world_size)
    distinct = min(len(eval_rows.input_ids), n_chunks * settings.batch_size)  # rows past it repeat the first
    return held_out | {"embedding_rank": effective_rank(sharding.all_reduce_sum(embeddings).flatten(0, 1)[:distinct])}


def log_eval(run: Run, step: int):
    """The held-out evaluation at `step`: a log.jsonl row and a line under the progress bar (rank 0).
    --grad-cosine N adds the cosine of the diffusion and JEPA gradients (diagnostics.py)."""
    settings, env, model = run.settings, run.env, run.model
    model.eval()  # dropout off (LLaDA, Dream and the tiny model have none; others may)
    held_out = held_out_eval(model, run.eval_rows, settings, env)
    if settings.grad_cosine:
        held_out |= diagnostics.held_out_cosines(model, run.backbone.family.blocks(model.backbone),
                                                 lambda c: held_out_batch(run.eval_rows, c, settings, env.device),
                                                 settings.grad_cosine, env.rank, env.world_size, sharding.all_reduce_sum)
    run.log.write({"step": step, "held_out": held_out})
    if env.is_main:
        tqdm.write(f"step {step}: held-out " + " ".join(f"{k} {v:.4f}" for k, v in held_out.items()))


def save(run: Run, step: int) -> Path:
    """A resumable checkpoint of `step` -> its folder. Disk full, no permission: every rank stops
    with the same line."""
    with files.in_one_line():
        return checkpoints.save_checkpoint(run.out / "checkpoints", step, run.model, run.optimizer,
                                           {"step": step, "skipped": run.skipped, "config": run.run_config},
                                           run.settings.keep, run.env)

# -----------------------------------------------------------------------------
# export: final/, the held-out questions answered, the closing lines


def export(run: Run) -> Path:
    """final/ (checkpoints.export_model: LoRA merged in, in the loaded checkpoint's dtype), the
    held-out questions answered, and the closing lines, which say how to load it -> final/."""
    settings, final = run.settings, run.out / "final"
    preflight.check_some_step_applied(run.skipped, settings.steps)  # else the weights are the loaded ones
    with files.in_one_line():  # a full disk: every rank stops with the same line
        dtype, remote_code = checkpoints.export_model(run.model, run.backbone, final, settings, run.run_config, run.env)
    summary = final_answers(run, final, dtype)
    if run.env.is_main:
        print(f"done: step {settings.steps} ({settings.steps - run.start_step} steps in "
              f"{time.time() - run.started:.0f}s here; {run.skipped} skipped as non-finite in all){summary}")
        if run.cut:  # said at the start too, where the config dump scrolls it away
            print(f"warning: {run.cut} rows were cut to --seq-len {settings.seq_len} (the opening lines say where)")
        print(checkpoints.how_to_load(final, dtype, remote_code, run.backbone.family.name, settings))
    return final


def final_answers(run: Run, final: Path, export_dtype: torch.dtype) -> str:
    """With --final-eval and held-out examples: the exported model, as shipped (final/ in
    `export_dtype`), answers them with the sampler (every rank a share); rank 0 logs the score,
    writes every answer to final_eval.jsonl and shows a few -> the exact match for the closing
    line ('' when there is none)."""
    settings, out, env = run.settings, run.out, run.env
    if not (settings.final_eval and run.eval_examples):
        return ""
    backbone, source = checkpoints.as_shipped(run.backbone, final, export_dtype, settings.lora_rank, settings.dtype,
                                              env.device)
    generated = held_out_answers(backbone, run.eval_examples[:settings.final_eval], settings.seq_len,
                                 settings.batch_size, env.rank, env.world_size)
    if not env.is_main:
        return ""
    samples = generated.pop("samples", [])
    run.log.write({"step": settings.steps, "final_eval": generated})
    if "exact_match" not in generated:
        print(f"warning: no final generation: {generated['skipped']}")
        return ""
    (out / "final_eval.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    print(f"held-out answers, generated ({generated['gen_length']} masks after each prompt):")
    for sample in samples[:6]:
        print(f"  {'right' if sample['right'] else 'WRONG'}  {sample['prompt']!r} -> {sample['answer']!r} "
              f"(reference {sample['reference']!r})")
    return (f"; held-out exact match {generated['exact_match']:.1%} of {generated['n']} "
            f"(all answers: {out / 'final_eval.jsonl'}){source}")

# -----------------------------------------------------------------------------


def main(argv=None) -> Path:
    """Run training; returns the folder of the exported model. Every refusal is one line: exit 2
    for a bad flag, 1 for bad data or files. Every file is strict JSON: a non-finite value (a
    skipped step's loss) is the string "NaN", "Infinity" or "-Infinity" (float() reads it back)."""
    parser, args = flags.parse_args(argv)
    preflight.check_start(parser, args)  # flags, paths, --out and sizes, before anything loads
    files.stop_on_second_signal()  # even a rank stuck in a collective stops on a second SIGTERM
    hf_logging.disable_progress_bar()  # one progress bar: ours
    with preflight.out_of_memory_in_one_line(args):  # one line naming the flag to lower
        env = sharding.init_distributed(args.device, timedelta(minutes=args.collective_timeout))
        torch.manual_seed(args.seed)
        with sharding.timeout_in_one_line(env, args.collective_timeout,
                                          "; the last complete checkpoint is where --resume auto continues"):
            loaded = load(args, env)
            model, optimizer = build(loaded.settings, loaded.backbone, env)
            run = open_run(loaded, model, optimizer, env)
            with tracking.Log(run.out, run.settings.report_to, run.run_config, env.is_main) as run.log:
                train(run)
                final = export(run)
    sharding.leave(env)  # under torchrun: the group taken down in order, no 'terminate called' at exit
    return final


if __name__ == "__main__":
    main()
