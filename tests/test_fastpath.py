"""``base.precision: auto`` / ``base.channels_last: auto`` (:mod:`sparse_core.fastpath`): which
candidates a machine has, how the measured times choose one, the per-machine cache, the refusal
of an explicit bf16 on a CPU without native bf16, the ``fastpath`` stage's output that DVC
tracks, and one real measurement."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from sparse_core import fastpath
from sparse_core import precision as precision_module
from sparse_core.config import ConfigError, Params
from sparse_core.fastpath import Candidate, choose

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
F32, F32CL, B16, B16CL = Candidate("fp32", False), Candidate("fp32", True), Candidate("bf16", False), Candidate("bf16", True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache file, never the machine's."""
    monkeypatch.setenv(fastpath.CACHE_ENV, str(tmp_path / "cache"))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


class StubMeasure:
    """A measurement that returns fixed seconds per candidate and counts its calls."""

    def __init__(self, seconds: dict[Candidate, float]):
        self.seconds, self.calls = seconds, 0

    def __call__(self, model, shape, batch_size, device, cands, num_classes=10, **_):
        self.calls += 1
        return {c: self.seconds[c] for c in cands}


@pytest.mark.parametrize(("seconds", "expected"), [
    ({F32: 1.0, F32CL: 0.80, B16: 0.9, B16CL: 0.5}, B16CL),    # bf16 + channels_last twice as fast: it wins
    ({F32: 1.0, F32CL: 0.80, B16: 0.9, B16CL: 0.78}, F32CL),   # bf16 3% faster than fp32 + CL: not worth the numerics
    ({F32: 1.0, F32CL: 0.97, B16: 1.2, B16CL: 1.1}, F32),      # channels_last within 5%: the plain layout
    ({F32: 1.0, F32CL: 0.94}, F32CL),                          # more than 5% faster
    ({F32: 10.0, B16: 0.1}, B16),
    ({F32CL: 1.0, B16CL: 1.04}, F32CL),                        # pinned layout, fp32 fastest
])  # fmt: skip
def test_choose_takes_the_fastest_unless_a_simpler_candidate_is_within_tolerance(seconds, expected):
    assert choose(seconds) == expected


@pytest.mark.parametrize("bad", [{}, {F32: 0.0}, {F32: math.nan, F32CL: 1.0}, {F32: math.inf}])
def test_choose_refuses_missing_or_non_finite_times(bad):
    with pytest.raises(ValueError):
        choose(bad)


@pytest.mark.parametrize("native", [False, True])
def test_cpu_candidates_offer_bf16_only_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: native)
    got = fastpath.candidates(CPU)
    assert got == ([F32, F32CL, B16, B16CL] if native else [F32, F32CL])
    assert fastpath.candidates(CPU, "fp32") == [F32, F32CL]
    assert fastpath.candidates(CPU, "auto", False) == ([F32, B16] if native else [F32])
    assert fastpath.candidates(CPU, "bf16", True) == [B16CL]  # explicit: kept (refused later, with a measurement)
    assert fastpath.candidates(CPU, image_input=False) == ([F32, B16] if native else [F32])
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        fastpath.candidates(CPU, "fp16")


def test_resolve_measures_once_per_machine_and_model_then_reads_the_cache(monkeypatch):
    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: True)
    stub = StubMeasure({F32: 1.0, F32CL: 0.9, B16: 0.6, B16CL: 0.4})
    first = fastpath.resolve(tiny_net(), (1, 8, 8), 32, CPU, model_spec={"name": "tiny"}, measure_fn=stub)
    assert (first.candidate, first.source, stub.calls) == (B16CL, "measured", 1)
    assert first.ratios()["bf16+channels_last"] == pytest.approx(2.5)
    again = fastpath.resolve(tiny_net(), (1, 8, 8), 32, CPU, model_spec={"name": "tiny"}, measure_fn=stub)
    assert (again.candidate, again.source, stub.calls) == (B16CL, "cache", 1)
    assert again.seconds_per_step == first.seconds_per_step
    # Another batch size, model or pin is another entry; so is another machine (torch version).
    fastpath.resolve(tiny_net(), (1, 8, 8), 64, CPU, model_spec={"name": "tiny"}, measure_fn=stub)
    fastpath.resolve(tiny_net(), (1, 8, 8), 32, CPU, model_spec={"name": "other"}, measure_fn=stub)
    pinned = fastpath.resolve(tiny_net(), (1, 8, 8), 32, CPU, "fp32", model_spec={"name": "tiny"}, measure_fn=stub)
    assert pinned.candidate == F32CL and stub.calls == 4
    real = torch.__version__
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    fastpath.resolve(tiny_net(), (1, 8, 8), 32, CPU, model_spec={"name": "tiny"}, measure_fn=stub)
    assert stub.calls == 5
    entries = json.loads(fastpath.cache_path().read_text())["entries"]
    assert len(entries) == 5 and {e["key"]["torch"] for e in entries.values()} == {real, "0.0.0-other"}


@pytest.mark.parametrize("content", ["not json", "[]", '{"version": 1, "entries": {"x": 1}}', '{"version": 99, "entries": {}}'])
def test_an_unreadable_or_foreign_cache_is_measured_over(monkeypatch, content):
    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: False)
    path = fastpath.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    stub = StubMeasure({F32: 1.0, F32CL: 0.5})
    assert fastpath.resolve(tiny_net(), (1, 8, 8), 8, CPU, measure_fn=stub).candidate == F32CL
    assert stub.calls == 1 and json.loads(path.read_text())["version"] == fastpath.CACHE_VERSION


def test_a_cached_choice_outside_the_candidates_is_measured_again(monkeypatch):
    """A cache edited by hand (or a machine that lost native bf16) cannot smuggle bf16 in."""
    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: False)
    stub = StubMeasure({F32: 1.0, F32CL: 2.0})
    fastpath.resolve(tiny_net(), (1, 8, 8), 8, CPU, measure_fn=stub)
    path = fastpath.cache_path()
    doc = json.loads(path.read_text())
    for entry in doc["entries"].values():
        entry["precision"] = "bf16"
    path.write_text(json.dumps(doc))
    assert fastpath.resolve(tiny_net(), (1, 8, 8), 8, CPU, measure_fn=stub).candidate == F32
    assert stub.calls == 2


def test_explicit_values_are_used_without_measuring():
    stub = StubMeasure({})
    got = fastpath.resolve(tiny_net(), (1, 8, 8), 8, CPU, "fp32", False, measure_fn=stub)
    assert (got.candidate, got.source, stub.calls) == (F32, "explicit", 0)
    assert not fastpath.cache_path().exists()


def test_real_measurement_times_every_candidate_and_leaves_the_model_alone():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seconds = fastpath.measure(net, (1, 8, 8), 4, CPU, [F32, F32CL], steps=1, rounds=1)
    assert set(seconds) == {F32, F32CL} and all(0 < s < 60 for s in seconds.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    choice = fastpath.resolve(net, (1, 8, 8), 4, CPU, "fp32")
    assert choice.source == "measured" and choice.candidate in (F32, F32CL)


# ----- the pipeline's side: rundirs.fastpath_choice and the fastpath stage ---------------------------------


def _params(tmp_path: Path, **base) -> Params:
    d = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    d["base"] |= {"runs_dir": str(tmp_path / "runs"), "metrics_dir": str(tmp_path / "metrics"), "allow_external_paths": True,
                  "precision": "auto", "channels_last": "auto"} | base  # fmt: skip
    return Params.model_validate(d)


DATA = SimpleNamespace(shape=(1, 28, 28), num_classes=10)


def test_explicit_bf16_on_a_cpu_without_native_bf16_is_refused_with_its_measured_slowdown(tmp_path, monkeypatch):
    from sparse_core.jobs import rundirs

    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: False)
    monkeypatch.setattr(fastpath, "measure", StubMeasure({F32: 0.1, B16: 1.25}))
    params = _params(tmp_path, precision="bf16", channels_last=False)
    with pytest.raises(ConfigError, match=r"base.precision: bf16 on a CPU without native bf16 .* measured 12.5x .*allow_slow_bf16"):
        rundirs.fastpath_choice(params, CPU, DATA)
    accepted = _params(tmp_path, precision="bf16", channels_last=False, allow_slow_bf16=True)
    assert rundirs.fastpath_choice(accepted, CPU, DATA).candidate == B16
    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: True)
    assert rundirs.fastpath_choice(params, CPU, DATA).candidate == B16


def test_the_stage_file_holds_the_choice_alone_so_dvc_reruns_only_when_the_choice_changes(tmp_path, monkeypatch):
    """The fastpath stage's output is what every computing stage depends on: byte-identical for
    the same choice (nothing re-runs, whatever the times), different for another choice."""
    from sparse_core.jobs import rundirs

    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(rundirs, "load_data", lambda params: DATA)
    params = _params(tmp_path)
    monkeypatch.setattr(fastpath, "measure", StubMeasure({F32: 1.0, F32CL: 0.9, B16: 0.5, B16CL: 0.45}))
    out = rundirs.stage_fastpath(params)
    first = out.read_bytes()
    assert json.loads(first) == {"precision": "bf16", "channels_last": True, "device": "cpu"}
    record = json.loads((tmp_path / "metrics" / "fastpath.json").read_text())
    assert record["source"] == "measured" and record["speed_vs_fp32_nchw"]["bf16+channels_last"] == pytest.approx(1 / 0.45)
    # Another machine measuring the same choice with other times: the same bytes.
    fastpath.cache_path().unlink()
    monkeypatch.setattr(fastpath, "measure", StubMeasure({F32: 2.0, F32CL: 1.7, B16: 0.9, B16CL: 0.6}))
    assert rundirs.stage_fastpath(params).read_bytes() == first
    # A machine that chooses fp32: another file, so every computing stage re-runs.
    fastpath.cache_path().unlink()
    monkeypatch.setattr(fastpath, "measure", StubMeasure({F32: 1.0, F32CL: 1.2, B16: 3.0, B16CL: 2.0}))
    assert json.loads(rundirs.stage_fastpath(params).read_bytes())["precision"] == "fp32"
    # The stages read the stage's file (no measurement) when it fits their device and pins.
    monkeypatch.setattr(fastpath, "measure", StubMeasure({}))
    assert rundirs.fastpath_choice(params, CPU, DATA).source == "stage"
    monkeypatch.setattr(fastpath, "measure", StubMeasure({F32CL: 1.0, B16CL: 2.0}))
    assert rundirs.fastpath_choice(_params(tmp_path, channels_last=True), CPU, DATA).candidate == F32CL  # pin differs: resolved


def test_params_and_profiles_say_auto_unless_their_header_says_why_not():
    pinned = {}
    for path in [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))]:
        base = yaml.safe_load(path.read_text())["base"]
        if (base.get("precision"), base.get("channels_last")) != ("auto", "auto"):
            pinned[path.name] = path.read_text().split("\nbase:")[0]
    assert set(pinned) == {"tiny.yaml", "cifar10_resnet20.yaml"}, sorted(pinned)
    for name, header in pinned.items():
        assert "auto" in header and "precision" in header.lower(), f"{name} pins the precision without saying why in its header"
