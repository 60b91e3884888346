"""
Sampling from a masked-diffusion LM: the LLaDA sampler (Nie et al., 2025, "Large Language
Diffusion Models"), written from its description. Its command line is scripts/generate.py.

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
out); `sampler_for` settles the canvas a train.py model was trained on.
"""

import functools
import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

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


def check_settings(settings: dict):
    """SamplerConfig's checks of its arguments, before any model loads: all of them when the canvas
    is known (gen_length given), else those that need none (--threshold, with --steps and
    --remasking), so --threshold 0 is refused before the weights load, not after."""
    if settings["gen_length"] is not None:
        SamplerConfig(**settings)
    elif settings.get("threshold") is not None:
        check_threshold(SimpleNamespace(**settings))

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


def canvas_args(gen_length: int | None, block_length: int | None, trained: int | None) -> dict:
    """--gen-length and --block-length as given, else their defaults: for a model whose trained
    canvas is known (trained_seq_len) None, which sampler_for settles once the prompts are known
    (the trained canvas, one block); for any other model SamplerConfig's 128 masks in blocks of 32."""
    if trained is None:
        return dict(gen_length=gen_length or SamplerConfig.gen_length,
                    block_length=block_length or SamplerConfig.block_length)
    return dict(gen_length=gen_length, block_length=block_length or gen_length)


def check_room(gen_length: int | None, positions: int | None, flag: str = "--gen-length", error=ValueError):
    """`error` (one line naming the flag) when gen_length masks leave no room for a prompt in the
    model's positions (None: unknown, or not yet settled)."""
    if gen_length is not None and positions is not None and gen_length >= positions:
        raise error(f"{flag} {gen_length} leaves no room for a prompt in the model's {positions} positions: "
                    f"give a smaller {flag}")


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
