import pytest
from pydantic import Field

from pipelines.config import ConfigError, StepConfig, load_config, parse_overrides


class Optim(StepConfig):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)


class Demo(StepConfig):
    name: str = "x"
    steps: int = Field(10, gt=0)
    optim: Optim = Optim()


def test_overrides_are_nested_and_typed():
    assert parse_overrides(["optim.lr=3e-4", "name=abc", "steps=5"]) == {
        "optim": {"lr": 3e-4}, "name": "abc", "steps": 5}


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\noptim:\n  lr: 0.5\n")
    cfg = load_config(Demo, path, ["optim.lr=0.25"])
    assert cfg.steps == 7 and cfg.optim.lr == 0.25 and cfg.optim.betas == (0.9, 0.98)


def test_hash_changes_with_content_only():
    assert Demo().config_hash() == Demo().config_hash()
    assert Demo().config_hash() != Demo(steps=11).config_hash()


@pytest.mark.parametrize("overrides, needle", [
    (["optim.lrr=1"], "optim.lrr"),          # misspelt field
    (["steps=0"], "steps"),                  # out of range
    (["steps"], "KEY=VALUE"),                # not an assignment
])
def test_bad_overrides_name_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(Demo, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Demo, bad)


class Faults(StepConfig):
    rate: float = 0.0
    seconds: float = 15.0


class Profile(StepConfig):
    merged_sections = ("faults", "sizes")
    faults: Faults = Faults(rate=0.3, seconds=6.0)
    sizes: dict[str, int] = Field(default_factory=lambda: {"a": 1, "b": 2})
    other: Faults = Faults(rate=0.3, seconds=6.0)


def test_a_partial_merged_section_keeps_the_fields_default(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("faults:\n  rate: 0.5\n")
    cfg = load_config(Profile, path, ["sizes.b=5"])
    assert cfg.faults == Faults(rate=0.5, seconds=6.0)  # not the class's 15.0
    assert cfg.sizes == {"a": 1, "b": 5}
    assert load_config(Profile, None, ["other.rate=0.5"]).other == Faults(rate=0.5, seconds=15.0)  # not listed
    assert Profile(faults=Faults(rate=0.1)).faults.seconds == 15.0  # a whole section given as a model is kept
    with pytest.raises(ConfigError, match="faults.nope"):
        load_config(Profile, None, ["faults.nope=1"])
