"""The few-row product of the CPU path (weight-major) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eaglespec.ops.linear import CPU_WEIGHT_MAJOR_MAX_ROWS, Linear, linear


@pytest.mark.parametrize("rows", [1, 2, 5, CPU_WEIGHT_MAJOR_MAX_ROWS, CPU_WEIGHT_MAJOR_MAX_ROWS + 1])
def test_linear_equals_f_linear_for_every_row_count(rows):
    gen = torch.Generator().manual_seed(rows)
    x, weight, bias = (torch.randn(*s, generator=gen) for s in ((rows, 48), (37, 48), (37,)))
    for b in (None, bias):
        y = linear(x, weight, b)
        assert y.shape == (rows, 37) and y.is_contiguous()  # layers .view() their products
        torch.testing.assert_close(y, F.linear(x, weight, b), atol=1e-5, rtol=1e-5)
    # Leading dimensions are kept; each output row depends on its own input row only.
    x3 = x.reshape(1, rows, 48)
    torch.testing.assert_close(linear(x3, weight), F.linear(x3, weight), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(x[:1], weight)[0], linear(x, weight)[0], atol=1e-5, rtol=1e-5)


def test_other_dtypes_and_empty_steps_take_f_linear_exactly():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 16, generator=gen).bfloat16(), torch.randn(8, 16, generator=gen).bfloat16()
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert linear(torch.zeros(0, 16), torch.zeros(8, 16)).shape == (0, 8)


def test_linear_module_keeps_nn_linear_state():
    torch.manual_seed(0)
    plain, ours = torch.nn.Linear(12, 5), Linear(12, 5)
    ours.load_state_dict(plain.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 12)
    torch.testing.assert_close(ours(x), plain(x), atol=1e-6, rtol=1e-6)
