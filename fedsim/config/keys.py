"""Every config key with its type, default, allowed values and help, read from the schema.

:func:`config_keys` walks :class:`~fedsim.config.schema.FedSimConfig` and its sections and
yields one :class:`KeyInfo` per leaf key (``aggregation.method``, ``resources.client.num_gpus``,
...; the fields of a named device profile as ``devices.profiles.<name>.share``). The allowed
values come from a ``Literal`` type or, for the names a registry holds, from the field's
``choices`` metadata (:func:`fedsim.config.fields.doc`). ``fedsim config --keys`` prints them
(:func:`format_keys`) and the docs' config reference is generated from them, so neither can
drift from the schema. Torch-free, like the rest of :mod:`fedsim.config`.
"""

from __future__ import annotations

import dataclasses
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from fedsim.config.schema import FedSimConfig

# the placeholder of a name a user chooses (a device profile's)
NAME = "<name>"


@dataclass(frozen=True)
class KeyInfo:
    """One config key.

    Attributes:
        key: the dotted key, as an override writes it (``data.alpha``).
        type: its type, as Python spells it (``int``, ``float | None``, ``list[str]``).
        default: the default, as YAML writes it (``null``, ``true``, ``[q_proj, v_proj]``).
        choices: the values allowed, as YAML writes them; empty when any value of the type is.
        help: the field's help text.
    """

    key: str
    type: str
    default: str
    choices: tuple[str, ...]
    help: str


def _yaml(value: Any) -> str:
    """``value`` as it is written in a YAML file or an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # quoted where YAML would read another value ("3:7" is 187)
        plain = value and value.strip() == value and not set(value) & set("[]{}#&*!|>'\"%@`")
        return value if plain and _reads_back(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _reads_back(text: str) -> bool:
    """Whether YAML reads ``text`` written plainly as the same string."""
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def _type_name(tp: Any) -> str:
    """A type annotation as it is written (``Literal`` as the type of its values)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        kinds = []
        for value in typing.get_args(tp):
            name = type(value).__name__
            if name not in kinds:
                kinds.append(name)
        return " | ".join(kinds)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        named = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(named + (["None"] if type(None) in args else []))
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _literal_values(tp: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` (inside ``X | None`` too); empty for other types."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(v for a in typing.get_args(tp) for v in _literal_values(a))
    return ()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _section_keys(cls: type, prefix: str) -> Iterator[KeyInfo]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from _section_keys(tp, key + ".")
            continue
        args = typing.get_args(tp)
        if typing.get_origin(tp) is dict and args and dataclasses.is_dataclass(args[1]):
            yield KeyInfo(key, _type_name(tp), _yaml(_default(f)), (), f.metadata["help"])
            yield from _section_keys(args[1], f"{key}.{NAME}.")
            continue
        choices = tuple(f.metadata.get("choices", ())) or _literal_values(tp)
        yield KeyInfo(
            key,
            _type_name(tp),
            _yaml(_default(f)),
            tuple(_yaml(c) for c in choices),
            f.metadata["help"],
        )


def config_keys(prefix: str = "") -> list[KeyInfo]:
    """Every key of the schema, in schema order; with ``prefix``, those that start with it.

    Args:
        prefix: keep the keys that start with it (``data.``, ``data.s``, ``privacy``).

    Returns:
        The keys, in the order the schema declares them.
    """
    return [k for k in _section_keys(FedSimConfig, "") if k.key.startswith(prefix)]


def format_keys(keys: list[KeyInfo], width: int = 100) -> str:
    """The keys as ``fedsim config --keys`` prints them: a line with the key, type and
    default, then the allowed values and the help, indented."""
    out = []
    indent = " " * 4
    for k in keys:
        out.append(f"{k.key}: {k.type} = {k.default}")
        if k.choices:
            out.append(
                textwrap.fill(
                    "one of: " + ", ".join(k.choices),
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent,
                )
            )
        out.append(textwrap.fill(k.help, width, initial_indent=indent, subsequent_indent=indent))
    return "\n".join(out) + "\n" if out else ""
