"""Tests of the shapes world: scenes, rendering, captions, the caption checker, questions and the synth step."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipelines.shapes.captions import (NOISE_KINDS, SPAM, STYLES, caption_for, compose, describe, noisy_caption,
                                       reading_order)
from pipelines.shapes.checker import FactCounts, check_caption, count_facts, parse_caption, swap_left_right
from pipelines.shapes.questions import questions_for
from pipelines.shapes.render import RADIUS, jittered_centres, render
from pipelines.shapes.scene import (COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene, above, left_of,
                                    sample_scene, x_order, y_order)
from pipelines.shapes.synth import SynthConfig, main, make_row, noise_kind, run

SEEDS = range(300)


def _scenes(n: int = 300, offset: int = 0):
    for seed in range(offset, offset + n):
        rng = np.random.default_rng(seed)
        yield rng, sample_scene(rng)


def _scene(*objects: tuple[str, str, str, str]) -> Scene:
    return Scene(objects=tuple(Obj(*o) for o in objects), background_seed=3)


# ---------------------------------------------------------------- scene


def test_vocabulary():
    assert len(SHAPES) >= 6 and {"circle", "square", "triangle", "star", "hexagon", "diamond"} <= set(SHAPES)
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}
    assert len(set(COLORS.values())) == 8
    assert SIZES == ("small", "large")
    assert POSITIONS["left"] == (0.25, 0.5) and POSITIONS["centre"] == (0.5, 0.5)
    assert all(0 <= c <= 1 for xy in POSITIONS.values() for c in xy)


def test_scene_invariants():
    counts = Counter()
    for _, scene in _scenes(500):
        n = len(scene.objects)
        counts[n] += 1
        assert 1 <= n <= 3
        assert len({o.position for o in scene.objects}) == n
        assert len({(o.shape, o.color) for o in scene.objects}) == n
    assert set(counts) == {1, 2, 3}


def test_scene_json_roundtrip_and_flip():
    for _, scene in _scenes(50):
        assert Scene.from_json(scene.to_json()) == scene
        assert "objects" in json.loads(scene.to_json())
        flipped = scene.flipped()
        assert flipped.flipped() == scene
        for a, b in zip(scene.objects, flipped.objects):
            expected = {"left": "right", "right": "left"}.get(a.position, a.position)
            assert b.position == expected and (a.shape, a.color, a.size) == (b.shape, b.color, b.size)


def test_invalid_obj_is_refused():
    with pytest.raises(ValueError, match="color"):
        Obj("circle", "pink", "small", "left")


def test_relations():
    left, right = Obj("circle", "red", "small", "left"), Obj("square", "blue", "small", "right")
    top, centre = Obj("star", "green", "small", "top"), Obj("cross", "white", "small", "centre")
    bottom = Obj("hexagon", "black", "large", "bottom")
    assert left_of(left, right) and not left_of(right, left)
    assert left_of(left, centre) and left_of(left, top) and not left_of(top, bottom)
    assert above(top, bottom) and above(top, centre) and above(centre, bottom)
    assert not above(left, right) and not above(bottom, top)


# ---------------------------------------------------------------- render


def test_render_is_deterministic_and_sized():
    scene = sample_scene(np.random.default_rng(5))
    a = render(scene, 96, np.random.default_rng(1))
    b = render(scene, 96, np.random.default_rng(1))
    c = render(scene, 96, np.random.default_rng(2))
    assert a.size == (96, 96) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_render_draws_the_shape_colour_at_its_position():
    for color, rgb in COLORS.items():
        scene = _scene(("circle", color, "large", "right"), ("square", "red" if color != "red" else "blue",
                                                              "small", "left"))
        image = np.asarray(render(scene, 128, np.random.default_rng(0))).astype(int)
        (cx, cy), _ = jittered_centres(scene, np.random.default_rng(0))
        pixel = image[int(cy * 128), int(cx * 128)]
        assert np.abs(pixel - np.array(rgb)).max() <= 2, (color, pixel)


def test_rendered_objects_never_overlap():
    for rng, scene in _scenes(500):
        centres = jittered_centres(scene, rng)
        for i, a in enumerate(scene.objects):
            for j in range(i + 1, len(scene.objects)):
                b = scene.objects[j]
                dist = float(np.hypot(centres[i][0] - centres[j][0], centres[i][1] - centres[j][1]))
                assert dist > RADIUS[a.size] + RADIUS[b.size], scene


def test_background_is_muted():
    scene = Scene(objects=(), background_seed=11)
    pixels = np.asarray(render(scene, 64, np.random.default_rng(0))).astype(float)
    saturation = (pixels.max(axis=2) - pixels.min(axis=2)).mean()
    assert saturation < 60 and 40 < pixels.mean() < 215


# ---------------------------------------------------------------- captions and checker


def test_describe():
    obj = Obj("circle", "orange", "large", "centre")
    assert describe(obj) == "orange circle"
    assert describe(obj, with_size=True, with_position=True) == "large orange circle in the centre"


def test_checker_accepts_every_clean_caption_in_every_style():
    for rng, scene in _scenes(len(SEEDS)):
        captions = [caption_for(scene, rng) for _ in range(3)]
        captions += [compose(scene, rng, style, bool(rng.random() < 0.5), bool(rng.random() < 0.5))
                     for style in STYLES]
        for caption in captions:
            verdict = check_caption(caption, scene)
            assert verdict.correct, (caption, scene.to_json(), verdict.reasons)


def test_ordered_captions_name_the_objects_in_reading_order():
    """ordered=True: every style names the objects top to bottom, then left to right, whatever the rng draws."""
    seen_three = False
    for rng, scene in _scenes(len(SEEDS)):
        expected = [f"{o.color} {o.shape}" for o in reading_order(scene.objects)]
        assert [(y_order(o.position), x_order(o.position)) for o in reading_order(scene.objects)] == sorted(
            (y_order(o.position), x_order(o.position)) for o in scene.objects)
        for style in STYLES:
            caption = compose(scene, rng, style, bool(rng.random() < 0.5), bool(rng.random() < 0.5), ordered=True)
            named = [f"{''.join(m.colors)} {m.shape}" for m in parse_caption(caption).mentions if m.shape]
            assert named == expected, (style, caption, scene.to_json())
            assert check_caption(caption, scene).correct, (caption, scene.to_json())
        seen_three |= len(scene.objects) == 3
    assert seen_three
    flipped = Scene((Obj("circle", "red", "small", "left"), Obj("star", "blue", "small", "right")))
    assert compose(flipped, None, "plain", False, False, ordered=True) == "a red circle and a blue star"
    assert compose(flipped.flipped(), None, "plain", False, False, ordered=True) == "a blue star and a red circle"


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_checker_rejects_every_noisy_caption(kind):
    for rng, scene in _scenes(len(SEEDS)):
        caption = noisy_caption(scene, rng, kind)
        verdict = check_caption(caption, scene)
        assert not verdict.correct, (kind, caption, scene.to_json())
        if kind == "spam":
            assert not verdict.complete


def test_noise_kinds_fail_in_the_expected_way():
    inconsistent = 0
    for rng, scene in _scenes(200):
        assert check_caption(noisy_caption(scene, rng, "partial"), scene).consistent
        inconsistent += not check_caption(noisy_caption(scene, rng, "wrong_attribute"), scene).consistent
    assert inconsistent == 200


def test_spam_has_many_variants():
    assert len(SPAM) >= 10
    rng = np.random.default_rng(0)
    assert len({noisy_caption(_scene(("star", "red", "small", "top")), rng, "spam") for _ in range(200)}) >= 10


def test_unknown_noise_kind_is_refused():
    with pytest.raises(ValueError, match="noise kind"):
        noisy_caption(_scene(("star", "red", "small", "top")), np.random.default_rng(0), "typo")


def test_flip_keeps_the_verdict():
    for rng, scene in _scenes(len(SEEDS)):
        captions = [caption_for(scene, rng)] + [noisy_caption(scene, rng, k) for k in NOISE_KINDS]
        captions.append("a red circle to the left of a blue square")
        for caption in captions:
            assert check_caption(swap_left_right(caption), scene.flipped()) == check_caption(caption, scene)


def test_swap_left_right():
    assert swap_left_right("Left of the RIGHT, on the left.") == "Right of the LEFT, on the right."
    assert swap_left_right("leftover copyright") == "leftover copyright"


RED_LEFT_BLUE_RIGHT = _scene(("circle", "red", "large", "left"), ("square", "blue", "small", "right"))


@pytest.mark.parametrize("caption, consistent, complete", [
    ("a red circle and a blue square", True, True),
    ("A RED CIRCLE, a Blue Square!!", True, True),
    ("red circle to the left of blue square", True, True),
    ("a blue square to the right of a red circle", True, True),
    ("a red circle to the right of a blue square", False, True),
    ("a blue square on the left and a red circle on the right", False, True),
    ("the red circle is on the left side, the blue square is at the right", True, True),
    ("a large red circle and a small blue square", True, True),
    ("a small red circle and a small blue square", False, True),
    ("a red circle at the top of the image and a blue square", False, True),
    ("a red circle in the centre and a blue square", False, True),
    ("two shapes: a red circle and a blue square", True, True),
    ("three shapes: a red circle and a blue square", False, True),
    ("a red circle", True, False),
    ("a circle and a square", True, False),
    ("a red circle, a blue square and a green star", False, True),
    ("a blue circle and a blue square", False, False),
    ("a red circle above a blue square", False, True),
    ("best deals on watches free shipping", True, False),
    ("", True, False),
])
def test_checker_hand_written_cases(caption, consistent, complete):
    verdict = check_caption(caption, RED_LEFT_BLUE_RIGHT)
    assert (verdict.consistent, verdict.complete) == (consistent, complete), verdict.reasons
    assert verdict.correct == (consistent and complete)
    assert verdict.correct or verdict.reasons


@pytest.mark.parametrize("caption, named, mentions, true_mentions", [
    ("a red circle and a blue square", 2, 2, 2),
    ("a red circle and a green square", 1, 2, 1),  # the square is blue: named 1 of 2, one false mention
    ("a small red circle", 1, 1, 0),  # named by colour + shape, but the mention is false (the circle is large)
    ("a red circle, a red circle and a red circle", 1, 3, 3),
    ("a blue circle and a blue square", 1, 2, 1),
    ("best deals on watches free shipping", 0, 0, 0),
])
def test_count_facts_gives_partial_credit(caption, named, mentions, true_mentions):
    counts = count_facts(caption, RED_LEFT_BLUE_RIGHT)
    assert counts == FactCounts(objects=2, named=named, mentions=mentions, true_mentions=true_mentions)
    verdict = check_caption(caption, RED_LEFT_BLUE_RIGHT)
    assert verdict.complete == (counts.named == counts.objects)  # the checker's "complete" half
    if counts.true_mentions < counts.mentions:
        assert not verdict.consistent


def test_checker_scores_over_a_test_set():
    from pipelines.evaluate import checker_scores

    other = _scene(("star", "yellow", "small", "top"))
    scenes = {"a": RED_LEFT_BLUE_RIGHT.to_json(), "b": other.to_json()}
    scores = checker_scores({"a": "a red circle and a green square", "b": "a small yellow star"}, scenes)
    assert scores == {"accuracy": 0.5, "object_recall": 2 / 3, "mention_precision": 2 / 3}


def test_checker_vertical_relations_and_centre():
    scene = _scene(("star", "yellow", "small", "top"), ("hexagon", "white", "large", "centre"))
    assert check_caption("a yellow star above a white hexagon", scene).correct
    assert check_caption("a white hexagon below a yellow star", scene).correct
    assert check_caption("a yellow star on top of a white hexagon", scene).correct
    assert not check_caption("a yellow star below a white hexagon", scene).consistent
    assert check_caption("a white hexagon in the center and a yellow star near the top", scene).correct
    assert not check_caption("a white hexagon at the bottom and a yellow star", scene).consistent


def test_checker_parses_mentions_and_relations():
    parse = parse_caption("two big red circles to the left of the small blue square")
    assert [m.shape for m in parse.mentions] == ["circle", "square"]
    assert parse.mentions[0].number == 2 and parse.mentions[0].sizes == {"large"}
    assert parse.relations == [(0, "left_of", 1)]


# ---------------------------------------------------------------- questions


def test_questions_answers_match_the_scene():
    types = Counter()
    for rng, scene in _scenes(200):
        for q in questions_for(scene, rng):
            types[q["type"]] += 1
            words = q["question"].rstrip("?").split()
            if q["type"] == "count":
                assert q["answer"] == ["zero", "one", "two", "three"][len(scene.objects)]
            elif q["type"] == "colour":
                matches = [o for o in scene.objects if o.shape in words]
                assert len(matches) == 1 and matches[0].color == q["answer"]
            elif q["type"] == "shape":
                matches = [o for o in scene.objects if o.color in words]
                assert len(matches) == 1 and matches[0].shape == q["answer"]
            else:
                matches = [o for o in scene.objects if o.color in words and o.shape in words]
                assert len(matches) == 1 and matches[0].position == q["answer"]
    assert set(types) == {"count", "colour", "shape", "position"}


def test_questions_skip_ambiguous_ones():
    scene = _scene(("circle", "red", "small", "left"), ("circle", "blue", "small", "right"),
                   ("star", "red", "large", "top"))
    questions = questions_for(scene, np.random.default_rng(0))
    assert not [q for q in questions if q["type"] == "colour" and "circle" in q["question"]]
    assert not [q for q in questions if q["type"] == "shape" and "red" in q["question"]]
    assert [q["answer"] for q in questions if q["type"] == "colour"] == ["red"]  # only the star's
    assert [q["answer"] for q in questions if q["type"] == "shape"] == ["circle"]


# ---------------------------------------------------------------- synth step


def _read(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


def test_synth_is_byte_identical_for_the_same_config(tmp_path):
    cfg = SynthConfig(split="web", images=30, seed=7)
    run(cfg, tmp_path / "a", progress=False)
    run(cfg, str(tmp_path / "b"), progress=False)
    assert _read(tmp_path / "a", "web") == _read(tmp_path / "b", "web")
    a_images = sorted((tmp_path / "a" / "images" / "web").iterdir())
    assert len(a_images) == 30 and a_images[0].name == "web-000000.jpg"
    for path in a_images:
        assert path.read_bytes() == (tmp_path / "b" / "images" / "web" / path.name).read_bytes()
    assert (tmp_path / "a" / "web_synth.json").read_bytes() == (tmp_path / "b" / "web_synth.json").read_bytes()


def test_synth_rows_are_order_independent_and_seed_dependent():
    cfg = SynthConfig(split="curated", images=10, seed=1)
    row, jpeg = make_row(cfg, 4)
    assert make_row(cfg, 4) == (row, jpeg)
    other_seed, _ = make_row(SynthConfig(split="curated", images=10, seed=2), 4)
    other_split, _ = make_row(SynthConfig(split="test", images=10, seed=1), 4)
    assert row["scene"] != other_seed["scene"]
    assert row["scene"] != other_split["scene"]


def test_synth_splits_differ(tmp_path):
    run(SynthConfig(split="curated", images=20), tmp_path, progress=False)
    run(SynthConfig(split="web", images=20, noise_rate=0.0), tmp_path, progress=False)
    curated, web = _read(tmp_path, "curated"), _read(tmp_path, "web")
    assert sum(a["scene"] == b["scene"] for a, b in zip(curated, web)) <= 2
    assert all(r["noise"] == "clean" for r in web)


def test_synth_web_noise_share_and_labels(tmp_path):
    result = run(SynthConfig(split="web", images=300, seed=3, noise_rate=0.4), tmp_path, progress=False)
    rows = _read(tmp_path, "web")
    noisy = [r for r in rows if r["noise"] != "clean"]
    assert abs(len(noisy) / 300 - 0.4) <= 0.08
    assert set(r["noise"] for r in noisy) == set(NOISE_KINDS)
    assert result.noise_counts["clean"] == 300 - len(noisy)
    for r in rows:
        verdict = check_caption(r["caption"], Scene.from_json(r["scene"]))
        assert verdict.correct == (r["noise"] == "clean"), r
        assert json.loads(r["captions"]) == [r["caption"]]
        assert r["url"] == f"http://127.0.0.1:8765/images/web/{r['key']}.jpg"


def test_noise_schedule_tracks_the_rate():
    for rate in (0.0, 0.1, 0.5, 1.0):
        kinds = Counter(noise_kind(0, "web", i, rate) for i in range(1000))
        assert abs(kinds["clean"] / 1000 - (1 - rate)) <= 0.01
    assert {noise_kind(0, "curated", i, 0.9) for i in range(100)} == {"clean"}


def test_synth_test_split_has_five_distinct_correct_captions(tmp_path):
    result = run(SynthConfig(split="test", images=40, seed=0, base_url="http://host:9/"), tmp_path,
                 progress=False)
    assert result.captions == 200
    for r in _read(tmp_path, "test"):
        captions = json.loads(r["captions"])
        scene = Scene.from_json(r["scene"])
        assert len(set(captions)) == 5 and r["caption"] == captions[0]
        assert all(check_caption(c, scene).correct for c in captions)
        assert r["url"].startswith("http://host:9/images/test/test-")
        assert json.loads(r["questions"])
    manifest = json.loads((tmp_path / "test_synth.json").read_text())
    assert manifest["counts"]["images"] == 40 and manifest["config"]["split"] == "test"


@pytest.mark.parametrize("fields, message", [
    ({"split": "web", "images": 0}, "images"),
    ({"split": "train", "images": 5}, "split"),
    ({"split": "web", "images": 5, "noise_rate": 1.5}, "noise_rate"),
    ({"split": "web", "images": 5, "captions_per_image": 3}, "captions_per_image"),
    ({"split": "web", "images": 5, "base_url": "127.0.0.1:8765"}, "base_url"),
    ({"split": "web", "images": 5, "imagez": 5}, "imagez"),
])
def test_config_validation(fields, message):
    with pytest.raises(ValidationError, match=message):
        SynthConfig(**fields)


def test_config_defaults():
    assert SynthConfig(split="test", images=1).n_captions() == 5
    assert SynthConfig(split="curated", images=1).n_captions() == 1
    assert SynthConfig(split="web", images=1, base_url="http://x:1/").base_url == "http://x:1"


def test_cli_rejects_bad_arguments_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "out"), "--split", "web", "--images", "0"])
    assert exc.value.code == 2
    assert "images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["s3://bucket/x", "--split", "web", "--images", "3"])
    assert "local" in capsys.readouterr().err


def test_cli_writes_a_split(tmp_path, capsys):
    assert main([str(tmp_path), "--split", "curated", "--images", "5", "--seed", "2", "--no-progress"]) == 0
    assert (tmp_path / "curated.parquet").exists()
    assert str(tmp_path / "curated.parquet") in capsys.readouterr().out
    rows = _read(tmp_path, "curated")
    assert [r["key"] for r in rows] == [f"curated-{i:06d}" for i in range(5)]
    assert list(rows[0]) == ["url", "caption", "key", "scene", "captions", "questions", "noise"]


def test_checker_survives_arbitrary_text_and_keeps_flip_invariance():
    words = ("a an the two one red blue big small circle circles square shape objects of to on at in left "
             "right top bottom centre middle above below over under side image is which and , . 5 ?? xyz").split()
    rng = np.random.default_rng(0)
    scene = _scene(("circle", "red", "small", "left"), ("square", "blue", "large", "top"))
    verdicts = Counter()
    for _ in range(3000):
        caption = " ".join(rng.choice(words, int(rng.integers(0, 20))))
        verdict = check_caption(caption, scene)
        verdicts[verdict.correct] += 1
        assert check_caption(swap_left_right(caption), scene.flipped()) == verdict, caption
    assert verdicts[False] > 0


def test_synth_records_success_and_returns_it_for_the_same_config(tmp_path):
    cfg = SynthConfig(split="curated", images=4, seed=3)
    first = run(cfg, tmp_path, progress=False)
    assert not first.reused and (tmp_path / "_SUCCESS.json").exists()
    again = run(cfg, tmp_path, progress=False)
    assert again.reused and again.images == first.images and again.noise_counts == first.noise_counts
    assert not run(SynthConfig(split="curated", images=5, seed=3), tmp_path, progress=False).reused
