"""The one registry of datasets: config name to loader, files and what it needs.

Light on purpose (no torch): the config checks read it at load time; a loader is imported only
when the data is read. Adding a dataset is one loader module plus one line here (see the
README's developer section). ``emoji`` is built in (rendered from installed packages, split
by fedsim); every other dataset comes as released files under ``data.root``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset.

    Attributes:
        name: the ``data.dataset`` value.
        loader: ``"module:function"`` reading one split:
            ``(root, split, image_size, on_error) -> MultimodalDataset``; None for ``emoji``.
        file_of: ``"module:function"``: ``(root, split) -> Path`` of a split's file.
        default_test: the split used as the global test set unless ``data.test_split`` says.
        generative_only: its targets are free text (a generative model is needed).
        summary: one line for the README and the errors.
    """

    name: str
    loader: str | None = None
    file_of: str | None = None
    default_test: str | None = None
    generative_only: bool = False
    summary: str = ""

    @property
    def needs_root(self) -> bool:
        return self.loader is not None

    def load(self, what: str) -> Callable:
        """The function ``what`` (``"loader"`` or ``"file_of"``) names, imported."""
        module, _, function = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), function)


_LOADERS = "fedsim.data.loaders"
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("emoji", summary="built in: OpenMoji images + Unicode names"),
        DatasetSpec(
            "hateful_memes",
            f"{_LOADERS}:load_hateful_memes",
            f"{_LOADERS}:hateful_memes_file",
            "dev",
            summary="Hateful Memes (Kiela et al. 2020), jsonl + img/",
        ),
        DatasetSpec(
            "crisismmd",
            f"{_LOADERS}:load_crisismmd",
            f"{_LOADERS}:crisismmd_file",
            "test",
            summary="CrisisMMD humanitarian task, tsv + images",
        ),
        DatasetSpec(
            "llava",
            f"{_LOADERS}:load_llava_split",
            f"{_LOADERS}:llava_file",
            "test",
            generative_only=True,
            summary="LLaVA conversation JSON (train.json, <test_split>.json)",
        ),
    )
}
