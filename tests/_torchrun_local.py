"""Run by ``torchrun`` in tests/test_local.py: a 2-chunk pipeline of the test network; rank 0
saves the merged state dict to ``sys.argv[1]``."""

import sys

import torch

from tests.test_local import _spec  # noqa: E402

from sparse_core.local.chunk_processes import run_pipeline_torchrun  # noqa: E402

if __name__ == "__main__":
    out = run_pipeline_torchrun(_spec("chunked", steps=6), sys.argv[1] + "_parts")
    if out is not None:
        torch.save(out[0].state_dict(), sys.argv[1])
