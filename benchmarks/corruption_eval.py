"""Wall time of evaluating one model on every corrupted set (batched inference), and of
generating the corrupted sets, for the current params.yaml.

Needs the prepare, corrupt and ood stages' outputs and the run's exported model
(``make repro`` or ``dvc repro evaluate@<run>``). Prints seconds for: loading the sets,
generating all corruptions × severities afresh (not written anywhere), inference on every
corrupted set, and the metrics (calibration per set). Two ratio lines put them side by side:

- ``generate corruptions / inference time``: generating every corrupted set afresh against one
  model's inference on all of them (per repeat; the generation is timed once);
- ``generate corruptions / load cached eval sets time``: what the ``corrupt`` stage's cached
  sets save (one value; the load reads the OOD sets too).

``--smoke`` needs no pipeline outputs: it builds a throw-away project in a temporary folder from
``profiles/tiny.yaml`` (600 Fashion-MNIST images from the offline mirror, ``SPARSEFLOW_DATA_MIRROR``
or ``../shared/data``), shrunk to 64 test images, 3 corruptions × 2 severities and one synthetic
OOD set, runs the ``prepare``, ``ood`` and ``corrupt`` stages' own functions on it, exports the
untrained (seeded) model as run ``untrained``, and then measures exactly as the full mode, once.

    python benchmarks/corruption_eval.py [--run dpf] [--params params.yaml] [--repeats 3] [--json PATH]
    python benchmarks/corruption_eval.py --smoke [--json PATH]   # seconds: no pipeline outputs needed
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Results, add_common_arguments  # noqa: E402

from sparse_core import artifacts, evalsets  # noqa: E402
from sparse_core.config import load_params  # noqa: E402
from sparse_core.corrupted_sets import stage_corrupt  # noqa: E402
from sparse_core.corruptions import corrupt  # noqa: E402
from sparse_core.evaluation import evaluate_probs, model_probs  # noqa: E402
from sparse_core.jobs.rundirs import load_exported, run_dir, setup, stage_prepare, transform_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE_RUN = "untrained"


def smoke_project(folder: Path) -> Path:
    """A throw-away project in ``folder`` (module docstring): the tiny profile with every output
    folder inside ``folder``, its prepared data, OOD and corrupted sets, and the seeded untrained
    model exported as run ``untrained``. Returns its params file."""
    import yaml

    os.environ.setdefault("SPARSEFLOW_DATA_MIRROR", str(REPO.parent / "shared" / "data"))
    raw = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    raw["base"]["allow_external_paths"] = True  # the output folders below are absolute
    for key in ("data_dir", "runs_dir", "metrics_dir", "plots_dir", "ensembles_dir", "reports_dir"):
        raw["base"][key] = str(folder / key.removesuffix("_dir"))
    raw["data"]["test_subset"] = 64
    raw["ood"] = {"sets": {"fashion_mnist": ["gaussian"]}, "max_examples": 64}
    raw["corrupt"] = {"corruptions": ["gaussian_noise", "defocus_blur", "contrast"], "severities": [1, 5], "test_subset": 64}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    t0 = time.perf_counter()
    stage_prepare(params)
    evalsets.stage_ood(params)
    stage_corrupt(params)
    _, _, model = setup(params)
    artifacts.save_tensors(model.state_dict(), run_dir(params, SMOKE_RUN) / "model.safetensors")
    print(f"smoke project in {folder}: prepare, ood, corrupt stages and the untrained model, "
          f"{time.perf_counter() - t0:.1f} s (untimed)")  # fmt: skip
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="dpf")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    add_common_arguments(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="corruption_eval-smoke-") as tmp:
        if args.smoke:
            args.repeats, args.run = 1, SMOKE_RUN
            args.params = str(smoke_project(Path(tmp)))
        measure(args)


def measure(args) -> None:
    params = load_params(args.params)
    device, data, model = setup(params)
    load_exported(params, args.run, model)
    model.to(device)
    t0 = time.perf_counter()
    sets = evalsets.load_eval_sets(params)
    load_s = time.perf_counter() - t0
    sets.ood = {}
    n = len(sets.corrupted_labels)
    clean = data.splits["test"].images[:n]
    t0 = time.perf_counter()
    for name, sev in sets.corrupted:
        corrupt(clean, name, sev, seed=params.base.seed)
    gen_s = time.perf_counter() - t0
    infer, score = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        probs = model_probs(model, {}, sets, transform_for(params, data), params.evaluate.batch_size, device)
        infer.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        probs |= {"test": probs[next(iter(probs))], "val": probs[next(iter(probs))]}
        labels = {"test": sets.corrupted_labels.numpy(), "val": sets.corrupted_labels.numpy(), "corrupted": sets.corrupted_labels.numpy()}
        evaluate_probs({k: v[None] for k, v in probs.items()}, labels, params.evaluate.calibration_bins)
        score.append(time.perf_counter() - t0)
    images = n * len(sets.corrupted)
    print(f"{params.data.dataset}, {params.model.name}, run {args.run}, device {device}: "
          f"{len(sets.corrupted)} corrupted sets x {n} images = {images:,} images")  # fmt: skip
    print(f"load corrupted sets        {load_s:7.2f} s")
    print(f"generate all corruptions   {gen_s:7.2f} s")
    print(f"inference, all sets        {statistics.median(infer):7.2f} s  (median of {args.repeats}; {images / statistics.median(infer):,.0f} img/s)")
    print(f"metrics, all sets          {statistics.median(score):7.2f} s")
    results = Results("corruption_eval", args.smoke)
    results.ratio("generate corruptions / inference time (all corrupted sets)", [gen_s / t for t in infer])
    results.ratio("generate corruptions / load cached eval sets time", [gen_s / load_s])
    results.write(args.json)


if __name__ == "__main__":
    main()
