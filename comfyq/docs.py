"""Documentation generated from the code: ``python -m comfyq.docs settings`` prints the settings
table that README.md carries between its ``settings-table`` markers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from comfyq.config import describe

BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"


def settings_table() -> str:
    rows = ["| `comfyq.toml` key | environment variable | default | meaning |", "|---|---|---|---|"]
    for key, env, default, desc in describe():
        shown = f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `{key}` | `{env}` | {shown} | {desc} |")
    return "\n".join(rows)


def update_readme(path: Path) -> bool:
    """Rewrite the table in ``path``; True when it changed."""
    text = path.read_text()
    new = re.sub(
        re.escape(BEGIN) + ".*?" + re.escape(END),
        f"{BEGIN}\n{settings_table()}\n{END}",
        text,
        flags=re.DOTALL,
    )
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    if sys.argv[1:] == ["settings"]:
        print(settings_table())
    elif sys.argv[1:2] == ["update-readme"]:
        print(
            "README.md updated"
            if update_readme(Path(sys.argv[2] if len(sys.argv) > 2 else "README.md"))
            else "README.md already up to date"
        )
    else:
        print("usage: python -m comfyq.docs settings | update-readme [README.md]", file=sys.stderr)
        sys.exit(2)
