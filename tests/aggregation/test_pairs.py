"""Pairing lora_A with lora_B per module and forming B @ A in the base weight's shape."""

import pytest
import torch
from lora_builders import CONV, MODULES, QUERY, build_state, lora_a, lora_b, product

from aggregation import factor_product, lora_pairs, pair_products


def test_pairs_every_module_by_prefix() -> None:
    state = build_state(2, seed=0)
    pairs = lora_pairs(state)
    assert pairs == {f"{module}.": (lora_a(module), lora_b(module)) for module in MODULES}


def test_adapter_name_segment_is_paired() -> None:
    keys = [
        "m.q.lora_A.default.weight",
        "m.q.lora_B.default.weight",
        "lora_A.weight",
        "lora_B.weight",
    ]
    assert lora_pairs(keys) == {
        "m.q.": ("m.q.lora_A.default.weight", "m.q.lora_B.default.weight"),
        "": ("lora_A.weight", "lora_B.weight"),
    }


def test_unpaired_factors_are_named() -> None:
    with pytest.raises(ValueError, match="m.q.lora_A.weight has no matching m.q.lora_B.weight"):
        lora_pairs(["m.q.lora_A.weight"])
    with pytest.raises(ValueError, match=r"without a matching lora_A: \['m.k.lora_B.weight'\]"):
        lora_pairs(["m.k.lora_B.weight"])


def test_products_have_base_weight_shapes() -> None:
    state = build_state(3, seed=1, dtype=torch.float64)
    products = pair_products(state)
    assert products[f"{CONV}."].shape == (4, 3, 1, 1)
    assert products[f"{QUERY}."].shape == (6, 5)
    for module in MODULES:
        torch.testing.assert_close(
            products[f"{module}."].reshape(product(state, module).shape), product(state, module)
        )


def test_general_conv_kernel_flattens_a() -> None:
    a = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(5, 2, 1, 1, dtype=torch.float64)
    out = factor_product(a, b)
    assert out.shape == (5, 3, 3, 3)
    expected = torch.einsum("dr,rkhw->dkhw", b[:, :, 0, 0], a)
    torch.testing.assert_close(out, expected)


def test_bad_lora_b_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="is not"):
        factor_product(torch.randn(2, 3), torch.randn(5, 2, 3, 3))
