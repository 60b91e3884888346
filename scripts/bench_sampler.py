"""
Generation throughput of our sampler (dlm.sampler.generate) against LLaDA's released loop, side by
side; and (--fast) the exact sampler against its Fast-dLLM speed-ups on a task's questions.

    python -m scripts.bench_sampler                      # tiny model on CPU, about a minute on 2 cores
    python -m scripts.bench_sampler --vocab 126464                 # the same with LLaDA's vocabulary size
    python -m scripts.bench_sampler --model out/run/final --batch-size 16 --gen-length 128 --block-length 32
    python -m scripts.bench_sampler --model GSAI-ML/LLaDA-8B-Instruct --device cuda --dtype bfloat16 \
        --prompt-length 128 --gen-length 256 --block-length 8 --batch-size 4
    python -m scripts.bench_sampler --fast --model out/run/final --data out/run/held_out.jsonl

`reference_generate` below is a plain re-implementation of the loop LLaDA publishes
(github ML-GSAI/LLaDA, generate.py; Nie et al., 2025), written from its description: every
step runs the model on the whole canvas, takes the argmax of (Gumbel-noised) logits at *every*
position, a float64 softmax over the full vocabulary at every position for the confidence,
then commits the most confident masked positions of the current block with a per-row top-k.
Ours (dlm/sampler.py) computes the same thing but upcasts and softmaxes only the masked
positions that can be committed (M <= B x block rows instead of B x T), chooses the
positions with one batched sort instead of a Python loop over rows, and skips a forward
when a step commits nothing.

Both run on the same model, prompts and settings (greedy, low-confidence remasking, equal
prompt lengths, as LLaDA's loop needs), and must produce the same tokens (checked). Figures:
generated tokens/s (batch x gen_length / seconds, median of --repeats), the ratio, and where
the time goes: the model's forward passes vs everything else (the sampler's own work),
timed by wrapping the model's forward.

--fast answers --data's questions (a task of scripts/evaluate.py, chat prompts, its canvas:
the model's trained one unless --gen-length is given) with the exact sampler, then with each --thresholds value
(scripts/generate.py --threshold), each without and with the prefix cache (--prefix-cache, where the
model takes one), in one run (the settings in turn, --repeats rounds), and prints per setting:
tokens/s (answers x gen_length / seconds of generation, median of --repeats; --cpu-time: this
process's CPU seconds, for a shared CPU machine) and its ratio to the exact sampler's;
forwards per answer (forward passes x rows in them / answers: what each answer cost, waiting
for its batch's slower rows included) and how many times fewer; positions per answer (the
cache runs fewer columns per forward); exact match, its change in points, and how many
answers differ from the exact sampler's (a few are printed).
"""

import statistics
import time
from pathlib import Path

from dlm import flags  # imports no torch: --help and a mistyped flag answer at once


def parse_args(argv=None):
    p = flags.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model folder or hub id (default: a new tiny model)")
    p.add_argument("--vocab", type=int, default=None,
                   help="a new tiny model's vocabulary size (LLaDA's: 126464; default: its byte-level 261)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's weights and compute")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    p.add_argument("--prompt-length", type=int, default=32, help="tokens per prompt (random ids, all equal)")
    p.add_argument("--gen-length", type=int, default=None, help="default: 64; --fast: evaluate.py's, a train.py "
                   "model's trained canvas (its --seq-len minus the longest prompt), else 128")
    p.add_argument("--block-length", type=int, default=None, help="default: 32; --fast: evaluate.py's, the trained "
                   "canvas's gen length (one block), else 32")
    p.add_argument("--steps", type=int, default=None, help="default: --gen-length (one token per step)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g = p.add_argument_group("--fast: the exact sampler against --threshold and --prefix-cache on a task")
    g.add_argument("--fast", action="store_true", help="compare the sampler's settings on --data's questions")
    g.add_argument("--data", default=None, help="the questions and references (what evaluate.py --data reads)")
    g.add_argument("--task", default="exact", choices=flags.GENERATION_TASKS, help="how --data is read")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions")
    g.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
                   help="the --threshold values compared with the exact sampler (generate.py --threshold)")
    g.add_argument("--examples", type=int, default=3, help="changed answers printed per setting")
    g.add_argument("--cpu-time", action="store_true", help="time generation by this process's CPU time instead "
                   "of the wall clock (one thread on a shared, loaded CPU machine: the wall clock counts the others)")
    args = p.parse_args(argv)
    if args.vocab is not None and args.model is not None:
        p.error("--vocab sizes a new tiny model: give it without --model")
    if args.vocab is not None and args.vocab < 261:
        p.error(f"--vocab {args.vocab}: must hold the byte-level tokenizer's 261 ids")
    if args.fast and not (args.model and args.data):
        p.error("--fast needs --model and --data (the questions)")
    if args.cpu_time and (args.device != "cpu" or not args.fast):
        p.error("--cpu-time times --fast on the CPU (a GPU's work is not this process's CPU time)")
    if args.fast and args.steps is not None:
        p.error("--fast compares the exact sampler at one token per step with thresholds: give no --steps")
    if not args.fast:
        args.gen_length, args.block_length = args.gen_length or 64, args.block_length or 32
    for flag in ("batch_size", "prompt_length", "gen_length", "block_length", "repeats", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    return args


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads (seconds)
    parse_args()

import torch
import torch.nn.functional as F

import tiny_model
from dlm import backbones, data
from dlm.sampler import (PREFIX_CACHE_MODEL_TYPES, SamplerConfig, canvas_args, check_room, generate, generate_text,
                         trained_seq_len)
from tasks import load_items
from tasks.common import exact_match, max_positions
from tasks.generation import canvas_for


def reference_generate(model, prompt, mask_id, gen_length, block_length, steps, temperature=0.0):
    """LLaDA's generate loop, restated: prompt (B, P) of equal lengths -> canvas (B, P + gen_length)."""
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, device=prompt.device)], dim=1)
    n_blocks = gen_length // block_length
    steps_per_block = steps // n_blocks
    for b in range(n_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        n_masked = (x[:, start:end] == mask_id).sum(1, keepdim=True)               # (B, 1)
        base, extra = n_masked // steps_per_block, n_masked % steps_per_block
        transfer = base.repeat(1, steps_per_block)
        for row in range(B):  # the first `extra` steps commit one more
            transfer[row, : int(extra[row])] += 1
        for i in range(steps_per_block):
            masked = x == mask_id                                                   # (B, T)
            logits = model(x).logits                                                # (B, T, V)
            if temperature > 0:  # Gumbel-max in float64: exp(l) / (-log u)^T
                logits = logits.double()
                u = torch.rand_like(logits)
                logits = logits.exp() / (-torch.log(u)) ** temperature
            x0 = logits.argmax(-1)                                                  # (B, T)
            p = F.softmax(logits.double(), dim=-1)                                  # (B, T, V)
            confidence = torch.gather(p, -1, x0[..., None]).squeeze(-1)             # (B, T)
            confidence[:, end:] = -float("inf")
            x0 = torch.where(masked, x0, x)
            confidence = torch.where(masked, confidence, -float("inf"))
            commit = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(B):
                _, chosen = torch.topk(confidence[row], k=int(transfer[row, i]))
                commit[row, chosen] = True
            x[commit] = x0[commit]
    return x


class ForwardTimer:
    """Wraps model.forward to add up the seconds spent inside it (synchronised on CUDA), the
    calls, the rows they ran (batch sizes summed) and the positions (rows x columns summed)."""

    def __init__(self, model):
        self.model = model
        self.inner = model.forward
        self.reset()

        def timed(*args, **kwargs):
            sync(model)
            t = time.perf_counter()
            out = self.inner(*args, **kwargs)
            sync(model)
            self.seconds += time.perf_counter() - t
            self.calls += 1
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self.rows += ids.shape[0]
            self.positions += ids.numel()
            return out
        model.forward = timed

    def reset(self):
        self.seconds, self.calls, self.rows, self.positions = 0.0, 0, 0, 0


def sync(model):
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def measure(fn, model, timer, repeats, clock=time.perf_counter):
    """fn() -> (median seconds, forward seconds and calls of the median run, its output,
    the rows and positions its forwards ran). clock: wall time, or this process's CPU time."""
    runs = []
    for _ in range(repeats):
        timer.reset()
        sync(model)
        t = clock()
        out = fn()
        sync(model)
        runs.append((clock() - t, timer.seconds, timer.calls, out, timer.rows, timer.positions))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fast:
        try:
            return compare_fast(args)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        config = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    torch.manual_seed(0)
    if args.model is None:
        tokenizer = tiny_model.make_tokenizer()
        model = tiny_model.make_tiny_model(tokenizer, **({"vocab_size": args.vocab} if args.vocab else {}))
        mask_id, shift = tokenizer.mask_token_id, False
    else:
        backbone = backbones.load_backbone(args.model, dtype=getattr(torch, args.dtype))
        model, mask_id, shift = backbone.model, backbone.mask_token_id, backbone.family.shift_logits
        if shift:
            raise SystemExit(f"error: --model {args.model}: LLaDA's loop does not shift logits (Dream does); "
                             "compare on a LLaDA-style model")
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    vocab = model.config.vocab_size
    prompts = torch.randint(0, min(vocab, 256), (args.batch_size, args.prompt_length), device=args.device)
    timer = ForwardTimer(model)
    tokens = args.batch_size * args.gen_length
    with torch.no_grad():
        ours_s, ours_fwd, ours_calls, ours, *_ = measure(
            lambda: generate(model, list(prompts), mask_id, config), model, timer, args.repeats)
        ref_s, ref_fwd, ref_calls, ref, *_ = measure(
            lambda: reference_generate(model, prompts.clone(), mask_id, config.gen_length, config.block_length,
                                       config.steps), model, timer, args.repeats)
    same = (ours == ref[:, args.prompt_length:]).float().mean().item()
    rows = {"ours (dlm/sampler.py)": (ours_s, ours_fwd, ours_calls), "LLaDA's loop": (ref_s, ref_fwd, ref_calls)}
    print(f"model: {args.model or 'new tiny model'} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, vocab {vocab}) on {args.device}, {args.dtype}, {torch.get_num_threads()} threads; "
          f"batch {args.batch_size}, prompt {args.prompt_length}, gen {config.gen_length}, "
          f"block {config.block_length}, steps {config.steps}, greedy, low-confidence")
    print(f"{'sampler':20} {'tokens/s':>10} {'seconds':>8} {'forwards':>8} {'in forward':>10} {'elsewhere':>10}")
    for name, (s, fwd, calls) in rows.items():
        print(f"{name:20} {tokens / s:10.1f} {s:8.3f} {calls:8d} {fwd / s:10.0%} {(s - fwd) / s:10.0%}")
    print(f"ours / LLaDA's loop: {ref_s / ours_s:.2f}x the tokens/s; same tokens at {same:.1%} of positions")
    return {"ours_tokens_per_s": tokens / ours_s, "reference_tokens_per_s": tokens / ref_s, "same": same,
            "ours_forward_fraction": ours_fwd / ours_s, "reference_forward_fraction": ref_fwd / ref_s}


# -----------------------------------------------------------------------------
# --fast: the exact sampler against parallel decoding and the prefix cache


def fast_settings(thresholds, cache: bool) -> dict[str, dict]:
    """Setting name -> SamplerConfig fields on top of the exact sampler's."""
    settings = {}
    for threshold in [None, *thresholds]:
        name = "exact" if threshold is None else f"threshold {threshold:g}"
        settings[name] = {"threshold": threshold}
        if cache:
            settings[name + " + cache"] = {"threshold": threshold, "prefix_cache": True}
    return settings


def compare_fast(args) -> dict:
    """The exact sampler and every setting of fast_settings on --data's questions, one table."""
    backbone = backbones.load_backbone(args.model, dtype=getattr(torch, args.dtype))
    model = backbone.model.to(args.device).eval()
    items = load_items(args.task, Path(args.data))[: args.limit]
    trained = trained_seq_len(args.model)
    base = canvas_args(args.gen_length, args.block_length, trained)  # evaluate.py's canvas
    prompts = [data.prompt_ids(backbone.tokenizer, item.prompt) for item in items]
    settings = fast_settings(args.thresholds, model.config.model_type in PREFIX_CACHE_MODEL_TYPES)
    configs = {name: canvas_for(backbone, items, base | extra, trained) for name, extra in settings.items()}
    check_room(configs["exact"].gen_length, max_positions(model))
    timer = ForwardTimer(model)
    runs = {name: [] for name in configs}
    with torch.no_grad():
        for _ in range(args.repeats):  # round robin: a change in the machine's load hits every setting alike
            for name, config in configs.items():
                runs[name].append(measure(lambda: generate_text(backbone, prompts, config, args.batch_size),
                                          model, timer, 1, time.process_time if args.cpu_time else time.perf_counter))
    rows = {}
    for name, measured in runs.items():
        seconds, _, _, answers, row_forwards, positions = sorted(measured, key=lambda r: r[0])[len(measured) // 2]
        rows[name] = dict(seconds=seconds, answers=answers, forwards=row_forwards / len(items),
                          positions=positions / len(items),
                          exact=statistics.mean(exact_match(a, i.reference) for a, i in zip(answers, items)))
    exact, gen = rows["exact"], configs["exact"].gen_length
    print(f"model: {args.model} on {args.device}, {args.dtype}, {torch.get_num_threads()} threads; {args.data}: "
          f"{len(items)} questions, gen {gen}, block {configs['exact'].block_length}, batch {args.batch_size}, "
          f"greedy; median of {args.repeats}{', CPU time' if args.cpu_time else ''}")
    print(f"{'setting':22} {'tokens/s':>9} {'speed-up':>8} {'forwards/answer':>15} {'fewer':>6} "
          f"{'positions/answer':>16} {'exact match':>11} {'points':>7} {'changed':>7}")
    for name, row in rows.items():
        row |= dict(tokens_per_s=len(items) * gen / row["seconds"], speedup=exact["seconds"] / row["seconds"],
                    fewer=exact["forwards"] / row["forwards"], points=100 * (row["exact"] - exact["exact"]),
                    changed=[i for i, (a, b) in enumerate(zip(row["answers"], exact["answers"])) if a != b])
        print(f"{name:22} {row['tokens_per_s']:9.0f} {row['speedup']:7.2f}x {row['forwards']:15.1f} "
              f"{row['fewer']:5.2f}x {row['positions']:16.0f} {row['exact']:11.1%} {row['points']:+7.1f} "
              f"{len(row['changed']):7d}")
    for name, row in rows.items():
        for i in row["changed"][: args.examples]:
            print(f"  {name}: {items[i].prompt[-1]['content']!r} -> {row['answers'][i]!r} "
                  f"(exact sampler {exact['answers'][i]!r}, reference {items[i].reference!r})")
    met = [name for name, row in rows.items()
           if name != "exact" and row["fewer"] >= 2 and row["speedup"] >= 2 and row["points"] >= -1]
    print("goal (>= 2x fewer forwards and >= 2x tokens/s at <= 1 point of exact match lost): "
          + (f"met by {', '.join(met)}" if met else "met by no setting"))
    return {name: {k: v for k, v in row.items() if k != "answers"} for name, row in rows.items()}


if __name__ == "__main__":
    main()
