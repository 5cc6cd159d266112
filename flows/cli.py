"""The ``sparseflow`` command.

    sparseflow validate [--params params.yaml]
    sparseflow run prepare|ood|corrupt|warmup|report|local_analysis [--params P]
    sparseflow run train --method dpf
    sparseflow run retrain --run dpf
    sparseflow run evaluate --run dpf_retrain
    sparseflow run collect --run edst_ensemble
    sparseflow run evaluate_ensemble --run edst_ensemble
    sparseflow compare [REV_A] [REV_B]  # metric and params differences (default HEAD vs workspace)
    sparseflow pipeline [--force] [TARGET ...]
    sparseflow profile NAME          # copy profiles/NAME.yaml over params.yaml (validated)
    torchrun --nproc-per-node K --no-python sparseflow local-worker --method local_chunked
    sparseflow serve --cron "0 3 * * *" | --interval SECONDS

Exit status 2 on invalid params (message names the key, value and what is allowed), 1 on
data errors, 0 on success.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

# Quiet, offline-friendly Prefect defaults; the user's environment wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")

from sparse_core.config import ConfigError, load_params  # noqa: E402
from sparse_core.data import DataError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate params.yaml and print the resolved config")
    v.add_argument("--params", default="params.yaml")
    r = sub.add_parser("run", help="run one pipeline stage as a Prefect flow")
    r.add_argument("stage", choices=["prepare", "ood", "corrupt", "warmup", "train", "retrain", "collect", "evaluate", "evaluate_ensemble", "report", "local_analysis"])
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--method", help="train: the method to run")
    r.add_argument("--run", help="retrain/evaluate: the run name")
    from flows import compare

    compare.add_parser(sub)
    pl = sub.add_parser("pipeline", help="dvc repro as a Prefect flow")
    pl.add_argument("targets", nargs="*")
    pl.add_argument("--force", action="store_true")
    pr = sub.add_parser("profile", help="replace params.yaml by a validated profile from profiles/")
    pr.add_argument("name")
    pr.add_argument("--params", default="params.yaml")
    lw = sub.add_parser("local-worker", help="one chunk of a local_* run under torchrun (one process per chunk)")
    lw.add_argument("--method", required=True)
    lw.add_argument("--params", default="params.yaml")
    s = sub.add_parser("serve", help="serve the pipeline flow on a schedule (needs a Prefect server)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--cron")
    g.add_argument("--interval", type=int, help="seconds")
    return p


def _run_stage(args: argparse.Namespace) -> None:
    from flows import stages as f

    load_params(args.params)  # fail before Prefect starts
    if args.stage == "train" and not args.method:
        raise SystemExit("sparseflow run train: --method is required")
    if args.stage in ("retrain", "collect", "evaluate", "evaluate_ensemble") and not args.run:
        raise SystemExit(f"sparseflow run {args.stage}: --run is required")
    simple = {"prepare": f.prepare_flow, "ood": f.ood_flow, "corrupt": f.corrupt_flow, "report": f.report_flow,
              "local_analysis": f.local_analysis_flow}  # fmt: skip
    if args.stage in simple:
        simple[args.stage](args.params)
    elif args.stage == "warmup":
        f.warmup_flow(args.params)
    elif args.stage == "train":
        f.train_flow(args.method, args.params)
    elif args.stage == "retrain":
        f.retrain_flow(args.run, args.params)
    elif args.stage == "collect":
        f.collect_flow(args.run, args.params)
    elif args.stage == "evaluate_ensemble":
        f.evaluate_ensemble_flow(args.run, args.params)
    else:
        f.evaluate_flow(args.run, args.params)


def _profile(args: argparse.Namespace) -> None:
    from sparse_core.artifacts import atomic_path

    src = Path("profiles") / f"{args.name}.yaml"
    if not src.is_file():
        known = sorted(p.stem for p in Path("profiles").glob("*.yaml"))
        raise ConfigError(f"{src}: no such profile; available: {', '.join(known) or 'none'}")
    load_params(src)
    with atomic_path(args.params) as tmp:
        shutil.copyfile(src, tmp)
    print(f"{args.params} <- {src}; run `dvc repro` (or `make repro`); `git checkout {args.params}` restores the default")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            params = load_params(args.params)
            import json

            print(json.dumps(params.model_dump(mode="json"), indent=2))
        elif args.command == "run":
            _run_stage(args)
        elif args.command == "local-worker":
            from sparse_core.stages import stage_local_worker

            out = stage_local_worker(load_params(args.params), args.method)
            if out is not None:
                print(f"sparseflow local-worker: {args.method} exported to {out}")
        elif args.command == "compare":
            from flows import compare

            return compare.run(args)
        elif args.command == "pipeline":
            from flows.pipeline import pipeline_flow

            pipeline_flow(targets=args.targets or None, force=args.force)
        elif args.command == "profile":
            _profile(args)
        elif args.command == "serve":
            from flows.pipeline import pipeline_flow

            if args.cron:
                pipeline_flow.serve(name="sparseflow-pipeline", cron=args.cron)
            else:
                pipeline_flow.serve(name="sparseflow-pipeline", interval=args.interval)
    except ConfigError as exc:
        print(f"sparseflow: invalid params\n{exc}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"sparseflow: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
