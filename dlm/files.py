"""
File safety and the process's surroundings, for every command: nothing half-written, nothing
written over an input, no refusal found late.

- Writes: `atomic_write_text` (a sibling .tmp file, fsynced, renamed over the old), strict
  JSON (a non-finite float as the string "NaN", never a bare NaN that strict parsers refuse).
- Output paths, checked before anything loads: an output never is, contains or lies inside
  an input (`output_overlap`), is a folder or a regular file (never a device or a pipe), holds
  no link leading out of it, has names the filesystem accepts, and its place accepts a new file
  (`check_writable`, which every command's output flags pass through).
- Memory: what is free on a GPU or in host memory (a cgroup's limit included).
- Signals: the first SIGTERM/SIGINT lets train.py finish its step and save (stop_requests); a
  second ends the process even while it is stuck inside a collective (stop_on_second_signal);
  one repeated within REPEAT_S (the kernel's repeated parent-death signal) is the same request.
- One line for an error from deep inside a library (`cause`), our own refusals as one line and
  exit 1 (`in_one_line`), sizes in bytes for people (`human`).
"""

import contextlib
import json
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException


def cause(error: BaseException) -> str:
    """'Type: first line' of an error, unwrapping dcp's CheckpointException (each failed rank's
    error and stack) to the error underneath, e.g. 'OSError: [Errno 28] No space left on device'."""
    if isinstance(error, CheckpointException):
        failure = next(iter(error.failures.values()), (error,))
        error = failure[0] if isinstance(failure, tuple) else failure
    detail = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}{': ' + detail if detail else ''}"


@contextlib.contextmanager
def in_one_line():
    """A refusal raised inside (a ValueError: our checks' messages, which name the flag or file)
    ends the command as that one line, 'error: ...' and exit 1, no traceback."""
    try:
        yield
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

# -----------------------------------------------------------------------------
# Writes that are whole or not at all, in strict JSON


def atomic_write_text(path: Path, text: str):
    """Replace a file's content all at once (config.json, log.jsonl rewritten on resume): write a
    sibling .tmp file, fsync it, os.replace it over `path`, so a reader or a kill sees the old
    content or the new, never a cut one. A failed write (a full disk) leaves the old content and
    raises ValueError with one line."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_synced(tmp, text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(next(p for p in path.parents if p.exists())).free
        raise ValueError(f"{path}: could not write ({cause(e)}); {human(free)} are free there; "
                         "its previous content is unchanged") from None
    fsync(path.parent)


def write_synced(path: Path, text: str):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync(path: Path):
    """Flush a file's bytes (or a folder's entries) to the disk, so that a rename publishing them
    cannot survive a power cut without them. Some filesystems refuse a folder's fsync: harmless."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def strict_json(obj, **kwargs) -> str:
    """json.dumps that strict parsers accept: a non-finite float (a skipped step's NaN loss, an
    infinite gradient norm, --grad-clip inf) is written as the string "NaN", "Infinity" or
    "-Infinity" (Python's spelling: float() reads it back), never as bare NaN/Infinity, which
    are not JSON (RFC 8259) and which json.loads(..., parse_constant=...) and JSON.parse refuse."""
    return json.dumps(finite_floats(obj), allow_nan=False, default=str, **kwargs)


def finite_floats(obj):
    """obj with every non-finite float, at any depth of dicts, lists and tuples, as a string."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else "Infinity" if obj > 0 else "-Infinity"
    if isinstance(obj, dict):
        return {key: finite_floats(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_floats(value) for value in obj]
    return obj


def metadata_json(metadata: dict) -> str:
    return strict_json(metadata, indent=2) + "\n"  # NaN/inf as strings: valid JSON

# -----------------------------------------------------------------------------
# Output paths: never over an input, writable before anything loads


def real_path(path) -> Path:
    """The absolute path with links resolved, for comparing two names of one place."""
    return Path(os.path.realpath(Path(path).expanduser()))


def output_overlap(out, out_flag: str, inputs) -> str | None:
    """One line if the output path `out` is, lies inside or contains one of `inputs` ((flag,
    path) pairs; a None path is skipped): writing there would overwrite or mix with an input.
    None if every input lies apart from it."""
    where = real_path(out)
    for flag, path in inputs:
        if path is None:
            continue
        other = real_path(path)
        relation = ("is" if where == other else "lies inside" if other in where.parents
                    else "contains" if where in other.parents else None)
        if relation:
            return (f"{out_flag} {out}: {relation} {flag} {path}; the outputs would be written over "
                    f"or among the inputs: give an {out_flag} apart from them")
    return None


def check_writable(path, flag: str, folder: bool = True):
    """Raise ValueError, one line naming the flag, unless `path` can be written: a folder
    (folder=True) or a file; every command's output flags pass through here before anything
    loads. Nothing is created. Refused: an empty name (it would mean the current folder), a name
    longer than the filesystem allows, a link to nothing, anything that is not a folder or a
    regular file once links are resolved (a device, a named pipe: an atomic rename would replace
    it), a folder holding a link that leads out of it (writing through it would land on another
    run or an input), a file in the way of the folders to make, and a place that refuses a new
    file (a probe file is made in the nearest existing folder and removed)."""
    path = check_name(path, flag, folder)
    if os.path.lexists(path):
        if not path.exists():
            raise ValueError(f"{flag} {path}: is a link to nothing; remove it or give another {flag}")
        real = real_path(path)
        if folder and not real.is_dir():
            raise ValueError(f"{flag} {path}: is {kind_of(real)}, not a folder")
        if not folder and real.is_dir():
            raise ValueError(f"{flag} {path}: is a folder; give a file name (e.g. {path / 'results.json'})")
        if not folder and not real.is_file():
            raise ValueError(f"{flag} {path}: is {kind_of(real)}, not a regular file: writing there would replace "
                             f"it; give a file name")
        if folder and (link := link_out_of(real)):
            raise ValueError(f"{flag} {path}: {link[0]} is a link to {link[1]}, outside {flag}: what is written "
                             f"there would land on it; remove the link or give another {flag}")
    start = path if folder else path.parent
    existing = next(p for p in (start, *start.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is {'a link to nothing' if not existing.exists() else 'a file'}"
                         f", so no folder can be made there; give another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {existing} ({cause(e)}); give another {flag}") from None


def check_name(path, flag: str, folder: bool = True) -> Path:
    """The output name as given, before any other check looks at the place (a too-long name makes
    every stat fail) -> the path. ValueError naming the flag if it is empty (Path('') would be the
    current folder), if a name in it is longer than the filesystem allows (else the first write
    fails with a bare '[Errno 36] File name too long'), or if the whole path leaves no room for the
    names a command writes inside it (checkpoints/step_XXXXXXXX.deleting/...)."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty: give a {'folder' if folder else 'file name'}")
    path = Path(path).expanduser()
    existing = next((p for p in (path, *path.parents) if os.path.lexists(p)), Path("/"))
    limits = []
    for name, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits.append(os.pathconf(existing, name))
        except (OSError, ValueError):
            limits.append(default)
    name_max, path_max = limits
    shown = str(path) if len(str(path)) <= 80 else str(path)[:77] + "..."
    long = next((part for part in path.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise ValueError(f"{flag} {shown}: a name of {len(os.fsencode(long))} bytes ({long[:20]}...), longer than "
                         f"the {name_max} the filesystem allows; give a shorter {flag}")
    if len(os.fsencode(str(real_path(path)))) > path_max - 128:
        raise ValueError(f"{flag} {shown}: the path is {len(os.fsencode(str(real_path(path))))} bytes, too long "
                         f"for the files written inside it (at most {path_max - 128}); give a shorter {flag}")
    return path


def kind_of(path: Path) -> str:
    """What a non-folder path is, for a refusal: 'a file', 'a device', 'a named pipe', ..."""
    mode = path.stat().st_mode
    return ("a file" if stat.S_ISREG(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")


def link_out_of(folder: Path) -> tuple[Path, Path] | None:
    """(link, where it leads) for the first symbolic link under `folder` (links are not followed)
    that leads outside it, or None."""
    for root, folders, names in os.walk(folder):
        for name in sorted(folders + names):
            link = Path(root) / name
            if link.is_symlink():
                target = real_path(link)
                if target != folder and folder not in target.parents:
                    return link, target
    return None

# -----------------------------------------------------------------------------
# Memory and signals


CGROUP = Path("/sys/fs/cgroup")  # where cgroup v2 (unified) or v1 (a memory/ hierarchy) is mounted


def available_memory(device: torch.device | str, cgroup: Path | None = None) -> tuple[int, str]:
    """(bytes free, where) on a CUDA device (torch.cuda.mem_get_info) or in host memory: the
    smaller of /proc/meminfo's MemAvailable and what this process's cgroup still allows (a
    container's limit: past it the kernel kills the process however much RAM is free);
    (0, '') if unknown. cgroup: the cgroup mount (CGROUP), a parameter for tests."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"GPU {device.index or 0}"
    free = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            free = int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    allowed = cgroup_free(cgroup or CGROUP)
    if allowed is not None and (free is None or allowed < free):
        return allowed, "host memory (this process's cgroup limit)"
    return (free, "host memory") if free is not None else (0, "")


def cgroup_free(root: Path) -> int | None:
    """Bytes the memory cgroup mounted at `root` still allows: its limit less its usage, from
    cgroup v2 (memory.max, memory.current) or v1 (memory/memory.limit_in_bytes, ...usage_in_bytes;
    'no limit' is a huge number there), the smaller if both are set; None if neither limits."""
    free = []
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            limit = (root / limit_file).read_text().strip()
            if limit != "max":
                free.append(max(0, int(limit) - int((root / usage_file).read_text())))
    return min(free) if free else None


_SIGNAL_WATCH: dict = {}
# Signals this close after the first are the same request, not a second one: the kernel sends a
# parent-death signal (experiments.py's children: PR_SET_PDEATHSIG) again each time the child is
# handed to another thread of its dying parent, within a millisecond (measured: 2 SIGTERMs from a
# SIGKILLed parent with 4 threads); a person's second Ctrl-C comes far later.
REPEAT_S = 0.5


def is_repeat(first: float | None) -> bool:
    """Whether a signal now repeats the one received at monotonic time `first` (None: none yet)."""
    return first is not None and time.monotonic() - first < REPEAT_S


def stop_on_second_signal(grace_s: float = 3.0):
    """A second SIGTERM or SIGINT ends the process even while it is stuck inside a collective.

    train.py's handler (first signal: finish the step, save, exit; second: die) is Python code,
    which runs only when the main thread comes back to the interpreter: a rank blocked in a
    collective whose peer died or hangs (an orphaned torchrun worker) never does, and ignores
    every SIGTERM. The C-level handler still writes each signal's number to the wakeup fd; a
    thread reading it counts them and, `grace_s` after the second one (time for the handler to
    act if the main thread is free), exits with 128 + the signal number; a repeat within
    REPEAT_S of the first is not counted. Started once per process (main thread only); each
    call resets the count."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _SIGNAL_WATCH:
        _SIGNAL_WATCH.update(count=0, first=None)
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:  # an event loop (asyncio, a notebook kernel) owns the wakeup fd: leave it to it
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return
    _SIGNAL_WATCH.update(count=0, first=None)

    def watch():
        while True:
            number = os.read(read, 1)
            if not number:
                return
            if number[0] not in (signal.SIGTERM, signal.SIGINT) or is_repeat(_SIGNAL_WATCH["first"]):
                continue
            _SIGNAL_WATCH["first"] = _SIGNAL_WATCH["first"] or time.monotonic()
            _SIGNAL_WATCH["count"] += 1
            if _SIGNAL_WATCH["count"] >= 2:
                time.sleep(grace_s)
                print(f"signal {number[0]} again: stopping now, inside a collective that cannot complete "
                      "(the last complete checkpoint stays intact)", file=sys.stderr, flush=True)
                os._exit(128 + number[0])

    threading.Thread(target=watch, name="second-signal", daemon=True).start()


@contextlib.contextmanager
def stop_requests():
    """SIGTERM/SIGINT: finish the step, save a resumable checkpoint, exit. Yields the signals
    received so far (the loop reads them after each step); the previous handlers come back on
    leaving, however the loop ends."""
    stop_signal, first = [], []

    def on_signal(signum, frame):
        # Python runs a handler between two bytecodes, even inside this one: a repeat arriving within
        # microseconds (the kernel's) runs in the middle of it, so the request is recorded whole
        # (time, then signal) before anything reads it, and the clock is read before either.
        now = time.monotonic()
        if first and is_repeat(first[0]):  # the same request again (REPEAT_S)
            return
        if first:  # a second signal: stop now (the last complete checkpoint stays intact)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        first.append(now)
        stop_signal.append(signum)
    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop_signal
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
