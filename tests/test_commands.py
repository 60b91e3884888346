"""
The command lines: --help and a mistyped flag answer before torch and transformers load, and the
names the flags choose from are the method's and the library's.

    python -m pytest tests/test_commands.py -q
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dllm_jepa
from dlm import data, flags

ROOT = Path(__file__).resolve().parents[1]

# Runs a command as `python train.py ARGS` (a path) or `python -m NAME ARGS` would, then says
# how it exited and whether torch or transformers had been imported by then.
PROBE = """
import json, runpy, sys
command, argv = sys.argv[1], sys.argv[2:]
sys.argv = [command, *argv]
try:
    (runpy.run_path if command.endswith(".py") else runpy.run_module)(command, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": sorted({"torch", "transformers"} & set(sys.modules))}))
"""


def probe(command, *argv):
    done = subprocess.run([sys.executable, "-c", PROBE, command, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("argv, code, said", [(["--help"], 0, ""),
                                              (["--steps", "0"], 2, "--steps 0: must be >= 1"),
                                              (["--no-such-flag"], 2, "unrecognized arguments"),
                                              (["--epochs", "1", "--steps", "3"], 2, "not allowed with")])
def test_train_answers_help_and_bad_flags_before_torch_loads(argv, code, said):
    result, err = probe("train.py", *argv)
    assert result == {"code": code, "loaded": []}, err
    assert said in err


def test_flag_choices_are_the_methods_and_the_librarys():
    """flags.py writes the names out (it imports no torch); they must stay the ones the code reads."""
    parser, _ = flags.parse_args([])
    by_flag = {action.dest: action for action in parser._actions}
    for name, choices in dllm_jepa.CHOICES.items():
        assert tuple(by_flag[name].choices) == tuple(choices), name
    assert tuple(by_flag["canvas"].choices) == data.CANVASES
    assert flags.FILE_TYPES == ", ".join(data.BUILDERS)
