"""Shared builders for the aggregation tests: small random peft-style LoRA state dicts.

Imported by the test modules beside it (pytest puts this folder on ``sys.path``).

Three LoRA-wrapped modules (two Linear projections and a 1x1 Conv2d, whose factors are 4-D) plus
a dense classifier head, so every rule is exercised on both rank-axis layouts and on dense keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

QUERY = "base_model.model.text.encoder.layer.0.attention.self.query"
VALUE = "base_model.model.text.encoder.layer.0.attention.self.value"
CONV = "base_model.model.vision.embeddings.patch_proj"
HEAD_W = "base_model.model.head.weight"
HEAD_B = "base_model.model.head.bias"

# module -> (d, k, is_conv)
MODULES = {QUERY: (6, 5, False), VALUE: (7, 5, False), CONV: (4, 3, True)}
DENSE = {HEAD_W: (3, 6), HEAD_B: (3,)}

RANKS = [8, 8, 4, 2, 2]
NUM_SAMPLES = [10, 30, 20, 5, 35]


def lora_a(module: str) -> str:
    return f"{module}.lora_A.weight"


def lora_b(module: str) -> str:
    return f"{module}.lora_B.weight"


def build_state(rank: int, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A random rank-``rank`` state dict in peft's key order (A, B per module, then dense)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    state: dict[str, Tensor] = {}
    for module, (d, k, is_conv) in MODULES.items():
        tail = (1, 1) if is_conv else ()
        state[lora_a(module)] = randn(rank, k, *tail)
        state[lora_b(module)] = randn(d, rank, *tail)
    for key, shape in DENSE.items():
        state[key] = randn(*shape)
    return state


def product(state: Mapping[str, Tensor], module: str) -> Tensor:
    """``B @ A`` of one module as a ``d x k`` float64 matrix (1x1 conv factors flattened)."""
    a = state[lora_a(module)].to(torch.float64)
    b = state[lora_b(module)].to(torch.float64)
    return b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], a.shape[1])


def clone_states(states: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    return [{key: tensor.clone() for key, tensor in state.items()} for state in states]


def assert_states_equal(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


def assert_states_close(
    actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], atol: float = 1e-6
) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        torch.testing.assert_close(
            actual[key].to(torch.float64), expected[key].to(torch.float64), atol=atol, rtol=1e-6
        )


def client_states(
    ranks: list[int] | None = None, dtype: torch.dtype = torch.float32
) -> list[dict[str, Tensor]]:
    """One random state per rank (default ``RANKS``), each client with its own seed."""
    return [build_state(rank, seed=index, dtype=dtype) for index, rank in enumerate(ranks or RANKS)]


def reference_merge(
    states: list[dict[str, Tensor]],
    ranks: list[int],
    num_samples: list[float],
    global_rank: int,
    *,
    reweight: bool,
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Slow per-dimension loop straight from docs/algorithms.md §1.1 / §1.2, in float64.

    ``reweight=False`` is zero-padding FedAvg (dimension ``j`` divided by all clients' weight);
    ``reweight=True`` is FediLoRA (divided by the weight of the clients covering ``j``), and an
    uncovered ``j`` copies ``previous`` (if given and ``j`` is within its rank) or stays zero.
    """
    total = float(sum(num_samples))
    merged: dict[str, Tensor] = {}
    for key in states[0]:
        if ".lora_A." in key or ".lora_B." in key:
            axis = 0 if ".lora_A." in key else 1
            shape = list(states[0][key].shape)
            shape[axis] = global_rank
            out = torch.zeros(shape, dtype=torch.float64)
            for j in range(global_rank):
                covering = [i for i in range(len(states)) if ranks[i] > j]
                column = out.select(axis, j)
                if not covering:
                    if previous is not None and j < previous[key].shape[axis]:
                        column.copy_(previous[key].select(axis, j))
                    continue
                denominator = sum(num_samples[i] for i in covering) if reweight else total
                for i in covering:
                    weight = num_samples[i] / denominator
                    column.add_(weight * states[i][key].select(axis, j).to(torch.float64))
        else:
            out = sum(
                (n / total) * state[key].to(torch.float64)
                for n, state in zip(num_samples, states, strict=True)
            )
        merged[key] = out
    return merged


def truncate_all(shared: Mapping[str, Tensor], ranks: list[int]) -> list[dict[str, Tensor]]:
    """Clients that all hold truncations of one adapter (by hand, not via the package)."""
    states = []
    for rank in ranks:
        state = {}
        for key, tensor in shared.items():
            if ".lora_A." in key:
                state[key] = tensor[:rank].clone()
            elif ".lora_B." in key:
                state[key] = tensor[:, :rank].clone()
            else:
                state[key] = tensor.clone()
        states.append(state)
    return states


def same_product_pair() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A rank-4 and a rank-32 client whose ``B @ A`` agree on every module (float32)."""
    small = build_state(4, seed=3)
    extra = build_state(28, seed=4)
    large = dict(small)
    for module in MODULES:
        # Extra A rows are arbitrary; the matching B columns are zero, so B @ A is unchanged.
        large[lora_a(module)] = torch.cat([small[lora_a(module)], extra[lora_a(module)]], dim=0)
        large[lora_b(module)] = torch.cat(
            [small[lora_b(module)], torch.zeros_like(extra[lora_b(module)])], dim=1
        )
    return small, large


def scale_b(state: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """Multiply every ``lora_B`` by ``scaling`` by hand (not via the package)."""
    return {
        key: tensor * scaling if ".lora_B." in key else tensor.clone()
        for key, tensor in state.items()
    }


def weighted_product_sum(
    states: list[dict[str, Tensor]], num_samples: list[float], module: str
) -> Tensor:
    """``sum_i p_i B_i @ A_i`` of one module by a loop over clients, in float64 (d x k)."""
    total = float(sum(num_samples))
    return sum(
        (n / total) * product(state, module) for n, state in zip(num_samples, states, strict=True)
    )


def dense_average(states: list[dict[str, Tensor]], num_samples: list[float], key: str) -> Tensor:
    """``sum_i p_i x_i`` of one dense key by a loop over clients, in float64."""
    total = float(sum(num_samples))
    return sum(
        (n / total) * state[key].to(torch.float64)
        for n, state in zip(num_samples, states, strict=True)
    )
