"""Retrieval recall on hand-built score matrices, the VQAv2 accuracy on known examples, CIDEr."""
import numpy as np
import pytest

from pipelines.metrics import (caption_scores, dense_candidates, exact_match, i2t_ranks, normalize_answer,
                               recall_metrics, t2i_ranks, vqa_accuracy)


def test_i2t_best_rank_over_five_captions_and_t2i_rank():
    # 2 images x 10 texts, texts 0-4 belong to image 0, 5-9 to image 1 (the 5-captions mapping)
    img2txt = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    txt2img = [0] * 5 + [1] * 5
    s = np.zeros((2, 10))
    s[0] = [0.1, 0.2, 0.9, 0.3, 0.0, 0.95, 0.5, 0.4, 0.35, 0.05]  # best GT text 2 (0.9): only text 5 above -> rank 1
    s[1] = [0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9, 0.65]  # best GT text 8 (0.9): rank 0
    ids, scores = dense_candidates(s)
    assert i2t_ranks(ids, scores, img2txt).tolist() == [1, 0]
    # text -> image: column scores, 10 rows of 2 images
    ids, scores = dense_candidates(s.T)
    # text 0: image 0 0.1 < image 1 0.8 -> rank 1; text 5: image 1 0.5 < image 0 0.95 -> rank 1 ...
    expected = [1, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert t2i_ranks(ids, scores, txt2img).tolist() == expected
    m = recall_metrics(np.array([1, 0]), np.array(expected))
    assert m["txt_r1"] == 50.0 and m["txt_r5"] == 100.0 and m["txt_r10"] == 100.0
    assert m["img_r1"] == 60.0 and m["img_r5"] == 100.0
    assert m["txt_r_mean"] == pytest.approx((50 + 100 + 100) / 3)
    assert m["img_r_mean"] == pytest.approx((60 + 100 + 100) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_ties_count_against_the_ground_truth():
    s = np.full((3, 3), 0.5)  # a model that scores everything equal gets no credit
    ids, scores = dense_candidates(s)
    assert i2t_ranks(ids, scores, [[0], [1], [2]]).tolist() == [2, 2, 2]
    assert t2i_ranks(ids, scores, [0, 1, 2]).tolist() == [2, 2, 2]
    # a tie between two ground-truth captions is no loss: rank 0
    ids, scores = dense_candidates(np.array([[0.7, 0.7, 0.1]]))
    assert i2t_ranks(ids, scores, [[0, 1]]).tolist() == [0]


def test_ground_truth_outside_the_candidates_ranks_k():
    ids = np.array([[3, 1]])  # k=2 candidates of image 0; its text 0 is not among them
    scores = np.array([[0.9, 0.8]])
    assert i2t_ranks(ids, scores, [[0]]).tolist() == [2]
    assert t2i_ranks(np.array([[2, 1]]), scores, [0]).tolist() == [2]


def test_recall_rejects_empty_and_bad_shapes():
    with pytest.raises(ValueError, match="no rows"):
        recall_metrics(np.array([]), np.array([0]))
    with pytest.raises(ValueError, match="ground-truth lists"):
        i2t_ranks(np.zeros((2, 3), int), np.zeros((2, 3)), [[0]])


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the red circle.", "red circle"), ("yes!", "yes"), ("1,000", "1000"), ("3.5", "3.5"),
    ("t-shirt", "t shirt"), ("dont know", "don't know"), ("A Dog ,", "dog"), ("  left\n", "left"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_known_examples():
    ten = ["2"] * 3 + ["3"] * 7
    # prediction "two" (-> "2"): leaving out one of the three "2" answers leaves 2 matches (2/3), else 3 (1.0)
    assert vqa_accuracy("two", ten) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("3", ten) == pytest.approx(1.0)
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_accuracy("The Red.", ["red"]) == 1.0  # one reference: exact match after normalisation
    assert exact_match("Left", "left") and not exact_match("right", "left")
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_cider_prefers_the_right_caption():
    refs = {"a": ["a red circle on the left", "a small red circle at the left"],
            "b": ["a blue square at the top", "a blue square near the top"],
            "c": ["a green star in the middle", "a green star in the centre"]}
    good = caption_scores(refs, {"a": "a red circle on the left", "b": "a blue square at the top",
                                 "c": "a green star in the middle"})
    bad = caption_scores(refs, {"a": "a green star in the middle", "b": "a red circle on the left",
                                "c": "a blue square at the top"})
    assert good["cider"] > 1.0 > bad["cider"]
    assert len(good["cider_per_image"]) == 3 and good["tokenizer"] in ("ptb", "simple")
    with pytest.raises(ValueError, match="no references"):
        caption_scores({"a": []}, {"a": "x"})
