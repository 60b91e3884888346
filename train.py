"""
Fine-tune a masked-diffusion LM with DLLM-JEPA (or a baseline) from the command line.

    python train.py                                   # tiny model, built-in task, CPU, ~3 min
    python train.py --method diffusion                # the baseline, same everything else
    torchrun --nproc_per_node 8 train.py --model GSAI-ML/LLaDA-8B-Instruct \
        --data train.jsonl --dtype bfloat16 --activation-checkpointing --seq-len 1024
    python train.py --model GSAI-ML/LLaDA-8B-Instruct --lora-rank 32 --data train.jsonl \
        --dtype bfloat16 --activation-checkpointing --seq-len 1024   # LoRA, one GPU (lora.py)

One code path: the model is always wrapped by FSDP2 (a one-process group when not under
torchrun), so the run that teaches on a laptop is the run that shards LLaDA-8B. Only rank
0 loads the weights; the other ranks build the model on the meta device and receive their
shards from it.
main() runs these stages in order (as I-JEPA's and torchtitan's trainers read), each handing
a Run (args, env, model, optimizer, rows, start step, ...) on to the next:
  set_up   flags, paths and sizes checked, the process group joined
  load     backbone (new tiny or --model), LoRA's adapters, tokenised rows; every rank alike
  shard    DLLMJEPA around it, FSDP2 sharding, rank 0's weights to every rank, AdamW
  resume   the checkpoint to continue, --out laid out, config.json
  train    the steps, held-out evaluations, checkpoints, stop on a signal
  export   final/, the held-out answers generated, the closing lines
Each step, in order (as in I-JEPA's train loop):
  1. target view forward, no grad (inside DLLMJEPA.forward)
  2. context view forward: diffusion loss + JEPA loss
  3. backward (gradient accumulation), clip, AdamW step
  4. EMA update of the target encoder
Outputs in --out: config.json, checkpoints/step_XXXXXXXX (resumable: model, predictor,
EMA target, optimizer, step, RNG), and final/ (save_pretrained of the fine-tuned backbone, in
the loaded checkpoint's dtype unless --export-dtype; with LoRA the adapter merged in, and with
--export-adapter the adapter alone in final/adapter). final/ loads with
`AutoModel.from_pretrained(final, trust_remote_code=True)` (LLaDA and Dream: the export ships
remote_fixes/, which makes their published 4.x code load under transformers 5), after
`import tiny_model` for the tiny model; `backbones.load_backbone(final)` loads any of them.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from dllm_jepa import DLLMJEPA, METHODS, VIEW_PRESETS, JEPAConfig, effective_rank
from dlm import checkpoints, data, diagnostics, files, hub, lora, sharding
from dlm.backbones import Backbone, install_remote_fixes, load_backbone, new_tiny_backbone
from tasks.common import exact_match
from tasks.generation import canvas_for, generate_sharded


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, except None: such help says what the default is."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="hub id (GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B, ...) or a "
                        "local save_pretrained folder; default: a new randomly initialised tiny model")
    g.add_argument("--tiny-width", type=int, default=128, help="hidden size of the new tiny model")
    g.add_argument("--tiny-layers", type=int, default=4, help="blocks of the new tiny model")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (bfloat16: FSDP mixed precision, fp32 master weights and reduction)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if visible")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="builtin",
                   help="'builtin' (generated task, offline), a .jsonl/.json file (chat 'messages', or "
                        "prompt/answer or question/answer fields), a .txt file (plain text: pre-training), "
                        "a dataset of the paper by name (hub.py: gsm8k, nl-rx-synth, nl-rx-turk, spider, django; "
                        "NAME:split picks a split), or a Hugging Face dataset id[:config]; names need network")
    g.add_argument("--split", default="train", help="split of a named or hub dataset")
    g.add_argument("--eval-data", default=None, help="held-out file; default: carve --eval-fraction")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of --data")
    g.add_argument("--seq-len", type=int, default=32,
                   help="longest canvas: tokens per row (prompt + answer + EOS padding)")
    g.add_argument("--canvas", default="random", choices=data.CANVASES,
                   help="canvas length of each micro-batch: random (between its longest row and --seq-len), "
                        "batch (its longest row, LLaDA's SFT) or fixed (--seq-len)")
    g.add_argument("--builtin-size", type=int, default=20000, help="examples in the built-in task")
    g = p.add_argument_group("objective (see dllm_jepa.JEPAConfig)")
    g.add_argument("--method", default="dllm-jepa", choices=list(METHODS),
                   help="dllm-jepa (4F), two-pass (LLM-JEPA's 6F), diffusion (baseline), l2-anchor")
    g.add_argument("--views", default="wide-range", choices=list(VIEW_PRESETS),
                   help="preset of the two masking-rate ranges")
    g.add_argument("--context-t", type=float, nargs=2, metavar=("LOW", "HIGH"), help="override the preset")
    g.add_argument("--target-t", type=float, nargs=2, metavar=("LOW", "HIGH"), help="override the preset")
    g.add_argument("--nested", action=argparse.BooleanOptionalAction, default=True,
                   help="one view's masks contain the other's (one uniform draw per token)")
    g.add_argument("--target-view", default="heavier", choices=["heavier", "lighter", "clean"],
                   help="the EMA target's view: heavier than the context (the paper's summaries), lighter "
                        "(t ~ U(0, t_context): I-JEPA's direction, the better-informed view is the target) or clean")
    g.add_argument("--pad-is-answer", action=argparse.BooleanOptionalAction, default=True,
                   help="EOS padding is masked and scored as answer (LLaDA SFT)")
    g.add_argument("--loss-norm", default="answer", choices=["answer", "token"],
                   help="divide by each row's answer length (LLaDA SFT) or by all scored tokens")
    g.add_argument("--loss-weight", default=None, choices=["inverse-t", "flat"],
                   help="each masked token's cross-entropy / p (inverse-t: LLaDA's SFT, the ELBO) or x 1 (flat: "
                        "MaskGIT's, lower variance); default: flat for a new tiny model (it learns the built-in "
                        "task in the default run's budget), inverse-t for a loaded one")
    g.add_argument("--eps", type=float, default=1e-3, help="mask probability p = (1 - eps) t + eps")
    g.add_argument("--embed-layer", type=int, default=-1, help="hidden state read for the embedding")
    g.add_argument("--pooling", default="answer", choices=["answer", "visible", "token"],
                   help="embedding = mean over answer tokens, over unmasked non-padding tokens, or per token")
    g.add_argument("--predictor", default="mlp", choices=["mlp", "transformer"],
                   help="mlp: a residual MLP on the pooled embedding; transformer: attention layers over the "
                        "context view's token states, then pooled")
    g.add_argument("--predictor-depth", type=int, default=2, help="residual MLP blocks or transformer layers")
    g.add_argument("--predictor-mult", type=int, default=2, help="predictor MLP hidden width / model width")
    g.add_argument("--predictor-init", default="identity", choices=["identity", "random"],
                   help="identity: each residual branch's last layer starts at zero; random: PyTorch's init")
    g.add_argument("--jepa-lambda", type=float, default=1.0, help="total = diffusion + lambda * jepa")
    g.add_argument("--distance", default="cosine", choices=["cosine", "smooth_l1"],
                   help="JEPA loss between prediction and target embedding")
    g.add_argument("--target", default=None, choices=["ema", "online"],
                   help="target encoder of dllm-jepa (default: ema); online = no weight copy")
    g.add_argument("--ema-momentum", type=float, nargs=2, default=(0.996, 1.0), metavar=("START", "END"),
                   help="EMA target momentum, linear from START to END over --steps")
    g.add_argument("--anchor-mu", type=float, default=1e-2, help="l2-anchor strength")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=32, help="rows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default 1e-3 for a new tiny model, 1e-5 for a loaded one "
                        "(1e-4 with --lora-rank: adapters start at zero and take larger steps)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps, at most --steps (default: 30, or --steps / 10 if fewer)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    g.add_argument("--seed", type=int, default=0, help="seeds init, data order and every mask")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations")
    g.add_argument("--cpu-offload", action="store_true", help="FSDP parameter/optimizer offload to CPU")
    g.add_argument("--collective-timeout", type=float, default=30.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others in a collective before it stops "
                        "with an error (another process stopped or hung); above the longest step, evaluation or save")
    g.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many non-finite steps in a row (each is skipped)")
    def within(kind, low, below=math.inf):  # argparse type: a bad value is a usage error before anything loads
        def parse(text):
            value = kind(text)
            if not low <= value < below:
                raise argparse.ArgumentTypeError(f"{text}: must be >= {low}" + (f" and < {below}" if below < math.inf else ""))
            return value
        return parse
    g = p.add_argument_group("LoRA (lora.py: the base frozen, low-rank adapters trained; EMA target = an EMA adapter)")
    g.add_argument("--lora-rank", type=within(int, 0), default=0, help="adapter rank R; 0: full fine-tuning")
    g.add_argument("--lora-alpha", type=within(float, 1e-6), default=None,
                   help="adapter scaling alpha (the update is alpha/R * B A); default 2 * R, so the scale "
                        "alpha/R = 2 stays the same whatever the rank (the dllm library's r 32, alpha 64)")
    g.add_argument("--lora-dropout", type=within(float, 0, 1), default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default=None,
                   help="comma-separated names of the blocks' linear layers to adapt; default: every "
                        "projection of attention and MLP (" + "; ".join(
                            f"{family}: {','.join(names)}" for family, names in lora.DEFAULT_TARGETS.items()) + ")")
    g = p.add_argument_group("export (final/)")
    g.add_argument("--export-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of final/'s weights; auto: the loaded checkpoint's (LLaDA, Dream: bfloat16; "
                        "a new tiny model: float32)")
    g.add_argument("--export-adapter", action="store_true",
                   help="with --lora-rank: also write the adapter alone into final/adapter/ (peft format; "
                        "its adapter_config.json names the base); final/ holds the merged model either way")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out/run", help="output folder")
    g.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    g.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    g.add_argument("--grad-cosine", type=int, default=0, metavar="N",
                   help="at each held-out evaluation, also log the cosine between the gradients of the diffusion "
                        "loss and of lambda x JEPA on the backbone (overall, per block) summed over N held-out "
                        "batches (diagnostics.py; 0: off)")
    g.add_argument("--save-every", type=int, default=200, help="steps between resumable checkpoints")
    g.add_argument("--keep", type=int, default=2, help="resumable checkpoints kept")
    g.add_argument("--resume", default=None,
                   help="'auto' (latest checkpoint in --out, if any) or a checkpoint folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs a line per eval)")
    g.add_argument("--final-eval", type=int, default=None,
                   help="held-out examples answered with the sampler after training, scored by exact match "
                        "(default: 200 for --data builtin, else 0; evaluate.py scores task metrics)")
    args = p.parse_args(argv)
    lora_only = [flag for flag, given in (("--lora-alpha", args.lora_alpha is not None),
                                          ("--lora-dropout", args.lora_dropout != 0.0),
                                          ("--lora-targets", args.lora_targets is not None),
                                          ("--export-adapter", args.export_adapter)) if given]
    if lora_only and not args.lora_rank:
        p.error(f"{', '.join(lora_only)}: only with LoRA; give --lora-rank R (R >= 1)")
    if args.export_adapter and args.model is None:
        p.error("--export-adapter: an adapter needs a base model saved elsewhere; give --model (a new "
                "tiny model's base exists only in this run: final/ holds it merged)")
    return p, args


def jepa_config(args) -> JEPAConfig:
    args.loss_weight = args.loss_weight or ("flat" if args.model is None else "inverse-t")
    names = {f.name for f in dataclasses.fields(JEPAConfig) if f.init}
    return JEPAConfig(**{k: v for k, v in vars(args).items() if k in names})


def need(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


def validate(args):
    """Check every flag that can be checked before anything loads; ValueError names the flag."""
    for flag in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "keep",
                 "eval_batches", "max_bad_steps", "tiny_layers", "builtin_size"):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    for flag, value in vars(args).items():  # argparse's float() takes "nan" and "inf"
        bad = [v for v in (value if isinstance(value, (list, tuple)) else [value])
               if isinstance(v, float) and not math.isfinite(v) and (flag, v) != ("grad_clip", math.inf)]
        need(not bad, f"--{flag.replace('_', '-')} {bad[0] if bad else ''}: must be a finite number")
    need(args.final_eval is None or args.final_eval >= 0, f"--final-eval {args.final_eval}: must be >= 0")
    need(args.grad_cosine >= 0, f"--grad-cosine {args.grad_cosine}: must be >= 0")
    need(not args.grad_cosine or METHODS[args.method]["target_pass"],
         f"--grad-cosine: --method {args.method} has no JEPA term to compare; use dllm-jepa or two-pass")
    need(args.collective_timeout > 0, f"--collective-timeout {args.collective_timeout}: must be > 0 (minutes)")
    need(args.seq_len >= 2, f"--seq-len {args.seq_len}: must be >= 2 (a prompt token and an answer token)")
    need(0 <= args.seed < 2 ** 27, f"--seed {args.seed}: must lie in [0, 2**27) (masks are seeded from it)")
    need(0 < args.eval_fraction < 1, f"--eval-fraction {args.eval_fraction}: must lie in (0, 1)")
    need(args.lr is None or args.lr > 0, f"--lr {args.lr}: must be > 0")
    need(args.grad_clip > 0, f"--grad-clip {args.grad_clip}: must be > 0 (inf turns clipping off)")
    need(args.warmup_steps is None or 0 <= args.warmup_steps <= args.steps,
         f"--warmup-steps {args.warmup_steps}: must lie in [0, --steps {args.steps}]")
    need(0 <= args.min_lr_ratio <= 1, f"--min-lr-ratio {args.min_lr_ratio}: must lie in [0, 1]")
    need(args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: must be >= 0")
    need(args.model is not None or (args.tiny_width >= 8 and args.tiny_width % 8 == 0),
         f"--tiny-width {args.tiny_width}: must be a positive multiple of 8 (4 heads of an even size)")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    need(args.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is visible; use --device cpu")
    need(cuda or not args.cpu_offload, "--cpu-offload: needs a CUDA device (it offloads GPU parameters to CPU)")


def check_paths(args):
    """Check the files and folders the flags name, before anything loads (ValueError)."""
    if args.model is not None:  # a local folder (not a hub id "org/name") must be a save_pretrained one
        path = Path(args.model).expanduser()
        if path.exists() or args.model.startswith((".", "/", "~")) or args.model.count("/") > 1:
            need(path.is_dir(), f"--model {args.model}: no such folder (nor a hub id 'org/name')")
            need((path / "config.json").is_file(), f"--model {args.model}: the folder has no config.json; "
                 "give a save_pretrained folder (a run's final/) or a hub id")
    for flag in ("data", "eval_data"):
        source = getattr(args, flag)
        if source not in (None, "builtin") and (Path(source).suffix in (".jsonl", ".json", ".txt")
                                                or Path(source).exists()):
            need(Path(source).is_file(), f"--{flag.replace('_', '-')} {source}: "
                 + ("not a file" if Path(source).exists() else "no such file"))
            need(Path(source).suffix in (".jsonl", ".json", ".txt"),
                 f"--{flag.replace('_', '-')} {source}: unsupported file type; use .jsonl, .json or .txt")
    if args.resume not in (None, "auto"):
        try:
            checkpoints.check_checkpoint(Path(args.resume))
        except ValueError as e:
            raise ValueError(f"--resume {e}") from None
    check_output(args)
    out = Path(args.out)
    need(not out.exists() or out.is_dir(), f"--out {out}: is a file, not a folder")
    done = checkpoints.checkpoint_dirs(out / "checkpoints")
    need(args.resume or not done, f"--out {out}: already holds checkpoints (latest {done[-1].name if done else ''}); "
         "add --resume auto to continue that run, or give a new --out")


def check_output(args):
    """--out never touches an input and can be written (ValueError, one line naming the flags):
    it must not be, contain or lie inside --model, --data, --eval-data or --resume's checkpoint
    and run (continuing that run in place, --out being the run, is fine), nor a model folder or
    another run's checkpoint; no file may stand where its folders go, and the nearest existing
    folder must accept a new file (a probe, removed). Nothing is created."""
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
    need(problem is None, problem)
    files.check_writable(out, "--out")
    for name in ("checkpoints", "final"):  # folders the run makes in --out
        need(not (out / name).exists() or (out / name).is_dir(), f"--out {out}: {out / name} is a file, not a "
             "folder; move it aside or give another --out")
    for name in ("log.jsonl", "config.json", "held_out.jsonl"):  # files the run writes there
        need(not (out / name).is_dir(), f"--out {out}: {out / name} is a folder, not a file; move it aside "
             "or give another --out")
    if (out / "checkpoints").is_dir():
        files.check_writable(out / "checkpoints", "--out")

# -----------------------------------------------------------------------------
# Sizes that cannot fit, ranks that hold different runs (issue 15): one line before allocating


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
            model = new_tiny_backbone(hidden_size=args.tiny_width, num_hidden_layers=args.tiny_layers,
                                      intermediate_size=round(args.tiny_width * 8 / 3 / 32) * 32,
                                      max_position_embeddings=max(512, args.seq_len)).model
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
    config = jepa_config(args)
    copies = (config.target_kind == "ema") + bool(METHODS[args.method]["anchor"])
    per_layer = (2 * args.predictor_mult + 4 * (args.predictor == "transformer")) * width * width  # MLP (+ attention)
    predictor = args.predictor_depth * per_layer if METHODS[args.method]["target_pass"] else 0
    if getattr(args, "lora_rank", 0):
        weight = 2 if args.dtype == "bfloat16" else 4
        return weight + 16 * predictor / parameters, weight * parameters
    return 16 + 4 * copies + 16 * predictor / parameters, 4 * (1 + copies) * parameters


def check_fits(args):
    """Before anything loads: the model's weights, gradients, AdamW moments and EMA copy must fit
    in the memory that is free (a lower bound, so a refusal is certain to be right); ValueError
    naming the flag to lower."""
    shape = model_shape(args)
    if shape is None:
        return
    parameters, width, blocks, vocab = shape
    local_rank, world, local_world = processes()
    per_parameter, start_up = state_bytes(args, parameters, width)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    host = start_up if cuda else max(start_up, per_parameter * parameters * local_world / world)
    needs = [(host, "cpu")] + ([(per_parameter * parameters / world, torch.device("cuda", local_rank))]
                               if cuda and not args.cpu_offload else [])
    for needed, device in needs:
        free, where = files.available_memory(device)
        if free and needed > free:
            fix = ("lower --tiny-width (or --tiny-layers)" if args.model is None else
                   "train it on more processes (torchrun: FSDP shards it), with --cpu-offload on a GPU, with "
                   "LoRA (--lora-rank), or choose a smaller --model")
            flag = f"--tiny-width {args.tiny_width}" if args.model is None else f"--model {args.model}"
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


def run_fingerprint(args, model, train_rows, eval_rows) -> dict:
    """What every rank must hold alike: {part: (hash, summary)}."""
    rows = lambda r: (sharding.fingerprint_of(r.input_ids, r.prompt_lengths, r.answer_lengths),
                      f"{len(r.input_ids)} rows")
    parameters = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    settings = json.dumps(vars(args), sort_keys=True, default=str)
    return {"settings": (sharding.fingerprint_of(settings), "flags hash " + sharding.fingerprint_of(settings)),
            "training rows": rows(train_rows), "held-out rows": rows(eval_rows),
            "model": (sharding.fingerprint_of(parameters), f"{len(parameters)} tensors, "
                      f"{sum(math.prod(s) for _, s in parameters):,} parameters")}


def check_run(args, model, train_rows, eval_rows, env):
    """Every rank holds the same run (flags, tokenised rows, parameter names and shapes) and a
    micro-batch fits; else every rank stops with the same line (SystemExit)."""
    try:
        if env.world_size > 1:  # hashing every row costs seconds on a large set: only when ranks must agree
            sharding.check_same_run(run_fingerprint(args, model, train_rows, eval_rows), env)
        error = activation_problem(args, model_shape(args), train_rows, env)
    except ValueError as e:
        error = str(e)
    if error := sharding.agreed_error(error and f"error: {error}", env):
        sharding.leave(env)
        raise SystemExit(error)


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def out_of_memory_in_one_line(run):
    """main() with an out-of-memory error (torch.OutOfMemoryError, the CPU allocator's
    RuntimeError, MemoryError) turned into one line naming the flag to lower: --batch-size when
    it struck in a forward or backward pass, else the model's size."""
    @functools.wraps(run)
    def wrapper(argv=None):
        try:
            return run(argv)
        except (RuntimeError, MemoryError) as e:
            if not (isinstance(e, (MemoryError, torch.OutOfMemoryError))
                    or any(text in str(e).lower() for text in OUT_OF_MEMORY)):
                raise
            frames = {frame.f_code.co_name for frame, _ in traceback.walk_tb(e.__traceback__)}
            args = parse_args(argv)[1]
            text = " ".join(str(e).split())
            what = re.search(r"CUDA out of memory|out of memory|can't allocate memory", text)
            tried = re.search(r"[Tt]ried to allocate ([\d.]+) ?(bytes|[KMGT]i?B)", text)
            size = tried and (files.human(int(tried[1])) if tried[2] == "bytes" else f"{tried[1]} {tried[2]}")
            detail = (what[0] if what else type(e).__name__) + (f", tried to allocate {size}" if size else "")
            if frames & {"forward", "backward", "_engine_run_backward", "held_out_eval", "final_generation"}:
                fix = (f"lower --batch-size {args.batch_size} (--grad-accum keeps the global batch), or --seq-len "
                       f"{args.seq_len}" + ("" if args.activation_checkpointing else ", or add --activation-checkpointing"))
            else:
                fix = (f"lower --tiny-width {args.tiny_width} (or --tiny-layers)" if args.model is None else
                       f"--model {args.model} does not fit: use more processes, --cpu-offload, LoRA or a smaller model")
            raise SystemExit(f"error: out of memory ({detail}): {fix}") from None
    return wrapper


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


def prepare_output(out: Path, resume: Path | None, start_step: int, run_config: dict, eval_examples):
    """Rank 0 lays out --out: clears what a kill left, trims the log to the resumed step (later
    checkpoints set aside), writes config.json and the held-out examples (held_out.jsonl, for
    evaluate.py), each file written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoints.remove_unfinished(out / "checkpoints")  # left by a kill while saving
    if resume:
        trim_log(out / "log.jsonl", start_step)
        for path in checkpoints.set_aside_later(out / "checkpoints", start_step):
            print(f"note: {path.name} is past the resumed step {start_step}: moved to {path}")
    else:
        (out / "log.jsonl").unlink(missing_ok=True)
    files.atomic_write_text(out / "config.json", files.metadata_json(run_config))
    if eval_examples:
        files.atomic_write_text(out / "held_out.jsonl", "".join(
            json.dumps({"messages": ex.prompt + [{"role": "assistant", "content": ex.answer}]}) + "\n"
            for ex in eval_examples))


def make_optimizer(model: DLLMJEPA, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over what trains (backbone and predictor). fused=True: one kernel per step on
    CPU and CUDA, for plain tensors and FSDP's DTensors alike; the default on CPU (and for
    DTensors) is a per-tensor loop, about 3x slower on CPU (bench.py's step: 20-36 ms -> 7 ms)."""
    return torch.optim.AdamW(model.trainable_parameters(), lr=lr, betas=(0.9, 0.95),
                             weight_decay=weight_decay, fused=True)


def lr_at(step, args):
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_data(args, tokenizer, is_main):
    """Tokenised train and held-out rows, and the held-out examples (prompt and answer text,
    for the final generation; None for plain text). Malformed rows stop with file:line
    (data.py); what was skipped or cut is reported at the end."""
    notes = []

    def read(source):
        path = Path(source)
        if path.suffix == ".txt":
            return data.tokenize_text(path, tokenizer, args.seq_len), None
        if source == "builtin":
            examples = data.builtin_task(args.builtin_size, args.seed)
        else:
            examples = (data.read_examples(path) if path.suffix in (".jsonl", ".json")
                        else hub.load_examples(source, args.split))
            examples, skipped = data.clean_examples(examples, source)
            notes.append(skipped and f"note: {skipped}")
        rows = data.tokenize_examples(examples, tokenizer, args.seq_len)
        if rows.prompts_cut == len(examples):
            raise ValueError(f"--seq-len {args.seq_len}: no prompt of {source} fits (rows need up to "
                             f"{rows.longest} tokens); use --seq-len {rows.longest}")
        if rows.truncated:
            notes.append(f"warning: {source}: {rows.truncated} of {len(examples)} examples were longer than "
                         f"--seq-len {args.seq_len} and were cut ({rows.prompts_cut} at the prompt's start; "
                         f"answers kept at least in part); --seq-len {rows.longest} keeps all whole")
        return rows, examples

    train_rows, train_examples = read(args.data)
    if args.eval_data:
        eval_rows, eval_examples = read(args.eval_data)
    else:
        if len(train_rows.input_ids) < 2:
            raise ValueError(f"--data {args.data}: one example cannot be split; add --eval-data")
        train_idx, eval_idx = data.split_indices(len(train_rows.input_ids), args.eval_fraction, args.seed)
        train_rows, eval_rows = data.select(train_rows, train_idx), data.select(train_rows, eval_idx)
        eval_examples = train_examples and [train_examples[i] for i in eval_idx.tolist()]
    for note in filter(None, notes if is_main else []):
        print(note)
    return train_rows, eval_rows, eval_examples


def micro_batch(rows, idx, args, step, shard, device):
    """Rows `idx` cut to their canvas (data.canvas_length), on the device: (input_ids, prompt
    lengths, answer lengths). The canvas length, like the masks, is a pure function of
    (seed, step, shard), drawn from a stream of its own."""
    prompt_lengths, answer_lengths = rows.prompt_lengths[idx], rows.answer_lengths[idx]
    canvas = data.canvas_length(prompt_lengths, answer_lengths, args.seq_len, args.canvas,
                                random.Random(f"canvas {args.seed} {step} {shard}"))
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
    share of its own parameter shards."""
    per_rank = torch.tensor([1 if name == "anchor" else world_size for name in PARTS], device=parts.device)
    values = dict(zip(PARTS, (sharding.all_reduce_sum(parts) / per_rank).tolist()))
    return {"loss": values["diffusion"] + config.jepa_lambda * values["jepa"] + values["anchor"], **values}


def held_out_batch(eval_rows, chunk, args, device):
    """Held-out chunk c (rows c*B..c*B+B-1, wrapping) with the canvas and masks of (seed, -1, c),
    whatever the step or the number of processes, so evaluations compare: (forward args, generator)."""
    rows = torch.arange(chunk * args.batch_size, (chunk + 1) * args.batch_size) % len(eval_rows.input_ids)
    return micro_batch(eval_rows, rows, args, -1, chunk, device), mask_generator(args.seed, -1, chunk, device)


@torch.no_grad()
def held_out_eval(model, eval_rows, args, env):
    """Held-out loss parts, answer-token loss and accuracy, and the effective rank of the
    pooled embeddings (the paper's collapse check), on fixed masks and canvases (held_out_batch)."""
    n_chunks = min(args.eval_batches, len(eval_rows.input_ids) // args.batch_size)
    n_chunks = max(n_chunks - n_chunks % env.world_size, env.world_size)  # every rank runs every forward
    totals = torch.zeros(len(PARTS), device=env.device)
    embeddings = None  # (n_chunks, B, C): each rank fills its chunks, a sum gathers them
    for chunk in range(env.rank, n_chunks, env.world_size):
        inputs, generator = held_out_batch(eval_rows, chunk, args, env.device)
        out = model(*inputs, generator=generator)
        totals += loss_parts(out)
        if embeddings is None:
            embeddings = out.embedding.new_zeros((n_chunks, *out.embedding.shape), dtype=torch.float32)
        embeddings[chunk] = out.embedding.float()
    held_out = reduce_parts(totals * env.world_size / n_chunks, model.config, env.world_size)
    return held_out | {"embedding_rank": effective_rank(sharding.all_reduce_sum(embeddings).flatten(0, 1))}


def gradient_check(run) -> dict:
    """--grad-cosine N: diagnostics.gradient_cosines over N held-out batches (rounded up to a
    multiple of the processes, each rank its share)."""
    args, env, model = run.args, run.env, run.model
    n = math.ceil(args.grad_cosine / env.world_size) * env.world_size
    batches = lambda: (held_out_batch(run.eval_rows, c, args, env.device) for c in range(env.rank, n, env.world_size))
    groups = diagnostics.block_groups(model.backbone, run.backbone.family.blocks(model.backbone))
    return diagnostics.gradient_cosines(model, batches, groups, sharding.all_reduce_sum)


def final_generation(backbone, examples, args, env) -> dict:
    """Answer held-out examples with the sampler and score exact match: what the model can
    do, which the loss does not show. The canvas is the longest one trained (--seq-len): each
    prompt is followed by --seq-len minus the longest prompt masks, one block, one token per
    step (canvas_for, evaluate.py's default for this model). Every rank answers an
    equal share (FSDP runs every forward on all ranks)."""
    examples = examples[:args.final_eval]
    try:
        sampler = canvas_for(backbone, examples, {"gen_length": None, "block_length": None}, args.seq_len)
    except ValueError as e:
        return {"skipped": str(e)}
    prompts = [data.prompt_ids(backbone.tokenizer, ex.prompt) for ex in examples]
    answers = generate_sharded(backbone, prompts, sampler, args.batch_size, env.rank, env.world_size)
    right = [exact_match(a, ex.answer) for a, ex in zip(answers, examples)]
    return {"exact_match": sum(right) / len(right), "n": len(right), "gen_length": sampler.gen_length,
            "samples": [{"prompt": ex.prompt[-1]["content"], "answer": a, "reference": ex.answer, "right": r}
                        for ex, a, r in zip(examples, answers, right)]}


@dataclasses.dataclass
class Run:
    """What main()'s stages hand on, filled in stage by stage, so that each stage reads as a
    function of the run rather than of a dozen arguments. set_up fills args, config and env;
    load the backbone and rows; shard the model and optimizer; resume the run config, start step
    and skipped count; train the time it started."""
    args: argparse.Namespace  # load settles the defaults that depend on the model (--lr, ...)
    config: JEPAConfig
    env: sharding.Env
    backbone: Backbone | None = None
    base_parameters: int = 0  # the base model's, before LoRA: LoRA's line compares the adapter with it
    train_rows: data.Tokenized | None = None
    eval_rows: data.Tokenized | None = None
    eval_examples: list[data.Example] | None = None  # prompt and answer text; None for plain text
    model: DLLMJEPA | None = None
    optimizer: torch.optim.AdamW | None = None
    run_config: dict | None = None  # config.json; every checkpoint holds it too
    start_step: int = 0
    skipped: int = 0  # non-finite steps skipped in all, the resumed checkpoint's included
    started: float = 0.0  # time.time() at the first step here, for the final line

    @property
    def out(self) -> Path:
        """--out, where config.json, log.jsonl, checkpoints/ and final/ go."""
        return Path(self.args.out)

    @property
    def dtype(self) -> torch.dtype:
        """--dtype, the compute dtype (a LoRA base is also stored in it)."""
        return getattr(torch, self.args.dtype)

    def on_meta(self):
        """Only rank 0 reads (or initialises) the weights; the other ranks build the same modules on
        the meta device, without memory, and receive their shards once sharded (materialize)."""
        return torch.device("meta") if not self.env.is_main else contextlib.nullcontext()


def set_up(argv) -> Run:
    """Flags, then files and sizes, then the process group: every refusal that needs no model is
    made before anything is loaded, in one line (exit 2 for a bad flag, 1 for bad files)."""
    parser, args = parse_args(argv)
    try:
        validate(args)
        config = jepa_config(args)
    except ValueError as e:  # name the flag, not the dataclass field
        parser.error(re.sub(r"(?<![\w-])([a-z]+(?:_[a-z]+)*)=", lambda m: f"--{m[1].replace('_', '-')}=", str(e)))
    try:
        check_paths(args)
        check_fits(args)  # issue 15: a model that cannot fit is refused before it is allocated
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    files.stop_on_second_signal()  # even a rank stuck in a collective stops on a second SIGTERM
    hf_logging.disable_progress_bar()  # one progress bar: ours
    env = sharding.init_distributed(args.device, timedelta(minutes=args.collective_timeout))
    torch.manual_seed(args.seed)
    return Run(args, config, env)


def load(run: Run):
    """The backbone (LoRA's adapters added when asked) and the tokenised rows. Every rank waits
    for rank 0's loading, so a bad file, name or row stops them all with its one line; then the
    ranks check they hold the same run, and the defaults that depend on the model are settled."""
    args, env = run.args, run.env
    error = None
    try:  # bad files, names or rows: one line that says what and where, no traceback
        run.backbone = load_model(run)
        run.base_parameters = sum(p.numel() for p in run.backbone.model.parameters())
        if args.lora_rank:
            add_lora(run)
        run.train_rows, run.eval_rows, run.eval_examples = load_data(args, run.backbone.tokenizer, env.is_main)
    except (ValueError, OSError, ImportError) as e:
        error = f"error: {e}"
    if error := sharding.agreed_error(error, env):  # the other ranks wait here for rank 0's loading
        raise SystemExit(error)
    # issue 15: the same run on every rank; a batch fits
    check_run(args, run.backbone.model, run.train_rows, run.eval_rows, env)
    max_positions = getattr(run.backbone.model.config, "max_position_embeddings", None)
    if env.is_main and max_positions and args.seq_len > max_positions:
        print(f"warning: --seq-len {args.seq_len} exceeds the model's max_position_embeddings {max_positions}")
    args.lr = args.lr or (1e-3 if args.model is None else 1e-4 if args.lora_rank else 1e-5)
    args.final_eval = (200 if args.data == "builtin" else 0) if args.final_eval is None else args.final_eval
    args.warmup_steps = min(30, args.steps // 10) if args.warmup_steps is None else args.warmup_steps
    if len(run.eval_rows.input_ids) < env.world_size:
        raise SystemExit(f"error: {len(run.eval_rows.input_ids)} held-out rows for {env.world_size} processes; "
                         "give more data or a larger --eval-fraction")


def load_model(run: Run) -> Backbone:
    """A new tiny backbone or --model's (weights on rank 0 only), with --embed-layer checked
    against its blocks: a ValueError that load turns into one line."""
    args = run.args
    # Full fine-tuning keeps fp32 master weights (FSDP casts to --dtype for compute); a LoRA base is
    # frozen, so it is stored in --dtype itself (bf16: 2 bytes a weight) and only the adapters,
    # predictor and EMA adapter keep fp32 masters.
    base_dtype = run.dtype if args.lora_rank else torch.float32
    with run.on_meta():
        backbone = (new_tiny_backbone(hidden_size=args.tiny_width, num_hidden_layers=args.tiny_layers,
                                      intermediate_size=round(args.tiny_width * 8 / 3 / 32) * 32,
                                      max_position_embeddings=max(512, args.seq_len))
                    if args.model is None else load_backbone(args.model, dtype=base_dtype, weights=run.env.is_main))
        for parameter in backbone.model.parameters() if args.model is None else ():  # a new tiny model's;
            parameter.data = parameter.data.to(base_dtype)  # its buffers (rotary tables) stay fp32
    n_blocks = len(backbone.family.blocks(backbone.model))
    if not -n_blocks - 1 <= args.embed_layer <= n_blocks:
        raise ValueError(f"--embed-layer {args.embed_layer}: the model has {n_blocks} blocks, so hidden "
                         f"states 0..{n_blocks} (or {-n_blocks - 1}..-1)")
    return backbone


def add_lora(run: Run):
    """LoRA's adapters, in place, on every rank alike (on meta too): the base frozen, adapters
    trained. --lora-alpha and --lora-targets are settled to what was applied, so that
    config.json, and a resume's comparison with it, name them."""
    args, backbone = run.args, run.backbone
    args.lora_alpha = args.lora_alpha or 2.0 * args.lora_rank
    with run.on_meta():
        lora.apply_lora(backbone.model, backbone.family.name, args.lora_rank, args.lora_alpha,
                        args.lora_dropout, args.lora_targets)
    names = args.lora_targets.split(",") if args.lora_targets else lora.DEFAULT_TARGETS[backbone.family.name]
    args.lora_targets = ",".join(dict.fromkeys(name.strip() for name in names if name.strip()))


def shard(run: Run):
    """DLLMJEPA around the backbone, sharded by FSDP2 (one code path, one process or many), every
    rank's shards filled from rank 0's weights, and the optimizer over what trains."""
    args, env, backbone = run.args, run.env, run.backbone
    with run.on_meta():  # the predictor and the EMA target and anchor copies too (LoRA: an EMA adapter, no copy)
        run.model = model = DLLMJEPA(backbone.model, run.config, backbone.mask_token_id, backbone.family.shift_logits,
                                     truncated_forward=sharding.truncated_forward(backbone.family.blocks),
                                     **(lora.dllm_jepa_kwargs(backbone.model, run.config) if args.lora_rank else {}))
        if model.predictor is not None:
            model.predictor.float()  # fp32 masters (built in the backbone's dtype: a LoRA base may be bf16)
    if env.is_main and args.lora_rank:
        report_lora(run)
    full_state = sharding.weights_to_send(model) if env.is_main and env.world_size > 1 else None
    dtype = run.dtype
    sharding.shard_model(model, backbone.family.blocks, param_dtype=dtype if dtype != torch.float32 else None,
                         cpu_offload=args.cpu_offload, activation_checkpointing=args.activation_checkpointing)
    sharding.materialize(model, full_state, env, args.cpu_offload)
    del full_state  # rank 0's full copy: freed now that every rank holds its shards
    run.optimizer = make_optimizer(model, args.lr, args.weight_decay)


def report_lora(run: Run):
    """One line on what LoRA trains: the adapters' size against the base's, the predictor's, and
    the EMA adapter's memory (the target encoder it replaces would be a full copy)."""
    args, model, base = run.args, run.model, run.backbone.model
    adapter = sum(p.numel() for p in lora.adapter_parameters(base))
    ema = (sum(p.numel() * p.element_size() for p in lora.adapter_parameters(base, lora.EMA))
           if isinstance(model.target_encoder, lora.EMAAdapterTarget) else 0)
    predictor = sum(p.numel() for p in model.predictor.parameters()) if model.predictor is not None else 0
    print(f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g} on {args.lora_targets.replace(',', ', ')} "
          f"({len(lora.lora_layers(base))} layers): {adapter:,} trainable parameters "
          f"({adapter / run.base_parameters:.1%} of the base's {run.base_parameters:,})"
          + (f", plus the predictor's {predictor:,}" if predictor else "")
          + (f"; EMA target: an EMA adapter, {ema / 2**20:.2f} MiB" if ema else ""))


def resume(run: Run):
    """The run's config, the checkpoint it continues (--resume), --out laid out for it by rank 0
    (every rank stops on its error rather than wait at the barrier), and the opening lines."""
    args, env, out = run.args, run.env, run.out
    run.run_config = {"args": vars(args), "objective": dataclasses.asdict(run.config), "world_size": env.world_size,
                      "model_family": run.backbone.family.name, "compatibility_fixes": run.backbone.fixes,
                      "model_parameters": sum(p.numel() for p in run.backbone.model.parameters())}
    checkpoint = (checkpoints.latest_checkpoint(out / "checkpoints") if args.resume == "auto"
                  else Path(args.resume) if args.resume else None)
    changed = continue_from(run, checkpoint) if checkpoint is not None else []
    error = None
    if env.is_main:
        try:
            prepare_output(out, checkpoint, run.start_step, run.run_config, run.eval_examples)
        except (ValueError, OSError) as e:
            error = f"error: {e}"
    if error := sharding.agreed_error(error, env):  # the other ranks must not wait at a barrier
        raise SystemExit(error)
    if env.is_main:
        print(json.dumps(run.run_config, indent=2, default=str))
        if args.resume == "auto" and checkpoint is None:
            print(f"note: --resume auto: no checkpoint in {out / 'checkpoints'}; starting fresh")
        if changed:
            print(f"warning: resuming with changed settings ({'; '.join(changed)}): the run will not "
                  "reproduce an uninterrupted one")
        print(f"{len(run.train_rows.input_ids)} training rows, {len(run.eval_rows.input_ids)} held-out rows; "
              f"{'resuming from ' + str(checkpoint) if checkpoint else 'starting'} at step {run.start_step}")
    sharding.barrier()


def continue_from(run: Run, checkpoint: Path) -> list[str]:
    """Load `checkpoint` (model, predictor, EMA target, optimizer, RNG) and take its step and
    skipped count -> the settings changed since (check_resume's warnings). A checkpoint this run
    cannot continue stops it in one line."""
    try:  # distributed's errors name the checkpoint; check_resume's do not
        saved = checkpoints.checkpoint_extra(checkpoint)["config"]
        try:
            changed = check_resume(saved, run.run_config)
        except ValueError as e:
            raise ValueError(f"{checkpoint}: {e}") from None
        extra = checkpoints.load_checkpoint(checkpoint, run.model, run.optimizer, run.env)
    except ValueError as e:
        raise SystemExit(f"error: --resume {e}") from None
    run.start_step, run.skipped = extra["step"], extra.get("skipped", 0)
    if run.start_step > run.args.steps:
        raise SystemExit(f"error: --resume {checkpoint}: the checkpoint is at step {run.start_step}, past "
                         f"--steps {run.args.steps}; raise --steps to train on")
    return changed


def train(run: Run):
    """Steps start_step..--steps (1-4 of the module docstring): one log.jsonl row a step, held-out
    evaluations every --eval-every steps, checkpoints every --save-every. A non-finite step is
    skipped (--max-bad-steps in a row stop the run); SIGTERM/SIGINT save and exit after the step."""
    args, env, model, optimizer, train_rows = run.args, run.env, run.model, run.optimizer, run.train_rows
    global_batch = args.batch_size * args.grad_accum * env.world_size
    bar = tqdm(range(run.start_step, args.steps), initial=run.start_step, total=args.steps,
               disable=not env.is_main or args.no_progress, dynamic_ncols=True)
    bad_in_a_row, run.started = 0, time.time()
    with (stop_requests() as stop_signal, bar,  # line-buffered log: a kill loses no row
          (open(run.out / "log.jsonl", "a", buffering=1) if env.is_main else contextlib.nullcontext()) as log):
        start = run.start_step  # a resumed run logs what the uninterrupted one logged at this step, no more
        if start == 0 or start % args.eval_every == 0 or start == args.steps:
            log_eval(run, log, start)
        for step in bar:
            model.train()
            rows = data.batch_rows(step, len(train_rows.input_ids), global_batch, args.seed)
            parts = torch.zeros(len(PARTS), device=env.device)
            for micro in range(args.grad_accum):
                shard = env.rank * args.grad_accum + micro
                idx = rows[shard * args.batch_size:(shard + 1) * args.batch_size]
                output = model(*micro_batch(train_rows, idx, args, step, shard, env.device),  # 1-2. target, context
                               generator=mask_generator(args.seed, step, shard, env.device))
                (output.loss / args.grad_accum).backward()  # FSDP averages over ranks: the global mean
                parts += loss_parts(output) / args.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), args.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            parts = reduce_parts(parts, run.config, env.world_size)
            done = step + 1
            if torch.isfinite(grad_norm) and math.isfinite(parts["loss"]):
                bad_in_a_row = 0
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, args)
                optimizer.step()
                model.update_target(done, args.steps)  # 4. EMA
            else:  # skip: weights, optimizer moments and EMA stay exactly as they were
                bad_in_a_row, run.skipped = bad_in_a_row + 1, run.skipped + 1
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix({k: f"{parts[k]:.3f}" for k in ("loss", "diffusion", "jepa", "answer_loss")}
                            | {"lr": f"{lr_at(step, args):.1e}"})
            if env.is_main:
                log.write(files.strict_json({"step": done, **parts, "lr": lr_at(step, args),
                                             "grad_norm": grad_norm.item(), "skipped": bad_in_a_row > 0}) + "\n")
            if bad_in_a_row >= args.max_bad_steps:
                raise SystemExit(f"error: {bad_in_a_row} non-finite steps in a row (steps {done - bad_in_a_row + 1}"
                                 f"-{done}), each skipped: stopping. Lower --lr or --grad-clip, check the data, "
                                 f"or raise --max-bad-steps; the checkpoints hold the weights from before")
            if done % args.eval_every == 0 or done == args.steps:
                log_eval(run, log, done)
            stop = sharding.agreed_signal(stop_signal[0] if stop_signal else 0, env.device)  # all ranks stop together
            if done % args.save_every == 0 or done == args.steps or stop:
                path = save(run, done)
                if stop:
                    if env.is_main:
                        print(f"stopped by signal {stop} after step {done}; continue with --resume auto "
                              f"(or --resume {path})")
                    sys.exit(128 + stop)


@contextlib.contextmanager
def stop_requests():
    """SIGTERM/SIGINT: finish the step, save a resumable checkpoint, exit. Yields the signals
    received so far (the loop reads them after each step); the previous handlers come back on
    leaving, however the loop ends."""
    stop_signal = []

    def on_signal(signum, frame):
        if stop_signal:  # a second signal: stop now (the last complete checkpoint stays intact)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop_signal.append(signum)
    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop_signal
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def log_eval(run: Run, log, step: int):
    """The held-out evaluation at `step`: a log.jsonl row and a line under the progress bar (rank 0)."""
    run.model.eval()  # dropout off (LLaDA, Dream and the tiny model have none; others may)
    held_out = held_out_eval(run.model, run.eval_rows, run.args, run.env)
    if run.args.grad_cosine:
        held_out |= gradient_check(run)
    if run.env.is_main:
        log.write(files.strict_json({"step": step, "held_out": held_out}) + "\n")
        tqdm.write(f"step {step}: held-out " + " ".join(f"{k} {v:.4f}" for k, v in held_out.items()))


def save(run: Run, step: int) -> Path:
    """A resumable checkpoint of `step` -> its folder. Disk full, no permission: every rank stops
    with the same line."""
    try:
        return checkpoints.save_checkpoint(run.out / "checkpoints", step, run.model, run.optimizer,
                                           {"step": step, "skipped": run.skipped, "config": run.run_config},
                                           run.args.keep, run.env)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def export(run: Run) -> Path:
    """final/ (save_final), the held-out answers (final_answers) and the closing lines, which say
    how to load what was written -> final/."""
    args, out = run.args, run.out
    final = out / "final"
    export_dtype, remote_code = save_final(run, final)
    summary = final_answers(run)
    if run.env.is_main:
        print(f"done: step {args.steps} ({args.steps - run.start_step} steps in {time.time() - run.started:.0f}s here; "
              f"{run.skipped} skipped as non-finite in all){summary}")
        how = ("`import tiny_model; AutoModel.from_pretrained(path)`" if run.backbone.family.name == "tiny-dlm" else
               "`AutoModel.from_pretrained(path, trust_remote_code=True)`" if remote_code else
               "`backbones.load_backbone(path).model`")  # remote code this repo's fixes do not cover
        print(f"fine-tuned model: {final} ({str(export_dtype).removeprefix('torch.')}"
              f"{', LoRA adapter merged in' if args.lora_rank else ''}; load with {how}, or "
              f"`backbones.load_backbone(path)` for the model and its tokenizer); resumable checkpoints: "
              f"{out / 'checkpoints'}")
        if args.export_adapter:
            print(f"adapter alone: {final / 'adapter'} (peft: PeftModel.from_pretrained(base, path); "
                  f"evaluate.py --model {final / 'adapter'}, or --model BASE --adapter {final / 'adapter'})")
    return final


def save_final(run: Run, final: Path) -> tuple[torch.dtype, str | None]:
    """The fine-tuned backbone and tokenizer, save_pretrained into `final` (written whole or not
    at all) -> (its dtype, the auto_map entry of remote_fixes/ its code loads with, or None).
    In the loaded checkpoint's dtype by default (LLaDA/Dream: bf16, 16 GB for 8B, not 32); with
    LoRA the adapter merged in (a plain model, no peft needed), and on request the adapter alone
    too."""
    args, model = run.args, run.model
    export_dtype = ((run.backbone.saved_dtype or torch.float32) if args.export_dtype == "auto"
                    else getattr(torch, args.export_dtype))
    adapter = lora.adapter_state(model.backbone) if args.export_adapter else None  # every rank gathers it
    if args.model is not None and Path(args.model).expanduser().is_dir():  # the adapter names its base by
        model.backbone.name_or_path = str(Path(args.model).expanduser().resolve())  # a path valid anywhere
    load_code = []

    def finish(folder):  # rank 0, inside final.tmp
        load_code.append(install_remote_fixes(folder, run.backbone.family))
        if adapter is not None:
            lora.save_adapter(model.backbone, folder / "adapter", state=adapter)
            (folder / "adapter" / "training_config.json").write_text(files.metadata_json(run.run_config))
    try:
        checkpoints.export_pretrained(model.backbone, run.backbone.tokenizer, final, run.env, run.run_config,
                                      transform=(lambda state: lora.merged_state(model.backbone, state))
                                      if args.lora_rank else None, dtype=export_dtype, finish=finish)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return export_dtype, load_code[0] if load_code else None


def final_answers(run: Run) -> str:
    """With --final-eval and held-out examples: the model answers them with the sampler (every
    rank a share); rank 0 logs the score, writes every answer to final_eval.jsonl and shows a
    few -> the exact match for the closing line ('' when there is none)."""
    args, out = run.args, run.out
    generated = (final_generation(run.backbone, run.eval_examples, args, run.env)
                 if args.final_eval and run.eval_examples else None)
    if not (run.env.is_main and generated):
        return ""
    samples = generated.pop("samples", [])
    with open(out / "log.jsonl", "a") as log:
        log.write(files.strict_json({"step": args.steps, "final_eval": generated}) + "\n")
    if "exact_match" not in generated:
        print(f"warning: no final generation: {generated['skipped']}")
        return ""
    (out / "final_eval.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    print(f"held-out answers, generated ({generated['gen_length']} masks after each prompt):")
    for sample in samples[:6]:
        print(f"  {'right' if sample['right'] else 'WRONG'}  {sample['prompt']!r} -> {sample['answer']!r}"
              f" (reference {sample['reference']!r})")
    return (f"; held-out exact match {generated['exact_match']:.1%} of {generated['n']} "
            f"(all answers: {out / 'final_eval.jsonl'})")


@out_of_memory_in_one_line  # issue 15: an out-of-memory error in one line naming the flag
def main(argv=None) -> Path:
    """Run training; returns the folder of the exported model. --out/log.jsonl has one line per
    step ({"step", "loss", "diffusion", "jepa", "lr", "grad_norm", "skipped"}) and per held-out
    evaluation. Every refusal is one line: exit 2 for a bad flag, 1 for bad data or files.
    Every file is strict JSON: a non-finite value (a skipped step's loss) is the string "NaN",
    "Infinity" or "-Infinity" (float() reads it back), not a bare NaN that strict parsers refuse.
    The stages run in the module docstring's order, each handing the Run on to the next."""
    run = set_up(argv)  # flags, paths and sizes checked; the process group joined
    try:
        load(run)  # backbone, LoRA, data; the same run on every rank
        shard(run)  # DLLMJEPA, FSDP2, rank 0's weights to every rank, optimizer
        resume(run)  # checkpoint, --out, config.json
        train(run)  # the steps
        final = export(run)  # final/, the held-out answers, the closing lines
    except RuntimeError as e:
        if not sharding.is_timeout(e):
            raise
        sharding.exit_on_timeout(run.env, run.args.collective_timeout,
                                 "; the last complete checkpoint is where --resume auto continues")
    sharding.leave(run.env)  # under torchrun: the group taken down in order, no 'terminate called' at exit
    return final


if __name__ == "__main__":
    main()
