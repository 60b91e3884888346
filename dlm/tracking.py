"""
train.py's log: every row into --out/log.jsonl (strict JSON, one a line, each flushed as it is
written: a kill loses no row), and, with --report-to (Hugging Face TrainingArguments' name and
choices), the same numbers to TensorBoard or Weights & Biases, under the same step:

    log.jsonl row                                  TensorBoard tag / W&B key
    {"step": 5, "loss": ..., "lr": ...}            train/loss, train/lr, ...
    {"step": 100, "held_out": {"loss": ...}}       held_out/loss, ...
    {"step": 2000, "final_eval": {"exact_match"}}  final_eval/exact_match, ...

The packages are optional (pyproject.toml's extras tensorboard and wandb): `check_installed`
refuses a missing one before anything loads, in one line naming the pip command. Only rank 0
writes; the other ranks get a log that writes nothing.
"""

import importlib
import importlib.util
from pathlib import Path

from dlm import files

# --report-to's choice -> the module its writer needs (its pip name too)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(report_to: str):
    """--report-to names a tracker whose package is installed (ValueError, one line, if not)."""
    package = PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"--report-to {report_to}: the {package} package is not installed; "
                         f"`pip install {package}` (or `pip install -e .[{report_to}]`), or leave --report-to out")


def scalars(row: dict) -> dict[str, float]:
    """A log.jsonl row's numbers by tag: a training row's under train/, a nested part's under its
    name (held_out/loss); the step and anything not a number (a sample, a reason) left out."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out |= {f"{key}/{name}": float(v) for name, v in value.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
        elif key != "step" and isinstance(value, (int, float)):  # a bool (skipped) as 0/1
            out[f"train/{key}"] = float(value)
    return out


class Log:
    """log.jsonl opened for appending (rank 0), and the --report-to tracker. write(row) sends a
    row to both; use as a context manager (the tracker is closed, its files flushed)."""

    def __init__(self, out: Path, report_to: str = "none", config: dict | None = None, active: bool = True):
        self.file = open(out / "log.jsonl", "a", buffering=1) if active else None  # line-buffered
        self.report_to = report_to if active else "none"
        if self.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tracker = SummaryWriter(log_dir=str(out / "tensorboard"))
        elif self.report_to == "wandb":
            self.tracker = importlib.import_module("wandb").init(project="dllm-jepa", name=out.name, dir=str(out),
                                                                 config=config)

    def write(self, row: dict):
        if self.file is None:
            return
        self.file.write(files.strict_json(row) + "\n")
        if self.report_to == "tensorboard":
            for tag, value in scalars(row).items():
                self.tracker.add_scalar(tag, value, row["step"])
        elif self.report_to == "wandb":
            self.tracker.log(scalars(row), step=row["step"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if self.report_to == "tensorboard":
            self.tracker.close()
        elif self.report_to == "wandb":
            self.tracker.finish()
