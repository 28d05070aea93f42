"""Evaluation metrics: retrieval recall from ranked candidates (SPEC section 7), the VQAv2 accuracy, CIDEr.

Ranks are 0-based and pessimistic about ties: a ground truth ties with a wrong item -> the wrong item counts
as ranked above it (a model that scores everything equal gets no credit). Items that are not among a row's
candidates score -inf, i.e. below every candidate.
"""
from __future__ import annotations

import re
import shutil
from typing import Mapping, Sequence

import numpy as np

RECALL_AT = (1, 5, 10)


# ------------------------------------------------------------------------------------------------ retrieval
def _check_candidates(candidates: np.ndarray, scores: np.ndarray, what: str) -> None:
    if candidates.shape != scores.shape or candidates.ndim != 2:
        raise ValueError(f"{what}: candidates {candidates.shape} and scores {scores.shape} must be equal 2-D shapes")


def i2t_ranks(candidates: np.ndarray, scores: np.ndarray, img2txt: Sequence[Sequence[int]]) -> np.ndarray:
    """Image -> text: per image, the best rank among ALL its ground-truth texts. candidates/scores (Ni, k): the
    text ids each image's row scored and their scores. A row with no ground truth among its candidates gets
    rank k (outside every recall@K with K <= k)."""
    _check_candidates(candidates, scores, "i2t")
    if len(img2txt) != candidates.shape[0]:
        raise ValueError(f"i2t: {len(img2txt)} ground-truth lists for {candidates.shape[0]} image rows")
    ranks = np.empty(candidates.shape[0], dtype=np.int64)
    for i, (row_ids, row_scores) in enumerate(zip(candidates, scores)):
        truth = np.isin(row_ids, np.asarray(img2txt[i], dtype=row_ids.dtype))
        ranks[i] = candidates.shape[1] if not truth.any() else int((row_scores[~truth] >= row_scores[truth].max()).sum())
    return ranks


def t2i_ranks(candidates: np.ndarray, scores: np.ndarray, txt2img: Sequence[int]) -> np.ndarray:
    """Text -> image: per text, the rank of its one image among the row's candidates (rank k when absent)."""
    _check_candidates(candidates, scores, "t2i")
    txt2img = np.asarray(txt2img)
    if txt2img.shape[0] != candidates.shape[0]:
        raise ValueError(f"t2i: {txt2img.shape[0]} ground-truth images for {candidates.shape[0]} text rows")
    truth = candidates == txt2img[:, None]
    found = truth.any(axis=1)
    best = np.where(truth, scores, -np.inf).max(axis=1)
    ahead = ((scores >= best[:, None]) & ~truth).sum(axis=1)
    return np.where(found, ahead, candidates.shape[1]).astype(np.int64)


def dense_candidates(score_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A full (rows, cols) score matrix as candidates: every column of every row."""
    score_matrix = np.asarray(score_matrix, dtype=np.float64)
    ids = np.broadcast_to(np.arange(score_matrix.shape[1]), score_matrix.shape)
    return np.ascontiguousarray(ids), score_matrix


def recall_metrics(txt_ranks: np.ndarray, img_ranks: np.ndarray) -> dict[str, float]:
    """txt_r1/5/10 (image -> text), img_r1/5/10 (text -> image), their means and r_mean, in percent."""
    out = {}
    for prefix, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        if len(ranks) == 0:
            raise ValueError(f"{prefix}: no rows to compute recall over")
        for k in RECALL_AT:
            out[f"{prefix}_r{k}"] = 100.0 * float(np.mean(np.asarray(ranks) < k))
        out[f"{prefix}_r_mean"] = float(np.mean([out[f"{prefix}_r{k}"] for k in RECALL_AT]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# ------------------------------------------------------------------------------------------------ VQA
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "didnt": "didn't", "hasnt": "hasn't",
                 "havent": "haven't", "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're",
                 "whats": "what's", "thats": "that's", "theres": "there's", "its": "it's", "lets": "let's"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                  "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$:'")
_DIGIT_COMMA = re.compile(r"(\d),(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(answer: str) -> str:
    """VQAv2's answer normalisation: lower case; commas inside numbers and periods outside numbers dropped;
    other punctuation dropped when it touches a space, else it splits the word; number words -> digits;
    articles dropped; common contractions restored ("dont" -> "don't")."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub(r"\1\2", text)
    for mark in _PUNCTUATION - {"'"}:
        if mark in text:
            touches_space = (mark + " ") in text or (" " + mark) in text
            text = text.replace(mark, "" if touches_space else " ")
    text = _LONE_PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against its human answers (10 on VQAv2): for every answer left out in
    turn, min(#other answers equal to the prediction / 3, 1), averaged over the leave-one-out subsets."""
    if not answers:
        raise ValueError("vqa_accuracy: no ground-truth answers")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(a) == predicted for a in answers]
    if len(answers) == 1:
        return float(matches[0])  # one reference answer (the shapes world): exact match after normalisation
    total = sum(matches)
    return float(np.mean([min((total - m) / 3.0, 1.0) for m in matches]))


def exact_match(prediction: str, answer: str) -> bool:
    """The shapes world's VQA score: equal after VQAv2 normalisation."""
    return normalize_answer(prediction) == normalize_answer(answer)


# ------------------------------------------------------------------------------------------------ captions
def java_available() -> bool:
    return shutil.which("java") is not None


def _simple_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Lower case, punctuation removed: the fallback when Java (for the PTB tokenizer) is absent."""
    clean = lambda text: " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())  # noqa: E731
    return {key: [clean(c) for c in values] for key, values in captions.items()}


def caption_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                   spice: bool = False) -> dict[str, object]:
    """CIDEr (CIDEr-D, the COCO caption evaluation package) of one prediction per image against its references.
    Tokenised by the package's PTB tokenizer when Java is present, else by a lower-case/punctuation splitter
    (recorded under "tokenizer"). SPICE only when asked, Java is present and its Stanford models are installed."""
    from pycocoevalcap.cider.cider import Cider

    keys = sorted(predictions)
    missing = [k for k in keys if not references.get(k)]
    if not keys or missing:
        raise ValueError(f"caption_scores: {len(keys)} predictions; no references for {missing[:5]}")
    refs = {k: list(references[k]) for k in keys}
    preds = {k: [predictions[k]] for k in keys}
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        wrap = lambda d: {k: [{"caption": c} for c in v] for k, v in d.items()}  # noqa: E731
        refs_tok, preds_tok, tokenizer_name = tokenizer.tokenize(wrap(refs)), tokenizer.tokenize(wrap(preds)), "ptb"
    else:
        refs_tok, preds_tok, tokenizer_name = _simple_tokenize(refs), _simple_tokenize(preds), "simple"
    cider, per_image = Cider().compute_score(refs_tok, preds_tok)
    out: dict[str, object] = {"cider": float(cider), "cider_per_image": [float(x) for x in per_image],
                              "tokenizer": tokenizer_name, "spice": None}
    if spice:
        out["spice"], out["spice_note"] = _spice(refs_tok, preds_tok)
    return out


def _spice(refs: dict, preds: dict) -> tuple[float | None, str]:
    if not java_available():
        return None, "skipped: no Java"
    try:
        from pycocoevalcap.spice.spice import Spice

        score, _ = Spice().compute_score(refs, preds)
        return float(score), "ok"
    except Exception as error:  # SPICE fetches Stanford CoreNLP models on first use: offline that fails
        return None, f"skipped: {type(error).__name__}: {error}"[:300]
