"""`--set KEY=VALUE` overrides, typed, shared by the job and training configurations.

Torch-free, so that the curation driver (`pipelines/config.py`) imports it without loading
torch; `training/config.py` uses it too.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import yaml

_VALUE_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def setting_type(cls: Any, parts: list[str]) -> Any:
    """The annotated type of the setting `parts` names under `cls` (None: no such setting)."""
    for name in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(name)
    return cls


def empty_value(typ: Any, key: str, error: type[Exception]) -> Any:
    """What `--set KEY=` with nothing after `=` means: the empty string for text (empty text
    turns a model or a prefix off), None for an optional setting (None is its default or
    "off"), a section's defaults (as an empty YAML section); any other setting needs a value.

    Raises:
        error: the setting is a number, a switch, a choice, a list or a mapping.
    """
    if typ is None or typ is Any or dataclasses.is_dataclass(typ):
        return None  # no such setting (the loader names it), or a section: as in YAML
    if type(None) in typing.get_args(typ):
        return None
    if typ is str:
        return ""
    origin = typing.get_origin(typ)
    if origin is Literal:
        words = "one of " + ", ".join(map(repr, typing.get_args(typ)))
    elif origin in (list, tuple, dict):
        words = "a mapping, {} for none" if origin is dict else "a list, [] for none"
    else:
        words = _VALUE_WORDS.get(typ, "a value")
    raise error(f"config key '{key}' needs a value after '=' ({words})")


def apply_overrides(
    tree: dict[str, Any], overrides: list[str] | None, root: type, error: type[Exception]
) -> None:
    """Apply `section.key=value` overrides to a configuration's raw mapping, in place.

    A value is read as YAML (text that is not YAML, such as a template with braces, is the
    text itself); nothing after `=` is `empty_value` of the setting's type under `root`.

    Raises:
        error: an override without `=`, or a key through a setting that is no section.
    """
    for item in overrides or []:
        if "=" not in item:
            raise error(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        node = tree
        parts = dotted.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty section (`probe:` alone): defaults
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise error(f"config key '{dotted}' does not name a setting")
        if not raw.strip():
            node[parts[-1]] = empty_value(setting_type(root, parts), dotted.strip(), error)
            continue
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw
