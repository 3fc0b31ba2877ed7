"""The metadata every config field carries: its help text (shown in the docs and errors) and,
for a name a registry holds, the names allowed (``fedsim config --keys`` and the docs list
them)."""

from __future__ import annotations

from collections.abc import Iterable


def doc(text: str, choices: Iterable[str] | None = None) -> dict:
    """A field's metadata: ``field(default=..., metadata=doc("What it does."))``.

    Args:
        text: the help text.
        choices: the values allowed, for a plain ``str`` field whose names come from a
            registry (a ``Literal`` field's values are read from its type instead).
    """
    meta: dict = {"help": text}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return meta
