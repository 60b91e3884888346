"""Every command's output flag goes through one check (dlm/files.check_writable) before anything
loads: never an empty name, a device or a named pipe, a folder holding a link that leads out of
it, or a name the filesystem refuses; each refusal is one line naming the flag, and the thing
in the way is left as it was."""

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import train
from dlm import files
from scripts import evaluate, experiments, prepare


def refusal(command: str, out: str, tmp: Path, capsys) -> str:
    """The one line `command` answers with its output flag set to `out`."""
    data = tmp / "data.jsonl"
    data.write_text('{"prompt": "q", "answer": "a"}\n')
    if command == "train":
        call = lambda: train.main(["--out", out, "--data", str(data), "--steps", "1", "--no-progress"])
    elif command == "evaluate":
        call = lambda: evaluate.main(["--model", str(tmp / "model"), "--task", "exact", "--data", str(data),
                                      "--out", out])
    elif command == "experiments":
        call = lambda: experiments.main(["--smoke", "--dry-run", "--data-dir", str(tmp / "nodata"), "--out", out])
    else:
        call = lambda: prepare.main(["--out", out, "--datasets", "gsm8k"])
    if command == "prepare":
        assert call() == 1
        line = capsys.readouterr().err.strip()
    else:
        with pytest.raises(SystemExit) as e:
            call()
        line = str(e.value.code)
        assert "Traceback" not in capsys.readouterr().err
    assert line.startswith("error: --out") and "\n" not in line, line
    return line


COMMANDS = ["train", "evaluate", "experiments", "prepare"]
FOLDER_OUT = {"train", "experiments", "prepare"}


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(COMMANDS), name_bytes=st.integers(256, 600),
       bad=st.sampled_from(["empty", "device", "fifo", "too long", "link out"]))
def test_every_command_refuses_a_bad_output_in_one_line(tmp_path_factory, capsys, command, bad, name_bytes):
    tmp = tmp_path_factory.mktemp("outputs")
    victim = tmp / "victim.jsonl"  # what a link inside --out leads to: an input, never written
    victim.write_text("input\n")
    if bad == "empty":
        out, expected = "", "--out is empty"
    elif bad == "device":
        out, expected = os.devnull, "is a device"
    elif bad == "fifo":
        out, expected = str(tmp / "pipe"), "is a named pipe (FIFO)"
        os.mkfifo(out)
    elif bad == "too long":
        out, expected = str(tmp / ("x" * name_bytes) / "run"), "longer than the 255 the filesystem allows"
    else:  # evaluate writes one file, by an atomic rename that replaces a link, never writes through it
        assume(command in FOLDER_OUT)
        folder = tmp / "run"
        folder.mkdir()
        (folder / "final_eval.jsonl").symlink_to(victim)
        out, expected = str(folder), "final_eval.jsonl is a link to"
    line = refusal(command, out, tmp, capsys)
    assert expected in line, line
    assert victim.read_text() == "input\n"
    if bad == "fifo":
        assert stat.S_ISFIFO(os.stat(out).st_mode)


def test_the_check_itself_on_generated_names(tmp_path):
    """Names of every length: accepted up to the filesystem's limit, refused past it with the flag."""
    for n in (1, 100, 255, 256, 1000):
        path = tmp_path / ("a" * n)
        if n <= 255:
            files.check_writable(path, "--out")
        else:
            with pytest.raises(ValueError, match=r"^--out .*: a name of \d+ bytes"):
                files.check_writable(path, "--out")
    link_to_nothing = tmp_path / "dangling"
    link_to_nothing.symlink_to(tmp_path / "nothing")
    with pytest.raises(ValueError, match="is a link to nothing"):
        files.check_writable(link_to_nothing, "--out")
    inside = tmp_path / "run"
    (inside / "checkpoints").mkdir(parents=True)
    (inside / "latest").symlink_to(inside / "checkpoints")  # a link that stays inside: fine
    files.check_writable(inside, "--out")
