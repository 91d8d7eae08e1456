"""Small formatting helpers for the Markdown report: numbers, verdicts, tables."""

from __future__ import annotations

import math
from typing import Any

PATH_LABELS = {
    "direct": "direct ComfyClient",
    "comfyq_sse": "comfyq: POST /generate + SSE",
    "comfyq_sync": "comfyq: POST /generate/sync",
}


def num(x: Any, digits: int = 0) -> str:
    """A number with thousands separators; an en dash when missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:,.{digits}f}"


def ms(x: Any) -> str:
    """Milliseconds: two decimals under 10 ms, one above."""
    if x is None:
        return "–"
    return f"{num(x, 2 if abs(x) < 10 else 1)} ms"


def verdict(ok: bool | None) -> str:
    """met / **MISSED** / n/a."""
    return "n/a" if ok is None else ("met" if ok else "**MISSED**")


def sized_verdict(ok: bool, measured_at: int, target_at: int, unit: str) -> str:
    """The verdict when measured at the target's size, else n/a with what the smaller run shows."""
    if measured_at >= target_at:
        return verdict(ok)
    how = "met" if ok else "missed"
    return f"n/a: {how} with {measured_at:,} {unit}, the target names {target_at:,}"


def table(head: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    """A Markdown table; with ``numeric`` every column but the first is right-aligned."""
    rule = ["---"] + [("---:" if numeric else "---")] * (len(head) - 1)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def ok_figures(step: dict[str, Any] | None) -> dict[str, Any] | None:
    """A step's figures when it ran and wrote them, else None."""
    if step and step.get("status") == "ok" and isinstance(step.get("figures"), dict):
        return dict(step["figures"])
    return None


def not_run(step: dict[str, Any] | None) -> list[str]:
    """The sentence that stands in for a section whose step did not give figures."""
    if not step:
        return ["*Not run.*"]
    if step.get("status") == "skipped":
        return [f"*Not run: {step.get('reason', 'skipped')}.*"]
    return [
        f"*Failed: {step.get('reason', 'no figures')}; its output is under “Raw output” below.*"
    ]
