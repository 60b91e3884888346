"""
Fine-tune a masked-diffusion LM with DLLM-JEPA (or a baseline) from the command line.

    python train.py                                   # tiny model, built-in task, CPU, ~2 min
    python train.py --method diffusion                # the baseline, same everything else
    torchrun --nproc_per_node 8 train.py --model GSAI-ML/LLaDA-8B-Instruct \
        --data train.jsonl --dtype bfloat16 --activation-checkpointing --seq-len 1024

One code path: the model is always wrapped by FSDP2 (a one-process group when not under
torchrun), so the run that teaches on a laptop is the run that shards LLaDA-8B.
Each step, in order (as in I-JEPA's train loop):
  1. target view forward, no grad (inside DLLMJEPA.forward)
  2. context view forward: diffusion loss + JEPA loss
  3. backward (gradient accumulation), clip, AdamW step
  4. EMA update of the target encoder
Outputs in --out: config.json, checkpoints/step_XXXXXXXX (resumable: model, predictor,
EMA target, optimizer, step, RNG), and final/ (save_pretrained of the fine-tuned backbone).
"""

import argparse
import dataclasses
import json
import math
import re
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

import data
import distributed
from backbones import load_backbone, new_tiny_backbone
from dllm_jepa import DLLMJEPA, METHODS, VIEW_PRESETS, JEPAConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="hub id (GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B, ...) or a "
                        "local save_pretrained folder; default: a new randomly initialised tiny model")
    g.add_argument("--tiny-width", type=int, default=128, help="hidden size of the new tiny model")
    g.add_argument("--tiny-layers", type=int, default=4, help="blocks of the new tiny model")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (bfloat16: FSDP mixed precision, fp32 master weights and reduction)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g = p.add_argument_group("data")
    g.add_argument("--data", default="builtin",
                   help="'builtin' (generated task, offline), a .jsonl/.json file (chat 'messages', or "
                        "prompt/answer or question/answer fields), a .txt file (plain text: pre-training), "
                        "or a Hugging Face dataset name[:config]")
    g.add_argument("--split", default="train", help="split of a hub dataset")
    g.add_argument("--eval-data", default=None, help="held-out file; default: carve --eval-fraction")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of --data")
    g.add_argument("--seq-len", type=int, default=32, help="tokens per row (prompt + answer + EOS padding)")
    g.add_argument("--builtin-size", type=int, default=4000, help="examples in the built-in task")
    g = p.add_argument_group("objective (see dllm_jepa.JEPAConfig)")
    g.add_argument("--method", default="dllm-jepa", choices=list(METHODS))
    g.add_argument("--views", default="wide", choices=list(VIEW_PRESETS),
                   help="preset of the two masking-rate ranges")
    g.add_argument("--context-t", type=float, nargs=2, metavar=("LOW", "HIGH"), help="override the preset")
    g.add_argument("--target-t", type=float, nargs=2, metavar=("LOW", "HIGH"), help="override the preset")
    g.add_argument("--nested", action=argparse.BooleanOptionalAction, default=True,
                   help="target mask is a superset of the context mask")
    g.add_argument("--pad-is-answer", action=argparse.BooleanOptionalAction, default=True,
                   help="EOS padding is masked and scored as answer (LLaDA SFT)")
    g.add_argument("--loss-norm", default="answer", choices=["answer", "token"],
                   help="divide by each row's answer length (LLaDA SFT) or by all scored tokens")
    g.add_argument("--eps", type=float, default=1e-3, help="mask probability p = (1 - eps) t + eps")
    g.add_argument("--embed-layer", type=int, default=-1, help="hidden state read for the embedding")
    g.add_argument("--pooling", default="answer", choices=["answer", "visible", "token"])
    g.add_argument("--predictor-depth", type=int, default=2)
    g.add_argument("--predictor-mult", type=int, default=2, help="predictor hidden width / model width")
    g.add_argument("--jepa-lambda", type=float, default=1.0, help="total = diffusion + lambda * jepa")
    g.add_argument("--distance", default="cosine", choices=["cosine", "smooth_l1"])
    g.add_argument("--target", default=None, choices=["ema", "online"],
                   help="target encoder of dllm-jepa (default ema); online = no weight copy")
    g.add_argument("--ema-momentum", type=float, nargs=2, default=(0.996, 1.0), metavar=("START", "END"))
    g.add_argument("--anchor-mu", type=float, default=1e-2, help="l2-anchor strength")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=600, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=32, help="rows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default 1e-3 for a new tiny model, 1e-5 for a loaded one")
    g.add_argument("--warmup-steps", type=int, default=30)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations")
    g.add_argument("--cpu-offload", action="store_true", help="FSDP parameter/optimizer offload to CPU")
    g.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many non-finite steps in a row (each is skipped)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out/run", help="output folder")
    g.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    g.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    g.add_argument("--save-every", type=int, default=200, help="steps between resumable checkpoints")
    g.add_argument("--keep", type=int, default=2, help="resumable checkpoints kept")
    g.add_argument("--resume", default=None,
                   help="'auto' (latest checkpoint in --out, if any) or a checkpoint folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs a line per eval)")
    return p, p.parse_args(argv)


def jepa_config(args) -> JEPAConfig:
    names = {f.name for f in dataclasses.fields(JEPAConfig) if f.init}
    return JEPAConfig(**{k: v for k, v in vars(args).items() if k in names})


def validate(args):
    for flag in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "keep",
                 "eval_batches", "max_bad_steps", "tiny_width", "tiny_layers", "builtin_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= 1")
    if not 0 < args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction={args.eval_fraction}: must lie in (0, 1)")
    if args.lr is not None and args.lr <= 0:
        raise ValueError(f"--lr={args.lr}: must be > 0")


def lr_at(step, args):
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_data(args, tokenizer, is_main):
    """Tokenised train and held-out rows, with a note on truncation."""
    def read(source):
        path = Path(source)
        if source == "builtin":
            return data.tokenize_examples(data.builtin_task(args.builtin_size, args.seed), tokenizer, args.seq_len)
        if path.suffix == ".txt":
            return data.tokenize_text(path, tokenizer, args.seq_len)
        if path.suffix in (".jsonl", ".json"):
            if not path.is_file():
                raise ValueError(f"--data {source}: no such file")
            return data.tokenize_examples(data.read_examples(path), tokenizer, args.seq_len)
        return data.tokenize_examples(data.load_hub_dataset(source, args.split), tokenizer, args.seq_len)

    train_rows = read(args.data)
    if args.eval_data:
        eval_rows = read(args.eval_data)
    else:
        if len(train_rows.input_ids) < 2:
            raise ValueError(f"--data {args.data}: one example cannot be split; add --eval-data")
        train_rows, eval_rows = data.split_eval(train_rows, args.eval_fraction, args.seed)
    if is_main and train_rows.truncated:
        print(f"warning: {train_rows.truncated} of {len(train_rows.input_ids)} examples were longer "
              f"than --seq-len {args.seq_len} and were cut (answers kept at least in part)")
    return train_rows, eval_rows


def rows_to(rows, idx, device):
    return (rows.input_ids[idx].to(device), rows.prompt_lengths[idx].to(device),
            rows.answer_lengths[idx].to(device))


def mask_generator(seed, step, shard, device):
    """Masks are a pure function of (seed, step, shard): exact resume, and N processes
    draw what one process draws with N accumulation micro-batches."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 65_537 + shard)


def loss_parts(output) -> torch.Tensor:
    return torch.stack([output.diffusion, output.jepa, output.anchor]).detach().float()


def reduce_parts(parts: torch.Tensor, config: JEPAConfig, world_size: int) -> dict:
    """Average diffusion and JEPA over ranks; sum the anchor, of which each rank holds the
    share of its own parameter shards."""
    diffusion, jepa, anchor = (distributed.all_reduce_sum(parts) / torch.tensor([world_size, world_size, 1],
                                                                                device=parts.device)).tolist()
    return {"loss": diffusion + config.jepa_lambda * jepa + anchor, "diffusion": diffusion, "jepa": jepa,
            "anchor": anchor}


@torch.no_grad()
def evaluate(model, eval_rows, args, env):
    """Held-out loss parts on fixed masks: chunk c (rows c*B..c*B+B-1) always gets the masks of
    seed (seed, -1, c), whatever the step or the number of processes, so evaluations compare."""
    n_chunks = min(args.eval_batches, len(eval_rows.input_ids) // args.batch_size)
    n_chunks = max(n_chunks - n_chunks % env.world_size, env.world_size)  # every rank runs every forward
    totals = torch.zeros(3, device=env.device)
    for chunk in range(env.rank, n_chunks, env.world_size):
        rows = torch.arange(chunk * args.batch_size, (chunk + 1) * args.batch_size) % len(eval_rows.input_ids)
        out = model(*rows_to(eval_rows, rows, env.device), generator=mask_generator(args.seed, -1, chunk, env.device))
        totals += loss_parts(out)
    return reduce_parts(totals * env.world_size / n_chunks, model.config, env.world_size)


def main(argv=None) -> Path:
    """Run training; returns the folder of the exported model. --out/log.jsonl has one line per
    step ({"step", "loss", "diffusion", "jepa", "lr", "grad_norm"}) and per held-out evaluation."""
    parser, args = parse_args(argv)
    try:
        validate(args)
        config = jepa_config(args)
    except ValueError as e:  # name the flag, not the dataclass field
        parser.error(re.sub(r"\b([a-z]+(?:_[a-z]+)*)=", lambda m: f"--{m[1].replace('_', '-')}=", str(e)))
    hf_logging.disable_progress_bar()  # one progress bar: ours
    env = distributed.init_distributed(args.device)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    try:  # bad files, names or rows: one line that says what and where, no traceback
        backbone = (new_tiny_backbone(hidden_size=args.tiny_width, num_hidden_layers=args.tiny_layers,
                                      intermediate_size=round(args.tiny_width * 8 / 3 / 32) * 32,
                                      max_position_embeddings=max(512, args.seq_len))
                    if args.model is None else load_backbone(args.model))
        train_rows, eval_rows = load_data(args, backbone.tokenizer, env.is_main)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    args.lr = args.lr or (1e-3 if args.model is None else 1e-5)
    if len(eval_rows.input_ids) < env.world_size:
        raise SystemExit(f"error: {len(eval_rows.input_ids)} held-out rows for {env.world_size} processes; "
                         "give more data or a larger --eval-fraction")

    model = DLLMJEPA(backbone.model, config, backbone.mask_token_id, backbone.family.shift_logits)
    distributed.shard_model(model, backbone.family.blocks, param_dtype=dtype if dtype != torch.float32 else None,
                            cpu_offload=args.cpu_offload, activation_checkpointing=args.activation_checkpointing)
    if not args.cpu_offload:
        model.to(env.device)  # after sharding: each rank moves only its own shards
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, foreach=True)  # DTensors default to a slow per-tensor loop

    out = Path(args.out)
    run_config = {"args": vars(args), "objective": dataclasses.asdict(config), "world_size": env.world_size,
                  "model_family": backbone.family.name, "compatibility_fixes": backbone.fixes,
                  "model_parameters": sum(p.numel() for p in backbone.model.parameters())}
    start_step = 0
    resume = (distributed.checkpoint_dirs(out / "checkpoints")[-1:] or [None])[0] if args.resume == "auto" \
        else (Path(args.resume) if args.resume else None)
    if resume is not None:
        start_step = distributed.load_checkpoint(resume, model, optimizer, env)["step"]
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(distributed.metadata_json(run_config))
        print(json.dumps(run_config, indent=2, default=str))
        print(f"{len(train_rows.input_ids)} training rows, {len(eval_rows.input_ids)} held-out rows; "
              f"{'resuming from ' + str(resume) if resume else 'starting'} at step {start_step}")

    stop_signal = []  # SIGTERM/SIGINT: finish the step, save a resumable checkpoint, exit
    previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                         for sig in (signal.SIGTERM, signal.SIGINT)}

    def save(step):
        return distributed.save_checkpoint(out / "checkpoints", step, model, optimizer,
                                           {"step": step, "config": run_config}, args.keep, env)

    global_batch = args.batch_size * args.grad_accum * env.world_size
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps,
               disable=not env.is_main or args.no_progress, dynamic_ncols=True)
    bad_in_a_row, skipped, t0 = 0, 0, time.time()
    log = open(out / "log.jsonl", "a") if env.is_main else None

    def log_eval(step):
        held_out = evaluate(model, eval_rows, args, env)
        if env.is_main:
            log.write(json.dumps({"step": step, "held_out": held_out}) + "\n")
            log.flush()
            tqdm.write(f"step {step}: held-out " + " ".join(f"{k} {v:.4f}" for k, v in held_out.items()))

    log_eval(start_step)
    for step in bar:
        model.train()
        rows = data.batch_rows(step, len(train_rows.input_ids), global_batch, args.seed)
        parts = torch.zeros(3, device=env.device)
        for micro in range(args.grad_accum):
            shard = env.rank * args.grad_accum + micro
            idx = rows[shard * args.batch_size:(shard + 1) * args.batch_size]
            output = model(*rows_to(train_rows, idx, env.device),
                           generator=mask_generator(args.seed, step, shard, env.device))
            (output.loss / args.grad_accum).backward()  # FSDP averages over ranks: the global mean
            parts += loss_parts(output) / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        parts = reduce_parts(parts, config, env.world_size)
        done = step + 1
        if torch.isfinite(grad_norm) and all(math.isfinite(v) for v in parts.values()):
            bad_in_a_row = 0
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            optimizer.step()
            model.update_target(done, args.steps)  # 4. EMA
        else:  # skip: weights, optimizer moments and EMA stay exactly as they were
            bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
            if bad_in_a_row >= args.max_bad_steps:
                raise SystemExit(f"error: {bad_in_a_row} non-finite steps in a row (last at step {step}); "
                                 "lower --lr, check the data, or resume from the last checkpoint")
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()} | {"lr": f"{lr_at(step, args):.1e}"})
        if env.is_main:
            log.write(json.dumps({"step": done, **parts, "lr": lr_at(step, args), "grad_norm": grad_norm.item(),
                                  "skipped": bad_in_a_row > 0}) + "\n")
        if done % args.eval_every == 0 or done == args.steps:
            log_eval(done)
        if done % args.save_every == 0 or done == args.steps or stop_signal:
            path = save(done)
            if stop_signal:
                if env.is_main:
                    print(f"stopped by signal {stop_signal[0]} after step {done}; resume with "
                          f"--resume {path}")
                sys.exit(128 + stop_signal[0])
    bar.close()
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    if env.is_main:
        log.close()

    final = out / "final"
    distributed.export_pretrained(model.backbone, backbone.tokenizer, final, env, run_config)
    if env.is_main:
        print(f"done: {args.steps} steps in {time.time() - t0:.0f}s ({skipped} skipped as non-finite)")
        print(f"fine-tuned model: {final} (load with transformers AutoModel.from_pretrained after "
              f"`import tiny_model` for the tiny one); resumable checkpoints: {out / 'checkpoints'}")
    return final


if __name__ == "__main__":
    main()
