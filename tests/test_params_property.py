"""Property tests of params validation: whatever a params mapping holds, ``parse_params``
returns a ``Params`` or raises ``ConfigError`` naming the source, never another exception;
and values inside the documented ranges are accepted as given.

Examples start from the project's valid ``params.yaml`` and mutate it: values replaced by
junk of any type (nested lists and mappings included), numbers out of range, keys deleted,
unknown keys added, whole sections replaced.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_core.config import (MAX_EPOCHS, OUTPUT_KEYS, ConfigError, DataSection, Params, load_params, output_overlaps, parse_params,
                                train_images)
from sparse_core.sparsity.schedules import gradual_schedule_problem

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())
SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(node: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of the nested mappings of ``node`` (sections, keys, nested keys)."""
    out = []
    for key, value in node.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += _paths(value, (*prefix, key))
    return out


def _get(node, path):
    for key in path:
        node = node[key]
    return node


PATHS = _paths(DEFAULT)
DICT_PATHS = [()] + [p for p in PATHS if isinstance(_get(DEFAULT, p), dict)]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=8)
    | st.dates()
    | st.sampled_from(["/etc", "../..", "", "auto", "dense", "0.5", "1e-4", "yes", "\x00"])
)
junk = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), children, max_size=4),
    max_leaves=12,
)
#: A value of another plain type than the one a key holds (YAML's usual mix-ups included).
retyped = st.sampled_from([True, False, None, 0, 1, -1, 0.5, "", "1", "0.5", "yes", "off", [], [1], {}, {"a": 1}])
out_of_range = st.one_of(
    st.integers(min_value=-(10**12), max_value=-1),
    st.integers(min_value=2**32, max_value=2**80),
    st.floats(min_value=1.0, max_value=1e300),
    st.floats(max_value=-1e-300, min_value=-1e300),
    st.sampled_from([0, 0.0, 1, 1.0, -0.0, float("inf"), float("-inf"), float("nan")]),
)


@st.composite
def mutation(draw, raw: dict) -> None:
    """Apply one random mutation to ``raw`` in place."""
    kind = draw(st.sampled_from(["replace", "retype", "out_of_range", "delete", "unknown_key", "section"]))
    if kind in ("replace", "retype", "out_of_range", "delete"):
        live = [p for p in PATHS if _exists(raw, p)]
        if kind in ("retype", "out_of_range"):  # leaves: the typed values
            live = [p for p in live if not isinstance(_get(raw, p), dict)]
        if not live:
            return
        path = draw(st.sampled_from(live))
        parent = _get(raw, path[:-1])
        if kind == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw({"replace": junk, "retype": retyped, "out_of_range": out_of_range}[kind])
    elif kind == "unknown_key":
        live = [p for p in DICT_PATHS if _exists(raw, p) and isinstance(_get(raw, p), dict)]
        path = draw(st.sampled_from(live))
        key = draw(st.text(min_size=1, max_size=10) | st.integers() | st.sampled_from(["sparisty", "lr ", "Base"]))
        _get(raw, path)[key] = draw(junk)
    else:
        raw[draw(st.sampled_from(list(DEFAULT)))] = draw(junk)


def _exists(raw, path) -> bool:
    node = raw
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


@st.composite
def mutated_params(draw) -> dict:
    raw = copy.deepcopy(DEFAULT)
    for _ in range(draw(st.integers(1, 4))):
        draw(mutation(raw))
    return raw


def _parse_or_config_error(raw) -> Params | None:
    try:
        return parse_params(raw, "fuzzed.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzzed.yaml:"), str(exc)
        return None


@SETTINGS
@given(mutated_params())
def test_any_mutation_is_accepted_or_a_config_error(raw):
    params = _parse_or_config_error(raw)
    if params is not None:
        # Whatever is accepted is usable: fingerprinted (JSON) and round-trips through its dump.
        params.fingerprint("base", "data", "model", "train")
        assert Params.model_validate(params.model_dump(mode="json")) == params


@SETTINGS
@given(junk)
def test_any_top_level_value_is_accepted_or_a_config_error(value):
    _parse_or_config_error(value)


@SETTINGS
@given(st.one_of(st.text(max_size=200), mutated_params().map(lambda raw: yaml.dump(raw, allow_unicode=True))))
def test_any_params_file_is_accepted_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzzed_params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_params(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}:"), str(exc)


# ----- valid mutations are accepted as given ---------------------------------------------------
unit_interval = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)
positive = st.floats(min_value=1e-8, max_value=1e3, allow_nan=False, allow_infinity=False)
segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=8)
def _overlaps(raw: dict) -> list[str]:
    """What :func:`sparse_core.config.output_overlaps` finds in ``raw``'s output settings."""
    base = raw["base"]
    return output_overlaps({k: base.get(k.split(".")[1]) for k in OUTPUT_KEYS})


inside_path = st.lists(st.one_of(segment, st.just(".")), min_size=1, max_size=4).map("/".join)


@SETTINGS
@given(
    sparsity=unit_interval,
    dst_sparsity=unit_interval,
    epochs=st.integers(1, 10_000),
    lr=positive,
    momentum=st.floats(0.0, 0.99, allow_nan=False),
    batch_size=st.integers(1, 4096),
    seed=st.integers(0, 2**32 - 1),
    runs_dir=inside_path,
    extra_up=st.integers(0, 3),
)
def test_valid_values_are_accepted_as_given(sparsity, dst_sparsity, epochs, lr, momentum, batch_size, seed, runs_dir,
                                            extra_up):  # fmt: skip
    raw = copy.deepcopy(DEFAULT)
    raw["train"]["pruning"]["sparsity"] = sparsity
    raw["train"]["dst"]["sparsity"] = dst_sparsity
    raw["train"]["epochs"] = epochs
    raw["train"]["optim"].update(lr=lr, momentum=momentum, batch_size=batch_size)
    raw["base"]["seed"] = seed
    # ``..`` that climbs back down inside the project is fine.
    raw["base"]["runs_dir"] = "/".join(["sub"] * extra_up + [".."] * extra_up + [runs_dir])
    if not raw["train"]["edst"]["tickets"] <= round(raw["train"]["edst"]["budget"] * epochs) <= MAX_EPOCHS:
        # EDST needs a whole epoch per refinement phase, and its longer run must stay within the bound.
        raw["train"]["methods"].remove("edst_ensemble")
        raw["collect"]["ensembles"].remove("edst_ensemble")
    # Gradual pruning must reach its target at a mask update with training after it: too few
    # steps (a large batch on 20,000 images, few epochs) is refused, naming the keys to change.
    n = train_images(DataSection(**raw["data"]))
    p = raw["train"]["pruning"]
    if gradual_schedule_problem(-(-n // batch_size) * epochs, p["start_fraction"], p["end_fraction"], p["update_period"]):
        with pytest.raises(ConfigError, match=r"train\.pruning \(dpf, gmp\).*train\.pruning\.update_period"):
            parse_params(raw)
        return
    if _overlaps(raw):  # e.g. runs_dir "." or "data/x": outputs must stay apart (refused, naming the key)
        with pytest.raises(ConfigError, match=r"base\.runs_dir = "):
            parse_params(raw)
        return
    params = parse_params(raw)
    assert params.train.pruning.sparsity == sparsity and params.train.dst.sparsity == dst_sparsity
    assert params.train.epochs == epochs and params.train.optim.lr == lr and params.base.seed == seed
    assert params.base.runs_dir == raw["base"]["runs_dir"]


@SETTINGS
@given(
    key=st.sampled_from(["data_dir", "runs_dir", "metrics_dir", "plots_dir", "ensembles_dir"]),
    inside=inside_path,
    climb=st.integers(1, 4),
    absolute=st.booleans(),
)
def test_paths_leaving_the_project_are_refused(key, inside, climb, absolute):
    value = "/" + inside if absolute else "/".join([".."] * climb + [inside])
    if not absolute and not inside.strip("./"):
        value = "/".join([".."] * climb)
    raw = copy.deepcopy(DEFAULT)
    raw["base"][key] = value
    with pytest.raises(ConfigError, match=f"base.{key} = "):
        parse_params(raw)
    raw["base"]["allow_external_paths"] = True
    if _overlaps(raw):  # ".." or "/" hold the project itself: outside, but not apart
        with pytest.raises(ConfigError, match=f"base.{key} = "):
            parse_params(raw)
        return
    assert getattr(parse_params(raw).base, key) == value


@SETTINGS
@given(st.sampled_from([("train", "pruning", "sparsity"), ("train", "dst", "sparsity"), ("train", "optim", "momentum")]),
       st.one_of(st.floats(min_value=1.0, max_value=1e30), st.floats(max_value=-1e-9, min_value=-1e30),
                 st.sampled_from([float("nan"), float("inf")])))  # fmt: skip
def test_fractions_outside_zero_one_are_refused(path, value):
    raw = copy.deepcopy(DEFAULT)
    _get(raw, path[:-1])[path[-1]] = value
    with pytest.raises(ConfigError, match=".".join(path)):
        parse_params(raw)
    assert not (math.isfinite(value) and 0 <= value < 1)
