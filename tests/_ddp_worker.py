"""Run by ``torchrun`` in tests/test_ddp.py: ``_ddp_worker.py OUT_DIR SCENARIO [SCENARIO ...]``.

Each rank trains every scenario of :data:`tests.test_ddp.SCENARIOS` data-parallel (gloo, CPU)
and saves what it saw to ``OUT_DIR/<scenario>_rank<r>.pt``; a diverging scenario raises
:class:`~sparse_core.distributed.MaskDivergenceError` on every rank instead.
"""

import sys
from pathlib import Path

import torch

from sparse_core.distributed import data_parallel
from tests.test_ddp import train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    with data_parallel("cpu", timeout_s=120) as parallel:
        for name in sys.argv[2:]:
            result = train(name, out / name, parallel)
            torch.save(result, out / f"{name}_rank{parallel.rank}.pt")
