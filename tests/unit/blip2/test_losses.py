import pytest
import torch
import torch.nn.functional as F

from blip2.losses import linear_cross_entropy


@pytest.mark.parametrize("smoothing, chunk", [(0.0, 4), (0.1, 3), (0.1, 100)])
def test_matches_cross_entropy_of_the_full_logits(smoothing, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g, requires_grad=True)
    weight = torch.randn(37, 8, generator=g, requires_grad=True)
    bias = torch.randn(37, generator=g, requires_grad=True)
    target = torch.randint(0, 37, (10,), generator=g)
    want = F.cross_entropy(hidden @ weight.t() + bias, target, label_smoothing=smoothing)
    want_grads = torch.autograd.grad(want * 3.0, (hidden, weight, bias))
    got = linear_cross_entropy(hidden, weight, bias, target, smoothing, chunk=chunk)
    got_grads = torch.autograd.grad(got * 3.0, (hidden, weight, bias))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_no_grad_and_empty_input():
    hidden, weight, bias = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(5)
    target = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, bias, target, 0.1)
    torch.testing.assert_close(value, F.cross_entropy(hidden @ weight.t() + bias, target, label_smoothing=0.1))
    assert linear_cross_entropy(hidden[:0], weight, bias, target[:0]).item() == 0.0


def test_under_bf16_autocast_like_the_full_logits_and_grads_in_the_inputs_dtypes():
    """The GPU training path (bf16 autocast, fp32 weights, bf16 hidden states from an autocast linear), here
    under CPU autocast: same loss and gradients as F.linear + F.cross_entropy under the same autocast, within
    bf16 rounding, and each gradient in its input's dtype."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(53, 16, generator=g, requires_grad=True)
    bias = torch.randn(53, generator=g, requires_grad=True)
    target = torch.randint(0, 53, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(hidden, weight, bias).float(), target, label_smoothing=0.1)
        got = linear_cross_entropy(hidden, weight, bias, target, 0.1, chunk=16)
    want_grads = torch.autograd.grad(want, (hidden, weight, bias))
    got_grads = torch.autograd.grad(got, (hidden, weight, bias))
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    for a, b, x in zip(got_grads, want_grads, (hidden, weight, bias)):
        assert a.dtype == x.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=5e-2)
