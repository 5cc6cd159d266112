"""The training-hook protocol every method implements, and the methods that share it.

The engine calls, for each minibatch (``step`` = iterations completed before this one)::

    method.before_forward(step)     # e.g. DPF swaps in m ⊙ w
    loss.backward()
    method.before_step(step)        # e.g. mask gradients, or DPF restores the dense w
    optimizer.step()
    method.after_step(step + 1)     # e.g. re-apply the mask, update it on schedule

plus ``on_train_end()`` once, and ``eval_weights()`` around every evaluation and export.
A method owns a :class:`~sparse_core.sparsity.MaskSet` (``None`` for ``dense``) and a list
of ``events`` (one dict per mask update) that the engine writes to ``mask_updates.parquet``.

Every method is registered (:mod:`sparse_core.methods.registry`) with a literal declaration
of its params name, family, paper and params; it is built from a :class:`MethodContext` by
its ``from_context`` class method and counts its own training FLOPs
(``training_flops_per_example``). :func:`create_method` builds any of them by name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from pydantic import BaseModel, ValidationError

from sparse_core.config import ConfigError, DSTSection, EDSTSection, PruningSection
from sparse_core.flops import TrainingCost, fixed_mask_flops
from sparse_core.methods import registry
from sparse_core.methods.registry import MethodSpec, method_class, register_method
from sparse_core.sparsity import MaskSet, filter_masks, magnitude_masks, prunable_parameters


@dataclass
class MethodContext:
    """Everything a method may be built from (``Method.from_context``).

    Attributes:
        model: the network (for local methods: its trunk); its prunable parameters are
            found by :func:`~sparse_core.sparsity.prunable_parameters`.
        total_steps: optimizer steps of the whole run (schedules are fractions of it).
        pruning, dst, edst: the ``train.pruning``, ``train.dst`` and ``train.edst`` sections.
        seed: the run's seed (masks drawn at random use their own generator from it).
        epochs: epochs of the run (EDST's phases are whole epochs).
        options: the methods' own params sections (``train.<params_key>`` mappings, unvalidated;
            :meth:`Method.options` validates the one of the method being built).
        input_shape: ``(C, H, W)`` of one example, for methods that score connections without
            data (None when unknown).
    """

    model: nn.Module
    total_steps: int
    pruning: PruningSection = field(default_factory=PruningSection)
    dst: DSTSection = field(default_factory=DSTSection)
    edst: EDSTSection = field(default_factory=EDSTSection)
    seed: int = 0
    epochs: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None


@register_method(name="dense", family="dense", paper="standard end-to-end backpropagation (the baseline)",
                 summary="plain training")
class Method:
    """Dense training: every hook is a no-op. Subclasses override what they need."""

    name = "dense"
    spec: MethodSpec  # set by register_method

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "Method":
        """Build the method for one run (subclasses whose constructor takes more override this)."""
        return cls(ctx.model, ctx.total_steps)

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """Training FLOPs per example seen (RigL's convention, Evci et al. 2020, App. H):
        ``3 f_D`` for dense training (see :mod:`sparse_core.flops`)."""
        return fixed_mask_flops(cost.dense_flops, {})

    #: The method's own params keys (a pydantic model), read from ``train.<spec.params_key>``.
    Options: type[BaseModel] | None = None

    @classmethod
    def options(cls, ctx: MethodContext) -> Any:
        """The method's own params (an ``Options`` instance), validated from ``ctx.options``.

        Raises:
            ConfigError: a key the ``Options`` model does not declare, or a bad value; the
                message names ``train.<params_key>.<key>``.
        """
        key = cls.spec.params_key
        if cls.Options is None or key is None:
            raise TypeError(f"method {cls.spec.name!r} declares no options (Options and params_key)")
        try:
            return cls.Options.model_validate(ctx.options.get(key) or {})
        except ValidationError as err:
            problems = "; ".join(f"train.{key}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"method {cls.spec.name!r}: {problems}") from None

    def __init__(self, model: nn.Module, total_steps: int):
        self.model = model
        self.total_steps = total_steps
        self.masks: MaskSet | None = None
        self.events: list[dict[str, Any]] = []
        self.optimizer: torch.optim.Optimizer | None = None

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the method the optimizer (e.g. to reset momentum at regrown weights)."""
        self.optimizer = optimizer

    def before_forward(self, step: int) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def on_train_end(self) -> None:
        pass

    def learning_rate(self, step: int, scheduled: float, base: float) -> float:
        """Learning rate for iteration ``step``; ``scheduled`` comes from the optim section."""
        return scheduled

    def on_epoch_end(self, epoch: int, val: dict[str, float]) -> None:
        """After epoch ``epoch`` (0-based), inside ``eval_weights()``, with validation metrics."""

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Context in which the model's parameters are the ones to evaluate and export."""
        yield

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict() if self.masks else {}, "events": list(self.events)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.masks is not None:
            self.masks.load_state_dict(sd["masks"])
        self.events = list(sd["events"])


@register_method(name="retrain", family="internal", sparsity="pruning",
                 paper="Han et al. 2015, \"Learning both Weights and Connections for Efficient Neural Networks\" (NeurIPS)",
                 summary="fine-tuning of a run with its mask frozen (masked gradients) → run `<run>_retrain` (the `retrain` stage)")
class MaskedMethod(Method):
    """Training under a mask with masked gradients: ``retrain`` (fine-tuning a frozen mask).

    Inactive weights get zero gradient and are re-zeroed after every optimizer step (momentum
    and weight decay could otherwise move them), so ``m ⊙ w == w`` at all times.
    """

    name = "retrain"

    def __init__(self, model: nn.Module, total_steps: int, pruning: PruningSection):
        super().__init__(model, total_steps)
        self.pruning = pruning
        keep_last = pruning.keep_last_dense or pruning.granularity == "structured"
        self.masks = MaskSet(prunable_parameters(model, pruning.keep_first_dense, keep_last))

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "MaskedMethod":
        return cls(ctx.model, ctx.total_steps, ctx.pruning)

    @classmethod
    def training_flops_per_example(cls, cost: TrainingCost) -> float:
        """``3 f_S`` at the final per-layer densities: a fixed mask (RigL, App. H)."""
        return fixed_mask_flops(cost.dense_flops, cost.densities)

    def before_step(self, step: int) -> None:
        self.masks.mask_grads_()

    def after_step(self, step: int) -> None:
        self.masks.apply_()

    # ----- mask estimation shared by gmp, dpf and oneshot ---------------------------------
    @torch.no_grad()
    def update_masks(self, step: int, sparsity: float, weights: dict[str, torch.Tensor]) -> None:
        """Re-estimate the masks from ``|weights|`` at ``sparsity`` and log the event.

        Logged per update: step, target and realised sparsity, the fraction of prunable
        weights whose mask flipped, and the pruning error ``‖w − m⊙w‖² / ‖w‖²`` (Lin et al.
        2020, Sec. 4) of the weights the new mask was computed from.
        """
        if self.pruning.granularity == "structured":
            new = filter_masks(weights, sparsity)
        else:
            new = magnitude_masks(weights, sparsity, self.pruning.scope)
        flips = sum(int((new[n] != self.masks.masks[n]).sum()) for n in new)
        w2 = sum(float(w.pow(2).sum()) for w in weights.values())
        kept2 = sum(float((w * new[n]).pow(2).sum()) for n, w in weights.items())
        # A global threshold decides each layer's share; record that allotment as its target.
        global_ = self.pruning.granularity == "unstructured" and self.pruning.scope == "global"
        for n, m in new.items():
            self.masks.masks[n] = m
            self.masks.target_density[n] = float(m.float().mean()) if global_ else 1.0 - sparsity
        self.events.append(
            {
                "step": int(step),
                "target_sparsity": float(sparsity),
                "sparsity": self.masks.sparsity(),
                "flip_fraction": flips / self.masks.numel(),
                "pruning_error": (w2 - kept2) / w2 if w2 > 0 else 0.0,
            }
        )


class Explores:
    """Mixin of masked methods whose mask moves: ``ever_active`` (per prunable weight, the bool
    mask of positions active at some point) and the ``generator`` of their random draws (None
    when they draw nothing), both checkpointed with the method. The exploration rate ("in-time
    over-parameterization", Liu et al. 2021) is the fraction of prunable weights ever active."""

    ever_active: dict[str, torch.Tensor]
    generator: torch.Generator | None = None

    def exploration_rate(self) -> float:
        """Fraction of prunable weights that have been active at some point (0-1)."""
        return sum(int(m.sum()) for m in self.ever_active.values()) / self.masks.numel()

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.generator is not None:
            sd["generator"] = self.generator.get_state()
        sd["ever_active"] = {n: m.cpu().clone() for n, m in self.ever_active.items()}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        if self.generator is not None:
            self.generator.set_state(sd["generator"])
        self.ever_active = {n: m.to(self.masks.params[n].device) for n, m in sd["ever_active"].items()}


class SwapAndRestore:
    """Mixin of masked methods that run forward and backward at the masked weights ``m ⊙ w``
    while the optimizer updates the dense ``w`` (DPF, Top-KAST).

    :meth:`swap_in_masked` stashes the dense weights and writes ``m ⊙ w`` into the parameters;
    :meth:`restore_dense` writes the dense ones back, leaving ``.grad`` (``∂L/∂(m ⊙ w)`` for
    every coordinate) untouched. Computing ``w * m`` inside autograd instead would zero the
    gradient of masked coordinates. Memory: one extra copy of the prunable weights
    (:meth:`init_swap`).
    """

    def init_swap(self) -> None:
        self._dense = {n: torch.empty_like(p) for n, p in self.masks.params.items()}
        self._swapped = False

    @torch.no_grad()
    def swap_in_masked(self) -> None:
        if self._swapped:
            return
        for n, p in self.masks.params.items():
            self._dense[n].copy_(p)
            p.mul_(self.masks.masks[n])
        self._swapped = True

    @torch.no_grad()
    def restore_dense(self) -> None:
        if not self._swapped:
            return
        for n, p in self.masks.params.items():
            p.copy_(self._dense[n])
        self._swapped = False


def create_method(
    name: str,
    model: nn.Module,
    total_steps: int,
    pruning: PruningSection | None = None,
    dst: DSTSection | None = None,
    seed: int = 0,
    edst: EDSTSection | None = None,
    epochs: int = 1,
    options: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> Method:
    """Build a registered method by its params name (``sparse_core.methods.registry.trainable()``
    and ``retrain``); sections left out take their defaults. ``options``: the methods' own
    sections (``train.<params_key>``, e.g. ``params.train.model_extra``).

    Raises:
        sparse_core.methods.registry.RegistryError: an unknown name, or a method a stage
            builds itself (``dst_ensemble``, ``local_*``: they have no class of their own).
    """
    ctx = MethodContext(model, total_steps, pruning or PruningSection(), dst or DSTSection(), edst or EDSTSection(), seed,
                        epochs, dict(options or {}), input_shape)  # fmt: skip
    return method_class(name).from_context(ctx)


def check_method_options(train: Any) -> None:
    """Validate every listed method's own section (``train.<params_key>``) with its ``Options``
    model, importing only the methods that declare one (``sparseflow validate``).

    Raises:
        ConfigError: the first bad section (names ``train.<params_key>.<key>``).
    """
    for name in train.methods:
        spec = registry.spec(name)
        if spec.params_key:
            method_class(name).options(MethodContext(nn.Identity(), 1, options=dict(train.model_extra or {})))
