"""`--set path=value` overrides, JSON round trips and config comparison."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from lemo_jax.configs import run
from lemo_jax.configs.overrides import (
    apply_overrides,
    config_differences,
    config_from_dict,
    config_to_dict,
)
from lemo_jax.configs.run import RunConfig
from lemo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Inner:
    count: int = 1
    ratio: float = 0.5
    sizes: tuple[int, ...] = (1, 2)
    label: str | None = None
    limit: int | None = 3
    is_enabled: bool = False

    def __post_init__(self):
        if self.count < 0:
            raise ValueError(f"inner.count must be >= 0, got {self.count}")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Valid only when `high > low`, so raising both at once needs both set in one call."""

    low: int = 0
    high: int = 1

    def __post_init__(self):
        if self.high <= self.low:
            raise ValueError(f"bounds.high={self.high} must exceed bounds.low={self.low}")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    # A default that differs from Inner's own defaults: partial sections must start from it.
    inner: Inner = Inner(limit=7)
    bounds: Bounds = Bounds()
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.name:
            raise ValueError("outer.name must not be empty")


@dataclasses.dataclass(frozen=True)
class Unsupported:
    values: list[int] | None = None


def base_run() -> RunConfig:
    return RunConfig(name="t", output_dir="/tmp/x")


def test_int_values():
    assert apply_overrides(base_run(), ["train.steps=250"]).train.steps == 250
    # Python's int() syntax: underscores between digits are accepted.
    assert apply_overrides(base_run(), ["train.steps=1_000"]).train.steps == 1000
    assert apply_overrides(base_run(), ["train.seed=+3"]).train.seed == 3
    # A negative integer parses; the section's own validation then rejects it.
    with pytest.raises(UserError, match=r"train\.seed must be >= 0 \(set by 'train\.seed=-3'\)"):
        apply_overrides(base_run(), ["train.seed=-3"])
    with pytest.raises(UserError, match=r"^train\.steps expects an integer, got 'ten'$"):
        apply_overrides(base_run(), ["train.steps=ten"])
    # A fractional or exponent value is rejected rather than truncated.
    for text in ("1.5", "1e3", "5.0", ""):
        with pytest.raises(
            UserError, match=re.escape(f"train.steps expects an integer, got '{text}'")
        ):
            apply_overrides(base_run(), [f"train.steps={text}"])


def test_float_values():
    config = apply_overrides(base_run(), ["train.learning_rate=2e-5", "lora.alpha=32"])
    assert config.train.learning_rate == 2e-5
    assert config.lora.alpha == 32.0 and isinstance(config.lora.alpha, float)
    with pytest.raises(UserError, match=r"train\.learning_rate expects a number, got 'fast'"):
        apply_overrides(base_run(), ["train.learning_rate=fast"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[("true", True), ("TRUE", True), ("Yes", True), ("1", True)],
        *[("false", False), ("False", False), ("no", False), ("0", False)],
    ],
)
def test_bool_values(text, expected):
    config = apply_overrides(Outer(name="n", inner=Inner(is_enabled=not expected)), [])
    config = apply_overrides(config, [f"inner.is_enabled={text}"])
    assert config.inner.is_enabled is expected
    assert apply_overrides(base_run(), [f"export_after={text}"]).export_after is expected


@pytest.mark.parametrize("text", ["maybe", "2", "on", "", "truee"])
def test_bool_rejects_other_words(text):
    with pytest.raises(UserError, match=f"export_after expects a boolean.*got '{text}'"):
        apply_overrides(base_run(), [f"export_after={text}"])


def test_string_values():
    config = apply_overrides(base_run(), ["model.path=/x", "data.train=a=b", "train.remat=none"])
    assert config.model.path == "/x"
    assert config.data.train == "a=b"  # everything after the first '=' is the value
    assert config.train.remat == "none"  # a plain str field keeps the word "none"


def test_optional_values():
    config = apply_overrides(base_run(), ["model.rope_scaling=linear", "model.path=/weights"])
    assert config.model.rope_scaling == "linear"
    config = apply_overrides(config, ["model.rope_scaling=none", "model.path=NULL"])
    assert config.model.rope_scaling is None
    assert config.model.path is None
    outer = Outer(name="n")
    assert apply_overrides(outer, ["inner.limit=none"]).inner.limit is None
    assert apply_overrides(outer, ["inner.limit=12"]).inner.limit == 12
    assert apply_overrides(outer, ["inner.label=fast"]).inner.label == "fast"
    with pytest.raises(UserError, match=r"inner\.limit expects an integer or none, got 'x'"):
        apply_overrides(outer, ["inner.limit=x"])


def test_tuple_values():
    config = apply_overrides(base_run(), ["lora.targets=q_proj, v_proj"])
    assert config.lora.targets == ("q_proj", "v_proj")
    outer = Outer(name="n", tags=("a",))
    assert apply_overrides(outer, ["tags="]).tags == ()
    assert apply_overrides(outer, ["tags=x"]).tags == ("x",)
    assert apply_overrides(outer, ["inner.sizes=4,5,6"]).inner.sizes == (4, 5, 6)
    assert apply_overrides(outer, ["inner.sizes="]).inner.sizes == ()
    for text in ("1,x", "1,,2", "1,", "1.5"):
        with pytest.raises(
            UserError, match=re.escape("inner.sizes expects a comma-separated list of int")
        ):
            apply_overrides(outer, [f"inner.sizes={text}"])
    with pytest.raises(
        UserError, match=re.escape("tags expects a comma-separated list of strings")
    ):
        apply_overrides(outer, ["tags=a,,b"])


def test_section_cannot_be_assigned_whole():
    pattern = r"lora is a section and cannot be set whole.*lora\.rank.*lora\.targets"
    with pytest.raises(UserError, match=pattern):
        apply_overrides(base_run(), ["lora=q_proj"])


def test_assignment_without_equals():
    with pytest.raises(UserError, match=re.escape("'train.steps' has no '='")):
        apply_overrides(base_run(), ["train.steps"])


def test_unknown_paths():
    with pytest.raises(
        UserError, match="train has no field 'stepz' \\(did you mean 'steps'"
    ) as info:
        apply_overrides(base_run(), ["train.stepz=5"])
    valid = info.value.args[0].split("valid fields: ")[1].split(", ")
    assert valid == [field.name for field in dataclasses.fields(run.TrainSection)]
    with pytest.raises(UserError, match=r"no top-level field 'trian'.*valid fields: name, output"):
        apply_overrides(base_run(), ["trian.steps=5"])
    with pytest.raises(UserError, match=r"train\.steps is a field .*not a section.*'value'"):
        apply_overrides(base_run(), ["train.steps.value=5"])
    with pytest.raises(UserError, match="empty field name"):
        apply_overrides(base_run(), ["train..steps=5"])


def test_same_path_twice_is_an_error():
    with pytest.raises(UserError, match=re.escape("train.steps is set twice: 'train.steps=1' and")):
        apply_overrides(base_run(), ["train.steps=1", " train.steps =2"])


def test_validation_runs_and_names_the_assignment():
    policies = re.escape(str(run.REMAT_POLICIES))
    with pytest.raises(UserError, match=f"is not one of {policies}") as info:
        apply_overrides(base_run(), ["lora.rank=4", "train.remat=bogus"])
    message = info.value.args[0]
    assert "set by 'train.remat=bogus'" in message
    assert "lora.rank" not in message  # only assignments under the failing section are named
    with pytest.raises(UserError, match=re.escape("lora.targets must name at least one")):
        apply_overrides(base_run(), ["lora.targets="])
    with pytest.raises(UserError, match=r"inner\.count must be >= 0, got -1 \(set by"):
        apply_overrides(Outer(name="n"), ["inner.count=-1"])
    with pytest.raises(UserError, match=re.escape("outer.name must not be empty")):
        apply_overrides(Outer(name="n"), ["name="])


def test_assignments_apply_together():
    outer = Outer(name="n")
    with pytest.raises(UserError, match=re.escape("bounds.high=1 must exceed bounds.low=5")):
        apply_overrides(outer, ["bounds.low=5"])
    moved = apply_overrides(outer, ["bounds.low=5", "bounds.high=9"])
    assert moved.bounds == Bounds(low=5, high=9)
    assert moved.inner == outer.inner  # untouched sections are kept as they were
    assert outer.bounds == Bounds()  # the input is not changed


def test_no_assignments_and_bad_arguments():
    config = base_run()
    assert apply_overrides(config, []) is config
    with pytest.raises(TypeError, match="not one string"):
        apply_overrides(config, "train.steps=5")
    with pytest.raises(TypeError, match="unsupported type"):
        apply_overrides(Unsupported(), ["values=1"])


def test_config_to_dict_is_json():
    config = apply_overrides(base_run(), ["lora.targets=q_proj,v_proj", "model.path=/x"])
    data = config_to_dict(config)
    assert data["lora"]["targets"] == ["q_proj", "v_proj"]
    assert data["model"]["path"] == "/x"
    assert data["model"]["rope_scaling"] is None
    assert data["train"]["steps"] == 100
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize(
    "assignments",
    [[], ["lora.targets=q_proj", "model.rope_scaling=linear", "train.learning_rate=1e-4"]],
)
def test_round_trip_run_config(assignments):
    config = apply_overrides(base_run(), assignments)
    restored = config_from_dict(RunConfig, json.loads(json.dumps(config_to_dict(config))))
    assert restored == config
    assert isinstance(restored.lora.targets, tuple)


def test_round_trip_test_tree():
    outer = Outer(name="n", inner=Inner(sizes=(), label="x", limit=None), tags=("a", "b"))
    assert config_from_dict(Outer, json.loads(json.dumps(config_to_dict(outer)))) == outer


def test_from_dict_missing_keys_take_defaults():
    assert config_from_dict(RunConfig, {"name": "t", "output_dir": "/tmp/x"}) == base_run()
    partial = config_from_dict(Outer, {"name": "n", "inner": {"count": 2}})
    # The section starts from the enclosing field's default (limit=7), not Inner's own (3).
    assert partial == Outer(name="n", inner=Inner(count=2, limit=7))
    with pytest.raises(UserError, match="missing required name"):
        config_from_dict(RunConfig, {"output_dir": "/tmp/x"})


def test_from_dict_type_checks():
    data = config_to_dict(base_run())
    data["train"]["learning_rate"] = 1  # an integral JSON number fits a float field
    assert config_from_dict(RunConfig, data).train.learning_rate == 1.0
    for bad in ("5", 5.0, True, None):
        data["train"]["steps"] = bad
        with pytest.raises(
            UserError, match=re.escape(f"train.steps expects an integer, got {bad!r}")
        ):
            config_from_dict(RunConfig, data)
    with pytest.raises(
        UserError, match=re.escape("lora.targets expects a comma-separated list of str")
    ):
        config_from_dict(RunConfig, {"name": "t", "output_dir": "/x", "lora": {"targets": [1]}})
    with pytest.raises(UserError, match="train expects a section"):
        config_from_dict(RunConfig, {"name": "t", "output_dir": "/x", "train": 3})


def test_from_dict_unknown_keys_and_validation():
    data = {"name": "t", "output_dir": "/x", "train": {"stepz": 5, "seedd": 1}}
    with pytest.raises(UserError, match=r"unknown key.*'stepz', 'seedd' in train; valid keys"):
        config_from_dict(RunConfig, data)
    with pytest.raises(UserError, match=r"unknown key.*'extra' in RunConfig"):
        config_from_dict(RunConfig, {"name": "t", "output_dir": "/x", "extra": 1})
    with pytest.raises(UserError, match=r"is not one of .*loading RunConfig section train"):
        config_from_dict(RunConfig, {"name": "t", "output_dir": "/x", "train": {"remat": "x"}})


def test_config_differences():
    first = base_run()
    assert config_differences(first, base_run()) == []
    second = apply_overrides(first, ["train.steps=5", "lora.rank=4", "export_after=true"])
    # Declaration order: lora comes before train, export_after after every section.
    assert config_differences(first, second) == ["lora.rank", "train.steps", "export_after"]
    assert config_differences(first, second, ignore={"train.steps"}) == [
        "lora.rank",
        "export_after",
    ]
    assert config_differences(first, second, ignore=["train", "lora"]) == ["export_after"]
    # A prefix of a field name is not a prefix of its path.
    assert "train.steps" in config_differences(first, second, ignore=["train.step"])
    tuples = apply_overrides(first, ["lora.targets=q_proj"])
    assert config_differences(first, tuples) == ["lora.targets"]
    with pytest.raises(TypeError, match="not one string"):
        config_differences(first, second, ignore="train.steps")
    with pytest.raises(TypeError, match="cannot compare"):
        config_differences(first, Outer(name="n"))
