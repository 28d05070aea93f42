"""Profiles resolve to complete PipelineConfigs under one run root; overrides and bad input are checked early."""
import pytest

from pipelines import pipeline
from pipelines.config import ConfigError, load_config
from pipelines.pipeline import STAND_IN, PipelineConfig
from pipelines.profiles import PROFILES, DemoConfig, build_profile


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_builds_a_config_under_its_run_root(name, tmp_path):
    root = str(tmp_path / name)
    cfg = build_profile(name, root)
    assert isinstance(cfg, PipelineConfig) and cfg.profile == name
    for split, download in cfg.downloads.items():
        assert download.url_list.startswith(root), (split, download.url_list)
    assert cfg.stage2.model.init_from == f"{root}/stage1"
    assert cfg.retrieval.checkpoint == f"{root}/stage1" and cfg.generation.checkpoint == f"{root}/stage2"
    pipeline.validate(cfg)
    assert PipelineConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # a Prefect parameter round trip


def test_shapes_profiles_use_the_stand_ins_and_capfilt_output(tmp_path):
    cfg = build_profile("demo", str(tmp_path))
    assert cfg.world.images == {"curated": 1000, "web": 1000, "test": 200}
    assert cfg.capfilt.captioner == STAND_IN and cfg.stage1.model.vision["name"] == STAND_IN
    assert [s.shards for s in cfg.stage1.data.sources] == [f"{tmp_path}/raw/curated", f"{tmp_path}/capfilt"]
    assert cfg.capfilt.min_new_tokens == 2  # "a red circle": the stand-in may stop after 3 words, not 5 tokens
    assert build_profile("demo", str(tmp_path), ["capfilt.min_new_tokens=4"]).capfilt.min_new_tokens == 4
    assert build_profile("vitg-opt2.7b", "s3://b/r").capfilt.min_new_tokens == 5  # the step's default for BLIP
    # the captioner reads the web images at their downloaded size; the CLIP (stage 1's encoder) at 64
    assert cfg.foundation.captioner.image_size == cfg.downloads["web"].image_size == 96
    assert cfg.foundation.image_size == cfg.stage1.data.image_size == 64
    without = build_profile("tiny", str(tmp_path), knobs={"capfilt": None})
    assert without.capfilt is None and without.stage1.data.sources[1].shards == f"{tmp_path}/raw/web"
    assert without.world.images["web"] == 40  # the tiny knobs, then the caller's


def test_paper_profiles_follow_the_paper(tmp_path):
    opt = build_profile("vitg-opt2.7b", "s3://bucket/run")
    t5 = build_profile("vitg-flant5xl", "s3://bucket/run")
    assert opt.world is None and opt.foundation is None
    assert opt.stage1.data.batch_size * opt.stage1.scaling.workers == 1680
    assert opt.stage2.data.batch_size * opt.stage2.scaling.workers == 1920
    assert t5.stage2.data.batch_size * t5.stage2.scaling.workers == 1520
    assert (opt.stage1.optim.total_steps, opt.stage2.optim.total_steps) == (250_000, 80_000)
    assert (opt.stage1.optim.min_lr, opt.stage2.optim.min_lr) == (1e-5, 5e-5)
    assert opt.capfilt.shards == [f"s3://bucket/run/raw/{s}" for s in ("cc3m", "cc12m", "sbu", "laion400m")]
    assert opt.stage1.scaling.use_gpu and opt.downloads["laion400m"].preset == "laion400m"


def test_overrides_reach_any_field_and_bad_ones_name_it(tmp_path):
    cfg = build_profile("tiny", str(tmp_path), ["stage1.optim.total_steps=7", "capfilt.num_captions=2"])
    assert cfg.stage1.optim.total_steps == 7 and cfg.capfilt.num_captions == 2
    with pytest.raises(ConfigError, match="stage1.optim.totl_steps"):
        build_profile("tiny", str(tmp_path), ["stage1.optim.totl_steps=7"])
    with pytest.raises(ConfigError, match="expected one of demo, tiny"):
        build_profile("huge", str(tmp_path))
    with pytest.raises(ConfigError, match="knobs"):
        build_profile("vitg-opt2.7b", str(tmp_path), knobs={"web_images": 3})


def test_a_stand_in_without_the_foundation_step_is_refused(tmp_path):
    cfg = build_profile("tiny", str(tmp_path), ["foundation=null"])
    with pytest.raises(ConfigError, match="capfilt.captioner='stand-in' needs the foundation step"):
        pipeline.validate(cfg)


def test_flat_numbers_keeps_numeric_leaves_only():
    tree = {"a": {"b": 1, "c": "x", "d": True, "e": {"f": 2.5}}, "g": [1, 2], "h": 3}
    assert pipeline.flat_numbers(tree) == {"a.b": 1.0, "a.e.f": 2.5, "h": 3.0}


def test_a_demo_knob_section_override_keeps_the_demos_other_values():
    knobs = load_config(DemoConfig, None, ["faults.slow=0", "qformer.num_query_tokens=16"])
    assert knobs.faults.slow == 0 and knobs.faults.rate_limited == DemoConfig().faults.rate_limited > 0
    assert knobs.qformer == {**DemoConfig().qformer, "num_query_tokens": 16}
