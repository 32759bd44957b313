"""One-table overview of a DataFrame: a row per column, ready to ``display()``."""

from __future__ import annotations

import pandas as pd

__all__ = ["summarize"]


def _nunique(col: pd.Series) -> int | None:
    try:
        return int(col.nunique(dropna=True))
    except TypeError:  # unhashable cells (lists, dicts) from JSON
        return None


def _example(col: pd.Series, width: int) -> str:
    non_null = col.dropna()
    if non_null.empty:
        return ""
    value = non_null.iloc[0]
    text = repr(value) if isinstance(value, str) else str(value)  # quotes show stray spaces
    return text if len(text) <= width else text[: width - 1] + "…"


def summarize(df: pd.DataFrame, example_width: int = 40) -> pd.DataFrame:
    """Describe every column of ``df`` in one DataFrame indexed by column name.

    Columns of the result: ``dtype``, ``non_null``, ``null_pct``, ``nunique``,
    ``example`` (first non-null value, as repr) and, for numeric columns,
    ``mean``, ``std``, ``min``, ``max`` (NaN elsewhere).
    """
    rows = []
    total = len(df)
    for name in df.columns:
        col = df[name]
        if isinstance(col, pd.DataFrame):  # duplicate column names
            col = col.iloc[:, 0]
        non_null = int(col.notna().sum())
        row = {
            "column": str(name),
            "dtype": str(col.dtype),
            "non_null": non_null,
            "null_pct": round(100 * (total - non_null) / total, 1) if total else 0.0,
            "nunique": _nunique(col),
            "example": _example(col, example_width),
            "mean": float("nan"),
            "std": float("nan"),
            "min": float("nan"),
            "max": float("nan"),
        }
        is_numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
        if is_numeric and non_null:
            row.update(mean=col.mean(), std=col.std(), min=col.min(), max=col.max())
        rows.append(row)
    result = pd.DataFrame(rows).set_index("column")
    result["nunique"] = result["nunique"].astype("Int64")
    return result
