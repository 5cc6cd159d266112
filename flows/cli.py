"""The ``sparseflow`` command.

    sparseflow validate [--params params.yaml]
    sparseflow methods               # the registered methods (the README's method table)
    sparseflow deps [--write]        # each stage's code (from the import graph) / its manifest as its dep in the dvc.yaml files
    sparseflow deps --manifests DIR  # write the per-stage code manifests (the `code` stage of dvc.yaml)
    sparseflow run prepare|fastpath|ood|corrupt|warmup|report|local_analysis [--params P]
    sparseflow run train --method dpf [--seed 1]   # run-level stages take --seed (default: base.seeds[0])
    sparseflow run retrain --run dpf
    sparseflow run evaluate --run dpf_retrain
    sparseflow run collect --run edst_ensemble
    sparseflow run evaluate_ensemble --run edst_ensemble
    sparseflow compare [REV_A] [REV_B]  # metric and params differences (default HEAD vs workspace)
    sparseflow pipeline [--force] [--profile NAME] [--wait SECONDS] [--no-fork-server] [TARGET ...]
    sparseflow profile NAME          # copy profiles/NAME.yaml over params.yaml (validated)
    sparseflow export --run gmp --format compact|sparse|onnx [--seed 0] [--out PATH]   # runs/s<seed>/<run>/export/<format>/
    sparseflow sweep --method rigl --sparsity 0.8 0.9 --seeds 0 1   # fanned out (params.orchestration)
    torchrun --nproc-per-node K --no-python sparseflow local-worker --method local_chunked
    torchrun --standalone --nproc-per-node 2 --no-python sparseflow ddp-worker --method dpf   # data-parallel train@dpf
    sparseflow server [--host 127.0.0.1] [--port 4200] [--database URL]   # a local Prefect server (SQLite or PostgreSQL)
    sparseflow postgres [--dir PATH] [--port 5433]   # a PostgreSQL server on 127.0.0.1 for it; prints the URL
    sparseflow with-server -- dvc repro   # one temporary Prefect server for every stage (unless PREFECT_API_URL)
    sparseflow serve --cron "0 3 * * *" | --interval SECONDS [--profile NAME] [--target T ...]
    sparseflow deploy --pool NAME [--cron EXPR | --interval SECONDS] [--profile NAME]
    sparseflow deploy --flow sweep --method rigl --sparsity 0.8 0.9 [--seeds 0 1] --pool NAME --name N
    sparseflow worker --pool NAME [--run-once]   # Prefect's process worker; SIGTERM / Ctrl-C stop its runs at a step boundary

Exit status 2 on invalid params (message names the key, value and what is allowed), 1 on
data errors and other expected failures (one line naming the file, key or run; no traceback),
128 + the signal number when stopped by SIGTERM or Ctrl-C (:mod:`flows.signals`), 0 on
success. ``sparseflow --debug …`` (or ``SPARSEFLOW_DEBUG=1``) shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Quiet, offline-friendly Prefect defaults; the user's environment wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")

# Nothing heavier than the params model is imported here: torch, torchvision, pandas and
# scikit-learn load inside the commands (and, for `run`, inside the stage's task) that use
# them, so argument parsing, validation and a stage's Prefect flow run start in well under a
# second (tests/test_cli_imports.py checks it, benchmarks/orchestration.py times it).
from sparse_core.config import ConfigError, Params, load_params, plain_name, seeded, sweep_methods  # noqa: E402


#: Set (to anything but 0) to keep tracebacks, like ``--debug``: for the ``sparseflow run``
#: commands that DVC starts, whose command line is fixed in dvc.yaml.
DEBUG_ENV = "SPARSEFLOW_DEBUG"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors reported as one line with exit status 1, without a traceback: missing files, bad
    values (every artifact, name, resource and config error is a ValueError), data errors
    (:class:`sparse_core.data.DataError`), a full disk (:class:`sparse_core.artifacts.StorageError`)
    and a busy workspace. The classes of modules not loaded yet are left out: an exception of a
    class never imported cannot have been raised, and importing ``sparse_core.data`` here would
    load torch and torchvision."""
    errors: list[type[BaseException]] = [FileNotFoundError, ValueError]
    for module, name in (("sparse_core.data.fetch", "DataError"), ("flows.workspace", "WorkspaceBusy"),
                         ("sparse_core.artifacts", "StorageError"), ("sparse_core.interrupt", "Stopped")):  # fmt: skip
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


class _NoUserTracebacks:
    """A logging filter that drops the traceback from Prefect's "task/flow run failed" records
    when the exception is a user error (:func:`_user_errors`): the message keeps the error's
    one line, naming the file, key or run; a bug still shows its traceback."""

    def filter(self, record) -> bool:  # noqa: ANN001 - logging.LogRecord
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, _user_errors()):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_tracebacks() -> None:
    """Install :class:`_NoUserTracebacks` on the handlers of Prefect's loggers (filters on a
    logger do not see records that its children propagate, so the handlers carry it)."""
    import logging

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _NoUserTracebacks) for f in handler.filters):
                handler.addFilter(_NoUserTracebacks())


def _seed_arg(text: str) -> int:
    """``--seed``: an integer in 0..2**32-1 (numpy and torch generators take no other)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"seed {value} is outside 0..2**32-1")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help=f"show the traceback of every error (or set {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate params.yaml and print the resolved config")
    v.add_argument("--params", default="params.yaml")
    sub.add_parser("methods", help="list the registered methods as a markdown table")
    dp = sub.add_parser("deps", help="each stage's code (its import closure); --write puts each stage's manifest "
                        "into the dvc.yaml files; --manifests DIR writes the manifests (the `code` stage)")
    dp.add_argument("--write", action="store_true")
    dp.add_argument("--manifests", type=Path, metavar="DIR")
    dp.add_argument("--params", default="params.yaml")
    r = sub.add_parser("run", help="run one pipeline stage as a Prefect flow")
    r.add_argument("stage", choices=["prepare", "fastpath", "ood", "corrupt", "warmup", "train", "retrain", "collect", "evaluate", "evaluate_ensemble", "aggregate", "report", "local_analysis", "curves", "curves_report"])
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--method", help="train, curves: the method to run")
    r.add_argument("--run", help="retrain/evaluate/collect/evaluate_ensemble/aggregate: the run or ensemble name")
    r.add_argument("--seed", type=_seed_arg, help="warmup/train/retrain/collect/evaluate/evaluate_ensemble: the training seed "
                   "(default: the first of base.seeds); its files go to <runs_dir>/s<seed>/ etc.")
    from flows import compare

    compare.add_parser(sub)
    pl = sub.add_parser("pipeline", help="dvc repro as a Prefect flow")
    pl.add_argument("targets", nargs="*")
    pl.add_argument("--force", action="store_true")
    pl.add_argument("--profile", help="switch params.yaml to profiles/NAME.yaml first")
    pl.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait this long for another pipeline run on this workspace (default 0: refuse; -1: forever)")
    pl.add_argument("--no-fork-server", action="store_true",
                    help="start every stage as a fresh process (default: stages fork from a server that has their imports done)")
    sw = sub.add_parser("sweep", help="sparsity x seed sweep of one method, fanned out to the task runner")
    sw.add_argument("--method", required=True)
    sw.add_argument("--sparsity", type=float, nargs="+", required=True)
    sw.add_argument("--seeds", type=int, nargs="+", default=[0])
    sw.add_argument("--params", default="params.yaml")
    sv = sub.add_parser("server", help="start a local Prefect server (embedded SQLite; loopback only by default)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; see README before exposing it)")
    sv.add_argument("--port", type=int, default=4200)
    sv.add_argument("--database", help="database URL, e.g. postgresql+asyncpg://prefect:<password>@127.0.0.1:5432/prefect "
                    "(default: $PREFECT_API_DATABASE_CONNECTION_URL, else SQLite under PREFECT_HOME)")  # fmt: skip
    wk = sub.add_parser("worker", help="a Prefect process worker for a pool that stops its flow runs on SIGTERM / Ctrl-C")
    wk.add_argument("--pool", required=True)
    wk.add_argument("--run-once", action="store_true", help="take the runs waiting now, then exit")
    pg = sub.add_parser("postgres", help="run a PostgreSQL server on 127.0.0.1 for the Prefect server (prints its URL)")
    pg.add_argument("--dir", help="cluster folder (kept; default: a new temporary folder)")
    pg.add_argument("--port", type=int, default=5433)
    ws = sub.add_parser("with-server", help="run a command against one Prefect server (a temporary one unless PREFECT_API_URL is set)")
    ws.add_argument("--no-fork-server", action="store_true",
                    help="start every stage as a fresh process (default: stages fork from a server that has their imports done)")
    ws.add_argument("--plain-dvc", action="store_true",
                    help="run a `dvc` command as given (default: this environment's DVC through flows.dvc_main, which "
                    "reuses the dvc.lock it wrote after the last stage instead of parsing it again)")
    ws.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    pr = sub.add_parser("profile", help="replace params.yaml by a validated profile from profiles/")
    pr.add_argument("name")
    pr.add_argument("--params", default="params.yaml")
    ex = sub.add_parser("export", help="export a trained run: compact (structured runs), sparse (CSR where faster), onnx")
    ex.add_argument("--run", required=True, help="run name, e.g. gmp (a folder of <runs_dir>/s<seed>/)")
    ex.add_argument("--format", required=True, choices=["compact", "sparse", "onnx"], dest="export_format")
    ex.add_argument("--seed", type=_seed_arg, help="training seed (default: the first of base.seeds)")
    ex.add_argument("--out", help="output folder (default: <run folder>/export/<format>)")
    ex.add_argument("--params", default="params.yaml")
    lw = sub.add_parser("local-worker", help="one chunk of a local_* run under torchrun (one process per chunk)")
    lw.add_argument("--method", required=True)
    lw.add_argument("--params", default="params.yaml")
    lw.add_argument("--seed", type=_seed_arg, help="training seed (default: the first of base.seeds)")
    dw = sub.add_parser("ddp-worker", help="one rank of a data-parallel (DDP) train run under torchrun")
    dw.add_argument("--method", required=True)
    dw.add_argument("--params", default="params.yaml")
    dw.add_argument("--seed", type=_seed_arg, help="training seed (default: the first of base.seeds)")
    s = sub.add_parser("serve", help="serve the pipeline flow as a deployment (needs a Prefect server)")
    d = sub.add_parser("deploy", help="create a pipeline deployment for a process work pool")
    d.add_argument("--pool", required=True, help="process work pool (created when missing)")
    for cmd in (s, d):
        g = cmd.add_mutually_exclusive_group(required=cmd is s)
        g.add_argument("--cron")
        g.add_argument("--interval", type=int, help="seconds")
        cmd.add_argument("--name", default="sparseflow-pipeline", help="deployment name")
        cmd.add_argument("--profile", help="default profile of the scheduled runs")
        cmd.add_argument("--target", action="append", default=[], help="default DVC target (repeatable)")
        cmd.add_argument("--wait", type=float, default=0.0, help="default wait_seconds for a busy workspace")
        cmd.add_argument("--flow", choices=["pipeline", "sweep"], default="pipeline",
                         help="pipeline: dvc repro (default); sweep: sparseflow sweep with --method/--sparsity/--seeds")  # fmt: skip
        cmd.add_argument("--method", help="--flow sweep: the method")
        cmd.add_argument("--sparsity", type=float, nargs="+", help="--flow sweep: the sparsities")
        cmd.add_argument("--seeds", type=int, nargs="+", default=[0], help="--flow sweep: the training seeds")
    return p


def _run_stage(args: argparse.Namespace, console: bool = False) -> None:
    """``sparseflow run``; ``console``: this process is the ``sparseflow`` command itself."""
    if args.stage in ("train", "curves") and not args.method:
        raise SystemExit(f"sparseflow run {args.stage}: --method is required")
    if args.stage in ("retrain", "collect", "evaluate", "evaluate_ensemble", "aggregate") and not args.run:
        raise SystemExit(f"sparseflow run {args.stage}: --run is required")
    _check_names(args, load_params(args.params))  # fail before Prefect starts (and before it is imported)
    import gc

    if console:
        # Importing Prefect creates about 100,000 tracked objects and almost no garbage (286
        # collection passes freed 4,344 objects, measured): the passes only cost time, about
        # 10% of the import. Afterwards those objects go to the permanent generation
        # (gc.freeze), so the collections during the stage's work skip them too.
        gc.disable()
    from prefect import tags

    from flows.stage_flows import PIPELINE_RUN_ENV, PIPELINE_TAG_PREFIX, stage_settings

    if console:
        gc.freeze()
        gc.enable()
    if not _debug(args):
        _quiet_user_tracebacks()
    parent = os.environ.get(PIPELINE_RUN_ENV)  # set when a pipeline flow run started this stage
    with stage_settings(), tags(*([PIPELINE_TAG_PREFIX + parent] if parent else [])):
        _dispatch_stage(args)


def _check_names(args: argparse.Namespace, params: "Params") -> None:
    """Match ``--method`` / ``--run`` against the names the params define for the command
    (:func:`sparse_core.config.plain_name`): a name becomes a folder, so it is never used as given.

    Raises:
        UnknownNameError: the name is not one of the command's (the message lists them).
    """
    from sparse_core.methods import registry

    t = params.train
    ensembles = [m for m in t.methods if registry.spec(m).ensemble is not None]
    known = {
        "train": ("--method", t.methods), "local-worker": ("--method", t.methods), "ddp-worker": ("--method", t.methods),
        "curves": ("--method", params.curves.methods), "sweep": ("--method", sweep_methods()),
        "retrain": ("--run", params.retrain.runs), "evaluate": ("--run", params.evaluate.runs),
        "collect": ("--run", ensembles), "evaluate_ensemble": ("--run", ensembles),
        "aggregate": ("--run", [*params.evaluate.runs, *params.collect.ensembles]),  # aggregate.models
    }  # fmt: skip
    command = args.stage if args.command == "run" else args.command
    if command in known:
        option, names = known[command]
        value = getattr(args, option.lstrip("-"))
        if value is not None:
            plain_name(value, names, f"{command} {option}")


def _dispatch_stage(args: argparse.Namespace) -> None:
    from flows import stage_flows as f

    stage_flow = getattr(f, f"{args.stage}_flow")  # only this stage's flow is built
    if args.stage in ("prepare", "fastpath", "ood", "corrupt", "report", "local_analysis", "curves_report"):
        f.with_task_runner(stage_flow, args.params)(args.params)
    elif args.stage == "warmup":
        stage_flow(args.params, args.seed)
    elif args.stage in ("train", "curves"):
        f.with_task_runner(stage_flow, args.params)(args.method, args.params, args.seed)
    elif args.stage == "aggregate":
        stage_flow(args.run, args.params)
    else:  # retrain, collect, evaluate, evaluate_ensemble
        stage_flow(args.run, args.params, args.seed)


def _profile(args: argparse.Namespace) -> None:
    from flows.repro_flow import use_profile

    src = use_profile(Path("."), args.name, args.params)
    print(f"{args.params} <- {src}; run `dvc repro` (or `make repro`); `git checkout {args.params}` restores the default")


#: How long a command waits for Prefect's temporary server (started when ``PREFECT_API_URL`` is
#: unset, e.g. under a plain ``dvc repro``) to answer: Prefect's default, 20 s, ran out on a
#: loaded 2-core machine ("Timed out while attempting to connect to ephemeral Prefect API
#: server", `sparseflow pipeline` in tests/test_stop.py, fresh-clone CI, 2026-12-01). Set in
#: the environment, so the stage processes that DVC starts inherit it; a value the user set wins.
EPHEMERAL_STARTUP_ENV, EPHEMERAL_STARTUP_SECONDS = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault(EPHEMERAL_STARTUP_ENV, EPHEMERAL_STARTUP_SECONDS)  # before Prefect reads its settings
    args = _parser().parse_args(argv)
    if argv is None:  # the `sparseflow` command itself, not a caller in a longer-lived process
        _skip_final_gc()
    status = 1  # an exception other than those reported below
    if argv is None and args.command in ("run", "pipeline", "local-worker", "ddp-worker", "sweep"):
        from flows import signals

        signals.install(forward_to_children=args.command == "pipeline")
    try:
        status = _main(args, console=argv is None)
    except KeyboardInterrupt as exc:  # SIGTERM or Ctrl-C (flows.signals), outside a training loop
        if _debug(args):
            raise
        status = _stopped_by(exc)
    finally:
        if args.command == "run":
            from tasks.timing import record_stage

            record_stage(args.stage, sys.argv[1:] if argv is None else list(argv), status)
    return status


def _stopped_by(exc: KeyboardInterrupt) -> int:
    """:func:`_stopped` for a ``KeyboardInterrupt``: the signal that requested the stop
    (:mod:`flows.signals`), else the interrupt's own message (``SIGINT`` if it has none)."""
    from sparse_core import interrupt

    return _stopped(interrupt.reason() if interrupt.stop_requested() else str(exc) or "SIGINT")


def _stopped(reason: str, detail: str | None = None) -> int:
    """Print the one line of a stopped command; returns 128 + the signal number (shell convention)."""
    import signal

    what = detail or f"stopped by {reason}; every file written so far is complete (atomic writes); run it again to resume"
    print(f"sparseflow: {what}", file=sys.stderr)
    try:
        return 128 + int(signal.Signals[reason])
    except KeyError:
        return 130


def _skip_final_gc() -> None:
    """Skip the interpreter's final garbage collection over every object the imports created
    (0.3 s with Prefect loaded, 0.5 s with torch, measured): at exit, after Prefect's own exit
    handlers have flushed its logs and events, move all objects to the permanent generation
    (:func:`gc.freeze`), which that collection leaves alone; the OS reclaims the memory. Files
    are closed by their ``with`` blocks long before; nothing else changes."""
    import atexit
    import gc

    atexit.register(gc.freeze)  # registered first, so it runs last (atexit runs in reverse order)


def _main(args: argparse.Namespace, console: bool = False) -> int:
    try:
        if args.command == "validate":
            params = load_params(args.params)
            import json

            from sparse_core.methods import registry

            if any(registry.spec(m).params_key for m in params.train.methods):
                from sparse_core.methods.base import check_method_options

                try:
                    check_method_options(params.train)
                except ConfigError as exc:
                    raise ConfigError(f"{args.params}: {exc}") from None

            print(json.dumps(params.model_dump(mode="json"), indent=2))
        elif args.command == "methods":
            from sparse_core.methods.registry import markdown_table

            print(markdown_table())
        elif args.command == "deps":
            from flows import stage_code

            root = Path(".")
            if args.write:
                for path in stage_code.write_all(root):
                    print(f"sparseflow deps: updated {path}")
            if args.manifests is not None:
                n = stage_code.write_manifests(root, load_params(args.params), args.manifests)
                print(f"sparseflow deps: wrote {n} manifests to {args.manifests}/")
            if not (args.write or args.manifests):
                for rel, text in stage_code.manifests(root, load_params(args.params)).items():
                    files = [line.split("  ", 1)[1] for line in text.splitlines() if not line.startswith("#")]
                    print(f"{rel.removesuffix('.txt')}: {' '.join(files)}")
        elif args.command == "run":
            _run_stage(args, console)
        elif args.command == "local-worker":
            from sparse_core.jobs.local_runs import stage_local_worker

            params = load_params(args.params)
            _check_names(args, params)
            out = stage_local_worker(seeded(params, args.seed), args.method)
            if out is not None:
                print(f"sparseflow local-worker: {args.method} exported to {out}")
        elif args.command == "ddp-worker":
            from sparse_core.distributed import MaskDivergenceError
            from sparse_core.jobs.training import stage_train_ddp

            params = load_params(args.params)
            _check_names(args, params)
            try:
                out = stage_train_ddp(seeded(params, args.seed), args.method)
            except MaskDivergenceError as exc:
                print(f"sparseflow ddp-worker: {exc}", file=sys.stderr)
                return 1
            if out is not None:
                print(f"sparseflow ddp-worker: {args.method} exported to {out}")
        elif args.command == "compare":
            from flows import compare

            return compare.run(args)
        elif args.command == "pipeline":
            from flows.repro_flow import pipeline_flow

            if not _debug(args):
                _quiet_user_tracebacks()

            pipeline_flow(targets=args.targets or None, force=args.force, profile=args.profile, wait_seconds=args.wait,
                          fork_server=not args.no_fork_server)  # fmt: skip
        elif args.command == "sweep":
            from flows import stage_flows as f

            _check_names(args, load_params(args.params))
            out = f.with_task_runner(f.sweep_flow, args.params)(args.method, args.sparsity, args.seeds, args.params)
            print(f"sparseflow sweep: {out}")
        elif args.command == "export":
            from sparse_core.export import export_named_run

            out = export_named_run(args.params, args.run, args.export_format, args.seed, args.out)
            print(f"sparseflow export: {args.run} ({args.export_format}) -> {out}")
        elif args.command == "profile":
            _profile(args)
        elif args.command == "with-server":
            from flows import server

            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise SystemExit("sparseflow with-server: give the command after --, e.g. sparseflow with-server -- dvc repro")
            return server.with_server(cmd, fork_server=not args.no_fork_server, reuse_lock=not args.plain_dvc)
        elif args.command == "server":
            from flows import server

            try:
                return server.start(args.host, args.port, args.database)
            except ValueError as exc:
                print(f"sparseflow server: {exc}", file=sys.stderr)
                return 2
        elif args.command == "worker":
            from flows import worker

            return worker.main(args.pool, args.run_once)
        elif args.command == "postgres":
            from flows import pgcluster

            return pgcluster.main(args.dir, args.port)
        elif args.command in ("serve", "deploy"):
            from flows import server

            server.serve_or_deploy(args)
    except ConfigError as exc:
        if _debug(args):
            raise
        print(f"sparseflow: invalid params\n{exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the expected kinds are reported, the rest re-raised
        stopped = sys.modules.get("sparse_core.interrupt")
        if stopped is not None and isinstance(exc, stopped.Stopped) and not _debug(args):
            return _stopped(stopped.reason(), str(exc))
        wrapped = _wrapped_interrupt(exc)
        if wrapped is not None and not _debug(args):  # the stop, re-raised as a library's own error
            return _stopped_by(wrapped)
        if _debug(args) or not isinstance(exc, _user_errors()):
            raise
        print(f"sparseflow: {exc}", file=sys.stderr)
        if console:
            print("  (run with --debug, or set SPARSEFLOW_DEBUG=1, for the traceback)", file=sys.stderr)
        return 1
    return 0


def _wrapped_interrupt(exc: BaseException) -> KeyboardInterrupt | None:
    """The ``KeyboardInterrupt`` (SIGTERM or Ctrl-C, :mod:`flows.signals`) that ``exc`` wraps, if
    any: a library that calls our code may catch the interrupt and raise its own error from it.
    pydantic does (a stop during ``model_dump`` surfaces as ``PydanticSerializationError: Error
    calling function `_ser_model`: KeyboardInterrupt: SIGTERM``, a ``ValueError``), which would
    otherwise be reported as a user error with exit status 1 instead of the stop it is (128 + the
    signal number). Follows ``__cause__`` and ``__context__``; returns None for any other error."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


if __name__ == "__main__":
    sys.exit(main())
