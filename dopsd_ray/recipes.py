"""Recipes: a YAML file plus `section.key=value` overrides, checked against the schema
(config.py) and completed with what the model family decides (families.complete).

    cfg = load_config("configs/zimage_turbo_lora.yaml", ["optim.lr=5e-5", "train.steps=100"])
    args, cfg = config_from_cli(parser)      the jobs' command line: --config and overrides
"""

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import Config, ConfigError, format_errors
from .families import FamilyError, complete

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"  # what the jobs run with no --config


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. optim.lr=1e-4")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {k!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (recipes live in configs/)")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    for o in overrides:
        _apply_override(tree, o)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None
    try:
        return complete(cfg)
    except FamilyError as err:
        raise ConfigError(f"invalid configuration:\n  {err}") from None


def config_from_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """The jobs' command line: adds --config and the section.key=value overrides to `parser`,
    parses `argv` and loads the config. A bad one exits 2 with one `error:` line naming the field."""
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="YAML recipe (default: configs/toy.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        return args, load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")


