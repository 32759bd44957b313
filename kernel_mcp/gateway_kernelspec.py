"""Write the kernelspec a gateway starts for kernel_mcp: our launcher, so caps hold there.

``python -m kernel_mcp.gateway_kernelspec DEST [--name kernel-agent] [--python PATH]
[--skills DIR]`` writes ``DEST/<name>/kernel.json`` and ``DEST/<name>/kernel_launcher.py``
(a copy of `_kernel_launcher.py`, which imports nothing of kernel_mcp). Put DEST on the
gateway's kernelspec path: ``<prefix>/share/jupyter/kernels``, or ``<dir>/kernels`` with
``JUPYTER_PATH=<dir>`` in the gateway's environment. `--python` must have ipykernel (and
what the skills use: matplotlib, pandas, numpy, sympy) on the gateway's side.

The output cap, image cap, spool size and memory limit come with each start request
(``KERNEL_AGENT_*`` variables, which gateways pass to kernels as ``KERNEL_``-prefixed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

_LAUNCHER = Path(__file__).with_name("_kernel_launcher.py")
_REPO_SKILLS = Path(__file__).resolve().parent.parent / "skills"


def kernelspec(
    python: str, skills: Path | None, ipython_dir: Path | None = None
) -> dict[str, object]:
    """The kernel.json of our gateway kernelspec."""
    env = {
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "KERNEL_AGENT_ALLOW_SHUTDOWN": "1",
    }
    if skills is not None:
        env["PYTHONPATH"] = str(skills)
        env["KERNEL_AGENT_SKILLS_DIR"] = str(skills)
    if ipython_dir is not None:
        env["IPYTHONDIR"] = str(ipython_dir)
    return {
        "argv": [
            python,
            "{resource_dir}/kernel_launcher.py",
            "0",  # memory limit: KERNEL_AGENT_MEMORY_LIMIT of the start request
            "-f",
            "{connection_file}",
            "--InteractiveShell.cache_size=0",
            "--HistoryManager.enabled=False",
        ],
        "display_name": "Python 3 (kernel-agent)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": env,
    }


def write_kernelspec(
    dest: Path,
    *,
    name: str = "kernel-agent",
    python: str = sys.executable,
    skills: Path | None = _REPO_SKILLS,
    ipython_dir: Path | None = None,
) -> Path:
    """Write the kernelspec folder `dest/name`; returns it."""
    folder = dest / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_LAUNCHER, folder / "kernel_launcher.py")
    spec = kernelspec(python, skills, ipython_dir)
    (folder / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernel_mcp.gateway_kernelspec")
    parser.add_argument("dest", type=Path, help="a kernels folder on the gateway's path")
    parser.add_argument("--name", default="kernel-agent")
    parser.add_argument("--python", default=sys.executable, help="the kernels' Python")
    parser.add_argument("--skills", type=Path, default=_REPO_SKILLS, help="skills folder")
    parser.add_argument("--ipython-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    folder = write_kernelspec(
        args.dest,
        name=args.name,
        python=args.python,
        skills=args.skills,
        ipython_dir=args.ipython_dir,
    )
    sys.stderr.write(f"kernelspec written to {folder}\n")


if __name__ == "__main__":
    main()
