"""Draw a `Scene` as an RGB image: a muted, textured, noisy background with saturated outlined shapes on it.

Every shape is inscribed in a circle of radius `RADIUS[size] * image_size` (so "across" is the diameter:
0.16 for small, 0.30 for large), which makes non-overlap a plain distance test between centres.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from pipelines.shapes.scene import COLORS, POSITIONS, Obj, Scene

RADIUS: dict[str, float] = {"small": 0.08, "large": 0.15}
JITTER = 0.05
MIN_GAP = 0.015
"""Smallest free space between two shapes' circles, in units of the image side."""

DARK_COLORS = frozenset({"black", "blue", "purple"})
"""Colours outlined in a light tone; the others get a dark outline."""


def render(scene: Scene, size: int = 128, rng: np.random.Generator | None = None) -> Image.Image:
    """The scene as a `size` x `size` RGB image; deterministic given the scene and `rng`.

    The background texture comes from `scene.background_seed`; the per-pixel noise and the position
    jitter come from `rng` (default: a generator seeded from `scene.background_seed`).
    """
    if rng is None:
        rng = np.random.default_rng([scene.background_seed, 1])
    pixels = background(size, np.random.default_rng(scene.background_seed))
    pixels += rng.normal(0.0, 6.0, size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    width = max(1, round(size / 96))
    for obj, (cx, cy) in zip(scene.objects, jittered_centres(scene, rng)):
        outline = (235, 235, 235) if obj.color in DARK_COLORS else (25, 25, 25)
        points = shape_points(obj.shape, cx * size, cy * size, RADIUS[obj.size] * size)
        if points is None:  # circle
            r = RADIUS[obj.size] * size
            box = (cx * size - r, cy * size - r, cx * size + r, cy * size + r)
            draw.ellipse(box, fill=COLORS[obj.color], outline=outline, width=width)
        else:
            draw.polygon(points, fill=COLORS[obj.color], outline=outline, width=width)
    return image


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted float32 (size, size, 3) texture: grey-ish gradient + soft blobs + faint stripes."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(85, 170) + rng.uniform(-14, 14, 3)
    other = base + rng.uniform(-35, 35) + rng.uniform(-10, 10, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (xs * math.cos(angle) + ys * math.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = base[None, None, :] * (1 - t[..., None]) + other[None, None, :] * t[..., None]
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, 1, 2)
        sigma = rng.uniform(0.08, 0.3)
        amp = rng.uniform(-22, 22) + rng.uniform(-8, 8, 3)
        blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma * sigma))
        img += blob[..., None] * amp[None, None, :]
    if rng.random() < 0.6:
        theta, period = rng.uniform(0, math.pi), rng.uniform(0.05, 0.2)
        phase = xs * math.cos(theta) + ys * math.sin(theta)
        img += (rng.uniform(4, 10) * np.sin(2 * math.pi * phase / period + rng.uniform(0, 6.3)))[..., None]
    return img.astype(np.float32)


def _separated(centres: list[tuple[float, float]], objects: tuple[Obj, ...]) -> bool:
    """True iff every pair of shape circles keeps at least MIN_GAP between them."""
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            dist = math.dist(centres[i], centres[j])
            if dist < RADIUS[objects[i].size] + RADIUS[objects[j].size] + MIN_GAP - 1e-9:
                return False
    return True


def jittered_centres(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres in [0,1]^2: nominal position + uniform jitter (+-JITTER), scaled down if needed.

    The jitter of all objects is shrunk together (1, 1/2, 1/4, 0) until no two shapes overlap; the
    scene sampler guarantees that the nominal positions (scale 0) never overlap.
    """
    offsets = rng.uniform(-JITTER, JITTER, size=(len(scene.objects), 2))
    for scale in (1.0, 0.5, 0.25, 0.0):
        centres = [(POSITIONS[o.position][0] + scale * dx, POSITIONS[o.position][1] + scale * dy)
                   for o, (dx, dy) in zip(scene.objects, offsets)]
        if _separated(centres, scene.objects):
            return centres
    raise ValueError(f"scene has overlapping objects even at nominal positions: {scene.to_json()}")


def _regular(cx: float, cy: float, r: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / n
    start = math.radians(start_deg)
    return [(cx + r * math.cos(start + k * step), cy + r * math.sin(start + k * step)) for k in range(n)]


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices (pixels) of a shape inscribed in the circle (cx, cy, r); None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return _regular(cx, cy, r, 4, 45)
    if shape == "triangle":
        return _regular(cx, cy, r, 3, -90)
    if shape == "hexagon":
        return _regular(cx, cy, r, 6, 0)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)]
    if shape == "star":
        outer = _regular(cx, cy, r, 5, -90)
        inner = _regular(cx, cy, 0.45 * r, 5, -54)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, w = 0.95 * r, 0.32 * r
        offsets = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                   (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
        return [(cx + dx, cy + dy) for dx, dy in offsets]
    raise ValueError(f"unknown shape {shape!r}")
