"""A vocabulary-sized loss that never holds all the logits: linear layer + label-smoothed cross-entropy.

ITG predicts ~B x L tokens over a 30k vocabulary: the (B*L, V) logits, their log-softmax and its gradient
are each hundreds of MB that the CPU streams through memory several times. Here the rows go through in
chunks: each chunk's logits are made, turned into the loss and straight into their gradient (softmax minus
the smoothed target), and multiplied back into the gradients of the hidden states, weight and bias while
they are still in cache. Same value and gradients as `F.cross_entropy(hidden @ W.T + b, target,
label_smoothing=eps)`.
"""
from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                smoothing: float, chunk: int) -> torch.Tensor:
        # under autocast the products run in its dtype (as F.linear would); logits, loss and the weight's and
        # bias's gradient sums stay fp32, each gradient comes back in its input's dtype
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        rows, vocab = hidden.shape[0], weight.shape[0]
        want_grad = any(ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros_like(weight) if want_grad else None
        grad_bias = torch.zeros_like(bias) if want_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        w, b = weight.to(compute), bias.to(compute)
        with torch.autocast(device, enabled=False):
            for start in range(0, rows, chunk):
                h, t = hidden[start:start + chunk].to(compute), target[start:start + chunk]  # (c, D), (c,)
                logits = torch.addmm(b, h, w.t()).float()  # (c, V)
                lse = torch.logsumexp(logits, dim=1)  # (c,)
                picked = logits.gather(1, t[:, None]).squeeze(1)
                # -(1-eps) log p_t - eps * mean_j log p_j, with log p_j = z_j - lse
                total += (lse - (1 - smoothing) * picked - smoothing * logits.mean(dim=1)).sum()
                if want_grad:
                    grad = logits.sub_(lse[:, None]).exp_().sub_(smoothing / vocab)  # softmax - eps / V
                    grad[torch.arange(len(t), device=t.device), t] -= 1 - smoothing
                    grad_bias += grad.sum(dim=0)
                    grad = grad.to(compute)
                    grad_hidden[start:start + chunk] = grad @ w
                    if grad_weight.dtype == compute:
                        grad_weight.addmm_(grad.t(), h)
                    else:
                        grad_weight += grad.t() @ h
        if want_grad:
            ctx.save_for_backward(grad_hidden / rows, grad_weight / rows, grad_bias / rows)
        return total / rows

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, grad_bias * grad_loss, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                         label_smoothing: float = 0.0, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` (N, V) against `target` (N,), chunked over rows
    (`chunk` rows at a time: 64 on the CPU, to stay in cache; 1024 on a GPU, to fill it)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    chunk = chunk or (64 if hidden.device.type == "cpu" else 1024)
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, label_smoothing, chunk)
