"""The Q-Former tokenizer (SPEC section 1): BERT uncased plus ONE new special token `[DEC]` as bos.

Either the real bert-base-uncased vocabulary (a local dir, or a hub id when online), or, offline, a
tiny WordPiece vocabulary built from a word list (`shapes_vocabulary()` covers the synthetic shapes
world). Either way `[DEC]` is appended after the existing vocabulary: its id is the old vocabulary size
(30522 for BERT), and the Q-Former's vocab_size must be `len(tokenizer)`.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from transformers import BertTokenizer
from transformers.utils import cached_file

from blip2.utils import hub_offline, looks_like_local_path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a vocabulary built here
DEC_TOKEN = "[DEC]"
_VOCAB_FILES = ("vocab.txt", "tokenizer.json")


def build_qformer_tokenizer(path: str | None = None, vocab_words: Sequence[str] | None = None) -> BertTokenizer:
    """BERT uncased tokenizer from `path` (local dir or hub id) or from `vocab_words`, plus `[DEC]` as bos."""
    if (path is None) == (vocab_words is None):
        raise ValueError("build_qformer_tokenizer: give exactly one of path (a bert-base-uncased dir) or vocab_words")
    tokenizer = _load_bert_tokenizer(path) if path is not None else _word_list_tokenizer(vocab_words)
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def _load_bert_tokenizer(path: str) -> BertTokenizer:
    """transformers 5.x returns a 5-token tokenizer when the files are missing: check them first and after."""
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, name)) for name in _VOCAB_FILES):
            raise FileNotFoundError(f"tokenizer dir {path!r} has none of {_VOCAB_FILES} (a bert-base-uncased dir)")
        tokenizer = BertTokenizer.from_pretrained(path, do_lower_case=True)
    elif looks_like_local_path(path):
        raise FileNotFoundError(f"tokenizer path {path!r} is not a directory (expected a local bert-base-uncased "
                                "dir with vocab.txt)")
    else:
        tokenizer = _hub_bert_tokenizer(path)
    if len(tokenizer.get_vocab()) <= len(SPECIAL_TOKENS):
        raise ValueError(f"tokenizer {path!r} loaded without a vocabulary (only its special tokens)")
    return tokenizer


def _hub_bert_tokenizer(repo: str) -> BertTokenizer:
    offline = hub_offline()
    try:
        found = [cached_file(repo, name, local_files_only=offline, _raise_exceptions_for_missing_entries=False)
                 for name in _VOCAB_FILES]
        if not any(found):
            raise OSError(f"none of {_VOCAB_FILES} found")
        return BertTokenizer.from_pretrained(repo, do_lower_case=True, local_files_only=offline)
    except (OSError, ValueError) as error:
        reason = "it is not in the local hub cache and the hub is offline" if offline else f"download failed: {error}"
        raise OSError(f"BERT tokenizer {repo!r}: {reason}; put bert-base-uncased in a local dir and pass its path "
                      "(qformer.bert_weights)") from error


def _word_list_tokenizer(words: Sequence[str]) -> BertTokenizer:
    """[PAD]=0, [UNK], [CLS], [SEP], [MASK], then the words lowercased, unique and sorted."""
    specials = {token.lower() for token in (*SPECIAL_TOKENS, DEC_TOKEN)}
    cleaned = {word.strip().lower() for word in words} - specials - {""}
    bad = sorted(word for word in cleaned if any(ch.isspace() for ch in word))
    if bad:
        raise ValueError(f"vocab_words: entries must be single tokens, got {bad[:5]}")
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *sorted(cleaned)])}
    return BertTokenizer(vocab=vocab, do_lower_case=True)  # transformers 5.x: vocab=, not vocab_file=


def dec_token_id(tokenizer: BertTokenizer) -> int:
    """The id of `[DEC]` (the ITG decoder's bos, replacing [CLS])."""
    token_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id or token_id != tokenizer.bos_token_id:
        raise ValueError("tokenizer has no [DEC] bos token: build it with build_qformer_tokenizer")
    return int(token_id)


def tokenize(tokenizer: BertTokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] text [SEP], padded to the longest in the batch (at most `max_length`, truncated on the right).

    Returns input_ids (B, L) long and attention_mask (B, L) long (1 = real token).
    """
    if isinstance(texts, str):
        raise TypeError("tokenize: texts must be a sequence of strings, not one string")
    batch = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    input_ids = batch["input_ids"].long()  # (B, L)
    attention_mask = batch["attention_mask"].long()  # (B, L)
    return input_ids, attention_mask


# ------------------------------------------------------------------------------------ shapes world
_COLOURS = "red green blue yellow purple orange white black violet"
_SHAPES = ("circle square triangle star hexagon diamond cross rhombus disc disk circles squares triangles stars "
           "hexagons diamonds crosses rhombuses discs disks")
_NOUNS = "shape shapes object objects thing things item items figure figures form forms"
_SIZES = "small large big little tiny huge"
_PLACES = ("left right top bottom centre center middle above below over under beneath underneath of to the a an "
           "and on in at near side corner edge part hand half area region portion towards toward also another some "
           "it is are which that located placed positioned sitting sits lies lying drawn shown appears seen standing")
_NUMBERS = "zero one two three four five six seven eight nine ten"
_FRAMING = ("photo image picture drawing showing shows there we can see this contains frame canvas scene view "
            "with")
_QUESTIONS = "what color colour where how many which does have you shape answer question short"
_SPAM = ("best deals watches free shipping click here download wallpaper img jpg dsc stock royalty buy now limited "
         "time offer off untitled design screenshot follow us instagram for more cheap flights paris rome wedding "
         "photography packages vintage poster print vector background pattern product")
_PUNCTUATION = ", . ? ! : ; - _ % ' \" ( ) / & # * ~"
_DIGITS = " ".join(f"{d} ##{d}" for d in range(10))  # any number, e.g. "2019" -> 2 ##0 ##1 ##9


def shapes_vocabulary() -> list[str]:
    """Every word the shapes world's captions, noisy alt-texts and questions can produce (and the
    synonyms its caption checker accepts), punctuation, and digits with WordPiece continuations.

    Kept here as constants because blip2/ may not import pipelines/ (see pipelines/shapes/captions.py,
    questions.py and checker.py).
    """
    groups = (_COLOURS, _SHAPES, _NOUNS, _SIZES, _PLACES, _NUMBERS, _FRAMING, _QUESTIONS, _SPAM, _PUNCTUATION, _DIGITS)
    return sorted({word for group in groups for word in group.split()})
