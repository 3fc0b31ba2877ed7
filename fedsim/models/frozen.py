"""Frozen weights shared by the client actors of a node (``resources.share_frozen``).

Every client actor holds the same frozen backbone: the same pretrained weights, and the same
randomly initialised parts for the same seed. Built privately, each actor pays the build (the
pretrained files read and converted: seconds) and holds its own copy (100 MB for the default
classifier, 556 MB for the demo VLM). Shared, the first actor of a node that needs a backbone
builds it once and writes it to one file in a node-local directory; every actor of the node
(the builder too) then maps that file with ``torch.load(mmap=True)``. The mapping is private
and copy-on-write: the pages of the file are in memory once, whatever the number of actors,
and an actor that writes to a frozen weight (FedEx-LoRA's residual) changes only its own copy
of the pages it writes. A warm actor serving a later run with the same backbone maps the same
file again, which takes milliseconds instead of a build.

The file holds the whole built :class:`~fedsim.models.backbone.Backbone` (its modules, tokenizer
or chat codec, LoRA targets) pickled by ``torch.save``; the values an actor gets are those the
build gave, bit for bit. It is keyed by everything the build depends on: the ``model`` section,
the number of classes, the seed (a backbone's randomly initialised parts depend on it), the fill
modes and the versions of fedsim, torch and transformers.

On a GPU, :meth:`torch.nn.Module.to` copies the weights into each actor's own CUDA memory: the
mapped file saves the host memory and the build, not GPU memory (CUDA gives each process its own
context; see ``docs/how-to/gpus.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from fedsim.version import __version__

# the files of a node: one per backbone key (``<key>.pt``, its lock ``<key>.pt.lock``)
_SUFFIX = ".pt"


def frozen_key(model: dict, num_classes: int, seed: int, image_fill: str, text_fill: str) -> str:
    """The file name stem of a backbone built from these arguments (a SHA-256 digest).

    Args:
        model: the config's ``model`` section as plain values.
        num_classes: the classifier's classes.
        seed: the seed the backbone's random parts are initialised from.
        image_fill: ``data.image_fill``.
        text_fill: ``data.text_fill``.
    """
    import transformers

    facts = {
        "model": model,
        "files": _local_files(model.get("model.name_or_path")),
        "num_classes": num_classes,
        "seed": seed,
        "image_fill": image_fill,
        "text_fill": text_fill,
        "versions": [__version__, torch.__version__, transformers.__version__],
    }
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _local_files(name_or_path) -> list:
    """A local model directory's files, with sizes and modification times: a model replaced
    in place while a pool is warm gets a new key (a hub id has no local files here)."""
    if not name_or_path or not os.path.isdir(str(name_or_path)):
        return []
    root = Path(str(name_or_path))
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    )


def shared(directory: Path, key: str, build: Callable[[], object]):
    """The object ``build()`` returns, mapped from ``directory/<key>.pt``.

    The first caller on a node builds it and writes the file (under a file lock, so the other
    actors wait for it instead of building their own); every caller then loads the file
    memory-mapped.

    Args:
        directory: a node-local directory (created if missing).
        key: the file's stem (:func:`frozen_key`).
        build: builds the object; called at most once per node and key.

    Returns:
        The loaded object, whose tensors map the file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}{_SUFFIX}"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            built = build()
            # written whole, then renamed: a reader never sees half a file
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(built, f)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            del built
        # the file is ours (written above by an actor of this node, in a directory of the
        # Ray session), so unpickling it runs no foreign code
        return torch.load(path, mmap=True, weights_only=False)


def drop(directory: Path) -> int:
    """Remove the files of ``directory`` (their mappings stay valid until the actors that
    hold them let go: a removed file's pages live as long as a mapping does).

    Returns:
        How many backbone files were removed.
    """
    removed = 0
    if not directory.is_dir():
        return 0
    for path in directory.iterdir():
        if path.name.endswith((_SUFFIX, ".lock", ".tmp")):
            removed += path.name.endswith(_SUFFIX)
            path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # another pool's actor wrote a file meanwhile
        pass
    return removed


def node_directory() -> Path:
    """This node's directory for shared frozen weights: ``fedsim-frozen`` in the Ray
    session's directory (removed with the session's other temporary files), or in the
    system's temporary directory outside Ray."""
    try:
        import ray

        node = ray._private.worker.global_worker.node  # the session's local node
        base = Path(node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - not in a Ray worker, or a Ray without this attribute
        base = Path(tempfile.gettempdir())
    return base / "fedsim-frozen"
