"""Type checks of the Python API's arguments: a wrong type is a :class:`ConfigError` naming the
argument, raised where the call comes in, instead of a traceback from deep inside.

``load_config(None, "rounds=3")`` would otherwise read the string as a list of overrides, one
character each, and blame a key ``r``; ``fedsim.run(42)`` would fail in OmegaConf's merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_overrides(value: Any, name: str = "overrides") -> list[str]:
    """``value`` as a list of ``key=value`` strings.

    Args:
        value: what the caller passed: a list or tuple of strings.
        name: the argument's name, for the error.

    Returns:
        The overrides as a new list.

    Raises:
        ConfigError: naming ``name``: a string (one override not in a list), something that
            is no list or tuple, or an item that is no string.
    """
    if isinstance(value, str):
        raise ConfigError(
            name,
            f"expected a list of key=value strings, got the string {_shown(value)}; "
            f"write [{_shown(value)}]",
        )
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise ConfigError(name, f"expected a list of key=value strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(
                f"{name}[{i}]",
                f"expected a key=value string, got {type(item).__name__} {_shown(item)}",
            )
    return list(value)


def check_path(value: Any, name: str, *, optional: bool = False) -> str | Path | None:
    """Check that ``value`` is a path (a ``str`` or a ``pathlib.Path``), or None when
    ``optional``.

    Returns:
        ``value``, unchanged.

    Raises:
        ConfigError: naming ``name``: another type, or an empty string.
    """
    if value is None and optional:
        return None
    if isinstance(value, Path) or (isinstance(value, str) and value.strip()):
        return value
    expected = "a path (str or pathlib.Path)" + (" or None" if optional else "")
    got = "an empty string" if isinstance(value, str) else type(value).__name__
    raise ConfigError(name, f"expected {expected}, got {got}")


def check_flag(value: Any, name: str) -> bool:
    """Check that ``value`` is a bool (``quiet=1`` or ``quiet="no"`` say something else).

    Raises:
        ConfigError: naming ``name`` when it is no bool.
    """
    if not isinstance(value, bool):
        raise ConfigError(name, f"expected True or False, got {type(value).__name__}")
    return value


def check_text(value: Any, name: str, *, optional: bool = False) -> str | None:
    """Check that ``value`` is a non-empty string, or None when ``optional``.

    Raises:
        ConfigError: naming ``name``: another type, or an empty string.
    """
    if value is None and optional:
        return None
    if isinstance(value, str) and value.strip():
        return value
    got = "an empty string" if isinstance(value, str) else type(value).__name__
    raise ConfigError(
        name, f"expected a non-empty string{' or None' if optional else ''}, got {got}"
    )


def check_int(value: Any, name: str, *, optional: bool = False) -> int | None:
    """Check that ``value`` is an int (not a bool, not a float), or None when ``optional``.

    Raises:
        ConfigError: naming ``name`` when it is not.
    """
    if value is None and optional:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(
        name, f"expected an int{' or None' if optional else ''}, got {type(value).__name__}"
    )
