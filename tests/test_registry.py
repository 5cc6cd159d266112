"""The method registry (issue 14, parts 1-2): declarations read without importing torch, names
derived everywhere from it, a new method defined in this test module alone trained, evaluated
and reported on the tiny profile, and the ``drop_scores`` hook of DST variants."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pydantic
import pytest
import torch
import yaml
from torch import nn

from sparse_core.config import ConfigError, PruningSection, parse_params
from sparse_core.methods import registry
from sparse_core.methods.base import MaskedMethod, MethodContext, create_method
from sparse_core.methods.dst import RigL
from sparse_core.methods.registry import RegistryError, register_method
from sparse_core.sparsity import magnitude_masks

REPO = Path(__file__).resolve().parents[1]


def test_builtin_declarations_are_read_without_importing_torch():
    """Every stage validates params.yaml; the light ones (aggregate, report) must not pay torch's import."""
    code = textwrap.dedent("""
        import sys
        from sparse_core.config import load_params
        from sparse_core.methods import registry
        load_params("params.yaml")
        print(",".join(registry.trainable()))
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"
    assert out[0].split(",")[:4] == ["dense", "gmp", "dpf", "oneshot"]  # family order, then file order
    specs = registry.specs()
    assert {"set", "rigl"} <= {n for n, s in specs.items() if s.family == "dst"}
    assert {n: s.ensemble for n, s in specs.items() if s.ensemble} == {"dst_ensemble": "members", "edst_ensemble": "tickets"}
    assert registry.names(family="local") == ["local_greedy", "local_overlap", "local_chunked"]
    assert "retrain" not in registry.trainable() and specs["retrain"].family == "internal"
    # Each declared class is the one its module registers.
    assert registry.method_class("dpf").__name__ == "DPF" and registry.method_class("rigl").spec.name == "rigl"


def test_non_literal_declaration_is_refused_with_file_and_line(tmp_path):
    bad = tmp_path / "mine.py"
    bad.write_text('PAPER = "x"\n\n@register_method(name="mine", family="dst", paper=PAPER)\nclass Mine:\n    pass\n')
    with pytest.raises(RegistryError, match=r"mine\.py:3: argument 'paper' .* must be a literal"):
        registry.scan_file(bad)
    bad.write_text('declare_method(name="mine", family="dst", paper="p", colour="red")\n')
    with pytest.raises(RegistryError, match=r"mine\.py:1: unknown argument 'colour'"):
        registry.scan_file(bad)
    bad.write_text('declare_method(name="mine", family="magic", paper="p")\n')
    with pytest.raises(RegistryError, match="family 'magic' not in"):
        registry.scan_file(bad)


def test_a_taken_name_is_refused():
    with pytest.raises(RegistryError, match="'rigl' is taken by .*dst.py"):

        @register_method(name="rigl", family="dst", paper="a copy")
        class Copy(RigL):
            pass


@pytest.mark.parametrize("key, value, expect", [
    (("train", "methods"), ["dense", "magic"], "train.methods.1 = 'magic': 'magic' is not a registered method; allowed: dense, gmp"),
    (("train", "dst_ensemble", "method"), "gmp", "train.dst_ensemble.method = 'gmp': 'gmp' is not a dst-family method; allowed: set, rigl"),
    (("local", "sparse_method"), "dst_ensemble", "'dst_ensemble' is not a single-run method"),
    (("collect", "ensembles"), ["rigl"], "'rigl' is not an ensemble method; allowed: dst_ensemble, edst_ensemble"),
    (("curves", "methods"), ["dense"], "'dense' is not a sweep method"),
])  # fmt: skip
def test_params_naming_methods_are_checked_against_the_registry(default_params_dict, key, value, expect):
    raw = copy.deepcopy(default_params_dict)
    node = raw
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    with pytest.raises(ConfigError) as info:
        parse_params(raw, "params.yaml")
    assert expect in str(info.value)


# ----- a method defined here only ----------------------------------------------------------
class HalfMagnitude(MaskedMethod):
    """Prune ``train.pruning.sparsity`` of the prunable weights by magnitude, globally, at
    initialisation; train under that fixed mask."""

    name = "half_magnitude"

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection):
        super().__init__(model, total_steps, pruning)
        weights = {n: p.detach() for n, p in self.masks.params.items()}
        for n, m in magnitude_masks(weights, pruning.sparsity, "global").items():
            self.masks.masks[n] = m
        self.masks.apply_()


@pytest.fixture
def registered_here():
    """Registered for one test only (registration is process-wide: other tests, e.g. the README
    table's, must not see it)."""
    register_method(name="half_magnitude", family="pai", sparsity="pruning", start="init",
                    paper="a test method: magnitude pruning at initialisation (cf. Frankle & Carbin 2019, ICLR)")(HalfMagnitude)
    yield "half_magnitude"
    registry.unregister("half_magnitude")


def test_a_method_defined_in_a_test_module_runs_train_evaluate_report(tmp_path, monkeypatch, mirror, registered_here):
    """One class, registered here: trained from its own init, evaluated (FLOPs: the fixed-mask
    rule it inherits) and reported, with no other file changed."""
    from sparse_core import aggregate, corrupted_sets, evalsets, report
    from sparse_core.jobs import rundirs, scoring, training
    from sparse_core.config import load_params, seeded

    monkeypatch.setenv("SPARSEFLOW_DATA_MIRROR", str(mirror))
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    raw["train"]["methods"] = ["dense", "half_magnitude"]
    raw["train"]["pruning"]["sparsity"] = 0.5
    raw["retrain"]["runs"], raw["collect"]["ensembles"] = [], []
    raw["evaluate"]["runs"] = ["dense", "half_magnitude"]
    raw["corrupt"]["corruptions"], raw["corrupt"]["severities"] = ["contrast"], [1]
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params("params.yaml")
    rundirs.stage_prepare(params)
    evalsets.stage_ood(params)
    corrupted_sets.stage_corrupt(params)
    run = seeded(params)
    training.stage_warmup(run)
    for method in ("dense", "half_magnitude"):
        training.stage_train(run, method)
        scoring.stage_evaluate(run, method)
        aggregate.stage_aggregate(params, method)
    report.stage_report(params)

    config = json.loads((rundirs.run_dir(run, "half_magnitude") / "config.json").read_text())
    assert config["method"] == "half_magnitude" and config["init"] == "seed"  # start="init": not the warmup
    metrics = json.loads(Path(params.base.metrics_dir, "seeds", "s0", "half_magnitude.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.01) and metrics["target_sparsity"] == 0.5
    dense = json.loads(Path(params.base.metrics_dir, "seeds", "s0", "dense.json").read_text())
    # 3 f_S per example at half the weights, no warmup: well under the dense run's cost.
    assert dense["flops"]["training_ratio"] == pytest.approx(1.0)
    assert 0.2 < metrics["flops"]["training_ratio"] < 0.8
    assert "| half_magnitude | 1 |" in Path("reports", "report.md").read_text()


def test_create_method_names_unknown_and_classless_methods():
    net = nn.Linear(4, 2)
    with pytest.raises(RegistryError, match="unknown method 'magic'; known: dense"):
        create_method("magic", net, 10)
    with pytest.raises(RegistryError, match="'dst_ensemble' .* has no class of its own"):
        create_method("dst_ensemble", net, 10)


# ----- drop_scores ---------------------------------------------------------------------------
class DropLargest(RigL):
    """A variant that overrides ``drop_scores`` alone: drops the largest active weights."""

    def drop_scores(self) -> dict[str, torch.Tensor]:
        return {n: -p.detach().abs() for n, p in self.masks.params.items()}


def _dst(cls: type, seed: int = 0) -> RigL:
    from sparse_core.config import DSTSection

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    ctx = MethodContext(net, 1000, dst=DSTSection(sparsity=0.5, distribution="uniform", drop_fraction=0.25))
    return cls.from_context(ctx)


@pytest.mark.parametrize("cls, largest", [(RigL, False), (DropLargest, True)])
def test_drop_scores_decide_which_active_weights_go(cls, largest):
    method = _dst(cls)
    before = {n: m.clone() for n, m in method.masks.masks.items()}
    weights = {n: p.detach().clone() for n, p in method.masks.params.items()}
    grow = {n: torch.zeros_like(p) for n, p in method.masks.params.items()}  # ties: any free position
    method.update_topology(1, 0.25, scores=grow)
    for n, old in before.items():
        mag = weights[n].abs()[old]
        k = -(-int(old.sum()) // 4)
        expected = torch.topk(mag, k, largest=largest).indices
        dropped_now = ~method.masks.masks[n][old]  # dropped and not regrown in place
        # Every position that left is among the k chosen by the drop scores.
        assert set(torch.nonzero(dropped_now).flatten().tolist()) <= set(expected.tolist()), n
        assert dropped_now.any(), n


def test_readme_method_table_is_the_registry_table():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert registry.markdown_table() in readme, "README's method table is stale: paste `sparseflow methods` over it"


def test_readme_worked_example_registers_and_builds(tmp_path, monkeypatch):
    """The 'Add a method' example, as printed in the README, is a working method file."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Add a method"):readme.index("## Layout")]
    code = section[section.index("```python\n") + 10:section.index("```\n\nThen list")]
    module = tmp_path / "mest_example.py"
    module.write_text(code)
    (spec,) = registry.scan_file(module)
    assert (spec.name, spec.family, spec.sparsity, spec.start) == ("mest_example", "dst", "dst", "init")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import mest_example  # noqa: F401  (registers at import)

        net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        method = create_method("mest_example", net, 100)
        loss = net(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        scores = method.drop_scores()
        w = net[0].weight
        assert torch.allclose(scores["0.weight"], w.detach().abs() + 0.1 * w.grad.abs())
    finally:
        registry.unregister("mest_example")
        sys.modules.pop("mest_example", None)


# ----- a method's own params keys ------------------------------------------------------------
class Scaled(MaskedMethod):
    """A test method with one key of its own, ``train.scaled.factor``."""

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        factor: float = pydantic.Field(1.0, gt=0)

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "Scaled":
        method = cls(ctx.model, ctx.total_steps, ctx.pruning)
        method.factor = cls.options(ctx).factor
        return method


@pytest.fixture
def scaled():
    register_method(name="scaled", family="pai", sparsity="pruning", params_key="scaled", paper="a test method")(Scaled)
    yield
    registry.unregister("scaled")


def test_a_method_declares_its_own_params_keys(default_params_dict, scaled):
    raw = copy.deepcopy(default_params_dict)
    raw["train"]["scaled"] = {"factor": 2.5}
    params = parse_params(raw, "params.yaml")
    assert create_method("scaled", nn.Linear(4, 4), 10, options=params.train.model_extra).factor == 2.5
    assert create_method("scaled", nn.Linear(4, 4), 10).factor == 1.0  # the section is optional
    # Part of the train fingerprint: a checkpoint made with another factor is not resumed.
    other = copy.deepcopy(raw)
    other["train"]["scaled"] = {"factor": 3.0}
    assert parse_params(other, "params.yaml").fingerprint("train") != params.fingerprint("train")
    for bad, expect in (({"factor": -1}, r"train\.scaled\.factor: Input should be greater than 0"),
                        ({"factr": 1}, r"train\.scaled\.factr: Extra inputs are not permitted")):
        raw["train"]["scaled"] = bad
        params = parse_params(raw, "params.yaml")  # structure only: the class is not imported here
        with pytest.raises(ConfigError, match=expect):
            create_method("scaled", nn.Linear(4, 4), 10, options=params.train.model_extra)
    raw["train"]["scaled"] = 3
    with pytest.raises(ConfigError, match="train.scaled: the scaled method's section must be a mapping"):
        parse_params(raw, "params.yaml")
    raw["train"].pop("scaled")
    raw["train"]["scaledd"] = {"factor": 1}
    with pytest.raises(ConfigError, match=r"train.scaledd = .*Extra inputs are not permitted .*: .*scaled \(scaled\)"):
        parse_params(raw, "params.yaml")
