"""Command-line parsing shared by the scripts: ``--config file.yaml`` plus flag overrides, the command line winning."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
    """A YAML config that cannot be used; the message names the file and the problem."""


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
    parser = HfArgumentParser(dataclass_types)
    if known.config:
        values = load_yaml_config(known.config)
        destinations = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - destinations)
        if unknown:
            raise ConfigError(f"Config file {known.config!r} has unknown option(s): {', '.join(unknown)}.")
        parser.set_defaults(**values)
        # A YAML value satisfies a field that would otherwise be required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=rest)
