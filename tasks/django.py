"""
Django (Oda et al., 2015): one line of Python per English description, in line-aligned
X.anno and X.code files; scored by exact match (tasks/common.py), as LLM-JEPA reports it.
"""

from pathlib import Path

from dlm import data
from tasks.common import Item, non_empty


def load_django(path: Path) -> list[Item]:
    """Django's line-aligned pair of files: X.anno (descriptions) and X.code (Python lines);
    either may be given."""
    anno, code = path.with_suffix(".anno"), path.with_suffix(".code")
    for p in (anno, code):
        if not p.is_file():
            raise ValueError(f"{path}: Django data needs both {anno.name} and {code.name}; {p} is missing")
    descriptions = data.read_text(anno).splitlines()
    lines = data.read_text(code).splitlines()
    if len(descriptions) != len(lines):
        raise ValueError(f"{anno} has {len(descriptions)} lines but {code} has {len(lines)}: "
                         "they must be line-aligned")
    return non_empty([Item([{"role": "user", "content": d.strip()}], c.strip())
                      for d, c in zip(descriptions, lines)], anno)
