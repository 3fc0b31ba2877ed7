"""Evaluation: predictions of a model on a split, and classification metrics (scikit-learn)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from fedsim.tasks.training import autocast


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    precision: str = "fp32",
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, predicted labels, the summed cross-entropy of each batch and class probabilities.

    Per-batch sums (not one total) let a caller that splits the batches over several workers
    add them up in one fixed order, so the result does not depend on the split.
    """
    device = device or torch.device("cpu")
    model.eval()
    ys, preds, losses, probs = [], [], [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(precision, device):
            logits = model(**batch).float()
        losses.append(F.cross_entropy(logits, batch["labels"], reduction="sum").item())
        ys.append(batch["labels"].cpu().numpy())
        preds.append(logits.argmax(-1).cpu().numpy())
        probs.append(torch.softmax(logits, -1).cpu().numpy())
    if not ys:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0), np.zeros((0, 0))
    return np.concatenate(ys), np.concatenate(preds), np.asarray(losses), np.concatenate(probs)


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    batch_losses: np.ndarray | None = None,
    probs: np.ndarray | None = None,
) -> dict[str, float]:
    """Accuracy, macro-F1 (over the labels present in truth or prediction), mean loss, and AUC.

    AUC (as FedMLLM reports for Hateful Memes) is given for a binary task whose ``probs`` have
    two columns, when both classes occur in ``y_true`` (it is undefined otherwise).
    """
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
    if batch_losses is not None:
        out["loss"] = float(np.sum(batch_losses)) / len(y_true)
    if probs is not None and probs.ndim == 2 and probs.shape[1] == 2 and len(set(y_true)) == 2:
        out["auc"] = float(roc_auc_score(y_true, probs[:, 1]))
    return out


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, population std and min of per-client values."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min())}
