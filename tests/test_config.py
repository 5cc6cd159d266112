"""params.yaml validation: bad values stop with one message naming key, value and what is allowed."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparse_core.config import ConfigError, load_params, parse_params


def test_default_params_are_valid(default_params_dict):
    params = parse_params(default_params_dict)
    assert params.train.pruning.sparsity == pytest.approx(0.9)
    assert set(params.train.methods) == {"dense", "dpf", "gmp", "oneshot", "rigl", "dst_ensemble", "edst_ensemble",
                                         "local_greedy", "local_overlap", "local_chunked"}  # fmt: skip
    assert params.local.execution == "simulate" and params.local.chunks == 2
    assert params.train.dst.sparsity == pytest.approx(0.8)


@pytest.mark.parametrize(
    "path, value, expect",
    [
        (("train", "pruning", "sparsity"), 1.2, ["train.pruning.sparsity", "1.2", "less than 1"]),
        (("model", "name"), "resnet9000", ["model.name", "resnet9000", "allowed", "resnet20"]),
        (("train", "methods"), ["dense", "magic"], ["train.methods.1", "magic", "dpf"]),
        (("train", "epochs"), -3, ["train.epochs", "-3", "greater than 0"]),
        (("data", "dataset"), "imagenet", ["data.dataset", "imagenet", "fashion_mnist"]),
        (("train", "optim", "schedule"), "linear", ["train.optim.schedule", "linear", "cosine"]),
    ],
)
def test_bad_value_names_key_value_and_allowed(default_params_dict, path, value, expect):
    raw = copy.deepcopy(default_params_dict)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        parse_params(raw, "params.yaml")
    msg = str(info.value)
    assert msg.startswith("params.yaml:")
    for part in expect:
        assert part in msg, (part, msg)


def test_missing_key_is_named(default_params_dict):
    raw = copy.deepcopy(default_params_dict)
    del raw["model"]
    with pytest.raises(ConfigError, match=r"model: missing required key"):
        parse_params(raw)


def test_unknown_key_is_an_error(default_params_dict):
    raw = copy.deepcopy(default_params_dict)
    raw["train"]["pruning"]["sparisty"] = 0.5
    with pytest.raises(ConfigError, match=r"train\.pruning\.sparisty"):
        parse_params(raw)


def test_retrain_and_evaluate_must_name_produced_runs(default_params_dict):
    raw = copy.deepcopy(default_params_dict)
    raw["evaluate"]["runs"] = ["dense", "gmp_retrain"]
    with pytest.raises(ConfigError, match="gmp_retrain"):
        parse_params(raw)


def test_yaml_python_tags_are_refused(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("base: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_cli_rejects_bad_params_before_writing(tmp_path, default_params_dict):
    raw = copy.deepcopy(default_params_dict)
    raw["train"]["pruning"]["sparsity"] = 1.2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "prepare"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 2, proc.stderr
    assert "train.pruning.sparsity = 1.2" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_local_pipeline_cannot_compose_with_a_sparse_method(default_params_dict):
    raw = dict(default_params_dict)
    raw["local"] = {"execution": "pipeline", "sparse_method": "dpf"}
    with pytest.raises(ConfigError, match="execution 'pipeline' trains dense chunks only"):
        parse_params(raw)


# ----- training seeds and the curves section ---------------------------------------------------
@pytest.mark.parametrize(
    "seeds, message",
    [
        ([0, 1, 0], "repeat a value"),
        ([-1], "outside 0..2\\*\\*32-1"),
        ([2**32], "outside 0..2\\*\\*32-1"),
        ([], "at least 1"),
        (list(range(101)), "at most 100"),
        ("0,1", "list"),
    ],
)
def test_bad_training_seeds_are_refused_naming_the_key(default_params_dict, seeds, message):
    from sparse_core.config import ConfigError, parse_params

    raw = default_params_dict
    raw["base"]["seeds"] = seeds
    with pytest.raises(ConfigError, match=rf"base\.seeds.*{message}"):
        parse_params(raw, "params.yaml")


def test_for_seed_moves_every_run_output_and_keeps_the_data(default_params_dict):
    from sparse_core.config import parse_params, seeded

    params = parse_params(default_params_dict)
    p = params.for_seed(7)
    assert (p.base.seed, p.base.runs_dir, p.base.metrics_dir, p.base.plots_dir, p.base.ensembles_dir) == (
        7, "runs/s7", "metrics/seeds/s7", "plots/seeds/s7", "ensembles/s7")
    assert p.base.data_dir == params.base.data_dir and p.data == params.data
    # The seed list is not fingerprinted: a run of seed 1 is the same run whatever else is listed.
    assert params.for_seed(1).fingerprint("base") == parse_params({**default_params_dict, "base": {
        **default_params_dict["base"], "seeds": [1, 5]}}).for_seed(1).fingerprint("base")
    assert seeded(params).base.seed == params.base.seeds[0]


@pytest.mark.parametrize("sparsities, message", [([0.5, 1.0], "outside"), ([-0.1], "outside"), ([0.5, 0.5], "repeat"), ([], "at least 1")])
def test_bad_curve_sparsities_are_refused(default_params_dict, sparsities, message):
    from sparse_core.config import ConfigError, parse_params

    raw = default_params_dict
    raw["curves"]["sparsities"] = sparsities
    with pytest.raises(ConfigError, match=rf"curves\.sparsities.*{message}"):
        parse_params(raw)


@pytest.mark.parametrize("value", ["-1", "x", str(2**32), "1.5"])
def test_cli_refuses_a_bad_seed_before_anything_runs(value, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as err:
        main(["run", "train", "--method", "dpf", "--seed", value])
    assert err.value.code == 2 and "--seed" in capsys.readouterr().err
