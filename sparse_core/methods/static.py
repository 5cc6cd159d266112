"""Static sparse training: a random mask with ERK layer densities, never updated (``static``).

The "Static" baseline of RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets
Winners", ICML, Sec. 4: a sparse network initialised at random at the start of training whose
topology stays fixed) and JaxPruner's static sparse training (Lee et al. 2023, "JaxPruner",
``jaxpruner.algorithms.sparse_trainers.StaticRandomSparse``, whose ``update_state`` returns the
sparse state unmodified): the masks are drawn at random with the layer-wise densities of
``train.dst.distribution`` (ERK by default, Evci et al. 2020, Sec. 3 / App. C; see
:mod:`sparse_core.sparsity.distributions`) at ``train.dst.sparsity``, and the network trains
under them with masked gradients, the pruned weights re-zeroed after every optimizer step.

It is :class:`~sparse_core.methods.dst.SET` without topology updates: the same constructor
draws the same initial masks as ``set`` and ``rigl`` for the same seed and model (exact
per-layer counts by largest-remainder apportionment, or Bernoulli entries with
``train.dst.bernoulli_init``), so ``static`` against ``set`` / ``rigl`` isolates what the
updates bring. ``train.dst``'s update keys (``update_period``, ``drop_fraction``, ...) are not
used. The sparsity lives in ``train.dst`` (not ``train.pruning``) for that reason: the mask and
its distribution are the DST methods' starting point. The mask's generator is seeded from the
run's seed (as for ``set``), so torch's global generator (data order, initialisation) is
untouched.
"""

from __future__ import annotations

from sparse_core.methods.dst import SET
from sparse_core.methods.registry import register_method


@register_method(name="static", family="pai", sparsity="dst", start="init", sweep=True,
                 paper="Evci et al. 2020, \"Rigging the Lottery: Making All Tickets Winners\" (ICML), Sec. 4 (the Static "
                       "baseline); Lee et al. 2023, \"JaxPruner\"",
                 summary="a fixed random mask with the layer densities of `train.dst.distribution` (ERK) at "
                         "`train.dst.sparsity`, never updated: `set`/`rigl`'s initial mask, no drop/grow")
class Static(SET):
    """A random ERK mask at initialisation, fixed for the whole run (see the module docstring).

    Inherits SET's constructor (the masks), hooks (masked gradients, re-zeroed weights), state
    and FLOPs rule (``3 f_S``, RigL App. H); only the update schedule differs: never.
    """

    name = "static"

    def update_due(self, step: int) -> bool:
        """Never: the topology is fixed."""
        return False
