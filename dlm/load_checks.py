"""
Load checks: what is wrong with a model folder, in one line.

`backbones.load_backbone` reads a model through transformers; when that fails, or succeeds
on damaged files, the functions here say what is wrong and where, so the user sees one line
naming the folder and what to do instead of a SafetensorError, a table of size mismatches or
a model with a block left at its random initialisation:
- `load_error`: one line for an exception raised while loading (damaged weights, a
  config.json of another model, broken JSON, no tokenizer, an unknown model_type);
- `keys_problem`: weights that do not fill the model (missing or left-over tensors);
- `stored_dtype_problem`, `weights_problem`: integer-typed or non-finite weights.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def stored_dtype_problem(folder: Path) -> str | None:
    """One line if a local folder's safetensors file stores a tensor as integers (from_pretrained
    would cast it to floats without a word, a model of whole numbers); None otherwise."""
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        with safe_open(file, "pt") as f:
            stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        name, dtype = next(((n, d) for n, d in sorted(stored.items()) if not d.startswith(("F", "BF"))), (None, None))
        if name:
            return f"{file.name}: {name} is stored as {dtype}, not floating point; export the model again"
    return None


def weights_problem(model) -> str | None:
    """One line if a loaded parameter holds NaN or infinity (a diverged run's export, a damaged
    file): training, evaluating or sampling with it would only give NaN losses or blank answers.
    Meta tensors (no weights read) are skipped."""
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        if not torch.isfinite(p).all():
            return (f"{name} holds NaN or infinite weights: the model is damaged (a diverged run's export?); "
                    "use an earlier checkpoint or export it again")
    return None


def load_error(name_or_path: str, error: BaseException, reports: list, families) -> str | None:
    """One line for a model that could not be loaded: what is wrong and where; None to let
    the error through unchanged (one-line errors that already say it, programming errors)."""
    folder = Path(name_or_path).expanduser()
    local = folder.is_dir()
    where = str(name_or_path)
    detail = " ".join(str(error).split())
    if isinstance(error, SafetensorError):
        broken = [f.name for f in sorted(folder.glob("*.safetensors")) if not readable_safetensors(f)] if local else []
        what = f"{', '.join(broken)} {'is' if len(broken) == 1 else 'are'}" if broken else "its weight file is"
        return (f"{where}: {what} damaged: truncated or not a safetensors file ({detail}); copy or export "
                "the model again")
    if isinstance(error, RuntimeError) and not isinstance(error, OSError) and "mismatch" in str(error):
        text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(r.getMessage() for r in reports))
        rows = sorted(re.findall(r"^\s*(\S+)\s*\|\s*MISMATCH\b.*?ckpt: torch\.Size\(\[([^\]]*)\]\) vs "
                                 r"model:\s*torch\.Size\(\[([^\]]*)\]\)", text, re.M))  # by name: stable
        example = (f": {rows[0][0]} is [{rows[0][1]}] in the weights but [{rows[0][2]}] by config.json"
                   + (f" ({len(rows)} tensors differ)" if len(rows) > 1 else "")) if rows else ""
        return (f"{where}: config.json does not match the weights{example}; the folder's config.json belongs "
                "to another model or was edited: restore the one saved with these weights")
    broken_json = next(((f, e) for f in sorted(folder.glob("*.json")) for e in [json_problem(f)] if e), None) \
        if local and isinstance(error, (OSError, ValueError)) else None
    if broken_json:
        return (f"{where}: {broken_json[0].name} is not valid JSON ({broken_json[1]}); restore it from the "
                "model's original files")
    if local and isinstance(error, ValueError) and re.search(r"instantiate .*tokenizer", str(error), re.S):
        present = sorted(f.name for f in folder.iterdir() if "token" in f.name or f.suffix == ".model")
        return (f"{where}: no usable tokenizer ({'its files: ' + ', '.join(present) if present else 'no tokenizer files'}"
                "; tokenizer.json is needed): save the tokenizer into the folder (tokenizer.save_pretrained) or "
                "copy the files of the model it came from")
    if isinstance(error, OSError) and "\n" in str(error).strip():
        return f"{where}: {detail}"  # transformers' several-line messages, in one line
    if isinstance(error, ValueError) and (unknown := re.search(r"has model type `([^`]*)`", detail)):
        return (f"{where}: config.json's model_type {unknown[1]!r} is unknown to transformers (supported here: "
                f"{', '.join(sorted(families))}); restore the config.json saved with the weights")
    if isinstance(error, ValueError):  # our checks of the config and tokenizer: name the folder
        return detail if detail.startswith(where) else f"{where}: {detail}"
    return None


def keys_problem(model, loading: dict) -> str | None:
    """One line if the weights do not fill the model config.json describes (from_pretrained's
    loading info): a tensor missing (it would train from its random initialisation) or one left
    over (a block dropped), e.g. a config.json whose layer count was edited. Harmless: a tied
    weight (it is the tensor it ties to) and buffers (recomputed, or non-persistent)."""
    harmless = set(getattr(model, "all_tied_weights_keys", None) or {}) | {name for name, _ in model.named_buffers()}
    missing, unexpected = ([key for key in sorted(loading.get(kind) or ()) if key not in harmless]
                           for kind in ("missing_keys", "unexpected_keys"))
    if not missing and not unexpected:
        return None
    parts = ([f"{len(missing)} of the model's tensors are not in the weights ({', '.join(missing[:2])}"
              f"{', ...' if len(missing) > 2 else ''})"] if missing else []) + \
            ([f"{len(unexpected)} tensors of the weights have no place in the model ({', '.join(unexpected[:2])}"
              f"{', ...' if len(unexpected) > 2 else ''})"] if unexpected else [])
    return (f"config.json does not match the weights: {' and '.join(parts)}; the folder's config.json belongs to "
            "another model or was edited (a layer count?): restore the one saved with these weights")


def readable_safetensors(path: Path) -> bool:
    try:
        with safe_open(path, "pt") as f:
            f.keys()
        return True
    except (SafetensorError, OSError):
        return False


def json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return " ".join(str(e).split())
    return None
