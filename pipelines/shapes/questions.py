"""Visual questions with one-word answers about a shapes-world scene (for VQA-style evaluation).

Only unambiguous questions are asked: "what color is the circle?" only when the scene has exactly one
circle, "what shape is the red object?" only when exactly one object is red. Position answers use the
scene's position names ("left", "right", "top", "bottom", "centre"); a flipped image needs its
left/right answers swapped like its captions.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from pipelines.shapes.scene import Scene

QUESTION_TYPES = ("colour", "shape", "count", "position")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")

_TEMPLATES = {
    "colour": ("what color is the {shape}?", "what is the color of the {shape}?",
               "which color does the {shape} have?"),
    "shape": ("what shape is the {color} object?", "what is the shape of the {color} object?",
              "which shape is {color}?"),
    "count": ("how many shapes are there?", "how many objects are in the image?",
              "how many shapes can you see?"),
    "position": ("where is the {color} {shape}?", "where in the image is the {color} {shape}?"),
}


def _template(rng: np.random.Generator, kind: str) -> str:
    options = _TEMPLATES[kind]
    return options[int(rng.integers(len(options)))]


def questions_for(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """Questions {"question", "answer", "type"} whose answers are unambiguous in `scene`."""
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    out = [{"question": _template(rng, "count"), "answer": NUMBER_WORDS[len(scene.objects)], "type": "count"}]
    for obj in scene.objects:
        if shapes[obj.shape] == 1:
            out.append({"question": _template(rng, "colour").format(shape=obj.shape),
                        "answer": obj.color, "type": "colour"})
        if colors[obj.color] == 1:
            out.append({"question": _template(rng, "shape").format(color=obj.color),
                        "answer": obj.shape, "type": "shape"})
        out.append({"question": _template(rng, "position").format(color=obj.color, shape=obj.shape),
                    "answer": obj.position, "type": "position"})
    return out
