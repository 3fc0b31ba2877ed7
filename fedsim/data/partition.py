"""Seeded splits: global train/test, Dirichlet label skew, client hold-outs, missing modalities.

Every function takes an explicit seed and draws from its own ``numpy`` generator keyed by a
tag, so any node rebuilds exactly the same partition from the config alone: partitions are
never shipped between processes.

The formulas: docs/algorithms.md §4.1 (splits, label skew, sampling) and §4.2 (modalities).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Stream tags keep the generators of different draws independent of each other.
_TEST_SPLIT, _DIRICHLET, _HOLDOUT, _MISSING, _SAMPLING, _SUBSET, _CROSS, _HYBRID = range(101, 109)


def rng_for(seed: int, tag: int, *more: int) -> np.random.Generator:
    """A generator for one named stream of draws under ``seed``."""
    return np.random.default_rng([seed, tag, *more])


def subset_indices(n: int, keep: int | None, seed: int) -> np.ndarray:
    """A seeded subset of ``keep`` of ``n`` rows (all of them if ``keep`` is None), sorted."""
    if keep is None or keep >= n:
        return np.arange(n)
    return np.sort(rng_for(seed, _SUBSET).choice(n, size=keep, replace=False))


def train_test_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Stratified where every class has two or more rows; returns (train_idx, test_idx)."""
    from sklearn.model_selection import train_test_split as sk_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    train, test = sk_split(
        idx, test_size=test_fraction, random_state=seed + _TEST_SPLIT, stratify=stratify
    )
    return np.sort(train), np.sort(test)


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, min_per_client: int, seed: int
) -> list[np.ndarray]:
    """Label-skew split: for each label, client shares drawn from ``Dir(alpha)``.

    One draw, then a top-up: a client left with fewer than ``min_per_client`` rows takes
    random rows from the client that currently holds the most. (Redrawing until every client
    meets the minimum never finishes for hundreds of clients at small alpha; the top-up moves
    only the few rows needed and keeps the draw's skew everywhere else.)

    Returns:
        One sorted index array (into ``labels``) per client.

    Raises:
        ValueError: fewer rows than ``num_clients * min_per_client``.
    """
    n = len(labels)
    if n < num_clients * min_per_client:
        raise ValueError(
            f"{n} training samples cannot give {num_clients} clients "
            f"{min_per_client} samples each (data.min_per_client)"
        )
    rng = rng_for(seed, _DIRICHLET)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for client, chunk in enumerate(np.split(rows, cuts)):
            parts[client].extend(chunk.tolist())
    for client in np.argsort([len(p) for p in parts], kind="stable"):
        while len(parts[client]) < min_per_client:
            donor = int(np.argmax([len(p) for p in parts]))
            need = min(min_per_client - len(parts[client]), len(parts[donor]) - min_per_client)
            take = set(rng.choice(len(parts[donor]), size=need, replace=False).tolist())
            parts[client].extend(parts[donor][i] for i in sorted(take))
            parts[donor] = [r for i, r in enumerate(parts[donor]) if i not in take]
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def holdout_split(rows: np.ndarray, fraction: float, seed: int, client: int):
    """Split one client's rows into (train, held-out); at least one row on each side."""
    rng = rng_for(seed, _HOLDOUT, client)
    shuffled = rng.permutation(rows)
    k = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    return np.sort(shuffled[k:]), np.sort(shuffled[:k])


@dataclass(frozen=True)
class ModalityMask:
    """Which modalities each row keeps: boolean arrays ``image`` and ``text`` of equal length."""

    image: np.ndarray
    text: np.ndarray

    @classmethod
    def complete(cls, n: int) -> ModalityMask:
        return cls(np.ones(n, dtype=bool), np.ones(n, dtype=bool))

    def counts(self) -> dict[str, int]:
        """Rows with both modalities, image only, text only, and neither."""
        i, t = self.image, self.text
        return {
            "both": int((i & t).sum()),
            "image_only": int((i & ~t).sum()),
            "text_only": int((~i & t).sum()),
            "neither": int((~i & ~t).sum()),
        }


def fedilora_missing(n: int, rate: float, seed: int, client: int) -> ModalityMask:
    """FediLoRA's scenario: ``round(rate * n)`` rows lose exactly one modality, each 50/50."""
    rng = rng_for(seed, _MISSING, client)
    k = int(round(rate * n))
    chosen = rng.choice(n, size=k, replace=False)
    lose_image = rng.random(k) < 0.5
    image = np.ones(n, dtype=bool)
    text = np.ones(n, dtype=bool)
    image[chosen[lose_image]] = False
    text[chosen[~lose_image]] = False
    return ModalityMask(image, text)


def missing_per_sample(n: int, beta: float, seed: int, client: int) -> ModalityMask:
    """FedMLLM's ``missing`` scenario: each row loses its image with probability ``beta`` and,
    independently, its text with probability ``beta`` (a row may lose both)."""
    rng = rng_for(seed, _MISSING, client)
    return ModalityMask(rng.random(n) >= beta, rng.random(n) >= beta)


def cross_image_clients(num_clients: int, image_share: float, seed: int) -> np.ndarray:
    """FedMLLM's ``cross`` scenario: which clients are image-only (the rest are text-only).

    ``round(image_share * N)`` clients, chosen by a seeded permutation.
    """
    k = int(round(image_share * num_clients))
    chosen = rng_for(seed, _CROSS).permutation(num_clients)[:k]
    out = np.zeros(num_clients, dtype=bool)
    out[chosen] = True
    return out


def hybrid_modalities(p: float, seed: int, client: int) -> tuple[bool, bool]:
    """FedMLLM's ``hybrid`` scenario: a client keeps each modality with probability ``p``; a
    client that drew neither gets one of the two at random."""
    rng = rng_for(seed, _HYBRID, client)
    image, text, coin = rng.random(3)
    keep_image, keep_text = bool(image < p), bool(text < p)
    if not (keep_image or keep_text):
        keep_image = bool(coin < 0.5)
        keep_text = not keep_image
    return keep_image, keep_text


def clients_per_round(num_clients: int, fraction: float) -> int:
    """How many clients every round samples: ``max(1, round(fraction * N))``."""
    return max(1, int(round(fraction * num_clients)))


def sample_clients(num_clients: int, fraction: float, seed: int, round_idx: int) -> list[int]:
    """Clients sampled in round ``round_idx``: :func:`clients_per_round` of them, sorted."""
    m = clients_per_round(num_clients, fraction)
    rng = rng_for(seed, _SAMPLING, round_idx)
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))
