"""Wall time of evaluating one model on every corrupted set (batched inference), and of
generating the corrupted sets, for the current params.yaml.

Needs the prepare, corrupt and ood stages' outputs and the run's exported model
(``make repro`` or ``dvc repro evaluate@<run>``). Prints seconds for: loading the sets,
generating all corruptions × severities afresh (not written anywhere), inference on every
corrupted set, and the metrics (calibration per set).

    python benchmarks/corruption_eval.py [--run dpf] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from sparse_core import evalsets
from sparse_core.config import load_params
from sparse_core.corruptions import corrupt
from sparse_core.evaluation import evaluate_probs, model_probs
from sparse_core.jobs.rundirs import setup, load_exported, transform_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="dpf")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
