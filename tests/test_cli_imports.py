"""A stage's command line, its params validation and its Prefect flows load without the heavy
libraries (torch, torchvision, scikit-learn, pandas): they load inside the stage's task, where
the work needs them. Checked in fresh interpreters through ``sys.modules`` (behaviour, not
timing; the timing is ``benchmarks/orchestration.py``'s)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "torchvision", "sklearn", "pandas", "scipy", "matplotlib")


def _loaded_after(code: str) -> list[str]:
    probe = code + f"\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import flows.cli",
        "from flows.cli import _parser\n_parser().parse_args(['run', 'train', '--method', 'dpf', '--seed', '1'])",
        # the default params (no explicit corruption list): model names come from BUILTIN_MODELS
        "from sparse_core.config import load_params\nload_params('params.yaml')",
        # an explicit corruption list is checked against sparse_core.corruption_names
        "from sparse_core.config import load_params\nload_params('profiles/tiny.yaml')",
        "import flows.stage_flows, tasks.stage_tasks, flows.runners, flows.repro_flow\nflows.stage_flows.train_flow, flows.stage_flows.prepare_flow",
    ],
    ids=["import-cli", "parse-args", "validate-params", "validate-tiny-profile", "build-flows"],
)
def test_stage_path_does_not_import_heavy_libraries(code):
    assert _loaded_after(code) == []


def test_a_training_stage_library_loads_without_torchvision_or_sklearn():
    """Training reads the prepared Parquet file: the dataset registry (torchvision), the OOD
    metrics (scikit-learn) and the corruptions (SciPy) load only where they are used."""
    assert _loaded_after("import sparse_core.jobs.training") == ["torch", "pandas"]


def test_a_stage_task_still_gets_the_library():
    """The library arrives with the work: stage_work imports it (and the work then runs)."""
    assert "torch" in _loaded_after("from tasks.timing import stage_work\nwith stage_work('t', 'sparse_core.jobs.training') as s:\n    s.stage_train")


def test_builtin_model_names_equal_the_registry():
    """BUILTIN_MODELS (what validation sees without torch) is exactly what the model modules
    register, and available_models() is the same before and after they load."""
    from sparse_core import models

    before = models.available_models()
    from sparse_core.models import builders as registry

    models.create_model("lenet5", in_channels=1, num_classes=10, image_size=28)  # loads every model module
    assert sorted(registry._MODELS) == sorted(models.BUILTIN_MODELS) == before == models.available_models()


def test_lazy_flows_are_prefect_flows_built_once():
    from prefect import Flow

    import flows.stage_flows as f

    assert isinstance(f.train_flow, Flow) and f.train_flow.name == "train"
    assert f.train_flow is f.train_flow  # built on first access, then a plain module attribute
    assert "evaluate_ensemble_flow" in dir(f)
    with pytest.raises(AttributeError, match="no_such_flow"):
        f.no_such_flow  # noqa: B018


def test_stage_settings_turn_heartbeats_off_unless_the_environment_sets_them(monkeypatch):
    from prefect.settings import get_current_settings

    from flows.stage_flows import HEARTBEAT_ENV, stage_settings

    monkeypatch.delenv(HEARTBEAT_ENV, raising=False)
    outside = get_current_settings()
    with stage_settings():
        inside = get_current_settings()
        assert inside.flows.heartbeat_frequency is None
        assert inside.model_dump(exclude={"flows"}) == outside.model_dump(exclude={"flows"})  # nothing else changes
    outside = outside.flows.heartbeat_frequency
    assert get_current_settings().flows.heartbeat_frequency == outside
    monkeypatch.setenv(HEARTBEAT_ENV, "60")
    with stage_settings():
        assert get_current_settings().flows.heartbeat_frequency == outside  # the user's setting is not touched


def test_timings_are_recorded_only_when_asked(tmp_path, monkeypatch):
    import time

    from flows.cli import main
    from tasks.timing import TIMINGS_ENV, stage_work

    monkeypatch.delenv(TIMINGS_ENV, raising=False)
    with stage_work("t", "json"):
        pass
    assert list(tmp_path.iterdir()) == []  # unset: nothing written anywhere we can see
    log = tmp_path / "timings.jsonl"
    monkeypatch.setenv(TIMINGS_ENV, str(log))
    with stage_work("nap", "json") as mod:
        assert mod is json
        time.sleep(0.05)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {seed: -1}\n")
    assert main(["run", "aggregate", "--run", "dense", "--params", str(bad)]) == 2  # invalid params: recorded too
    work, stage = [json.loads(line) for line in log.read_text().splitlines()]
    assert work["kind"] == "work" and work["task"] == "nap"
    assert work["import_start"] <= work["start"] and work["end"] - work["start"] >= 0.05
    assert stage["kind"] == "stage" and stage["stage"] == "aggregate" and stage["status"] == 2
    assert stage["start"] <= work["start"] <= stage["end"]  # process start (kernel) .. now
