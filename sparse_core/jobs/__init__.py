"""What each pipeline stage does, as plain functions: params in, files out, one job per module.

Tasks (``tasks/``) call these; they hold no Prefect or DVC code, so every stage can be run and
tested in-process. Layers (a module imports only those above it):

- :mod:`~sparse_core.jobs.rundirs`: run folders, set-up, export, fingerprints (and ``prepare``);
- :mod:`~sparse_core.jobs.fitting`: one training run of any registered method;
- :mod:`~sparse_core.jobs.local_runs`: the ``local`` family (simulation and one process per chunk);
- :mod:`~sparse_core.jobs.training`: ``warmup``, ``train``, ``retrain``, ensemble members, DDP;
- :mod:`~sparse_core.jobs.sweeps`: sparsity × seed sweeps and curve points;
- :mod:`~sparse_core.jobs.scoring`: ``evaluate`` and the FLOPs accounting;
- :mod:`~sparse_core.jobs.ensembles`: ``collect`` and ``evaluate_ensemble``.

This package module imports nothing, so a task loads only the job module it runs.
"""
