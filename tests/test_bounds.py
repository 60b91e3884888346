"""One numeric-flag check (dlm/bounds.py) for train.py, evaluate.py and generate.py: a value out
of its bounds, or not finite, stops the command at once with argparse's usage line naming the
flag (exit 2), before any file or model is read."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlm import bounds, flags, preflight
from scripts import evaluate, generate


def train_check(argv):
    parser, args = flags.parse_args(argv)
    preflight.check_settings(parser, args)


COMMANDS = {  # command -> (how its flags are checked, the flags it needs besides the one tried)
    "train": (train_check, []),
    "evaluate": (evaluate.main, ["--model", "nowhere/model", "--task", "exact", "--data", "nowhere.jsonl"]),
    "generate": (lambda argv: generate.main(argv), ["--model", "nowhere/model", "--prompt", "hi"]),
}


def dests(command: str) -> set[str]:
    """The BOUNDS flags the command has."""
    parser = {"train": lambda: flags.parse_args([])[0], "evaluate": lambda: evaluate.parse_args(
        COMMANDS["evaluate"][1])[0], "generate": None}[command]
    if parser is None:
        return {"seed", "steps", "batch_size", "gen_length", "block_length", "temperature"}
    return {a.dest for a in parser()._actions} & set(bounds.BOUNDS)


@st.composite
def out_of_bounds(draw):
    command = draw(st.sampled_from(sorted(COMMANDS)))
    name = draw(st.sampled_from(sorted(dests(command))))
    low, high, _ = bounds.BOUNDS[name]
    if isinstance(low, float):
        value = draw(st.one_of(st.floats(max_value=low, exclude_max=True), st.floats(min_value=high, exclude_min=True),
                               st.sampled_from([math.nan, math.inf, -math.inf])))
    else:
        value = draw(st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1)))
    return command, name, value


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=out_of_bounds())
def test_a_value_out_of_bounds_is_one_usage_line_naming_the_flag(case, capsys):
    command, name, value = case
    check, needed = COMMANDS[command]
    flag = f"--{name.replace('_', '-')}"
    with pytest.raises(SystemExit) as e:
        check(needed + [f"{flag}={value!r}"])
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in line and flag in line, (case, line)


@pytest.mark.parametrize("command, argv, message", [
    ("train", ["--seed", str(2 ** 70)], "--seed"),
    ("train", ["--lr", "1e300"], "--lr 1e+300: must lie in [1e-12, 10]"),
    ("train", ["--collective-timeout", "1e300"], "--collective-timeout 1e+300: must lie in"),
    ("train", ["--tiny-layers", "1000000000"], "--tiny-layers 1000000000: must lie in [1, 1024]"),
    ("evaluate", ["--steps", "1000000000"], "--steps 1000000000: must lie in"),
    ("evaluate", ["--seed", str(2 ** 70)], "--seed 1180591620717411303424: must lie in"),
    ("generate", ["--gen-length", "0"], "--gen-length 0: must lie in [1, 1.04858e+06]"),
    ("generate", ["--gen-length", "8", "--block-length", "8", "--steps", "9"],
     "--steps 9: more sampler steps than the 8 masks of --gen-length"),
])
def test_the_reported_cases(command, argv, message, capsys):
    check, needed = COMMANDS[command]
    with pytest.raises(SystemExit) as e:
        check(needed + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
