"""
train.py's flags, in the groups `python train.py --help` shows: model, data, objective (the
fields of dllm_jepa.JEPAConfig, named alike), optimisation, LoRA, export, output. Parsed once;
train.settle fills the defaults that depend on the model, and dlm/preflight.py checks them.
"""

import argparse
import dataclasses
import math

from dllm_jepa import METHODS, VIEW_PRESETS, JEPAConfig
from dlm import data, lora

DESCRIPTION = "Fine-tune a masked-diffusion LM with DLLM-JEPA (or a baseline) from the command line."


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, except None: such help says what the default is."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def within(kind, low, below=math.inf):
    """An argparse type: a number in [low, below), else a usage error before anything loads."""
    def parse(text):
        value = kind(text)
        if not low <= value < below:
            raise argparse.ArgumentTypeError(f"{text}: must be >= {low}" + (f" and < {below}" if below < math.inf else ""))
        return value
    return parse


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
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
    return p, p.parse_args(argv)


def objective(flags: dict) -> JEPAConfig:
    """The objective from the flags, which bear JEPAConfig's field names; an unset flag (None)
    leaves its field at the default."""
    return JEPAConfig(**{f.name: flags[f.name] for f in dataclasses.fields(JEPAConfig)
                         if f.init and flags.get(f.name) is not None})
