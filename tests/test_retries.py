"""Prefect task retries: transient I/O failures are retried, deterministic failures are not."""

from __future__ import annotations

import errno

import pytest

from sparse_core.config import ConfigError
from sparse_core.data import DataError
from tasks.stage_tasks import IO_RETRIES, is_transient


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError(errno.EIO, "Input/output error"), True),
        (OSError(errno.ESTALE, "Stale file handle"), True),
        (TimeoutError("read timed out"), True),
        (ConnectionResetError("peer reset"), True),
        (FileNotFoundError(errno.ENOENT, "missing"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (ConfigError("params.yaml: train.pruning.sparsity = 1.2"), False),
        (DataError("data/raw/x.gz: md5 mismatch"), False),
        (ValueError("bad value"), False),
        (FloatingPointError("non-finite loss"), False),
    ],
)
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient


def test_a_task_retries_a_transient_io_failure_but_not_bad_params(prefect_server):
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings

    calls = {"io": 0, "params": 0}

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def flaky_io() -> str:
        calls["io"] += 1
        if calls["io"] == 1:
            raise OSError(errno.EIO, "Input/output error", "runs/dpf/last.pt")
        return "ok"

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def bad_params() -> None:
        calls["params"] += 1
        raise ConfigError("params.yaml: 1 invalid value(s)")

    @flow
    def both() -> str:
        out = flaky_io()
        with pytest.raises(ConfigError):
            bad_params()
        return out

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        assert both() == "ok"
    assert calls == {"io": 2, "params": 1}
