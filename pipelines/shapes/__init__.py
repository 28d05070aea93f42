"""The shapes world: a synthetic image-text corpus whose captions can be checked exactly.

`scene` (vocabulary, scenes, relations) -> `render` (images), `captions` (clean and noisy captions),
`questions` (VQA pairs); `checker` judges any caption against a scene; `synth` is the step that writes a
split to disk. The synth step is not imported here so that `python -m pipelines.shapes.synth` runs cleanly.
"""
from pipelines.shapes.captions import NOISE_KINDS, STYLES, caption_for, describe, noisy_caption
from pipelines.shapes.checker import Verdict, check_caption, swap_left_right
from pipelines.shapes.questions import questions_for
from pipelines.shapes.render import render
from pipelines.shapes.scene import COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene, above, left_of, sample_scene

__all__ = [
    "COLORS", "NOISE_KINDS", "POSITIONS", "SHAPES", "SIZES", "STYLES", "Obj", "Scene", "Verdict", "above",
    "caption_for", "check_caption", "describe", "left_of", "noisy_caption", "questions_for", "render",
    "sample_scene", "swap_left_right",
]
