"""Session titles: a short readable line from the first prompt or code."""

from __future__ import annotations

import pytest

from agent_service.titles import MAX_TITLE_CHARS, session_title


@pytest.mark.parametrize(
    ("prompt", "title"),
    [
        ("RUN:import pandas as pd\ndf = pd.DataFrame()", "RUN:import pandas as pd"),
        ("\n\n## **Plot** the `sales` of [a file](http://x/f) \nmore", "Plot the sales of a file"),
        ("```python\nx = 2 ** 3\n```", "x = 2 ** 3"),
        ("> quoted _thing_ here", "quoted thing here"),
        ("- first item\n- second", "first item"),
        ("![chart](data:image/png;base64,AAAA) explain", "chart explain"),
        ("snake_case_name and *args, **kwargs", "snake_case_name and *args, **kwargs"),
        ("   \n\t\n", ""),
    ],
)  # fmt: skip
def test_first_line_without_markup(prompt: str, title: str) -> None:
    assert session_title(prompt) == title


def test_long_lines_are_cut_at_a_word() -> None:
    prompt = (
        "Please load the attached CSV file, clean the missing values and plot revenue by "
        "month for 2024"
    )
    title = session_title(prompt)
    assert title == "Please load the attached CSV file, clean the missing values…"
    assert len(title) <= MAX_TITLE_CHARS + 1
    assert session_title("x" * 200) == "x" * MAX_TITLE_CHARS + "…"


def test_code_is_taken_as_written() -> None:
    code = "\n# load the data\ndef f(*args, **kwargs):\n    pass"
    assert session_title(code, markdown=False) == "# load the data"
