"""The GPU paths (SPEC section 8), run where a CUDA device exists (skipped in CI): frozen encoder fp16, frozen
OPT fp16 and FlanT5 bf16, trainable parts fp32 under bf16 autocast, as the training loop builds them; each
stage overfits a fixed batch and the trainable weights stay fp32."""
import dataclasses

import pytest
import torch

from blip2.config import preset
from blip2.llm import build_llm
from blip2.stage1 import Blip2Stage1
from blip2.stage2 import Blip2Stage2, opt_lm_batch, t5_prefix_lm_batch
from blip2.tokenizer import build_qformer_tokenizer, dec_token_id, shapes_vocabulary, tokenize
from blip2.vision import build_image_encoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CAPTIONS = ["a red circle on the left", "two blue squares", "a small green star at the top",
            "a large yellow hexagon in the middle"]


def overfit(model, batch: dict, steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def trainable_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad}


def test_stage1_bf16_autocast_on_a_half_precision_encoder():
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, llm=None, qformer=dataclasses.replace(cfg.qformer, dropout=0.0))
    tokenizer = build_qformer_tokenizer(vocab_words=shapes_vocabulary())
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, vocab_size=len(tokenizer)))
    torch.manual_seed(0)
    model = Blip2Stage1(cfg, visual=build_image_encoder(cfg.vision, device="cuda", seed=0),
                        dec_token_id=dec_token_id(tokenizer)).cuda()
    assert model.visual.patch_weight().dtype == torch.float16
    ids, mask = tokenize(tokenizer, CAPTIONS, 16)
    batch = {"image": torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, device="cuda"),
             "input_ids": ids.cuda(), "attention_mask": mask.cuda()}
    losses = overfit(model, batch, steps=60, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
    assert trainable_dtypes(model) == {torch.float32}


@pytest.mark.parametrize("kind,llm_dtype", [("opt", torch.float16), ("t5", torch.bfloat16)])
def test_stage2_overfits_with_the_llm_in_its_gpu_dtype(kind, llm_dtype):
    cfg = preset("tiny" if kind == "opt" else "tiny-t5")
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, dropout=0.0, num_query_tokens=8),
                              llm=dataclasses.replace(cfg.llm, hidden_size=64, ffn_dim=128))
    torch.manual_seed(0)
    llm, tokenizer = build_llm(cfg.llm, "cuda")
    assert next(llm.parameters()).dtype == llm_dtype
    model = Blip2Stage2(cfg, visual=build_image_encoder(cfg.vision, device="cuda", seed=0), llm=llm,
                        llm_tokenizer=tokenizer).cuda()
    text = opt_lm_batch(tokenizer, CAPTIONS) if kind == "opt" else \
        t5_prefix_lm_batch(tokenizer, CAPTIONS, torch.Generator().manual_seed(0))
    image = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size,
                        generator=torch.Generator().manual_seed(1)).cuda()
    losses = overfit(model, {"image": image, **{k: v.cuda() for k, v in text.items()}}, steps=150)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    assert trainable_dtypes(model) == {torch.float32}
    assert next(model.language_model.parameters()).dtype == llm_dtype
    with torch.autocast("cuda", dtype=torch.bfloat16):
        captions = model.eval().generate(image, max_new_tokens=12)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
