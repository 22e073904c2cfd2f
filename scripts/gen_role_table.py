"""Render the role × RPC table of ``runtime/roles.py`` into docs/SECURITY.md.

    python scripts/gen_role_table.py          # rewrite the table in docs/SECURITY.md
    python scripts/gen_role_table.py --check  # exit 1 when the doc is stale

The table in the doc starts at its ``| RPC | ...`` header row and ends at the first blank line.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from clinisynth_server.runtime.roles import markdown_table

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "SECURITY.md"
HEADER = "| RPC | "


def render(text: str) -> str:
    start = text.index(HEADER)
    end = text.find("\n\n", start)
    end = len(text) if end < 0 else end + 1
    return text[:start] + markdown_table() + text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the doc is stale")
    args = parser.parse_args()
    text = DOC.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{DOC} is stale: run python scripts/gen_role_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
