"""Captions for shapes-world scenes: true ("clean") captions in several styles, and noisy web-style ones.

A clean caption names every object with its colour and shape; sizes, positions and relations are
optional but always true. Spatial words are only "left", "right", "above", "below", "top", "bottom" and
"centre"/"center"/"middle", so a horizontally flipped image is described by swapping left <-> right.
Noisy captions (the web split's alt-text) are each false or incomplete in one known way.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from pipelines.shapes.scene import COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene, above, left_of, x_order, y_order

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")

STYLES = ("plain", "list", "photo", "there_is", "count", "relation")

NOISE_KINDS = ("wrong_attribute", "partial", "spam")

SPAM = (
    "best deals on watches free shipping",
    "click here to download wallpaper",
    "IMG_{n}.JPG",
    "DSC{n}",
    "stock photo royalty free",
    "buy now limited time offer 50% off",
    "untitled design {n}",
    "screenshot 2019-03-14 at 10.22.51",
    "follow us on instagram for more",
    "cheap flights to paris and rome",
    "wedding photography packages 2021",
    "vintage poster print a4",
    "free vector background pattern",
    "product image {n} of 8",
)


def _pick(rng: np.random.Generator | None, options: Sequence[str]) -> str:
    """options[0] without an rng (canonical form), else a random option."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def with_article(phrase: str) -> str:
    """'a red circle', 'an orange star'."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def join_and(parts: Sequence[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(obj: Obj, with_size: bool = False, with_position: bool = False,
             rng: np.random.Generator | None = None) -> str:
    """A noun phrase without article, e.g. 'large red circle on the left' (paraphrased when rng given)."""
    words = [_pick(rng, SIZE_WORDS[obj.size])] if with_size else []
    text = " ".join(words + [obj.color, obj.shape])
    if with_position:
        text += " " + _pick(rng, POSITION_PHRASES[obj.position])
    return text


def _phrases(objects: Sequence[Obj], rng, sizes: bool, positions: bool, article: bool = True) -> str:
    parts = [describe(o, sizes, positions, rng) for o in objects]
    return join_and([with_article(p) for p in parts] if article else parts)


def reading_order(objects: Sequence[Obj]) -> list[Obj]:
    """The objects top to bottom, then left to right (their positions' nominal coordinates)."""
    return sorted(objects, key=lambda o: (y_order(o.position), x_order(o.position)))


def _arranged(scene: Scene, rng: np.random.Generator, ordered: bool) -> list[Obj]:
    """The scene's objects in reading order, or shuffled."""
    if ordered:
        return reading_order(scene.objects)
    return [scene.objects[i] for i in rng.permutation(len(scene.objects))]


def _style_plain(scene: Scene, rng, sizes: bool, positions: bool, ordered: bool) -> str:
    return _phrases(_arranged(scene, rng, ordered), rng, sizes, positions)


def _style_list(scene: Scene, rng, sizes: bool, positions: bool, ordered: bool) -> str:
    return _phrases(_arranged(scene, rng, ordered), rng, sizes, positions, article=False)


def _style_photo(scene: Scene, rng, sizes: bool, positions: bool, ordered: bool) -> str:
    prefix = _pick(rng, ("a photo of", "an image of", "a picture of", "a picture showing", "a drawing of"))
    return f"{prefix} {_phrases(_arranged(scene, rng, ordered), rng, sizes, positions)}"


def _style_there_is(scene: Scene, rng, sizes: bool, positions: bool, ordered: bool) -> str:
    opener = _pick(rng, ("there is", "we can see", "this image shows", "the picture contains"))
    return f"{opener} {_phrases(_arranged(scene, rng, ordered), rng, sizes, True)}"


def _style_count(scene: Scene, rng, sizes: bool, positions: bool, ordered: bool) -> str:
    n = len(scene.objects)
    noun = _pick(rng, ("shape", "object")) + ("s" if n > 1 else "")
    return f"{NUMBER_WORDS[n]} {noun}: {_phrases(_arranged(scene, rng, ordered), rng, sizes, positions)}"


def _true_relations(a: Obj, b: Obj) -> list[str]:
    """The relation phrases that make 'a <phrase> b' true."""
    found = []
    if left_of(a, b):
        found.append("to the left of")
    if left_of(b, a):
        found.append("to the right of")
    if above(a, b):
        found.append("above")
    if above(b, a):
        found.append("below")
    return found


def _style_relation(scene: Scene, rng, sizes: bool, positions: bool, ordered: bool) -> str:
    """'a large red circle to the left of a small blue square. there is also a green star'."""
    if len(scene.objects) < 2:
        return _style_plain(scene, rng, sizes, True, ordered)
    a, b, *rest = _arranged(scene, rng, ordered)
    relation = _pick(rng, _true_relations(a, b))
    text = f"{with_article(describe(a, sizes, False, rng))} {relation} {with_article(describe(b, sizes, False, rng))}"
    if rest:
        text += f". there is also {_phrases(rest, rng, sizes, positions)}"
    return text


_STYLE_FUNCS: dict[str, Callable[..., str]] = {
    "plain": _style_plain, "list": _style_list, "photo": _style_photo,
    "there_is": _style_there_is, "count": _style_count, "relation": _style_relation,
}


def compose(scene: Scene, rng: np.random.Generator, style: str, sizes: bool, positions: bool,
            ordered: bool = False) -> str:
    """The caption of `scene` in `style`, stating sizes / positions as asked (some styles force them), naming the
    objects in reading order (`ordered`) or in a random one."""
    if style not in _STYLE_FUNCS:
        raise ValueError(f"caption style {style!r}: expected one of {STYLES}")
    return _STYLE_FUNCS[style](scene, rng, sizes, positions, ordered)


def caption_for(scene: Scene, rng: np.random.Generator, style: str | None = None) -> str:
    """A true, complete caption of `scene`; random style (relation only with 2+ objects) unless given."""
    if style is None:
        usable = STYLES if len(scene.objects) > 1 else tuple(s for s in STYLES if s != "relation")
        style = _pick(rng, usable)
    sizes, positions = bool(rng.random() < 0.5), bool(rng.random() < 0.4)
    return compose(scene, rng, style, sizes, positions)


def _corrupt(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """A copy of `scene` where one attribute of one object is changed to a value that makes it false."""
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    pairs = {(o.shape, o.color) for o in scene.objects}
    attribute = _pick(rng, ("color", "shape", "size", "position"))
    if attribute == "color":
        new = replace(obj, color=_pick(rng, [c for c in COLORS if (obj.shape, c) not in pairs]))
    elif attribute == "shape":
        new = replace(obj, shape=_pick(rng, [s for s in SHAPES if (s, obj.color) not in pairs]))
    elif attribute == "size":
        new = replace(obj, size=[s for s in SIZES if s != obj.size][0])
    else:
        taken = {o.position for o in scene.objects}
        new = replace(obj, position=_pick(rng, [p for p in POSITIONS if p not in taken]))
    objects = scene.objects[:index] + (new,) + scene.objects[index + 1:]
    return replace(scene, objects=objects), attribute


def _wrong_attribute(scene: Scene, rng: np.random.Generator) -> str:
    corrupted, attribute = _corrupt(scene, rng)
    if attribute == "size":
        return compose(corrupted, rng, _pick(rng, ("plain", "photo", "count")), True, bool(rng.random() < 0.3))
    if attribute == "position":
        return compose(corrupted, rng, "there_is", bool(rng.random() < 0.3), True)
    return caption_for(corrupted, rng)


def _partial(scene: Scene, rng: np.random.Generator) -> str:
    """A true but incomplete caption: one object left out (or, for a single object, its colour)."""
    if len(scene.objects) > 1:
        drop = int(rng.integers(len(scene.objects)))
        kept = replace(scene, objects=tuple(o for i, o in enumerate(scene.objects) if i != drop))
        styles = [s for s in STYLES if s != "count" and (s != "relation" or len(kept.objects) > 1)]
        return caption_for(kept, rng, _pick(rng, styles))  # no "count" style: it would state a false count
    obj = scene.objects[0]
    words = ([_pick(rng, SIZE_WORDS[obj.size])] if rng.random() < 0.5 else []) + [obj.shape]
    text = with_article(" ".join(words))
    if rng.random() < 0.5:
        text += " " + _pick(rng, POSITION_PHRASES[obj.position])
    return _pick(rng, ("", "a photo of ", "there is ")) + text


def noisy_caption(scene: Scene, rng: np.random.Generator, kind: str) -> str:
    """A web-style caption that is wrong in one way: 'wrong_attribute', 'partial' or 'spam'."""
    if kind == "wrong_attribute":
        return _wrong_attribute(scene, rng)
    if kind == "partial":
        return _partial(scene, rng)
    if kind == "spam":
        return _pick(rng, SPAM).format(n=int(rng.integers(100, 10000)))
    raise ValueError(f"noise kind {kind!r}: expected one of {NOISE_KINDS}")
