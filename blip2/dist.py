"""The library's one contact with torch.distributed: gathering a batch across ranks.

Every function works without a process group (one rank), so the model runs in a notebook.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` of every rank along dim 0; the result carries no gradient (not even the local part)."""
    _, world = rank_and_world()
    if world == 1:
        return x.detach().clone()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (all_reduce, then slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` of every rank along dim 0 (same shape on every rank); gradients flow back to each
    rank's own slice, summed over the ranks that used it."""
    _, world = rank_and_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_padded(ids: torch.Tensor, pad_value: int) -> torch.Tensor:
    """Gather (B, L) token ids whose L differs between ranks, right-padding to the longest."""
    _, world = rank_and_world()
    if world == 1:
        return ids.detach().clone()
    length = torch.tensor([ids.shape[1]], device=ids.device)
    lengths = gather_no_grad(length)
    padded = F.pad(ids, (0, int(lengths.max()) - ids.shape[1]), value=pad_value)
    return gather_no_grad(padded)
