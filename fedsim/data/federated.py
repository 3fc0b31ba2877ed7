"""The federated view of a dataset: global test split, client partitions and batching.

Built from the config alone (seeded), so every actor on every node rebuilds the same split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedsim.config import FedSimConfig
from fedsim.config.registry import DATASETS
from fedsim.data.emoji import MultimodalDataset, load_emoji, load_emoji_captions
from fedsim.data.partition import (
    ModalityMask,
    dirichlet_partition,
    holdout_split,
    subset_indices,
    train_test_split,
)
from fedsim.data.scenarios import client_modalities

if TYPE_CHECKING:
    from fedsim.data.loaders import LoadReport


_log = logging.getLogger(__name__)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


@dataclass(frozen=True)
class Split:
    """Rows of the dataset with the modalities each keeps."""

    rows: np.ndarray
    mask: ModalityMask
    # class y is read as label_map[y] (a label-flipping attacker's poisoned labels); None: as is
    label_map: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> Split:
        """The rows at ``positions`` (with their modality masks), as a new split."""
        return Split(
            self.rows[positions],
            ModalityMask(self.mask.image[positions], self.mask.text[positions]),
            self.label_map,
        )

    def relabelled(self, label_map: np.ndarray) -> Split:
        """The same rows with class ``y`` read as ``label_map[y]``."""
        return Split(self.rows, self.mask, np.asarray(label_map, dtype=np.int64))

    def label_of(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` (of this split's rows) as this split reads them."""
        if self.label_map is None:
            return labels
        return torch.as_tensor(self.label_map, dtype=labels.dtype)[labels]

    def capped(self, max_samples: int | None, seed: int, tag: int, *key: int) -> Split:
        """At most ``max_samples`` rows: a subset seeded by ``(seed, tag, *key)``, in order.

        ``eval.max_samples`` bounds evaluation cost; the subset is fixed per split, so every
        round evaluates the same rows.
        """
        if max_samples is None or len(self) <= max_samples:
            return self
        from fedsim.data.partition import rng_for

        keep = np.sort(rng_for(seed, tag, *key).permutation(len(self))[:max_samples])
        return self.take(keep)


@dataclass(frozen=True)
class ClientData:
    """One client's training split and personalised held-out split."""

    client_id: int
    train: Split
    holdout: Split


def load_dataset(cfg: FedSimConfig) -> MultimodalDataset:
    """The configured dataset, restricted to ``data.subset`` rows if set.

    A real dataset comes back as its train split followed by its test split, with
    ``test_rows`` marking the latter (the global test set); the emoji set is split later.
    ``skipped`` lists the rows ``data.on_error=skip`` left out of either split.

    Raises:
        ConfigError: a real dataset's files cannot be read (the message names file and row),
            its test split is the train split (the same file, or a file whose every row is a
            training row), or a split has no usable row.
    """
    from fedsim.config import is_generative

    d = cfg.data
    if not DATASETS[d.dataset].needs_root:  # the built-in emoji benchmark
        if is_generative(cfg) and d.target == "caption":
            ds = load_emoji_captions(d.image_size, d.cache_dir)
        else:
            ds = load_emoji(d.image_size, d.label, d.cache_dir)
        if d.subset is not None:
            ds = ds.subset(subset_indices(len(ds), d.subset, cfg.seed))
        return ds
    return _load_real(cfg)


def _load_real(cfg: FedSimConfig) -> MultimodalDataset:
    """Load and check a real dataset's test and train splits (see :func:`load_dataset`).

    The test split is checked before the train split is read: it must be another file than
    the train split, have at least one usable row and carry labels. The test split is read
    first because it is the smaller one and the likelier to be misconfigured.
    """
    from fedsim.config import ConfigError
    from fedsim.data import loaders

    d = cfg.data
    if not Path(d.root).is_dir():
        raise ConfigError("data.root", f"{d.root} is not a directory")
    spec = DATASETS[d.dataset]
    loader, file_of = spec.load("loader"), spec.load("file_of")
    split = d.test_split or spec.default_test
    train_file, test_file = file_of(d.root, "train"), file_of(d.root, split)
    if split == "train":
        raise ConfigError(
            "data.test_split", "'train' is the training split; the global test set must be held out"
        )
    if _same_file(train_file, test_file):  # e.g. a symlink dev.jsonl -> train.jsonl
        raise ConfigError(
            "data.test_split",
            f"{test_file} is the training split ({train_file}); "
            "the global test set must be held out",
        )
    try:
        test, test_report = loader(d.root, split, d.image_size, d.on_error)
    except loaders.DataError as exc:
        # The file data.test_split names is missing or unusable as a whole (empty, not JSON):
        # that key is the one to change. A bad row, or the train file, is the data's fault.
        whole = exc.row is None and exc.file in (test_file.name, str(test_file))
        raise ConfigError("data.test_split" if whole else "data.root", str(exc)) from None
    except ValueError as exc:  # an unknown split name
        raise ConfigError("data.test_split", str(exc)) from None
    if len(test) == 0:
        raise ConfigError("data.test_split", _no_rows(test_file, test_report))
    if (test.labels < 0).any():
        raise ConfigError("data.test_split", f"{split} has unlabelled rows")
    try:
        train, train_report = loader(d.root, "train", d.image_size, d.on_error)
    except loaders.DataError as exc:
        raise ConfigError("data.root", str(exc)) from None
    if len(train) == 0:
        raise ConfigError("data.root", _no_rows(train_file, train_report))
    for name, report in (("train", train_report), ("test", test_report)):
        if report.skipped:
            _log.warning(
                "%s %s: skipped %d of %d rows (data.on_error=skip)",
                d.dataset,
                name,
                report.skipped,
                report.rows,
            )
    train.origins = _origins(train_file, train_report)
    test.origins = _origins(test_file, test_report)
    _check_held_out(train, test, train_file, test_file)
    if d.subset is not None:
        train = train.subset(subset_indices(len(train), d.subset, cfg.seed))
    both = (train, test)
    targets = [t for ds in both for t in ds.targets] if train.targets is not None else None
    refs = [r for ds in both for r in ds.refs] if train.refs is not None else None
    return MultimodalDataset(
        torch.cat([train.images, test.images]),
        list(train.texts) + list(test.texts),
        torch.cat([train.labels, test.labels]),
        train.classes,
        test_rows=np.arange(len(train), len(train) + len(test)),
        targets=targets,
        refs=refs,
        skipped=train_report.skipped_rows + test_report.skipped_rows,
        origins=train.origins + test.origins,
    )


def _origins(path: Path, report: LoadReport) -> list[tuple[str, str, int]]:
    return [(path.name, report.unit, row) for row in report.kept_rows]


def _check_held_out(
    train: MultimodalDataset, test: MultimodalDataset, train_file: Path, test_file: Path
) -> None:
    """Refuse a test split whose every row is a training row (same image, text and answer);
    warn with the count when some are. Compared with the whole train file, before
    ``data.subset``.
    """
    from fedsim.config import ConfigError
    from fedsim.data.overlap import shared_rows

    shared = shared_rows(train.images, _row_keys(train), test.images, _row_keys(test))
    if len(shared) == len(test):
        raise ConfigError(
            "data.test_split",
            f"every row of {test_file} ({len(test)}) is also a row of {train_file} (same "
            "image, text and answer): the global test set would score the training data; it "
            "must be held out",
        )
    if len(shared):
        _log.warning(
            "%d of %d rows of %s are also rows of %s (same image, text and answer; the first: "
            "%s): the global test scores count them as held out",
            len(shared),
            len(test),
            test_file.name,
            train_file.name,
            test.where(int(shared[0])),
        )


def _row_keys(ds: MultimodalDataset) -> list[tuple[str, str | int]]:
    """What makes each row a row besides its image: its text and its answer."""
    answers = ds.targets if ds.targets is not None else ds.labels.tolist()
    return list(zip(ds.texts, answers))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:  # either is missing: the loader names it
        return False


def _no_rows(path: Path, report: LoadReport) -> str:
    if report.rows == 0:
        return f"{path} has no usable rows (no data rows in the file)"
    first = report.skipped_rows[0]
    return (
        f"{path} has no usable rows (all {report.rows} skipped with data.on_error=skip; "
        f"the first, row {first.row}: {first.reason})"
    )


class FederatedData:
    """Global test split and per-client splits of one dataset under one config."""

    def __init__(self, cfg: FedSimConfig, dataset: MultimodalDataset):
        self.dataset = dataset
        d = cfg.data
        labels = dataset.labels.numpy()
        if dataset.test_rows is not None:  # a real dataset's own test split
            test = np.asarray(dataset.test_rows)
            train = np.setdiff1d(np.arange(len(labels)), test)
        else:
            train, test = train_test_split(labels, d.test_fraction, cfg.seed)
        self.test = Split(test, ModalityMask.complete(len(test)))
        if d.partition == "centralized":  # the centralised baseline: one client, all rows
            parts = [np.arange(len(train))]
        else:
            try:
                parts = dirichlet_partition(
                    labels[train], cfg.clients.num, d.alpha, d.min_per_client, cfg.seed
                )
            except ValueError as exc:
                from fedsim.config import ConfigError

                raise ConfigError("data.min_per_client", str(exc)) from None
        self.clients: list[ClientData] = []
        for cid, local in enumerate(parts):
            rows = train[local]
            mask = client_modalities(cfg, cid, len(rows))
            tr, ho = holdout_split(np.arange(len(rows)), d.holdout_fraction, cfg.seed, cid)
            self.clients.append(
                ClientData(
                    cid,
                    Split(rows[tr], ModalityMask(mask.image[tr], mask.text[tr])),
                    Split(rows[ho], ModalityMask(mask.image[ho], mask.text[ho])),
                )
            )

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)


class Batcher:
    """Turns rows of a dataset into model inputs, filling missing modalities.

    Texts are tokenised once up front; batches are padded to their own longest text.
    """

    def __init__(self, dataset: MultimodalDataset, tokenizer, max_tokens: int, placeholder: str):
        self.dataset = dataset
        enc = tokenizer(
            list(dataset.texts) + [placeholder], truncation=True, max_length=max_tokens
        )["input_ids"]
        self._ids = [torch.tensor(x, dtype=torch.long) for x in enc[:-1]]
        self._placeholder = torch.tensor(enc[-1], dtype=torch.long)
        self._pad_id = tokenizer.pad_token_id or 0

    def batch(self, split: Split, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """Inputs for ``split.rows[positions]``: pixel_values, input_ids, attention_mask, labels."""
        rows = split.rows[positions]
        has_image = torch.from_numpy(split.mask.image[positions])
        has_text = split.mask.text[positions]
        idx = torch.as_tensor(rows, dtype=torch.long)
        pixels = (self.dataset.images[idx].float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
        # FediLoRA fills a missing image with zeros (the model input is all zeros).
        pixels = pixels * has_image.view(-1, 1, 1, 1).to(pixels.dtype)
        seqs = [self._ids[r] if t else self._placeholder for r, t in zip(rows.tolist(), has_text)]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self._pad_id)
        lengths = torch.tensor([len(q) for q in seqs])
        attn = (torch.arange(ids.shape[1]) < lengths.unsqueeze(1)).to(ids.dtype)  # (B, T)
        return {
            "pixel_values": pixels,
            "input_ids": ids,
            "attention_mask": attn,
            "has_image": has_image,
            "has_text": torch.from_numpy(np.asarray(has_text)),
            "labels": split.label_of(self.dataset.labels[idx]),
        }

    def iterate(
        self, split: Split, batch_size: int, generator: np.random.Generator | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches over a split, shuffled by ``generator`` if given, else in order."""
        order = np.arange(len(split))
        if generator is not None:
            order = generator.permutation(order)
        for start in range(0, len(order), batch_size):
            yield self.batch(split, order[start : start + batch_size])
