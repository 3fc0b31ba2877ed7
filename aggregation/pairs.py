"""LoRA pairs: find each module's ``lora_A``/``lora_B`` and view them as the matrices of ``B @ A``.

Methods that work on a module's update ``dW = B @ A`` (HetLoRA's norms, FlexLoRA's SVD, FLoRA's
stacking) need both factors of every module as plain matrices: ``A`` as ``r x k'`` and ``B`` as
``d x r``. A 1x1 conv's factors are ``(r, k, 1, 1)`` and ``(d, r, 1, 1)``; a general conv's
``A`` is ``(r, k, kh, kw)`` with ``B`` still ``(d, r, 1, 1)``. Flattening ``A`` past its rank axis
(``k' = k * kh * kw``) and dropping ``B``'s trailing ones gives the matrices, and the product
reshaped to ``(d, *A.shape[1:])`` is shaped like the module's base weight.

The module prefix of a pair is the ``lora_A`` key minus ``lora_A.weight`` (or minus
``lora_A.<adapter>.weight``), dot included: ``"x.query.lora_A.weight"`` -> ``"x.query."``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from aggregation.lora_keys import is_lora_b

_PAIR_A = re.compile(r"^(?P<prefix>(?:.*\.)?)lora_A(?P<adapter>\.[^.]+)?\.weight$")


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Group LoRA keys by module: module prefix -> ``(lora_A key, lora_B key)``.

    Args:
        keys: State-dict keys; dense keys are ignored.

    Returns:
        A dict in the order the ``lora_A`` keys appear.

    Raises:
        ValueError: If a ``lora_A`` has no ``lora_B`` or a ``lora_B`` has no ``lora_A`` (the
            keys are named).
    """
    keys = list(keys)
    present = set(keys)
    pairs: dict[str, tuple[str, str]] = {}
    for key in keys:
        match = _PAIR_A.match(key)
        if match is None:
            continue
        adapter = match.group("adapter") or ""
        partner = f"{match.group('prefix')}lora_B{adapter}.weight"
        if partner not in present:
            raise ValueError(f"{key} has no matching {partner}")
        pairs[match.group("prefix")] = (key, partner)
    paired_b = {b_key for _, b_key in pairs.values()}
    unpaired = sorted(key for key in keys if is_lora_b(key) and key not in paired_b)
    if unpaired:
        raise ValueError(f"lora_B keys without a matching lora_A: {unpaired}")
    return pairs


def a_matrix(a: Tensor) -> Tensor:
    """View a ``lora_A`` weight ``(r, k, ...)`` as the ``r x k'`` matrix of ``B @ A``.

    Args:
        a: A ``lora_A`` weight, 2-D or conv-shaped.

    Returns:
        A view of shape ``(r, prod(a.shape[1:]))``.
    """
    return a.reshape(a.shape[0], -1)


def b_matrix(b: Tensor) -> Tensor:
    """View a ``lora_B`` weight ``(d, r)`` or ``(d, r, 1, 1)`` as the ``d x r`` matrix.

    Args:
        b: A ``lora_B`` weight.

    Returns:
        A view of shape ``(d, r)``.

    Raises:
        ValueError: If ``b`` has fewer than 2 dimensions or trailing dimensions other than 1.
    """
    if b.dim() < 2 or any(size != 1 for size in b.shape[2:]):
        raise ValueError(f"lora_B shape {tuple(b.shape)} is not (d, r) or (d, r, 1, ..., 1)")
    return b.reshape(b.shape[0], b.shape[1])


def delta_shape(a: Tensor, b: Tensor) -> tuple[int, ...]:
    """Return the shape of a module's base weight, which ``B @ A`` is reshaped to.

    Args:
        a: The module's ``lora_A`` weight ``(r, k, ...)``.
        b: The module's ``lora_B`` weight ``(d, r, ...)``.

    Returns:
        ``(d, *a.shape[1:])``: ``(d, k)`` for a Linear, ``(d, k, 1, 1)`` for a 1x1 conv.
    """
    return (int(b.shape[0]), *a.shape[1:])


def factor_product(a: Tensor, b: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Return ``B @ A`` of one module, shaped like its base weight.

    Args:
        a: The module's ``lora_A`` weight.
        b: The module's ``lora_B`` weight.
        dtype: The dtype to multiply in; defaults to ``a``'s.

    Returns:
        A new tensor of shape ``delta_shape(a, b)``.

    Raises:
        ValueError: If ``b`` is not ``(d, r, 1, ...)``-shaped.
    """
    dtype = dtype or a.dtype
    product = b_matrix(b).to(dtype) @ a_matrix(a).to(dtype)  # (d, k')
    return product.reshape(delta_shape(a, b))


def stack_factors(
    a_tensors: Sequence[Tensor], b_tensors: Sequence[Tensor], weights: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Stack clients' factors along the rank axis so one matmul gives ``sum_i w_i B_i @ A_i``.

    ``B_cat = [B_1 | ... | B_n]`` (``d x sum r_i``) and ``A_cat`` stacks ``w_i A_i`` row-wise
    (``sum r_i x k'``), so ``B_cat @ A_cat = sum_i w_i B_i @ A_i`` exactly (FLoRA's stacking).
    With per-dimension weights ``w_ij`` (a 2-D ``weights``), row ``j`` of ``A_i`` is scaled by
    ``w_ij`` instead, so ``B_cat @ A_cat = sum_i sum_{j < r_i} w_ij B_i[:, j] A_i[j]``
    (raFLoRA's rank-partitioned product).

    Args:
        a_tensors: The clients' ``lora_A`` weights of one module, in client order.
        b_tensors: The clients' ``lora_B`` weights of that module, same order.
        weights: Per-client weights ``w_i``, shape ``(|S|,)``, or per-client, per-dimension
            weights ``w_ij``, shape ``(|S|, R)`` with ``R`` at least every client's rank.
        dtype: The dtype of the result.

    Returns:
        ``(B_cat, A_cat)`` as matrices of shapes ``(d, sum r_i)`` and ``(sum r_i, k')``.

    Raises:
        ValueError: If a ``lora_B`` is not ``(d, r, 1, ...)``-shaped.
    """
    weights = weights.to(device=a_tensors[0].device, dtype=dtype)
    b_cat = torch.cat([b_matrix(b).to(dtype) for b in b_tensors], dim=1)  # (d, sum r_i)
    if weights.dim() == 2:  # row j of A_i scaled by w_ij
        weights = weights[:, :, None]
        a_cat = torch.cat(
            [
                w[: a.shape[0]] * a_matrix(a).to(dtype)
                for w, a in zip(weights, a_tensors, strict=True)
            ],
            dim=0,
        )  # (sum r_i, k')
        return b_cat, a_cat
    a_cat = torch.cat(
        [w * a_matrix(a).to(dtype) for w, a in zip(weights, a_tensors, strict=True)], dim=0
    )  # (sum r_i, k')
    return b_cat, a_cat


def pair_products(
    state: Mapping[str, Tensor], dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Return every module's ``B @ A``, keyed by module prefix, shaped like its base weight.

    Args:
        state: A LoRA state dict whose factors come in pairs.
        dtype: The dtype to multiply in; defaults to each ``lora_A``'s dtype.

    Returns:
        A new dict: module prefix -> ``(d, k)`` or ``(d, k, 1, 1)`` tensor.

    Raises:
        ValueError: If a factor has no partner or a ``lora_B`` is badly shaped.
    """
    return {
        prefix: factor_product(state[a_key], state[b_key], dtype)
        for prefix, (a_key, b_key) in lora_pairs(state).items()
    }
