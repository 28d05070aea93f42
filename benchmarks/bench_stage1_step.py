"""Claim: our stage-1 training step beats the reference-style step at the same size and FLOP ceiling.

Small benchmark config: Q-Former 256 wide, 4 layers, 32 queries, image tokens 257 x 384 (the frozen
encoder's output is fed directly: the step measures what is trained), batch 32, text length 32,
BERT-size vocabulary (30523). Figure of merit: samples/s per 100 GFLOP/s of fp32 matmul ceiling,
the ceiling measured in the same run (goal >= 8; the reference reaches about 5.3).

Baseline ("reference-style"): the same model and losses, but computed as the reference does: unfused
attention (softmax(QK^T)V written out, as its BERT attention), the ITM pass recomputing every image's
cross-attention keys/values for its 3B pairs, the last layer computed for every row, and the ITG loss
over the whole (B, L, V) logits tensor. Candidate: this library's step (SDPA, image keys/values computed
once and reused, last layer pruned to the rows a pass reads, chunked linear + cross-entropy). Also reports each step's FLOPs (torch's FlopCounterMode) and
the achieved fraction of the ceiling.

With `--device cuda` both steps run on the GPU (fp32 with TF32 off, or `--precision bf16`: autocast, the
ceiling then a bf16 matmul), timed with the device synchronised.

    .venv/bin/python benchmarks/bench_stage1_step.py [--size small|tiny] [--steps 6] [--device cuda]
        [--precision fp32|bf16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from blip2.dist import gather_with_grad  # noqa: E402
from blip2.config import Blip2Config, QFormerConfig, tiny_qformer, tiny_vision  # noqa: E402
from blip2.qformer import QFormer  # noqa: E402
from blip2.stage1 import Blip2Stage1  # noqa: E402

SIZES = {
    "small": dict(qformer=QFormerConfig(hidden_size=256, layers=4, heads=4, intermediate_size=1024,
                                        num_query_tokens=32, vocab_size=30523, embed_dim=256),
                  tokens=257, width=384, batch=32, length=32),
    "tiny": dict(qformer=tiny_qformer(), tokens=17, width=48, batch=8, length=16),
}


class ImageTokens(nn.Module):
    """Stands in for the frozen encoder: fixed tokens (B, T, C), no parameters to train."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.register_buffer("tokens", torch.randn(1, tokens, width))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.tokens.expand(image.shape[0], -1, -1) + image[:, :1, :1, :1].reshape(-1, 1, 1)


class UnfusedQFormer(QFormer):
    """The reference's attention (scores, mask, softmax, dropout and the weighted sum, written out), and
    every row computed in the last layer, read or not, and torch's own dropout."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for parent in self.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.Dropout):
                    setattr(parent, name, nn.Dropout(child.p))

    def forward(self, hidden, query_length, self_mask=None, image_kv=None, prefix_kv=None, return_kv=False,
                last_rows=None):
        out, kv = super().forward(hidden, query_length, self_mask, image_kv, prefix_kv, return_kv)
        return (out if last_rows is None else out[:, :last_rows]), kv

    def _attend(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.dropout(scores.softmax(-1), self.cfg.dropout, self.training)
        return self._merge(probs @ v)


class ReferenceStyleStage1(Blip2Stage1):
    """ITM keys/values recomputed for all 3B pairs from the stacked image embeddings."""

    def __init__(self, cfg, visual):
        super().__init__(cfg, visual=visual)
        self.qformer = UnfusedQFormer(cfg.qformer, cfg.vision.width)

    def itg_loss(self, query_kv, input_ids, attention_mask):
        """The whole (B, L, V) logits tensor, then cross-entropy with ignore_index, as the reference."""
        logits = self.itg_head(self.itg_hidden(query_kv, input_ids, attention_mask),
                               self.qformer.embeddings.word_embeddings.weight)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=0.1)

    def pair_image_kv(self, image_embeds, image_kv, neg_images, own_rows):
        all_embeds = gather_with_grad(image_embeds)
        return self.qformer.image_kv(torch.cat([image_embeds, all_embeds[neg_images], image_embeds[own_rows]]))


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def matmul_ceiling(n: int = 2048, repeats: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    if device != "cpu":
        n, repeats = 8192, 20
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9  # GFLOP/s


def build(size: dict, reference: bool) -> nn.Module:
    vision = tiny_vision(width=size["width"])
    cfg = Blip2Config(name="bench", vision=vision, qformer=size["qformer"])
    torch.manual_seed(0)
    visual = ImageTokens(size["tokens"], size["width"])
    return ReferenceStyleStage1(cfg, visual) if reference else Blip2Stage1(cfg, visual=visual)


def batch(size: dict, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    vocab = size["qformer"].vocab_size
    ids = torch.randint(5, vocab - 1, (size["batch"], size["length"]), generator=g)
    ids[:, 0] = 2  # [CLS]
    return tuple(t.to(device) for t in (torch.randn(size["batch"], 3, 8, 8, generator=g), ids, torch.ones_like(ids)))


def make_step(model: nn.Module, data, precision: str = "fp32"):
    device = data[0].device.type
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(*data)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        sync()

    return step


def step_flops(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def interleaved_seconds(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds per step of each, alternating them so that load changes hit both alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (GPU)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    size = SIZES[args.size]
    data = batch(size, args.device)
    steps = {"reference": make_step(build(size, reference=True), data, args.precision),
             "ours": make_step(build(size, reference=False), data, args.precision)}
    flops = {name: step_flops(step) for name, step in steps.items()}  # also the warm-up step
    for step in steps.values():
        step()  # a second warm-up (allocator, autotuning on GPUs)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    ceiling_before = matmul_ceiling(device=args.device, dtype=dtype)
    seconds = interleaved_seconds(steps, args.steps)
    ceiling = (ceiling_before + matmul_ceiling(device=args.device, dtype=dtype)) / 2
    ref_s, ours_s = seconds["reference"], seconds["ours"]
    ref_flops, ours_flops = flops["reference"], flops["ours"]
    per_100 = lambda seconds: size["batch"] / seconds / (ceiling / 100)  # noqa: E731
    describe = lambda seconds, flops: {  # noqa: E731
        "seconds_per_step": round(seconds, 4), "samples_per_s": round(size["batch"] / seconds, 2),
        "samples_per_s_per_100_gflops": round(per_100(seconds), 2), "gflop_per_step": round(flops / 1e9, 2),
        "fraction_of_peak": round(flops / seconds / 1e9 / ceiling, 3)}
    suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}_{args.precision}"
    write_result(
        f"stage1_step_{args.size}{suffix}", baseline={"what": "reference-style step", **describe(ref_s, ref_flops)},
        candidate={"what": "blip2.stage1 step", **describe(ours_s, ours_flops)},
        ratio=ref_s / ours_s, units="speed-up, reference-style seconds / ours",
        goal="candidate >= 8 samples/s per 100 GFLOP/s of matmul ceiling (reference about 5.3)",
        extra={"matmul_ceiling_gflops": round(ceiling, 1), "size": args.size, "device": args.device,
               "precision": args.precision,
               "config": {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in size.items()}})


if __name__ == "__main__":
    main()
