"""
What one optimizer step costs, for each method, side by side: the single-pass claim measured.

    python -m scripts.bench                          # tiny model on CPU, under 2 minutes on 2 cores
    python -m scripts.bench --json out/bench.json    # the same, and the numbers as JSON
    python -m scripts.bench --model llada-8b-shape --layers 8 --device cuda --dtype bfloat16 --fsdp \
        --activation-checkpointing --batch-size 4 --seq-len 1024     # one 80 GB GPU (README)

For each method of dllm_jepa.py on the same model and the same batch (dllm-jepa twice: with
its EMA target and with the online model as target, plus dllm-jepa reading its embedding at
layer L/2, where the target pass stops halfway), one run measures a full optimizer step
(forward, backward, AdamW step, EMA update):
- FLOPs: torch.utils.flop_counter.FlopCounterMode over one step (matmuls and attention;
  AdamW and the EMA lerp are elementwise and count as zero),
- time: the median over --steps steps after --warmup steps (CUDA is synchronised),
- tokens/s: batch tokens / median step time,
- peak memory over the plain (untimed and timed) steps: on CPU the process's peak RSS above
  its RSS before the model was built, each method in a fresh process so peaks never mix, and
  the peak bytes of live tensors; on CUDA max_memory_allocated,
- every ratio to `diffusion` and to `two-pass`,
- MFU, when the device's peak is known (H100, H200, A100 in bf16, or --peak-tflops): model
  FLOPs (3 x the forward, recomputation left out) per second over that peak.
It also measures this machine's dense matmul FLOP/s (a square matmul at the model's width)
and a study of the target pass alone: full pass (the paper's), without the LM head, stopped
at layer L/2, and the same in bf16 autocast or compiled (what makes it cheaper per FLOP).

How to read it. F is one forward pass of the backbone, h its LM head (both printed).
Backward costs 2F, so diffusion = 3F; the paper's DLLM-JEPA adds one no-grad target pass
(4F, 4/3 of diffusion) and LLM-JEPA's two-pass design two gradient-carrying passes (6F):
4/6 = 0.67 is the paper's "33% fewer FLOPs". Our target passes skip the LM head (for both
methods: a target needs no logits), so the exact expectations are (4F - h) / 3F and
(4F - h) / (6F - 3h); reading the embedding at layer L/2 makes the target pass about F/2.
Time ratios follow FLOP ratios only as far as every pass runs at the same FLOP/s: the
"achieved" column shows that, against the matmul peak printed above the table.
"""

import argparse
import copy
import json
import math
import multiprocessing
import platform
import statistics
import time
import weakref
from pathlib import Path

from dlm import flags  # imports no torch: --help and a mistyped flag answer at once

# name -> JEPAConfig fields. "l/2": the embedding is read at layer L/2 (the target pass stops
# there); filled in once the depth is known.
RUNS = {
    "diffusion": dict(method="diffusion"),
    "dllm-jepa": dict(method="dllm-jepa", target="ema"),
    "dllm-jepa-online": dict(method="dllm-jepa", target="online"),
    "dllm-jepa-l/2": dict(method="dllm-jepa", target="ema", embed_layer="L/2"),
    "two-pass": dict(method="two-pass"),
    "l2-anchor": dict(method="l2-anchor"),
}
# Model shapes for the tiny architecture (RMSNorm, rotary, SwiGLU, full attention: LLaDA's).
# Our choice of bench default ("tiny"): width 512, 4 blocks. The train.py tiny model (width
# 128) is elementwise-bound on CPU: norms, rotary and SwiGLU cost as much as its matmuls,
# so its timings say little about the real models, whose steps are matmul-bound. At width
# 512 the step is matmul-bound as LLaDA's is, and still takes well under a second.
SHAPES = {
    "tiny": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1376),
    "tiny-128": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352),
    "llada-8b-shape": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                           intermediate_size=12288, vocab_size=126464, max_position_embeddings=4096),
}
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity), from NVIDIA's datasheets; matched
# in order against torch.cuda.get_device_name(). The denominator of MFU; --peak-tflops for others.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
                    ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]


def parse_args(argv=None):
    p = flags.Parser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help=f"a shape of the tiny architecture, randomly initialised ({', '.join(SHAPES)}), "
                        "or a hub id / save_pretrained folder loaded with backbones.load_backbone")
    g.add_argument("--width", type=int, help="override the shape's hidden size (tiny architecture)")
    g.add_argument("--layers", type=int, help="override the shape's number of blocks")
    g.add_argument("--heads", type=int, help="override the shape's attention heads")
    g.add_argument("--ffn", type=int, help="override the shape's SwiGLU width")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if visible")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameters and compute (AdamW states follow the parameters)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard as train.py does (sharding.shard_model: FSDP2 per block, then the roots; "
                        "one process); with --dtype bfloat16 the weights stay fp32, computed in bf16")
    g.add_argument("--activation-checkpointing", action="store_true", help="with --fsdp: recompute block activations")
    g.add_argument("--cpu-offload", action="store_true", help="with --fsdp on CUDA: sharded states in host memory")
    g = p.add_argument_group("batch (random byte tokens shaped like SFT data)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per step")
    g.add_argument("--seq-len", type=int, default=160, help="tokens per row: prompt, answer, EOS padding")
    g = p.add_argument_group("objective")
    g.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="rows of the table")
    g.add_argument("--truncate-target", action=argparse.BooleanOptionalAction, default=True,
                   help="target passes stop where the embedding is read (JEPAConfig.truncate_target)")
    g.add_argument("--target-autocast", action="store_true",
                   help="run target passes in bf16 autocast (JEPAConfig.target_autocast)")
    g = p.add_argument_group("measurement")
    g.add_argument("--steps", type=int, default=10, help="timed steps per method (the median is reported)")
    g.add_argument("--warmup", type=int, default=1,
                   help="untimed steps first (after step 0, whose losses are recorded; FLOPs and "
                        "tensors are counted on two more steps after the timed ones)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each method in a fresh process, so memory peaks do not mix")
    g.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time one step of each method in turn (default: on CPU; on CUDA one method "
                        "after another, as all models at once may not fit)")
    g.add_argument("--matmul-size", type=int, default=None, help="square matmul size (default: the width)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak dense TFLOP/s at --dtype, for the MFU column (default: known "
                        "for H100, H200, A100 in bf16; otherwise no MFU column)")
    g.add_argument("--study", action=argparse.BooleanOptionalAction, default=True,
                   help="time the target pass alone: full, no head, layer L/2, bf16 autocast")
    g.add_argument("--compile", action="store_true", help="add torch.compile to the target-pass study (slow)")
    g.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    args = p.parse_args(argv)
    if (args.activation_checkpointing or args.cpu_offload) and not args.fsdp:
        p.error("--activation-checkpointing and --cpu-offload go with --fsdp (as in train.py)")
    for flag in ("width", "layers", "heads", "ffn", "batch_size", "seq_len", "steps", "matmul_size", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup}: must be >= 0")
    return args


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads (seconds)
    parse_args()

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dllm_jepa import DLLMJEPA, JEPAConfig
from dlm import backbones, sharding
from train import clip_gradients, make_optimizer

# FlopCounterMode knows CUDA's attention kernels; CPU's flash attention costs the same FLOPs.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v),
}


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(sharding.pick_device(name))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

# -----------------------------------------------------------------------------
# Model, batch, one optimizer step


def build_backbone(args, device, dtype):
    """-> (model, blocks_of, mask id). A named shape is built at random init directly in `dtype`."""
    if args.model in SHAPES:
        overrides = dict(SHAPES[args.model])
        for flag, key in (("width", "hidden_size"), ("layers", "num_hidden_layers"),
                          ("heads", "num_attention_heads"), ("ffn", "intermediate_size")):
            if getattr(args, flag) is not None:
                overrides[key] = getattr(args, flag)
        overrides["max_position_embeddings"] = max(overrides.get("max_position_embeddings", 512), args.seq_len)
        torch.manual_seed(0)
        with torch.device(device):
            bb = backbones.new_tiny_backbone(**overrides)
    else:
        bb = backbones.load_backbone(args.model, dtype=dtype)
    model = bb.model.to(device=device, dtype=dtype)
    return model, bb.family.blocks, bb.mask_token_id


def make_batch(batch_size, seq_len, vocab, eos, device, seed=0):
    """Prompts of 1/8-1/4 of the row, answers filling most of the rest, EOS padding after."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 256), (batch_size, seq_len), generator=g)
    prompt = torch.randint(seq_len // 8, seq_len // 4 + 1, (batch_size,), generator=g)
    answer = ((seq_len - prompt) * (0.6 + 0.4 * torch.rand(batch_size, generator=g))).long()
    ids[torch.arange(seq_len)[None] >= (prompt + answer)[:, None]] = eos
    return ids.to(device), prompt.to(device), answer.to(device)


def config_for(run, args, n_layers):
    fields = dict(RUNS[run], truncate_target=args.truncate_target)
    if args.target_autocast and fields["method"] == "dllm-jepa":
        fields["target_autocast"] = True
    if fields.get("embed_layer") == "L/2":
        fields["embed_layer"] = n_layers // 2
    return JEPAConfig(**fields)


class Trainer:
    """One method's model, optimizer and batch; step() is one full optimizer step."""

    def __init__(self, run, args, device, dtype):
        # FSDP keeps fp32 weights and casts to `dtype` per block (train.py's mixed precision)
        weight_dtype = torch.float32 if args.fsdp else dtype
        model, blocks_of, mask_id = build_backbone(args, device, weight_dtype)
        self.n_layers = len(blocks_of(model))
        self.config = config_for(run, args, self.n_layers)
        torch.manual_seed(1)  # the predictor's init
        self.model = DLLMJEPA(model, self.config, mask_id, truncated_forward=sharding.truncated_forward(blocks_of))
        self.model.to(device=device, dtype=weight_dtype)
        if args.fsdp:
            sharding.init_distributed(device.type)
            sharding.shard_model(self.model, blocks_of, param_dtype=None if dtype == torch.float32 else dtype,
                                 cpu_offload=args.cpu_offload,
                                 activation_checkpointing=args.activation_checkpointing)
        self.optimizer = make_optimizer(self.model, lr=1e-5, weight_decay=0.0)  # train.py's
        self.batch = make_batch(args.batch_size, args.seq_len, model.config.vocab_size,
                                model.config.eos_token_id, device)
        self.device, self.count = device, 0

    def step(self):
        return self.update(self.forward())

    def forward(self):
        gen = torch.Generator(self.device).manual_seed(self.count)  # same masks for every method
        return self.model(*self.batch, generator=gen)

    def update(self, out):
        """Backward, clipping, AdamW step, EMA update: train.py's step."""
        out.loss.backward()
        clip_gradients(self.model, 1.0)  # train.py's default --grad-clip
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_target(self.count, 1000)
        self.count += 1
        return out

    def no_grad_target_flops(self):
        """FLOPs of the step's target pass if it runs without gradient (dllm-jepa), else 0."""
        spec, model = self.config.method_spec, self.model
        if not spec["target_pass"] or spec["target_grad"]:
            return 0
        encoder = model.target_encoder if model.target_encoder is not None else model.backbone
        with torch.no_grad():
            return count_flops(lambda: model.encode(encoder, self.batch[0], logits=False))

# -----------------------------------------------------------------------------
# Measurements


def count_flops(fn):
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def count_step_flops(trainer):
    """-> (FLOPs of one optimizer step as run, model FLOPs of it).

    As run: everything the counter sees, activation checkpointing's recomputation included.
    Model FLOPs, the convention of MFU (PaLM, Chowdhery et al. 2022, appendix B): a backward
    costs twice its forward and nothing is recomputed, so 3 x the forward phase's FLOPs, less
    2 x those of a no-grad target pass (it has no backward). They are what the step would
    count without checkpointing, up to attention's backward (2.5x its forward, not 2x), and
    to two-pass with --no-truncate-target: its target pass computes logits that no loss
    reads, so their backward (2h) is counted here but never run.
    """
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        out = trainer.forward()
        forward = counter.get_total_flops()
        trainer.update(out)
    return counter.get_total_flops(), 3 * forward - 2 * trainer.no_grad_target_flops()


def time_it(fn, device, steps, warmup):
    """Seconds per call, one sample per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return samples


def rss_bytes(field="VmRSS"):
    """Resident memory of this process (VmHWM: its peak since the last reset), Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Run:
    """One row of the table, measured in the process that builds it: the losses of its
    first step, then step times on request, then its peak memory over those plain steps,
    then FLOPs and live-tensor bytes from two instrumented steps."""

    def __init__(self, run, args):
        self.run, self.args = run, args
        self.device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
        if args.threads:
            torch.set_num_threads(args.threads)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self.base = rss_bytes()
        self.trainer = Trainer(run, args, self.device, dtype)
        first = self.trainer.step()  # step 0, before any update: the same batch and masks in every run
        self.losses = dict(loss=first.loss.item(), diffusion=first.diffusion.item(), jepa=first.jepa.item())
        self.samples = []

    def time_steps(self, n, keep=True):
        samples = time_it(self.trainer.step, self.device, n, 0)
        if keep:
            self.samples += samples
        return samples

    def instrumented_steps(self):
        """-> (FLOPs of a step, its model FLOPs, peak live-tensor bytes on CPU or None), from
        two steps more, taken after the peak memory is read: their dispatch modes allocate
        differently from a training step. One runs under the FLOP counter, one (CPU) tracks
        every tensor."""
        flops, model_flops = count_step_flops(self.trainer)
        if self.device.type != "cpu":
            return flops, model_flops, None
        model, optimizer = self.trainer.model, self.trainer.optimizer
        existing = list(model.state_dict().values()) + [
            v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        with TensorBytes(existing) as tracker:
            self.trainer.step()
        return flops, model_flops, tracker.peak

    def summary(self):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            peak = (rss_bytes("VmHWM") or 0) - (self.base or 0)
        flops, model_flops, tensor_peak = self.instrumented_steps()
        config, median = self.trainer.config, statistics.median(self.samples)
        return dict(run=self.run, method=config.method, target=config.target_kind,
                    embed_layer=config.embed_layer, flops=flops, model_flops=model_flops, step_s=median,
                    step_s_min=min(self.samples), step_s_samples=self.samples,
                    tokens_per_s=self.args.batch_size * self.args.seq_len / median,
                    achieved_flops_per_s=flops / median, peak_mem_bytes=peak,
                    peak_tensor_bytes=tensor_peak if tensor_peak is not None else peak,
                    weight_bytes=sum(p.numel() * p.element_size()
                                     for p in self.trainer.model.backbone.parameters()),
                    losses=self.losses)


def serve_run(conn, run, args):
    """A worker process: build one Run, then answer the parent's requests over `conn`."""
    try:
        worker = Run(run, args)
        conn.send("ready")
        while (request := conn.recv()) is not None:
            conn.send(worker.time_steps(*request))
        conn.send(worker.summary())
    except Exception:
        import traceback
        conn.send(RuntimeError(f"run {run}:\n{traceback.format_exc()}"))


class RemoteRun:
    """A Run in a fresh process (forked from a server that has already imported torch, so it
    starts in a fraction of a second): its peak RSS is its own."""

    def __init__(self, run, args, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve_run, args=(child, run, args), daemon=True)
        self.process.start()
        self.receive()

    def receive(self):
        reply = self.conn.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def time_steps(self, n, keep=True):
        self.conn.send((n, keep))
        return self.receive()

    def summary(self):
        self.conn.send(None)
        result = self.receive()
        self.process.join()
        return result


class TensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages while active: on CPU, the measure CUDA's
    max_memory_allocated gives (exact, and blind to the allocator's caching and
    fragmentation, which RSS sees). `existing`: tensors alive before, counted once as a base."""

    def __init__(self, existing=()):
        super().__init__()
        storages = {t.untyped_storage()._cdata: t.untyped_storage() for t in existing}
        self.seen, self.base = set(storages), sum(s.nbytes() for s in storages.values())
        self.live = self.peak = self.base

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (key := t.untyped_storage()._cdata) not in self.seen:
                storage = t.untyped_storage()
                self.seen.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, storage.nbytes())  # when it is freed
        return out


def measure_runs(runs, args):
    """Every row: built (each in its own process with --isolate), warmed up, then timed.

    --interleave (default on CPU) times one step of each run in turn, `steps` rounds, so a
    load that comes and goes on a shared machine hits every run alike; all runs are alive at
    once. Without it (default on CUDA, where one model may fill the GPU) runs go one by one.
    """
    ctx = None
    if args.isolate:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["bench"])
    make = (lambda run: RemoteRun(run, args, ctx)) if ctx else (lambda run: Run(run, args))
    interleave = args.interleave if args.interleave is not None else resolve_device(args.device).type == "cpu"
    results = {}
    if interleave:
        workers = {run: make(run) for run in runs}
        for _ in range(args.warmup):
            for w in workers.values():
                w.time_steps(1, False)
        for _ in range(args.steps):
            for w in workers.values():
                w.time_steps(1)
        return {run: w.summary() for run, w in workers.items()}
    for run in runs:
        w = make(run)
        w.time_steps(args.warmup, False)
        w.time_steps(args.steps)
        results[run] = w.summary()
        del w
    return results


def matmul_flops_per_s(n, device, dtype, seconds=1.0):
    """Dense matmul throughput: (n, n) @ (n, n), repeated for about `seconds`, best of 5 rounds
    (the other processes of a shared machine only ever slow it down)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    a @ b
    sync(device)
    reps = max(1, int(seconds / 5 / max(time.perf_counter() - t0, 1e-6)))
    best = math.inf
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n ** 3 / best


def peak_flops_per_s(args, device):
    """-> (the device's peak FLOP/s at args.dtype or None, where the figure comes from)."""
    if args.peak_tflops is not None:
        if args.peak_tflops <= 0:
            raise SystemExit(f"--peak-tflops {args.peak_tflops}: give the device's peak, a positive number")
        return args.peak_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda" and args.dtype == "bfloat16":
        name = torch.cuda.get_device_name(device)
        for key, tflops in BF16_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"{name}: dense bf16 datasheet peak"
    return None, None


def forward_costs(args):
    """F (one forward of the backbone: logits and all hidden states), h (its LM head), and
    the FLOPs of the target pass variants (no head; stopped at L/2)."""
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    model, blocks_of, mask_id = build_backbone(args, device, dtype)
    ids, _, _ = make_batch(args.batch_size, args.seq_len, model.config.vocab_size,
                           model.config.eos_token_id, device)
    L = len(blocks_of(model))
    with torch.no_grad():
        F_ = count_flops(lambda: model(input_ids=ids, output_hidden_states=True))
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        h = count_flops(lambda: model.get_output_embeddings()(hidden))
    return dict(F=F_, h=h, n_layers=L, params=sum(p.numel() for p in model.parameters()))


def target_pass_study(args, compile_too=False):
    """The target pass alone (no grad, online weights), per variant: FLOPs, median time,
    FLOP/s, and how far its embedding state moves from the full fp32 pass (0: bit-identical).
    Variants are timed in turn, one call each per round, like the runs of the table."""
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    model, blocks_of, mask_id = build_backbone(args, device, dtype)
    model.requires_grad_(False)
    ids, _, _ = make_batch(args.batch_size, args.seq_len, model.config.vocab_size,
                           model.config.eos_token_id, device)
    L = len(blocks_of(model))
    variants = {  # name -> (embed_layer, truncate_target, how)
        "full pass (paper)": (-1, False, None),
        "no LM head": (-1, True, None),
        "layer L/2, full pass": (L // 2, False, None),
        "layer L/2, truncated": (L // 2, True, None),
        "no LM head, bf16 autocast": (-1, True, "autocast"),
        "layer L/2, truncated, bf16 autocast": (L // 2, True, "autocast"),
        # packing: two batches' target views in one pass (twice the FLOPs); what it is worth
        # per FLOP is the GFLOP/s column
        "no LM head, 2 batches packed": (-1, True, "packed"),
    }
    if compile_too:
        variants["no LM head, compiled blocks"] = (-1, True, "compile")
    passes = {}
    for name, (layer, truncate, how) in variants.items():
        encoder = model
        if how == "compile":  # a copy, so that the other variants stay eager
            encoder = copy.deepcopy(model)
            for block in blocks_of(encoder):  # hooks stay outside the compiled code
                block.forward = torch.compile(block.forward, dynamic=False)
        jepa = DLLMJEPA(encoder, JEPAConfig(method="dllm-jepa", target="online", embed_layer=layer,
                                            truncate_target=truncate), mask_id,
                        truncated_forward=sharding.truncated_forward(blocks_of))

        def target_pass(jepa=jepa, encoder=encoder, how=how):
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=how == "autocast"):
                return jepa.encode(encoder, torch.cat([ids, ids]) if how == "packed" else ids,
                                   logits=False)[1][:len(ids)]
        passes[name] = target_pass
    rows = {}
    for name, target_pass in passes.items():
        hidden = target_pass()  # compiles, for the compiled variant
        layer, truncate, how = variants[name]
        reference = passes["full pass (paper)" if layer == -1 else "layer L/2, full pass"]()
        rows[name] = dict(embed_layer=layer, truncate=truncate, how=how, flops=count_flops(target_pass),
                          max_abs_diff=(hidden.float() - reference.float()).abs().max().item())
    samples = {name: [] for name in passes}
    for i in range(args.warmup + args.steps):
        for name, target_pass in passes.items():
            s = time_it(target_pass, device, 1, 0)
            if i >= args.warmup:
                samples[name] += s
    full = statistics.median(samples["full pass (paper)"])
    for name, r in rows.items():
        r["time_s"] = statistics.median(samples[name])
        r.update(flops_per_s=r["flops"] / r["time_s"], time_vs_full=r["time_s"] / full,
                 flops_vs_full=r["flops"] / rows["full pass (paper)"]["flops"])
    return rows


# -----------------------------------------------------------------------------
# Report


def ratios(rows, key):
    out = {}
    for base in ("diffusion", "two-pass"):
        if base in rows:
            out[base] = {run: r[key] / rows[base][key] for run, r in rows.items() if rows[base][key]}
    return out


def check_targets(rows, costs, matmul, device="cpu", isolated=True):
    """The cost targets of the method (the paper's 4F against 6F, and its memory), each with its
    measured value and whether it holds. The memory targets need each run's own peak
    (isolated): in one process the peaks mix."""
    F_, h = costs["F"], costs["h"]
    checks = []

    def add(what, value, limit, note="", op="<="):
        if value is not None:
            met = value <= limit if op == "<=" else value >= limit
            checks.append(dict(target=what, value=value, op=op, limit=limit, met=met, note=note))
    r = lambda a, b, k: rows[a][k] / rows[b][k] if a in rows and b in rows and rows[b][k] else None
    add("FLOPs dllm-jepa / diffusion", r("dllm-jepa", "diffusion", "flops"), 4 / 3 * 1.005,
        f"expected (4F-h)/3F = {(4 * F_ - h) / (3 * F_):.4f}")
    add("FLOPs dllm-jepa / two-pass", r("dllm-jepa", "two-pass", "flops"), 0.67,
        f"expected (4F-h)/(6F-3h) = {(4 * F_ - h) / (6 * F_ - 3 * h):.4f}; with full passes 4/6")
    add("time dllm-jepa / diffusion", r("dllm-jepa", "diffusion", "step_s"), 1.36)
    add("time dllm-jepa / two-pass", r("dllm-jepa", "two-pass", "step_s"), 0.70)
    measures = [("peak_mem_bytes", "peak RSS" if "cpu" in device else "peak memory")] if isolated else []
    measures += [("peak_tensor_bytes", "peak tensors")] if "cpu" in device and isolated else []
    for key, name in measures:
        add(f"{name} dllm-jepa-online / diffusion", r("dllm-jepa-online", "diffusion", key), 1.10)
        if "dllm-jepa" in rows and "diffusion" in rows:
            d = rows["diffusion"]
            add(f"{name} (dllm-jepa (EMA) - one weight copy) / diffusion",
                (rows["dllm-jepa"][key] - d["weight_bytes"]) / d[key], 1.10,
                f"one copy = {d['weight_bytes'] / 2 ** 20:.1f} MiB")
    if "diffusion" in rows:
        add("diffusion achieved / matmul FLOP/s", rows["diffusion"]["achieved_flops_per_s"] / matmul, 0.75,
            op=">=")
    return checks




def report(result):
    rows, costs = result["rows"], result["costs"]
    F_, h, L = costs["F"], costs["h"], costs["n_layers"]
    m = result["matmul"]
    print(f"\nmodel {result['model']}: {costs['params'] / 1e6:.1f}M params, {L} blocks; batch "
          f"{result['batch_size']} x {result['seq_len']} tokens; {result['device']} {result['dtype']}, "
          f"{result['threads']} threads")
    print(f"F (one forward) = {F_ / 1e9:.3f} GFLOP, h (LM head) = {h / 1e9:.4f} GFLOP = {h / F_:.2%} of F")
    print("expected FLOPs, full passes: dllm-jepa/diffusion = 4/3 = 1.3333, dllm-jepa/two-pass = 4/6 = 0.6667")
    print(f"expected FLOPs, target passes without LM head: (4F-h)/3F = {(4 * F_ - h) / (3 * F_):.4f}, "
          f"(4F-h)/(6F-3h) = {(4 * F_ - h) / (6 * F_ - 3 * h):.4f}")
    if result.get("activation_checkpointing"):
        print("activation checkpointing recomputes each block's forward in backward: every "
              "gradient-carrying pass costs up to F - h more (torch stops once every saved tensor is "
              "back), so these expectations do not apply to GFLOP; model FLOPs (MFU) leave it out")
    print(f"dense matmul ({m['n']}x{m['n']}, {result['dtype']}): {m['flops_per_s'] / 1e9:.1f} GFLOP/s")
    peak = result["peak_flops_per_s"]
    if peak:
        print(f"peak for MFU: {peak / 1e12:.1f} TFLOP/s ({result['peak_source']})")
    print()
    cpu = result["device"] == "cpu"
    mem = "RSS MiB" if cpu else "mem MiB"
    head = (f"{'run':16s} {'GFLOP':>7s} {'/diff':>6s} {'/2pass':>6s} {'ms/step':>8s} {'/diff':>6s} "
            f"{'/2pass':>6s} {'tok/s':>7s} {'achvd':>6s}" + (f" {'MFU':>6s}" if peak else "")
            + f" {mem:>8s} {'/diff':>6s} {'/2pass':>6s}"
            + (f" {'tensors':>8s} {'/diff':>6s} {'/2pass':>6s}" if cpu else ""))
    print(head)
    print("-" * len(head))
    ratio = result["ratios"]
    q = lambda key, base, run: (f"{ratio[key][base][run]:6.3f}" if base in ratio[key] and
                                run in ratio[key][base] else "     -")
    both = lambda key, run: f"{q(key, 'diffusion', run)} {q(key, 'two-pass', run)}"
    for run, r in rows.items():
        print(f"{run:16s} {r['flops'] / 1e9:7.2f} {both('flops', run)} {r['step_s'] * 1e3:8.1f} "
              f"{both('step_s', run)} {r['tokens_per_s']:7.0f} {r['achieved_flops_per_s'] / m['flops_per_s']:6.1%}"
              + (f" {r['mfu']:6.1%}" if peak else "")
              + f" {r['peak_mem_bytes'] / 2 ** 20:8.1f} {both('peak_mem_bytes', run)}"
              + (f" {r['peak_tensor_bytes'] / 2 ** 20:8.1f} {both('peak_tensor_bytes', run)}" if cpu else ""))
    print("GFLOP: per optimizer step, as run; achvd: the step's FLOP/s over the matmul's; "
          + ("MFU: model FLOPs (3 x forward, no recomputation) per second over the peak; " if peak else "") + (
        "RSS: peak resident memory above the process's before the model was built, "
        + ("each run in a fresh process" if result["isolated"] else "runs sharing one process (mixed peaks)")
        + "; tensors: peak bytes of live tensors (what CUDA's max_memory_allocated counts)"
        if cpu else "mem: torch.cuda.max_memory_allocated"))
    if result.get("study"):
        print("\ntarget pass alone (no grad), vs the paper's full pass:")
        print(f"{'variant':38s} {'GFLOP':>8s} {'/full':>6s} {'ms':>8s} {'/full':>6s} {'GFLOP/s':>8s} {'max|diff|':>10s}")
        for name, r in result["study"].items():
            print(f"{name:38s} {r['flops'] / 1e9:8.3f} {r['flops_vs_full']:6.3f} {r['time_s'] * 1e3:8.1f} "
                  f"{r['time_vs_full']:6.3f} {r['flops_per_s'] / 1e9:8.1f} {r['max_abs_diff']:10.2e}")
    print("\ncost targets:" + ("" if result["isolated"] else
                               " (memory targets need --isolate: in one process the peaks mix)"))
    for c in result["targets"]:
        print(f"  [{'met' if c['met'] else 'NOT met':7s}] {c['target']}: {c['value']:.3f} "
              f"({c['op']} {c['limit']:.3f})" + (f"; {c['note']}" if c["note"] else ""))


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_offload and resolve_device(args.device).type != "cuda":
        raise SystemExit("--cpu-offload: needs a CUDA device (it offloads GPU parameters to host memory)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    peak, peak_source = peak_flops_per_s(args, device)
    t_start = time.perf_counter()
    costs = forward_costs(args)
    width = SHAPES.get(args.model, {}).get("hidden_size") if args.model in SHAPES else None
    n = args.matmul_size or args.width or width or 1024
    matmul = dict(n=n, flops_per_s=matmul_flops_per_s(n, device, dtype))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the worker processes get the memory this one cached
    rows = measure_runs(args.runs, args)
    for r in rows.values():
        r["mfu"] = r["model_flops"] / r["step_s"] / peak if peak else None
    study = target_pass_study(args, args.compile) if args.study else None
    result = dict(model=args.model, device=str(device), dtype=args.dtype, threads=torch.get_num_threads(),
                  batch_size=args.batch_size, seq_len=args.seq_len, isolated=args.isolate, fsdp=args.fsdp,
                  activation_checkpointing=args.activation_checkpointing, cpu_offload=args.cpu_offload,
                  machine=platform.processor() or platform.machine(), torch=torch.__version__,
                  costs=costs, matmul=matmul, peak_flops_per_s=peak, peak_source=peak_source, rows=rows,
                  ratios={k: ratios(rows, k) for k in ("flops", "step_s", "tokens_per_s", "peak_mem_bytes",
                                                       "peak_tensor_bytes")},
                  study=study, args={k: str(v) for k, v in vars(args).items()})
    result["targets"] = check_targets(rows, costs, matmul["flops_per_s"], str(device), args.isolate)
    result["wall_s"] = time.perf_counter() - t_start
    report(result)
    print(f"\n({result['wall_s']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
