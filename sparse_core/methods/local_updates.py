"""Local parallelism (Laskin et al. 2020, "Parallel Training of Deep Networks with Local
Updates"): the network is split into chunks, each trained by its own auxiliary head's loss
with truncated backpropagation. The three variants differ in the window of blocks each head's
gradient reaches (:class:`~sparse_core.local.model.LocalNet`); the stage wraps the model and
composes ``local.sparse_method``'s hooks with them, so they have no method class of their own.
"""

from sparse_core.methods.registry import declare_method

declare_method(name="local_greedy", family="local", local_variant="greedy",
               paper="Laskin et al. 2020, \"Parallel Training of Deep Networks with Local Updates\" (arXiv:2012.03837)",
               summary="local training: every block trained by its own auxiliary-head loss, input detached; exact "
               "single-process simulation by default (see [Local parallelism](#local-parallelism))")
declare_method(name="local_overlap", family="local", local_variant="overlapping",
               paper="Laskin et al. 2020, \"Parallel Training of Deep Networks with Local Updates\" (arXiv:2012.03837)",
               summary="as `local_greedy`, every pair of consecutive blocks (overlapping windows)")
declare_method(name="local_chunked", family="local", local_variant="chunked",
               paper="Laskin et al. 2020, \"Parallel Training of Deep Networks with Local Updates\" (arXiv:2012.03837)",
               summary="as `local_greedy`, `local.chunks` chunks of consecutive blocks")
