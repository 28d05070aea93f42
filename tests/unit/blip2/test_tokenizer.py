"""The Q-Former tokenizer: [DEC] appended as bos, padding, lowercase, the shapes-world vocabulary."""
import time

import numpy as np
import pytest
import torch

from blip2.tokenizer import (DEC_TOKEN, SPECIAL_TOKENS, build_qformer_tokenizer, dec_token_id, shapes_vocabulary,
                             tokenize)

SHAPES_CAPTIONS = [  # one per caption style of pipelines/shapes/captions.py, plus a question and an alt-text
    "a photo of a large red circle on the left side, a little blue hexagon and an orange star",
    "three objects: a big purple diamond at the top, a white cross in the centre and a black square",
    "a small yellow triangle to the left of a green star. there is also a red diamond near the bottom",
    "where in the image is the orange hexagon?",
    "IMG_4821.JPG buy now limited time offer 50% off screenshot 2019-03-14 at 10.22.51",
]


@pytest.fixture(scope="module")
def shapes_tokenizer():
    return build_qformer_tokenizer(vocab_words=shapes_vocabulary())


def test_small_vocabulary_layout_and_dec():
    tokenizer = build_qformer_tokenizer(vocab_words=["Red", "circle", "red", " blue "])
    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert [vocab[word] for word in ("blue", "circle", "red")] == [5, 6, 7]  # lowercased, unique, sorted
    assert dec_token_id(tokenizer) == 8 == tokenizer.bos_token_id == len(tokenizer) - 1
    assert tokenizer.bos_token == DEC_TOKEN
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 2, 3)


def test_dec_id_is_the_old_vocabulary_size(shapes_tokenizer):
    words = shapes_vocabulary()
    assert dec_token_id(shapes_tokenizer) == len(set(words)) + len(SPECIAL_TOKENS) == len(shapes_tokenizer) - 1


def test_tokenize_pads_to_the_longest_and_lowercases(shapes_tokenizer):
    ids, mask = tokenize(shapes_tokenizer, ["A RED Circle", "blue star and a green cross"], max_length=32)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (2, 8)  # [CLS] 6 words [SEP]
    assert (ids[:, 0] == shapes_tokenizer.cls_token_id).all()
    assert mask[0].tolist() == [1] * 5 + [0] * 3 and mask[1].tolist() == [1] * 8
    assert (ids[0, 5:] == shapes_tokenizer.pad_token_id).all() and ids[0, 4] == shapes_tokenizer.sep_token_id
    assert shapes_tokenizer.convert_ids_to_tokens(ids[0, 1:4].tolist()) == ["a", "red", "circle"]


def test_tokenize_truncates_at_max_length(shapes_tokenizer):
    ids, mask = tokenize(shapes_tokenizer, [" ".join(["red"] * 50), "red"], max_length=10)
    assert ids.shape == (2, 10) and ids[0, -1] == shapes_tokenizer.sep_token_id and mask[0].all()


def test_shapes_captions_have_no_unknown_words(shapes_tokenizer):
    ids, mask = tokenize(shapes_tokenizer, SHAPES_CAPTIONS, max_length=64)
    assert mask.sum(1).max() < 64, "nothing truncated"
    assert not (ids == shapes_tokenizer.unk_token_id).any()


def test_generated_shapes_texts_have_no_unknown_words(shapes_tokenizer):
    """Every caption style, noise kind and question of the real generator (a test may import pipelines)."""
    captions = pytest.importorskip("pipelines.shapes.captions")
    questions = pytest.importorskip("pipelines.shapes.questions")
    scene_module = pytest.importorskip("pipelines.shapes.scene")
    rng = np.random.default_rng(0)
    texts = []
    for _ in range(200):
        scene = scene_module.sample_scene(rng)
        texts.append(captions.caption_for(scene, rng))
        texts += [captions.noisy_caption(scene, rng, kind) for kind in captions.NOISE_KINDS]
        texts += [q["question"] + " " + q["answer"] for q in questions.questions_for(scene, rng)]
    ids, _ = tokenize(shapes_tokenizer, texts, max_length=128)
    unknown = [text for text, row in zip(texts, ids) if (row == shapes_tokenizer.unk_token_id).any()]
    assert not unknown, unknown[:5]


def test_local_bert_dir(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, "red", "circle", "##s"]) + "\n")
    tokenizer = build_qformer_tokenizer(str(tmp_path))
    assert dec_token_id(tokenizer) == 8
    ids, _ = tokenize(tokenizer, ["Red circles"], max_length=8)
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ["[CLS]", "red", "circle", "##s", "[SEP]"]


def test_local_dir_without_vocabulary_is_refused(tmp_path):
    """transformers 5.x would silently build a tokenizer of only the 5 special tokens."""
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        build_qformer_tokenizer(str(tmp_path))


def test_offline_hub_id_fails_at_once_and_bad_arguments():
    start = time.perf_counter()
    with pytest.raises(OSError, match="bert-base-uncased.*offline.*local dir"):
        build_qformer_tokenizer("bert-base-uncased")
    assert time.perf_counter() - start < 5
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_qformer_tokenizer("/no/such/bert")
    with pytest.raises(ValueError, match="exactly one"):
        build_qformer_tokenizer()
    with pytest.raises(ValueError, match="single tokens"):
        build_qformer_tokenizer(vocab_words=["red circle"])
