"""
The tutorial's code runs: every ```python block of tutorial.md, in order, in one namespace.

    python -m pytest tests/test_tutorial.py -q

The blocks run on CPU from a temporary working directory, so the files they write
(masking.png, the small training runs, drift.json, drift.png) never land in the repository;
the repository stays importable through pytest.ini's `pythonpath = .`. Blocks of other
languages (```bash, ```text) are documentation only and are not run. Any block that raises
fails the test, named by its first line in tutorial.md.
"""

import re
from pathlib import Path

TUTORIAL = Path(__file__).resolve().parent.parent / "tutorial.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
# The main sections (## headings) that must each hold runnable code: a prefix of the title.
MAIN_SECTIONS = ("1. Masked diffusion", "2. JEPA", "3. DLLM-JEPA", "4. Run it", "5. Exercises")


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line of the opening fence, the ## section it sits in, code) for every ```python block."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        line = text.count("\n", 0, match.start()) + 1
        headings = re.findall(r"^## (.+)$", text[:match.start()], re.M)
        blocks.append((line, headings[-1] if headings else "", match.group(2)))
    return blocks


def test_every_main_section_has_python():
    text = TUTORIAL.read_text(encoding="utf-8")
    titles = re.findall(r"^## (.+)$", text, re.M)
    blocks = python_blocks(text)
    for prefix in MAIN_SECTIONS:
        section = [t for t in titles if t.startswith(prefix)]
        assert section, f"tutorial.md has no section '## {prefix}...'"
        assert any(s == section[0] for _, s, _ in blocks), f"section '{section[0]}' has no python block"


def test_tutorial_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(TUTORIAL.read_text(encoding="utf-8"))
    assert len(blocks) >= len(MAIN_SECTIONS)
    namespace = {"__name__": "__tutorial__"}
    for line, section, code in blocks:
        try:
            exec(compile(code, f"tutorial.md:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the python block at tutorial.md line {line} (section '{section}') "
                                 f"raised {type(e).__name__}: {e}") from e
    assert (tmp_path / "masking.png").is_file(), "the masking figure was not written"
