"""The metadata every config field carries: its help text (shown in the docs and errors)."""

from __future__ import annotations


def doc(text: str) -> dict[str, str]:
    """A field's metadata: ``field(default=..., metadata=doc("What it does."))``."""
    return {"help": text}
