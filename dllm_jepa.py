"""
DLLM-JEPA: a JEPA objective for fine-tuning masked-diffusion language models.

This file is the method, top to bottom, importing only torch; data, the command line and
sharding live elsewhere. It holds:
1. the forward masking process of LLaDA (Nie et al., 2025, "Large Language Diffusion Models"),
2. the masked-diffusion SFT loss (LLaDA's form, and a token-normalised variant), and the
   same loss and argmax accuracy on the real answer tokens (what scored EOS padding hides),
3. the two views of one sequence: a lightly masked *context*, a heavily masked *target*,
4. the predictor: a residual MLP on the pooled context embedding (or transformer layers),
5. the JEPA distance (cosine, or smooth-L1 on layer-normalised targets) and the collapse
   check the paper reports: the effective rank of pooled embeddings,
6. the target encoder: an EMA copy of the backbone (I-JEPA, Assran et al., 2023) or the
   online model itself under no_grad,
7. the single-pass update: ONE gradient-carrying forward of the context view gives both the
   diffusion loss and the context embedding; ONE no-grad forward of the target encoder on
   the target view gives the target. Loss = diffusion + lambda * JEPA,
8. four methods from one config field, so every comparison shares every other line:
   `diffusion`, `dllm-jepa`, `two-pass` (LLM-JEPA's design, Huang et al., 2025: the target
   view carries gradient through the online model) and `l2-anchor` (+ mu ||theta - theta_0||^2).

Paper: "DLLM-JEPA: Joint Embedding Predictive Architectures for Masked Diffusion Language
Models", arXiv 2606.00091. Its full text is not public to us: choices it does not pin down
(view rates, nesting, predictor, pooling, distance) are ours, marked "our choice" below and
argued in tutorial.md.

Cost, with F the FLOPs of one forward pass (backward = 2F):
  diffusion 3F | dllm-jepa 3F + 1F = 4F | two-pass 2 x 3F = 6F  ->  4/6 = 0.67, the paper's 33%.
Target passes need no logits, so they stop where the embedding is read (truncate_target): with
h the LM head's FLOPs, 4F - h against 6F - 3h; reading at layer L/2, the target costs ~F/2.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Configuration

# What each method runs. target_pass: encode a target view; target_grad: that pass carries
# gradient through the online model; anchor: add the L2-to-base penalty.
METHODS = {
    "diffusion": dict(target_pass=False, target_grad=False, anchor=False),
    "dllm-jepa": dict(target_pass=True, target_grad=False, anchor=False),
    "two-pass": dict(target_pass=True, target_grad=True, anchor=False),
    "l2-anchor": dict(target_pass=False, target_grad=False, anchor=True),
}

# Ranges (low, high) of the diffusion time t of each view; t ~ U[low, high] per sequence.
# The paper names a "Wide-t" configuration without (to us) saying what it is; two readings:
# - narrow: the fixed rates a public reproduction reads from the paper (context 0.2,
#   target 0.7). The diffusion loss is then trained at t = 0.2 only.
# - wide-pair: a secondary summary's reading of "Wide-t": a wider pair of fixed rates,
#   context 0.1, target 0.9. The diffusion loss is trained at t = 0.1 only.
# - wide-range (our reading, and our default): the context t spans (almost) LLaDA's whole
#   U(0, 1], so the diffusion loss is exactly the baseline's and the denoiser still learns to
#   start from full masks; the target is drawn from [max(0.5, t_context), 1]: never lighter
#   than the context and always hiding at least half the answer, so predicting it needs
#   content, not copying.
VIEW_PRESETS = {
    "narrow": dict(context_t=(0.2, 0.2), target_t=(0.7, 0.7)),
    "wide-pair": dict(context_t=(0.1, 0.1), target_t=(0.9, 0.9)),
    "wide-range": dict(context_t=(0.01, 1.0), target_t=(0.5, 1.0)),
}

# The values a field of JEPAConfig may take, where they are a few names.
CHOICES = dict(method=METHODS, views=VIEW_PRESETS, target_view=("heavier", "lighter", "clean"),
               loss_norm=("answer", "token"), loss_weight=("inverse-t", "flat"), pooling=("answer", "visible", "token"),
               predictor=("mlp", "transformer"), predictor_init=("identity", "random"), distance=("cosine", "smooth_l1"))


@dataclass
class JEPAConfig:
    """Every hyperparameter of the objective. Presets fill context_t/target_t when unset."""
    method: str = "dllm-jepa"           # one of METHODS
    # masked diffusion (LLaDA)
    eps: float = 1e-3                   # mask probability p = (1 - eps) * t + eps
    pad_is_answer: bool = True          # LLaDA SFT: EOS padding is masked and scored as answer
    loss_norm: str = "answer"           # "answer": / answer length per row (LLaDA SFT); "token": / all scored tokens
    loss_weight: str = "inverse-t"      # each masked token's CE / p ("inverse-t": LLaDA, the ELBO) or
                                        # x 1 ("flat": MaskGIT's plain masked CE; lower variance)
    # views
    views: str = "wide-range"           # a VIEW_PRESETS name
    context_t: tuple | None = None      # (low, high) of the context view's t; None = preset
    target_t: tuple | None = None       # (low, high) of the target view's t; None = preset
    nested: bool = True                 # one mask contains the other (one uniform draw per token)
    target_view: str = "heavier"        # "heavier": the light context predicts a heavier target (the paper's
                                        # summaries); "lighter": t ~ U(0, t_context), the better-informed view
                                        # is the target (I-JEPA, data2vec); "clean": the target is unmasked
    # embedding and predictor
    embed_layer: int = -1               # index into hidden_states (0 = embeddings, -1 = last); train.py: the middle
    truncate_target: bool = True        # target pass stops at embed_layer, no LM head: same z
                                        # (where DLLMJEPA is given a truncated_forward)
    pooling: str = "answer"             # "answer": mean over answer tokens; "visible": over unmasked
                                        # non-padding tokens; "token": no pooling, per-token targets
    predictor: str = "mlp"              # "mlp": residual MLP on the pooled vector; "transformer": attention
                                        # layers over the context view's token states, then pooled
    predictor_depth: int = 2            # residual MLP blocks / transformer layers
    predictor_mult: int = 2             # MLP hidden width = mult * backbone width
    predictor_init: str = "identity"    # "identity": each residual branch's last layer starts at zero;
                                        # "random": PyTorch's default init throughout
    # JEPA loss
    jepa_lambda: float = 1.0            # total = diffusion + jepa_lambda * jepa
    distance: str = "cosine"            # "cosine" | "smooth_l1"
    # target encoder (dllm-jepa only)
    target: str | None = None           # "ema" (default) | "online" (no copy, under no_grad)
    ema_momentum: tuple = (0.996, 1.0)  # linear from start to end over training (I-JEPA)
    target_autocast: bool = False       # target pass in bf16 autocast: faster, not bit-identical
    # l2-anchor only
    anchor_mu: float = 1e-2

    def __post_init__(self):  # validates only: the fields stay as given (replace/asdict round-trip)
        for name, choices in CHOICES.items():
            check(getattr(self, name) in choices, f"{name}={getattr(self, name)!r}: choose one of {list(choices)}")
        for name, t_range in (("context_t", self.context_range), ("target_t", self.target_range)):
            check(len(t_range) == 2, f"{name}={t_range}: give (low, high)")
            lo, hi = t_range
            check(0 < lo <= 1 and 0 < hi <= 1, f"{name}=({lo}, {hi}): t must lie in (0, 1]")
            check(lo <= hi, f"{name}=({lo}, {hi}): low must not exceed high")
        check(self.target_t is None or self.target_view == "heavier",
              f"target_t={self.target_t} applies to target_view='heavier' only (a lighter or clean target's "
              "rate follows the context's)")
        check(self.target_view != "heavier" or self.target_range[1] >= self.context_range[1],
              f"target_t={self.target_range} ends below context_t={self.context_range}: the target "
              "view is the heavier one, so its high end must be >= the context's")
        check(0 <= self.eps < 1, f"eps={self.eps}: must lie in [0, 1)")
        check(self.jepa_lambda >= 0, f"jepa_lambda={self.jepa_lambda}: must be >= 0")
        check(self.anchor_mu >= 0, f"anchor_mu={self.anchor_mu}: must be >= 0")
        check(self.predictor_depth >= 1, f"predictor_depth={self.predictor_depth}: must be >= 1")
        check(self.predictor_mult >= 1, f"predictor_mult={self.predictor_mult}: must be >= 1")
        check(self.predictor != "transformer" or self.pooling != "token",
              "predictor='transformer' pools its output like the target: use pooling 'answer' or 'visible'")
        m0, m1 = self.ema_momentum
        check(0 <= m0 <= m1 <= 1, f"ema_momentum={self.ema_momentum}: need 0 <= start <= end <= 1")
        check(not self.target_autocast or self.method == "dllm-jepa",
              "target_autocast applies to dllm-jepa's no-grad target pass only")
        ours = self.method == "dllm-jepa"  # the one method with a target encoder of its own
        check(self.target in ((None, "ema", "online") if ours else (None,)), f"target={self.target!r}" + (
            ": 'ema' or 'online'" if ours else f" applies only to method='dllm-jepa' ({self.method} has no "
            "separate target encoder): leave it unset"))

    def total(self, diffusion, jepa, anchor):
        """The loss a step backpropagates: diffusion + jepa_lambda * jepa + anchor."""
        return diffusion + self.jepa_lambda * jepa + anchor

    @property
    def method_spec(self) -> dict:
        return METHODS[self.method]

    @property
    def context_range(self) -> tuple:
        return tuple(self.context_t or VIEW_PRESETS[self.views]["context_t"])

    @property
    def target_range(self) -> tuple:
        return tuple(self.target_t or VIEW_PRESETS[self.views]["target_t"])

    @property
    def target_kind(self) -> str | None:
        """The target encoder: "ema" or "online" for dllm-jepa, None for the other methods."""
        return (self.target or "ema") if self.method == "dllm-jepa" else None


def check(condition: bool, message: str):
    if not condition:
        raise ValueError(message)

# -----------------------------------------------------------------------------
# 1. Forward masking process and 2. the masked-diffusion loss (LLaDA)


def mask_probability(t: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaDA: p = (1 - eps) t + eps, so even t = 0 masks with probability eps > 0."""
    return (1 - eps) * t + eps


def answer_regions(prompt_lengths, answer_lengths, seq_len, pad_is_answer):
    """Boolean (B, T) masks: `answer` = the real answer tokens; `scored` = what may be masked
    and scored (the answer, plus the EOS padding after it when pad_is_answer). The prompt is
    in neither: it is never masked and never scored."""
    pos = torch.arange(seq_len, device=prompt_lengths.device)[None, :]  # (1, T)
    start = prompt_lengths[:, None]                                      # (B, 1)
    answer = (pos >= start) & (pos < start + answer_lengths[:, None])
    scored = (pos >= start) if pad_is_answer else answer
    return answer, scored


def diffusion_loss(logits, input_ids, masked, p, scored, loss_norm="answer", shift=False):
    """Masked-diffusion loss: cross-entropy on masked tokens, each divided by its row's p.

    loss_norm="answer" (LLaDA SFT): per row, divide by the number of scored tokens, then
    average over rows. loss_norm="token": divide the batch sum by all scored tokens.
    Only masked positions are gathered before the float cast: (B, T, V) is never upcast.
    shift: logits[:, i] predicts token i + 1 (Dream); read so, not shifted in a (B, T, V)
    copy (position 0 is prompt, never masked). p = 1 everywhere is the flat weighting
    (JEPAConfig.loss_weight): each masked token counts once, whatever the row's t.
    """
    ce = F.cross_entropy(masked_logits(logits, masked, shift).float(), input_ids[masked],
                         reduction="none")                                               # (M,)
    weighted = torch.zeros(masked.shape, device=ce.device, dtype=ce.dtype)
    weighted[masked] = ce / p[:, None].expand_as(masked)[masked]                         # (B, T)
    if loss_norm == "answer":
        return (weighted.sum(1) / scored.sum(1).clamp(min=1)).mean()
    return weighted.sum() / scored.sum().clamp(min=1)


def masked_logits(logits, masked, shift=False):
    """Logits (M, V) of the masked positions (B, T) in row-major order; with shift, position
    i's prediction is read from output i - 1 (Dream)."""
    return logits[:, :-1][masked[:, 1:]] if shift else logits[masked]


@torch.no_grad()
def answer_metrics(logits, input_ids, masked, p, answer, shift=False):
    """What the diffusion loss hides when EOS padding is scored: the same loss in its weighting
    (p: the row's mask probability, or 1 for loss_weight flat) on the real answer tokens only
    (padding excluded; LLaDA's per-row normalisation by answer length), and the share of masked
    answer tokens whose argmax is right (teacher-forced). Both 0-d, 0 with no masked answer."""
    hidden = masked & answer
    loss = diffusion_loss(logits, input_ids, hidden, p, answer, "answer", shift)
    right = masked_logits(logits, hidden, shift).argmax(-1) == input_ids[hidden]
    return loss, right.float().sum() / max(right.numel(), 1)

# -----------------------------------------------------------------------------
# 3. Two-rate views


@dataclass
class View:
    ids: torch.Tensor     # (B, T) input with masked positions replaced by the mask id
    masked: torch.Tensor  # (B, T) bool
    t: torch.Tensor       # (B,) diffusion time of each row
    p: torch.Tensor       # (B,) mask probability of each row


def sample_times(batch_size, context_t, target_t, device, generator=None, target_view="heavier"):
    """t_context ~ U[context_t]. The target's t: "heavier": U[max(target_low, t_context),
    target_high], never lighter than the context; "lighter": U(0, t_context); "clean": 0."""
    u = torch.rand(2, batch_size, device=device, generator=generator)
    t_context = context_t[0] + (context_t[1] - context_t[0]) * u[0]
    if target_view != "heavier":
        return t_context, t_context * u[1] * (target_view == "lighter")
    low = torch.clamp(t_context, min=target_t[0])
    return t_context, low + (target_t[1] - low) * u[1]


def make_views(input_ids, scored, t_context, t_target, mask_token_id, eps, nested=True,
               generator=None):
    """Mask the same sequence twice. Each scored token is masked independently with its
    view's p. Nested (our default): both views threshold ONE uniform draw per token, so the
    heavier view's masks contain the lighter view's and each view is still exactly
    Bernoulli(p) per token. Not nested: independent draws."""
    u_context = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    u_target = u_context if nested else torch.rand(input_ids.shape, device=input_ids.device,
                                                   generator=generator)
    views = []
    for t, u in ((t_context, u_context), (t_target, u_target)):
        p = mask_probability(t, eps)
        masked = (u < p[:, None]) & scored
        views.append(View(torch.where(masked, mask_token_id, input_ids), masked, t, p))
    return views

# -----------------------------------------------------------------------------
# 4. Embeddings and the predictor


def embed(hidden, region, pooling):
    """The JEPA embedding from one layer's hidden states (B, T, C): the mean over `region` (B, T),
    then a LayerNorm without parameters, as a public reproduction reads the paper -> (B, C);
    pooling="token": per-token LayerNorm -> (B, T, C). An empty region pools to zeros (no weight)."""
    if pooling == "token":
        return F.layer_norm(hidden, hidden.shape[-1:])
    weights = region.to(hidden.dtype)[..., None]                       # (B, T, 1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)   # (B, C)
    return F.layer_norm(pooled, pooled.shape[-1:])


class Predictor(nn.Module):
    """Residual MLP z -> z + W2 gelu(W1 LN(z)), `depth` times, on the pooled vector (B, C). On one
    pooled vector, a transformer layer (the reproduction's "k transformer layers") reduces to a
    residual linear map (attention over a single token) and this residual MLP. init="identity"
    (our default) starts each W2 at zero, so the predictor starts as the identity and the first
    JEPA gradients already teach the backbone; "random" keeps PyTorch's init (the paper's)."""

    def __init__(self, width: int, depth: int = 2, mult: int = 2, init: str = "identity"):
        super().__init__()
        self.blocks = nn.ModuleList(mlp(width, mult) for _ in range(depth))
        for block in self.blocks if init == "identity" else ():
            zero_(block[-1])

    def forward(self, z):  # (..., C) -> (..., C)
        for block in self.blocks:
            z = z + block(z)
        return z


class TokenPredictor(nn.Module):
    """`depth` pre-norm transformer layers over the context view's token states (B, T, C):
    the reading of "k transformer layers" that acts on a sequence. Each token attends to the
    view's content tokens (`attend`, (B, T)); a sinusoidal code of its position is added to
    the queries and keys only, so attention knows token order while the residual stream is
    the backbone's own. Its output is pooled like the target (embed). init as Predictor's:
    "identity" zeroes each branch's last layer, so it starts as the identity on the states."""

    def __init__(self, width: int, depth: int = 2, mult: int = 2, init: str = "identity"):
        super().__init__()
        self.heads = max(1, width // 64)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(depth))
        self.attn_out = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.mlps = nn.ModuleList(mlp(width, mult) for _ in range(depth))
        for layer in (*self.attn_out, *(m[-1] for m in self.mlps)) if init == "identity" else ():
            zero_(layer)

    def forward(self, h, attend):  # (B, T, C), (B, T) bool -> (B, T, C)
        B, T, C = h.shape
        code = sinusoid(T, C, h.device).to(h.dtype)                    # (T, C)
        split = lambda x: x.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, C/H)
        for norm, qkv, out, block in zip(self.attn_norms, self.qkv, self.attn_out, self.mlps):
            q, k, v = qkv(norm(h)).split(C, dim=-1)                     # (B, T, C) each
            a = F.scaled_dot_product_attention(split(q + code), split(k + code), split(v),
                                               attn_mask=attend[:, None, None, :])
            h = h + out(a.transpose(1, 2).reshape(B, T, C))
            h = h + block(h)
        return h


def mlp(width, mult):
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, mult * width), nn.GELU(),
                         nn.Linear(mult * width, width))


def zero_(linear):
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


def sinusoid(T, C, device):
    """The Transformer's fixed position code (Vaswani et al., 2017), (T, C)."""
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, C, 2, device=device) * (-math.log(10000.0) / C))
    angle = pos * freq                                                  # (T, C/2)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)[:, :C]

# -----------------------------------------------------------------------------
# 5. The JEPA distance, and the collapse check


def jepa_loss(prediction, target, weights, distance):
    """Weighted mean distance between predicted and target embeddings: prediction, target (B, C)
    pooled or (B, T, C) per token; weights (B,) or (B, T), 0 where there is nothing to compare.
    cosine: 1 - cos(pred, target); smooth_l1: on the layer-normalised target, as I-JEPA."""
    if distance == "cosine":
        d = 1 - F.cosine_similarity(prediction.float(), target.float(), dim=-1)
    else:
        d = F.smooth_l1_loss(prediction.float(), target.float(), reduction="none").mean(-1)
    weights = weights.to(d.dtype)
    return (d * weights).sum() / weights.sum().clamp(min=1)


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> float:
    """Effective rank of embeddings z (N, C) (Roy & Vetterli, 2007; RankMe, Garrido et al.,
    2023): exp of the entropy of the singular values normalised to sum 1. It is 1 when every
    embedding lies on one line (a collapsed encoder) and min(N, C) when they spread evenly
    over that many directions; the paper reports it staying high under DLLM-JEPA."""
    s = torch.linalg.svdvals(z.reshape(-1, z.shape[-1]).double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))

# -----------------------------------------------------------------------------
# 6. Target encoder: EMA schedule


def ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear momentum schedule, a pure function of the step (resume needs no replay)."""
    return start + (end - start) * min(step / max(total_steps, 1), 1.0)

# -----------------------------------------------------------------------------
# 7. The single-pass update, and 8. the four methods


@dataclass
class JEPAOutput:
    loss: torch.Tensor            # what to backpropagate
    diffusion: torch.Tensor       # masked-diffusion loss of the context view
    jepa: torch.Tensor            # JEPA distance (0 for methods without a target pass)
    anchor: torch.Tensor          # mu * ||theta - theta_base||^2 (0 unless l2-anchor)
    # diagnostics, without gradient
    answer_loss: torch.Tensor     # diffusion loss on the real answer tokens (padding excluded)
    answer_accuracy: torch.Tensor # argmax accuracy on the masked answer tokens
    embedding: torch.Tensor       # pooled context embedding (B, C), for effective_rank (token: answer mean)


class DLLMJEPA(nn.Module):
    """A backbone plus what the objective needs: predictor, target encoder, anchor.

    backbone: any module called as backbone(input_ids=..., output_hidden_states=True) that
    returns `.logits` (B, T, V) and `.hidden_states` (a tuple of (B, T, C)); the tiny model,
    LLaDA and Dream all do. mask_token_id defaults to backbone.config.mask_token_id.
    shift_logits: the backbone's output at position i predicts token i + 1 (Dream); the loss
    reads it so (position 0, always prompt, is never scored).
    truncated_forward: (model, ids, layer) -> hidden_states[layer] from a pass that stops there,
    or None where it cannot (backbone and FSDP knowledge: dlm.sharding.truncated_forward builds
    it); without it target passes run whole: the same embedding, at a full forward's cost.
    target_encoder: an EMA target built elsewhere instead of a frozen copy of the backbone
    (lora.EMAAdapterTarget: the backbone run with an EMA copy of its LoRA adapter), called like
    the backbone; its `ema_pairs()` names the (EMA, online) tensors update_target lerps.
    anchor_fn: backbone -> ||theta - theta_base||^2 without a frozen copy (lora.lora_delta_sq:
    the adapter's exact weight change); None: against a frozen copy of the backbone.
    """

    def __init__(self, backbone: nn.Module, config: JEPAConfig, mask_token_id: int | None = None,
                 shift_logits: bool = False, truncated_forward=None, target_encoder: nn.Module | None = None,
                 anchor_fn=None):
        super().__init__()
        self.backbone, self.config, self.shift_logits = backbone, config, shift_logits
        self.truncated_forward, self.anchor_fn = truncated_forward, anchor_fn
        self.mask_token_id = (mask_token_id if mask_token_id is not None
                              else backbone.config.mask_token_id)
        spec = config.method_spec
        embeddings = backbone.get_input_embeddings()  # its width is the hidden size, in every family
        predictor = TokenPredictor if config.predictor == "transformer" else Predictor
        self.predictor = (predictor(embeddings.embedding_dim, config.predictor_depth, config.predictor_mult,
                                    config.predictor_init).to(embeddings.weight.dtype)
                          if spec["target_pass"] else None)
        # Frozen copies, registered as submodules so they are saved, moved and sharded with
        # the backbone. The EMA target and the anchor are never in the optimizer.
        check(target_encoder is None or config.target_kind == "ema",
              f"a target_encoder is given but {config.method} has no EMA target (target={config.target!r})")
        check(anchor_fn is None or spec["anchor"], f"an anchor_fn is given but {config.method} has no anchor")
        if config.target_kind == "ema" and target_encoder is None:
            target_encoder = frozen_copy(backbone)
        self.target_encoder = target_encoder
        self.anchor = frozen_copy(backbone) if spec["anchor"] and anchor_fn is None else None

    def encode(self, model, ids, logits=True):
        """One forward pass -> (logits as the model gives them, hidden states at embed_layer).
        logits=False (target passes) with truncate_target: (None, hidden), the same tensor from
        truncated_forward's pass that stops where it is read (l/L of a forward, no LM head)."""
        if not logits and self.config.truncate_target and self.truncated_forward is not None:
            hidden = self.truncated_forward(model, ids, self.config.embed_layer)
            if hidden is not None:
                return None, hidden
        out = model(input_ids=ids, output_hidden_states=True)
        return out.logits, out.hidden_states[self.config.embed_layer]

    def pool_region(self, view, answer, content):
        """Positions an embedding averages over: the answer tokens (default, and per token), or
        with pooling="visible" every unmasked token of the view's `content` (prompt and answer,
        not the EOS padding, whether or not pad_is_answer scores it)."""
        if self.config.pooling == "visible":
            return ~view.masked & content
        return answer

    def forward(self, input_ids, prompt_lengths, answer_lengths=None, generator=None) -> JEPAOutput:
        """input_ids (B, T): prompt, answer, EOS padding. prompt_lengths (B,). answer_lengths
        (B,): real answer tokens (EOS included); None = everything after the prompt."""
        cfg, spec = self.config, self.config.method_spec
        B, T = input_ids.shape
        if self.shift_logits and bool((prompt_lengths < 1).any()):
            raise ValueError("shifted-logit backbones need a prompt of >= 1 token in every row: "
                             "position 0 has no prediction of its own")
        if answer_lengths is None:
            answer_lengths = T - prompt_lengths
        answer, scored = answer_regions(prompt_lengths, answer_lengths, T, cfg.pad_is_answer)
        content = answer | (torch.arange(T, device=input_ids.device) < prompt_lengths[:, None])  # (B, T)
        t_context, t_target = sample_times(B, cfg.context_range, cfg.target_range, input_ids.device, generator,
                                           cfg.target_view)
        context, target = make_views(input_ids, scored, t_context, t_target, self.mask_token_id,
                                     cfg.eps, cfg.nested, generator)
        if cfg.target_view == "clean":  # the target sees the whole sequence: no masks, not even eps's
            target = View(input_ids, torch.zeros_like(target.masked), t_target, torch.zeros_like(target.p))
        jepa = anchor = input_ids.new_zeros((), dtype=torch.float32)

        # 1. Target forward: no grad through the EMA copy (dllm-jepa), or with grad through
        #    the online model (two-pass, LLM-JEPA's 6F design).
        if spec["target_pass"]:
            encoder = self.target_encoder if self.target_encoder is not None else self.backbone
            with torch.set_grad_enabled(spec["target_grad"] and torch.is_grad_enabled()):
                with torch.autocast(input_ids.device.type, torch.bfloat16, enabled=cfg.target_autocast):
                    _, hidden = self.encode(encoder, target.ids, logits=False)
                target_region = self.pool_region(target, answer, content)
                z_target = embed(hidden, target_region, cfg.pooling)
            del hidden  # (B, T, C): not kept through the context pass

        # 2. Context forward: the one gradient-carrying pass yields both losses.
        logits, hidden = self.encode(self.backbone, context.ids)
        weight_p = context.p if cfg.loss_weight == "inverse-t" else torch.ones_like(context.p)
        diffusion = diffusion_loss(logits, input_ids, context.masked, weight_p, scored, cfg.loss_norm,
                                   self.shift_logits)
        context_region = self.pool_region(context, answer, content)
        with torch.set_grad_enabled(spec["target_pass"] and torch.is_grad_enabled()):
            z_context = embed(hidden, context_region, cfg.pooling)  # every method: the collapse check
        if spec["target_pass"]:
            prediction = (embed(self.predictor(hidden, content), context_region, cfg.pooling)
                          if cfg.predictor == "transformer" else self.predictor(z_context))
            weights = (answer if cfg.pooling == "token"  # rows (or tokens) with both sides defined
                       else context_region.any(1) & target_region.any(1))
            jepa = jepa_loss(prediction, z_target, weights, cfg.distance)
        if spec["anchor"]:
            anchor = cfg.anchor_mu * (self.anchor_fn(self.backbone) if self.anchor_fn
                                      else l2_distance(self.backbone, self.anchor))
        answer_loss, answer_accuracy = answer_metrics(logits, input_ids, context.masked, weight_p, answer,
                                                      self.shift_logits)  # in the diffusion loss's weighting
        pooled = z_context if cfg.pooling != "token" else embed(hidden, answer, "answer")
        return JEPAOutput(cfg.total(diffusion, jepa, anchor), diffusion, jepa, anchor,
                          answer_loss, answer_accuracy, pooled.detach())

    @torch.no_grad()
    def update_target(self, step: int, total_steps: int):
        """After the optimizer step: target <- m * target + (1 - m) * online (a no-op without EMA)."""
        if self.target_encoder is None:
            return
        m = ema_momentum(step, total_steps, *self.config.ema_momentum)
        if hasattr(self.target_encoder, "ema_pairs"):  # built elsewhere: it names its tensors
            target, online = self.target_encoder.ema_pairs()
        else:
            target = list(self.target_encoder.parameters())
            online = [p.detach() for p in self.backbone.parameters()]
        torch._foreach_lerp_(target, online, 1.0 - m)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        """Frozen copies stay in eval mode (no dropout in the target), whatever the wrapper's mode."""
        super().train(mode)
        for frozen in (self.target_encoder, self.anchor):
            if frozen is not None:
                frozen.eval()
        return self


def frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(False).eval()


def l2_distance(model: nn.Module, base: nn.Module) -> torch.Tensor:
    """||theta - theta_base||^2 summed over every parameter (L2-SP, Li et al., 2018). Under FSDP
    each rank sums its own shards (to_local): the gradient 2 (theta - theta_base) is elementwise,
    so each shard gets exactly its own part; the value is this rank's share."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    return sum((local(p).float() - local(b).float()).pow(2).sum()
               for p, b in zip(model.parameters(), base.parameters()))
