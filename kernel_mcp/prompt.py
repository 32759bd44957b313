"""The `agent_system_prompt`: tool guidance plus the skills index."""

from __future__ import annotations

GUIDANCE = """\
You work in a persistent Python (IPython) kernel of your own, through tools.

- execute_code runs Python. Variables, imports and functions persist across calls, so build \
results step by step and reuse what you defined. The last expression's value is shown; use \
print() or display() for anything else. Matplotlib figures come back as images.
- Keep each call short. A call past its timeout is interrupted; code that ignores the \
interrupt gets the kernel restarted and every variable is lost. Do not re-run code that crashed \
the kernel unchanged.
- Files live in your session folder (the kernel's working directory): list_files, read_file \
and write_file work there, and code can use relative paths. Save results users should download \
there.
- list_variables shows what is defined; restart_kernel starts clean; interrupt_kernel stops \
runaway code.
- Skills are guides with tested code for common work. Read a skill with read_skill before \
relying on it; its helpers are importable after `import kernel_skills`.
- Report results from what the tools actually returned; if code fails, read the traceback and \
fix the cause.
"""


def system_prompt(skills: list[dict[str, str]]) -> str:
    """The full prompt for `skills` (name and description of each)."""
    if skills:
        index = "\n".join(f"- {s['name']}: {s['description']}" for s in skills)
    else:
        index = "(no skills installed)"
    return f"{GUIDANCE}\n## Skills\n{index}\n"
