"""The round loop hands out the longest client tasks first; no number depends on the order."""

from __future__ import annotations

import itertools

import pytest

from fedsim.tasks.training import expected_samples


def _samples_seen(n: int, batch: int, epochs: int, max_steps: int | None) -> int:
    """Batch by batch, as train_local steps through a client's split."""
    seen = steps = 0
    for _ in range(epochs):
        for start in range(0, n, batch):
            if max_steps is not None and steps >= max_steps:
                return seen
            seen += min(batch, n - start)
            steps += 1
    return seen


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "max_steps"),
    list(itertools.product([1, 7, 32, 33, 100], [1, 8, 32], [1, 3], [None, 1, 2, 5, 13])),
)
def test_expected_samples_count_what_training_reads(n, batch, epochs, max_steps):
    assert expected_samples(n, batch, epochs, max_steps) == _samples_seen(
        n, batch, epochs, max_steps
    )


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_tasks_go_out_longest_first_and_the_order_changes_no_number(make_config):
    """The in-process pool runs tasks in the order it is handed them: the biggest client
    first; a run whose tasks are put back in id order (the old order) gives the same numbers."""
    import fedsim
    from actors.executor import LocalExecutor, LocalPool
    from fedsim.data.federated import FederatedData, load_dataset

    cfg = make_config("rounds=2", "clients.fraction=1.0", "train.max_local_steps=null")
    original = LocalPool.train
    seen: list[list[int]] = []

    def recording(self, tasks, broadcast, states, on_done=None):
        seen.append([t.client_id for t in tasks])
        return original(self, tasks, broadcast, states, on_done)

    def by_id(self, tasks, broadcast, states, on_done=None):
        # the streaming merge then receives the updates in id order, not longest first
        ordered = sorted(tasks, key=lambda t: t.client_id)
        return original(self, ordered, broadcast, states, on_done)

    runs = []
    for spy in (recording, by_id):
        LocalPool.train = spy
        try:
            runs.append(fedsim.run(cfg, executor=LocalExecutor()))
        finally:
            LocalPool.train = original
    sizes = [len(c.train) for c in FederatedData(cfg, load_dataset(cfg)).clients]
    assert len(set(sizes)) > 1
    longest_first = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))
    assert seen == [longest_first, longest_first]

    def numbers(result):
        return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result.history]

    assert numbers(runs[0]) == numbers(runs[1])
    assert [[r["client_id"] for r in rows] for rows in runs[0].clients] == [
        [r["client_id"] for r in rows] for rows in runs[1].clients
    ]
