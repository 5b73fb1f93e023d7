"""Command-line parsing shared by the scripts: ``--config file.yaml`` plus flag overrides, the command line winning."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from kd_llm.errors import ConfigError

__all__ = ["ConfigError", "ScriptParser", "load_yaml_config", "parse_with_config", "positive_int"]


class ScriptParser(argparse.ArgumentParser):
    """The plain scripts' parser: a bad option is a :class:`ConfigError` (one line at the boundary), not usage + 2."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help).")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


class _Parser(HfArgumentParser):
    """argparse's errors (a bad value on the command line) as a :class:`ConfigError`, not exit status 2 + usage."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help).")


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _check_yaml_value(action: argparse.Action, value, where: str):
    """``value`` (from YAML) checked against what the option takes; strings converted as the command line would."""
    name = action.dest
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if many and not isinstance(value, list):
        raise ConfigError(f"{where}: {name} takes a list, got {value!r}: write it as [{value}].")
    if not many and isinstance(value, (list, dict)) and (action.type in (int, float) or action.choices):
        raise ConfigError(f"{where}: {name} takes one value, got {type(value).__name__} {value!r}.")
    values = value if many else [value]
    checked = []
    for item in values:
        if action.type is int and not (isinstance(item, int) and not isinstance(item, bool)):
            if not (isinstance(item, str) and item.strip().lstrip("-").isdigit()):
                raise ConfigError(f"{where}: {name} takes an integer, got {item!r}.")
            item = int(item)
        elif action.type is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
            try:
                item = float(item)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {name} takes a number, got {item!r}.") from None
        if action.choices is not None and isinstance(item, str) and item not in [str(c) for c in action.choices]:
            choices = ", ".join(str(c) for c in action.choices)
            raise ConfigError(f"{where}: {name} must be one of {choices}, got {item!r}.")
        checked.append(item)
    return checked if many else checked[0]


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of option: value, got {type(values).__name__}.")
    return values


def parse_with_config(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse ``argv`` into instances of ``dataclass_types``.

    ``--config FILE`` supplies defaults from YAML; any flag given on the command line overrides them. A key of the
    YAML file that no dataclass knows is an error that lists it, rather than being silently dropped.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = _Parser(dataclass_types)
    actions = {}
    for action in parser._actions:  # the first action of a destination (not a bool's --no_* complement)
        actions.setdefault(action.dest, action)
    if known.config:
        values = load_yaml_config(known.config)
        unknown = sorted(set(values) - set(actions))
        if unknown:
            hints = ", ".join(name + _closest(name, actions) for name in unknown)
            raise ConfigError(f"Config file {known.config!r} has unknown option(s): {hints}.")
        values = {name: _check_yaml_value(actions[name], value, f"Config file {known.config!r}")
                  if value is not None else None for name, value in values.items()}
        parser.set_defaults(**values)
        # A YAML value satisfies a field that would otherwise be required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    _, remaining = parser.parse_known_args(rest)
    if remaining:
        flags = [a for a in remaining if a.startswith("-")]
        if not flags:
            raise ConfigError(f"unexpected value(s) {' '.join(remaining)} on the command line: an option given more "
                              "values than it takes? (see --help)")
        options = [o for action in parser._actions for o in action.option_strings]
        hints = ", ".join(flag + _closest(flag.split("=")[0], options) for flag in flags)
        raise ConfigError(f"unknown option(s) {hints}; see --help for the options.")
    try:
        return parser.parse_args_into_dataclasses(args=rest)
    except (ValueError, TypeError) as error:  # a dataclass's __post_init__ refusing the settings
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(str(error)) from error
