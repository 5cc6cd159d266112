"""Any sparseflow method inside a training loop that sparseflow did not write.

Wrap the user's optimizer, like JaxPruner's ``pruner.wrap_optax(tx)`` (Lee et al. 2023,
"JaxPruner: A concise library for sparsity research", Sec. 2)::

    from sparse_core.api import sparsify                                          # line 1
    optimizer = sparsify(model, optimizer, "rigl", total_steps=len(loader) * epochs, sparsity=0.9)  # line 2
    for x, y in loader:                                      # the user's loop, unchanged
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
    with optimizer.eval_weights():                                                # line 3 (dpf)
        evaluate(model)

The wrapper drives the method's hooks (:mod:`sparse_core.methods.base`) in the engine's order
(:func:`sparse_core.engine.training_step`), with ``t`` = optimizer steps completed before this
one::

    before_forward(t)      forward pre-hook: at the first forward of step t (dpf: w <- m ⊙ w)
    loss.backward()        the user's
    before_step(t)         start of step(): gradients exist (mask them; dpf restores the dense w)
    inner.step()           the user's optimizer, at lr = method.learning_rate(t, group lr, base lr)
    after_step(t + 1)      end of step(): re-apply masks, mask updates, drop/grow on schedule
    on_train_end()         after step number total_steps (oneshot prunes; gmp/dpf check the target)

Why a forward pre-hook and not ``before_forward`` at the end of ``step()``: DPF's
``before_forward`` writes ``m ⊙ w`` into the parameters. Done at the end of ``step()``, the
model would hold ``m ⊙ w`` between steps, so ``model.state_dict()`` saved there would lose the
dense weights that DPF trains (and a resumed run would be GMP-like), and
``eval_weights()`` could not give the dense weights back. With the hook, between steps the
model always holds the weights the method trains (dense ``w`` for dpf), and every forward,
training or evaluation, runs at the weights the method wants. The hook sits on the model and on
every module owning a masked weight (so a submodule called directly is covered too), fires once
per step (at the first of them to run), and is inert in a deep copy of the model (an EMA copy
never moves the original's weights).

Why a subclass of :class:`torch.optim.Optimizer`: LR schedulers (``CosineAnnealingLR`` and
every other ``LRScheduler``) refuse anything else (``isinstance`` check), and code that holds
"an optimizer" keeps working. The subclass holds no parameters of its own: ``param_groups``,
``state`` and ``defaults`` are the inner optimizer's (properties, so they follow the inner
optimizer through ``load_state_dict``, which replaces its group list), ``zero_grad`` and
``add_param_group`` go to it, and ``state_dict`` is the inner optimizer's standard dict plus one
``"sparseflow"`` entry (method, step count, masks, events, generator state).

Settings: any key of the ``pruning``, ``dst`` and ``edst`` params sections and of the method's
own section (``train.<params_key>``, declared with the method in the registry) is a keyword
argument of :func:`sparsify`; a key several sections share is set in each, and a mapping named
after a section (``dst={"update_period": 50}``) sets that section alone.

Learning rate: a user's scheduler owns ``group["lr"]``. A method that sets its own learning
rate (``edst_ensemble``: the exploration and refinement phases, Liu et al. 2022, Sec. 4.2) gets
``learning_rate(t, group["lr"], base)`` for the inner step only, ``base`` being the group's lr
when it was wrapped; the scheduler's value is put back right after, so the scheduler's own
arithmetic is untouched.

Not supported (refused with the reason): ``dst_ensemble`` (M independent runs: wrap M
optimizers yourself), ``local_*`` (needs a :class:`~sparse_core.local.LocalNet` and its
window losses), ``retrain`` (internal: fine-tuning a run's frozen mask). Optimizers that call
their closure several times per step (LBFGS) are not supported: the closure runs once, before
``before_step``. Under ``torch.amp.GradScaler`` a step the scaler skips (inf/NaN gradients) runs
no hooks and does not count towards ``total_steps`` (the engine instead runs the hooks on
zeroed gradients); the schedules then count applied steps.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import pydantic
import torch
from torch import nn

from sparse_core.config import DSTSection, EDSTSection, PruningSection, TrainSection, resolve_dst
from sparse_core.methods import Method, create_method, registry
from sparse_core.sparsity import prunable_parameters

__all__ = ["SparseOptimizer", "allowed_keys", "sparsify", "unsupported_reason"]


def unsupported_reason(spec: registry.MethodSpec) -> str | None:
    """Why method ``spec`` cannot run in a user's loop (from its registry declaration), or None."""
    if spec.family == "internal":
        return ("it is internal to the pipeline (a stage uses it, e.g. to fine-tune a finished run under its frozen "
                f"mask); trainable methods: {', '.join(registry.trainable())}")  # fmt: skip
    if spec.family == "local":
        return (f"local parallelism ({spec.local_variant} windows, Laskin et al. 2020) trains a sparse_core.local.LocalNet "
                "on its auxiliary heads' window losses, not the user's loss, so it cannot run inside a plain optimizer step")  # fmt: skip
    if spec.ensemble == "members":
        return ("it trains several independent runs as one ensemble; call sparsify once per member (its own model, "
                "optimizer and seed=i) with the members' single-run method (train.dst_ensemble.method) and average "
                "the members' softmax outputs")  # fmt: skip
    if not spec.qualname:
        return "a pipeline stage builds it; it has no method class"
    return None


#: The shared params sections whose keys ``sparsify`` accepts as keyword arguments.
_SECTIONS: dict[str, type[pydantic.BaseModel]] = {"pruning": PruningSection, "dst": DSTSection, "edst": EDSTSection}
#: Base learning rate of a param group for :meth:`~sparse_core.methods.Method.learning_rate`.
BASE_LR_KEY = "sparseflow_base_lr"


def _scopes(spec: registry.MethodSpec) -> dict[str, type[pydantic.BaseModel]]:
    """The sections ``spec`` may be configured by: ``pruning``, ``dst``, ``edst`` and its own
    ``train.<params_key>`` (its class's ``Options``), by name."""
    scopes = dict(_SECTIONS)
    options = getattr(registry.method_class(spec.name), "Options", None) if spec.params_key else None
    if options is not None:
        scopes[spec.params_key] = options
    return scopes


def allowed_keys(method: str) -> list[str]:
    """Sorted setting names :func:`sparsify` accepts as keyword arguments for ``method``: the
    keys of the ``pruning``, ``dst`` and ``edst`` sections and of the method's own section.

    Raises:
        sparse_core.methods.registry.RegistryError: unknown ``method``.
    """
    return sorted({k for scope in _scopes(registry.spec(method)).values() for k in scope.model_fields})


def _settings(spec: registry.MethodSpec, overrides: dict[str, Any]) -> tuple[dict[str, pydantic.BaseModel], dict[str, Any]]:
    """``({"pruning", "dst", "edst": validated section}, {params_key: the method's own keys})``.

    A flat key is set in every scope that has it; a keyword named after a scope (``pruning={...}``,
    ``dst={...}``, ``edst={...}``, ``<params_key>={...}``) sets keys of that scope only, after the
    flat ones.
    """
    scopes = _scopes(spec)
    flat_allowed = sorted({k for scope in scopes.values() for k in scope.model_fields})
    unknown = sorted(k for k in overrides if k not in scopes and k not in flat_allowed)
    if unknown:
        raise TypeError(f"sparsify() got unknown keyword argument(s) {', '.join(unknown)} for method {spec.name!r}; allowed: "
                        f"total_steps, sparsity, seed, epochs, input_shape, {', '.join(k for k in flat_allowed if k != 'sparsity')}, "
                        f"or one mapping per section: {', '.join(scopes)}")  # fmt: skip
    values: dict[str, dict[str, Any]] = {}
    for name, scope in scopes.items():
        values[name] = {k: v for k, v in overrides.items() if k in scope.model_fields and k not in scopes}
        scoped = overrides.get(name, {})
        if not isinstance(scoped, Mapping):
            raise TypeError(f"sparsify(): {name}= must be a mapping of that section's keys, got {type(scoped).__name__}")
        values[name].update(scoped)
    sections = {}
    for name, section in _SECTIONS.items():
        try:
            sections[name] = section(**values[name])
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}={e['input']!r}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
            )
            raise ValueError(f"sparsify(): bad {name} setting: {problems}") from None
    own = {spec.params_key: values[spec.params_key]} if spec.params_key in scopes else {}
    return sections, own  # the method validates its own keys when it is built


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str,
    *,
    total_steps: int,
    sparsity: float | None = None,
    seed: int = 0,
    epochs: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    **overrides: Any,
) -> "SparseOptimizer":
    """Wrap ``optimizer`` so that its steps train ``model`` with sparseflow's ``method``.

    Args:
        model: any ``nn.Module``; the prunable set is every ``nn.Conv2d`` / ``nn.Linear``
            weight (:func:`sparse_core.sparsity.prunable_parameters`), minus the first conv /
            last linear with ``keep_first_dense`` / ``keep_last_dense``.
        optimizer: the user's optimizer; it must hold every prunable weight. Its groups' lr at
            this call is the base lr of methods that set their own (``edst_ensemble``).
        method: a params name: ``dense``, ``oneshot``, ``gmp``, ``dpf``, ``set``, ``rigl``,
            ``edst_ensemble`` (and any method the registry adds).
        total_steps: optimizer steps of the whole run (``len(loader) * epochs``); every
            schedule (cubic pruning, drop fraction decay, stop fractions) is a fraction of it.
            After the last one the method finishes (:meth:`SparseOptimizer.finish`).
        sparsity: target fraction of zeros of the prunable set, in [0, 1); None: the params
            default of the method's section (``pruning``: 0.9, ``dst``: 0.8).
        seed: seed of the method's own generator (random masks and growth of set/rigl/edst);
            torch's global generator is not touched.
        epochs: epochs of the run; needed by ``edst_ensemble`` (phases are whole epochs), then
            ``total_steps`` must be a multiple of it.
        input_shape: ``(C, H, W)`` of one input example; needed by methods that score
            connections without data (``synflow``).
        **overrides: any key of the ``pruning``, ``dst`` or ``edst`` params sections
            (:mod:`sparse_core.config`) or of the method's own section (``train.<params_key>``,
            e.g. ``train.mest``), see :func:`allowed_keys`: ``update_period=16``,
            ``distribution="erk"``, ``drop_fraction=0.3``, ``end_fraction=0.75``. A key found in
            several sections is set in each; to set one section only, pass a mapping named
            after it (``dst={"update_period": 50}``, ``topkast={"update_period": 1}``).

    Returns:
        A :class:`SparseOptimizer` to use in place of ``optimizer``.

    Raises:
        TypeError: ``model`` / ``optimizer`` of the wrong type, an already wrapped optimizer,
            an unknown keyword argument (the message lists the allowed ones).
        ValueError: unknown or unsupported method (with the reason), ``sparsity`` outside
            [0, 1) or given to a method without a target (``dense``), ``total_steps`` not a positive integer, a section value out of range, a
            schedule that cannot reach its target in ``total_steps`` steps, ``epochs`` missing
            or not fitting the method, prunable weights missing from ``optimizer``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify(): model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(optimizer, SparseOptimizer):
        raise TypeError("sparsify(): the optimizer is already wrapped by sparsify; wrap the plain optimizer once")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"sparsify(): optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(method, str):
        raise TypeError(f"sparsify(): method must be a method name (str), got {type(method).__name__}")
    try:
        spec = registry.spec(method)
    except registry.RegistryError as exc:  # unknown name; the message lists the known ones
        raise ValueError(f"sparsify(): {exc}") from None
    reason = unsupported_reason(spec)
    if reason:
        raise ValueError(f"sparsify(): method {method!r} is not supported in a user's loop: {reason}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"sparsify(): total_steps must be a positive integer (optimizer steps of the run), got {total_steps!r}")
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsify(): sparsity must be a fraction in [0, 1), got {sparsity!r}")
        if spec.sparsity is None:
            raise ValueError(f"sparsify(): method {method!r} has no sparsity target (its registry declaration names no "
                             "sparsity section); leave sparsity out")  # fmt: skip
        overrides["sparsity"] = float(sparsity)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0 or total_steps % epochs):
        raise ValueError(f"sparsify(): epochs must be a positive integer dividing total_steps ({total_steps}), got {epochs!r}")
    # Checked before the method is built: building it may already mask the model (set, rigl).
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in prunable_parameters(model).items() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(f"sparsify(): the optimizer does not hold these prunable weights of the model: {', '.join(missing)} "
                         "(pass the optimizer of this model's parameters; freeze a weight with requires_grad=False "
                         "to leave it out)")  # fmt: skip
    scoped_edst = overrides.get("edst")
    if "budget" in overrides or (isinstance(scoped_edst, Mapping) and "budget" in scoped_edst):
        raise ValueError("sparsify(): budget (train.edst.budget) sets the pipeline's EDST epochs relative to train.epochs; "
                         "here your loop sets the run's length: pass total_steps and epochs for the whole EDST run")
    sections, options = _settings(spec, overrides)
    # The caller's loop is the run: EDST's phases split the given epochs (no pipeline budget), and
    # a ΔT given as a fraction of a run counts total_steps.
    sections["edst"] = sections["edst"].model_copy(update={"budget": 1.0})
    sections["dst"] = resolve_dst(sections["dst"], total_steps)
    try:  # the params' own cross-checks (e.g. edst_ensemble's phases must fit the epochs)
        TrainSection(methods=[method], epochs=epochs or 1, **sections)
    except pydantic.ValidationError as exc:
        msg = "; ".join(e["msg"] for e in exc.errors())
        raise ValueError(f"sparsify(): method {method!r} with epochs={epochs}: {msg}") from None
    try:
        built = create_method(
            name=method, model=model, total_steps=total_steps, pruning=sections["pruning"], dst=sections["dst"],
            seed=seed, edst=sections["edst"], epochs=epochs or 1, options=options,
            input_shape=tuple(input_shape) if input_shape is not None else None,
        )  # fmt: skip
    except ValueError as exc:  # ConfigError: a schedule that cannot work, a bad key of the method's own section
        raise ValueError(f"sparsify(): method {method!r} with total_steps={total_steps}: {exc} (in sparsify these are the "
                         "keyword arguments of the same names)") from None
    return SparseOptimizer(optimizer, built)


class _BeforeForward:
    """Forward pre-hook running the method's ``before_forward`` at the first forward of a step.

    Holds only a weak reference to its :class:`SparseOptimizer`; a deep copy (or pickle) of the
    model gets an inert copy of the hook, so running the copy (e.g. an EMA model) never
    touches the original's weights.
    """

    def __init__(self, owner: "SparseOptimizer"):
        self._owner: weakref.ref | None = weakref.ref(owner)

    def __call__(self, module: nn.Module, args: Any) -> None:
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            owner._before_forward()

    def __getstate__(self) -> dict[str, Any]:
        return {"_owner": None}


class SparseOptimizer(torch.optim.Optimizer):
    """The user's optimizer with a sparseflow method's hooks around every step.

    Built by :func:`sparsify`; see the module docstring for the hook order and the design.

    Attributes:
        optimizer: the wrapped (inner) optimizer.
        method: the :class:`~sparse_core.methods.Method` (``method.events``: one dict per mask
            update; ``method.tickets`` for ``edst_ensemble``).
        steps_done: optimizer steps completed (0 … ``total_steps``).
        finished: whether :meth:`finish` has run.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, method: Method):
        # Optimizer.__init__ would build groups of its own; only its hook tables are needed.
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}
        self._warned_capturable_if_run_uncaptured = True
        self.optimizer = optimizer
        self.method = method
        self.steps_done = 0
        self.finished = False
        self._forward_done = False  # before_forward(steps_done) has run
        self._in_eval = False
        for group in optimizer.param_groups:
            group.setdefault(BASE_LR_KEY, group["lr"])
        method.bind_optimizer(optimizer)  # e.g. momentum reset at regrown weights
        self._patch_step_function()
        model = method.model
        modules = [model] + [model.get_submodule(n.rpartition(".")[0]) for n in (method.masks.params if method.masks else {})]
        hook = _BeforeForward(self)
        self._handles = [m.register_forward_pre_hook(hook) for m in dict.fromkeys(modules)]

    # ----- the inner optimizer's tables (properties: load_state_dict replaces its group list) ---
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a SparseOptimizer cannot be pickled or deep-copied; save state_dict() and load it into a new one")

    def __repr__(self) -> str:
        return f"SparseOptimizer(method={self.method.name!r}, step {self.steps_done}/{self.method.total_steps}, {self.optimizer!r})"

    # ----- the step ------------------------------------------------------------------------
    def _before_forward(self) -> None:
        if not self._forward_done and not self._in_eval and not self.finished:
            self.method.before_forward(self.steps_done)
            self._forward_done = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (its weights are not part of the method's masks)."""
        self.optimizer.add_param_group(param_group)
        self.optimizer.param_groups[-1].setdefault(BASE_LR_KEY, self.optimizer.param_groups[-1]["lr"])

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One training step: ``before_step``, the inner step at the method's lr, ``after_step``.

        Args:
            closure: optional; recomputes the loss and its gradients (forward and backward),
                called once before the hooks.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: the run's ``total_steps`` steps are done (or :meth:`finish` ran).
        """
        if self.finished:
            raise RuntimeError(
                f"sparsify: method {self.method.name!r} has finished (step {self.steps_done} of total_steps="
                f"{self.method.total_steps}); pass a larger total_steps to sparsify to train longer"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps_done
        self.method.before_step(t)
        scheduled = [g["lr"] for g in self.optimizer.param_groups]
        try:
            for group, lr in zip(self.optimizer.param_groups, scheduled):
                group["lr"] = self.method.learning_rate(t, lr, group.get(BASE_LR_KEY, lr))
            self.optimizer.step()
        finally:
            for group, lr in zip(self.optimizer.param_groups, scheduled):
                group["lr"] = lr  # the user's scheduler owns the lr
        self.method.after_step(t + 1)
        self.steps_done = t + 1
        self._forward_done = False
        if self.steps_done >= self.method.total_steps:
            self.finish()
        return loss

    def finish(self) -> None:
        """End the run: the method's ``on_train_end`` (runs by itself after step ``total_steps``).

        It matters for ``oneshot`` (the magnitude pruning to the target happens here) and for
        ``gmp`` / ``dpf`` (a check that the last mask update reached the target; it raises
        ``RuntimeError`` when the run is finished before the schedule's end). Afterwards the
        model holds the weights to evaluate and export for good (``dpf``: ``m ⊙ w``; the dense
        values of pruned weights are dropped), the forward hooks are removed and :meth:`step`
        raises. Calling it again does nothing.
        """
        if self.finished:
            return
        self.method.on_train_end()
        self._bake_eval_weights()
        self.finished = True
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def _bake_eval_weights(self) -> None:
        params = list(self.method.model.parameters())
        with self.method.eval_weights():
            final = [p.detach().clone() for p in params]
        for p, v in zip(params, final):
            p.copy_(v)

    # ----- evaluation ----------------------------------------------------------------------
    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Context in which the model holds the weights to evaluate or save.

        Needed by ``dpf``, whose model holds the dense ``w`` between steps: inside, the
        parameters are ``m ⊙ w``; outside, the dense ones are back. For the other built-in
        methods the weights are the same inside and out. The forward hook is paused inside.
        """
        self._in_eval = True
        try:
            with self.method.eval_weights():
                yield
        finally:
            self._in_eval = False
            self._forward_done = False  # the method's eval state is gone: redo before_forward

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """Tell the method that epoch ``epoch`` (0-based) ended with validation ``metrics``
        (``{"accuracy": fraction, ...}``), inside :meth:`eval_weights` as the engine does.

        Only ``edst_ensemble`` uses it: ticket ``m`` is the model (CPU copy, in
        ``method.tickets[m]``) at the best validation accuracy of refinement phase ``m``
        (Liu et al. 2022, Algorithm 1). Without these calls the run trains the same but
        yields no tickets.
        """
        with self.eval_weights():
            self.method.on_epoch_end(epoch, metrics)

    # ----- what the user reads -------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{"<module>.weight": bool tensor, same shape as the weight}``, True = active; the
        method's live masks (do not modify); empty for ``dense``."""
        return dict(self.method.masks.masks) if self.method.masks is not None else {}

    def sparsity(self) -> float:
        """Realised sparsity of the prunable set: inactive fraction of the masks (0-1; 0 for ``dense``)."""
        return self.method.masks.sparsity() if self.method.masks is not None else 0.0

    # ----- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's ``state_dict()`` plus ``"sparseflow"``: ``{"method": name,
        "steps_done", "finished", "method_state"}`` (masks as CPU bool tensors, events, and the
        method's generator state). Save it with ``model.state_dict()`` taken between steps."""
        sd = dict(self.optimizer.state_dict())
        sd["sparseflow"] = {
            "method": self.method.name,
            "steps_done": self.steps_done,
            "total_steps": self.method.total_steps,
            "finished": self.finished,
            "method_state": self.method.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` returned (after ``model.load_state_dict``), so training
        continues exactly as the saved run would have.

        Raises:
            ValueError: no ``"sparseflow"`` entry (a plain optimizer's dict), or one saved by
                another method or for another ``total_steps``.
        """
        extra = state_dict.get("sparseflow") if isinstance(state_dict, dict) else None
        if extra is None:
            raise ValueError("SparseOptimizer.load_state_dict: the dict has no 'sparseflow' entry; it was not saved by "
                             "SparseOptimizer.state_dict() (load a plain optimizer's state into the inner .optimizer)")  # fmt: skip
        for key, mine in (("method", self.method.name), ("total_steps", self.method.total_steps)):
            if extra[key] != mine:
                raise ValueError(f"SparseOptimizer.load_state_dict: saved {key} {extra[key]!r}, this optimizer has {mine!r}")
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "sparseflow"})
        self.method.load_state_dict(extra["method_state"])
        self.steps_done = int(extra["steps_done"])
        self._forward_done = False
        if extra["finished"] and not self.finished:
            self.finished = True
            for handle in self._handles:
                handle.remove()
