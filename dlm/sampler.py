"""
Sampling from a masked-diffusion LM: the LLaDA sampler (Nie et al., 2025, "Large Language
Diffusion Models"), written from its description, and a command line that answers prompts.

    python generate.py --model out/run/final --prompt "reverse hello" --show
    python generate.py --model GSAI-ML/LLaDA-8B-Instruct --dtype bfloat16 --prompts-file questions.jsonl \
        --gen-length 256 --block-length 8 --steps 256 --jsonl

The canvas is `[prompt | gen_length masks]`. Generation runs block by block, left to right
(semi-autoregressive); inside a block, each step predicts every masked position at once,
commits the k it is most sure of (k from a linear schedule) and leaves the rest masked:
- `low_confidence` remasking keeps the tokens whose own probability is highest, `random`
  keeps k positions drawn uniformly,
- temperature acts through Gumbel noise on the logits (Gumbel-max = a sample from the
  softmax at that temperature); at 0 it is argmax, so decoding is deterministic,
- optional suppression of chosen tokens (EOS), so a model trained on EOS-padded canvases
  cannot fill the answer with EOS,
- shifted-logit backbones (Dream, Ye et al., 2025: the output at i predicts token i + 1)
  have their logits moved right by one, the same alignment dllm_jepa.DLLMJEPA trains with,
- batches of prompts of different lengths are left-padded; the padding is hidden from
  attention and, where the model takes position ids, positions restart at each row's first
  real token. Models with rotary positions only (the tiny model, LLaDA) see relative
  positions, which left-padding does not change; so a batched row decodes as it would alone.

Two options trade exactness for speed, both from Fast-dLLM (Wu et al., 2025) and both off by
default (the paper's protocol uses the exact sampler):
- `threshold` (--threshold T): confidence-aware parallel decoding. Each step commits every
  masked position of the block whose confidence is above T, and at least the most confident
  one, so a block takes as many steps as it needs (at most one per position; T = 1 commits one
  a step: the exact sampler with steps = gen_length),
- `prefix_cache` (--prefix-cache): the block-wise approximate cache. A block's first step runs
  the whole canvas and keeps the keys/values of the prompt and the finished blocks; its later
  steps run only the block and what follows (PrefixCache; the tiny model only: LLaDA's and
  Dream's published code takes no cache).

Entry points: `generate` (token ids in, token ids out; its `on_step` hook sees the canvas
after every step) and `generate_text` (a Backbone and prompt token lists in, decoded answers
out).

The command line renders each prompt through the model's chat template (data.prompt_ids, as
evaluate.py does) and prints one answer per prompt (`--jsonl`: one JSON object per prompt).
Prompts come from `--prompt` (repeatable) and `--prompts-file` (one prompt per line; .jsonl:
one object per line with "prompt", "question" or chat "messages"; .json: a list of them);
`--system` adds a system message. The sampler's flags are evaluate.py's. `--show` draws the
canvas after every step that commits tokens, masks as ░, so the unmasking can be watched
(redrawn in place on a terminal, one line per step and prompt otherwise). A bad input
stops with one line `error: ...` naming the flag, file or line: exit status 2 for a flag,
1 for a file or model; the prompts, the model's config and --gen-length against its
positions are checked before any weights load (a prompt's length, once the tokenizer is there).
"""

import argparse
import functools
import inspect
import json
import math
import shutil
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dlm import data


@dataclass
class SamplerConfig:
    """LLaDA's knobs. LLaDA-8B-Instruct on GSM8K: gen_length 256, block_length 8, steps 256.
    threshold and prefix_cache are Fast-dLLM's two speed-ups (Wu et al., 2025), off by default:
    the defaults are the exact LLaDA sampler, which the paper's protocol uses.
    A bad value raises ValueError naming it as evaluate.py's flag (--gen-length, --steps, ...)."""
    gen_length: int = 128                 # masked positions appended to the prompt
    block_length: int = 32                # positions per semi-autoregressive block
    steps: int | None = None              # denoising steps over the whole canvas; None = gen_length
    temperature: float = 0.0              # 0: argmax; > 0: Gumbel-max sampling
    remasking: str = "low_confidence"     # "low_confidence" | "random"
    suppress_eos: bool = False            # forbid EOS inside the canvas
    threshold: float | None = None        # commit every masked token of the block whose confidence
                                          # is above it, at least one a step (no fixed steps); None: LLaDA's schedule
    prefix_cache: bool = False            # reuse the prompt's and finished blocks' keys/values within a block

    def __post_init__(self):
        if self.threshold is not None:
            check_threshold(self)
        elif self.steps is None:  # not `or`: steps=0 is an error, not a request for the default
            self.steps = self.gen_length
        for name in ("gen_length", "block_length", "steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.gen_length % self.block_length:
            raise ValueError(f"--gen-length {self.gen_length} is not a multiple of "
                             f"--block-length {self.block_length}")
        blocks = self.gen_length // self.block_length
        if self.steps is not None and self.steps % blocks:
            raise ValueError(f"--steps {self.steps} cannot be shared evenly by {blocks} blocks "
                             f"(--gen-length / --block-length): make it a multiple of {blocks}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # nan >= 0 is False too
            raise ValueError(f"--temperature {self.temperature}: must be a finite number >= 0")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"--remasking {self.remasking!r}: 'low_confidence' or 'random'")


def check_threshold(config: SamplerConfig):
    """--threshold T: a probability in (0, 1] (1: one token a step, the exact sampler with steps =
    gen_length), compared with the model's confidence, so not with --remasking random; it sets
    the number of steps itself, so not with --steps."""
    t = config.threshold
    if not 0 < t <= 1:  # nan fails too
        raise ValueError(f"--threshold {t}: must be a probability in (0, 1], e.g. 0.9")
    if config.steps is not None:
        raise ValueError(f"--steps {config.steps} with --threshold {t}: a threshold decides how many tokens "
                         "each step commits, so the steps are not fixed; give one of the two")
    if config.remasking != "low_confidence":
        raise ValueError(f"--threshold {t} with --remasking {config.remasking}: the threshold is on the "
                         "model's confidence, which only low_confidence remasking uses")

# -----------------------------------------------------------------------------
# Pieces


def commit_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """How many positions each step commits: (B,) masks in a block -> (B, steps).

    Linear schedule, as LLaDA's sampler splits it: every step commits n // steps and the first
    n % steps steps one more (8 over 3: [3, 3, 2]), so the count of masks falls (nearly)
    linearly in time, as in LLaDA's forward process. Rows sum to n_masked.
    """
    step = torch.arange(steps, device=n_masked.device)
    return n_masked[:, None] // steps + (step[None, :] < n_masked[:, None] % steps)


def add_gumbel(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """argmax(logits / T + Gumbel noise) is a sample from softmax(logits / T). In float64,
    because float32 Gumbel noise is too coarse in the tail (LLaDA makes the same point)."""
    if temperature == 0:
        return logits
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return logits.double() / temperature + gumbel


def top_k_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T) with True at the k[b] highest scores of each row (ties: lower position)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks < k[:, None]


def takes_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


# How each family's remote code wants a padding mask. The tiny model and LLaDA take (B, T)
# and broadcast it over queries themselves; Dream hands its mask straight to SDPA, so it
# needs (B, 1, T, T). Ours is a key mask: padded queries still see the real keys, so no
# attention row is empty (an all-masked row would put NaN into the padding's states).
MASK_4D_FAMILIES = {"dream"}


def padding_mask_for(attention_mask, four_d: bool, queries: int | None = None):
    """(B, T) 1 = real token -> what the model's forward takes as attention_mask; four_d: (B, 1,
    queries, T), queries = T unless a prefix cache runs only the last `queries` positions."""
    if not four_d:
        return attention_mask
    B, T = attention_mask.shape
    return attention_mask.bool()[:, None, None, :].expand(B, 1, queries or T, T)


def model_inputs(model, queries: int, attention_mask=None, mask_4d=False) -> dict:
    """The padding keyword arguments of a forward over the canvas's last `queries` columns
    (all of them, unless a prefix cache holds the first ones): {} when there is no padding
    (the unpadded call stays exactly the model's plain forward)."""
    if attention_mask is None:
        return {}
    kwargs = {"attention_mask": padding_mask_for(attention_mask, mask_4d, queries)}
    if takes_position_ids(model):  # positions count real tokens only
        kwargs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)[:, -queries:]
    return kwargs


def align(logits, shift_logits: bool):
    """Shifted-logit backbones: output i predicts i + 1 -> row i takes output i - 1 (row 0 is
    prompt, never scored)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if shift_logits else logits


def aligned_logits(model, ids, attention_mask=None, shift_logits=False, mask_4d=False):
    """Logits (B, T, V) whose row i scores token i, for any backbone family.

    attention_mask (B, T): 1 for real tokens, 0 for left padding; None when there is none.
    """
    return align(model(input_ids=ids, **model_inputs(model, ids.shape[1], attention_mask, mask_4d)).logits,
                 shift_logits)


# Model types whose forward takes the keys/values of a prefix and returns its own (use_cache):
# the tiny model. LLaDA's published forward refuses a cache (it asserts past_key_values is None
# and not use_cache) and Dream's returns none (Fast-dLLM ships modified copies of both models'
# code for its cache); this project does not copy modeling code.
PREFIX_CACHE_MODEL_TYPES = {"tiny-dlm"}


def check_prefix_cache(model_config):
    """ValueError, one line, unless a model of this transformers config can run --prefix-cache."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in PREFIX_CACHE_MODEL_TYPES:
        raise ValueError(f"--prefix-cache: a {model_type or 'model of this kind'} model cannot reuse keys/values "
                         "(LLaDA's and Dream's published forwards take or return no cache; only the tiny model "
                         "does): drop --prefix-cache")


class PrefixCache:
    """Fast-dLLM's block-wise approximate prefix cache (Wu et al., 2025): the first forward of a
    block runs the whole canvas and keeps every layer's keys and values of the columns before the
    block (the prompt and the finished blocks); the block's later steps run only the columns from
    the block on, which attend to the kept ones. One column earlier for shifted logits, whose
    output there predicts the block's first token.

    Approximate: attention is bidirectional, so the kept keys/values were computed while the
    block was still masked and do not see the tokens it commits later. Exact where the prefix's
    keys/values cannot depend on later columns: a one-layer model (its keys are functions of the
    token and its position alone), and every block's first step.
    """

    def __init__(self, model, attention_mask, shift_logits: bool, mask_4d: bool):
        check_prefix_cache(getattr(model, "config", None))
        self.model, self.attention_mask = model, attention_mask
        self.shift_logits, self.mask_4d = shift_logits, mask_4d
        self.start, self.column, self.past = None, 0, None

    def logits(self, x, start: int):
        """Aligned logits (B, T - column, V) of the canvas x (B, T) from self.column on, for the
        block that starts at column `start`; its first call runs the whole canvas and refreshes
        the cache (column 0)."""
        T = x.shape[1]
        if start != self.start:  # a new block: the whole canvas, keeping the prefix's keys/values
            out = self.model(input_ids=x, use_cache=True,
                             **model_inputs(self.model, T, self.attention_mask, self.mask_4d))
            self.start, self.column = start, start - self.shift_logits
            self.past = tuple((k[:, :, :self.column], v[:, :, :self.column]) for k, v in out.past_key_values)
            return align(out.logits, self.shift_logits)
        out = self.model(input_ids=x[:, self.column:], past_key_values=self.past,
                         **model_inputs(self.model, T - self.column, self.attention_mask, self.mask_4d))
        return align(out.logits, self.shift_logits)


def left_pad(prompts, pad_id: int):
    """Token lists of different lengths -> ids (B, P) and attention mask (B, P), padded on the
    left so every canvas starts at the same column."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
    return ids, mask

# -----------------------------------------------------------------------------
# The sampler


@torch.no_grad()
def generate(model, prompts, mask_token_id: int, config: SamplerConfig | None = None, *,
             shift_logits=False, mask_4d=False, suppress_ids=(), pad_id=0,
             generator=None, on_step=None) -> torch.Tensor:
    """Fill `config.gen_length` masks after each prompt. Returns the canvases (B, gen_length).

    prompts: a list of token-id lists (or 1-D tensors), lengths may differ.
    shift_logits / mask_4d: the backbone family's conventions (see aligned_logits).
    suppress_ids: token ids never placed in the canvas (used when config.suppress_eos).
    generator: the randomness of temperature > 0 and of `random` remasking.
    on_step: called after every step that commits tokens, with the canvases so far
        (B, gen_length), mask_token_id where nothing is committed yet; to watch the decoding
        (--show), not to change it: the tensor is the sampler's own, read it only.

    How many positions a step commits: LLaDA's linear schedule (commit_schedule), or with
    config.threshold every candidate whose confidence is above it and at least the most
    confident one (Fast-dLLM's parallel decoding, Wu et al., 2025). Then a block ends when it
    has no masks left: a row that finishes first waits, unchanged, for the others of its batch.
    """
    if shift_logits and any(len(p) == 0 for p in prompts):
        raise ValueError("a shifted-logit backbone needs a non-empty prompt: the first canvas "
                         "position is predicted from the token before it")
    config = config or SamplerConfig()
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    B, P = prompt_ids.shape
    L, block = config.gen_length, config.block_length
    x = torch.cat([prompt_ids, torch.full((B, L), mask_token_id)], dim=1).to(device)   # (B, P + L)
    attention_mask = None
    if not bool(prompt_mask.all()):  # padding exists: hide it from attention
        attention_mask = torch.cat([prompt_mask, torch.ones(B, L, dtype=torch.long)], 1).to(device)
    position = torch.arange(P + L, device=device)[None, :]                             # (1, T)
    threshold = config.threshold
    # steps a block may take: fixed by LLaDA's schedule; with a threshold at most one per position
    steps_per_block = block if threshold is not None else config.steps // (L // block)
    cache = PrefixCache(model, attention_mask, shift_logits, mask_4d) if config.prefix_cache else None

    for start in range(P, P + L, block):
        in_reach = position < start + block  # this block and (already full) earlier ones
        n_masked = (x[:, start:start + block] == mask_token_id).sum(1)                # (B,)
        schedule = commit_schedule(n_masked, steps_per_block) if threshold is None else None  # (B, S)
        for step in range(steps_per_block):
            # candidates: masked canvas positions up to this block's end (the prompt is never
            # rewritten; later blocks wait). Only their logits are upcast: (M, V), M <= B * block.
            candidates = (x == mask_token_id) & (position >= P) & in_reach              # (B, T)
            # positions to commit per row: the schedule's, or with a threshold at least one
            # wherever masks are left (more below)
            k = schedule[:, step] if threshold is None else candidates.any(1).long()  # (B,)
            if not bool(k.any()):
                continue  # nothing to commit anywhere: skip the forward
            if cache is None:
                logits = aligned_logits(model, x, attention_mask, shift_logits, mask_4d)  # (B, T, V)
            else:
                logits = cache.logits(x, start)                  # (B, T - column, V): the cached prefix left out
            logits = logits[candidates[:, x.shape[1] - logits.shape[1]:]].double()     # (M, V)
            if config.suppress_eos and len(suppress_ids):
                logits[:, list(suppress_ids)] = -float("inf")
            x0 = add_gumbel(logits, config.temperature, generator).argmax(-1)          # (M,)
            if config.remasking == "low_confidence":
                score = F.softmax(logits, -1).gather(-1, x0[:, None]).squeeze(-1)      # (M,)
            else:
                score = torch.rand(x0.shape, dtype=torch.float64, device=device, generator=generator)
            confidence = torch.full(x.shape, -float("inf"), dtype=torch.float64, device=device)
            confidence[candidates] = score
            proposal = x.clone()
            proposal[candidates] = x0
            chosen = top_k_mask(confidence, k)
            if threshold is not None:  # and every other candidate the model is sure enough of
                chosen |= confidence > threshold
            x = torch.where(chosen & candidates, proposal, x)
            if on_step is not None:
                on_step(x[:, P:])
    return x[:, P:]


def trained_seq_len(model: str) -> int | None:
    """The longest canvas a train.py model was fine-tuned on (--seq-len in the training_config.json
    its final/ holds); None for any other model."""
    try:
        return int(json.loads((Path(model) / "training_config.json").read_text())["args"]["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sampler_for(longest_prompt: int, sampler_args: dict, trained: int | None) -> SamplerConfig:
    """The sampler, with the canvas the model was trained on when it is known: a gen_length of
    None becomes its --seq-len minus the longest prompt (one block, one token per step), the
    default of train.py's final generation, evaluate.py and the command line below; a canvas
    longer than any trained one gets a warning on stderr."""
    if sampler_args["gen_length"] is None:
        if trained - longest_prompt < 1:
            raise ValueError(f"the longest prompt ({longest_prompt} tokens) fills the model's trained canvas "
                             f"({trained}); give --gen-length")
        sampler_args = sampler_args | {"gen_length": trained - longest_prompt,
                                       "block_length": sampler_args["block_length"] or trained - longest_prompt}
    elif trained is not None and longest_prompt + sampler_args["gen_length"] > trained:
        print(f"warning: prompt + --gen-length reaches {longest_prompt + sampler_args['gen_length']} tokens, past "
              f"the longest canvas the model was trained on ({trained}): answers may not end where they should; "
              f"--gen-length {max(1, trained - longest_prompt)} stays inside it", file=sys.stderr)
    return SamplerConfig(**sampler_args)


def conventions(backbone) -> dict:
    """A backbones.Backbone's family conventions, as keyword arguments of aligned_logits."""
    return dict(shift_logits=backbone.family.shift_logits,
                mask_4d=backbone.family.name in MASK_4D_FAMILIES)


def stop_ids(backbone) -> set[int]:
    """Token ids that end an answer: the backbone's EOS and any other EOS id its config names
    (LLaDA-Instruct ends turns with <|eot_id|> and pads with <|endoftext|>)."""
    ids = {backbone.eos_token_id, backbone.tokenizer.eos_token_id}
    eos = getattr(backbone.model.config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}


def decode_answer(tokenizer, canvas, stops) -> str:
    """The text up to the first stop token; special tokens dropped, outer whitespace stripped
    (LLM-JEPA strips its generations the same way before exact match)."""
    canvas = list(canvas)
    end = next((i for i, t in enumerate(canvas) if t in stops), len(canvas))
    return tokenizer.decode(canvas[:end], skip_special_tokens=True).strip()


def generate_text(backbone, prompts, config: SamplerConfig | None = None, batch_size=8,
                  seed=0, on_step=None) -> list[str]:
    """Answers to token-id prompts with a backbones.Backbone, in batches, in order.
    on_step(first, canvases): generate's hook, told the index in `prompts` of the batch's first row."""
    model, tokenizer = backbone.model.eval(), backbone.tokenizer
    stops = stop_ids(backbone)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else backbone.eos_token_id
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    answers = []
    for i in range(0, len(prompts), batch_size):
        canvases = generate(model, prompts[i:i + batch_size], backbone.mask_token_id, config,
                            **conventions(backbone), suppress_ids=sorted(stops), pad_id=pad_id,
                            generator=generator,
                            on_step=None if on_step is None else functools.partial(on_step, i))
        answers += [decode_answer(tokenizer, c.tolist(), stops) for c in canvases]
    return answers

# -----------------------------------------------------------------------------
# Watching the decoding (--show)


def visible(text: str) -> str:
    """The text on one line: characters that are not printable (newlines, tabs, escape
    sequences a random model may emit) written as Python escapes, e.g. \\n."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render_canvas(tokenizer, canvas, mask_token_id: int, stops, placeholder: str) -> str:
    """A canvas as text: one placeholder per masked position, committed tokens decoded, cut at
    the first committed stop token as decode_answer cuts; a canvas without masks renders as
    visible(decode_answer(...)), so the last frame shows the answer."""
    pieces, run = [], []
    for token in list(canvas) + [None]:  # None: the end, flushes the last run
        if token is None or token == mask_token_id or token in stops:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=True))
            run = []
            if token != mask_token_id:
                break
            pieces.append(placeholder)
        else:
            run.append(token)
    return visible("".join(pieces).strip())


def can_write(stream, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


class Show:
    """on_step hook of generate_text that draws every batch's canvases after each step that
    commits tokens: `[prompt number] step n: text`, one line per prompt. On a terminal the
    batch's lines are redrawn in place; anywhere else (a pipe, a file) every frame stays."""

    def __init__(self, backbone, stream):
        self.tokenizer, self.mask_token_id = backbone.tokenizer, backbone.mask_token_id
        self.stops, self.stream, self.tty = stop_ids(backbone), stream, stream.isatty()
        self.placeholder = "░" if can_write(stream, "░") else "_"
        self.batch, self.frame, self.rows_drawn = None, 0, 0

    def __call__(self, first: int, canvases: torch.Tensor):
        if first != self.batch:  # a new batch: its frames go below the last one's
            self.batch, self.frame, self.rows_drawn = first, 0, 0
        self.frame += 1
        lines = [f"[{first + i + 1}] step {self.frame}: "
                 + render_canvas(self.tokenizer, canvas, self.mask_token_id, self.stops, self.placeholder)
                 for i, canvas in enumerate(canvases.tolist())]
        if self.rows_drawn:  # back to the start of the previous frame, erase it
            self.stream.write(f"\x1b[{self.rows_drawn}F\x1b[J")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        if self.tty:  # rows the frame took on screen, long lines wrapped
            columns = shutil.get_terminal_size().columns
            width = lambda line: sum(1 + (unicodedata.east_asian_width(c) in "WF") for c in line)
            self.rows_drawn = sum(max(1, -(-width(line) // columns)) for line in lines)

# -----------------------------------------------------------------------------
# Command line


@dataclass
class Prompt:
    messages: list        # chat messages to answer: [{"role": ..., "content": ...}]
    where: str            # for messages: "--prompt 2", "questions.jsonl:7"


class BadFlag(ValueError):
    """A flag's value that only the model shows to be wrong: exit 2 like argparse's errors.
    Every other ValueError / OSError is a bad file or model (exit 1)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def add_fast_flags(group):
    """--threshold and --prefix-cache, the sampler's speed-ups (generate.py and evaluate.py)."""
    group.add_argument("--threshold", type=float, default=None, metavar="T",
                       help="parallel decoding (Fast-dLLM): each step commits every masked token of the block "
                            "whose confidence is above T (0 < T <= 1), at least one; replaces --steps. Default: "
                            "the exact LLaDA sampler")
    group.add_argument("--prefix-cache", action="store_true",
                       help="reuse the prompt's and finished blocks' keys/values within a block (Fast-dLLM's "
                            "approximate cache; tiny model only)")


def messages_of(row, where: str) -> list:
    """One prompt of a .jsonl/.json file: a string, {"prompt": ...}, {"question": ...} or
    {"messages": [...]} (a final assistant turn, the reference answer, is dropped)."""
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} "
                             'objects with string values, e.g. [{"role": "user", "content": "..."}]')
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError(f"{where}: 'messages' holds only an assistant turn: nothing to answer")
    elif isinstance(row, dict):
        key = next((k for k in ("prompt", "question") if k in row), None)
        if key is None:
            raise ValueError(f"{where}: no 'prompt', 'question' or 'messages' field (found {sorted(row)})")
        if not isinstance(row[key], str):
            raise ValueError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
        messages = [{"role": "user", "content": row[key]}]
    elif isinstance(row, str):
        messages = [{"role": "user", "content": row}]
    else:
        raise ValueError(f"{where}: expected a JSON object (or string), got {type(row).__name__}")
    if not any(m["content"].strip() for m in messages):
        raise ValueError(f"{where}: the prompt is blank")
    try:
        for m in messages:
            m["content"].encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800" escapes; no tokenizer accepts them
        raise ValueError(f"{where}: the text holds an unpaired surrogate escape (\\ud800-\\udfff)") from None
    return messages


def read_prompts(path: Path) -> list[Prompt]:
    """--prompts-file: .jsonl (one JSON prompt per line), .json (a list of them) or any other
    file as plain text, one prompt per non-blank line."""
    if not path.is_file():
        raise ValueError(f"--prompts-file {path}: no such file")
    if path.suffix in (".json", ".jsonl"):
        prompts = [Prompt(messages_of(row, where), where) for row, where in data.json_rows(path, "prompts")]
    else:
        prompts = [Prompt([{"role": "user", "content": line.removesuffix("\r")}], f"{path}:{lineno}")
                   for lineno, line in enumerate(data.read_text(path).split("\n"), start=1) if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path}: holds no prompts (the file is empty or blank)")
    return prompts


def model_positions(name: str) -> int | None:
    """--model's number of positions, read from its config alone, so a bad --model or
    --gen-length is reported before any weights load."""
    from transformers import AutoConfig

    from dlm import backbones  # noqa: F401  (registers the tiny model with AutoConfig)
    path = Path(name).expanduser()
    local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1  # not a hub id
    if local and not path.is_dir():
        raise ValueError(f"--model {name}: no such folder")
    if local and not (path / "config.json").is_file():
        raise ValueError(f"--model {name}: no config.json in the folder; give a save_pretrained "
                         "folder (train.py's out/run/final) or a hub id")
    try:
        config = AutoConfig.from_pretrained(str(path) if local else name, trust_remote_code=True)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--model {name}: " + (f"cannot read its config ({reason})" if local else
                         f"no such folder, and the hub does not give it ({reason})")) from None
    return (getattr(config, "max_position_embeddings", None)
            or getattr(config, "max_sequence_length", None))


def prompt_tokens(tokenizer, prompt: Prompt, gen_length: int, limit: int | None) -> list[int]:
    """A prompt through the chat template, as evaluation renders it; it must leave room for
    the canvas in the model's positions."""
    try:
        ids = data.prompt_ids(tokenizer, prompt.messages)
    except Exception as e:  # a template may refuse roles or orders it does not know
        raise ValueError(f"{prompt.where}: the chat template refused it ({type(e).__name__}: {e})") from None
    if limit is not None and len(ids) + gen_length > limit:
        error = BadFlag if prompt.where.startswith("--prompt ") else ValueError
        raise error(f"{prompt.where}: the prompt is {len(ids)} tokens and --gen-length {gen_length} "
                    f"more; the model has {limit} positions: shorten it or lower --gen-length")
    return ids


def parse_args(argv=None):
    default = SamplerConfig()
    p = Parser(description="Answer prompts with a masked-diffusion LM (the LLaDA sampler).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a save_pretrained folder (train.py's final/) or a hub "
                   "id (GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B, ...)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights' dtype (bfloat16 for LLaDA/Dream on a GPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if visible")
    g = p.add_argument_group("prompts (through the model's chat template)")
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt to answer; "
                   "repeat the flag for more")
    g.add_argument("--prompts-file", metavar="FILE", help="one prompt per line; or .jsonl, one object per "
                   "line with 'prompt', 'question' or chat 'messages' (a final assistant turn is dropped); "
                   "or .json, a list of them")
    g.add_argument("--system", metavar="TEXT", help="a system message before each prompt that has none")
    g = p.add_argument_group("generation (LLaDA sampler)")
    g.add_argument("--gen-length", type=int, default=None,
                   help="masked positions after the prompt; default: for a train.py model, the canvas it was "
                        f"trained on (its --seq-len minus the longest prompt), else {default.gen_length}")
    g.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size; default: "
                   f"--gen-length for a train.py model, else {default.block_length}")
    g.add_argument("--steps", type=int, default=None, help="default: --gen-length (one token per step)")
    g.add_argument("--temperature", type=float, default=default.temperature, help="0: greedy")
    g.add_argument("--remasking", default=default.remasking, choices=["low_confidence", "random"],
                   help="which predictions each step commits: the most confident, or random ones")
    g.add_argument("--suppress-eos", action="store_true", help="never place EOS in the canvas")
    add_fast_flags(g)
    g.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0, random remasking)")
    g = p.add_argument_group("output")
    g.add_argument("--show", action="store_true", help="draw the canvas after every denoising step, "
                   "masks as ░ (in place on a terminal, one line per step otherwise)")
    g.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt "
                   '({"source", "prompt", "answer"}) instead of the bare answers')
    args = p.parse_args(argv)
    args.prompt = args.prompt or []
    if not args.prompt and not args.prompts_file:
        p.error("give --prompt TEXT (repeatable) or --prompts-file FILE")
    for i, text in enumerate(args.prompt, start=1):
        if not text.strip():
            p.error(f"--prompt {i} is blank")
    if args.system is not None and not args.system.strip():
        p.error("--system is blank")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    trained = trained_seq_len(args.model)
    sampler_args = dict(gen_length=args.gen_length or (None if trained else default.gen_length),
                        block_length=args.block_length or (args.gen_length if trained else default.block_length),
                        steps=args.steps, temperature=args.temperature, remasking=args.remasking,
                        suppress_eos=args.suppress_eos, threshold=args.threshold, prefix_cache=args.prefix_cache)
    if sampler_args["gen_length"] is not None:  # checked now; a trained canvas once the prompts are known
        try:
            SamplerConfig(**sampler_args)
        except ValueError as e:
            p.error(str(e))
    return p, args, sampler_args, trained


def run(args, sampler_args: dict, trained: int | None, stdout) -> list[str]:
    """Prompts and the model's size are checked before the weights load (the canvas of a
    train.py model, which depends on the prompts' tokens, once its tokenizer has)."""
    from dlm.backbones import load_backbone
    prompts = [Prompt([{"role": "user", "content": text}], f"--prompt {i}")
               for i, text in enumerate(args.prompt, start=1)]
    if args.prompts_file:
        prompts += read_prompts(Path(args.prompts_file))
    if args.system is not None:
        for p in prompts:
            if p.messages[0]["role"] != "system":
                p.messages.insert(0, {"role": "system", "content": args.system})
    limit = model_positions(args.model)
    if limit is not None and (sampler_args["gen_length"] or 0) >= limit:
        raise BadFlag(f"--gen-length {sampler_args['gen_length']} leaves no room for a prompt in the model's "
                      f"{limit} positions: give a smaller --gen-length")
    path = Path(args.model).expanduser()
    backbone = load_backbone(str(path) if path.exists() else args.model, dtype=getattr(torch, args.dtype))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    backbone.model.to(device).eval()
    longest = max(len(data.prompt_ids(backbone.tokenizer, p.messages)) for p in prompts)
    sampler = sampler_for(longest, sampler_args, trained)
    ids = [prompt_tokens(backbone.tokenizer, p, sampler.gen_length, limit) for p in prompts]
    answers = generate_text(backbone, ids, sampler, args.batch_size, args.seed,
                            on_step=Show(backbone, stdout) if args.show else None)
    for prompt, answer in zip(prompts, answers):
        print(json.dumps({"source": prompt.where, "prompt": prompt.messages[-1]["content"], "answer": answer},
                         ensure_ascii=False) if args.jsonl else answer, file=stdout)
    return answers


def main(argv=None) -> list[str]:
    parser, args, sampler_args, trained = parse_args(argv)
    try:
        return run(args, sampler_args, trained, sys.stdout)
    except BadFlag as e:
        parser.error(" ".join(str(e).split("\n")))
    except (ValueError, OSError) as e:
        raise SystemExit("error: " + " ".join(str(e).split("\n"))) from None


if __name__ == "__main__":
    main(sys.argv[1:])
