"""Child process of ``benchmarks/soak.py`` (not meant to be run by hand).

Run with the working directory set to a project folder holding ``params.yaml``:

    python benchmarks/_soak_child.py setup            # prepare, warmup, ood, corrupt
    python benchmarks/_soak_child.py train <method>   # stage_train + stage_evaluate of one run

``train`` prints ``ready`` (flushed) once imports and params are done, just before
``stage_train`` starts, so the parent can time its kill from the start of training rather than
from process start (imports alone take seconds). It prints ``done`` when the run is exported
and evaluated.
"""

from __future__ import annotations

import sys
import warnings


def main() -> None:
    from sparse_core import evalsets
    from sparse_core import corrupted_sets
    from sparse_core.jobs import rundirs, scoring, training
    from sparse_core.config import load_params

    warnings.filterwarnings("ignore", message="OOD set")  # absent sets are expected offline
    params = load_params("params.yaml")
    if sys.argv[1] == "setup":
        rundirs.stage_prepare(params)
        training.stage_warmup(params)
        evalsets.stage_ood(params)
        corrupted_sets.stage_corrupt(params)
        return
    method = sys.argv[2]
    print("ready", flush=True)
    training.stage_train(params, method)
    scoring.stage_evaluate(params, method)
    print("done", flush=True)


if __name__ == "__main__":
    main()
