"""
Installation: the wheel that `pip install .` builds holds the library, which imports from any
folder without the checkout, and declares the dependencies and the pinned test tools.

    python -m pytest tests/test_packaging.py -q

The wheel is built offline (no build isolation: the setuptools installed here) from a copy of
the checkout, so nothing is written into the repository.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ["dllm_jepa", "tiny_model", "dlm.backbones", "dlm.data", "dlm.hub", "dlm.lora", "dlm.sampler",
           "dlm.sharding", "dlm.checkpoints", "dlm.files", "dlm.flags", "dlm.preflight", "dlm.diagnostics",
           "dlm.hf_trainer", "tasks", "tasks.spider"]

IMPORT_ALL = """
import importlib, json, sys
from pathlib import Path
from dlm import backbones
files = {name: importlib.import_module(name).__file__ for name in sys.argv[1].split(",")}
fixes = sorted(p.name for p in (Path(backbones.__file__).parent / "remote_fixes").glob("*.py"))
print(json.dumps({"files": files, "remote_fixes": fixes}))
"""


def test_the_wheel_imports_from_another_folder(tmp_path):
    """Build the wheel, unpack it as pip installs it, and import every library module from an
    empty folder with only that install (and the dependencies) on the path: each comes from
    the install, and remote_fixes/ lies beside backbones.py, where exports copy it from."""
    source = shutil.copytree(ROOT, tmp_path / "checkout", ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "out", "runs", "data"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp_path / "wheel").glob("dllm_jepa-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    assert "Requires-Dist: torch>=2.6" in metadata and "Requires-Dist: transformers>=5.0" in metadata
    assert 'Requires-Dist: pytest==9.2.0; extra == "test"' in metadata
    assert 'Requires-Dist: lm-eval==0.4.13; extra == "eval"' in metadata

    (tmp_path / "elsewhere").mkdir()
    ran = subprocess.run([sys.executable, "-c", IMPORT_ALL, ",".join(LIBRARY)], cwd=tmp_path / "elsewhere",
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "site")})
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = json.loads(ran.stdout.splitlines()[-1])
    for name, file in out["files"].items():
        assert Path(file).is_relative_to(tmp_path / "site"), (name, file)
    assert out["remote_fixes"] == ["dream_transformers5.py", "llada_transformers5.py"]

