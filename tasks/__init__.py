"""Prefect tasks: one unit of work each, params file path in, output paths out.

A task holds no algorithm: it validates params, calls one function of
the modules of :mod:`sparse_core.jobs` and returns the paths it wrote. Retries are for transient faults
only; a bad params file is deterministic and is never retried.
"""
