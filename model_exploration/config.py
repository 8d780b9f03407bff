"""Run configuration files: `--config run.yaml` sets any flag of a parser, and a run writes the configuration it
resolved to, so that `--config RUN/config.yaml` launches the same run again (docs/recipes.md).

A config file is a YAML mapping from a flag's dest name to its value, e.g.

    description: "Stage 2 (No Cite) + weighted sources"   # metadata: printed, never a flag
    base: 05-peach-night-57.yaml                           # optional: start from another file's keys
    stage: "2"
    batch_size: 32
    bat: tanh
    matryoshka_dims: [384, 256]
    gather_across_devices: true                            # a switch: true / false
    unpad: false                                           # the same as --no_unpad

The file is turned into command-line tokens placed before the real command line, so argparse validates every
value exactly as typed (types, choices) and a flag on the command line overrides the file. argparse itself has no
config files, and a mapping applied as parser defaults would skip the type and choice checks.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from model_exploration.errors import UserError

TRAINER = "model_exploration/st_trainer_ddp_hf.py"
# keys of a config file that are about the file, not flags
METADATA_KEYS = ("description", "base", "run_with")
# not written to a run's config.yaml: where this launch wrote or resumed (a relaunch is a new run in a new folder;
# to continue a run, pass --resume_checkpoint_path RUN), what mode it ran in, and the upload (a relaunch never
# publishes over the released model unless asked on the command line)
NOT_CARRIED = (
    "config",
    "run_name",
    "resume_checkpoint_path",
    "resume_run_id",
    "dry_run",
    "build_caches_only",
    "push_to_hub",
    "hub_private_repo",
)
RUN_CONFIG = "config.yaml"


def expand(parser: argparse.ArgumentParser, argv: list[str] | None, entry: str = TRAINER) -> list[str]:
    """`argv` with the flags of its --config file (if any) put in front of it, so the command line wins. `entry`:
    the script this parser belongs to (a file written for another script, `run_with`, is refused)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return argv
    return to_argv(parser, load(known.config, entry), known.config) + argv


def load(path: str | Path, entry: str = TRAINER, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The flag settings of a config file (its `base` chain resolved, metadata keys left out)."""
    path = Path(path)
    raw = read(path)
    run_with = raw.get("run_with", TRAINER)
    if run_with != entry:
        raise UserError(f"--config {path}: this file is for {run_with}; run python {run_with} --config {path}")
    settings: dict[str, Any] = {}
    if raw.get("base") is not None:
        base = (path.parent / str(raw["base"])).resolve()
        if base in _seen:
            raise UserError(f"--config {path}: `base` chain loops back to {base}")
        settings = load(base, entry, (*_seen, path.resolve()))
    if "config" in raw:
        raise UserError(f"--config {path}: a config file cannot name another with `config`; use `base: FILE`")
    return settings | {k: v for k, v in raw.items() if k not in METADATA_KEYS}


def read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise UserError(f"--config {path}: expected a YAML mapping of flag names to values (e.g. batch_size: 32)")
    return raw


def description(path: str | Path) -> str | None:
    """The `description` line of a config file (not inherited from its base)."""
    text = read(Path(path)).get("description")
    return None if text is None else str(text)


def to_argv(parser: argparse.ArgumentParser, settings: dict[str, Any], source: str | Path) -> list[str]:
    """Command-line tokens for `settings` (dest name -> value); null leaves a flag at its default."""
    by_dest = _actions_by_dest(parser)
    tokens: list[str] = []
    for key, value in settings.items():
        if key not in by_dest:
            raise UserError(f"--config {source}: unknown key {key!r}{_closest(key, by_dest)}")
        if value is None:
            continue
        tokens += _tokens(key, by_dest[key], value, source)
    return tokens


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "config"):
            by_dest.setdefault(action.dest, []).append(action)
    return by_dest


def _closest(key: str, by_dest: dict[str, list[argparse.Action]]) -> str:
    """'; did you mean ...' naming the closest dest and its flag (a flag's own spelling, e.g. no_unpad, included)."""
    spelled = {opt.lstrip("-"): dest for dest, actions in by_dest.items() for a in actions for opt in a.option_strings}
    if key in spelled and spelled[key] != key:  # a switch's own name, e.g. no_unpad for the key unpad
        dest = spelled[key]
        action = next(a for a in by_dest[dest] if f"--{key}" in a.option_strings)
        return f"; --{key} is written {dest}: {str(action.const).lower()}"
    match = difflib.get_close_matches(key, list(by_dest) + list(spelled), n=1, cutoff=0.6)
    if not match:
        return "; every key is a flag's name without the dashes (docs/cli.md)"
    dest = spelled.get(match[0], match[0])
    return f"; did you mean {dest} ({by_dest[dest][0].option_strings[0]})?"


def _tokens(key: str, actions: list[argparse.Action], value: Any, source: str | Path) -> list[str]:
    first = actions[0]
    if all(isinstance(a, argparse._StoreConstAction) for a in actions):  # store_true / store_false / const pairs
        if not isinstance(value, bool):
            raise UserError(f"--config {source}: {key} is a switch ({_spellings(actions)}): give true or false")
        for action in actions:
            if action.const is value:
                return [action.option_strings[0]]
        return []  # the value the switch already has when absent
    if first.nargs == "?" and value is True:  # --bat alone: the flag's const (ste)
        return [first.option_strings[0]]
    if isinstance(value, dict):
        raise UserError(f"--config {source}: {key} ({first.option_strings[0]}) takes a value or a list, not a mapping")
    many = first.nargs in ("+", "*") or isinstance(first.nargs, int)
    if isinstance(value, list) and not many:
        raise UserError(f"--config {source}: {key} ({first.option_strings[0]}) takes one value, got a list")
    values = value if isinstance(value, list) else [value]
    return [first.option_strings[0], *(_text(v) for v in values)]


def _spellings(actions: list[argparse.Action]) -> str:
    return " / ".join(f"{a.option_strings[0]} = {str(a.const).lower()}" for a in actions)


def _text(value: Any) -> str:
    """A YAML value as it is typed on a command line (true -> True is left to the flag's type to refuse)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---------------------------------------------------------------- writing a run's configuration


def dump(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    run_dir: Path,
    source: str | None,
    machine: dict[str, Any] | None = None,
) -> str:
    """The resolved configuration of a run as a config file: every flag the run used, grouped as --help groups
    them (the parser's argument groups), in the spelling a config file takes. A key holding what this machine
    fills in when it is unset (`machine`: cli.machine_defaults) is written null, with the value as a comment, so a
    relaunch elsewhere fills in its own; the keys not carried (NOT_CARRIED) are a comment, for the record."""
    machine = machine or {}
    described = description(source) if source else None
    lines = [
        f"# Resolved configuration of run {run_dir.name}, written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.",
        f"# Launch the same run again (into a new run folder): python {TRAINER} --config {run_dir / RUN_CONFIG}",
    ]
    if source:
        lines.append(f"# Launched with --config {source}.")
    record = {k: getattr(args, k, None) for k in NOT_CARRIED if k != "config" and getattr(args, k, None)}
    if record:
        lines.append("# Not carried (this launch only): " + ", ".join(f"{k}={v}" for k, v in record.items()))
    if described is not None:
        lines.append(f"description: {_yaml(described)}")
    written = set()
    for group in parser._action_groups:
        keys = [
            a.dest
            for a in group._group_actions
            if a.option_strings and a.dest not in NOT_CARRIED and a.dest != "help" and a.dest not in written
        ]
        keys = [k for k in dict.fromkeys(keys) if hasattr(args, k)]
        if not keys:
            continue
        lines += ["", f"# {group.title}"]
        for key in keys:
            written.add(key)
            value = _config_value(parser, key, getattr(args, key))
            if key in machine and getattr(args, key) == machine[key] and value is not None:
                lines.append(f"{key}: null  # this machine's default; this run: {_yaml(value)}")
            else:
                lines.append(f"{key}: {_yaml(value)}")
    return "\n".join(lines) + "\n"


def _config_value(parser: argparse.ArgumentParser, key: str, value: Any) -> Any:
    """A parsed value in the spelling its flag takes: lists stay lists, a tuple that one flag parsed from text
    (--doc_fields title,text) goes back to that text."""
    action = _actions_by_dest(parser)[key][0]
    if isinstance(value, (list, tuple)):
        many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        return list(value) if many else ",".join(map(str, value))
    return value


def command_line(args: argparse.Namespace, parser: argparse.ArgumentParser, machine: dict[str, Any]) -> list[str]:
    """The flags of `args` that differ from the parser's defaults, as command-line tokens (what a config file
    amounts to); launch-only keys and values this machine filled in are left out."""
    tokens: list[str] = []
    for dest, actions in _actions_by_dest(parser).items():
        value = getattr(args, dest, None)
        if dest in NOT_CARRIED or value == parser.get_default(dest) or machine.get(dest, object()) == value:
            continue
        if all(isinstance(a, argparse._StoreConstAction) for a in actions):
            tokens += [a.option_strings[0] for a in actions if a.const == value][:1]
            continue
        value = _config_value(parser, dest, value)
        tokens += [actions[0].option_strings[0], *(map(_text, value) if isinstance(value, list) else [_text(value)])]
    return tokens


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def save(args: argparse.Namespace, parser: argparse.ArgumentParser, run_dir: Path) -> Path:
    """Write run_dir/config.yaml, every secret of the environment replaced by '***' (in the values, so the file
    stays valid YAML). Returns its path."""
    from model_exploration.cli import machine_defaults  # cli reads config files through this module
    from model_exploration.reporting import write_atomic
    from model_exploration.tracking import redact

    clean = argparse.Namespace(**redact(vars(args)))
    path = Path(run_dir) / RUN_CONFIG
    text = dump(clean, parser, Path(run_dir), getattr(args, "config", None), machine_defaults(args))
    write_atomic(path, redact(text))
    return path
