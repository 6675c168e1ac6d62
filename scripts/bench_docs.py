#!/usr/bin/env python
"""Copy the benchmark reports into docs/BENCHMARKS.md, between its generated-section markers.

Each ``<!-- begin generated: NAME -->`` ... ``<!-- end generated: NAME -->`` block is
replaced by the body of ``docs/NAME.md`` (as written by ``scripts/NAME.py --report``),
so the tables and figures in BENCHMARKS.md are exactly what the scripts printed.
The hand-written text outside the markers is kept.

    .venv/bin/python scripts/bench_docs.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- begin generated: (?P<name>[\w-]+) -->\n).*?(<!-- end generated: (?P=name) -->)", re.S)


def fill(text: str, docs: Path) -> str:
    def body(m: re.Match) -> str:
        src = docs / f"{m['name']}.md"
        if not src.is_file():
            raise SystemExit(f"error: {src} does not exist; run scripts/{m['name']}.py --report {src} first")
        report = src.read_text().split("\n", 1)[1].strip()  # drop the report's own title
        return f"{m[1]}{report}\n{m[3]}"

    return BLOCK.sub(body, text)


def main() -> int:
    docs = ROOT / "docs"
    target = docs / "BENCHMARKS.md"
    from pgps_tune.errors import atomic_write_text

    atomic_write_text(target, fill(target.read_text(), docs))
    print(f"updated {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
