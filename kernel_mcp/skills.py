"""The skills library: Agent Skills folders served through fastmcp's skills provider.

fastmcp's `SkillsDirectoryProvider` rejects a whole re-scan when one folder is
invalid, which would also hide folders added later. This catalog provider reads
each folder with fastmcp's own `Skill.from_directory`, logs and skips an invalid
one, and re-reads only when a folder changed: a skill added while the server runs
appears at the next request, and one broken SKILL.md never takes the others down.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastmcp.skills import Skill
from fastmcp.skills.provider import SkillCatalogProvider

logger = logging.getLogger(__name__)

_Signature = tuple[tuple[str, int, int], ...]


def _signature(folder: Path) -> _Signature:
    entries = []
    for path in sorted(folder.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        stat = path.stat()
        entries.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


class SkillsLibrary(SkillCatalogProvider):
    """Every valid skill folder directly under `root`, served as `skill://<name>/...`."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self._cache: dict[str, tuple[_Signature, Skill | None]] = {}
        self.invalid: dict[str, str] = {}
        self.scan()

    def scan(self) -> dict[str, Skill]:
        """Re-read changed folders; returns the valid skills by name."""
        folders = (
            sorted(p for p in self.root.iterdir() if (p / "SKILL.md").is_file())
            if self.root.is_dir()
            else []
        )
        skills: dict[str, Skill] = {}
        seen = set()
        for folder in folders:
            if folder.name.startswith("."):
                continue
            seen.add(folder.name)
            signature = _signature(folder)
            cached = self._cache.get(folder.name)
            if cached is None or cached[0] != signature:
                cached = (signature, self._load(folder))
                self._cache[folder.name] = cached
            if cached[1] is not None:
                skills[folder.name] = cached[1]
        for gone in set(self._cache) - seen:
            del self._cache[gone]
            self.invalid.pop(gone, None)
        return skills

    def _load(self, folder: Path) -> Skill | None:
        try:
            skill = Skill.from_directory(folder)
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.invalid[folder.name] = reason
            logger.error("skill folder %s is not a valid Agent Skill, skipped: %s", folder, reason)
            return None
        self.invalid.pop(folder.name, None)
        logger.info("skill %s loaded from %s", skill.name, folder)
        return skill

    async def load_skills(self) -> dict[str, Skill]:
        return self.scan()

    def index(self) -> list[dict[str, str]]:
        """Name and description of every served skill."""
        return [{"name": s.name, "description": s.description} for s in self.scan().values()]

    def read(self, name: str, path: str = "SKILL.md") -> str:
        """A skill's file as text; KeyError names what exists."""
        skills = self.scan()
        skill = skills.get(name)
        if skill is None:
            known = ", ".join(sorted(skills)) or "none"
            raise KeyError(f"no skill named {name!r}; available skills: {known}")
        data = skill.files.get(path)
        if data is None:
            files = ", ".join(sorted(skill.files))
            raise KeyError(f"skill {name!r} has no file {path!r}; its files: {files}")
        return data.decode("utf-8", errors="replace")
