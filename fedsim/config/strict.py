"""What a user wrote for a key, read strictly: numbers in ASCII, booleans that are booleans.

OmegaConf converts a written value to its field's type with Python's ``int``, ``float`` and
``bool``, which are lenient in ways no config means: ``int("٣")`` is 3 (any Unicode decimal
digit counts), ``float(10**400)`` raises ``OverflowError``, and a ``bool`` field takes ``-1``
or ``"17"`` as true. :func:`check_written` walks the values a file, an override or a dict
gives, before they are merged, and refuses those with a :class:`ConfigError` naming the key;
:func:`ascii_int` and :func:`ascii_float` are the parsers for the keys whose strings fedsim
reads itself (``clients.ranks``, ``faults.malicious``, ``data.cross_ratio``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from fedsim.errors import ConfigError

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(
    r"[+-]?(?:[0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?"
    r"|inf|infinity|nan)",
    re.IGNORECASE,
)
# the words YAML 1.1 and OmegaConf read as booleans (OmegaConf also takes any int: not here)
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def ascii_int(text: str) -> int | None:
    """``text`` as an int when it is an optional sign and ASCII digits (surrounding spaces
    allowed), else None: ``"٣"`` and ``"²"`` are not integers here, though Python's ``int``
    and ``str.isdigit`` take them."""
    text = text.strip()
    return int(text) if _INT.fullmatch(text) else None


def ascii_float(text: str) -> float | None:
    """``text`` as a float when it is written in ASCII (``1e-3``, ``.5``, ``-2``, ``inf``,
    ``nan``), else None; the caller decides whether infinities and NaN are allowed."""
    text = text.strip()
    return float(text) if _FLOAT.fullmatch(text) else None


def _is_interpolation(value: Any) -> bool:
    """``${other.key}`` and OmegaConf's missing-value marker are resolved by OmegaConf."""
    return isinstance(value, str) and ("${" in value or value == "???")


def _base_types(tp: Any) -> tuple[Any, ...]:
    """The types a field takes, ``None`` dropped: ``int | None`` -> ``(int,)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _scalar_problem(tp: Any, value: Any) -> str | None:
    """Why ``value`` written for a field of type ``tp`` is refused (None: it is not)."""
    if value is None or _is_interpolation(value) or typing.get_origin(tp) is Literal:
        return None  # None, interpolations and fixed choices: OmegaConf's own checks
    if isinstance(value, (list, tuple, Mapping)):  # OmegaConf takes [[1]] for a list[str]
        kind = "a mapping" if isinstance(value, Mapping) else "a list"
        return f"must be {_NAMES.get(tp, tp)}, got {kind} {value!r}"
    if tp is bool:
        if isinstance(value, bool) or (
            isinstance(value, str) and value.strip().lower() in _BOOL_WORDS
        ):
            return None
        return f"must be true or false, got {value!r}"
    if tp is int:
        if isinstance(value, str):
            return None if ascii_int(value) is not None else f"{value!r} is not an integer"
        return None  # an int; a float or bool is OmegaConf's "could not be converted"
    if tp is float:
        if isinstance(value, str):
            if ascii_float(value) is None:
                return f"{value!r} is not a number"
        elif isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > sys.float_info.max:
                return f"{value} is too large for a float"
    return None


def check_written(node: Any, cls: type, prefix: str = "") -> None:
    """Check the values written for the dataclass ``cls`` (a file's mapping, an override's
    one-key mapping or a dict), before OmegaConf converts them.

    Args:
        node: a plain mapping of keys to written values (nested sections as mappings, lists
            as lists: ``OmegaConf.to_container(..., resolve=False)``); keys that are not
            fields of ``cls`` are left to OmegaConf's unknown-key error.
        cls: the config section it is written for (:class:`FedSimConfig` at the top).
        prefix: the dotted key of ``cls`` (``"faults."``).

    Raises:
        ConfigError: naming the key of the first value refused: a number not written in
            ASCII digits, an int too large for a float field, a non-boolean for a boolean.
    """
    if not isinstance(node, Mapping):
        return
    hints = _hints(cls)
    for name, value in node.items():
        if not isinstance(name, str) or name not in hints:
            continue
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            check_written(value, tp, key + ".")
            continue
        for base in _base_types(tp):
            origin, args = typing.get_origin(base), typing.get_args(base)
            if origin is dict and args and dataclasses.is_dataclass(args[1]):
                if isinstance(value, Mapping):
                    for item, section in value.items():
                        check_written(section, args[1], f"{key}.{item}.")
            elif origin is list and args and isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    problem = _scalar_problem(args[0], item)
                    if problem:
                        raise ConfigError(key, f"item {i}: {problem}")
            elif origin is None:
                problem = _scalar_problem(base, value)
                if problem:
                    raise ConfigError(key, problem)
