"""`kernel-agent`: command-line tools around the service's transcripts."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

_SKILLS = Path(__file__).resolve().parent.parent / "skills"


def _replay(args: argparse.Namespace) -> int:
    from .replay import replay_sync

    env = {"PYTHONPATH": str(args.skills)} if args.skills.is_dir() else {}
    reports = replay_sync(args.notebook, cwd=args.cwd, timeout=args.timeout, env=env)
    differing = [r for r in reports if r.status == "differs"]
    if args.json:
        print(json.dumps([r.__dict__ for r in reports], indent=2))  # noqa: T201
    else:
        # Cells are named by their index in the notebook, as in the --json report.
        for report in reports:
            if report.status == "restarted":
                print(f"kernel restarted before cell {report.index}: {report.detail}")  # noqa: T201
                continue
            line = f"cell {report.index}: {report.status}"
            print(f"{line} ({report.detail})" if report.detail else line)  # noqa: T201
        matched = sum(r.status == "match" for r in reports)
        print(  # noqa: T201
            f"{matched} matched, {len(differing)} differ, "
            f"{sum(r.status == 'skipped' for r in reports)} skipped"
        )
    return 1 if differing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser(
        "replay", help="re-execute a transcript notebook in a fresh kernel and compare outputs"
    )
    replay.add_argument("notebook", type=Path)
    replay.add_argument("--cwd", type=Path, default=None, help="working folder (default: temp)")
    replay.add_argument("--timeout", type=float, default=120, help="seconds per cell")
    replay.add_argument("--skills", type=Path, default=_SKILLS, help="skills folder for imports")
    replay.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.command == "replay":
        if not args.notebook.is_file():
            parser.error(f"no such notebook: {args.notebook}")
        return _replay(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
