"""
LoRA against full fine-tuning on the tiny model, side by side: trainable parameters, the
memory of the target encoder's (or the L2 anchor's) frozen copy, and the time of one optimizer
step (forward, backward, AdamW, EMA update), for dllm-jepa and l2-anchor.

    python -m scripts.bench_lora                          # train.py's default shape, 1 thread
    python -m scripts.bench_lora --width 512 --layers 8   # the shape of docs/measurements.md

Under LoRA the EMA target is a second adapter (dlm/lora.py: EMAAdapterTarget), so its copy is
the adapter's size, and the L2 anchor needs no copy at all (lora_delta_sq).
"""

import time

from dlm import flags  # imports no torch: --help and a mistyped flag answer at once


def parse_args(argv=None):
    p = flags.Parser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--width", type=int, default=128, help="tiny model width (train.py's default)")
    p.add_argument("--layers", type=int, default=4, help="tiny model blocks")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / rank)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps); the median is printed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    for flag in ("width", "layers", "batch", "seq_len", "rank", "steps", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.width % 8:
        p.error(f"--width {args.width}: must be a multiple of 8 (4 heads of an even size)")
    return args


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads (seconds)
    parse_args()

import torch

import tiny_model
from dllm_jepa import DLLMJEPA, JEPAConfig
from dlm import backbones, sharding
from dlm.lora import DEFAULT_TARGETS, EMAAdapterTarget, apply_lora, dllm_jepa_kwargs


def report(width: int, layers: int, rank: int, alpha: float, batch: int, seq_len: int, steps: int, threads: int):
    """Print, for the tiny model (train.py's default shape), trainable parameters, the target
    encoder's memory and the time of one optimizer step, full fine-tuning against LoRA."""
    torch.set_num_threads(threads)
    shape = tiny_model.shape(width, layers, seq_len)
    size = lambda params: sum(p.numel() for p in params)
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)
    rows = []
    for method in ("dllm-jepa", "l2-anchor"):
        for use_lora in (False, True):
            torch.manual_seed(0)
            backbone = backbones.new_tiny_backbone(**shape)
            if use_lora:
                apply_lora(backbone.model, backbone.family.name, rank, alpha)
            config = JEPAConfig(method=method)
            kwargs = dllm_jepa_kwargs(backbone.model, config) if use_lora else {}
            model = DLLMJEPA(backbone.model, config,
                             truncated_forward=sharding.truncated_forward(backbone.family.blocks), **kwargs)
            optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 256, (batch, seq_len), generator=generator)
            prompts = torch.full((batch,), seq_len // 4)
            times = []
            for step in range(steps + 2):  # 2 warm-up steps
                start = time.perf_counter()
                model(ids, prompts, generator=generator).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                model.update_target(step + 1, steps + 2)
                times.append(time.perf_counter() - start)
            if method == "dllm-jepa":
                target = (EMAAdapterTarget.ema_pairs(model.target_encoder)[0] if use_lora
                          else list(model.target_encoder.parameters()))
            else:
                target = [] if use_lora else list(model.anchor.parameters())
            rows.append(dict(method=method, lora=use_lora, trainable=size(model.trainable_parameters()),
                             backbone_trainable=size(p for p in backbone.model.parameters() if p.requires_grad),
                             copy_bytes=nbytes(target), ms=1000 * sorted(times[2:])[len(times[2:]) // 2]))
    total = size(backbones.new_tiny_backbone(**shape).model.parameters())
    print(f"tiny model: width {width}, {layers} blocks, {total:,} parameters; LoRA rank {rank}, alpha {alpha} "
          f"on {', '.join(DEFAULT_TARGETS['tiny-dlm'])}; batch {batch} x {seq_len} tokens, fp32, "
          f"{threads} thread(s), median of {steps} steps")
    print("| method | fine-tuning | trainable (backbone) | trainable (+ predictor) | frozen copy for target/anchor | ms/step |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        what = "EMA target" if row["method"] == "dllm-jepa" else "anchor"
        print(f"| {row['method']} | {'LoRA' if row['lora'] else 'full'} | {row['backbone_trainable']:,} | "
              f"{row['trainable']:,} | {what}: {row['copy_bytes'] / 2**20:.2f} MiB | {row['ms']:.0f} |")
    return rows


if __name__ == "__main__":
    args = parse_args()
    report(args.width, args.layers, args.rank, args.alpha, args.batch, args.seq_len, args.steps, args.threads)
