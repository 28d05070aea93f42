"""Our Q-Former forward against transformers' Blip2QFormerModel on the same weights, and its masks."""
import dataclasses

import pytest
import torch

from blip2.config import tiny_qformer
from blip2.qformer import QFormer, itg_mask, padding_mask

WIDTH = 24  # image token width C
Q = 4


@pytest.fixture(scope="module")
def qformer():
    torch.manual_seed(0)
    model = QFormer(tiny_qformer(), encoder_width=WIDTH).eval()
    with torch.no_grad():  # no bias or norm at its trivial init, so a mixed-up weight would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(batch=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, Q, 32, generator=g)
    ids = torch.randint(5, 120, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 2:] = 0  # one padded row
    ids[0, length - 2:] = 0
    image = torch.randn(batch, 9, WIDTH, generator=g)
    return query, ids, mask, image


def hf_forward(model, query, ids, mask, image, attention_mask):
    """transformers' own forward: text embeddings (+ queries), then Blip2QFormerModel."""
    embeds = model.embeddings(input_ids=ids, query_embeds=query) if ids is not None else query
    out = model.qformer(query_embeds=embeds, query_length=query.shape[1] if query is not None else 0,
                        attention_mask=attention_mask, encoder_hidden_states=image)
    return out.last_hidden_state


@torch.no_grad()
def test_itm_pass_matches_transformers(qformer):
    query, ids, mask, image = inputs()
    full_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1)
    ours, _ = qformer(qformer.embed(query, ids), Q, padding_mask(full_mask), image_kv=qformer.image_kv(image))
    theirs = hf_forward(qformer, query, ids, mask, image, full_mask)
    assert ours.shape == (3, Q + 7, 32)
    torch.testing.assert_close(ours[:, :Q], theirs[:, :Q], atol=1e-5, rtol=1e-5)
    valid = full_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_query_and_text_passes_match_transformers(qformer):
    query, ids, mask, image = inputs()
    ours, _ = qformer(qformer.embed(query, None), Q, image_kv=qformer.image_kv(image))
    torch.testing.assert_close(ours, hf_forward(qformer, query, None, None, image, None), atol=1e-5, rtol=1e-5)
    ours_text, _ = qformer(qformer.embed(None, ids), 0, padding_mask(mask))
    embeds = qformer.embeddings(input_ids=ids)
    theirs = qformer.qformer(query_embeds=embeds, query_length=0, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours_text[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_itg_with_cached_query_keys_equals_one_pass_with_the_unilm_mask(qformer):
    query, ids, mask, image = inputs()
    kv = qformer.image_kv(image)
    _, query_kv = qformer(qformer.embed(query, None), Q, image_kv=kv, return_kv=True)
    ours, _ = qformer(qformer.embed(None, ids), 0, itg_mask(Q, mask), prefix_kv=query_kv)
    # the same thing in transformers as one pass over [queries; text] with a 4D UniLM mask
    unilm = torch.zeros(3, 1, Q + 7, Q + 7, dtype=torch.bool)
    unilm[:, :, :Q, :Q] = True
    unilm[:, :, Q:, :] = itg_mask(Q, mask)
    theirs = hf_forward(qformer, query, ids, mask, image, unilm)[:, Q:]
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_itg_text_never_sees_later_tokens(qformer):
    query, ids, mask, image = inputs()
    _, query_kv = qformer(qformer.embed(query, None), Q, image_kv=qformer.image_kv(image), return_kv=True)
    run = lambda x: qformer(qformer.embed(None, x), 0, itg_mask(Q, mask), prefix_kv=query_kv)[0]  # noqa: E731
    changed = ids.clone()
    changed[:, 4] = 7  # change token 4
    before, after = run(ids), run(changed)
    torch.testing.assert_close(before[:, :4], after[:, :4])  # earlier positions unchanged
    assert not torch.allclose(before[1:, 4:], after[1:, 4:])  # later ones do change


@torch.no_grad()
def test_unilm_query_rows_ignore_the_text_and_itm_rows_do_not(qformer):
    query, ids, mask, image = inputs()
    other = ids.clone()
    other[:, 1:] = torch.randint(5, 120, other[:, 1:].shape)
    unilm = torch.zeros(3, 1, Q + 7, Q + 7, dtype=torch.bool)
    unilm[:, :, :Q, :Q] = True
    unilm[:, :, Q:, :] = itg_mask(Q, mask)
    a, b = (hf_forward(qformer, query, x, mask, image, unilm)[:, :Q] for x in (ids, other))
    torch.testing.assert_close(a, b)
    full = padding_mask(torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1))
    kv = qformer.image_kv(image)
    a, b = (qformer(qformer.embed(query, x), Q, full, image_kv=kv)[0][:, :Q] for x in (ids, other))
    assert not torch.allclose(a, b)  # ITM: queries and text see each other


@torch.no_grad()
def test_padding_is_invisible(qformer):
    query, ids, mask, image = inputs()
    other = ids.clone()
    other[0, -2:] = 99  # change only the padded positions of row 0
    full = padding_mask(torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1))
    kv = qformer.image_kv(image)
    a, b = (qformer(qformer.embed(query, x), Q, full, image_kv=kv)[0][0, :Q + 5] for x in (ids, other))
    torch.testing.assert_close(a, b)


def test_query_ffn_starts_as_a_copy_of_the_text_ffn():
    model = QFormer(dataclasses.replace(tiny_qformer(), layers=2), encoder_width=WIDTH)
    for layer in model.layers:
        assert torch.equal(layer.intermediate.dense.weight, layer.intermediate_query.dense.weight)
        assert torch.equal(layer.output.dense.weight, layer.output_query.dense.weight)
    assert [layer.has_cross_attention for layer in model.layers] == [True, False]


@torch.no_grad()
def test_last_rows_prunes_the_last_layer_without_changing_those_rows(qformer):
    query, ids, mask, image = inputs()
    full_mask = padding_mask(torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1))
    kv = qformer.image_kv(image)
    hidden = qformer.embed(query, ids)
    full, _ = qformer(hidden, Q, full_mask, image_kv=kv)
    pruned, _ = qformer(hidden, Q, full_mask, image_kv=kv, last_rows=Q)
    assert pruned.shape == (3, Q, 32)
    torch.testing.assert_close(pruned, full[:, :Q])
    text = qformer.embed(None, ids)
    full_text, _ = qformer(text, 0, padding_mask(mask))
    cls, _ = qformer(text, 0, padding_mask(mask), last_rows=1)
    torch.testing.assert_close(cls, full_text[:, :1])


def test_fast_dropout_keeps_the_expectation():
    from blip2.qformer import Dropout, dropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    out = dropout(x, 0.1, True)
    assert abs((out == 0).float().mean().item() - 0.1) < 0.005
    assert abs(out.mean().item() - 1.0) < 0.01 and out.max().item() == pytest.approx(1 / 0.9)
    assert dropout(x, 0.1, False) is x
    model = QFormer(tiny_qformer(), encoder_width=WIDTH)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert any(isinstance(m, Dropout) for m in model.modules())


def test_shared_image_kv_paths_agree_with_per_row_keys():
    """Retrieval's shared image keys/values: the per-image blocks (CPU) and the gathered single call (GPU) both
    equal plain attention against each row's own copy of its image's keys/values."""
    from blip2.qformer import SharedImageKV, attend_shared_blocks, attend_shared_gathered

    g = torch.Generator().manual_seed(3)
    counts = [3, 1, 4]
    q = torch.randn(sum(counts), 2, 5, 8, generator=g)
    key, value = torch.randn(3, 2, 7, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g)
    rows = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
    expected = torch.nn.functional.scaled_dot_product_attention(q, key[rows], value[rows])
    kv = SharedImageKV(key, value, counts)
    torch.testing.assert_close(attend_shared_blocks(q, kv), expected)
    torch.testing.assert_close(attend_shared_gathered(q, kv), expected)
