"""Stage-1 losses, sampling, gradients and the inference API on a tiny model (CPU)."""
import math

import pytest
import torch

from blip2.stage1 import draw_negatives, itc_loss, positive_mask
from tiny_models import make_batch, tiny_stage1


def test_itc_loss_by_hand():
    sim_i2t = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    sim_t2i = torch.tensor([[0.5, 1.5], [2.0, -1.0]])

    def row_loss(logits, target):  # cross-entropy with label smoothing 0.1, written out
        logz = math.log(sum(math.exp(v) for v in logits))
        smooth = [0.9 * (i == target) + 0.1 / len(logits) for i in range(len(logits))]
        return -sum(s * (v - logz) for s, v in zip(smooth, logits))

    i2t = (row_loss([2.0, 0.0], 0) + row_loss([1.0, 3.0], 1)) / 2
    t2i = (row_loss([0.5, 1.5], 0) + row_loss([2.0, -1.0], 1)) / 2
    got = itc_loss(sim_i2t, sim_t2i, torch.eye(2, dtype=torch.bool))
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_itc_targets_follow_image_ids():
    ids = torch.tensor([7, 7, 9])
    mask = positive_mask(3, 3, ids)
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    sim = torch.tensor([[4.0, 1.0, 0.0], [1.0, 4.0, 0.0], [0.0, 0.0, 5.0]])

    def row_loss(logits, target):  # soft target spread over the image's captions, then smoothing 0.1
        logz = math.log(sum(math.exp(v) for v in logits))
        return -sum((0.9 * t + 0.1 / 3) * (v - logz) for t, v in zip(target, logits))

    want = (row_loss([4, 1, 0], [0.5, 0.5, 0]) + row_loss([1, 4, 0], [0.5, 0.5, 0]) + row_loss([0, 0, 5], [0, 0, 1])) / 3
    assert itc_loss(sim, sim, mask).item() == pytest.approx(want, abs=1e-6)
    assert positive_mask(2, 4, None).tolist() == [[True, False, False, False], [False, True, False, False]]


def test_negatives_are_never_positives_and_rows_without_candidates_draw_nothing():
    torch.manual_seed(0)
    sim = torch.randn(4, 4)
    positives = torch.eye(4, dtype=torch.bool)
    for _ in range(50):
        rows, drawn = draw_negatives(sim, positives)
        assert rows.tolist() == [0, 1, 2, 3] and all(drawn[i] != i for i in range(4))
    rows, drawn = draw_negatives(torch.randn(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert rows.numel() == 0 and drawn.numel() == 0
    bad = torch.tensor([[float("nan"), 1.0, 2.0], [0.0, float("inf"), 1.0], [0.0, 1.0, 2.0]])
    rows, drawn = draw_negatives(bad, torch.eye(3, dtype=torch.bool))
    assert rows.tolist() == [0, 1, 2] and all(drawn[i] != i for i in range(3))


def test_hard_negatives_prefer_similar_items():
    sim = torch.tensor([[9.0, 8.0, -5.0, -5.0]] * 1)
    counts = torch.zeros(4)
    for _ in range(200):
        counts[draw_negatives(sim, torch.tensor([[True, False, False, False]]))[1]] += 1
    assert counts[1] > 190  # softmax weight of the hardest negative dominates


def test_forward_losses_and_gradients_reach_only_trainable_parameters():
    model = tiny_stage1()
    image, ids, mask = make_batch(4)
    model.train()
    assert not model.visual.training  # the frozen encoder is locked in eval mode
    out = model(image, ids, mask)
    assert out.sim_i2t.shape == (4, 4) and out.itm_pairs == 12
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert torch.isfinite(getattr(out, name)) and getattr(out, name) > 0
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_itg)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("visual."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None, f"{name} got no gradient"


def test_batch_of_one_without_a_process_group():
    model = tiny_stage1()
    image, ids, mask = make_batch(1)
    out = model(image, ids, mask)
    assert out.itm_pairs == 1  # no negative exists in a global batch of one: positives only
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_temperature_is_clamped():
    model = tiny_stage1()
    with torch.no_grad():
        model.temp.fill_(5.0)
    model(*make_batch(2))
    assert model.temp.item() == pytest.approx(0.5)


def test_negative_image_keys_values_come_from_the_cache():
    model = tiny_stage1().eval()
    image, _, _ = make_batch(3)
    embeds = model.encode_image(image)
    cache = model.qformer.image_kv(embeds)
    neg = torch.tensor([2, 0, 1])
    for got, want in zip(model.negative_image_kv(embeds, cache, neg), model.qformer.image_kv(embeds[neg])):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1], want[1])


def test_itg_starts_from_dec_whatever_the_first_token():
    model = tiny_stage1().eval()
    image, ids, mask = make_batch(2)
    embeds = model.encode_image(image)
    _, query_kv = model.query_pass(model.qformer.image_kv(embeds), 2)
    other = ids.clone()
    other[:, 0] = 4
    torch.testing.assert_close(model.itg_hidden(query_kv, ids, mask), model.itg_hidden(query_kv, other, mask))


def test_tiny_stage1_overfits_a_fixed_batch():
    model = tiny_stage1(dropout=0.0)
    image, ids, mask = make_batch(8, seed=3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.0)
    torch.manual_seed(0)
    first = None
    for _ in range(220):
        out = model(image, ids, mask)
        first = first if first is not None else out.loss.item()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.loss.item() < 0.2 * first, (first, out.loss.item())


def test_inference_api_shapes_and_consistency():
    model = tiny_stage1().eval()
    image, ids, mask = make_batch(3)
    feats, embeds = model.image_embeddings(image)
    text = model.text_embeddings(ids, mask)
    q = model.cfg.qformer
    assert feats.shape == (3, q.num_query_tokens, q.embed_dim) and text.shape == (3, q.embed_dim)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3, q.num_query_tokens))
    sim = model.itc_similarity(feats, text)
    assert sim.shape == (3, 3) and sim.abs().max() <= 1.0 + 1e-5
    scores = model.itm_scores(embeds, ids, mask)
    logits = model.itm_pass(model.qformer.image_kv(embeds), ids, mask)
    torch.testing.assert_close(scores, logits[:, 1])


@pytest.mark.parametrize("kwargs", [{}, {"top_p": 0.9}, {"num_beams": 3}])
def test_caption_generation_runs_and_respects_lengths(kwargs):
    model = tiny_stage1().eval()
    image, _, _ = make_batch(2)
    captions = model.generate_captions(image, sep_token_id=3, max_length=8, min_length=4,
                                       generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(captions) == 2
    for caption in captions:
        assert 3 <= len(caption) <= 7 and 3 not in caption and model.dec_token_id not in caption


def test_itg_loss_equals_the_full_vocabulary_computation():
    model = tiny_stage1().eval()
    image, ids, mask = make_batch(3)
    _, query_kv = model.query_pass(model.qformer.image_kv(model.encode_image(image)), 3)
    hidden = model.itg_hidden(query_kv, ids, mask)
    logits = model.itg_head(hidden, model.qformer.embeddings.word_embeddings.weight)  # every row
    labels = ids.masked_fill(mask == 0, -100)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(model.itg_loss(query_kv, ids, mask), want)


def test_string_image_ids_work_in_the_loss():
    from blip2.stage1 import image_ids_tensor

    ids = image_ids_tensor(["http://x/a.jpg", "http://x/b.jpg", "http://x/a.jpg", 7])
    assert ids.dtype == torch.long and ids[0] == ids[2] and ids[0] != ids[1] and ids[3] == 7
    model = tiny_stage1()
    image, tokens, mask = make_batch(3)
    out = model(image, tokens, mask, image_ids=image_ids_tensor(["a", "b", "a"]))
    assert torch.isfinite(out.loss)
