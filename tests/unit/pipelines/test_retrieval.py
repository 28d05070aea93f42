"""The FAISS first stage returns brute force's exact top-k; FAISS + batched ITM gives the row-by-row metrics."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.retrieval import (Embeddings, itc_topk_exact, itc_topk_faiss, metrics, retrieve,
                                 retrieve_row_by_row)
from tiny_models import make_batch, tiny_stage1


def _feats(ni, q, nt, e, seed=0, clustered=False):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(ni, q, e, generator=g)
    if clustered:  # an image's query vectors nearly equal: the t2i prefix must grow to find k images
        images = images[:, :1] + 0.01 * images
    return F.normalize(images, dim=-1), F.normalize(torch.randn(nt, e, generator=g), dim=-1)


@pytest.mark.parametrize("ni, q, nt, e, k, clustered", [
    (40, 4, 200, 16, 16, False), (40, 4, 200, 16, 16, True), (10, 3, 50, 8, 128, False), (30, 8, 30, 12, 7, True),
])
def test_faiss_first_stage_is_the_exact_topk(ni, q, nt, e, k, clustered):
    image_feats, text_feats = _feats(ni, q, nt, e, clustered=clustered)
    fast_i2t, fast_t2i = itc_topk_faiss(image_feats, text_feats, k, use_gpu=False)
    exact_i2t, exact_t2i = itc_topk_exact(image_feats, text_feats, k)
    assert fast_i2t.ids.shape == (ni, min(k, nt)) and fast_t2i.ids.shape == (nt, min(k, ni))
    np.testing.assert_array_equal(fast_i2t.ids, exact_i2t.ids)
    np.testing.assert_array_equal(fast_t2i.ids, exact_t2i.ids)
    np.testing.assert_allclose(fast_i2t.scores, exact_i2t.scores, atol=1e-5)
    np.testing.assert_allclose(fast_t2i.scores, exact_t2i.scores, atol=1e-5)
    # and the scores are the max-over-queries cosine
    sim = torch.einsum("iqe,te->itq", image_feats, text_feats).amax(-1).numpy()
    np.testing.assert_allclose(fast_i2t.scores[0], np.sort(sim[0])[::-1][:min(k, nt)], atol=1e-5)


def _tiny_embeddings(model, ni=12, per_image=3):
    image, ids, mask = make_batch(ni * per_image, seed=3)
    image = image[:ni]
    with torch.no_grad():
        image_feats, image_embeds = model.image_embeddings(image)
        text_feats = model.text_embeddings(ids, mask)
    txt2img = np.repeat(np.arange(ni), per_image)
    return Embeddings(image_feats, image_embeds, text_feats, ids, mask, txt2img,
                      [list(range(i * per_image, (i + 1) * per_image)) for i in range(ni)])


def test_batched_retrieval_matches_row_by_row():
    model = tiny_stage1(dropout=0.0).eval()
    emb = _tiny_embeddings(model)
    k = 5
    fast = retrieve(model, emb, k=k, batch_size=7, image_chunk=5, use_gpu=False)
    slow = retrieve_row_by_row(model, emb, k=k)
    np.testing.assert_array_equal(fast.i2t_itc.ids, slow.i2t_itc.ids)
    np.testing.assert_array_equal(fast.t2i_itc.ids, slow.t2i_itc.ids)
    np.testing.assert_array_equal(fast.i2t.ids, slow.i2t.ids)
    np.testing.assert_array_equal(fast.t2i.ids, slow.t2i.ids)
    np.testing.assert_allclose(fast.i2t.scores, slow.i2t.scores, atol=1e-4)
    np.testing.assert_allclose(fast.t2i.scores, slow.t2i.scores, atol=1e-4)
    assert metrics(fast, emb) == metrics(slow, emb)
    # pairs found by both directions are scored once
    assert fast.itm_pairs < slow.itm_pairs == 12 * k + 36 * k


def test_embeddings_validation():
    image_feats, text_feats = _feats(3, 2, 6, 8)
    with pytest.raises(ValueError, match="dimension mismatch"):
        Embeddings(image_feats, torch.zeros(3, 5, 4), text_feats[:, :4], torch.zeros(6, 4, dtype=torch.long),
                   torch.ones(6, 4, dtype=torch.long), np.zeros(6, int), [[0, 1]] * 3)
    with pytest.raises(ValueError, match="needs images and texts"):
        Embeddings(image_feats[:0], torch.zeros(0, 5, 4), text_feats, torch.zeros(6, 4, dtype=torch.long),
                   torch.ones(6, 4, dtype=torch.long), np.zeros(6, int), [])
