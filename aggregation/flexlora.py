"""FlexLoRA (docs/algorithms.md §1.5, Bai et al. 2024): average full updates, then re-factor by SVD.

Per module ``dW = sum_i p_i B_i @ A_i`` (``d x k``), ``dW = U diag(S) V^T``, and the global
factors at rank ``R`` are ``B = U[:, :R] diag(sqrt(S[:R]))``, ``A = diag(sqrt(S[:R])) V[:, :R]^T``
(reshaped back to conv shapes). Because the singular directions come first, truncating them to
``r_i`` (the default redistribution) is the best rank-``r_i`` approximation of ``dW``.

Reproducibility: each column of ``U`` is signed so that its largest-magnitude entry is positive
(the matching column of ``V`` flips with it), so the factors do not depend on the sign choice of
the SVD backend. The randomised path (``torch.svd_lowrank``) runs under a forked RNG seeded with
``seed``, with ``niter`` power iterations and ``q = min(R + LOWRANK_OVERSAMPLING, d, k)``
columns, so a repeated merge gives the same factors and the caller's RNG stream is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from aggregation.pairs import lora_pairs, stack_factors
from aggregation.rank_merger import RankMerger
from aggregation.stacking import (
    accumulation_dtype,
    sample_weights,
    with_dense_average,
)
from aggregation.validate import check_merge_arguments, check_merge_inputs

SvdMethod = Literal["exact", "lowrank", "auto"]
SVD_CHOICES: tuple[str, ...] = get_args(SvdMethod)

# "auto" switches to the randomised SVD above this min(d, k): below it the exact SVD is cheap.
LOWRANK_THRESHOLD = 512
# Extra columns for the randomised range finder (Halko et al. suggest 5..10 past the rank).
LOWRANK_OVERSAMPLING = 8
LOWRANK_NITER = 4
LOWRANK_SEED = 0


def use_lowrank(svd: SvdMethod, shape: Sequence[int]) -> bool:
    """Tell whether a ``d x k`` update is factored with ``torch.svd_lowrank``.

    Args:
        svd: ``"exact"``, ``"lowrank"``, or ``"auto"`` (lowrank when ``min(d, k) > 512``).
        shape: The matrix shape ``(d, k)``.

    Returns:
        True for the randomised path.

    Raises:
        ValueError: If ``svd`` is not a valid choice.
    """
    if svd not in SVD_CHOICES:
        raise ValueError(f"svd must be one of {SVD_CHOICES}, got {svd!r}")
    if svd == "auto":
        return min(shape) > LOWRANK_THRESHOLD
    return svd == "lowrank"


@contextlib.contextmanager
def _seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the RNG that ``torch.svd_lowrank`` draws from on ``device``, restoring it after."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type), module.device(index):
        module.manual_seed(seed)
        yield


def _sign_fixed(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Flip singular-vector pairs so each column of ``u`` has a positive largest-|.| entry."""
    peak = u.abs().argmax(dim=0, keepdim=True)  # (1, q): first index of the largest |u|
    signs = torch.sign(u.gather(0, peak))  # (1, q)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, v * signs


def svd_factors(
    delta: Tensor,
    rank: int,
    *,
    svd: SvdMethod = "exact",
    seed: int = LOWRANK_SEED,
    niter: int = LOWRANK_NITER,
) -> tuple[Tensor, Tensor]:
    """Factor a ``d x k`` matrix into rank-``rank`` factors ``B @ A`` by its top singular pairs.

    Args:
        delta: The matrix ``dW`` (float32 or float64).
        rank: The number of singular pairs ``R``; past ``min(d, k)`` the factors are
            zero-padded.
        svd: ``"exact"`` (``torch.linalg.svd``), ``"lowrank"`` (``torch.svd_lowrank``), or
            ``"auto"``.
        seed: The seed of the randomised path.
        niter: The power iterations of the randomised path.

    Returns:
        ``(B, A)`` of shapes ``(d, R)`` and ``(R, k)``: ``B = U diag(sqrt S)``,
        ``A = diag(sqrt S) V^T``, singular values in decreasing order, signs fixed.

    Raises:
        ValueError: If ``delta`` is not 2-D, ``rank < 1`` or ``svd`` is invalid.
    """
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    d, k = delta.shape
    if use_lowrank(svd, (d, k)):
        q = min(rank + LOWRANK_OVERSAMPLING, d, k)
        with _seeded_rng(delta.device, seed):
            u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)  # (d, q), (q,), (k, q)
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (d, m), (m,), (m, k)
        v = vh.T
    kept = min(rank, s.shape[0])
    u, v = _sign_fixed(u[:, :kept], v[:, :kept])
    root = s[:kept].clamp(min=0).sqrt()
    b = delta.new_zeros(d, rank)
    a = delta.new_zeros(rank, k)
    b[:, :kept] = u * root[None, :]
    a[:kept] = root[:, None] * v.T
    return b, a


def refactor_pair(
    delta: Tensor, rank: int, a_like: Tensor, b_like: Tensor, *, svd: SvdMethod = "exact"
) -> tuple[Tensor, Tensor]:
    """Factor one module's merged update at rank ``rank``, shaped and typed like its factors.

    Args:
        delta: The module's merged update as a ``d x k'`` matrix (float32 or float64).
        rank: The global rank ``R``.
        a_like: A client's ``lora_A`` of the module: the result has its trailing shape and dtype.
        b_like: A client's ``lora_B`` of the module, likewise.

    Returns:
        ``(A, B)`` of shapes ``(R, *a_like.shape[1:])`` and ``(d, R, *b_like.shape[2:])``, the
        factors of ``svd_factors`` (balanced, sign-fixed) cast to the clients' dtypes.

    Raises:
        ValueError: As ``svd_factors``.
    """
    b, a = svd_factors(delta, rank, svd=svd)
    a = a.reshape(rank, *a_like.shape[1:]).to(a_like.dtype)
    b = b.reshape(b.shape[0], rank, *b_like.shape[2:]).to(b_like.dtype)
    return a, b


def flexlora_merge(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    *,
    global_rank: int | None = None,
    svd: SvdMethod = "auto",
) -> dict[str, Tensor]:
    """Merge clients by averaging their full updates and re-factoring each at rank ``R``.

    Args:
        states: The clients' LoRA state dicts (same keys), client ``i`` at rank ``ranks[i]``.
        ranks: Each client's rank.
        num_samples: Each client's number of training samples.
        global_rank: The global rank ``R``; defaults to ``max(ranks)``.
        svd: How to factor: ``"exact"``, ``"lowrank"`` or ``"auto"`` (see ``use_lowrank``).

    Returns:
        A new rank-``R`` state dict, each tensor in the dtype of client 0's tensor; dense keys
        are averaged with ``p_i``.

    Raises:
        ValueError: If ``svd`` is invalid, a factor has no partner, or the inputs are
            inconsistent (see ``check_merge_inputs``).
    """
    if svd not in SVD_CHOICES:
        raise ValueError(f"svd must be one of {SVD_CHOICES}, got {svd!r}")
    check_merge_arguments(states, ranks, num_samples, global_rank)
    rank = global_rank if global_rank is not None else max(ranks, default=0)
    check_merge_inputs(states, ranks, num_samples, rank)
    weights = sample_weights(num_samples)
    merged: dict[str, Tensor] = {}
    for a_key, b_key in lora_pairs(states[0]).values():
        a_tensors = [state[a_key] for state in states]
        b_tensors = [state[b_key] for state in states]
        dtype = accumulation_dtype([*a_tensors, *b_tensors])
        b_cat, a_cat = stack_factors(a_tensors, b_tensors, weights, dtype)
        # dW = sum_i p_i B_i A_i is d x k'
        merged[a_key], merged[b_key] = refactor_pair(
            b_cat @ a_cat, rank, a_tensors[0], b_tensors[0], svd=svd
        )
    return with_dense_average(states, merged, weights)


class FlexLoRAMerger(RankMerger):
    """FlexLoRA (docs/algorithms.md §1.5): SVD of the averaged full update, truncated per client.

    Args:
        svd: ``"exact"`` SVD, randomised ``"lowrank"``, or ``"auto"`` (lowrank when
            ``min(d, k) > 512``).

    Raises:
        ValueError: If ``svd`` is not a valid choice.
    """

    name: ClassVar[str] = "flexlora"
    options: ClassVar[tuple[str, ...]] = ("svd",)
    needs_pairs: ClassVar[bool] = True
    linear_in_factors: ClassVar[bool] = False
    dp_refusal: ClassVar[str] = (
        "FlexLoRA hands out the SVD factors of the averaged products B_i A_i; clipping bounds "
        "the change of a client's factors, not of the products or of their SVD, so the "
        "sensitivity of the factors it releases is not bounded by privacy.clip_norm"
    )

    def __init__(self, svd: SvdMethod = "auto") -> None:
        if svd not in SVD_CHOICES:
            raise ValueError(f"svd must be one of {SVD_CHOICES}, got {svd!r}")
        self.svd: SvdMethod = svd

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        return flexlora_merge(states, ranks, num_samples, global_rank=global_rank, svd=self.svd)
