"""
The command lines: --help and a mistyped flag answer before torch and transformers load, and the
names the flags choose from are the method's and the library's.

    python -m pytest tests/test_commands.py -q
"""

import dataclasses
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dllm_jepa
import tasks
from dlm import data, flags, hub
from dlm.sampler import SamplerConfig

ROOT = Path(__file__).resolve().parents[1]

# Runs a command as `python train.py ARGS` (a path) or `python -m NAME ARGS` would, then says
# how it exited and whether torch or transformers had been imported by then.
PROBE = """
import json, runpy, sys
command, argv = sys.argv[1], sys.argv[2:]
sys.argv = [command, *argv]
try:
    if command.endswith(".py"):
        runpy.run_path(command, run_name="__main__")
    else:  # alter_sys: the module is sys.modules["__main__"], as under `python -m`
        runpy.run_module(command, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": sorted({"torch", "transformers"} & set(sys.modules))}))
"""


def probe(command, *argv):
    done = subprocess.run([sys.executable, "-c", PROBE, command, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


# Every command: the flags it requires, and one bad value that a check of its own (not argparse's) refuses
COMMANDS = {
    "train.py": ([], ["--steps", "0"], "--steps 0: must be >= 1"),
    "scripts.evaluate": (["--model", "m", "--task", "exact", "--data", "d"], ["--limit", "0"], "--limit=0: must be >= 1"),
    "scripts.generate": (["--model", "m", "--prompt", "hi"], ["--gen-length", "0"], "--gen-length 0: must lie in"),
    "scripts.prepare": ([], ["--datasets", "gsm8k", "gsm9k"], "--datasets gsm9k: unknown; choose 'all' or some of"),
    "scripts.experiments": ([], ["--jobs", "0"], "--jobs 0: must be >= 1"),
    "scripts.harness": ([], ["--limit", "x"], "argument --limit/-L: invalid float value: 'x'"),  # lm-eval's parser
    "scripts.bench": ([], ["--activation-checkpointing"], "--activation-checkpointing and --cpu-offload go with --fsdp"),
    "scripts.bench_sampler": ([], ["--fast"], "--fast needs --model and --data"),
    "scripts.bench_lora": ([], ["--width", "12"], "--width 12: must be a multiple of 8"),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_and_a_bad_argument_answer_before_torch_loads(command):
    """--help, a mistyped flag and a bad value: torch and transformers never imported (each
    would cost seconds), and an error is one line naming the flag, exit 2."""
    result, err = probe(command, "--help")
    assert result == {"code": 0, "loaded": []}, err
    needed, bad, said = COMMANDS[command]
    for argv, said in ((needed + bad, said), (needed + ["--no-such-flag"], "unrecognized arguments: --no-such-flag")):
        result, err = probe(command, *argv)
        assert result == {"code": 2, "loaded": []}, err
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and said in err, err
        assert err.endswith(" (see --help)\n"), err


def test_train_refuses_steps_with_epochs_in_one_line():
    result, err = probe("train.py", "--epochs", "1", "--steps", "3")
    assert result == {"code": 2, "loaded": []} and "not allowed with" in err and len(err.splitlines()) == 1


def test_flag_choices_are_the_methods_and_the_librarys():
    """flags.py writes the names out (it imports no torch); they must stay the ones the code reads."""
    parser, _ = flags.parse_args([])
    by_flag = {action.dest: action for action in parser._actions}
    for name, choices in dllm_jepa.CHOICES.items():
        assert tuple(by_flag[name].choices) == tuple(choices), name
    assert tuple(by_flag["canvas"].choices) == data.CANVASES
    assert flags.FILE_TYPES == ", ".join(data.BUILDERS)
    assert (flags.TASKS, flags.GENERATION_TASKS) == (tasks.TASKS, tasks.GENERATION_TASKS)
    assert flags.DATASETS == tuple(hub.DATASETS)
    assert flags.SAMPLER_DEFAULTS == {name: getattr(SamplerConfig, name) for name in flags.SAMPLER_DEFAULTS}

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
# Help: every flag explained, each default said once

PARSED_HERE = ["dlm.flags", "scripts.evaluate", "scripts.generate", "scripts.prepare", "scripts.experiments",
               "scripts.bench", "scripts.bench_sampler", "scripts.bench_lora"]  # harness.py: lm-eval's parser


def parser_of(module: str, monkeypatch):
    """The parser a command's parse_args builds, caught as it starts parsing."""
    class Caught(Exception):
        pass

    def catch(parser, *args, **kwargs):
        raise Caught(parser)
    monkeypatch.setattr(flags.Parser, "parse_args", catch)
    with pytest.raises(Caught) as caught:
        importlib.import_module(module).parse_args([])
    return caught.value.args[0]


@pytest.mark.parametrize("module", PARSED_HERE)
def test_every_flag_is_explained(module, monkeypatch):
    parser = parser_of(module, monkeypatch)
    unexplained = [action.option_strings[0] for action in parser._actions if not (action.help or "").strip()]
    assert not unexplained
    assert len(parser._actions) > 3


@pytest.mark.parametrize("module", PARSED_HERE)
def test_help_states_each_default_once(module, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text  # None: unset; False: a switch not given
    repeated = [flag for flag in re.split(r" (?=--[a-z])", text) if "(default: " in flag and flag.count("default") > 1]
    assert not repeated


def test_profile_overrides_say_what_each_field_means():
    """experiments.py's override flags read their meaning from the Profile fields' comments (one
    source), a comment continued on the lines under it too; every field has one."""
    from scripts import experiments

    @dataclasses.dataclass
    class Sizes:
        width: int = 8         # hidden size
        # a section comment, not the field's
        depth: int = 2         # blocks, counted
                               # from the input
        bare: str = "#"
    assert experiments.field_comments(Sizes) == {"width": "hidden size", "depth": "blocks, counted from the input",
                                                 "bare": ""}
    meanings = experiments.field_comments(experiments.Profile)
    assert set(meanings) == {f.name for f in dataclasses.fields(experiments.Profile)}
    assert all(meanings.values()), [name for name, meaning in meanings.items() if not meaning]


def test_profile_override_flags_read_their_help_from_the_fields(monkeypatch):
    help_of = {action.dest: action.help for action in parser_of("scripts.experiments", monkeypatch)._actions}
    assert help_of["base_lr"] == "pre-training peak lr (cpu 0.001, llada-8b 0.001)"
    assert help_of["n_test"].startswith("test examples carved from the end of the training file, disjoint from "
                                        "train and dev, scored and reported;")
    assert help_of["system_prompt"] == "keep NL-RX's constant system turn (30%% of a tiny row) (cpu False, llada-8b False)"
