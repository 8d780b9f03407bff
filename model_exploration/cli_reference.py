"""docs/cli.md, generated from the parsers themselves (the trainer's argument groups, then each tool's own flags),
so that the reference cannot drift from the code. Regenerate after adding or changing a flag:

    python -m model_exploration.cli_reference          # writes docs/cli.md

tests/test_docs.py fails when docs/cli.md differs from what this writes.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

from model_exploration import cli
from model_exploration.keys import REPO_ROOT

OUT = REPO_ROOT / "docs" / "cli.md"
TRAINER = "model_exploration/st_trainer_ddp_hf.py"
# tools built on cli.tool_parser take every flag of the trainer and add their own
TOOLS = ("data_prep/prefetch.py", "data_prep/mine_hard_negatives.py", "data_prep/check_overlap.py")
# tools with a parser of their own
OWN_PARSERS = ("model_exploration/compare.py", "data_prep/publish.py")


def script_parser(path: str) -> argparse.ArgumentParser:
    """build_parser() of a script (data_prep/ scripts are files, not an installed package)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def is_switch(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreConstAction)


def default_cell(action: argparse.Action) -> str:
    """The default as the reference shows it: `off` for a switch, blank for none, the machine-independent text of
    a default that depends on the machine (cli.shown_default)."""
    if hasattr(action, "doc_default"):
        return action.doc_default
    if is_switch(action):
        return "off"
    value = action.default
    if value is None or value == () or value == []:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def flag_cell(action: argparse.Action) -> str:
    option = action.option_strings[0]
    if is_switch(action):
        return f"`{option}`"
    metavar = action.metavar or (f"{{{','.join(map(str, action.choices))}}}" if action.choices else action.dest.upper())
    if action.nargs in ("+", "*"):
        metavar += " ..."
    elif action.nargs == "?":
        metavar = f"[{metavar}]"
    return f"`{option} {metavar}`"


def key_cell(action: argparse.Action) -> str:
    """How a config file (--config) sets the flag."""
    if is_switch(action):
        return f"`{action.dest}: {str(action.const).lower()}`"
    return f"`{action.dest}`"


def meaning_cell(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%")
    if action.choices and not is_switch(action):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    if action.required:
        text += " (required)"
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def table(actions: list[argparse.Action], keys: bool) -> list[str]:
    if not keys:  # a parser without --config
        lines = ["| flag | default | meaning |", "|---|---|---|"]
        return lines + [f"| {flag_cell(a)} | {default_cell(a)} | {meaning_cell(a)} |" for a in actions]
    lines = ["| flag | default | config key | meaning |", "|---|---|---|---|"]
    lines += [f"| {flag_cell(a)} | {default_cell(a)} | {key_cell(a)} | {meaning_cell(a)} |" for a in actions]
    return lines


def grouped(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> list[str]:
    """One table per argument group of `parser`, in --help order; flags whose dest is in `skip` left out; the
    config-key column where the parser takes --config."""
    keys = any("--config" in a.option_strings for a in parser._actions)
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help" and a.dest not in skip]
        if actions:
            title = "other flags" if group.title == "options" else re.sub(r"docs/(\w+\.md)", r"[\1](\1)", group.title)
            lines += ["", f"### {title}", "", *table(actions, keys)]
    return lines


def render() -> str:
    trainer = cli.build_parser()
    trainer_dests = {a.dest for a in flag_actions(trainer)}
    lines = [
        "# Command-line reference",
        "",
        "Every flag of the trainer and the tools, their defaults and their config-file keys, generated from the "
        "parsers (do not edit by hand). Regenerate after changing a flag: `python -m model_exploration.cli_reference`."
        " A config file (`--config`, [recipes.md](recipes.md)) sets a flag by its key: `batch_size: 32`, a switch "
        "with true or false, a list for a flag that takes several values.",
        "",
        f"## `{TRAINER}`",
        "",
        "Groups as in `--help`; each names the page that explains it.",
        *grouped(trainer),
    ]
    for path in TOOLS:
        parser = script_parser(path)
        own = grouped(parser, skip=trainer_dests)
        lines += ["", f"## `{path}`", "", "Every flag of the trainer (above: same mixture, same data flags)"]
        lines[-1] += ", plus:" if own else "; no flag of its own."
        lines += own
    for path in OWN_PARSERS:
        lines += ["", f"## `{path}`", *grouped(script_parser(path))]
    return "\n".join(lines) + "\n"


def main() -> int:
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
