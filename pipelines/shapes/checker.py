"""Check a caption (any text, also a trained model's output) against a shapes-world scene.

The parser is a small left-to-right pass over lower-cased word tokens (punctuation ignored):

* a *mention* is a shape noun ("circle", "squares", ...) or a generic noun ("shape", "object", ...)
  with the colour / size / position / number words directly in front of it ("two large red circles");
* after the noun, a *position phrase* ("on the left", "at the top of the image", "in the centre",
  "on the right side") states where that object is;
* a *relation phrase* ("to the left of", "right of", "above", "below", "on top of", ...) between a
  mention and the next one states how the two are placed.

Unknown words are skipped. A mention can refer to several scene objects (e.g. "the circle" when there
are two circles); a stated fact then holds if it is true for at least one of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipelines.data.text import swap_left_right  # noqa: F401 (part of the checker API)
from pipelines.shapes.scene import COLORS, POSITIONS, SHAPES, Obj, Scene, above, left_of

_SHAPE_NOUNS: dict[str, str] = {s: s for s in SHAPES}
_SHAPE_NOUNS.update({s + ("es" if s.endswith("s") else "s"): s for s in SHAPES})
_SHAPE_NOUNS.update({"rhombus": "diamond", "rhombuses": "diamond", "disc": "circle", "discs": "circle",
                     "disk": "circle", "disks": "circle", "hexagons": "hexagon"})
_GENERIC_NOUNS = frozenset({"shape", "shapes", "object", "objects", "thing", "things", "item", "items",
                            "figure", "figures", "form", "forms"})
_COLOR_WORDS: dict[str, str] = {c: c for c in COLORS} | {"violet": "purple"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small",
               "large": "large", "big": "large", "huge": "large"}
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                   "centre": "centre", "center": "centre", "middle": "centre"}
_NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                        "eight", "nine", "ten"))} | {str(i): i for i in range(10)}
_DETERMINERS = frozenset({"a", "an", "the", "another", "some"})
_FILLERS = frozenset({"is", "are", "which", "that", "located", "placed", "positioned", "sitting", "sits",
                      "lies", "lying", "drawn", "shown", "appears", "seen", "standing", "also", "it"})
_PREPOSITIONS = frozenset({"on", "at", "in", "near", "towards", "toward", "to"})
_SIDE_WORDS = frozenset({"side", "edge", "corner", "part", "hand", "half", "area", "region", "portion"})
_FRAME_NOUNS = frozenset({"image", "picture", "photo", "frame", "canvas", "scene", "view"})
_RELATION_WORDS = {"above": "above", "over": "above", "below": "below", "under": "below",
                   "beneath": "below", "underneath": "below"}
_RELATION_OF = {"left": "left_of", "right": "right_of", "top": "above", "bottom": "below"}


@dataclass(frozen=True)
class Verdict:
    """Result of `check_caption`. Equality compares the judgement only, not the wording of `reasons`."""

    consistent: bool
    complete: bool
    reasons: tuple[str, ...] = field(default=(), compare=False)

    @property
    def correct(self) -> bool:
        return self.consistent and self.complete


@dataclass
class Mention:
    """One noun phrase of the caption and the facts it states about its referent."""

    text: str
    shape: str | None
    colors: frozenset[str]
    sizes: frozenset[str]
    positions: tuple[str, ...] = ()
    number: int | None = None

    def states_anything(self) -> bool:
        return bool(self.shape or self.colors or self.sizes or self.positions or self.number is not None)


@dataclass
class Parse:
    mentions: list[Mention]
    relations: list[tuple[int, str, int]]  # (index of mention a, relation, index of mention b)


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric words; everything else (punctuation, symbols) separates words."""
    return re.findall(r"[a-z0-9]+", str(text).lower())


def _is_noun(token: str) -> bool:
    return token in _SHAPE_NOUNS or token in _GENERIC_NOUNS


def _is_modifier(token: str) -> bool:
    return token in _COLOR_WORDS or token in _SIZE_WORDS or token in _POSITION_WORDS


def _mention_at(tokens: list[str], noun: int, floor: int) -> tuple[int, Mention]:
    """The mention whose noun is tokens[noun], with its modifiers back to (not before) `floor`."""
    start = noun
    while start - 1 >= floor and _is_modifier(tokens[start - 1]):
        start -= 1
    number = None
    if start - 1 >= floor and tokens[start - 1] in _NUMBERS:
        start -= 1
        number = _NUMBERS[tokens[start]]
    words = tokens[start:noun]
    return start, Mention(
        text=" ".join(tokens[start:noun + 1]),
        shape=_SHAPE_NOUNS.get(tokens[noun]),
        colors=frozenset(_COLOR_WORDS[w] for w in words if w in _COLOR_WORDS),
        sizes=frozenset(_SIZE_WORDS[w] for w in words if w in _SIZE_WORDS),
        positions=tuple(_POSITION_WORDS[w] for w in words if w in _POSITION_WORDS),
        number=number,
    )


def _skip(tokens: list[str], i: int, words: frozenset[str]) -> int:
    while i < len(tokens) and tokens[i] in words:
        i += 1
    return i


def _starts_mention(tokens: list[str], i: int) -> bool:
    """True iff a noun phrase begins at i (modifiers/number words followed by a noun)."""
    while i < len(tokens) and (_is_modifier(tokens[i]) or tokens[i] in _NUMBERS):
        i += 1
    return i < len(tokens) and _is_noun(tokens[i])


def _phrase_after(tokens: list[str], i: int) -> tuple[int, tuple[str, ...], str | None]:
    """Parse one position or relation phrase at i: (end, position words, relation or None).

    Returns (i, (), None) when there is none. A relation's end is where its second mention may begin.
    """
    j = _skip(tokens, i, _FILLERS)
    if j < len(tokens) and tokens[j] in _RELATION_WORDS:
        return j + 1, (), _RELATION_WORDS[tokens[j]]
    k = j
    has_prep = k < len(tokens) and tokens[k] in _PREPOSITIONS
    if has_prep:
        k = _skip(tokens, k + 1, _DETERMINERS)
    words = []
    while k < len(tokens) and tokens[k] in _POSITION_WORDS:
        words.append(_POSITION_WORDS[tokens[k]])
        k += 1
    k = _skip(tokens, k, _SIDE_WORDS)
    if not words:
        return i, (), None
    if k < len(tokens) and tokens[k] == "of":
        after = _skip(tokens, k + 1, _DETERMINERS)
        if _starts_mention(tokens, after):
            return k + 1, (), _RELATION_OF.get(words[-1], "none")
        if after < len(tokens) and tokens[after] in _FRAME_NOUNS:
            return after + 1, tuple(words), None
        return k + 1, tuple(words), None
    if not has_prep:
        return i, (), None
    return k, tuple(words), None


def parse_caption(caption: str) -> Parse:
    """All mentions and relations of a caption, left to right."""
    tokens = tokenize(caption)
    mentions: list[Mention] = []
    relations: list[tuple[int, str, int]] = []
    pending: tuple[int, str, int] | None = None  # (mention index, relation, token where b must start)
    i, floor = 0, 0
    while i < len(tokens):
        if not _is_noun(tokens[i]):
            i += 1
            continue
        start, mention = _mention_at(tokens, i, floor)
        if pending is not None and start == pending[2]:
            relations.append((pending[0], pending[1], len(mentions)))
        pending = None
        end = i + 1
        for _ in range(3):  # e.g. "on the left", then "to the left of ..."
            new_end, words, relation = _phrase_after(tokens, end)
            if new_end == end:
                break
            mention.positions += words
            end = new_end
            if relation is not None:
                if relation != "none":
                    pending = (len(mentions), relation, _skip(tokens, end, _DETERMINERS))
                break
        mentions.append(mention)
        i = floor = end
    return Parse(mentions=mentions, relations=relations)


def position_holds(word: str, position: str) -> bool:
    """Whether a position word ('left', 'top', 'centre', ...) describes a nominal position."""
    x, y = POSITIONS[position]
    return {"left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6,
            "centre": 0.4 <= x <= 0.6 and 0.4 <= y <= 0.6}[word]


def _relation_holds(relation: str, a: Obj, b: Obj) -> bool:
    return {"left_of": left_of(a, b), "right_of": left_of(b, a),
            "above": above(a, b), "below": above(b, a)}[relation]


def _referents(mention: Mention, scene: Scene) -> list[Obj]:
    """Scene objects that fit the mention's shape, colour, size and position words."""
    return [o for o in scene.objects
            if (mention.shape is None or o.shape == mention.shape)
            and all(c == o.color for c in mention.colors)
            and all(s == o.size for s in mention.sizes)
            and all(position_holds(p, o.position) for p in mention.positions)]


def _mention_reason(mention: Mention, scene: Scene) -> str | None:
    """Why a mention is false in the scene, or None if it is true (or states nothing)."""
    if not mention.states_anything():
        return None
    if mention.number is not None:
        unplaced = Mention(mention.text, mention.shape, mention.colors, mention.sizes)
        found = len(_referents(unplaced, scene))
        if found != mention.number:
            return f"{mention.text!r}: says {mention.number}, the scene has {found}"
    if not _referents(mention, scene):
        where = f" {' '.join(mention.positions)}" if mention.positions else ""
        return f"{mention.text!r}{where}: no such object in the scene"
    return None


def _relation_reason(parse: Parse, rel: tuple[int, str, int], scene: Scene) -> str | None:
    a_mention, relation, b_mention = parse.mentions[rel[0]], rel[1], parse.mentions[rel[2]]
    a_objs, b_objs = _referents(a_mention, scene), _referents(b_mention, scene)
    if not a_objs or not b_objs:
        return None  # already reported as a missing object
    if any(_relation_holds(relation, a, b) for a in a_objs for b in b_objs if a is not b):
        return None
    return f"{a_mention.text!r} {relation.replace('_', ' ')} {b_mention.text!r}: false in the scene"


def _is_named(obj: Obj, parse: Parse) -> bool:
    return any(m.shape == obj.shape and m.colors == {obj.color} for m in parse.mentions)


def check_caption(caption: str, scene: Scene) -> Verdict:
    """Judge a caption: consistent (no stated fact is false) and complete (every object named by colour+shape)."""
    parse = parse_caption(caption)
    false_facts = [r for r in (_mention_reason(m, scene) for m in parse.mentions) if r]
    false_facts += [r for r in (_relation_reason(parse, rel, scene) for rel in parse.relations) if r]
    missing = [f"{o.color} {o.shape} not mentioned" for o in scene.objects if not _is_named(o, parse)]
    return Verdict(consistent=not false_facts, complete=not missing, reasons=tuple(false_facts + missing))


@dataclass(frozen=True)
class FactCounts:
    """Partial credit for one caption: how many scene objects it names by colour + shape, and how many of its
    mentions state only true facts (sums over captions give `object_recall` and `mention_precision`)."""

    objects: int
    named: int
    mentions: int
    true_mentions: int


def count_facts(caption: str, scene: Scene) -> FactCounts:
    """Per-object counts behind `check_caption`'s halves: complete = every object named; a false mention makes a
    caption inconsistent (relations are judged by `check_caption` only)."""
    parse = parse_caption(caption)
    stating = [m for m in parse.mentions if m.states_anything()]
    return FactCounts(objects=len(scene.objects), named=sum(_is_named(o, parse) for o in scene.objects),
                      mentions=len(stating), true_mentions=sum(_mention_reason(m, scene) is None for m in stating))
