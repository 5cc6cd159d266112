"""Stages re-run only what a change touches (issue 14, part 5): each DVC stage's code is the
modules it imports plus the methods it builds (flows.stage_code), written as a manifest by the
``code`` stage; the dvc.yaml files list exactly those manifests, and a real ``dvc status`` after an
edit (and the ``code`` stage) names exactly the stages that run the edited file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.stage_code import (DVC_FILES, FIXED, ITEMS, PARAM_PREFIX, PARAMS, declarations_digest, job_modules,
                              manifests, method_specs, methods_of, param_values, rewrite_deps, stage_files,
                              write_manifests)  # fmt: skip
from sparse_core.config import load_params
from sparse_core.imports import import_graph, library_code, project_modules

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_files_hold_the_manifest_deps():
    stages = set(job_modules(ROOT))
    for name in DVC_FILES:
        text = (ROOT / name).read_text(encoding="utf-8")
        assert rewrite_deps(text, stages) == text, f"{name}: code deps are stale; run `sparseflow deps --write`"
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        code = [d for d in stage.get("do", stage).get("deps", []) if d.split("/")[0] in ("sparse_core", "tasks", "flows", "stage_code")]
        assert code == (["flows", "sparse_core", "tasks"] if name == "code" else [d for d in code if d.startswith("stage_code/")]), name
        assert name == "code" or len(code) == 1, f"{name}: one manifest, got {code}"


def test_the_code_stage_alone_lists_params_and_lists_all_of_them():
    """The manifests hold what each stage reads, so ``code`` depends on the whole params file
    (``dvc params diff`` sees every key) and no other stage lists params (they would be recorded
    again, per stage, in ``dvc.lock``)."""
    code = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["code"]
    assert code["params"] == [{"params.yaml": None}]
    assert code["outs"] == [{"stage_code": {"cache": False}}] and "--manifests stage_code" in code["cmd"]
    for name in DVC_FILES:
        for stage_name, stage in yaml.safe_load((ROOT / name).read_text())["stages"].items():
            assert stage_name == "code" or "params" not in stage.get("do", stage), f"{name}: {stage_name} lists params"


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.name for p in (ROOT / "profiles").glob("*.yaml"))])
def test_every_stage_reads_params_that_every_profile_has(profile):
    """Every stage with a flow has a PARAMS entry, and every key it names exists in the validated
    params of each profile (a key a file leaves out counts with its default)."""
    path = ROOT / profile if profile == "params.yaml" else ROOT / "profiles" / profile
    params = load_params(path)
    assert set(PARAMS) == set(job_modules(ROOT))
    for stage, keys in PARAMS.items():
        values = param_values(params, keys)
        assert all(any(k == key or k.startswith(key + ".") for k in values) for key in keys), stage
    assert {"base.precision", "base.channels_last"} <= set(PARAMS["train"]) & set(PARAMS["evaluate"])
    with pytest.raises(ValueError, match="'train.nope' is not a params key"):
        param_values(params, ("train.nope",))


def test_a_manifest_holds_the_values_its_stage_reads():
    params = load_params(ROOT / "profiles" / "tiny.yaml")
    texts = manifests(ROOT, params)
    lines = {rel: {line.removeprefix(PARAM_PREFIX) for line in text.splitlines() if line.startswith(PARAM_PREFIX)}
             for rel, text in texts.items()}  # fmt: skip
    assert f"train.dst.sparsity = {params.train.dst.sparsity}" in lines["train/dpf.txt"]
    assert 'base.precision = "fp32"' in lines["train/dpf.txt"] and 'base.precision = "fp32"' in lines["warmup.txt"]
    assert not any(k.startswith("train.") for k in lines["warmup.txt"]) and not lines["sweep.txt"]
    # the lists that only name the items are left out of the items' manifests, kept where read whole
    assert not any(line.startswith(("train.methods ", "evaluate.runs ")) for line in lines["evaluate/dpf.txt"])
    assert any(line.startswith("evaluate.runs ") for line in lines["report.txt"])
    # a value: only the manifests of the stages that read it change
    bf16 = params.model_copy(update={"base": params.base.model_copy(update={"precision": "bf16"})})
    changed = {rel for rel, text in manifests(ROOT, bf16).items() if texts[rel] != text}
    assert {"warmup.txt", "train/dpf.txt", "retrain/dpf.txt", "evaluate/dpf.txt", "collect/dst_ensemble.txt",
            "evaluate_ensemble/dst_ensemble.txt", "curves/dpf.txt"} <= changed  # fmt: skip
    assert not {"prepare.txt", "report.txt", "aggregate.txt", "curves_report.txt"} & changed


def test_each_stage_runs_its_own_job():
    jobs = job_modules(ROOT)
    assert jobs["report"] == {"sparse_core.report"} and jobs["aggregate"] == {"sparse_core.aggregate"}
    assert jobs["corrupt"] == {"sparse_core.corrupted_sets"} and jobs["train"] == {"sparse_core.jobs.training"}
    report, train = stage_files(ROOT, "report"), stage_files(ROOT, "train")
    assert "sparse_core/report.py" in report and "sparse_core/engine.py" not in report
    assert "sparse_core/report.py" not in train and "sparse_core/corruptions.py" not in train
    # Without a method list, a training stage counts every method module; models are always all.
    assert {"sparse_core/methods/gradual.py", "sparse_core/methods/topkast.py", "sparse_core/models/small.py"} <= set(train)
    dpf = set(stage_files(ROOT, "train", method_modules=["sparse_core.methods.gradual"]))
    assert {"sparse_core/methods/gradual.py", "sparse_core/methods/base.py", "sparse_core/models/small.py"} <= dpf
    assert not {"sparse_core/methods/dst.py", "sparse_core/methods/topkast.py"} & dpf


def test_the_fingerprint_hashes_what_training_runs():
    """The run fingerprint (code_fingerprint) hashes the library part of the training stage's
    manifest for the run's methods: a report, corruption or other method's change leaves
    checkpoints resumable, an engine or own method change does not."""
    from sparse_core.jobs.rundirs import code_fingerprint

    code = library_code(import_graph(ROOT), "sparse_core.jobs.training", ROOT, ["sparse_core.methods.gradual"])
    train = {f for f in stage_files(ROOT, "train", method_modules=["sparse_core.methods.gradual"]) if f.startswith("sparse_core/")}
    paths = {m: p.relative_to(ROOT).as_posix() for m, p in project_modules(ROOT).items()}
    assert {paths[m] for m in code if m.startswith("sparse_core")} == train
    assert "sparse_core.engine" in code and "sparse_core.report" not in code and "sparse_core.corruptions" not in code
    assert "sparse_core.methods.dst" not in code
    # same module, same code; another method's module, another fingerprint
    assert code_fingerprint("dpf") == code_fingerprint("gmp") != code_fingerprint("rigl")
    assert code_fingerprint("local_greedy", "dense") != code_fingerprint("local_greedy", "dpf")


def test_an_item_builds_its_method_and_the_methods_params_choose():
    params = load_params(ROOT / "profiles" / "tiny.yaml")
    specs = method_specs(ROOT)
    member, sparse = params.train.dst_ensemble.method, params.local.sparse_method
    assert methods_of(specs, params, "dpf") == ["dpf"]
    assert methods_of(specs, params, "dpf_retrain") == ["dpf", "retrain"]
    assert methods_of(specs, params, "dst_ensemble") == ["dst_ensemble", member]
    assert methods_of(specs, params, "local_greedy") == list(dict.fromkeys(["local_greedy", sparse]))
    with pytest.raises(ValueError, match="'nope' is neither a declared method"):
        methods_of(specs, params, "nope")
    swapped = params.model_copy(update={"train": params.train.model_copy(update={
        "dst_ensemble": params.train.dst_ensemble.model_copy(update={"method": "mest"})})})  # fmt: skip
    assert methods_of(specs, swapped, "dst_ensemble") == ["dst_ensemble", "mest"]
    files = {rel: {line.split("  ", 1)[1] for line in text.splitlines() if not line.startswith("#")}
             for rel, text in manifests(ROOT, swapped).items()}  # fmt: skip
    assert "sparse_core/methods/mest.py" in files["train/dst_ensemble.txt"] and "sparse_core/methods/mest.py" not in files["train/rigl.txt"]
    assert "sparse_core/methods/gradual.py" in files["train/dpf.txt"] and "sparse_core/methods/dst.py" not in files["train/dpf.txt"]
    assert "sparse_core/sparsity/criteria.py" in files["train/dpf.txt"]  # loaded through sparse_core.sparsity's table
    assert "sparse_core/methods/gradual.py" not in files["retrain/dpf.txt"]  # fine-tuning builds `retrain` only
    assert not any(f.startswith("sparse_core/methods/") and not f.endswith(("base.py", "registry.py", "__init__.py"))
                   for f in files["warmup.txt"])  # fmt: skip
    assert {"train/dpf.txt", "evaluate/dpf_retrain.txt", "collect/dst_ensemble.txt", "curves/rigl.txt", "prepare.txt"} <= set(files)
    # The digest of every declaration: in the stages that read the whole registry, not in those
    # that build known methods (their declarations are in their files): a new method retrains no other.
    texts = manifests(ROOT, swapped)
    assert "# method declarations" in texts["report.txt"] and "# method declarations" in texts["aggregate.txt"]
    assert not any("# method declarations" in texts[k] for k in ("train/dpf.txt", "warmup.txt", "evaluate/dpf_retrain.txt"))


def test_the_declarations_digest_ignores_method_bodies(tmp_path):
    shutil.copytree(ROOT / "sparse_core" / "methods", tmp_path / "sparse_core" / "methods")
    before = declarations_digest(method_specs(tmp_path))
    path = tmp_path / "sparse_core" / "methods" / "gradual.py"
    original = path.read_text()
    path.write_text("# a new first line moves every declaration\n" + original.replace("return", "return  ", 1))
    assert declarations_digest(method_specs(tmp_path)) == before
    path.write_text(original.replace('name="dpf", family="gradual"', 'name="dpf2", family="gradual"'))
    assert declarations_digest(method_specs(tmp_path)) != before


def test_rewrite_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="not `sparseflow run <stage>`"):
        rewrite_deps("stages:\n  x:\n    cmd: python train.py\n    deps:\n      - sparse_core\n", {"train"})
    with pytest.raises(ValueError, match="has no flow"):
        rewrite_deps("stages:\n  x:\n    cmd: sparseflow run nope\n    deps:\n      - sparse_core\n", {"train"})
    with pytest.raises(ValueError, match="has no --method/--run"):
        rewrite_deps("stages:\n  x:\n    cmd: sparseflow run train\n    deps:\n      - sparse_core\n", {"train"})
    with pytest.raises(ValueError, match="list no code deps"):
        rewrite_deps("stages:\n  x:\n    cmd: sparseflow run report\n    deps:\n      - data\n", {"report"})
    text = ("stages:\n  x:\n    cmd: sparseflow run train --method ${item.m} --seed 1\n    deps:\n      - data\n"
            "      - sparse_core\n      - tasks/t.py\n    outs:\n      - o\n")  # fmt: skip
    want = text.replace("      - sparse_core\n      - tasks/t.py\n", "      - stage_code/train/${item.m}.txt\n")
    assert rewrite_deps(text, {"train"}) == want and rewrite_deps(want, {"train"}) == want


def _copy_project(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "sparse_core", "tasks", "flows"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for rel in [*listed, "dvc.yaml"]:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copy2(ROOT / "profiles" / "tiny.yaml", dest / "params.yaml")


def changed(repo) -> set[str]:
    """The stages ``dvc status`` reports as changed, the ``fastpath`` stage only for a reason other
    than its ``always_changed`` (it runs on every repro: the machine is a dependency DVC cannot see)."""
    status = repo.status()
    assert "always changed" in status.get("fastpath", ["always changed"]), status.get("fastpath")
    return {name for name, why in status.items() if why != ["always changed"]}


def test_dvc_status_names_exactly_the_stages_an_edit_touches(tmp_path):
    """In a copy of the project (tiny profile): every stage committed as up to date with
    placeholder outputs (``dvc commit``, nothing trained) and real manifests, then one file
    edited, or one params value changed, at a time and the manifests rewritten, as ``dvc repro``
    runs the ``code`` stage first."""
    from dvc.repo import Repo

    _copy_project(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    params = load_params("params.yaml")

    def code_stage() -> None:
        write_manifests(Path("."), params, Path("stage_code"))

    try:
        Repo.init(".", no_scm=True)
        repo = Repo(".")
        code_stage()
        names = [s.addressing for s in repo.index.stages]
        for stage in repo.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                if path.exists():
                    continue
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("x")
        repo.commit(force=True)
        assert changed(repo) == set()

        def touched(rel: str) -> set[str]:
            path = Path(rel)
            original = path.read_text()
            path.write_text(original + "\n# edited\n")
            try:
                code_stage()
                return changed(repo)
            finally:
                path.write_text(original)
                code_stage()

        def named(*prefixes: str) -> set[str]:
            return {n for n in names if n.split("@")[0] in prefixes}

        def building(*methods: str) -> set[str]:
            """The item stages whose run builds one of ``methods``."""
            specs = method_specs(Path("."))
            def built(name: str) -> set[str]:
                stage, item = name.split("@")[0], name.split("@")[1].rsplit("-", 1)[0]
                return set(FIXED.get(stage) or methods_of(specs, params, item))

            return {n for n in names if n.split("@")[0] in ITEMS and set(methods) & built(n)}

        evaluation = named("evaluate", "collect", "evaluate_ensemble")
        training = named("warmup", "train", "retrain")
        assert touched("sparse_core/report.py") == {"code", "report"}
        assert touched("sparse_core/corruptions.py") == {"code", "corrupt"}
        assert touched("sparse_core/calibration.py") == {"code"} | evaluation
        assert touched("sparse_core/engine.py") == {"code", "fastpath"} | training | evaluation
        # A method file: only the stages that build one of its methods.
        gradual = touched("sparse_core/methods/gradual.py")
        assert gradual == {"code"} | building("gmp", "dpf", "oneshot")
        assert {"train@dpf-0", "evaluate@dpf_retrain-0"} <= gradual
        assert not {"train@rigl-0", "warmup@0", "retrain@dpf-0", "collect@dst_ensemble-0", "report"} & gradual
        # criteria.py is loaded by name (sparse_core.sparsity's PEP 562 table) by the pruning methods
        assert {"train@dpf-0", "train@gmp-0", "train@oneshot-0"} <= touched("sparse_core/sparsity/criteria.py")
        dst = touched("sparse_core/methods/dst.py")  # rigl, and the ensembles built on it
        assert {"train@rigl-0", "train@dst_ensemble-0", "train@edst_ensemble-0", "evaluate_ensemble@dst_ensemble-0"} <= dst
        assert not {"train@dpf-0", "evaluate@dpf-0"} & dst

        def params_changed(key: str, value) -> set[str]:
            """``dvc status`` after setting ``key`` in params.yaml and running the code stage (a
            fresh Repo: the stages are interpolated from params.yaml)."""
            path = Path("params.yaml")
            original = path.read_text()
            raw = yaml.safe_load(original)
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node[part]
            node[leaf] = value(node[leaf]) if callable(value) else value
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
            try:
                write_manifests(Path("."), load_params(path), Path("stage_code"))
                return changed(Repo("."))
            finally:
                path.write_text(original)
                code_stage()

        # base.precision changes what training and evaluation compute (not listed before: a bf16
        # profile re-ran nothing)
        assert params_changed("base.precision", "bf16") == {"code", "fastpath"} | training | evaluation
        # report: the claims table's design ratios read train.dst (sparse_core/recipes.py)
        assert params_changed("train.dst.sparsity", 0.5) == {"code", "report"} | named("train") | evaluation
        # per stage, not per item: every evaluate item reads `retrain` (for its <run>_retrain items)
        assert params_changed("retrain.epochs", 2) == {"code", "retrain@dpf-0"} | named("evaluate")
        assert params_changed("base.progress", lambda on: not on) == {"code"}
        # adding a method trains it alone (DVC's params lists, shared by a matrix's items, re-ran every train stage)
        assert params_changed("train.methods", lambda methods: [*methods, "set"]) == {"code", "train@set-0"}
        assert changed(Repo(".")) == set()
    finally:
        os.chdir(cwd)
