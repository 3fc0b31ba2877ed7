"""Seeded splits: determinism, coverage, label skew, missing modalities, client sampling."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.config import ConfigError
from fedsim.data.federated import FederatedData, load_dataset
from fedsim.data.partition import (
    clients_per_round,
    dirichlet_partition,
    fedilora_missing,
    holdout_split,
    sample_clients,
    train_test_split,
)

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """600 rows over 6 classes, shuffled."""
    rng = np.random.default_rng(1234)
    return rng.permutation(np.repeat(np.arange(NUM_CLASSES), 100))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_train_test_split_is_seeded_disjoint_and_complete(labels):
    train, test = train_test_split(labels, 0.2, seed=0)
    again = train_test_split(labels, 0.2, seed=0)
    other = train_test_split(labels, 0.2, seed=1)
    assert _same([train, test], list(again))
    assert not np.array_equal(test, other[1])
    assert len(test) == 120
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    # stratified: every class keeps its share in the test split
    assert np.bincount(labels[test], minlength=NUM_CLASSES).tolist() == [20] * NUM_CLASSES


def test_dirichlet_partition_is_seeded(labels):
    a = dirichlet_partition(labels, 8, 0.5, 10, seed=0)
    b = dirichlet_partition(labels, 8, 0.5, 10, seed=0)
    c = dirichlet_partition(labels, 8, 0.5, 10, seed=1)
    assert _same(a, b)
    assert not _same(a, c)


@pytest.mark.parametrize(("num_clients", "alpha", "minimum"), [(8, 0.5, 10), (5, 0.1, 5)])
def test_dirichlet_covers_every_row_once_and_meets_the_minimum(labels, num_clients, alpha, minimum):
    parts = dirichlet_partition(labels, num_clients, alpha, minimum, seed=3)
    assert len(parts) == num_clients
    rows = np.concatenate(parts)
    assert np.array_equal(np.sort(rows), np.arange(len(labels)))  # each row exactly once
    for part in parts:
        assert len(part) >= minimum
        assert np.array_equal(part, np.sort(part))


def test_dirichlet_impossible_split_raises_a_clear_error(labels):
    with pytest.raises(ValueError, match="min_per_client"):
        dirichlet_partition(labels, 10, 0.5, 61, seed=0)  # 600 < 10 * 61


def test_dirichlet_tops_up_clients_a_skewed_draw_leaves_short():
    # 30 rows in 2 classes; 3 clients need exactly 10 each, but alpha=0.001 hands each class
    # (almost) wholly to one client, so the draw alone always leaves some client short.
    labels = np.repeat(np.arange(2), 15)
    parts = dirichlet_partition(labels, 3, 0.001, 10, seed=0)
    assert [len(p) for p in parts] == [10, 10, 10]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(30))


def test_dirichlet_scales_to_many_clients_at_small_alpha(labels):
    parts = dirichlet_partition(labels, 200, 0.05, 3, seed=0)
    assert min(len(p) for p in parts) >= 3
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=NUM_CLASSES) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_smaller_alpha_gives_more_label_skew(labels):
    skewed = dirichlet_partition(labels, 6, 0.1, 5, seed=0)
    uniform = dirichlet_partition(labels, 6, 100.0, 5, seed=0)
    h_skewed = _mean_label_entropy(labels, skewed)
    h_uniform = _mean_label_entropy(labels, uniform)
    assert h_skewed < h_uniform
    assert h_uniform > 0.95 * np.log(NUM_CLASSES)  # near the maximum: almost IID


def test_holdout_split_is_seeded_per_client_and_disjoint():
    rows = np.arange(100, 150)
    train, held = holdout_split(rows, 0.2, seed=0, client=3)
    again = holdout_split(rows, 0.2, seed=0, client=3)
    assert _same([train, held], list(again))
    assert not np.array_equal(held, holdout_split(rows, 0.2, seed=1, client=3)[1])
    assert not np.array_equal(held, holdout_split(rows, 0.2, seed=0, client=4)[1])
    assert len(held) == 10
    assert np.intersect1d(train, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, held])), rows)


@pytest.mark.parametrize("n", [2, 3])
def test_holdout_keeps_a_row_on_each_side(n):
    train, held = holdout_split(np.arange(n), 0.99, seed=0, client=0)
    assert len(train) >= 1 and len(held) >= 1


@pytest.mark.parametrize(("n", "rate"), [(50, 0.4), (37, 0.5), (10, 0.0), (12, 1.0), (5, 0.3)])
def test_fedilora_missing_drops_exactly_one_modality_from_round_rate_n_rows(n, rate):
    mask = fedilora_missing(n, rate, seed=0, client=2)
    counts = mask.counts()
    assert counts["neither"] == 0
    assert counts["image_only"] + counts["text_only"] == round(rate * n)
    assert counts["both"] == n - round(rate * n)
    assert sum(counts.values()) == n


def test_fedilora_missing_is_seeded():
    a = fedilora_missing(100, 0.4, seed=0, client=1)
    b = fedilora_missing(100, 0.4, seed=0, client=1)
    c = fedilora_missing(100, 0.4, seed=1, client=1)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.text, b.text)
    assert not (np.array_equal(a.image, c.image) and np.array_equal(a.text, c.text))


@pytest.mark.parametrize(
    ("num", "fraction"), [(10, 0.4), (6, 0.5), (7, 0.01), (5, 1.0), (100, 0.25), (3, 0.5)]
)
def test_sample_clients_counts_distinct_sorted_ids(num, fraction):
    sampled = sample_clients(num, fraction, seed=0, round_idx=1)
    assert len(sampled) == max(1, round(fraction * num)) == clients_per_round(num, fraction)
    # every round, whatever the seed: the count a run sizes its pool and DP's rate with
    assert {len(sample_clients(num, fraction, s, t)) for s in (0, 7) for t in (1, 5)} == {
        clients_per_round(num, fraction)
    }
    assert sampled == sorted(set(sampled))
    assert all(0 <= c < num for c in sampled)


def test_sample_clients_is_seeded_by_seed_and_round():
    assert sample_clients(100, 0.1, 0, 1) == sample_clients(100, 0.1, 0, 1)
    assert sample_clients(100, 0.1, 0, 1) != sample_clients(100, 0.1, 1, 1)
    assert sample_clients(100, 0.1, 0, 1) != sample_clients(100, 0.1, 0, 2)


@pytest.fixture(scope="module")
def federated(make_config):
    cfg = make_config()
    return cfg, FederatedData(cfg, load_dataset(cfg))


def test_federated_test_split_is_complete(federated):
    cfg, data = federated
    assert data.test.mask.image.all() and data.test.mask.text.all()
    assert len(data.test) == pytest.approx(cfg.data.test_fraction * cfg.data.subset, abs=1)


def test_federated_clients_are_disjoint_and_cover_the_training_rows(federated):
    cfg, data = federated
    assert len(data.clients) == cfg.clients.num
    seen: list[np.ndarray] = [data.test.rows]
    for client in data.clients:
        assert np.intersect1d(client.train.rows, client.holdout.rows).size == 0
        assert len(client.train) >= 1 and len(client.holdout) >= 1
        assert len(client.train) + len(client.holdout) >= cfg.data.min_per_client
        assert len(client.train.mask.image) == len(client.train)
        assert client.train.mask.counts()["neither"] == 0
        assert client.holdout.mask.counts()["neither"] == 0
        seen += [client.train.rows, client.holdout.rows]
    everything = np.concatenate(seen)
    assert np.array_equal(np.sort(everything), np.arange(cfg.data.subset))  # all rows, once


def test_federated_missing_modalities_follow_the_rate(federated):
    cfg, data = federated
    for client in data.clients:
        n = len(client.train) + len(client.holdout)
        missing = sum(
            (~split.mask.image).sum() + (~split.mask.text).sum()
            for split in (client.train, client.holdout)
        )
        assert missing == round(cfg.data.missing_rate * n)


def test_federated_data_is_identical_when_rebuilt(federated, make_config):
    cfg, data = federated
    again = FederatedData(make_config(), load_dataset(cfg))
    assert np.array_equal(data.test.rows, again.test.rows)
    for a, b in zip(data.clients, again.clients, strict=True):
        for sa, sb in ((a.train, b.train), (a.holdout, b.holdout)):
            assert np.array_equal(sa.rows, sb.rows)
            assert np.array_equal(sa.mask.image, sb.mask.image)
            assert np.array_equal(sa.mask.text, sb.mask.text)
    other = FederatedData(make_config("seed=1"), load_dataset(make_config("seed=1")))
    assert not all(
        np.array_equal(a.train.rows, b.train.rows)
        for a, b in zip(data.clients, other.clients, strict=True)
    )


def test_too_few_rows_for_the_clients_names_min_per_client(make_config):
    cfg = make_config("data.subset=40", "data.min_per_client=10")  # 32 train rows < 6 * 10
    with pytest.raises(ConfigError) as info:
        FederatedData(cfg, load_dataset(cfg))
    assert info.value.key == "data.min_per_client"
