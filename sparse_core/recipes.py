"""Paper recipes as data: the design ratios a paper claim depends on, their paper values and sources.

A claim about a paper is evidence about that paper only when the experiment keeps the paper's
design: its budgets relative to each other, its topology-update cadence, its growth and drop
settings. Each :class:`DesignRatio` names one such quantity, the value the paper's experiment
used (with the command line or section it comes from) and how to read the same quantity off a
profile's :class:`~sparse_core.config.Params`. :func:`profile_design` reads every ratio of a
profile; :func:`compare` lists where it departs from the paper. The claims table
(:mod:`sparse_core.claims`) puts that list next to each verdict and qualifies the verdict of a
claim whose profile departs.

Sources. FreeTickets (Liu et al. 2022): the README of VITA-Group/FreeTickets (``main_DST.py ...
--epochs 250``, ``main_EDST.py ... --epochs 450 --epochs-explo 150 --model-num 3``, both with
``--update-frequency 1000 --batch-size 128 --death-rate 0.5 --large-death-rate 0.8 --density 0.2
--sparse-init ERK --growth gradient``) and its code: ``sparselearning/core.py`` ``Masking.step``
calls ``truncate_weights(args.death_rate)`` every ``--update-frequency`` steps to the end of
training (a constant drop fraction; the cosine-decayed value it computes is not used), and the
CIFAR-10 loaders hold out ``--valid_split 0.1``, so an epoch is ⌈45,000 / 128⌉ = 352 steps and
ΔT = 1000 steps is 1000 / (250 · 352) = 1/88 of one single run. DPF (Lin et al. 2020): mask
re-estimated every 16 iterations, the cubic schedule reaching its target at 75% of training
(the values this project's ``dpf`` documents; no official code is public, the reimplementation
INCHEON-CHO/Dynamic_Model_Pruning_with_Feedback uses ``--prune-freq 16`` and ends the schedule
at epoch 225 of 300).

EDST's growth: the reference disagrees with itself. The README's command passes ``--growth
gradient``; the CIFAR-10 EDST script it replaced (``script_EDST_CF10``, removed from the
repository) used ``random``. The paper recipe here follows the README: it is the later
revision, and it is the growth of the DST Ensemble on CIFAR-10, so the two ensembles compared
by the claims differ only in how their members are produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from sparse_core.config import Params

_FT_README = "FreeTickets README"
_CONSTANT_P = "FreeTickets sparselearning/core.py: Masking.step calls truncate_weights(args.death_rate)"
_NO_STOP = "FreeTickets sparselearning/core.py: an update every --update-frequency steps, never stopped"
#: Optimizer steps of one FreeTickets single run on CIFAR-10: 250 epochs × ⌈45,000 / 128⌉.
FT_SINGLE_RUN_STEPS = 250 * 352
#: Relative tolerance within which a numeric ratio counts as the paper's (rounding to whole
#: epochs or steps moves a ratio by a few percent at small scale).
REL_TOL = 0.05


@dataclass(frozen=True)
class DesignRatio:
    """One design quantity of a paper's experiment.

    Attributes:
        key: identifier (claims name ratios by key).
        label: what it is, for a reader ("EDST budget").
        paper: the paper's value (a number, or a name such as ``"gradient"``).
        source: where the paper's value comes from (command line, code, section).
        read: the profile's value from its params and its number of training images (None:
            the params' own count, unknown for an image folder); None where they cannot tell.
        fmt: how a value is written in the report.
    """

    key: str
    label: str
    paper: float | int | str
    source: str
    read: Callable[["Params", int | None], float | int | str | None]
    fmt: Callable[[Any], str] = str

    def matches(self, value: Any) -> bool | None:
        """Whether ``value`` is the paper's: numbers within :data:`REL_TOL` (ints exactly), names
        equal; None when ``value`` is None (unknown)."""
        if value is None:
            return None
        if isinstance(self.paper, str) or isinstance(value, str):
            return str(value) == str(self.paper)
        if isinstance(self.paper, int) and not isinstance(self.paper, bool):
            return float(value) == float(self.paper)
        return math.isclose(float(value), float(self.paper), rel_tol=REL_TOL, abs_tol=1e-12)

    def describe(self, value: Any) -> str:
        """``"<label> <value> (paper <value>)"``."""
        shown = "unknown" if value is None else self.fmt(value)
        return f"{self.label} {shown} (paper {self.fmt(self.paper)})"


def _times(v: float) -> str:
    text = f"{float(v):.2f}"
    return (text[:-1] if text.endswith("0") else text) + "×"


def _share(v: float) -> str:
    return f"{float(v):.2f}"


def _of_run(v: float) -> str:
    return f"1/{1 / float(v):.0f} of a run"


def _single_run_steps(params: "Params", n_train: int | None) -> int | None:
    from sparse_core.config import train_images

    n = n_train or train_images(params.data)
    return None if n is None else -(-n // params.train.optim.batch_size) * params.train.epochs


def _cadence(params: "Params", n_train: int | None) -> float | None:
    from sparse_core.config import resolve_dst

    steps = _single_run_steps(params, n_train)
    return None if not steps else resolve_dst(params.train.dst, steps).update_period / steps


def _edst_plan(params: "Params"):
    from sparse_core.config import edst_epochs, edst_plan

    return edst_plan(params.train.edst, edst_epochs(params.train))


def _member_growth(params: "Params", n_train: int | None) -> str:
    """Growth of the DST-ensemble members' method: RigL's gradient, SET's random, else the method's name."""
    method = params.train.dst_ensemble.method
    return {"rigl": "gradient", "set": "random"}.get(method, method)


#: Every ratio the default claims name, by key.
RATIOS: dict[str, DesignRatio] = {r.key: r for r in (
    DesignRatio("edst_budget", "EDST budget", 1.8, f"{_FT_README}: main_EDST.py --epochs 450 vs main_DST.py --epochs 250",
                lambda p, n: _edst_plan(p).epochs / p.train.epochs, _times),
    DesignRatio("edst_exploration_share", "EDST exploration share", 1 / 3, f"{_FT_README}: --epochs-explo 150 of --epochs 450",
                lambda p, n: _edst_plan(p).exploration_epochs / _edst_plan(p).epochs, _share),
    DesignRatio("edst_tickets", "EDST tickets", 3, f"{_FT_README}: main_EDST.py --model-num 3", lambda p, n: p.train.edst.tickets),
    DesignRatio("edst_exploration_rate", "EDST global exploration q", 0.8, f"{_FT_README}: --large-death-rate 0.8",
                lambda p, n: p.train.edst.exploration_rate, _share),
    DesignRatio("edst_growth", "EDST growth", "gradient",
                f"{_FT_README}: main_EDST.py --growth gradient (the removed script_EDST_CF10 used random; module docstring)",
                lambda p, n: p.train.edst.grow),
    DesignRatio("edst_drop_fraction", "EDST drop fraction", 0.5, f"{_FT_README}: --death-rate 0.5",
                lambda p, n: p.train.edst.drop_fraction, _share),
    DesignRatio("edst_drop_schedule", "EDST drop schedule", "constant",
                _CONSTANT_P,
                lambda p, n: p.train.edst.drop_schedule),
    DesignRatio("edst_phase_stop", "EDST updates through each phase", 1.0,
                _NO_STOP,
                lambda p, n: p.train.edst.phase_stop_fraction, _share),
    DesignRatio("update_cadence", "ΔT", 1000 / FT_SINGLE_RUN_STEPS,
                f"{_FT_README}: --update-frequency 1000 in a 250-epoch run of 352 steps (45,000 images, batch 128)",
                _cadence, _of_run),
    DesignRatio("dst_sparsity", "sparsity", 0.8, f"{_FT_README}: --density 0.2", lambda p, n: p.train.dst.sparsity, _share),
    DesignRatio("dst_distribution", "layer densities", "erk", f"{_FT_README}: --sparse-init ERK",
                lambda p, n: p.train.dst.distribution),
    DesignRatio("dst_drop_fraction", "DST drop fraction", 0.5, f"{_FT_README}: main_DST.py --death-rate 0.5",
                lambda p, n: p.train.dst.drop_fraction, _share),
    DesignRatio("dst_drop_schedule", "DST drop schedule", "constant",
                _CONSTANT_P,
                lambda p, n: p.train.dst.drop_schedule),
    DesignRatio("dst_stop_fraction", "DST updates stop at", 1.0,
                _NO_STOP,
                lambda p, n: p.train.dst.stop_fraction, _share),
    DesignRatio("dst_member_budget", "DST member budget", 1.0, f"{_FT_README}: each main_DST.py member --epochs 250",
                lambda p, n: 1.0, _times),
    DesignRatio("dst_members", "DST members", 3, "FreeTickets script_DST_CF10: seeds 18, 19, 20",
                lambda p, n: p.train.dst_ensemble.members),
    DesignRatio("dst_growth", "DST member growth", "gradient", f"{_FT_README}: main_DST.py --growth gradient", _member_growth),
    DesignRatio("dpf_update_period", "DPF mask period", 16,
                "Lin et al. 2020: mask re-estimated every 16 iterations (reimplementation: --prune-freq 16)",
                lambda p, n: p.train.pruning.update_period, lambda v: f"{int(v)} steps"),
    DesignRatio("dpf_schedule_end", "pruning schedule ends at", 0.75,
                "Lin et al. 2020 (Zhu & Gupta schedule; reimplementation: target at epoch 225 of 300)",
                lambda p, n: p.train.pruning.end_fraction, _share),
)}

#: The design each family of claims depends on.
DPF_DESIGN = ("dpf_update_period", "dpf_schedule_end")
DST_SINGLE_DESIGN = ("dst_sparsity", "dst_distribution", "dst_drop_fraction", "dst_drop_schedule", "dst_stop_fraction",
                     "update_cadence")
DST_ENSEMBLE_DESIGN = DST_SINGLE_DESIGN + ("dst_member_budget", "dst_members", "dst_growth")
EDST_DESIGN = ("edst_budget", "edst_exploration_share", "edst_tickets", "edst_exploration_rate", "edst_growth",
               "edst_drop_fraction", "edst_drop_schedule", "edst_phase_stop", "update_cadence", "dst_sparsity",
               "dst_distribution")


def profile_design(params: "Params", n_train: int | None = None, keys: Any = None) -> dict[str, Any]:
    """``{key: the profile's value}`` of every ratio in ``keys`` (all of :data:`RATIOS` by default).

    ``n_train``: images in the prepared training split (the cadence counts steps per epoch); None
    takes :func:`~sparse_core.config.train_images` of the params, unknown for an image folder.
    """
    return {k: RATIOS[k].read(params, n_train) for k in (RATIOS if keys is None else keys)}


def compare(keys: Any, design: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per ratio key: ``{key, label, profile, paper, source, matches, text}``.

    Raises:
        KeyError: a key that is not in :data:`RATIOS`.
    """
    rows = []
    for key in keys:
        ratio = RATIOS[key]
        value = design.get(key)
        rows.append({"key": key, "label": ratio.label, "profile": value, "paper": ratio.paper, "source": ratio.source,
                     "matches": ratio.matches(value), "text": ratio.describe(value)})
    return rows
