"""
train.py's flags, in the groups `python train.py --help` shows: model, data, objective (the
fields of dllm_jepa.JEPAConfig, named alike), optimisation, LoRA, export, output. Parsed once,
and every value checked that needs nothing loaded (first_problem: a usage error, exit 2);
train.settle fills the defaults that depend on the model and the data, and dlm/preflight.py
checks what needs files, devices and memory. Also what every command's line shares: Parser
(defaults shown once, a usage error in one line) and the sampler's flags (evaluate.py, generate.py).

This file imports no torch (nor anything that does), so that `--help` and a mistyped flag
answer at once, before a command loads torch and transformers (seconds). Each command parses
its flags before its heavy imports, as train.py does:

    if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads
        parse_args()

The names a few flags choose from, and the sampler's defaults, are therefore written out here;
tests/test_commands.py checks them against the method's (dllm_jepa.CHOICES), the library's
(data.CANVASES, hub.DATASETS, sampler.SamplerConfig) and the tasks' (tasks.TASKS).
"""

import argparse
import dataclasses
import math

DESCRIPTION = "Fine-tune a masked-diffusion LM with DLLM-JEPA (or a baseline) from the command line."


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless None, a switch that is off unless given, or
    the help already says "default": such help states the default itself."""
    def _get_help_string(self, action):
        said = (action.default is None or (action.nargs == 0 and action.default is False)
                or "default" in (action.help or ""))
        return action.help if said else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every command's parser: HelpFormatter's help, and a usage error as one line naming the
    flag, `error: ... (see --help)`, exit 2, not argparse's usage block above it."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": HelpFormatter} | kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def within(kind, low, below=math.inf):
    """An argparse type: a number in [low, below), else a usage error before anything loads."""
    def parse(text):
        value = kind(text)
        if not low <= value < below:
            raise argparse.ArgumentTypeError(f"{text}: must be >= {low}" + (f" and < {below}" if below < math.inf else ""))
        return value
    return parse


# The names some flags choose from (see the module docstring: dllm_jepa.CHOICES, data.CANVASES).
METHODS = ("diffusion", "dllm-jepa", "two-pass", "l2-anchor")
VIEWS = ("narrow", "wide-pair", "wide-range")
CANVASES = ("random", "batch", "fixed")
FILE_TYPES = ".jsonl, .json, .csv, .parquet"
REPORT_TO = ("none", "tensorboard", "wandb")
GENERATION_TASKS = ("exact", "gsm8k", "nl-rx-synth", "nl-rx-turk", "spider", "django")  # tasks.GENERATION_TASKS
TASKS = GENERATION_TASKS + ("probe", "mmlu", "drift")                                     # tasks.TASKS: evaluate.py
DATASETS = ("gsm8k", "nl-rx-synth", "nl-rx-turk", "spider", "django", "mmlu", "wikitext2")  # hub.DATASETS: prepare.py
SAMPLER_DEFAULTS = dict(gen_length=128, block_length=32, temperature=0.0, remasking="low_confidence")  # SamplerConfig's


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = Parser(description=DESCRIPTION)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="hub id (GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B, ...) or a "
                        "local save_pretrained folder; default: a new randomly initialised tiny model")
    g.add_argument("--tiny-width", type=int, default=128, help="hidden size of the new tiny model")
    g.add_argument("--tiny-layers", type=int, default=4, help="blocks of the new tiny model")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (bfloat16: FSDP mixed precision, fp32 master weights and reduction)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if visible")
    g = p.add_argument_group("data (README.md: Bring your own data)")
    g.add_argument("--data", default="builtin",
                   help=f"'builtin' (a generated task, offline); a {FILE_TYPES} file of prompt/answer rows: chat "
                        "'messages', 'prompt'+'answer', 'question'+'answer', 'prompt'+'completion', Alpaca's "
                        "'instruction'(+'input')+'output', or any two fields named by --prompt-field/--answer-field; "
                        "a .txt file (plain text: pre-training); a dataset of the paper by name (gsm8k, nl-rx-synth, "
                        "nl-rx-turk, spider, django; NAME:split picks a split); or a Hugging Face dataset id[:config] "
                        "(names need network)")
    g.add_argument("--prompt-field", default=None, help="the field of each row that holds the prompt "
                   "(with --answer-field), for rows of another shape")
    g.add_argument("--answer-field", default=None, help="the field of each row that holds the answer")
    g.add_argument("--split", default="train", help="split of a named or hub dataset")
    g.add_argument("--eval-data", default=None, help="held-out data, as --data; default: --eval-fraction of --data")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of --data")
    g.add_argument("--seq-len", type=int, default=None,
                   help="longest canvas: tokens per row (prompt + answer + EOS padding); longer rows are cut and "
                        "counted. Default: for prompt/answer rows, the smallest that keeps every row whole (at most "
                        "the model's positions); 32 for the built-in task and .txt files")
    g.add_argument("--canvas", default="random", choices=CANVASES,
                   help="canvas length of each micro-batch: random (between its longest row and --seq-len), "
                        "batch (its longest row, LLaDA's SFT) or fixed (--seq-len)")
    g.add_argument("--builtin-size", type=int, default=20000, help="examples in the built-in task")
    g = p.add_argument_group("objective (see dllm_jepa.JEPAConfig)")
    g.add_argument("--method", default="dllm-jepa", choices=METHODS,
                   help="dllm-jepa (4F), two-pass (LLM-JEPA's 6F), diffusion (baseline), l2-anchor")
    g.add_argument("--views", default="wide-range", choices=VIEWS,
                   help="preset of the two masking-rate ranges (dllm_jepa.VIEW_PRESETS)")
    g.add_argument("--context-t", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="the context view's range of t, overriding the preset")
    g.add_argument("--target-t", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="the target view's range of t, overriding the preset")
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
                        "MaskGIT's, lower variance); the diffusion loss and the logged answer_loss alike. Default: "
                        "flat for a new tiny model (it learns the built-in task in the default run's budget), "
                        "inverse-t for a loaded one")
    g.add_argument("--eps", type=float, default=1e-3, help="mask probability p = (1 - eps) t + eps")
    g.add_argument("--embed-layer", type=int, default=None,
                   help="hidden state read for the embedding: 0 the embeddings, i block i's output, -1 the last; "
                        "default: the middle block's output ((blocks + 1) // 2), which the dev sweep picked over the last "
                        "(docs/measurements.md: Where the JEPA term costs)")
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
                   help="EMA target momentum, linear from START to END over the steps")
    g.add_argument("--anchor-mu", type=float, default=1e-2, help="l2-anchor strength")
    g = p.add_argument_group("optimisation")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None,
                        help="optimizer steps; default: 2000 for the built-in task and .txt files, else --epochs 1")
    length.add_argument("--epochs", type=float, default=None,
                        help="passes over the training rows (Hugging Face's num_train_epochs): the steps are "
                             "ceil(epochs x rows / global batch), printed at the start")
    g.add_argument("--batch-size", type=int, default=32, help="rows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default 1e-3 for a new tiny model, 1e-5 for a loaded one "
                        "(1e-4 with --lora-rank: adapters start at zero and take larger steps)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps, at most the steps (default: 30, or a tenth of the steps if fewer)")
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
                        "projection of attention and MLP (dlm/lora.py: DEFAULT_TARGETS, per model family)")
    g = p.add_argument_group("export (final/)")
    g.add_argument("--export-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of final/'s weights; auto: the loaded checkpoint's (LLaDA, Dream: bfloat16; "
                        "a new tiny model: float32). The closing answers are the export's, in this dtype")
    g.add_argument("--export-adapter", action="store_true",
                   help="with --lora-rank: also write the adapter alone into final/adapter/ (peft format; "
                        "its adapter_config.json names the base); final/ holds the merged model either way")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out/run", help="output folder")
    g.add_argument("--report-to", default="none", choices=REPORT_TO,
                   help="also send log.jsonl's numbers to TensorBoard (event files in --out/tensorboard) or "
                        "Weights & Biases (Hugging Face's name for it; the package is installed apart)")
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
                   help="held-out examples answered with the sampler by the exported model after training, scored "
                        "by exact match (default: 200 for --data builtin, 50 for other prompt/answer rows, 0 for "
                        "plain text; evaluate.py scores task metrics)")
    args = p.parse_args(argv)
    if problem := first_problem(args):
        p.error(problem)
    return p, args


def first_problem(args) -> str | None:
    """The first flag whose value is out of range, as 'the flag and value: why' (None if none):
    everything that can be checked before anything loads but the objective's own checks."""
    positive = tuple(f for f in ("steps", "seq_len") if getattr(args, f) is not None) + (  # --steps first: the
        "batch_size", "grad_accum", "eval_every", "save_every", "keep", "eval_batches", "max_bad_steps",  # others'
        "tiny_layers", "builtin_size")  # defaults can follow from it (experiments.py: --eval-every = --steps)
    lora_only = [flag for flag, given in (("--lora-alpha", args.lora_alpha is not None),
                                          ("--lora-dropout", args.lora_dropout != 0.0),
                                          ("--lora-targets", args.lora_targets is not None),
                                          ("--export-adapter", args.export_adapter)) if given]
    not_finite = next(((flag, v) for flag, value in vars(args).items()  # argparse's float() takes "nan" and "inf"
                       for v in (value if isinstance(value, (list, tuple)) else [value])
                       if isinstance(v, float) and not math.isfinite(v) and (flag, v) != ("grad_clip", math.inf)),
                      None)
    checks = [(not_finite is None, f"--{not_finite and not_finite[0].replace('_', '-')} "
                                   f"{not_finite and not_finite[1]}: must be a finite number"),
              *[(getattr(args, f) >= 1, f"--{f.replace('_', '-')} {getattr(args, f)}: must be >= 1") for f in positive],
              (args.seq_len is None or args.seq_len >= 2,
               f"--seq-len {args.seq_len}: must be >= 2 (a prompt token and an answer token)"),
              (args.epochs is None or args.epochs > 0, f"--epochs {args.epochs}: must be > 0"),
              (not lora_only or args.lora_rank, f"{', '.join(lora_only)}: only with LoRA; give --lora-rank R (R >= 1)"),
              (not args.export_adapter or args.model is not None,
               "--export-adapter: an adapter needs a base model saved elsewhere; give --model (a new "
               "tiny model's base exists only in this run: final/ holds it merged)"),
              ((args.prompt_field is None) == (args.answer_field is None),
               "--prompt-field and --answer-field: give both (the fields of each row that hold the prompt and the "
               "answer), or neither"),
              (args.final_eval is None or args.final_eval >= 0, f"--final-eval {args.final_eval}: must be >= 0"),
              (args.grad_cosine >= 0, f"--grad-cosine {args.grad_cosine}: must be >= 0"),
              (args.collective_timeout > 0, f"--collective-timeout {args.collective_timeout}: must be > 0 (minutes)"),
              (0 <= args.seed < 2 ** 27, f"--seed {args.seed}: must lie in [0, 2**27) (masks are seeded from it)"),
              (0 < args.eval_fraction < 1, f"--eval-fraction {args.eval_fraction}: must lie in (0, 1)"),
              (args.lr is None or args.lr > 0, f"--lr {args.lr}: must be > 0"),
              (args.grad_clip > 0, f"--grad-clip {args.grad_clip}: must be > 0 (inf turns clipping off)"),
              (args.warmup_steps is None or 0 <= args.warmup_steps <= (args.steps or math.inf),
               f"--warmup-steps {args.warmup_steps}: must lie in [0, --steps {args.steps}]"),
              (0 <= args.min_lr_ratio <= 1, f"--min-lr-ratio {args.min_lr_ratio}: must lie in [0, 1]"),
              (args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: must be >= 0"),
              (args.model is not None or (args.tiny_width >= 8 and args.tiny_width % 8 == 0),
               f"--tiny-width {args.tiny_width}: must be a positive multiple of 8 (4 heads of an even size)")]
    return next((message for ok, message in checks if not ok), None)


def objective(flags: dict):
    """The objective (a dllm_jepa.JEPAConfig) from the flags, which bear JEPAConfig's field names;
    an unset flag (None) leaves its field at the default."""
    from dllm_jepa import JEPAConfig  # here, not at the top: this file imports no torch (--help at once)
    return JEPAConfig(**{f.name: flags[f.name] for f in dataclasses.fields(JEPAConfig)
                         if f.init and flags.get(f.name) is not None})


def add_sampler_flags(group):
    """The LLaDA sampler's flags (scripts/generate.py and scripts/evaluate.py; sampler.SamplerConfig
    checks them), its Fast-dLLM speed-ups --threshold and --prefix-cache among them."""
    default = SAMPLER_DEFAULTS
    group.add_argument("--gen-length", type=int, default=None,
                       help="masked positions after the prompt; default: for a train.py model, the canvas it was "
                            f"trained on (its --seq-len minus the longest prompt), else {default['gen_length']}")
    group.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size; default: "
                       f"--gen-length for a train.py model, else {default['block_length']}")
    group.add_argument("--steps", type=int, default=None, help="denoising steps over the whole canvas; default: "
                       "--gen-length (one token per step)")
    group.add_argument("--temperature", type=float, default=default["temperature"],
                       help="0: greedy (LLM-JEPA's protocol); above 0: Gumbel-max sampling")
    group.add_argument("--remasking", default=default["remasking"], choices=["low_confidence", "random"],
                       help="which predictions each step commits: the most confident, or random ones")
    group.add_argument("--suppress-eos", action="store_true", help="never place EOS in the canvas")
    group.add_argument("--threshold", type=float, default=None, metavar="T",
                       help="parallel decoding (Fast-dLLM): each step commits every masked token of the block "
                            "whose confidence is above T (0 < T <= 1), at least one; replaces --steps. Default: "
                            "the exact LLaDA sampler")
    group.add_argument("--prefix-cache", action="store_true",
                       help="reuse the prompt's and finished blocks' keys/values within a block (Fast-dLLM's "
                            "approximate cache; tiny model only)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0, random remasking)")
