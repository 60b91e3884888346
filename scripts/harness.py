"""
An lm-evaluation-harness model (EleutherAI's lm-eval, the harness LLaDA and dllm report
with) for the masked-diffusion LMs this project trains: the tiny model, LLaDA, Dream.

    python -m scripts.harness --model_args pretrained=out/run/final --tasks gsm8k --apply_chat_template --device cpu
    python -m scripts.harness --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct dtype=bfloat16 gen_length=256 \
        block_length=8 steps=256 --tasks gsm8k --apply_chat_template --batch_size 8 --device cuda

    import lm_eval
    from scripts import harness
    lm_eval.simple_evaluate(model="dllm", model_args="pretrained=out/run/final", tasks=["gsm8k"])

lm-eval's own command line (`lm_eval --model NAME`) only knows the models it ships: it has
no flag that imports a user module, and it reads no plugin entry points for models. Importing
this module registers ours under "dllm"; `python -m scripts.harness ARGS` is lm-eval's command line
(`lm_eval run ARGS`, every flag of it) with that done, and `--model dllm` added when no
--model is given.

model_args (comma-separated key=value):
    pretrained    a save_pretrained folder (train.py's final/) or a hub id; loaded by
                  backbones.load_backbone, so the tiny model, LLaDA and Dream all work
    dtype         float32 (default), bfloat16 or float16
    device        auto (default: cuda if visible), cpu, cuda, cuda:N; lm-eval's --device
    batch_size    rows per forward (default 8); lm-eval's --batch_size (its CLI passes 1
                  unless told)
    gen_length, block_length, steps, temperature, remasking, suppress_eos, seed
                  the LLaDA sampler of dlm/sampler.py, defaulted as evaluate.py defaults them:
                  for a train.py model the canvas it was trained on (its --seq-len minus the
                  longest prompt of the run, one block), else 128 masks in blocks of 32
    threshold, prefix_cache
                  the sampler's speed-ups (--threshold T, --prefix-cache), off by default
    mc_samples    Monte-Carlo samples per multi-token loglikelihood (default 128, LLaDA's)

The three requests:
- generate_until: the context is tokenised as lm-eval hands it over and answered by
  sampler.generate_text, then cut at the first of the request's `until` strings. With
  --apply_chat_template lm-eval renders the chat through apply_chat_template below (the
  tokenizer's template, add_generation_prompt) and the text is tokenised without adding
  special tokens: the same ids as data.prompt_ids, i.e. as evaluate.py prompts. Every other
  generation setting (max_gen_toks, do_sample, temperature in gen_kwargs) is ignored with a
  warning: the sampler's settings are model_args, as in LLaDA's own harness.
- loglikelihood(context, continuation): a masked-diffusion LM gives no left-to-right
  probability, so the continuation's tokens are masked and scored by the model.
  EXACT for a one-token continuation: log p(token | context, one masked position after it),
  one forward (what evaluate.py's MMLU scores, the answer letter at one masked position).
  ESTIMATED for longer ones: a Monte-Carlo estimate of the lower bound on log p(continuation
  | context) that LLaDA (Nie et al., 2025, "Large Language Diffusion Models") evaluates
  conditional likelihoods with, in its lower-variance form: draw l uniformly from 1..L (L the
  continuation's tokens), mask l of the L positions chosen uniformly, and weight the summed
  log-probabilities of the masked tokens by L / l; averaged over mc_samples draws (l
  stratified over the draws, as LLaDA's evaluation code does). Every request draws from a
  generator seeded with `seed`, so a pair's value does not depend on the other requests of
  the run, and choices of the same token length are scored on the same masks.
  exact_elbo computes the bound itself, by enumerating every mask, for short continuations.
  is_greedy: the sampler, greedy, one token per step, fills the L masks with the continuation.
- loglikelihood_rolling(text): the same estimate of the whole text, after the prefix token
  (BOS, else EOS), in lm-eval's disjoint windows when it is longer than the model's positions.
"""

import argparse
import contextlib
import io
import itertools
import logging
import math
import re
import sys
from pathlib import Path

MODEL_NAME = "dllm"

# -----------------------------------------------------------------------------
# Command line: lm-eval's own parser, before torch loads (main, at the end, runs it)


def parse_args(argv=None):
    """lm-eval's own parser over ARGS, as `lm_eval run ARGS` ("run" and `--model dllm` added when
    missing; sys.argv set for it, as lm-eval reads it): (its HarnessCLI, the parsed arguments).
    A usage error is lm-eval's last line alone (exit 2), not its usage block."""
    from lm_eval._cli import HarnessCLI
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "ls", "validate"):
        argv.insert(0, "run")
    if argv[0] == "run" and not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        argv[1:1] = ["--model", MODEL_NAME]
    sys.argv = ["lm-eval"] + argv
    cli, said = HarnessCLI(), io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return cli, cli.parse_args()
    except SystemExit as e:
        if e.code:  # a usage error (--help exits 0, its text on stdout)
            last = (said.getvalue().strip().splitlines() or [f"exit status {e.code}"])[-1]
            print(f"error: {last.split('error: ', 1)[-1]} (see --help)", file=sys.stderr)
        raise


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads (seconds)
    parse_args()

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dlm import checkpoints, files, sharding
from dlm.held_logs import HeldLogs
from dlm.sampler import (SamplerConfig, aligned_logits, canvas_args, check_prefix_cache, check_room, conventions,
                         generate, generate_text, left_pad, sampler_for, trained_seq_len)
from tasks.common import fit_prompt, max_positions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED_BY_LM_EVAL = ("max_batch_size", "trust_remote_code")  # passed by lm-eval; load_backbone decides these

log = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# Likelihoods of a masked-diffusion LM


@torch.no_grad()
def masked_logprobs(backbone, rows: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """log p(rows[i, j] | rows[i] with its `masked` positions masked) at the masked positions,
    0 elsewhere: (N, T) float64, one forward of the N rows (equal lengths, no padding)."""
    device = next(backbone.model.parameters()).device
    x, masked = rows.to(device), masked.to(device)
    logits = aligned_logits(backbone.model, torch.where(masked, backbone.mask_token_id, x), **conventions(backbone))
    out = torch.zeros(x.shape, dtype=torch.float64, device=device)
    out[masked] = torch.log_softmax(logits[masked].double(), -1).gather(-1, x[masked][:, None]).squeeze(-1)
    return out.cpu()


def elbo_samples(backbone, context: list[int], continuation: list[int], samples: int, seed: int = 0,
                 batch_size: int = 8) -> torch.Tensor:
    """`samples` draws of LLaDA's bound on log p(continuation | context): l from 1..L
    (stratified: evenly spaced from a random start, wrapped), l of the L continuation positions
    masked at random, (L / l) * the summed log-probabilities of the masked tokens. Their mean
    is the estimate; its expectation is exact_elbo. (samples,) float64; fixed by `seed`."""
    L, P = len(continuation), len(context)
    g = torch.Generator().manual_seed(seed)
    start = int(torch.randint(1, L + 1, (), generator=g))
    l = torch.round(torch.linspace(start, start + (samples - 1) * L / samples, samples, dtype=torch.float64)).long()
    l = (l - 1) % L + 1                                                               # (S,) in 1..L
    ranks = torch.rand(samples, L, generator=g).argsort(1).argsort(1)                  # a random order per row
    masked = torch.cat([torch.zeros(samples, P, dtype=torch.bool), ranks < l[:, None]], 1)  # l positions each
    row = torch.tensor(context + continuation)
    draws = []
    for i in range(0, samples, batch_size):
        chunk = masked[i:i + batch_size]
        draws.append(masked_logprobs(backbone, row.expand(len(chunk), -1), chunk).sum(1))
    return torch.cat(draws) * L / l.double()


def exact_elbo(backbone, context: list[int], continuation: list[int], batch_size: int = 8) -> float:
    """The bound elbo_samples estimates, computed exactly by enumerating all 2^L - 1 masks:
    sum over nonempty S of (1 / (|S| * C(L, |S|))) * the summed log-probabilities of S's
    tokens with S masked. For L = 1 it is log p(token | context, one mask). Short
    continuations only (L <= 12): one row per mask."""
    L = len(continuation)
    if not 1 <= L <= 12:
        raise ValueError(f"exact_elbo enumerates 2^L - 1 masks: L = {L} must be 1..12")
    subsets = [s for size in range(1, L + 1) for s in itertools.combinations(range(L), size)]
    masked = torch.zeros(len(subsets), len(context) + L, dtype=torch.bool)
    for i, s in enumerate(subsets):
        masked[i, [len(context) + j for j in s]] = True
    weight = torch.tensor([1 / (len(s) * math.comb(L, len(s))) for s in subsets], dtype=torch.float64)
    row = torch.tensor(context + continuation)
    total = 0.0
    for i in range(0, len(subsets), batch_size):
        chunk = masked[i:i + batch_size]
        draws = masked_logprobs(backbone, row.expand(len(chunk), -1), chunk).sum(1)
        total += float((draws * weight[i:i + batch_size]).sum())
    return total


def number(value, name: str) -> float | None:
    """A model_args value as a float (lm-eval hands numbers over parsed, or as text); None stays None."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args: {name}={value!r}: give a number") from None


def cut_at(text: str, until) -> str:
    """The text before the first occurrence of any stop string (lm-eval's `until`)."""
    for stop in [until] if isinstance(until, str) else (until or []):
        if stop:
            text = text.split(stop)[0]
    return text

# -----------------------------------------------------------------------------
# The lm-eval model


class DiffusionLM(TemplateLM):
    """lm-eval's LM for a backbones.Backbone (see the module's docstring). `backbone=` takes a
    model already in memory instead of `pretrained` (then no trained canvas is known)."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", device: str | None = None,
                 batch_size: int | str = 8, gen_length: int | None = None, block_length: int | None = None,
                 steps: int | None = None, temperature: float = 0.0, remasking: str = "low_confidence",
                 suppress_eos: bool = False, threshold: float | None = None, prefix_cache: bool = False,
                 seed: int = 0, mc_samples: int = 128, backbone=None, **extra):
        super().__init__()
        unknown = sorted(set(extra) - set(IGNORED_BY_LM_EVAL))
        if unknown:
            raise ValueError(f"model_args: unknown {', '.join(unknown)}; known: pretrained, dtype, device, batch_size, "
                             "gen_length, block_length, steps, temperature, remasking, suppress_eos, threshold, "
                             "prefix_cache, seed, mc_samples")
        if (pretrained is None) == (backbone is None):
            raise ValueError("model_args: give pretrained=PATH_OR_HUB_ID (or, in Python, backbone=)")
        if pretrained is not None and (problem := checkpoints.model_folder_problem(pretrained, "pretrained")):
            raise ValueError(f"model_args: {problem}")
        if dtype not in DTYPES:
            raise ValueError(f"model_args: dtype={dtype!r}; one of {', '.join(DTYPES)}")
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size={batch_size!r}: give a number (automatic batch sizes are not "
                             "supported)") from None
        if self.batch_size < 1 or int(mc_samples) < 1:
            raise ValueError(f"batch_size={batch_size}, mc_samples={mc_samples}: both must be >= 1")
        self.mc_samples, self.seed = int(mc_samples), int(seed)
        # the sampler, defaulted as evaluate.py does: None = the trained canvas, once the prompts are known
        self.trained = trained_seq_len(pretrained) if pretrained is not None else None
        self.sampler_args = canvas_args(gen_length, block_length, self.trained) | dict(
            steps=steps, temperature=float(temperature), remasking=remasking, suppress_eos=bool(suppress_eos),
            threshold=number(threshold, "threshold"), prefix_cache=bool(prefix_cache))
        if self.sampler_args["gen_length"] is not None:
            SamplerConfig(**self.sampler_args)  # a bad flag fails before the weights load
        if backbone is None:
            from dlm.backbones import load_backbone
            path = Path(pretrained).expanduser()
            backbone = load_backbone(str(path) if path.exists() else pretrained, dtype=DTYPES[dtype])
            backbone.model.to(self.pick_device(device))
        self.backbone, self.tokenizer = backbone, backbone.tokenizer
        if prefix_cache:
            check_prefix_cache(backbone.model.config)
        self.backbone.model.eval()
        self._device = next(backbone.model.parameters()).device
        self.limit = max_positions(backbone.model)
        self.chat = False  # set once lm-eval renders a chat through apply_chat_template
        self.warned = set()
        HELD_LOGS.release()  # the arguments were good: what lm-eval logged so far prints now

    @staticmethod
    def pick_device(device: str | None) -> str:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s: no CUDA device is visible; running on the CPU", device)
            return "cpu"
        return sharding.pick_device(device)

    # --- tokens ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.backbone.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS, else EOS (lm-eval's convention)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        self.chat = True
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Raw text as the tokenizer writes it by default (LLaDA's adds BOS, as evaluate.py's MMLU
        and LLaDA's own harness tokenise); text from the chat template (or already starting with
        BOS) without added special tokens, as apply_chat_template(tokenize=True) does."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (self.chat or (bos and string.startswith(bos)))
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    # --- loglikelihood ----------------------------------------------------------

    def fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context's end, so that context + continuation fit the model's positions."""
        if self.limit is not None:
            if len(continuation) >= self.limit:
                raise ValueError(f"a continuation of {len(continuation)} tokens leaves no room for a context in the "
                                 f"model's {self.limit} positions")
            context = fit_prompt(context, self.limit - len(continuation))
        return context

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = [None] * len(requests)
        pairs = [(self.fit(ctx, cont), cont) for _, ctx, cont in requests]
        single = [i for i, (_, cont) in enumerate(pairs) if len(cont) == 1]
        for start in range(0, len(single), self.batch_size):  # exact: one masked position after the context
            batch = single[start:start + self.batch_size]
            ids, attention = left_pad([pairs[i][0] + [self.backbone.mask_token_id] for i in batch],
                                      self.backbone.eos_token_id)
            attention = None if bool(attention.all()) else attention.to(self._device)
            logits = aligned_logits(self.backbone.model, ids.to(self._device), attention,
                                    **conventions(self.backbone))[:, -1].double()
            logprobs = torch.log_softmax(logits, -1).cpu()
            for row, i in enumerate(batch):
                token = pairs[i][1][0]
                results[i] = (float(logprobs[row, token]), bool(logprobs[row].argmax() == token))
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) == 0:
                results[i] = (0.0, True)
            elif len(cont) > 1:  # estimated: LLaDA's Monte-Carlo bound
                estimate = elbo_samples(self.backbone, ctx, cont, self.mc_samples, self.seed, self.batch_size).mean()
                results[i] = (float(estimate), self.greedy_fills(ctx, cont))
        return results

    def greedy_fills(self, context: list[int], continuation: list[int]) -> bool:
        """Whether the greedy sampler, one token per step, writes exactly the continuation."""
        L = len(continuation)
        canvas = generate(self.backbone.model, [context], self.backbone.mask_token_id, SamplerConfig(L, L, L),
                          **conventions(self.backbone), pad_id=self.backbone.eos_token_id)
        return canvas[0].tolist() == continuation

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in [req.args for req in requests]:
            tokens = self.tok_encode(text, add_special_tokens=False)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, self.prefix_token_id, self.limit or len(tokens) + 1, context_len=1)]
            total = 0.0
            for ctx, cont in windows:
                if len(cont) == 1:
                    total += self._loglikelihood_tokens([(None, ctx, cont)])[0][0]
                else:
                    total += float(elbo_samples(self.backbone, ctx, cont, self.mc_samples, self.seed,
                                                self.batch_size).mean())
            results.append(total)
        return results

    # --- generate_until ---------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        contexts, gen_kwargs = zip(*[req.args[:2] for req in requests])
        ignored = sorted({k for kw in gen_kwargs for k in (kw or {}) if k != "until"} - self.warned)
        if ignored:
            log.warning("generate_until: ignoring gen_kwargs %s: the sampler's settings are model_args "
                        "(gen_length, block_length, steps, temperature, remasking)", ", ".join(ignored))
            self.warned.update(ignored)
        prompts = [self.tok_encode(c) for c in contexts]
        sampler = sampler_for(max(map(len, prompts)), self.sampler_args, self.trained)
        if self.limit is not None:
            check_room(sampler.gen_length, self.limit, "gen_length")
            prompts = [fit_prompt(p, self.limit - sampler.gen_length) for p in prompts]
        answers = generate_text(self.backbone, prompts, sampler, self.batch_size, self.seed)
        return [cut_at(a, (kw or {}).get("until")) for a, kw in zip(answers, gen_kwargs)]

# -----------------------------------------------------------------------------
# Command line: lm-eval's, with the model registered


# What lm-eval raises for a bad argument, task name, file or an unreachable hub, from deep inside it
HARNESS_ERRORS = (ValueError, TypeError, KeyError, AssertionError, OSError)


# lm-eval logs what it is about to run (the tasks, the seeds, the model's arguments) before it
# builds the model, where most bad arguments surface: main holds those records at lm-eval's
# handlers, DiffusionLM releases them once it has loaded, and a run stopped before that shows
# its error alone.
HELD_LOGS = HeldLogs()


def main(argv=None):
    """`lm_eval run ARGS` with "dllm" registered; `--model dllm` when no --model is given. A bad
    argument is one line, not lm-eval's traceback."""
    from lm_eval.utils import setup_logging
    cli, args = parse_args(argv)
    try:
        if args.command == "run":
            check_arguments(sys.argv[2:])
        setup_logging()
        if args.command == "run" and args.model == MODEL_NAME:
            HELD_LOGS.hold(*logging.getLogger("lm_eval").handlers)  # setup_logging's: every lm_eval.* record
        cli.execute(args)
    except HARNESS_ERRORS as e:
        raise SystemExit(f"error: {e if isinstance(e, ValueError) else files.cause(e)}") from None
    finally:
        HELD_LOGS.drop()  # released once the model loaded; a run stopped before that shows its error alone


def check_arguments(argv: list[str]):
    """lm-eval's flags that it would take and fail on only later (or never): --limit, and
    --output_path, which must be a writable folder (or a .json file) before hours of evaluation,
    and batch_size given in --model_args, which clashes with lm-eval's own --batch_size."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--output_path", "-o")
    p.add_argument("--limit", "-L", type=float)
    p.add_argument("--model_args", "-a", nargs="*", default=[])
    try:
        args, _ = p.parse_known_args(argv)
    except SystemExit:
        return  # lm-eval's parser names what is wrong with them
    if args.limit is not None and not args.limit > 0:
        raise ValueError(f"--limit {args.limit:g}: must be > 0 (a count, or a fraction below 1)")
    if args.output_path is not None:
        files.check_writable(args.output_path, "--output_path", folder=not args.output_path.endswith(".json"))
    if any(re.match(r"batch_size=", pair) for arg in args.model_args for pair in re.split(r"[,\s]+", arg)):
        raise ValueError("--model_args batch_size=...: give lm-eval's --batch_size N instead (it passes its own)")


if __name__ == "__main__":
    from scripts import harness  # the class lm-eval gets is harness.DiffusionLM, the same `import harness` registers
    harness.main()
else:
    register_model(MODEL_NAME)(DiffusionLM)
