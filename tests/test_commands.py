"""
The command lines: --help and a mistyped flag answer before torch and transformers load, and the
names the flags choose from are the method's and the library's.

    python -m pytest tests/test_commands.py -q
"""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dllm_jepa
import tasks
from dlm import data, flags
from scripts import evaluate

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


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--task", "nope"], 2), (["--no-such-flag"], 2)])
def test_evaluate_answers_help_and_bad_flags_before_torch_loads(argv, code):
    result, err = probe("scripts.evaluate", *argv)
    assert result == {"code": code, "loaded": []}, err


def test_flag_choices_are_the_methods_and_the_librarys():
    """flags.py writes the names out (it imports no torch); they must stay the ones the code reads."""
    parser, _ = flags.parse_args([])
    by_flag = {action.dest: action for action in parser._actions}
    for name, choices in dllm_jepa.CHOICES.items():
        assert tuple(by_flag[name].choices) == tuple(choices), name
    assert tuple(by_flag["canvas"].choices) == data.CANVASES
    assert flags.FILE_TYPES == ", ".join(data.BUILDERS)
    assert evaluate.TASKS == tasks.TASKS

# -----------------------------------------------------------------------------
# Pointers: "FILE.md: Section" (a capital: a section title) in messages, help and docs names a heading

POINTER = re.compile(r"\b((?:docs/)?[\w-]+\.md): ([A-Z][\w' -]*\w)")


def pointers():
    """(file that points, file pointed at, section) for every pointer in the code and docs."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("*.txt"), *ROOT.glob("*.toml"),
             *ROOT.glob("dlm/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("tasks/*.py"), *ROOT.glob("docs/*.md")]
    return [(path.relative_to(ROOT), *m.groups()) for path in files for m in POINTER.finditer(path.read_text())]


def test_every_pointer_names_a_section_that_exists():
    found = pointers()
    assert ("dlm/flags.py", "README.md", "Bring your own data") in [(str(p), f, s) for p, f, s in found]
    for path, target, section in found:
        headings = re.findall(r"^#+ (.*)$", (ROOT / target).read_text(), re.M)
        assert any(h.startswith(section) for h in headings), f"{path}: {target}: {section} is no heading"
    old_style = [str(p) for p in ROOT.glob("*.md") if re.search(r'README,? "', p.read_text())]
    assert not old_style  # README "Section": written as README.md: Section, which the check above reads

# -----------------------------------------------------------------------------
# Help: each default said once


@pytest.mark.parametrize("module", ["dlm.flags", "scripts.evaluate", "scripts.generate", "scripts.experiments"])
def test_help_states_each_default_once(module, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    repeated = [flag for flag in re.split(r" (?=--[a-z])", text) if flag.count("default") > 1]
    assert not repeated
