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
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("%%", "%")


def _shown(value: object) -> str:
    """A default as a user writes it: YAML spellings for booleans and null, lists for tuples."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(list(value) if isinstance(value, tuple) else value)


def _flag_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()  # argparse's own rendering of "--flag METAVAR"
    rows = []
    for action in parser._actions:  # argparse has no public iterator over its actions
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
            continue
        names = (formatter._format_action_invocation(action) if action.option_strings
                 else formatter._metavar_formatter(action, action.dest)(1)[0])
        help_text = action.help or ""
        if action.choices and "choices" not in help_text:
            help_text += f" (choices: {', '.join(map(str, action.choices))})"
        default = action.default
        shown = "" if default in (None, False, argparse.SUPPRESS) or action.required else f"`{_shown(default)}`"
        required = "yes" if action.required or not action.option_strings else ""
        rows.append(f"| `{_cell(names)}` | {required} | {shown} | {_cell(help_text)} |")
    return rows


def cli_page() -> str:
    from pgps_tune.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines at the terminal's width: fix it, for --check
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = ["# Command reference", "",
           "Generated from the argument parser by `scripts/gen_docs.py`; `pgps-tune COMMAND --help` prints the "
           "same. `pgps-tune --version` prints the version.", "",
           f"Exit codes: {parser.epilog.removeprefix('exit codes: ')}.", ""]
    out += [f"- [`{name}`](#{name}): {helps.get(name, '')}" for name in sub.choices]
    for name, p in sub.choices.items():
        out += ["", f"## {name}", "", "```text", p.format_usage().strip().removeprefix("usage: "), "```", "",
                (helps.get(name) or "") + ".", "", "| flag | required | default | meaning |", "|---|---|---|---|",
                *_flag_rows(p)]
        for group in p._action_groups:
            if group.description:
                out += ["", f"{group.title.capitalize()} flags: {group.description}."]
    return "\n".join(out) + "\n"


def spaces_page() -> str:
    from pgps_tune import space as sp

    out = ["# Search-space file reference", "",
           "Generated from the space schema (`pgps_tune/space.py`) by `scripts/gen_docs.py`. A space file is "
           "YAML with the sections below, plus `name` (default: the file's stem) and `description`; every "
           "section is optional except `parameters`, and unknown keys are refused. Shipped spaces are in "
           f"`search_spaces/`: {', '.join(f'`{n}`' for n in sp.shipped_spaces())}.", "", "## How the file is read",
           "", "Space and schedule files (YAML or JSON) are read by one set of rules, YAML 1.2's core schema: "
           "`1e-4` and `3e-3` are numbers; only `true`/`false` are booleans (`off`, `no`, `yes` are text, so "
           "`augment: off` is the unknown augmentation `off`: write `none`); `2024-01-31` is text (no dates); an "
           "integer is plain decimal, and a leading zero does not make it octal (`010` is 10, as YAML 1.2 reads "
           "it). YAML 1.1's other number forms, which YAML 1.1 and 1.2 read differently (`0x10`, `0o17`, "
           "`0b11`, base 60 such as `1:30`, digits grouped as `1_000`), are refused: write the number in plain "
           "decimal, or quote it for text. A key given twice in one mapping (at any depth; also `1` and `1.0`) "
           "is refused with both lines, as are more than one document (`---`, or two files joined), tags "
           "(`!!binary`, `!!timestamp`, `!!python/...`), keys that are lists or mappings, merge keys (`<<`), "
           "control characters (a pasted terminal colour code, a NUL) with their line and "
           "column, an empty file, and anything that is not a regular file (a FIFO, a socket, a device).", "",
           "## parameters", "",
           "Each entry is `NAME: {type: int|float, low: A, high: B}` (optionally `log: true`, which needs "
           "`low > 0`, or `step: S`, not both; a step must divide `high - low`), `NAME: {type: categorical, "
           "choices: [...]}` (each choice once), or a fixed value `NAME: {value: V}` (or simply `NAME: V`). "
           "Keys of another kind are refused, not ignored: `value` beside `type`/`low`/`high`/`choices`, "
           "`low`/`high`/`log`/`step` on a categorical, `choices` on a range. Any entry may carry "
           "`when: \"OTHER OP VALUE\"` (OP one "
           "of `> >= < <= == !=`): the parameter is then sampled only when the condition holds for the value "
           "drawn for `OTHER`, another parameter of the space (order in the file does not matter; cycles are "
           "refused). The schedule parameters build a `parametric` schedule. Before any trial starts, the "
           "schedules of the range ends and choices are built for the plan, and every value of an integer "
           "parameter that a `when` reads (so `lengths` with `when: \"stages == 2\"` is checked at 2 stages).", "",
           "| parameter | kind | sets | meaning |", "|---|---|---|---|"]
    for name, kind in sp.KNOWN_PARAMS.items():
        role = "schedule" if name in sp.SCHEDULE_PARAMS else "trainer"
        out.append(f"| `{name}` | {kind} | {role} | {_cell(sp.PARAM_DOCS[name])} |")
    for section, cls in (("objective", sp.Objective), ("search", sp.Search), ("asha", sp.Asha),
                         ("budget", sp.Budget), ("confirm", sp.Confirm)):
        out += ["", f"## {section}", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            out.append(f"| `{f.name}` | `{_shown(f.default)}` | {_cell(f.metadata.get('doc', ''))} |")
        if section == "objective":
            out += ["", "`tolerance`, `voxel_budget` and `pick` apply to one type each (`cheapest_within`, "
                        "`dice_under_budget`, `pareto`); given with another type they are refused."]
        if section == "confirm":
            out += ["", "Give `seeds` or `folds`/`splits`, not both (both are refused, as the flags are)."]
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
