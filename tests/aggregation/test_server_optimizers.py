"""Server optimisers (docs/algorithms.md §3.1) against a per-entry loop over three rounds."""

import math
import re

import pytest
import torch

from aggregation import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    get_server_optimizer,
    server_optimizer_class,
)

SHAPES = {"m.lora_A.weight": (3, 2), "m.lora_B.weight": (4, 3), "head.bias": (4,)}

OPTIONS = {
    "fedavg": {},
    "fedavgm": {"lr": 0.7, "beta1": 0.8},
    "fedadagrad": {"lr": 0.05, "tau": 0.01},
    "fedadam": {"lr": 0.05, "beta1": 0.8, "beta2": 0.9, "tau": 0.01},
    "fedyogi": {"lr": 0.05, "beta1": 0.8, "beta2": 0.9, "tau": 0.01},
}


def random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: scale * torch.randn(*shape, generator=generator, dtype=torch.float64)
        for key, shape in SHAPES.items()
    }


def reference_entry(name: str, options: dict, theta: float, deltas: list[float]) -> list[float]:
    """One parameter entry through the rounds, written straight from the formulas."""
    lr = options.get("lr", 1.0)
    beta1 = options.get("beta1", 0.0)
    beta2 = options.get("beta2", 0.0)
    tau = options.get("tau", 0.0)
    m, v = 0.0, tau**2
    thetas = []
    for delta in deltas:
        if name == "fedavg":
            theta = theta + delta
        elif name == "fedavgm":
            m = beta1 * m + delta
            theta = theta + lr * m
        elif name == "fedadagrad":
            v = v + delta**2
            theta = theta + lr * delta / (math.sqrt(v) + tau)
        else:
            m = beta1 * m + (1 - beta1) * delta
            if name == "fedadam":
                v = beta2 * v + (1 - beta2) * delta**2
            else:
                sign = (v - delta**2 > 0) - (v - delta**2 < 0)
                v = v - (1 - beta2) * delta**2 * sign
            theta = theta + lr * m / (math.sqrt(v) + tau)
        thetas.append(theta)
    return thetas


def run(optimizer, start: dict, aggregates: list[dict]) -> list[dict]:  # noqa: ANN001
    states, current = [], start
    for aggregate in aggregates:
        current = optimizer.step(current, aggregate)
        states.append(current)
    return states


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_three_steps_match_the_per_entry_loop(name: str) -> None:
    options = OPTIONS[name]
    start = random_state(0)
    # Each round's aggregate is the current global state plus a fresh pseudo-gradient,
    # so Δ_t is known in advance and the reference can replay it.
    deltas = [random_state(seed, scale=0.1) for seed in (1, 2, 3)]
    optimizer = get_server_optimizer(name, **options)
    states, current = [], start
    for delta in deltas:
        aggregate = {key: current[key] + delta[key] for key in current}
        current = optimizer.step(current, aggregate)
        states.append(current)
    assert optimizer.steps == 3
    for key, shape in SHAPES.items():
        for index in range(math.prod(shape)):
            entry = [float(delta[key].flatten()[index]) for delta in deltas]
            expected = reference_entry(name, options, float(start[key].flatten()[index]), entry)
            actual = [float(state[key].flatten()[index]) for state in states]
            assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12), (key, index)


def test_fedavg_returns_the_aggregate() -> None:
    start, aggregate = random_state(0), random_state(1)
    out = FedAvg().step(start, aggregate)
    for key in aggregate:
        assert torch.equal(out[key], aggregate[key])
        assert out[key].data_ptr() != aggregate[key].data_ptr()


def test_fedadam_without_moment_decay_is_a_scaled_sign_step() -> None:
    # beta1 = beta2 = 0: m = Δ and v = Δ², so θ + η Δ / (|Δ| + τ) on every round.
    lr, tau = 0.1, 1e-3
    optimizer = FedAdam(lr=lr, beta1=0.0, beta2=0.0, tau=tau)
    current = random_state(0)
    for seed in (1, 2):
        aggregate = random_state(seed)
        delta = {key: aggregate[key] - current[key] for key in current}
        new = optimizer.step(current, aggregate)
        for key in current:
            expected = current[key] + lr * delta[key] / (delta[key].abs() + tau)
            torch.testing.assert_close(new[key], expected)
        current = new


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_state_dict_round_trip_resumes_identically(name: str) -> None:
    aggregates = [random_state(seed) for seed in (1, 2, 3, 4)]
    first = get_server_optimizer(name, **OPTIONS[name])
    current = run(first, random_state(0), aggregates[:2])[-1]
    saved = first.state_dict()
    assert saved["steps"] == 2
    assert set(saved) == {"steps", *first.moments}
    for moment in first.moments:
        assert set(saved[moment]) == set(SHAPES)
    resumed = get_server_optimizer(name, **OPTIONS[name])
    resumed.load_state_dict(saved)
    for moment in first.moments:  # the saved copy is independent of both optimisers
        for tensor in saved[moment].values():
            tensor.add_(100.0)
    expected = run(first, current, aggregates[2:])
    actual = run(resumed, current, aggregates[2:])
    for want, got in zip(expected, actual, strict=True):
        for key in want:
            assert torch.equal(got[key], want[key])
    assert resumed.steps == first.steps == 4


def test_load_state_dict_rejects_other_moments() -> None:
    with pytest.raises(ValueError, match=r"needs 'steps' and moments \['m', 'v'\]"):
        FedAdam().load_state_dict(FedAvgM().state_dict())


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_new_or_reshaped_key_starts_from_fresh_moments(name: str) -> None:
    optimizer = get_server_optimizer(name, **OPTIONS[name])
    run(optimizer, random_state(0), [random_state(1), random_state(2)])
    # The global rank grew from 3 to 5 and a new dense key appeared.
    grown = {"m.lora_A.weight": torch.randn(5, 2, dtype=torch.float64), "new": torch.ones(2)}
    target = {key: tensor + 0.5 for key, tensor in grown.items()}
    fresh = get_server_optimizer(name, **OPTIONS[name])
    out = optimizer.step(grown, target)
    expected = fresh.step(grown, target)
    for key in grown:
        assert torch.equal(out[key], expected[key])
    assert optimizer.state_dict()["m" if "m" in optimizer.moments else "v"][
        "m.lora_A.weight"
    ].shape == (5, 2)


def test_moments_live_in_float32_and_output_keeps_dtype() -> None:
    optimizer = FedAdam()
    start = {key: tensor.to(torch.bfloat16) for key, tensor in random_state(0).items()}
    aggregate = {key: tensor.to(torch.bfloat16) for key, tensor in random_state(1).items()}
    out = optimizer.step(start, aggregate)
    assert {tensor.dtype for tensor in out.values()} == {torch.bfloat16}
    assert {tensor.dtype for tensor in optimizer.state_dict()["v"].values()} == {torch.float32}


def test_first_adagrad_step_starts_from_tau_squared() -> None:
    optimizer = FedAdagrad(lr=1.0, tau=0.5)
    out = optimizer.step({"w": torch.zeros(1, dtype=torch.float64)}, {"w": torch.ones(1)})
    # v = τ² + Δ² = 1.25, so θ = 1 / (sqrt(1.25) + 0.5).
    assert float(out["w"]) == pytest.approx(1 / (math.sqrt(1.25) + 0.5))
    assert float(optimizer.state_dict()["v"]["w"]) == pytest.approx(1.25)


def test_yogi_second_moment_moves_additively() -> None:
    optimizer = FedYogi(lr=1.0, beta1=0.0, beta2=0.5, tau=1.0)
    optimizer.step({"w": torch.zeros(2, dtype=torch.float64)}, {"w": torch.tensor([2.0, 0.5])})
    # v0 = 1: for Δ² = 4 > v, v = 1 + 0.5 * 4 = 3; for Δ² = 0.25 < v, v = 1 - 0.125.
    v = optimizer.state_dict()["v"]["w"]
    torch.testing.assert_close(v, torch.tensor([3.0, 0.875], dtype=torch.float64))


def test_registry_and_identity_flag() -> None:
    assert {name: server_optimizer_class(name) for name in SERVER_OPTIMIZERS} == {
        "fedavg": FedAvg,
        "fedavgm": FedAvgM,
        "fedadagrad": FedAdagrad,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
    }
    for name in SERVER_OPTIMIZERS:
        cls = server_optimizer_class(name)
        assert cls.name == name
        assert cls.is_identity is (name == "fedavg")
    defaults = get_server_optimizer("fedyogi")
    assert (defaults.lr, defaults.beta1, defaults.beta2, defaults.tau) == (1e-2, 0.9, 0.99, 1e-3)
    momentum = get_server_optimizer("fedavgm")
    assert (momentum.lr, momentum.beta1) == (1.0, 0.9)


def test_registry_errors_list_valid_choices() -> None:
    valid = "valid optimizers: fedadagrad, fedadam, fedavg, fedavgm, fedyogi"
    with pytest.raises(ValueError, match=re.escape(valid)):
        get_server_optimizer("adam")
    with pytest.raises(ValueError, match=re.escape("valid options: ['lr', 'tau']")):
        get_server_optimizer("fedadagrad", beta1=0.9)


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (FedAdam, {"lr": 0.0}, "lr must be positive"),
        (FedAdam, {"beta2": 1.0}, r"beta2 must be in \[0, 1\)"),
        (FedAvgM, {"beta1": -0.1}, r"beta1 must be in \[0, 1\)"),
        (FedAdagrad, {"tau": 0.0}, "tau must be positive"),
    ],
)
def test_bad_hyperparameters_raise(cls: type, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_step_rejects_mismatched_states() -> None:
    start = random_state(0)
    with pytest.raises(ValueError, match="same keys"):
        FedAdam().step(start, {"m.lora_A.weight": start["m.lora_A.weight"]})
    bad = dict(start, **{"head.bias": torch.zeros(5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="head.bias: aggregate shape"):
        FedAvg().step(start, bad)


def test_step_does_not_mutate_inputs() -> None:
    start, aggregate = random_state(0), random_state(1)
    copies = [{key: t.clone() for key, t in s.items()} for s in (start, aggregate)]
    optimizer = FedYogi()
    for _ in range(2):
        optimizer.step(start, aggregate)
    for original, copy in zip((start, aggregate), copies, strict=True):
        for key in original:
            assert torch.equal(original[key], copy[key])
