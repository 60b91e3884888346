"""
Answer prompts from the command line with the LLaDA sampler (dlm/sampler.py).

    python -m scripts.generate --model out/run/final --prompt "reverse hello" --show
    python -m scripts.generate --model GSAI-ML/LLaDA-8B-Instruct --dtype bfloat16 --prompts-file questions.jsonl \
        --gen-length 256 --block-length 8 --steps 256 --jsonl

Each prompt is rendered through the model's chat template (data.prompt_ids, as
evaluate.py does) and one answer per prompt is printed (`--jsonl`: one JSON object per prompt).
Prompts come from `--prompt` (repeatable) and `--prompts-file` (one prompt per line; .jsonl:
one object per line with "prompt", "question" or chat "messages"; .json: a list of them);
`--system` adds a system message. The sampler's flags are evaluate.py's. `--show` draws the
canvas after every step that commits tokens, masks as ░, so the unmasking can be watched
(redrawn in place on a terminal, one line per step and prompt otherwise). A bad input
stops with one line `error: ...` naming the flag, file or line: exit status 2 for a flag,
1 for a file or model; the prompts, the model's config and --gen-length against its
positions are checked before any weights load (a prompt's length, once the tokenizer is there).
"""

import json
import shutil
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from dlm import bounds, flags  # neither imports torch: --help and a mistyped flag answer at once

# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = flags.Parser(description="Answer prompts with a masked-diffusion LM (the LLaDA sampler).")
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
    g = p.add_argument_group("generation (LLaDA sampler, dlm/sampler.py)")
    flags.add_sampler_flags(g)
    g.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    g = p.add_argument_group("output")
    g.add_argument("--show", action="store_true", help="draw the canvas after every denoising step, "
                   "masks as ░ (in place on a terminal, one line per step otherwise)")
    g.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt "
                   '({"source", "prompt", "answer"}) instead of the bare answers')
    g.add_argument("--no-progress", action="store_true", help="no loading bar on stderr (transformers' "
                   '"Loading weights"), as with --show: stderr keeps what went wrong alone')
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
    bounds.check(p, args)  # overflows and typos: a seed past 64 bits, --gen-length 0 (not the default), ...
    return p, args


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads (seconds)
    parse_args()

import torch

from dlm import data, sharding
from dlm.sampler import canvas_args, check_room, check_settings, generate_text, sampler_for, stop_ids, trained_seq_len

# -----------------------------------------------------------------------------
# Watching the decoding (--show)


def visible(text: str) -> str:
    """The text on one line: characters that are not printable (newlines, tabs, escape
    sequences a random model may emit) written as Python escapes, e.g. \\n."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render_canvas(tokenizer, canvas, mask_token_id: int, stops, placeholder: str, stop_mark: str = "$") -> str:
    """A canvas as text: one placeholder per masked position, committed tokens decoded, each
    committed stop token (EOS) drawn as stop_mark while masks remain (the tutorial's $: masks
    that become EOS padding are seen to, not vanish); a canvas without masks is cut at its first
    stop token and renders as visible(decode_answer(...)), so the last frame shows the answer."""
    pieces, run, unfinished = [], [], mask_token_id in canvas
    for token in list(canvas) + [None]:  # None: the end, flushes the last run
        if token is None or token == mask_token_id or token in stops:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=True))
            run = []
            if token is None or not (unfinished or token == mask_token_id):
                break
            pieces.append(placeholder if token == mask_token_id else stop_mark)
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
# Prompts


@dataclass
class Prompt:
    messages: list        # chat messages to answer: [{"role": ..., "content": ...}]
    where: str            # for messages: "--prompt 2", "questions.jsonl:7"


class BadFlag(ValueError):
    """A flag's value that only the model shows to be wrong: exit 2 like argparse's errors.
    Every other ValueError / OSError is a bad file or model (exit 1)."""


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
    for prompt in prompts:
        data.check_row_length([m["content"] for m in prompt.messages], prompt.where)
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


def sampler_settings(parser, args) -> tuple[dict, int | None]:
    """The sampler's flags settled for --model (its trained canvas, if a train.py model) and
    checked, before the prompts and the weights load: (SamplerConfig's arguments, the trained
    --seq-len or None)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    trained = trained_seq_len(args.model)
    sampler_args = canvas_args(args.gen_length, args.block_length, trained) | dict(
        steps=args.steps, temperature=args.temperature, remasking=args.remasking, suppress_eos=args.suppress_eos,
        threshold=args.threshold, prefix_cache=args.prefix_cache)
    try:  # checked now; a trained canvas once the prompts are known
        check_settings(sampler_args)
    except ValueError as e:
        parser.error(str(e))
    return sampler_args, trained


def run(args, sampler_args: dict, trained: int | None, stdout) -> list[str]:
    """Prompts and the model's size are checked before the weights load (the canvas of a
    train.py model, which depends on the prompts' tokens, once its tokenizer has)."""
    from dlm.backbones import load_backbone
    from transformers.utils import logging as hf_logging
    prompts = [Prompt([{"role": "user", "content": text}], f"--prompt {i}")
               for i, text in enumerate(args.prompt, start=1)]
    if args.prompts_file:
        prompts += read_prompts(Path(args.prompts_file))
    if args.system is not None:
        for p in prompts:
            if p.messages[0]["role"] != "system":
                p.messages.insert(0, {"role": "system", "content": args.system})
    limit = model_positions(args.model)
    check_room(sampler_args["gen_length"], limit, error=BadFlag)
    path = Path(args.model).expanduser()
    if args.show or args.no_progress:  # transformers' loading bar would come before the frames
        hf_logging.disable_progress_bar()
    backbone = load_backbone(str(path) if path.exists() else args.model, dtype=getattr(torch, args.dtype))
    backbone.model.to(sharding.pick_device(args.device)).eval()
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
    parser, args = parse_args(argv)
    sampler_args, trained = sampler_settings(parser, args)
    try:
        return run(args, sampler_args, trained, sys.stdout)
    except BadFlag as e:
        parser.error(" ".join(str(e).split("\n")))
    except (ValueError, OSError) as e:
        raise SystemExit("error: " + " ".join(str(e).split("\n"))) from None


if __name__ == "__main__":
    main(sys.argv[1:])
