"""The classification task: fused features to class logits, cross-entropy, accuracy/F1/AUC."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.data.federated import Batcher, Split
from fedsim.tasks.evaluation import classification_metrics, predict
from fedsim.tasks.training import autocast


@dataclass
class ClassificationPart:
    """A shard of predictions: labels, predicted labels, per-batch summed losses, probabilities."""

    labels: np.ndarray
    predictions: np.ndarray
    batch_losses: np.ndarray
    probs: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def combine(cls, parts: list[ClassificationPart]) -> tuple[dict[str, float], list[dict]]:
        metrics = classification_metrics(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.predictions for p in parts]),
            np.concatenate([p.batch_losses for p in parts]),
            np.concatenate([p.probs for p in parts]),
        )
        return metrics, []


class ClassificationTask:
    """Batches of the :class:`Batcher`, cross-entropy on the logits, scikit-learn metrics."""

    kind = "classification"

    def __init__(self, cfg, backbone, dataset, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.batcher = Batcher(
            dataset, backbone.tokenizer, cfg.data.max_text_tokens, cfg.data.text_placeholder
        )

    def train_batches(self, split: Split, batch_size: int, generator):
        return self.batcher.iterate(split, batch_size, generator)

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        with autocast(self.cfg.train.precision, self.device):
            logits = model(**batch)
        return F.cross_entropy(logits.float(), batch["labels"]), len(batch["labels"])

    def _predict(self, model, batches) -> ClassificationPart:
        return ClassificationPart(*predict(model, batches, self.cfg.train.precision, self.device))

    def evaluate(self, model: torch.nn.Module, split: Split) -> dict[str, float]:
        part = self._predict(model, self.batcher.iterate(split, self.cfg.train.eval_batch_size))
        return ClassificationPart.combine([part])[0]

    def eval_part(
        self, model: torch.nn.Module, split: Split, starts: np.ndarray, batch_size: int
    ) -> ClassificationPart:
        batches = (
            self.batcher.batch(split, np.arange(s, min(s + batch_size, len(split)))) for s in starts
        )
        return self._predict(model, batches)
