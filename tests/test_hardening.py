"""Classes of hostile or careless input (issue: hardening), each tested on several instances:
outputs that overlap, names that are paths, artifact tables that parse but hold the wrong thing,
and a stage with zero epochs. Every refusal names the file, key or name, and leaves what was
already produced byte for byte as it was.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sparse_core import artifacts, schemas
from sparse_core.artifacts import ArtifactError, ForeignFolderError
from sparse_core.config import ConfigError, UnknownNameError, output_overlaps, parse_params, plain_name

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: to show a refusal changed nothing."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ----- 1. outputs that overlap ------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes,keys",
    [
        ({"runs_dir": "ensembles"}, ["base.runs_dir", "base.ensembles_dir"]),  # the example
        ({"runs_dir": "."}, ["base.runs_dir", "base.data_dir"]),  # the project itself
        ({"plots_dir": "metrics/plots"}, ["base.plots_dir", "base.metrics_dir"]),  # inside another
        ({"metrics_dir": "./runs/../runs"}, ["base.metrics_dir", "base.runs_dir"]),  # same after normalising
        ({"data_dir": "runs/data"}, ["base.data_dir", "base.runs_dir"]),
        ({"ensembles_dir": "plots", "plots_dir": "plots/"}, ["base.ensembles_dir", "base.plots_dir"]),
    ],
)
def test_output_settings_that_overlap_are_refused_naming_both_keys(default_params_dict, changes, keys):
    raw = copy.deepcopy(default_params_dict)
    raw["base"].update(changes)
    with pytest.raises(ConfigError) as exc:
        parse_params(raw, "params.yaml")
    text = str(exc.value)
    assert "params.yaml" in text and all(k in text for k in keys), text


@pytest.mark.parametrize(
    "key,value,reserved",
    [("runs_dir", "sparse_core/runs", "sparse_core"), ("plots_dir", "reports/plots", "reports"),
     ("metrics_dir", ".git", ".git"), ("data_dir", "profiles", "profiles"), ("ensembles_dir", ".dvc/tmp/e", ".dvc"),
     ("runs_dir", "tests/../flows", "flows")],
)  # fmt: skip
def test_output_settings_inside_the_code_git_dvc_or_reports_are_refused(default_params_dict, key, value, reserved):
    raw = copy.deepcopy(default_params_dict)
    raw["base"][key] = value
    with pytest.raises(ConfigError, match=rf"base\.{key} = .*'{reserved}'"):
        parse_params(raw, "params.yaml")


def test_external_outputs_that_overlap_are_refused_too(default_params_dict, tmp_path):
    raw = copy.deepcopy(default_params_dict)
    raw["base"].update(allow_external_paths=True, runs_dir=str(tmp_path / "out"), metrics_dir=str(tmp_path / "out" / "m"))
    with pytest.raises(ConfigError, match="base.metrics_dir .* lies inside base.runs_dir"):
        parse_params(raw, "params.yaml")
    assert output_overlaps({"a": str(tmp_path / "x"), "b": str(tmp_path / "y")}) == []


def test_every_shipped_profile_keeps_its_outputs_apart():
    for path in sorted((REPO / "profiles").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        base = raw.get("base", {})
        assert output_overlaps({k: base.get(k.split(".")[1], d) for k, d in
                                [("base.data_dir", "data"), ("base.runs_dir", "runs"), ("base.metrics_dir", "metrics"),
                                 ("base.plots_dir", "plots"), ("base.ensembles_dir", "ensembles")]}, REPO) == [], path  # fmt: skip


def _run_folder(root: Path) -> Path:
    """A trained ensemble's run folder: member checkpoints, weights and masks."""
    folder = root / "runs" / "s0" / "dst_ensemble"
    for i in range(2):
        member = folder / f"member_{i}"
        member.mkdir(parents=True)
        artifacts.write_json({"run": f"dst_ensemble/member_{i}"}, member / "config.json")
        (member / "model.safetensors").write_bytes(b"weights %d" % i)
    return folder


def test_collect_does_not_replace_a_folder_holding_a_trained_run(tmp_path):
    """The issue's example: with runs and ensembles in one folder, ``collect`` would have swapped
    the trained ensemble's run folder for its cache."""
    from sparse_core.jobs.ensembles import ENSEMBLE_FILES

    folder = _run_folder(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(ForeignFolderError, match=r"dst_ensemble: collect@dst_ensemble .* holds member_0, member_1"):
        with artifacts.atomic_dir(folder, holds=ENSEMBLE_FILES, owner="collect@dst_ensemble") as tmp:
            (tmp / "members.json").write_text("[]")
    assert _tree(tmp_path) == before
    assert [p.name for p in folder.parent.iterdir()] == ["dst_ensemble"]  # no temporary folder left behind


@pytest.mark.parametrize(
    "entries,holds,owner",
    [
        (["notes.txt", "thesis.tex"], ("model.safetensors", "arch.json"), "export (compact)"),  # a mistyped --out
        (["model.safetensors", "config.json", "last.pt"], ("manifest.json", "*.safetensors"), "ood"),  # a run folder
        (["raw.parquet", "manifest.json"], ("members.json", "probs.parquet", "eval_probs.safetensors"), "collect@e"),
        (["sub"], ("*.parquet",), "prepare"),
    ],
)
def test_a_stage_replaces_only_folders_holding_what_it_writes(tmp_path, entries, holds, owner):
    folder = tmp_path / "out"
    folder.mkdir()
    for name in entries:
        if "." in name:
            (folder / name).write_text(name)
        else:
            (folder / name).mkdir()
    before = _tree(tmp_path)
    with pytest.raises(ForeignFolderError, match=re.escape(f"{folder}: {owner} would replace")):
        with artifacts.atomic_dir(folder, holds=holds, owner=owner):
            raise AssertionError("the block must not run")
    assert _tree(tmp_path) == before


def test_a_stage_still_replaces_its_own_folder_and_leftover_temporaries(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / "members.json").write_text("old")
    (folder / ".probs.parquet.abc.tmp").write_text("left by a killed write")
    with artifacts.atomic_dir(folder, holds=("members.json", "probs.parquet"), owner="collect@e") as tmp:
        (tmp / "members.json").write_text("new")
    assert (folder / "members.json").read_text() == "new" and len(list(folder.iterdir())) == 1


def test_a_file_or_link_where_a_folder_belongs_is_not_replaced(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "a.txt").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(target)
    afile = tmp_path / "file"
    afile.write_text("keep")
    for dest in (link, afile):
        with pytest.raises(ForeignFolderError, match="not a folder"):
            with artifacts.atomic_dir(dest, holds=("*",), owner="export (onnx)"):
                pass
    assert (target / "a.txt").read_text() == "keep" and afile.read_text() == "keep" and link.is_symlink()


@pytest.mark.parametrize(
    "content,match",
    [
        ({"config.json": '{"run": "rigl"}'}, "names run 'rigl', not 'dpf'"),  # another run's folder
        ({"config.json": '{"run": "dpf"}', "probs.parquet": "x"}, "holds probs.parquet"),  # an ensembles cache
        ({"report.md": "# results"}, "holds report.md"),
        ({"config.json": "{not json"}, "not valid JSON"),
    ],
)
def test_a_run_folder_is_cleared_only_for_the_same_run(tmp_path, monkeypatch, default_params_dict, content, match):
    from sparse_core.jobs.rundirs import fresh_run_dir

    monkeypatch.chdir(tmp_path)
    params = parse_params(default_params_dict).for_seed(0)
    folder = tmp_path / "runs" / "s0" / "dpf"
    folder.mkdir(parents=True)
    for name, text in content.items():
        (folder / name).write_text(text)
    before = _tree(tmp_path)
    with pytest.raises(ArtifactError, match=match):
        fresh_run_dir(params, "dpf", "fingerprint")
    assert _tree(tmp_path) == before


def test_a_run_folder_of_the_same_run_is_cleared(tmp_path, monkeypatch, default_params_dict):
    from sparse_core.jobs.rundirs import fresh_run_dir

    monkeypatch.chdir(tmp_path)
    params = parse_params(default_params_dict).for_seed(0)
    folder = tmp_path / "runs" / "s0" / "dpf"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"run": "dpf"}')
    (folder / "model.safetensors").write_bytes(b"old")
    assert fresh_run_dir(params, "dpf", "fingerprint") == Path("runs/s0/dpf")
    assert list(folder.iterdir()) == []


# ----- 2. names that are paths ------------------------------------------------------------------
@pytest.mark.parametrize("value", ["../../somewhere/x", "/etc/passwd", "tiny/../tiny", "./tiny", "tiny\x00", "..", ""])
def test_plain_name_refuses_paths_and_unknown_names(value):
    with pytest.raises(UnknownNameError, match="profile .* is unknown"):
        plain_name(value, ["tiny", "default"], "profile")
    assert plain_name("tiny", ["tiny", "default"], "profile") == "tiny"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with the repository's profiles and params.yaml, and a valid params file
    outside ``profiles/`` (what a path-as-name would reach)."""
    import shutil

    shutil.copytree(REPO / "profiles", tmp_path / "project" / "profiles")
    shutil.copyfile(REPO / "params.yaml", tmp_path / "project" / "params.yaml")
    shutil.copyfile(REPO / "profiles" / "tiny.yaml", tmp_path / "outside.yaml")
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path / "project"


@pytest.mark.parametrize("name", ["../../outside", "../outside", str(Path("..").resolve() / "outside"), "linked"])
def test_profile_names_are_matched_not_joined(project, name, capsys):
    from flows.cli import main

    (project / "profiles" / "linked.yaml").symlink_to(project.parent / "outside.yaml")  # a link out of profiles/
    before = (project / "params.yaml").read_bytes()
    assert main(["profile", name]) == 1
    err = capsys.readouterr().err
    assert f"profile {name!r} is unknown" in err and "tiny" in err
    assert (project / "params.yaml").read_bytes() == before


def test_a_known_profile_still_switches(project):
    from flows.cli import main

    assert main(["profile", "tiny"]) == 0
    assert (project / "params.yaml").read_bytes() == (project / "profiles" / "tiny.yaml").read_bytes()


@pytest.mark.parametrize(
    "argv,what",
    [
        (["run", "train", "--method", "../../x"], "train --method '../../x'"),
        (["run", "evaluate", "--run", "/etc"], "evaluate --run '/etc'"),
        (["run", "collect", "--run", "dst_ensemble/../rigl"], "collect --run 'dst_ensemble/../rigl'"),
        (["run", "retrain", "--run", "rigl"], "retrain --run 'rigl'"),  # a method, but not a retrained run
        (["run", "aggregate", "--run", "..."], "aggregate --run '...'"),
        (["sweep", "--method", "../dpf", "--sparsity", "0.5"], "sweep --method '../dpf'"),
        (["local-worker", "--method", "dense/.."], "local-worker --method 'dense/..'"),
    ],
)
def test_run_and_method_names_on_the_command_line_are_matched(project, argv, what, capsys):
    from flows.cli import main

    before = _tree(project)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert what in err and "known:" in err, err
    assert _tree(project) == before


# ----- 7. artifact tables read back are validated -----------------------------------------------
def _history() -> pd.DataFrame:
    return pd.DataFrame({"epoch": [1, 2], "step": [10, 20], "lr": [0.1, 0.05], "train_loss": [1.0, 0.5],
                         "train_accuracy": [0.5, 0.7], "val_loss": [1.1, 0.6], "val_accuracy": [0.5, 0.69],
                         "sparsity": [0.0, 0.0], "seconds": [1.0, 1.0], "images_per_s": [100.0, 100.0]})  # fmt: skip


def _updates() -> pd.DataFrame:
    return pd.DataFrame({"step": [10, 20], "kind": ["drop_grow", "drop_grow"], "drop_fraction": [0.3, 0.2],
                         "regrown": [5, 4], "sparsity": [0.8, 0.8], "exploration_rate": [0.3, 0.35],
                         "moved_fraction": [0.1, 0.05], "moved_fraction/fc1.weight": [0.1, 0.05]})  # fmt: skip


@pytest.mark.parametrize(
    "make,schema,breakage,column",
    [
        (_updates, schemas.MASK_UPDATES_SCHEMA, lambda d: d.assign(step=d["step"].astype(str)), "step"),  # the issue's
        (_updates, schemas.MASK_UPDATES_SCHEMA, lambda d: d.assign(step=[20, 10]), "step must not decrease"),
        (_updates, schemas.MASK_UPDATES_SCHEMA, lambda d: d.assign(**{"moved_fraction/fc1.weight": [0.1, 7.0]}), "moved_fraction/fc1.weight"),
        (_updates, schemas.MASK_UPDATES_SCHEMA, lambda d: d.drop(columns=["sparsity"]), "sparsity"),
        (_history, schemas.HISTORY_SCHEMA, lambda d: d.drop(columns=["val_accuracy"]), "val_accuracy"),
        (_history, schemas.HISTORY_SCHEMA, lambda d: d.assign(epoch=[1.5, 2.5]), "epoch"),
        (_history, schemas.HISTORY_SCHEMA, lambda d: d.assign(val_accuracy=["high", "low"]), "val_accuracy"),
    ],
)  # fmt: skip
def test_parquet_tables_that_break_their_schema_are_refused(tmp_path, make, schema, breakage, column):
    path = tmp_path / "table.parquet"
    artifacts.write_parquet(make(), path)
    artifacts.read_parquet(path, schema=schema)  # the intact table passes
    artifacts.write_parquet(breakage(make()), path)
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(path))}: does not match its schema: .*{re.escape(column)}"):
        artifacts.read_parquet(path, schema=schema)


def test_a_probs_cache_with_wrong_rows_is_refused(tmp_path):
    df = pd.DataFrame({"member": [0, 0], "split": ["val", "test"], "index": [0, 0], "label": [1, 1],
                       "probs": [np.array([0.5, 0.5]), np.array([0.2, 0.3])]})  # second row sums to 0.5  # fmt: skip
    artifacts.write_parquet(df, tmp_path / "probs.parquet")
    with pytest.raises(ArtifactError, match="probs.parquet: does not match its schema: .*sum to 1"):
        artifacts.read_parquet(tmp_path / "probs.parquet", schema=schemas.probs_schema(2))


@pytest.mark.parametrize(
    "text,schema,match",
    [
        ("\n", schemas.HISTORY_SCHEMA, "empty file"),  # the one-byte warmup.csv
        ("", schemas.LAYERS_CSV_SCHEMA, "empty file"),
        ("name,numel,density\nfc.weight,-3,0.5\n", schemas.LAYERS_CSV_SCHEMA, "numel"),
        ("corruption,severity,accuracy\nfog,9,0.5\n", schemas.CORRUPTION_CSV_SCHEMA, "severity"),
        ("lower,upper,count,confidence,accuracy\n0,0.5,x,0.2,0.3\n", schemas.RELIABILITY_CSV_SCHEMA, "count"),
    ],
)
def test_csv_tables_that_break_their_schema_are_refused(tmp_path, text, schema, match):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(path))}: .*{match}"):
        artifacts.read_csv(path, schema=schema)


def test_every_reader_of_a_table_passes_a_schema():
    """The class, not the instances: no module reads a Parquet or CSV artifact without its schema."""
    offenders = []
    for path in [*(REPO / "sparse_core").rglob("*.py"), *(REPO / "flows").glob("*.py"), *(REPO / "tasks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in ("read_parquet", "read_csv") and not any(k.arg == "schema" for k in node.keywords):
                    if not (isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "pd" and name == "read_csv"
                            and path.name == "artifacts.py"):  # fmt: skip
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_malformed_json_artifacts_name_their_file(tmp_path):
    for text in ("{not json", "", "\xff\xfe"):
        path = tmp_path / "config.json"
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ArtifactError, match=rf"{re.escape(str(path))}: not (valid JSON|a UTF-8)"):
            artifacts.read_json(path)


# ----- 8. zero epochs, and a report of this profile's runs only ---------------------------------
def test_a_zero_epoch_history_is_a_valid_empty_table(tmp_path):
    empty = schemas.empty_history()
    artifacts.write_parquet(empty, tmp_path / "h.parquet")
    artifacts.write_csv(empty, tmp_path / "h.csv")
    assert artifacts.read_parquet(tmp_path / "h.parquet", schema=schemas.HISTORY_SCHEMA).empty
    assert list(artifacts.read_csv(tmp_path / "h.csv", schema=schemas.HISTORY_SCHEMA).columns) == list(schemas.HISTORY_COLUMNS)


def test_training_curves_draw_only_this_profiles_runs(tmp_path, monkeypatch, default_params_dict):
    """A CSV left in plots/history by another profile (or run) is not drawn; an empty warmup
    history (zero warmup epochs) is skipped, not a crash."""
    from sparse_core import figures

    monkeypatch.chdir(tmp_path)
    params = parse_params(default_params_dict).for_seed(0)
    history = Path(params.base.plots_dir) / "history"
    artifacts.write_csv(_history(), history / "dense.csv")
    artifacts.write_csv(_history(), history / "from_another_profile.csv")
    artifacts.write_csv(schemas.empty_history(), history / "warmup.csv")
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.extend(t.get_label() for t in fig.axes[0].get_lines()))
    figures.training_curves(params, ["dense", "dpf"], tmp_path / "curves.png")
    assert drawn == ["dense"]


# ----- 3. resource bounds -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "path,value",
    [
        ("train.epochs", 1e12), ("train.optim.batch_size", 1e9), ("train.dst_ensemble.members", 1e9),  # the issue's
        ("base.num_threads", 1e8), ("corrupt.test_subset", 1e19),
        ("warmup.epochs", 10**6), ("evaluate.batch_size", 10**7), ("train.edst.tickets", 1000),
        ("ood.max_examples", 10**9), ("train.optim.milestones", [10, 10**8]), ("local.chunks", 10**4),
        ("orchestration.max_workers", 10**5), ("train.dst.update_period", 10**12),
    ],
)  # fmt: skip
def test_size_like_settings_have_upper_bounds(default_params_dict, path, value):
    raw = copy.deepcopy(default_params_dict)
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    with pytest.raises(ConfigError, match=re.escape(path)):
        parse_params(raw, "params.yaml")


@pytest.mark.parametrize(
    "model,shape,batches,key",
    [
        ("resnet20", (3, 32, 32), {"train.optim.batch_size": 65536, "evaluate.batch_size": 1000}, "train.optim.batch_size"),
        ("lenet5", (1, 28, 28), {"train.optim.batch_size": 128, "evaluate.batch_size": 65536}, "evaluate.batch_size"),
        ("wrn28_10", (3, 32, 32), {"warmup.optim.batch_size": 4096}, "warmup.optim.batch_size"),
    ],
)
def test_a_stage_that_would_not_fit_in_memory_is_refused_before_it_starts(model, shape, batches, key):
    import torch

    from sparse_core.models import create_model
    from sparse_core.resources import ResourceError, check_memory

    net = create_model(model, num_classes=10, in_channels=shape[0], image_size=shape[1])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ResourceError, match=rf"x: needs about .* GiB \({re.escape(key)} = .* lower {re.escape(key)}"):
        check_memory("x", net, shape, batches, torch.device("cpu"), available=2 * 2**30)
    assert net.training and all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # the probe changed nothing
    assert check_memory("x", net, shape, {k: 8 for k in batches}, torch.device("cpu"), available=2 * 2**30) < 2 * 2**30


# ----- 6. every error names its file, key or run ------------------------------------------------
from tests.test_export import workspace  # noqa: E402,F401  (fixture: a project with three exported runs)


def _cli(argv: list[str]) -> int:
    from flows.cli import main

    return main(argv)


def test_weights_that_do_not_fit_the_model_are_named(workspace, capsys):  # noqa: F811
    import torch

    gmp = workspace / "runs" / "s0" / "gmp" / "model.safetensors"
    gmp.write_bytes((workspace / "runs" / "s0" / "dpf" / "model.safetensors").read_bytes())  # a LeNet-5 in a ResNet-8 run
    assert _cli(["export", "--run", "gmp", "--format", "onnx"]) == 1
    err = capsys.readouterr().err
    assert f"{Path('runs/s0/gmp/model.safetensors')}: does not fit the model" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, err
    net = torch.nn.Linear(3, 2)
    artifacts.save_tensors({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, workspace / "w.safetensors")
    with pytest.raises(ArtifactError, match=r"w.safetensors: does not fit the model \(shapes differ: weight \(2, 4\)"):
        artifacts.load_weights(net, workspace / "w.safetensors")
    artifacts.save_tensors({"weight": torch.zeros(2, 3)}, workspace / "w.safetensors")
    with pytest.raises(ArtifactError, match="missing: bias"):
        artifacts.load_weights(net, workspace / "w.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named(tmp_path, value):
    import torch

    net = torch.nn.Linear(3, 2)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["bias"][1] = value
    artifacts.save_tensors(sd, tmp_path / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"model.safetensors: tensor 'bias' holds NaN or infinite values"):
        artifacts.load_weights(net, tmp_path / "model.safetensors")


@pytest.mark.parametrize("text", ["{", '{"run": "gmp",}', "\x00\x01"])
def test_a_malformed_config_json_is_named_by_the_cli(workspace, capsys, text):  # noqa: F811
    (workspace / "runs" / "s0" / "gmp" / "config.json").write_text(text)
    assert _cli(["export", "--run", "gmp", "--format", "compact"]) == 1
    err = capsys.readouterr().err
    assert "runs/s0/gmp/config.json: not valid JSON" in err and "Traceback" not in err


def test_debug_shows_the_traceback(workspace, capsys, monkeypatch):  # noqa: F811
    from sparse_core.config import UnknownNameError

    assert _cli(["export", "--run", "nope", "--format", "onnx"]) == 1
    with pytest.raises(UnknownNameError):
        _cli(["--debug", "export", "--run", "nope", "--format", "onnx"])
    monkeypatch.setenv("SPARSEFLOW_DEBUG", "1")
    with pytest.raises(UnknownNameError):
        _cli(["export", "--run", "nope", "--format", "onnx"])


def _serialize_with(error: BaseException):
    """A params loader whose pydantic serializer meets ``error`` (as a signal handler's
    KeyboardInterrupt would, landing inside ``model_dump``)."""
    from pydantic import BaseModel, model_serializer

    class Params(BaseModel):
        a: int = 1

        @model_serializer
        def _ser_model(self):
            raise error

    return lambda _path: Params().model_dump()


def _via_context(_path):
    try:
        raise KeyboardInterrupt("SIGTERM")
    except KeyboardInterrupt:
        raise RuntimeError("a library's own error, raised while handling the interrupt")  # noqa: B904


@pytest.mark.parametrize(("loader", "status", "line"), [
    (_serialize_with(KeyboardInterrupt("SIGTERM")), 143, "stopped by SIGTERM"),
    (_serialize_with(KeyboardInterrupt("SIGINT")), 130, "stopped by SIGINT"),
    (_via_context, 143, "stopped by SIGTERM"),
    (_serialize_with(OSError("not a stop")), 1, "not a stop"),
], ids=["pydantic-SIGTERM", "pydantic-SIGINT", "context", "other-error"])  # fmt: skip
def test_a_stop_wrapped_by_a_library_is_the_stop(tmp_path, capsys, monkeypatch, loader, status, line):
    """CI found it: SIGTERM 0.05 s into `sparseflow run prepare` landed in pydantic's serializer,
    which re-raises it as PydanticSerializationError (a ValueError); the command reported it as
    an error (exit 1) instead of the stop it was (143). A library error that merely *is* an
    error keeps its one line and exit 1 (the RuntimeError of the `context` case would have been
    re-raised as a bug)."""
    import flows.cli

    monkeypatch.setattr(flows.cli, "load_params", loader)
    assert _cli(["validate", "--params", str(tmp_path / "params.yaml")]) == status
    err = capsys.readouterr().err
    assert line in err and "Traceback" not in err, err
    if status != 1:
        assert "_ser_model" not in err and "Error calling" not in err, err


@pytest.mark.parametrize("user_value", [None, "7"])
def test_the_temporary_server_gets_time_to_start_unless_the_user_says(monkeypatch, user_value):
    """Prefect's 20 s for its temporary server ran out in CI on a loaded 2-core machine; the
    command raises it for itself and its stage processes, and keeps a value the user set."""
    import flows.cli

    monkeypatch.setenv(flows.cli.EPHEMERAL_STARTUP_ENV, user_value or "unset below")  # restored after the test
    if user_value is None:
        monkeypatch.delenv(flows.cli.EPHEMERAL_STARTUP_ENV)
    assert _cli(["validate", "--params", str(Path(__file__).resolve().parents[1] / "params.yaml")]) == 0
    assert os.environ[flows.cli.EPHEMERAL_STARTUP_ENV] == (user_value or "120")


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    dest = tmp_path / "metrics" / "dpf.json"
    artifacts.write_json({"old": 1}, dest)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # the OS's message names no file

    monkeypatch.setattr(artifacts.json, "dumps", full)
    with pytest.raises(artifacts.StorageError, match=rf"{re.escape(str(dest))}: cannot write \(No space left on device\)"):
        artifacts.write_json({"new": 2}, dest)
    monkeypatch.undo()
    assert artifacts.read_json(dest) == {"old": 1} and [p.name for p in dest.parent.iterdir()] == ["dpf.json"]


def test_a_file_size_limit_names_the_file(tmp_path):
    """A real storage limit (RLIMIT_FSIZE: the kernel refuses the write with EFBIG), in a child
    process; safetensors, Parquet and JSON writers are each named."""
    import subprocess
    import sys

    code = f"""
import resource, signal, sys, numpy as np, pandas as pd, torch
sys.path.insert(0, {str(REPO)!r})
from sparse_core import artifacts
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
for name, write in [("t.safetensors", lambda p: artifacts.save_tensors({{"w": torch.zeros(10000)}}, p)),
                    ("t.parquet", lambda p: artifacts.write_parquet(pd.DataFrame({{"x": np.arange(100000)}}), p)),
                    ("t.json", lambda p: artifacts.write_json(list(range(10000)), p))]:
    try:
        write({str(tmp_path)!r} + "/" + name)
        print("WROTE", name)
    except artifacts.StorageError as exc:
        print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stdout + out.stderr
    for line, name in zip(lines, ["t.safetensors", "t.parquet", "t.json"]):
        assert line.startswith(f"{tmp_path}/{name}: cannot write (File too large)"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial file under any name


@pytest.mark.parametrize("where", ["/etc", "missing", "another_dvc_project", "parent"])
def test_the_pipeline_runs_only_in_this_checkout(tmp_path, monkeypatch, where):
    """``repo_dir`` is a deployment parameter that a run can override: it must not point the
    pipeline at another folder or another DVC project."""
    from flows.repro_flow import project_root

    target = {"/etc": Path("/etc"), "missing": tmp_path / "nowhere", "another_dvc_project": tmp_path,
              "parent": REPO.parent}[where]  # fmt: skip
    (tmp_path / "dvc.yaml").write_text("stages:\n  pwn:\n    cmd: touch pwned\n")
    monkeypatch.chdir(REPO)
    with pytest.raises(FileNotFoundError, match="not this project's checkout"):
        project_root(target)
    assert project_root(".") == REPO == project_root(REPO)
    monkeypatch.chdir(tmp_path)  # a served run works in its own folder
    assert project_root(".") == tmp_path.resolve()
