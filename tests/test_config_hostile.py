"""Hostile configuration input (#22 class 1): any YAML text, file or override is a valid Config or one
ConfigError of one-line problems — never another exception, never a NaN/Inf or absurd size let through.

Property-based (hypothesis, derandomized so every run sees the same examples) plus the named cases the
issue lists: NaN/Inf, rank 1e9, resolution 2^20, a section that is an int, int/null keys, deep nesting,
an alias bomb, UTF-16 and binary files, a folder passed as the file."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sd35hub.config import SECTIONS, Config, load_config
from sd35hub.config_checks import BOUNDS, MAX_INT
from sd35hub.errors import ConfigError

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_DIR = Path(tempfile.mkdtemp(prefix="sd35hub-hostile-"))
KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}


def check_config(cfg: Config) -> None:
    """What a config that loads must satisfy: every number finite and inside its bounds."""
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    assert math.isfinite(v), (section.name, f.name, v)
                    low, high = BOUNDS.get(f"{section.name}.{f.name}", (-MAX_INT, MAX_INT))
                    assert low <= v <= high, (section.name, f.name, v)


def outcome(load) -> str:
    """'ok' or 'error'; anything but a Config or a ConfigError fails the test."""
    try:
        cfg = load()
    except ConfigError as exc:
        assert exc.exit_code == 2
        assert exc.problems and all("\n" not in p and 0 < len(p) < 2000 for p in exc.problems), exc.problems
        return "error"
    check_config(cfg)
    return "ok"


def load_text(data: bytes | str, overrides: list[str] | None = None) -> str:
    path = _DIR / "c.yaml"
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return outcome(lambda: load_config(path, overrides))


# ---------------------------------------------------------------------------------- strategies
numbers = st.one_of(
    st.integers(), st.integers(min_value=-3, max_value=2000), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**9, 2**20, 1e-300, 1e300, float("nan"), float("inf"), -0.0]),
)
scalars = st.one_of(numbers, st.booleans(), st.none(), st.text(max_size=30),
                    st.sampled_from(["nan", ".inf", "-.inf", "1e400", "5e-5", "0x10", "~", "yes", "abc", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.one_of(st.text(max_size=8), st.integers(), st.none()), inner, max_size=4), max_leaves=12)
keys = st.one_of(*(st.sampled_from(k) for k in KEYS.values()), st.text(max_size=10), st.integers(), st.none())
section = st.one_of(st.dictionaries(keys, values, max_size=6), values)
documents = st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=8), st.integers(), st.none()),
                            section, max_size=5)


@pytest.mark.slow
@SETTINGS
@given(documents)
def test_any_yaml_document_is_a_config_or_a_config_error(doc) -> None:
    text = yaml.safe_dump(doc, allow_unicode=True)
    assert load_text(text) in ("ok", "error")


@SETTINGS
@given(st.text(max_size=400))
def test_any_text_is_a_config_or_a_config_error(text) -> None:
    assert load_text(text) in ("ok", "error")


@SETTINGS
@given(st.binary(max_size=400))
def test_any_bytes_are_a_config_or_a_config_error(data) -> None:
    assert load_text(data) in ("ok", "error")


override_values = st.one_of(st.text(max_size=40), values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))
overrides = st.lists(st.one_of(
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(list(SECTIONS)), st.sampled_from(sum(KEYS.values(), [])),
              override_values),
    st.text(max_size=40)), max_size=5)


@SETTINGS
@given(overrides)
def test_any_override_list_is_a_config_or_a_config_error(items) -> None:
    assert outcome(lambda: load_config(None, items)) in ("ok", "error")


def _field_values(annotation):
    kind = typing.get_args(annotation)[0] if typing.get_origin(annotation) in (typing.Union,) else annotation
    return st.one_of(scalars, st.lists(scalars, max_size=3).map(tuple)) if kind else scalars


@SETTINGS
@given(st.sampled_from(list(SECTIONS)), st.data())
def test_a_config_built_in_python_with_any_values_validates_or_raises_config_error(name, data) -> None:
    cls = SECTIONS[name]
    chosen = data.draw(st.lists(st.sampled_from(KEYS[name]), max_size=4, unique=True))
    kwargs = {k: data.draw(st.one_of(scalars, st.lists(scalars, max_size=3).map(tuple))) for k in chosen}
    assert outcome(lambda: Config(**{name: cls(**kwargs)}).validate()) in ("ok", "error")


# ---------------------------------------------------------------------------------- named cases
NAMED = {
    "lr inf": (None, ["train.learning_rate=inf"]),
    "lr .inf": (None, ["train.learning_rate=.inf"]),
    "lr nan": (None, ["train.learning_rate=nan"]),
    "alpha nan": (None, ["lora.alpha=nan"]),
    "betas nan": (None, ["train.adam_betas=[.nan, 0.9]"]),
    "rank 1e9": (None, ["lora.rank=1000000000"]),
    "resolution 2^20": (None, ["data.resolution=1048576"]),
    "batch 2^40": (None, ["train.batch_size=1099511627776"]),
    "seed negative": (None, ["train.seed=-1"]),
    "seed 2^64": (None, ["train.seed=18446744073709551616"]),
    "shift inf": (None, ["train.timestep_shift=1e400"]),
    "int section": ("train: 5\n", []),
    "list section": ("lora: [1, 2]\n", ["lora.rank=8"]),
    "int key": ("train:\n  1: 2\n", []),
    "null key": ("train:\n  ~: 2\n", []),
    "null section key": ("~: {}\n", []),
    "top-level list": ("- a\n- b\n", []),
    "top-level scalar": ("42\n", []),
    "deep nesting": ("train: " + "[" * 5000 + "]" * 5000 + "\n", []),
    "deep mapping": ("".join("  " * i + f"k{i}:\n" for i in range(400)) + "  " * 400 + "v: 1\n", []),
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        + "train: {validation_prompts: *i}\n", []),
    "alias in override": (None, ["train.validation_prompts=[&a [a, a, a], *a, *a]"]),
    "deep override": (None, ["train.seed=" + "[" * 3000 + "]" * 3000]),
    "utf-16": ("model: {name: tiny}\n".encode("utf-16"), []),
    "utf-16 without BOM": ("model: {name: tiny}\n".encode("utf-16-le"), []),
    "binary": (bytes(range(256)) * 4, []),
    "NUL in text": ("model: {name: \"ti\\0ny\"}\n", []),
    "latin-1": ("data: {trigger_word: caf\xe9}\n".encode("latin-1"), []),
    "huge string": ("data: {trigger_word: " + "x" * 20000 + "}\n", []),
    "bad yaml": ("train: [1, 2\n", []),
    "tab indent": ("train:\n\tseed: 1\n", []),
    "duplicate anchors": ("a: &x 1\nb: &x 2\ntrain: {seed: *x}\n", []),
    "unknown tag": ("train: !!python/object:os.system {}\n", []),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_hostile_configs_are_one_config_error(name) -> None:
    text, items = NAMED[name]
    result = outcome(lambda: load_config(None, items)) if text is None else load_text(text, items)
    assert result == "error", name


def test_a_folder_or_a_missing_file_as_config(tmp_path) -> None:
    for path, needle in ((tmp_path, "is a folder"), (tmp_path / "nope.yaml", "does not exist")):
        with pytest.raises(ConfigError, match=needle):
            load_config(path)


def test_messages_name_the_key_and_the_bound() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.learning_rate=nan", "lora.rank=1000000000", "data.resolution=1048576"])
    text = str(info.value)
    assert "train.learning_rate=nan must be a finite number" in text
    assert "lora.rank=1000000000 is out of range; it must be between 1 and 1_024" in text
    assert "data.resolution=1048576" in text
    assert "--train." not in text  # item 5: no flag that does not exist


def test_a_wrong_choice_names_an_override_that_exists() -> None:
    with pytest.raises(ConfigError, match=r"pass train\.optimizer=<one of them>"):
        load_config(None, ["train.optimizer=sgd"])


def test_an_out_of_range_value_does_not_hide_the_sections_own_problems() -> None:
    from sd35hub.config import TrainSpec

    with pytest.raises(ConfigError) as info:
        Config(train=TrainSpec(learning_rate=-1.0, timestep_sampling="bogus")).validate()
    assert len(info.value.problems) == 2, info.value.problems
