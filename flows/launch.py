"""The ``sparseflow`` command's entry point: hand a ``sparseflow run`` stage to the fork server
when one is running (:mod:`flows.forkserver`, started by ``sparseflow with-server``), otherwise
run the command here (:func:`flows.cli.main`). Importing this module imports nothing heavy."""

from __future__ import annotations

import os
import sys


def main() -> int:
    from flows import forkserver

    status = forkserver.forward(sys.argv)
    if status is not None:
        if os.environ.get("SPARSEFLOW_TIMINGS"):  # tasks.timing.TIMINGS_ENV (benchmarks/orchestration.py)
            from tasks.timing import record_caller

            record_caller()
        return status
    from flows.cli import main as cli_main

    return cli_main()
