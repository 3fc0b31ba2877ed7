"""The weight files of a local model directory, checked from their headers before a load.

A download cut short leaves a ``model.safetensors`` whose header promises more bytes than the
file holds; a shard listed in ``model.safetensors.index.json`` may be missing. Both are found
here by reading headers only (safetensors' ``safe_open`` maps the file and reads its JSON
header, which it checks against the file's size; a ``.bin`` zip's central directory sits at its
end), in milliseconds, instead of when every worker loads the weights.

The files looked for are those ``from_pretrained`` loads, in its order: a safetensors index and
its shards, ``model.safetensors``, then the PyTorch ``.bin`` equivalents.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from fedsim.config import ConfigError
from fedsim.errors import one_line

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN = "pytorch_model.bin"


def check_weight_files(directory: Path, key: str) -> None:
    """Check that ``directory`` holds complete weight files that ``from_pretrained`` can read.

    Args:
        directory: a local model directory (its ``config.json`` was read already).
        key: the config key named in an error (``model.name_or_path``).

    Raises:
        ConfigError: no weight file, a shard the index lists is missing, or a file is
            truncated or not of its format (each names the file).
    """
    for index, single, check in (
        (SAFETENSORS_INDEX, SAFETENSORS, _check_safetensors),
        (BIN_INDEX, BIN, _check_bin),
    ):
        if (directory / index).is_file():
            for shard, names in _shards(directory / index, key).items():
                check(directory / shard, key, names)
            return
        if (directory / single).is_file():
            check(directory / single, key, ())
            return
    raise ConfigError(
        key,
        f"{directory} holds no weight file ({SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or "
        f"{BIN_INDEX}); the model's weights are missing",
    )


def _shards(index: Path, key: str) -> dict[str, list[str]]:
    """The shard files an index names, each with the tensor names it should hold."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(str(shard), []).append(str(name))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(key, f"{index} is not a weight index: {one_line(exc)}") from None
    for shard in shards:
        path = index.parent / shard
        if not path.resolve().is_relative_to(index.parent.resolve()):
            raise ConfigError(key, f"{index} names a shard outside its directory: {shard!r}")
        if not path.is_file():
            raise ConfigError(key, f"{index} lists {shard}, which is missing from {index.parent}")
    return shards


def _check_safetensors(path: Path, key: str, names: list[str] | tuple) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            held = set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise ConfigError(
            key,
            f"{path} cannot be read as safetensors ({one_line(exc)}): the file is truncated "
            "or damaged; download it again",
        ) from None
    missing = [n for n in names if n not in held]
    if missing:
        raise ConfigError(
            key,
            f"{path} lacks {len(missing)} tensor(s) its index assigns to it (the first: "
            f"{missing[0]!r}); the shard does not belong to this index",
        )


def _check_bin(path: Path, key: str, names: list[str] | tuple) -> None:
    """A ``.bin`` saved by torch >= 1.6 is a zip whose directory is at its end: a truncated
    one has none. An older plain pickle has no such check and is left to the loader."""
    with path.open("rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if not is_zip:
        return
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(
            key,
            f"{path} cannot be read as a PyTorch checkpoint ({one_line(exc)}): the file is "
            "truncated or damaged; download it again",
        ) from None
