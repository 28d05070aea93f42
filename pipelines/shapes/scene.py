"""The shapes world: its vocabulary, scenes of 1-3 coloured shapes, and the spatial relations between them.

A scene is a handful of symbolic facts (shape, colour, size, nominal position) from which an image
(`render.py`), captions (`captions.py`) and questions (`questions.py`) are derived, and against which
any caption can be checked (`checker.py`). Positions are nominal points in the unit square, x to the
right and y downwards (image convention), so "top" has the smallest y.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "purple": (145, 40, 185),
    "orange": (250, 135, 20),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
}

SIZES: tuple[str, ...] = ("small", "large")

POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}

MIRROR: dict[str, str] = {"left": "right", "right": "left"}
"""Position names under a horizontal flip (the others map to themselves)."""

RELATION_MARGIN = 0.2
"""`left_of` / `above` need the nominal coordinates to differ by at least this much."""

MAX_OBJECTS = 3


@dataclass(frozen=True)
class Obj:
    """One shape in a scene."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, vocab, name in ((self.shape, SHAPES, "shape"), (self.color, COLORS, "color"),
                                   (self.size, SIZES, "size"), (self.position, POSITIONS, "position")):
            if value not in vocab:
                raise ValueError(f"Obj.{name}={value!r}: expected one of {sorted(vocab)}")

    def to_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """An image's content: its objects (in drawing order) and the seed of its background texture."""

    objects: tuple[Obj, ...]
    background_seed: int = 0

    def to_json(self) -> str:
        """Compact, key-sorted JSON: {"background_seed": int, "objects": [{shape, color, size, position}]}."""
        blob = {"background_seed": self.background_seed, "objects": [o.to_dict() for o in self.objects]}
        return json.dumps(blob, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        """Inverse of `to_json` (a missing background_seed reads as 0)."""
        blob = json.loads(text)
        objects = tuple(Obj(**o) for o in blob["objects"])
        return cls(objects=objects, background_seed=int(blob.get("background_seed", 0)))

    def flipped(self) -> "Scene":
        """The horizontal mirror image: left and right positions swap, everything else stays."""
        objects = tuple(replace(o, position=MIRROR.get(o.position, o.position)) for o in self.objects)
        return replace(self, objects=objects)


def x_order(position: str) -> float:
    """Nominal x coordinate of a position (0 = left edge)."""
    return POSITIONS[position][0]


def y_order(position: str) -> float:
    """Nominal y coordinate of a position (0 = top edge)."""
    return POSITIONS[position][1]


def left_of(a: Obj, b: Obj) -> bool:
    """True iff `a` is clearly to the left of `b` (x smaller by at least RELATION_MARGIN)."""
    return x_order(b.position) - x_order(a.position) >= RELATION_MARGIN - 1e-9


def above(a: Obj, b: Obj) -> bool:
    """True iff `a` is clearly above `b` (y smaller by at least RELATION_MARGIN)."""
    return y_order(b.position) - y_order(a.position) >= RELATION_MARGIN - 1e-9


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _fix_centre_sizes(objects: list[Obj], rng: np.random.Generator) -> list[Obj]:
    """A large centre object and a large neighbour would overlap (0.25 apart): shrink one side."""
    centre = [o for o in objects if o.position == "centre"]
    others = [o for o in objects if o.position != "centre"]
    if not centre or centre[0].size != "large" or all(o.size == "small" for o in others):
        return objects
    if rng.random() < 0.5:
        return [replace(o, size="small") if o.position == "centre" else o for o in objects]
    return [o if o.position == "centre" else replace(o, size="small") for o in objects]


def sample_scene(rng: np.random.Generator) -> Scene:
    """1-3 objects at distinct positions, no two with the same (shape, colour), none overlapping."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    positions = [list(POSITIONS)[i] for i in rng.permutation(len(POSITIONS))[:count]]
    objects: list[Obj] = []
    used: set[tuple[str, str]] = set()
    for position in positions:
        while True:
            shape, color = _pick(rng, SHAPES), _pick(rng, list(COLORS))
            if (shape, color) not in used:
                break
        used.add((shape, color))
        objects.append(Obj(shape, color, _pick(rng, SIZES), position))
    objects = _fix_centre_sizes(objects, rng)
    return Scene(objects=tuple(objects), background_seed=int(rng.integers(0, 2**31 - 1)))
