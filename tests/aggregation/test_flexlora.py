"""FlexLoRA (docs/algorithms.md §1.5): truncated factors are the best rank-r approximation of the
update."""

import pytest
import torch
from lora_builders import (
    CONV,
    DENSE,
    MODULES,
    NUM_SAMPLES,
    QUERY,
    RANKS,
    assert_states_equal,
    client_states,
    clone_states,
    dense_average,
    lora_a,
    lora_b,
    product,
    weighted_product_sum,
)

from aggregation import (
    FlexLoRAMerger,
    flexlora_merge,
    get_merger,
    lora_rank,
    svd_factors,
    truncate,
    use_lowrank,
)


def best_rank_approximation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_truncated_factors_are_best_rank_r_approximation(rank: int) -> None:
    states = client_states(dtype=torch.float64)
    merged = flexlora_merge(states, RANKS, NUM_SAMPLES, svd="exact")
    assert lora_rank(merged) == 8
    local = truncate(merged, rank)
    for module in MODULES:
        target = weighted_product_sum(states, NUM_SAMPLES, module)
        expected = best_rank_approximation(target, rank)
        torch.testing.assert_close(product(local, module), expected, atol=1e-10, rtol=1e-10)


def test_shapes_dense_keys_and_key_order() -> None:
    states = client_states()
    before = clone_states(states)
    merged = flexlora_merge(states, RANKS, NUM_SAMPLES, global_rank=10, svd="exact")
    assert list(merged) == list(states[0])
    assert merged[lora_a(CONV)].shape == (10, 3, 1, 1)
    assert merged[lora_b(CONV)].shape == (4, 10, 1, 1)
    assert merged[lora_a(QUERY)].shape == (10, 5)
    # The conv update is 4 x 3, so at most 3 singular pairs exist; the rest are zero.
    assert torch.equal(merged[lora_a(CONV)][3:], torch.zeros(7, 3, 1, 1))
    for key in DENSE:
        torch.testing.assert_close(
            merged[key].double(), dense_average(states, NUM_SAMPLES, key), atol=1e-6, rtol=1e-6
        )
    for state, original in zip(states, before, strict=True):
        assert_states_equal(state, original)


def test_factors_split_singular_values_evenly_and_are_sign_fixed() -> None:
    states = client_states(dtype=torch.float64)
    merged = flexlora_merge(states, RANKS, NUM_SAMPLES, svd="exact")
    for module, (d, k, _) in MODULES.items():
        a = merged[lora_a(module)].reshape(8, k)
        b = merged[lora_b(module)].reshape(d, 8)
        # B = U sqrt(S) and A = sqrt(S) V^T, so column norms of B equal row norms of A.
        torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1))
        for j in range(min(d, k)):
            column = b[:, j]
            assert float(column[column.abs().argmax()]) > 0


def test_repeated_merges_are_identical() -> None:
    states = client_states()
    for svd in ("exact", "lowrank"):
        first = flexlora_merge(states, RANKS, NUM_SAMPLES, svd=svd)
        second = flexlora_merge(states, RANKS, NUM_SAMPLES, svd=svd)
        assert_states_equal(first, second)


def test_signs_agree_across_dtypes_and_svd_paths() -> None:
    # Different backends may return either sign for a singular pair; the fixed convention
    # makes float32, float64, exact and randomised factors agree.
    matrix = weighted_product_sum(client_states(dtype=torch.float64), NUM_SAMPLES, QUERY)
    b64, a64 = svd_factors(matrix, 4, svd="exact")
    for svd in ("exact", "lowrank"):
        b32, a32 = svd_factors(matrix.float(), 4, svd=svd)
        torch.testing.assert_close(b32.double(), b64, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a32.double(), a64, atol=1e-4, rtol=1e-4)


def _gapped_matrix(d: int, k: int, top: list[float], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    m = min(d, k)
    values = torch.full((m,), 1e-3, dtype=torch.float64)
    values[: len(top)] = torch.tensor(top, dtype=torch.float64)
    return u[:, :m] @ torch.diag(values) @ v[:, :m].T


def test_lowrank_path_is_close_to_exact_with_a_spectral_gap() -> None:
    matrix = _gapped_matrix(300, 260, [10.0, 8.0, 6.0, 5.0, 4.0], seed=0).float()
    before = torch.get_rng_state()
    b_low, a_low = svd_factors(matrix, 5, svd="lowrank")
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is untouched
    b_ex, a_ex = svd_factors(matrix, 5, svd="exact")
    torch.testing.assert_close(b_low @ a_low, b_ex @ a_ex, atol=1e-3, rtol=0)
    torch.testing.assert_close(b_low, b_ex, atol=1e-3, rtol=0)  # same signs, same factors
    b_again, a_again = svd_factors(matrix, 5, svd="lowrank")
    assert torch.equal(b_low, b_again) and torch.equal(a_low, a_again)


def test_lowrank_merge_close_to_exact_merge() -> None:
    # Every update has rank at most sum r_i = 24 <= R + oversampling, so the range is captured.
    states = client_states(dtype=torch.float64)
    exact = flexlora_merge(states, RANKS, NUM_SAMPLES, svd="exact")
    lowrank = flexlora_merge(states, RANKS, NUM_SAMPLES, svd="lowrank")
    for module in MODULES:
        torch.testing.assert_close(
            product(lowrank, module), product(exact, module), atol=1e-8, rtol=1e-8
        )


@pytest.mark.parametrize(
    ("svd", "shape", "expected"),
    [
        ("auto", (600, 513), True),
        ("auto", (513, 512), False),
        ("auto", (4096, 8), False),
        ("exact", (4096, 4096), False),
        ("lowrank", (6, 5), True),
    ],
)
def test_use_lowrank(svd: str, shape: tuple[int, int], expected: bool) -> None:
    assert use_lowrank(svd, shape) is expected


def test_auto_calls_svd_lowrank_only_for_large_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    original = torch.svd_lowrank

    def spy(matrix: torch.Tensor, **kwargs: int) -> tuple:
        calls.append(tuple(matrix.shape))
        return original(matrix, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", spy)
    big = "model.big"
    generator = torch.Generator().manual_seed(0)
    state = {
        f"{big}.lora_A.weight": torch.randn(2, 520, generator=generator),
        f"{big}.lora_B.weight": torch.randn(530, 2, generator=generator),
        f"{QUERY}.lora_A.weight": torch.randn(2, 5, generator=generator),
        f"{QUERY}.lora_B.weight": torch.randn(6, 2, generator=generator),
    }
    merged = flexlora_merge([state], [2], [1], svd="auto")
    assert calls == [(530, 520)]
    torch.testing.assert_close(
        merged[f"{big}.lora_B.weight"] @ merged[f"{big}.lora_A.weight"],
        state[f"{big}.lora_B.weight"] @ state[f"{big}.lora_A.weight"],
        atol=1e-4,
        rtol=1e-4,
    )


def test_merger_option_and_validation() -> None:
    merger = get_merger("flexlora", svd="exact")
    assert isinstance(merger, FlexLoRAMerger) and merger.svd == "exact"
    assert FlexLoRAMerger().svd == "auto"
    with pytest.raises(ValueError, match="svd must be one of"):
        FlexLoRAMerger(svd="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="svd must be one of"):
        flexlora_merge(client_states([2]), [2], [1], svd="full")  # type: ignore[arg-type]


def test_merger_matches_function_and_keeps_bfloat16() -> None:
    states = client_states(dtype=torch.bfloat16)
    merged = get_merger("flexlora").merge(states, RANKS, NUM_SAMPLES)
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}
    assert_states_equal(merged, flexlora_merge(states, RANKS, NUM_SAMPLES))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lowrank_on_cuda_is_deterministic_and_leaves_the_rng_alone() -> None:
    matrix = _gapped_matrix(600, 550, [10.0, 8.0, 6.0], seed=1).float().cuda()
    before = torch.cuda.get_rng_state()
    b, a = svd_factors(matrix, 3, svd="lowrank")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    b_again, a_again = svd_factors(matrix, 3, svd="lowrank")
    assert torch.equal(b, b_again) and torch.equal(a, a_again)
    b_cpu, a_cpu = svd_factors(matrix.cpu(), 3, svd="exact")
    torch.testing.assert_close(b.cpu(), b_cpu, atol=1e-3, rtol=0)
