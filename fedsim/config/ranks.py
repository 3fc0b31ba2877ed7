"""``clients.ranks``: the spec (a string) and the one rank per client it resolves to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedsim.config.strict import ascii_int
from fedsim.errors import ConfigError

if TYPE_CHECKING:
    from fedsim.config.schema import ClientsConfig

# FediLoRA's setting: ranks of its 10 clients. Repeated in blocks of 10 for more clients.
FEDILORA_RANKS = (32, 32, 16, 16, 8, 8, 4, 4, 4, 4)


def rank_spec(value: Any) -> str:
    """``clients.ranks`` as its canonical string: a list becomes ``"32,32,16"``, an int ``"8"``.

    Anything else is kept as given and judged by :func:`resolve_ranks`.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    try:
        items = list(value)
    except TypeError:
        return value
    return ",".join(str(v).strip() for v in items)


def _int(text: str) -> int | None:
    """A non-negative int in ASCII digits (``"٣"`` is not one), else None."""
    value = ascii_int(text)
    return value if value is not None and text.strip()[:1] not in "+-" else None


def resolve_ranks(clients: ClientsConfig, seed: int) -> list[int]:
    """Turn ``clients.ranks`` into one rank per client.

    Raises:
        ConfigError: a malformed list or distribution name.
    """
    import numpy as np

    spec = rank_spec(clients.ranks)
    n = clients.num
    if not isinstance(spec, str):
        raise ConfigError("clients.ranks", f"must be a list of ints or a name, got {spec!r}")
    name, colon, arg = spec.partition(":")
    if colon:
        values = [_int(p) for p in arg.split(",")] if arg else [None]
        if (
            name in ("equal", "choice")
            and None not in values
            and (name == "choice" or len(values) == 1)
        ):
            if min(values) < 1:
                raise ConfigError("clients.ranks", f"{spec}: a rank must be an int >= 1")
            if name == "equal":
                return values * n
            rng = np.random.default_rng([seed, 0x5A4B])
            return [int(r) for r in rng.choice(values, size=n)]
    elif spec == "fedilora":
        return [FEDILORA_RANKS[i % len(FEDILORA_RANKS)] for i in range(n)]
    elif spec.strip() and all(ascii_int(p) is not None for p in spec.split(",")):
        parts = spec.split(",")
        if len(parts) == 1:  # one int: every client
            parts = parts * n
        if len(parts) != n:
            raise ConfigError("clients.ranks", f"has {len(parts)} entries but clients.num is {n}")
        ranks = [int(p) for p in parts]
        for i, r in enumerate(ranks):
            if r < 1:
                raise ConfigError(
                    "clients.ranks", f"client {i}: rank must be an int >= 1, got {r!r}"
                )
        return ranks
    elif "," in spec and not colon:
        bad = next((i, p) for i, p in enumerate(spec.split(",")) if ascii_int(p) is None)
        raise ConfigError(
            "clients.ranks", f"client {bad[0]}: rank must be an int >= 1, got {bad[1].strip()!r}"
        )
    raise ConfigError(
        "clients.ranks",
        f"unknown distribution {spec!r}; allowed: a list of ints, 'fedilora', "
        "'equal:R', 'choice:R1,R2,...'",
    )
