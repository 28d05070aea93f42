"""ITC over the global batch under torch.distributed (2 gloo processes) equals one process on the full batch."""
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tiny_models import make_batch, tiny_stage1

pytestmark = pytest.mark.integration
BATCH = 6


def itc_run(model, image, ids, mask):
    out = model(image, ids, mask)
    model.zero_grad()
    out.loss_itc.backward()
    return {"loss_itc": out.loss_itc.item(), "width": out.sim_i2t.shape[1],
            "grad": model.vision_proj.weight.grad.clone(), "text_grad": model.text_proj.weight.grad.clone()}


def worker(rank: int, world: int, init_file: str, gather_grad: bool, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_stage1(seed=0).eval()  # same weights everywhere, dropout off
        model.cfg = dataclasses.replace(model.cfg, itc_gather_grad=gather_grad)
        image, ids, mask = make_batch(BATCH, seed=5)
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        result = itc_run(model, image[half], ids[half], mask[half])
        grads = [torch.empty_like(result["grad"]) for _ in range(world)]
        dist.all_gather(grads, result["grad"])
        text_grads = [torch.empty_like(result["text_grad"]) for _ in range(world)]
        dist.all_gather(text_grads, result["text_grad"])
        losses = [None] * world
        dist.all_gather_object(losses, result["loss_itc"])
        if rank == 0:
            results.update(width=result["width"], losses=losses, grad=sum(grads) / world,
                           text_grad=sum(text_grads) / world)
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, gather_grad: bool) -> dict:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, str(tmp_path / f"init-{gather_grad}"), gather_grad, results), nprocs=2)
        return dict(results)


def test_itc_of_two_ranks_equals_one_process(tmp_path):
    grads = {}
    for gather_grad in (False, True):
        model = tiny_stage1(seed=0).eval()
        model.cfg = dataclasses.replace(model.cfg, itc_gather_grad=gather_grad)
        full = itc_run(model, *make_batch(BATCH, seed=5))
        two = run_two_ranks(tmp_path, gather_grad)
        assert two["width"] == BATCH  # the logits span the global batch
        assert sum(two["losses"]) / 2 == pytest.approx(full["loss_itc"], abs=1e-5)
        # DDP-averaged gradients equal the one-process gradients in both modes
        torch.testing.assert_close(two["grad"], full["grad"], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(two["text_grad"], full["text_grad"], atol=1e-6, rtol=1e-4)
        grads[gather_grad] = full["grad"]
    # the reference mode (gathered features without gradient) is a different gradient than open_clip's
    assert not torch.allclose(grads[False], grads[True], atol=1e-6, rtol=1e-4)
