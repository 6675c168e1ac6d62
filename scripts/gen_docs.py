#!/usr/bin/env python
"""Generate the reference pages from the code, so they cannot drift from it.

- ``docs/CLI.md``: every command and flag, from the argument parser.
- ``docs/SPACES.md``: every key of a search-space file, from the space schema.

    .venv/bin/python scripts/gen_docs.py          # rewrite both pages
    .venv/bin/python scripts/gen_docs.py --check  # exit 1 if a page is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _flag_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:  # argparse has no public iterator over its actions
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
        if action.metavar and action.nargs not in (0, None):
            metavar = " ".join(action.metavar) if isinstance(action.metavar, tuple) else action.metavar
            names += f" {metavar}"
        help_text = (action.help or "").replace("|", "\\|").replace("%%", "%")
        if action.choices and "choices" not in help_text and not isinstance(action.choices, dict):
            help_text += f" (choices: {', '.join(map(str, action.choices))})"
        default = action.default
        shown = "" if default in (None, False, argparse.SUPPRESS) or action.required else f"`{default}`"
        rows.append(f"| {names} | {'yes' if action.required else ''} | {shown} | {help_text} |")
    return rows


def cli_page() -> str:
    from pgps_tune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = ["# Command reference", "",
           "Generated from the argument parser by `scripts/gen_docs.py`; `pgps-tune COMMAND --help` prints the "
           "same.", ""]
    out += [f"- [`{name}`](#{name}): {helps.get(name, '')}" for name in sub.choices]
    for name, p in sub.choices.items():
        out += ["", f"## {name}", "", helps.get(name, "") or "", "", "| flag | required | default | meaning |",
                "|---|---|---|---|", *_flag_rows(p)]
    return "\n".join(out) + "\n"


def spaces_page() -> str:
    from pgps_tune import space as sp

    out = ["# Search-space file reference", "",
           "Generated from the space schema (`pgps_tune/space.py`) by `scripts/gen_docs.py`. A space file is "
           "YAML with the sections below; every key is optional except `parameters`. Shipped spaces are in "
           "`search_spaces/`.", "", "## parameters", "",
           "Each entry is `NAME: {type: int|float|categorical, low, high, log, step, choices, when}` or a fixed "
           "`NAME: {value: V}`. `when: \"stages > 1\"` makes a parameter exist only when the condition on an "
           "earlier parameter holds.", "", "| parameter | kind | what it sets |", "|---|---|---|"]
    for name, kind in {**sp.SCHEDULE_PARAMS, **sp.TRAINER_PARAMS}.items():
        role = "schedule" if name in sp.SCHEDULE_PARAMS else "trainer"
        out.append(f"| `{name}` | {kind} | {role} |")
    for section, cls in (("objective", sp.Objective), ("search", sp.Search), ("asha", sp.Asha),
                         ("budget", sp.Budget)):
        out += ["", f"## {section}", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            default = list(default) if isinstance(default, tuple) else default
            out.append(f"| `{f.name}` | `{default}` | {f.metadata.get('doc', '')} |")
    return "\n".join(out) + "\n"


PAGES = {"docs/CLI.md": cli_page, "docs/SPACES.md": spaces_page}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the pages are current")
    a = ap.parse_args()
    stale = []
    for rel, make in PAGES.items():
        text, path = make(), ROOT / rel
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(rel)
        if not a.check:
            path.write_text(text, encoding="utf-8")
    if a.check and stale:
        print(f"out of date: {', '.join(stale)}; run scripts/gen_docs.py", file=sys.stderr)
        return 1
    print("written: " + (", ".join(stale) or "nothing, all current") if not a.check else "docs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
