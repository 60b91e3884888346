"""
Jobs: a plan of train.py and evaluate.py processes, run to the end or stopped cleanly.

scripts/experiments.py writes the paper's protocol as a list of `Job`s, each one process
that waits for others (a fine-tune for its base, a measurement for its fine-tune); `run_jobs`
runs them, a few at a time:
- a job is done when its `done` file exists, so a rerun skips what finished and continues an
  interrupted fine-tune from its last checkpoint (`--resume auto`);
- a child never outlives the runner: a signal stops each child with one SIGTERM (train.py
  saves a checkpoint on it), and the kernel sends the same SIGTERM if the runner is SIGKILLed
  (Linux's parent-death signal);
- a failed job ends the run in one line naming its log.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dlm import checkpoints

ROOT = Path(__file__).resolve().parent.parent  # the repository: train.py and scripts/ start from any folder


@dataclass
class Job:
    """One train.py or evaluate.py process. Done when `done` exists (train: a file written
    after it exits 0; evaluate: its --out, written atomically)."""
    name: str
    script: str                 # "train.py" | "scripts.evaluate" (python train.py, python -m scripts.evaluate)
    argv: list[str]
    done: Path
    log: Path
    after: list[str] = field(default_factory=list)  # names of jobs that must finish first
    threads: int | None = None  # None: the run's --threads


def program(job: Job, root: Path | None = None) -> list[str]:
    """The job's program after python or torchrun, as typed in the repository root (train.py,
    -m scripts.evaluate); with root, train.py by its full path, so it starts from any folder."""
    if job.script.endswith(".py"):
        return [str(root / job.script) if root else job.script]
    return ["-m", job.script]


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1].strip()


def run_jobs(jobs: list[Job], launch: list[str], at_once: int, threads: int, t0: float):
    """Run every job not done yet (each started by `launch`: python, or torchrun and its flags),
    at most `at_once` together, each once the jobs it waits for
    are done; each process gets `threads` CPU threads. A failed job stops the run once the
    running ones end (Ctrl-C stops them: train.py checkpoints on SIGTERM), in one line that
    names its log; what finished stays cached."""
    finished = {job.name for job in jobs if job.done.is_file()}
    pending = [job for job in jobs if job.name not in finished]
    running, failed = {}, None
    try:
        while (pending and failed is None) or running:
            ready = [job for job in pending if all(name in finished for name in job.after)]
            for job in ready[: max(0, at_once - len(running))] if failed is None else []:
                pending.remove(job)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                n = str(job.threads or threads)
                path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # scripts.*
                env = os.environ | {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONPATH": path}  # from any folder
                resume = interrupted(job)
                print(f"[{time.time() - t0:5.0f}s] {job.name}" + (" (continuing its last checkpoint)" if resume
                                                                  else ""), flush=True)
                with job.log.open("a" if resume else "w") as log:  # a continued run keeps its earlier output
                    proc = start_child(launch + program(job, ROOT) + job.argv
                                       + (["--resume", "auto"] if resume else []), log, env)
                running[job.name] = (job, proc, time.time())
            if not running:
                raise RuntimeError(f"no job can start: {[job.name for job in pending]} wait for jobs not in the plan")
            time.sleep(0.2)
            for name, (job, proc, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode == 0 and job.script == "train.py":
                    job.done.write_text(f"{time.time() - started:.1f}")
                if proc.returncode == 0 and job.done.is_file():
                    finished.add(name)
                elif failed is None:
                    failed = job, proc.returncode
    finally:
        stop_children([proc for _, proc, _ in running.values()])
    if failed:
        job, code = failed
        raise ValueError(f"{job.name} failed (exit {code}): {last_error(job.log)} (its output: {job.log}); "
                         "finished stages are kept: run the same command again to resume")


def interrupted(job: Job) -> bool:
    """A fine-tune that a kill or a signal stopped after a checkpoint: train.py continues it
    (--resume auto) rather than refusing a folder that holds checkpoints."""
    return job.script == "train.py" and bool(checkpoints.checkpoint_dirs(job.done.parent / "checkpoints"))


def start_child(argv: list[str], log, env: dict) -> subprocess.Popen:
    """A train.py / evaluate.py process that never outlives this one. On Linux it runs in a
    process group of its own, so a Ctrl-C at the terminal reaches this process alone, which
    stops each child with one SIGTERM (stop_children; train.py saves on it), and it gets
    SIGTERM from the kernel when this process dies, even by SIGKILL (prctl PR_SET_PDEATHSIG).
    Elsewhere it stays in this process's group, where a group signal reaches it directly."""
    linux = sys.platform.startswith("linux")
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=die_with_parent(os.getpid()) if linux else None)


def die_with_parent(parent: int):
    """A preexec_fn: a process group of the child's own, SIGTERM to it when its parent ends
    (Linux prctl), and at once if the parent ended before the call took effect."""
    import ctypes

    def arm():
        os.setpgid(0, 0)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def stop_children(procs: list[subprocess.Popen], grace_s: float = 120):
    """One SIGTERM to each running child (train.py finishes its step and saves a checkpoint),
    then a wait of up to grace_s; past it, or on a second signal, SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    try:
        deadline = time.time() + grace_s
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.time()))
    except (subprocess.TimeoutExpired, Stopped):
        for proc in procs:
            proc.kill()
            proc.wait()
        raise


class Stopped(Exception):
    """SIGTERM or SIGINT reached the runner: its children are stopped, the run ends in one line."""


@contextlib.contextmanager
def stopped_by_signals():
    """SIGTERM and SIGINT raise Stopped in the main thread (SIGTERM would otherwise end this
    process with its children still running, SIGINT in a traceback); the old handlers come back."""
    def on_signal(signum, frame):
        raise Stopped(signal.Signals(signum).name)
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
