"""Reading a YAML file the user names (a config, a study, a study's base) within limits.

A YAML file can cost far more than its size: nine lines of aliases (a "billion laughs")
expand to a billion values once a loader copies them, a few kilobytes of brackets nest
deeper than Python's recursion, and a file of many megabytes takes minutes to parse. Every
YAML file fedsim reads on a user's behalf goes through :func:`read_yaml_text` first, which
refuses such a file in milliseconds with one line naming it, before any loader builds it:

- at most :data:`MAX_BYTES` bytes, UTF-8 text;
- at most :data:`MAX_NODES` values (keys, scalars, lists, mappings) after alias expansion,
  counted from the parser's events, without building anything;
- nested at most :data:`MAX_DEPTH` lists or mappings deep; no alias inside its own anchor;
- one document, whose top level is a mapping (or nothing at all).

Configs and studies are a few hundred values nested four deep, so the limits leave them
plenty of room.
"""

from __future__ import annotations

import io
from pathlib import Path

import yaml

from fedsim.errors import ConfigError, one_line

# 1 MiB: the largest shipped experiment is under 4 KiB.
MAX_BYTES = 1 << 20
# Values after alias expansion; the same number as OmegaConf's own default limit, so a file
# this reader passes is never refused by OmegaConf afterwards.
MAX_NODES = 10_000
# Lists and mappings inside each other; a config is four deep, a study's grids five.
MAX_DEPTH = 32

try:  # libyaml's event parser, when PyYAML was built with it: the same events, faster
    _EventLoader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - a PyYAML without libyaml
    _EventLoader = yaml.SafeLoader

_STARTS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_ENDS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def read_yaml_text(path: str | Path, key: str, what: str) -> str:
    """The text of the YAML file ``path``, checked against the limits of this module.

    Args:
        path: the file.
        key: the name errors give (``config``, ``study``, ``base``).
        what: what the top-level mapping holds, for the error when it is no mapping (e.g.
            ``"config keys (key: value lines)"``).

    Returns:
        The file's text: one YAML document whose top level is a mapping, or empty.

    Raises:
        ConfigError: naming ``key`` and ``path``: unreadable, larger than :data:`MAX_BYTES`,
            not UTF-8, not YAML, over :data:`MAX_NODES` values or :data:`MAX_DEPTH` levels,
            a recursive alias, several documents, or a top level that is no mapping.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:  # read one byte past the limit: a device never ends
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(
            key, f"{path} is larger than {MAX_BYTES >> 20} MiB; fedsim reads YAML files up to that"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, f"cannot parse {path}: it is not a UTF-8 text (YAML) file") from None
    check_yaml_text(text, f"{path}", key, what)
    return text


def check_yaml_text(text: str, source: str, key: str, what: str) -> None:
    """Check YAML ``text`` against the limits of this module, from its parser events alone.

    Args:
        text: the YAML.
        source: how messages name it (a path).
        key: the name errors give.
        what: what its top-level mapping holds (see :func:`read_yaml_text`).

    Raises:
        ConfigError: naming ``key`` and ``source`` (see :func:`read_yaml_text`).
    """
    nodes = 0  # values so far, each alias counted as the size of what it repeats
    sizes: dict[str, int] = {}  # anchor -> the values of its node, aliases expanded
    stack: list[list] = []  # open lists and mappings: [values so far, anchor]
    documents = 0
    root: str | None = None
    stream = io.StringIO(text)
    stream.name = source  # the parser's messages name the file
    try:
        for event in yaml.parse(stream, Loader=_EventLoader):
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise _limit(key, source, event, "holds several YAML documents; write one")
                continue
            if isinstance(event, _ENDS):
                size, anchor = stack.pop()
                if anchor is not None:
                    sizes[anchor] = size
                if stack:
                    stack[-1][0] += size
                continue
            if not isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, *_STARTS)):
                continue  # stream and document ends
            if root is None:
                root = type(event).__name__
            if isinstance(event, yaml.AliasEvent):
                if any(anchor == event.anchor for _, anchor in stack):
                    raise _limit(
                        key, source, event, f"the alias *{event.anchor} repeats its own anchor"
                    )
                size = sizes.get(event.anchor, 1)  # undefined: the loader names it later
            else:
                size = 1
            nodes += size
            if nodes > MAX_NODES:
                raise _limit(
                    key,
                    source,
                    event,
                    f"holds more than {MAX_NODES:,} values once its aliases are expanded; "
                    "fedsim reads YAML files up to that",
                )
            if isinstance(event, _STARTS):
                if len(stack) >= MAX_DEPTH:
                    raise _limit(
                        key, source, event, f"nests lists or mappings more than {MAX_DEPTH} deep"
                    )
                stack.append([1, event.anchor])
                continue
            if isinstance(event, yaml.ScalarEvent) and event.anchor is not None:
                sizes[event.anchor] = 1
            if stack:
                stack[-1][0] += size
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse {source}: {one_line(exc, 500)}") from None
    if root not in (None, "MappingStartEvent"):
        kind = "a list" if root == "SequenceStartEvent" else "a single value"
        raise ConfigError(key, f"{source} must be a mapping of {what}, not {kind}")


def _limit(key: str, source: str, event: yaml.Event, problem: str) -> ConfigError:
    mark = event.start_mark
    return ConfigError(key, f"{source}, line {mark.line + 1}: {problem}")
