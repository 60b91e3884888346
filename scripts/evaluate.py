"""
Evaluate a masked-diffusion LM checkpoint on everything the DLLM-JEPA paper measures.

    python -m scripts.evaluate --model out/run/final --task nl-rx-synth --data synth_dev.jsonl
    python -m scripts.evaluate --model GSAI-ML/LLaDA-8B-Instruct --task gsm8k --data test.jsonl \
        --shots 4 --fewshot-data train.jsonl --gen-length 256 --block-length 8 --steps 256
    python -m scripts.evaluate --model out/run/final --task probe --data wikitext2/valid.txt
    python -m scripts.evaluate --model out/run/final --task mmlu --data mmlu/test --shots 5 --fewshot-data mmlu/dev
    python -m scripts.evaluate --model out/run/final --task drift --base out/base/final --data valid.txt
    torchrun --nproc_per_node 8 -m scripts.evaluate --model GSAI-ML/LLaDA-8B-Instruct --dtype bfloat16 \
        --task gsm8k --data test.jsonl --gen-length 256 --block-length 8 --steps 256 --out gsm8k.json

What it measures, each in its module of tasks/ (tasks/__init__.py lists them with the papers):
1. task metrics on answers from the LLaDA sampler (tasks/generation.py): exact match
   (tasks/common.py), GSM8K (tasks/gsm8k.py), NL-RX-SYNTH / TURK (tasks/nl_rx.py), Spider
   (tasks/spider.py), Django (tasks/django.py),
2. the held-out diffusion-loss probe, and with --base forgetting (tasks/probe.py),
3. MMLU as a sanity check (tasks/mmlu.py),
4. drift from --base, per layer, as JSON and a PNG plot (tasks/drift.py).

This file is the command line that ties them: it reads and checks the data, loads the model
(and an adapter), runs the task and writes the results. Every backbone goes through
backbones.load_backbone (the tiny model, LLaDA, Dream).

Under torchrun (`torchrun --nproc_per_node N -m scripts.evaluate ...`) every process loads the whole
model (on cuda:LOCAL_RANK; bf16 with --dtype bfloat16), computes every N-th batch of answers,
questions or windows (tasks.common.map_batches: one process's batches, masks and seeds, so the
scores are exactly one process's) and gathers the rest; rank 0 alone prints and writes the
results. Drift runs on rank 0 alone (the others wait). A bad input stops every process with one
line; a process that stops or hangs stops the rest after --collective-timeout.
"""

import contextlib
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

from dlm import bounds, flags  # neither imports torch: --help and a mistyped flag answer at once


class Parser(flags.Parser):
    def error(self, message):
        """A usage error, printed by rank 0 alone under torchrun (every rank gets the same flags);
        the others exit a few seconds later, silently: torchrun stops every process as soon as
        one has ended, which must not stop rank 0 before its line."""
        if os.environ.get("RANK", "0") != "0":
            time.sleep(PARSE_ERROR_GRACE_S)
            self.exit(2)
        super().error(message)


PARSE_ERROR_GRACE_S = 5.0


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a save_pretrained folder (train.py's final/) or a hub id "
                   "(GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B, ...), or a peft adapter folder "
                   "(train.py's final/adapter: its adapter_config.json names the base)")
    g.add_argument("--adapter", default=None, help="a peft LoRA adapter folder to apply to --model (merged into "
                   "its weights before evaluating; --base, if any, is loaded without it)")
    g.add_argument("--base", default=None, help="the checkpoint fine-tuning started from: needed by "
                   "--task drift; with --task probe, also reports forgetting (probe loss - base's)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights' dtype (bfloat16 for LLaDA/Dream on a GPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if visible; under torchrun each process on cuda:LOCAL_RANK")
    g = p.add_argument_group("task and data")
    g.add_argument("--task", required=True, choices=flags.TASKS,
                   help="a generation task, probe (held-out diffusion loss), mmlu, or drift (from --base)")
    g.add_argument("--data", required=True, help="exact: any .jsonl/.json train.py reads (e.g. a run's "
                   "held_out.jsonl), scored by exact match; gsm8k: .jsonl (question/answer); nl-rx-*: .jsonl (chat "
                   "messages); spider: Spider's .json or .jsonl; django: X.anno (with X.code beside it) or .jsonl; "
                   "probe/drift: a plain-text file; mmlu: a .csv or a folder of them; or a dataset of the paper by "
                   "name, NAME[:split], from the hub (gsm8k, nl-rx-synth, nl-rx-turk, spider, django, mmlu, wikitext2; "
                   "default split test; docs/datasets.md)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    g.add_argument("--shots", type=int, default=0, help="few-shot exemplars (gsm8k, nl-rx, spider, django, mmlu)")
    g.add_argument("--fewshot-data", default=None, help="where the exemplars come from (same format as --data; "
                   "mmlu: the dev folder, exemplars of the question's subject)")
    g.add_argument("--spider-tables", default=None, help="Spider's tables.json for schemas in the prompt "
                   "(default: tables.json beside --data, if any)")
    g.add_argument("--spider-db", default=None, help="Spider's database folder (DIR/<db_id>/<db_id>.sqlite): "
                   "adds execution accuracy")
    g = p.add_argument_group("generation (LLaDA sampler, dlm/sampler.py)")
    flags.add_sampler_flags(g)
    g.add_argument("--batch-size", type=int, default=8, help="prompts (or windows) per forward")
    g = p.add_argument_group("probe and drift")
    g.add_argument("--probe-seq-len", type=int, default=128, help="tokens per held-out window")
    g.add_argument("--probe-windows", type=int, default=32, help="windows from the start of the text")
    g.add_argument("--probe-grid", type=int, default=8, help="t grid points (midpoints of equal bins)")
    g.add_argument("--probe-seed", type=int, default=0, help="the masks' seed: keep it to compare checkpoints")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="write the results as JSON here (default: print only)")
    g.add_argument("--plot", default=None, help="drift: PNG path (default: beside --out)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr, items/s; under torchrun "
                   "rank 0's, counting its own items times the number of processes), transformers' loading bar "
                   "neither")
    g = p.add_argument_group("several processes (torchrun --nproc_per_node N -m scripts.evaluate ...)")
    g.add_argument("--collective-timeout", type=float, default=30.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others in a collective before it stops "
                        "with an error (another process stopped or hung)")
    args = p.parse_args(argv)
    for flag in ("limit", "batch_size", "gen_length", "block_length", "probe_seq_len", "probe_windows", "probe_grid"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')}={value}: must be >= 1")
    if args.shots < 0:
        p.error(f"--shots={args.shots}: must be >= 0")
    if not args.collective_timeout > 0:
        p.error(f"--collective-timeout {args.collective_timeout}: must be > 0 (minutes)")
    bounds.check(p, args)  # overflows and typos: a seed past 64 bits, --steps 1000000000, ...
    return p, args


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads (seconds)
    parse_args()

import torch

from dlm import checkpoints, data, files, hub, lora, sharding
from dlm.sampler import canvas_args, check_settings, trained_seq_len
from tasks import GENERATION_TASKS, check_references, hub_items, load_items
from tasks.common import Shard, max_positions, with_shots
from tasks.drift import drift_report, plot_drift
from tasks.generation import canvas_for, evaluate_generation
from tasks.mmlu import load_mmlu, mmlu_accuracy
from tasks.probe import ProbeConfig, diffusion_probe, read_text_file


def load(name: str, args, device=None):
    """A model folder or hub id (train.py's final/, a merged LoRA export too); a peft adapter
    folder, loaded onto the base its adapter_config.json names; or, the first time --model is
    loaded, --model with --adapter. An adapter is merged into the base's weights
    (PeftModel.merge_and_unload), so what follows sees a plain model, as from a merged export."""
    from dlm.backbones import load_backbone
    adapter = None
    if getattr(args, "adapter", None) and name == args.model and not getattr(args, "adapter_loaded", False):
        adapter, args.adapter_loaded = Path(args.adapter), True  # --base, even if the same, goes without
        try:
            lora.read_adapter_config(adapter)
        except ValueError as e:
            raise ValueError(f"--adapter {e}") from None
    elif (Path(name) / "adapter_config.json").is_file() and not (Path(name) / "config.json").is_file():
        adapter = Path(name)
        name = lora.read_adapter_config(adapter)["base_model_name_or_path"]
        if not name:
            raise ValueError(f"{adapter}: its adapter_config.json names no base model; give --model BASE "
                             f"--adapter {adapter}")
    backbone = load_backbone(name, dtype=getattr(torch, args.dtype))
    if adapter is not None:
        backbone.model = lora.load_adapter(backbone.model, adapter, name)
    backbone.model.to(device or sharding.pick_device(args.device)).eval()
    return backbone


def read_inputs(args) -> SimpleNamespace:
    """--data (and the exemplars, Spider's tables and gold queries, the sampler flags) read and
    checked, before any model loads: a bad --data costs seconds, not an 8B load."""
    path = Path(args.data)
    inputs = SimpleNamespace(path=path, probe=ProbeConfig(args.probe_seq_len, args.probe_windows, args.probe_grid,
                                                          args.probe_seed, batch_size=args.batch_size))
    if args.task == "drift" and not args.base:
        raise ValueError("--task drift needs --base (the checkpoint fine-tuning started from)")
    if args.shots and args.task not in ("probe", "drift") and not args.fewshot_data:
        raise ValueError("--shots needs --fewshot-data (where the exemplars come from)")
    if args.task in GENERATION_TASKS:
        inputs.trained = trained = trained_seq_len(args.adapter or args.model)
        inputs.sampler_args = sampler_arguments(args, trained)
        check_settings(inputs.sampler_args)  # flags checked before the model loads
        tables = Path(args.spider_tables) if args.spider_tables else None
        inputs.spider_db = Path(args.spider_db) if args.spider_db else None
        items = lambda source: read(source, args.task) or load_items(args.task, Path(source), tables)
        inputs.items = items(args.data)[: args.limit]
        check_references(args.task, inputs.items, path, inputs.spider_db)
        if args.shots:
            inputs.items = with_shots(inputs.items, items(args.fewshot_data), args.shots)
    elif args.task == "mmlu":
        inputs.questions = (read(args.data, "mmlu") or load_mmlu(path))[: args.limit]
        inputs.exemplars = (read(args.fewshot_data, "mmlu") or load_mmlu(Path(args.fewshot_data))) if args.shots else []
    else:
        inputs.text = read(args.data, args.task) or read_text_file(path)
    check_model_names(args)  # last: the data's errors come first, as before any model loads
    return inputs


def sampler_arguments(args, trained: int | None) -> dict:
    """SamplerConfig's arguments from the flags; gen_length None: the trained canvas, once the
    prompts are known (a train.py model's, `trained` its --seq-len)."""
    return canvas_args(args.gen_length, args.block_length, trained) | dict(
        steps=args.steps, temperature=args.temperature, remasking=args.remasking, suppress_eos=args.suppress_eos,
        threshold=args.threshold, prefix_cache=args.prefix_cache)


def check_model_names(args):
    """--model and --base that name a local folder (a path, not a hub id 'org/name') must exist:
    transformers would take a missing one for a hub repo id and refuse its form. What a folder
    holds is load()'s to judge (a model, or a peft adapter without config.json)."""
    for flag in ("model", "base"):
        name = getattr(args, flag)
        problem = name and checkpoints.model_folder_problem(name, f"--{flag}")
        if problem and not Path(name).expanduser().is_dir():
            raise ValueError(problem)


def read(source: str, task: str):
    """A dataset of the paper by name (hub.py: gsm8k, spider, mmlu, wikitext2, ...; NAME:split),
    when no such file or folder exists here: what --task reads from it. None for a path."""
    if Path(source).exists() or not hub.registered(source):
        return None
    return hub_items(source, task)


def evaluate_task(args, inputs, backbone, base, shard: Shard) -> dict:
    """The task on the loaded model(s) -> the results (every process computes its share and
    gets them all: tasks.common.map_batches)."""
    result = {"model": args.model, "task": args.task, "data": str(inputs.path), "processes": shard.world}
    probe = inputs.probe
    if args.task in GENERATION_TASKS:
        sampler = canvas_for(backbone, inputs.items, inputs.sampler_args, inputs.trained)
        result |= evaluate_generation(backbone, args.task, inputs.items, sampler, args.batch_size, args.seed,
                                      inputs.spider_db, probe, shard)
    elif args.task == "mmlu":
        result |= mmlu_accuracy(backbone, inputs.questions, args.shots, inputs.exemplars, args.batch_size, shard)
    else:
        limit = max_positions(backbone.model)
        if limit is not None and probe.seq_len > limit:
            raise ValueError(f"--probe-seq-len {probe.seq_len} is longer than the model's {limit} positions: "
                             f"give at most {limit}")
        windows = data.text_rows(inputs.text, backbone.tokenizer, probe.seq_len, inputs.path, "--probe-seq-len",
                                 probe.windows)
        if args.task == "probe":
            result |= diffusion_probe(backbone, windows, probe, shard)
            if base is not None:
                base_loss = diffusion_probe(base, windows, probe, shard, "probe (base)")["probe_loss"]
                result |= {"base_probe_loss": base_loss, "forgetting": result["probe_loss"] - base_loss}
        else:
            result |= drift_report(backbone, base, windows, probe)
    return result


def run(args, env: sharding.Env | None = None) -> dict | None:
    """One evaluation, as the command line describes it -> a JSON-ready dict. Three stages:
    the inputs read and checked (before the model loads), the model (and --base) loaded, the
    task run; under torchrun (env) each stage ends with every process (together), so that one
    bad input or load stops them all with one line. Each process loads the whole model (on
    cuda:LOCAL_RANK), runs a share of the batches and gets every result; drift runs on rank 0
    alone (the others wait, then get None): it is a few forwards, not worth splitting."""
    world = env.world_size if env else 1
    shard = Shard(env.rank if env else 0, world, not args.no_progress)
    alone = env is not None and env.rank != 0 and args.task == "drift"
    device = env.device if env else sharding.pick_device(args.device)
    inputs = together(env, lambda: read_inputs(args))

    def load_models():
        backbone = load(args.model, args, device)
        return backbone, (load(args.base, args, device) if args.base and args.task in ("probe", "drift") else None)
    backbone, base = together(env, lambda: (None, None) if alone else load_models())
    return together(env, lambda: None if alone else evaluate_task(args, inputs, backbone, base, shard))


def together(env: sharding.Env | None, work):
    """work() -> its value, a ValueError or OSError it raises -> SystemExit with one line
    ("error: ..."). Under torchrun every process runs work (ranks other than 0 with their
    stdout and stderr silenced), then waits for the others (on the gloo start-up group, so
    a long stage on rank 0 is waited for): if any failed, every process stops, rank 0 printing
    the first failure (naming its rank when it is not 0), the others silent, so a bad input
    is one line and no process is left waiting in a collective for one that has stopped."""
    error = value = None
    try:
        with silenced(env is not None and env.rank != 0):
            value = work()
    except (ValueError, OSError) as e:
        error = f"error: {e}"
    if env is None or env.world_size == 1:
        if error:
            raise SystemExit(error)
        return value
    errors = [None] * env.world_size
    torch.distributed.all_gather_object(errors, error, group=env.start_up)
    first = next((rank for rank, e in enumerate(errors) if e), None)
    if first is not None:
        if env.rank == 0:  # before leave's barrier: torchrun stops every process once one has ended
            print(errors[0] if first == 0 else errors[first].replace("error: ", f"error: rank {first}: ", 1),
                  file=sys.stderr, flush=True)
        sharding.leave(env)
        raise SystemExit(1)
    return value


@contextlib.contextmanager
def silenced(quiet: bool):
    """stdout and stderr to nowhere while quiet (a rank other than 0: it prints only errors)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere), contextlib.redirect_stderr(nowhere):
        yield


def join(args) -> sharding.Env | None:
    """Under torchrun (WORLD_SIZE > 1): the process group (gloo on CPU, nccl on CUDA, each
    process on cuda:LOCAL_RANK), collectives timing out after --collective-timeout; ranks other
    than 0 quiet (no transformers warnings or bars). None for one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return None
    files.stop_on_second_signal()  # even a rank stuck in a collective stops on a second SIGTERM
    env = sharding.init_distributed(args.device, timedelta(minutes=args.collective_timeout))
    if env.rank != 0:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    return env


def main(argv=None) -> dict | None:
    parser, args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.no_progress:  # transformers' "Loading weights" bar too: stderr keeps what went wrong alone
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    env = join(args)
    main_rank = env is None or env.rank == 0
    try:
        together(env, lambda: check_outputs(args) if main_rank else None)  # rank 0 alone writes
        result = run(args, env)
    except RuntimeError as e:
        if env is None or not sharding.is_timeout(e):
            raise
        sharding.exit_on_timeout(env, args.collective_timeout)
    if main_rank:  # the results printed and written once
        try:
            summary = {k: v for k, v in result.items() if k not in ("answers", "by_subject", "per_t")}
            print(files.strict_json(summary, indent=2))
            write_outputs(args, result)
        except SystemExit as e:
            if env is None:
                raise
            sys.stdout.flush()  # all of it before leave's barrier: torchrun stops every process once one has
            print(e.code, file=sys.stderr, flush=True)  # failed, rank 0 too
            sharding.leave(env)
            raise SystemExit(1) from None
    if env is not None:
        sys.stdout.flush()
        sharding.leave(env)  # every rank waits for rank 0's writing, then the group goes down in order
    return result


def plot_path(args) -> Path | None:
    """Where --task drift draws its plot (--plot, else beside --out, else drift.png); None for other tasks."""
    if args.task != "drift":
        return None
    return Path(args.plot) if args.plot else (Path(args.out).with_suffix(".png") if args.out else Path("drift.png"))


def check_outputs(args):
    """Before the data and the model load (ValueError, one line naming the flags): --out and the
    plot must be files that can be written (not an existing folder, no file in the way of their
    folder, a place that accepts a new file), apart from each other and from every input, and not
    inside a model folder or a checkpoint."""
    inputs = [(f"--{flag.replace('_', '-')}", getattr(args, flag, None))
              for flag in ("model", "adapter", "base", "data", "fewshot_data", "spider_tables", "spider_db")]
    inputs = [(flag, path) for flag, path in inputs if path is not None and Path(path).expanduser().exists()]
    outputs = [(flag, path) for flag, path in (("--out", args.out), ("--plot", plot_path(args))) if path is not None]
    for i, (flag, path) in enumerate(outputs):
        files.check_writable(path, flag, folder=False)  # first: an existing folder is not a results file
        problem = (files.output_overlap(path, flag, inputs + outputs[:i])
                   or checkpoints.inside_other_files(path, flag))
        if problem:
            raise ValueError(problem)


def write_outputs(args, result: dict):
    """Write the results (atomically: the old file or the new, never a cut one) and the drift
    plot (drawn beside it, then renamed). A write that still fails costs no finished work: the
    full results are printed to stdout first (unless --out holds them), then one error line."""
    text = files.strict_json(result, indent=2)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write_text(out, text)
        except (OSError, ValueError) as e:
            print(text)
            line = str(e) if isinstance(e, ValueError) else f"{out}: could not write ({files.cause(e)})"
            raise SystemExit(f"error: --out {line}; the results are printed above in full") from None
        print(f"results: {out}")
    if plot := plot_path(args):
        tmp = plot.with_name(f"{plot.stem}.tmp{plot.suffix}")
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_drift({Path(args.model).name: result}, tmp, f"drift of {args.model} from {args.base}")
            os.replace(tmp, plot)
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not args.out:
                print(text)
            raise SystemExit(f"error: --plot {plot}: could not write the plot ({files.cause(e)}); the results "
                             f"are {'in ' + str(args.out) if args.out else 'printed above in full'}") from None
        print(f"plot: {plot}")

if __name__ == "__main__":
    main(sys.argv[1:])
