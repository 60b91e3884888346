"""
Numeric flags within bounds, for train.py, evaluate.py and generate.py: one table, one check.

argparse takes any int or float: a seed past 64 bits, --lr 1e300, --collective-timeout 1e300,
--tiny-layers 1000000000, --gen-length 0. Such values end far from the flag, in a traceback
from deep inside torch (an overflow unpacking the seed, a timedelta overflow, an allocator
error, an SVD of NaN) or a run that hangs building a billion blocks; 0 may even be read as
"the default". `check` refuses them at once, one line naming the flag and its range. The
bounds are generous: they catch typos and overflows, never a setting someone could mean.
Finer checks that need the model (its positions, its blocks) stay where the model is known.
"""

import math

# argparse dest -> (lowest, highest, what the value is), inclusive; a flag a command lacks is skipped
BOUNDS = {
    "seed": (0, 2 ** 32 - 1, "a random seed"),
    "steps": (1, 10 ** 8, "steps"),
    "batch_size": (1, 2 ** 20, "rows per batch"),
    "grad_accum": (1, 2 ** 16, "micro-batches per step"),
    "seq_len": (2, 2 ** 20, "tokens per row"),
    "tiny_width": (8, 2 ** 20, "the tiny model's width"),
    "tiny_layers": (1, 1024, "the tiny model's blocks"),
    "builtin_size": (1, 10 ** 8, "examples"),
    "lr": (1e-12, 10.0, "a learning rate"),
    "jepa_lambda": (0.0, 1e6, "the JEPA term's weight"),
    "anchor_mu": (0.0, 1e6, "the anchor's strength"),
    "eps": (0.0, 1.0, "a probability"),
    "collective_timeout": (1e-3, 60 * 24 * 365, "minutes"),
    "gen_length": (1, 2 ** 20, "masks to fill"),
    "block_length": (1, 2 ** 20, "masks per block"),
    "temperature": (0.0, 1e6, "a sampling temperature"),
    "limit": (1, 10 ** 9, "examples"),
    "probe_seq_len": (2, 2 ** 20, "tokens per window"),
    "probe_windows": (1, 10 ** 7, "windows"),
    "probe_grid": (1, 10 ** 4, "masking rates"),
    "shots": (0, 1024, "exemplars"),
}


def problem(args) -> str | None:
    """The first flag of `args` (an argparse Namespace) outside its bounds or not finite, as one
    line naming it; None when all are fine. A flag left at None (its default settled later) is
    skipped; sampler --steps may not exceed --gen-length (more steps than masks: nothing to do)."""
    for name, (low, high, what) in BOUNDS.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{flag} {value}: must be a finite number"
        if not low <= value <= high:
            return f"{flag} {value}: must lie in [{low:g}, {high:g}] ({what})"
    steps, gen_length = getattr(args, "steps", None), getattr(args, "gen_length", None)
    if hasattr(args, "remasking") and steps is not None and gen_length is not None and steps > gen_length:
        return f"--steps {steps}: more sampler steps than the {gen_length} masks of --gen-length; at most {gen_length}"
    return None


def check(parser, args):
    """parser.error (exit 2, argparse's usage line) on the first flag out of bounds."""
    if line := problem(args):
        parser.error(line)
