"""Caption text helpers (no torch): SPEC's caption cleaning and the left/right swap for flipped images."""
from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s+")
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def clean_caption(text: str, max_words: int = 50) -> str:
    """Lowercase, punctuation `.!"()*#:;~` -> space, collapse whitespace, keep the first `max_words`."""
    text = _PUNCTUATION.sub(" ", text.lower())
    words = _SPACES.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words])


def swap_left_right(text: str) -> str:
    """Swap the words left and right (whole words only), e.g. for a horizontally flipped image."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other
    return _LEFT_RIGHT.sub(swap, text)
