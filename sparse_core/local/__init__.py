"""Local parallelism (Laskin et al. 2020, "Parallel Training of Deep Networks with Local
Updates", arXiv 2012.03837): chunk-wise truncated backprop with auxiliary heads.

- :mod:`~sparse_core.local.blocks`: registry models as block sequences;
- :mod:`~sparse_core.local.windows`: the variants (backprop, greedy, overlapping, chunked);
- :mod:`~sparse_core.local.model`: :class:`LocalNet`, heads, the exact simulation;
- :mod:`~sparse_core.local.chunk_processes`: one process per chunk with ``torch.distributed``;
- :mod:`~sparse_core.local.accounting`: training FLOPs and critical path;
- :mod:`~sparse_core.local.analysis`: batch-size sweep, gradient cosine, random labels.
"""

from sparse_core.local.blocks import Block, split_blocks
from sparse_core.local.model import LocalNet, build_local, make_head
from sparse_core.local.windows import VARIANTS, Window, make_windows, owners

__all__ = ["Block", "split_blocks", "LocalNet", "build_local", "make_head", "VARIANTS", "Window", "make_windows", "owners"]
