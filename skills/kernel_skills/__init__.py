"""Make the helper modules of every skill importable in the kernel.

Skill folders have hyphenated names (``pandas-data-analysis``), which Python cannot
import. ``skills/`` is on the kernel's ``PYTHONPATH``, so ``import kernel_skills``
works, and importing it appends each ``skills/<name>/`` folder that holds ``.py``
files to ``sys.path``. Helpers are then imported by their own (unique) module name::

    import kernel_skills
    from df_summary import summarize
"""

import sys
from pathlib import Path

SKILLS_DIR = Path(__file__).resolve().parent.parent

__all__ = ["SKILLS_DIR", "helper_dirs"]


def helper_dirs() -> list[Path]:
    """Skill folders (those with a SKILL.md) that contain Python helper modules."""
    return sorted(
        folder
        for folder in SKILLS_DIR.iterdir()
        if folder.is_dir() and (folder / "SKILL.md").is_file() and any(folder.glob("*.py"))
    )


def _install() -> None:
    for folder in helper_dirs():
        entry = str(folder)
        if entry not in sys.path:
            sys.path.append(entry)


_install()
