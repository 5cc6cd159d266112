"""Typed view of ``params.yaml``: one pydantic model per stage section plus a shared ``base``.

Every section forbids unknown keys, so a typo (``sparisty: 0.9``) is an error rather than a
silently ignored setting. :func:`load_params` turns any validation problem into one
:class:`ConfigError` whose message names the file, the dotted key, the offending value and
what is allowed, and it runs before any stage writes a file.

Hostile or broken files are refused the same way: YAML is read with a safe loader (no Python
tags, no duplicate keys), numbers must be finite and booleans are not numbers, and every path
a params value names (:data:`PATH_KEYS`) must stay inside the project folder unless
``base.allow_external_paths`` is true.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparse_core.methods import registry

#: Datasets the ``prepare`` stage knows (see :mod:`sparse_core.data.sources`).
DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder")


def _method_name(what: str, known: typing.Callable[[], list[str]]) -> Any:
    """The type of a params value that names a method: a string in ``known()``, checked after
    parsing (names come from the method registry, :mod:`sparse_core.methods.registry`)."""

    def check(name: str) -> str:
        allowed = known()
        if name not in allowed:
            raise ValueError(f"{name!r} is not {what}; allowed: {', '.join(allowed) or 'none'}")
        return name

    return typing.Annotated[str, AfterValidator(check)]


def _trainable() -> list[str]:
    return registry.trainable()


def _single_runs() -> list[str]:
    """Methods whose run is one model trained by a method class (what ``local.sparse_method`` composes)."""
    return [n for n, s in registry.specs().items() if s.qualname and s.ensemble is None and s.family != "internal"]


def _ensembles() -> list[str]:
    return [n for n, s in registry.specs().items() if s.ensemble is not None]


def sweep_methods() -> list[str]:
    """Methods a sparsity sweep (``sparseflow sweep``, the curves stages) can run: every
    registered method declared with ``sweep=True``, and each of them followed by fine-tuning
    with its mask frozen (``<method>_retrain``)."""
    base = registry.names(sweep=True)
    return base + [retrain_run_name(m) for m in base]


#: Types of params values that name methods (checked against the registry).
MethodName = _method_name("a registered method", _trainable)
DSTMethodName = _method_name("a dst-family method", lambda: registry.names(family="dst", ensemble=None))
SingleRunMethodName = _method_name("a single-run method", _single_runs)
EnsembleName = _method_name("an ensemble method", _ensembles)
SweepMethodName = _method_name("a sweep method", sweep_methods)


class ConfigError(ValueError):
    """A params file is missing, unreadable or has a value outside what is allowed."""


class _Section(BaseModel):
    # allow_inf_nan=False: ``lr: .inf`` or ``sparsity: .nan`` pass every ``gt``/``lt`` bound
    # check (nan compares false, inf is greater than any bound), so they are refused outright.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: Any) -> Any:
        # pydantic's lax mode reads True as 1; in YAML ``epochs: yes`` or ``on`` is a boolean, so
        # a boolean where a number belongs is a mistake, not a 1.
        # The same holds for each item of a list of numbers (``seeds: [yes]``, ``milestones``).
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is None or not _wants_number(field.annotation):
            return v
        items = v if isinstance(v, (list, tuple)) else [v]
        for item in items:
            if isinstance(item, bool):
                where = "" if items is not v else f" in {reprlib.repr(v)}"
                raise ValueError(f"expected a number, got the boolean {item}{where} (YAML reads yes/no/on/off/true/false as booleans)")
        return v


def _wants_number(annotation: Any) -> bool:
    """Whether ``annotation`` is int or float, possibly optional or a list of them (and never
    admits bool itself)."""
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    if bool in args or typing.get_origin(annotation) not in (list, tuple, typing.Union, types.UnionType):
        return False
    return any(_wants_number(a) for a in args if a is not type(None))


#: Most training seeds a profile may list (each one trains every run of the profile again).
MAX_SEEDS = 100
#: Upper bounds of the size-like settings (README "Limits"): far above any real run (ImageNet is
#: 1.3 M images; the papers train at most a few hundred epochs with batches of a few thousand),
#: low enough that a typo (``epochs: 1e12``, ``batch_size: 1e9``) is refused at validation
#: instead of hanging a stage or exhausting memory. What a stage will allocate is checked against
#: the machine's memory when it starts (:mod:`sparse_core.resources`).
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_EXAMPLES = 10_000_000
#: Ensemble members, EDST tickets and refinement phases.
MAX_MEMBERS = 100
#: Steps between mask updates or pruning steps, and the local analysis' step budget.
MAX_STEPS = 10_000_000
MAX_THREADS = 1024
MAX_WORKERS = 256


def _each_in(values: list[int], low: int, high: int) -> list[int]:
    """``values`` when every item lies in ``low..high``; else a ValueError naming the first that does not."""
    for v in values:
        if not low <= v <= high:
            raise ValueError(f"{v!r} is outside {low}..{high}")
    return values


class BaseSection(_Section):
    """Settings shared by every stage."""

    #: Below 2**32: seeds feed numpy and torch generators (``seed * 100003 + epoch`` must fit 64 bits).
    #: The seed of data preparation (the seeded validation split) and of the evaluation sets
    #: (OOD noise, corruptions): shared by every training seed.
    seed: int = Field(0, ge=0, le=2**32 - 1)
    #: Training seeds: every run and ensemble is trained once per seed, as its own DVC stage
    #: instance (``train@<method>-<seed>``), under ``<runs_dir>/s<seed>/`` (see
    #: :meth:`Params.for_seed`). Null: ``[seed]``. Not fingerprinted and not a params dependency
    #: of any run: adding a seed trains the new seed only.
    seeds: list[int] | None = Field(None, min_length=1, max_length=MAX_SEEDS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Compute precision of training and evaluation (:mod:`sparse_core.precision`): ``auto``
    #: (the fastest of the candidates on this machine, measured once and cached;
    #: :mod:`sparse_core.fastpath`), ``fp32`` (bit-reproducible), ``bf16`` (autocast; CPU with
    #: AVX512-BF16/AMX or GPU), ``fp16`` (CUDA only, with loss scaling). Parameters, masks,
    #: optimizer state and artifacts stay float32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: Feed input batches in channels-last (NHWC) layout to the convolutions; ``auto``: when it
    #: measured faster (:mod:`sparse_core.fastpath`).
    channels_last: bool | Literal["auto"] = "auto"
    #: Accept an explicit ``precision: bf16`` on a CPU without native bf16 (AVX512-BF16 / AMX),
    #: where it is several times slower than fp32; without it such a run is refused with the
    #: measured slow-down.
    allow_slow_bf16: bool = False
    deterministic: bool = True
    #: Resume a run from ``runs/<run>/last.pt`` when its config fingerprint matches.
    resume: bool = True
    #: torch intra-op threads; 0 leaves torch's default.
    num_threads: int = Field(0, ge=0, le=MAX_THREADS)
    data_dir: str = "data"
    runs_dir: str = "runs"
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    #: Cached member probabilities of the ensembles (``collect`` stage).
    ensembles_dir: str = "ensembles"
    #: The report (``report`` stage), the accuracy-vs-sparsity curves (``curves/dvc.yaml``),
    #: the sweeps (``sparseflow sweep``) and the local-parallelism analyses (``analysis/dvc.yaml``).
    reports_dir: str = "reports"
    progress: bool = True
    #: Let path values (:data:`PATH_KEYS`) be absolute or lead outside the project folder with
    #: ``..``. Off by default so that a params file (or ``dvc exp run -S``) cannot make a stage
    #: write, or ``rmtree`` a run folder, elsewhere on the machine. Not part of any fingerprint.
    allow_external_paths: bool = False
    #: After a non-finite loss or gradient, restart from the last good checkpoint this many times
    #: with the learning rate multiplied by ``nonfinite_lr_factor`` each time (0: stop at once).
    nonfinite_retries: int = Field(0, ge=0, le=10)
    nonfinite_lr_factor: float = Field(0.5, gt=0.0, lt=1.0)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        for s in v:
            if isinstance(s, bool) or not 0 <= s <= 2**32 - 1:
                raise ValueError(f"seed {s!r} is outside 0..2**32-1")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds {v} repeat a value")
        return v

    @model_validator(mode="after")
    def _fp16_needs_cuda(self) -> "BaseSection":
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 needs a CUDA device, and device is 'cpu'; use precision bf16 on CPU")
        return self

    def run_seeds(self) -> list[int]:
        """The training seeds: ``seeds``, or ``[seed]`` when it is null."""
        return list(self.seeds) if self.seeds is not None else [self.seed]


class ImageFolderSection(_Section):
    """An ``<root>/{train,test}/<class>/*`` tree, optionally inside a ``.tar.gz`` archive."""

    #: Archive path relative to the mirror folder (``SPARSEFLOW_DATA_MIRROR``); absolute or
    #: leaving the mirror only with ``base.allow_external_paths``.
    archive: str | None = None
    archive_md5: str | None = None
    #: Folder holding ``train/`` and ``test/``: inside the extracted archive when one is given
    #: (always relative then), else relative to the project folder.
    root: str


class DataSection(_Section):
    dataset: Literal[DATASETS] = "fashion_mnist"  # type: ignore[valid-type]
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    #: Keep only the first N training images (after the seeded shuffle); 0 keeps all. For tiny
    #: test profiles.
    train_subset: int = Field(0, ge=0, le=MAX_EXAMPLES)
    test_subset: int = Field(0, ge=0, le=MAX_EXAMPLES)
    imagefolder: ImageFolderSection | None = None

    @model_validator(mode="after")
    def _imagefolder_needs_section(self) -> "DataSection":
        if self.dataset == "imagefolder" and self.imagefolder is None:
            raise ValueError("dataset 'imagefolder' needs a data.imagefolder section with at least 'root'")
        return self


class AugmentSection(_Section):
    random_crop: bool = True
    crop_padding: int = Field(4, ge=0, le=64)
    #: ``auto`` flips for natural-image datasets (CIFAR, image folders), never for digits.
    horizontal_flip: Literal["auto", "on", "off"] = "auto"


class ModelSection(_Section):
    name: str = "lenet5"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _plain_values(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Fingerprints and config.json serialise kwargs as JSON, so they must survive a JSON
        # round trip unchanged: a YAML date, binary or set would only fail there, after a stage
        # has started, and a nested key 1 would be fingerprinted like the key "1".
        try:
            same = json.loads(json.dumps(v, allow_nan=False)) == v
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must hold plain JSON values (numbers, strings, booleans, lists, mappings): {exc}") from None
        if not same:
            raise ValueError("must hold plain JSON values (mapping keys strings, lists not tuples)")
        return v

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from sparse_core.models import available_models

        if v not in available_models():
            raise ValueError(f"unknown model {v!r}; allowed: {', '.join(available_models())}")
        return v


class OptimSection(_Section):
    """SGD and learning-rate schedule of one training phase."""

    batch_size: int = Field(128, gt=0, le=MAX_BATCH)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    #: Epochs (0-based, counted within the phase) at which ``multistep`` multiplies lr by gamma.
    milestones: list[int] = Field(default_factory=list, max_length=100)
    gamma: float = Field(0.1, gt=0.0)

    @field_validator("milestones")
    @classmethod
    def _milestones_in_range(cls, v: list[int]) -> list[int]:
        return _each_in(v, 0, MAX_EPOCHS)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimSection":
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=true needs momentum > 0")
        return self


class WarmupSection(_Section):
    """Dense training shared by every pruning method; 0 epochs writes only the seeded init."""

    epochs: int = Field(0, ge=0, le=MAX_EPOCHS)
    optim: OptimSection = OptimSection()


class PruningSection(_Section):
    """Target and schedule shared by ``dpf``, ``gmp`` and ``oneshot``."""

    sparsity: float = Field(0.9, ge=0.0, lt=1.0)
    granularity: Literal["unstructured", "structured"] = "unstructured"
    scope: Literal["global", "layerwise"] = "global"
    #: Iterations between mask re-estimations (Lin et al. 2020 use 16).
    update_period: int = Field(16, gt=0, le=MAX_STEPS)
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    #: Fractions of the method's total iterations where the cubic schedule starts and ends.
    start_fraction: float = Field(0.0, ge=0.0, le=1.0)
    end_fraction: float = Field(0.75, gt=0.0, le=1.0)
    #: Fraction of training after which masks stop being re-estimated (1.0: until the end, as
    #: in Lin et al. 2020; ``end_fraction``: freeze the mask once the target is reached).
    update_end_fraction: float = Field(1.0, gt=0.0, le=1.0)
    keep_first_dense: bool = False
    keep_last_dense: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "PruningSection":
        if self.end_fraction <= self.start_fraction:
            raise ValueError(
                f"end_fraction ({self.end_fraction}) must be greater than start_fraction ({self.start_fraction})"
            )
        if self.update_end_fraction < self.end_fraction:
            raise ValueError(
                f"update_end_fraction ({self.update_end_fraction}) must be >= end_fraction ({self.end_fraction}), "
                "or the target sparsity is never reached"
            )
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must not exceed sparsity ({self.sparsity})")
        return self


class DSTSection(_Section):
    """Dynamic sparse training (``set``, ``rigl``): Mocanu et al. 2018; Evci et al. 2020."""

    sparsity: float = Field(0.8, ge=0.0, lt=1.0)
    distribution: Literal["uniform", "er", "erk"] = "erk"
    #: Draw the initial masks as independent Bernoulli entries (the official code) instead of
    #: exact per-layer counts.
    bernoulli_init: bool = False
    #: Drop fraction ``p`` at the first topology update.
    drop_fraction: float = Field(0.5, gt=0.0, le=1.0)
    #: ``cosine``: p decays to ``drop_fraction_floor`` by the last update (paper); ``constant``.
    drop_schedule: Literal["cosine", "constant"] = "cosine"
    drop_fraction_floor: float = Field(0.0, ge=0.0, le=1.0)
    #: Iterations between topology updates (ΔT), unless :attr:`update_period_fraction` is set.
    update_period: int = Field(100, gt=0, le=MAX_STEPS)
    #: ΔT as a fraction of one single run's optimizer steps (``train.epochs`` × steps per epoch),
    #: so a profile keeps a paper's cadence whatever its dataset size and epochs; replaces
    #: :attr:`update_period` when set (:func:`resolve_dst`; ``update_period`` must then keep its
    #: default). FreeTickets: ``--update-frequency
    #: 1000`` in a 250-epoch run of 352 steps per epoch (45,000 CIFAR-10 images, batch 128) is
    #: 1000 / 88,000 = 0.01136. EDST's longer run keeps the single run's ΔT, as the reference
    #: keeps ``--update-frequency 1000`` for both.
    update_period_fraction: float | None = Field(None, gt=0.0, le=1.0)
    #: Fraction of training after which the topology is frozen.
    stop_fraction: float = Field(0.75, gt=0.0, le=1.0)
    #: Zero the optimizer's momentum at re-initialised positions (those :attr:`reinit_when_same`
    #: decides start at zero).
    reset_momentum: bool = False
    #: A connection dropped and regrown at the same position in one update: keep its value
    #: (false, RigL's ``reinit_when_same`` default in google-research/rigl ``sparse_optimizers.py``)
    #: or restart it at zero (true, as the FreeTickets / sparselearning code does: its
    #: ``truncate_weights`` zeroes every dropped weight before growing). Connections that were
    #: inactive before the update always start at zero.
    reinit_when_same: bool = False

    @model_validator(mode="after")
    def _one_update_period(self) -> "DSTSection":
        # Compared with the default, not with the keys given, so that a dump validates again.
        if self.update_period_fraction is not None and self.update_period != DSTSection.model_fields["update_period"].default:
            raise ValueError(f"set update_period ({self.update_period} steps) or update_period_fraction "
                             f"({self.update_period_fraction} of a run), not both")
        return self

    @model_validator(mode="after")
    def _floor_below_start(self) -> "DSTSection":
        if self.drop_fraction_floor > self.drop_fraction:
            raise ValueError(
                f"drop_fraction_floor ({self.drop_fraction_floor}) must not exceed drop_fraction ({self.drop_fraction})"
            )
        return self


class EDSTSection(_Section):
    """EDST Ensemble (Liu et al. 2022, Sec. 4.2): one run, an exploration phase, then ``tickets``
    refinement phases of equal length, each yielding its best-validation checkpoint.

    The run's length is set relative to a single run, as the FreeTickets README sets it: its
    EDST command trains ``--epochs 450 --epochs-explo 150 --model-num 3`` where each DST-ensemble
    member (one sparse run) trains ``--epochs 250``, so EDST gets ``budget`` = 1.8 × the
    single-run epochs, a third of them exploring. :func:`edst_plan` turns ``budget`` and
    ``exploration_share`` into whole epochs.

    The topology-update defaults are those of the FreeTickets README's EDST command
    (``main_EDST.py`` with ``sparselearning/core.py``): gradient growth (``--growth gradient``;
    the argparse default is ``random``), a constant drop fraction (``Masking.step`` always calls
    ``truncate_weights(args.death_rate)``, 0.5) and updates every ΔT steps through every phase
    (``--update-frequency``, no stop). ``dst.update_period`` (or ``dst.update_period_fraction``),
    ``dst.sparsity``, ``dst.distribution`` and ``dst.reinit_when_same`` are shared with
    ``set``/``rigl``; ``dst.drop_fraction``, ``dst.drop_schedule`` and ``dst.stop_fraction`` are
    not used by EDST.
    """

    tickets: int = Field(3, ge=1, le=MAX_MEMBERS)
    #: The EDST run's epochs as a multiple of ``train.epochs`` (the pipeline rounds
    #: ``budget × train.epochs`` to whole epochs; FreeTickets README: 450 / 250 = 1.8). In
    #: :func:`sparse_core.api.sparsify` the caller's loop sets the length and this is unused.
    budget: float = Field(1.8, gt=0.0, le=100.0)
    #: Share of the EDST run spent in the exploration phase (constant base learning rate,
    #: ordinary DST updates); FreeTickets README: 150 / 450 = 1/3.
    exploration_share: float = Field(1 / 3, ge=0.0, lt=1.0)
    #: Fraction q of each layer's active weights dropped and regrown before phases 2..M.
    exploration_rate: float = Field(0.8, gt=0.0, le=1.0)
    #: Learning rate within each refinement phase, as multipliers of the base lr over equal
    #: sub-segments (the paper's CIFAR setting with base 0.1: 0.01 then 0.001).
    refine_lr_multipliers: list[float] = Field(default_factory=lambda: [0.1, 0.01], min_length=1, max_length=MAX_MEMBERS)
    #: Growth criterion of the ordinary updates and of the global explorations: ``gradient``, the
    #: FreeTickets README's EDST command (``random`` is the script's argparse default and what its
    #: removed CIFAR-10 EDST script passed; :mod:`sparse_core.recipes`).
    grow: Literal["gradient", "random"] = "gradient"
    #: Drop fraction p of the ordinary updates; ``constant`` (the script) or ``cosine`` (decays to
    #: ``dst.drop_fraction_floor`` over the whole run).
    drop_fraction: float = Field(0.5, gt=0.0, le=1.0)
    drop_schedule: Literal["cosine", "constant"] = "constant"
    #: Per phase (the exploration phase and each refinement phase), ordinary updates happen in the
    #: first ``phase_stop_fraction`` of the phase's steps; 1.0 (the script) updates through every
    #: phase to its end.
    phase_stop_fraction: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("refine_lr_multipliers")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(m <= 0 for m in v):
            raise ValueError(f"every multiplier must be > 0, got {v}")
        return v


class DSTEnsembleSection(_Section):
    """DST Ensemble (Liu et al. 2022, Sec. 4.1): ``members`` independent runs, seeds
    ``base.seed + i``, each the full schedule of ``method``."""

    members: int = Field(3, ge=1, le=MAX_MEMBERS)
    #: A single-run method of the ``dst`` family.
    method: DSTMethodName = "rigl"


class TrainSection(_Section):
    """The ``train`` section. Besides the keys below it holds one section per method that declares
    keys of its own (``train.<params_key>``, :class:`~sparse_core.methods.registry.MethodSpec`);
    their values are checked by the method's ``Options`` model when the method is built and by
    ``sparseflow validate``, any other key is refused."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    #: Registered method names (``sparseflow methods`` lists them).
    methods: list[MethodName] = Field(
        default_factory=_trainable
    )
    epochs: int = Field(10, gt=0, le=MAX_EPOCHS)
    #: Start from the warmup checkpoint (true) or from the seeded random init (false).
    from_warmup: bool = True
    optim: OptimSection = OptimSection()
    pruning: PruningSection = PruningSection()
    dst: DSTSection = DSTSection()
    edst: EDSTSection = EDSTSection()
    dst_ensemble: DSTEnsembleSection = DSTEnsembleSection()

    @model_validator(mode="after")
    def _only_method_sections(self) -> "TrainSection":
        owners = registry.params_keys()
        for key, value in (self.model_extra or {}).items():
            if key not in owners:
                known = ", ".join(f"{k} ({m})" for k, m in owners.items()) or "none"
                raise ValueError(f"train.{key} = {_REPR.repr(value)}: Extra inputs are not permitted (the train section's "
                                 f"own keys, or a method section that a registered method declares: {known})")
            if not isinstance(value, dict):
                raise ValueError(f"train.{key}: the {owners[key]} method's section must be a mapping of its keys, got {value!r}")
        return self

    @model_validator(mode="after")
    def _edst_phases_fit(self) -> "TrainSection":
        tickets = [m for m in self.methods if registry.spec(m).ensemble == "tickets"]
        if tickets:
            epochs = edst_epochs(self)
            if epochs > MAX_EPOCHS:
                raise ValueError(f"{tickets[0]}: train.edst.budget {self.edst.budget} × train.epochs {self.epochs} = "
                                 f"{epochs} epochs, above {MAX_EPOCHS}")
            edst_plan(self.edst, epochs, what=f"{tickets[0]} (train.edst.budget {self.edst.budget} × train.epochs "
                                                  f"{self.epochs})")
        return self


class EDSTPlan(typing.NamedTuple):
    """Whole epochs of an EDST run: ``epochs = exploration_epochs + tickets × phase_epochs``."""

    epochs: int
    exploration_epochs: int
    phase_epochs: int


def edst_epochs(train: "TrainSection") -> int:
    """Epochs of the pipeline's EDST run: ``round(train.edst.budget × train.epochs)``, at least 1."""
    return max(1, round(train.edst.budget * train.epochs))


def edst_plan(edst: EDSTSection, epochs: int, what: str = "edst_ensemble") -> EDSTPlan:
    """Split an EDST run of ``epochs`` epochs into exploration and ``edst.tickets`` equal phases.

    ``phase_epochs = round(epochs · (1 − exploration_share) / tickets)`` (at most
    ``epochs // tickets``), the rest explores. 450 epochs, share 1/3, 3 tickets: 150 + 3 × 100.

    Raises:
        ValueError: fewer epochs than tickets (a phase needs a whole epoch); the message names
            ``what``.
    """
    phase = min(round(epochs * (1.0 - edst.exploration_share) / edst.tickets), epochs // edst.tickets)
    if phase < 1:
        raise ValueError(f"{what}: {epochs} epochs cannot hold {edst.tickets} refinement phases of at least one epoch "
                         "(raise train.epochs or train.edst.budget, or lower train.edst.tickets)")
    return EDSTPlan(epochs, epochs - edst.tickets * phase, phase)


def run_epochs(train: "TrainSection", method: str) -> int:
    """Epochs the pipeline trains ``method`` for: :func:`edst_epochs` for a tickets ensemble
    (``edst_ensemble``), ``train.epochs`` for every other method."""
    return edst_epochs(train) if registry.spec(method).ensemble == "tickets" else train.epochs


def resolve_dst(dst: DSTSection, single_run_steps: int) -> DSTSection:
    """``dst`` with ``update_period`` in steps: ``max(1, round(update_period_fraction ×
    single_run_steps))`` when the fraction is set, else ``dst`` unchanged. ``single_run_steps``:
    optimizer steps of one single run (``train.epochs`` epochs), also for EDST's longer run."""
    if dst.update_period_fraction is None:
        return dst
    return dst.model_copy(update={"update_period": max(1, round(dst.update_period_fraction * single_run_steps))})


class LocalAnalysisSection(_Section):
    """The optional ``local_analysis`` stage (``analysis/dvc.yaml``): the paper's analyses, small."""

    variants: list[Literal["backprop", "greedy", "overlapping", "chunked"]] = Field(
        default_factory=lambda: ["backprop", "greedy", "overlapping", "chunked"]
    )
    batch_sizes: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256], max_length=20)
    #: Learning rate at batch size 128, scaled linearly with the batch size (Goyal et al. 2017), capped at max_lr.
    lr: float = Field(0.05, gt=0)
    max_lr: float = Field(0.2, gt=0)
    target_loss: float = Field(0.6, gt=0)
    max_steps: int = Field(600, gt=0, le=MAX_STEPS)
    #: Training images used by the sweep and the gradient-similarity batch (first N after the shuffle).
    train_subset: int = Field(10000, gt=0, le=MAX_EXAMPLES)
    random_label_examples: int = Field(512, gt=0, le=MAX_EXAMPLES)
    random_label_epochs: int = Field(100, gt=0, le=MAX_EPOCHS)

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes_in_range(cls, v: list[int]) -> list[int]:
        return _each_in(v, 1, MAX_BATCH)


class LocalSection(_Section):
    """Local parallelism (Laskin et al. 2020): ``local_greedy``, ``local_overlap``, ``local_chunked``.

    ``split_points`` (block indices or names where a chunk starts; see
    :mod:`sparse_core.local.blocks` for the names) override ``chunks``. ``optimizer``:
    ``shared`` (one SGD over everything) or ``per_chunk`` (one parameter group per chunk; SGD
    updates each parameter independently, so both give the same numbers in the simulation,
    and ``pipeline`` processes always hold their own). ``execution``: ``simulate`` (exact,
    one process, checkpointed per epoch) or ``pipeline`` (one process per chunk,
    torch.distributed; no per-epoch checkpoint). ``sparse_method`` composes a sparse
    method's hooks with local training (simulation only).
    """

    chunks: int = Field(2, ge=1, le=64)
    split_points: list[int | str] | None = None
    head: Literal["linear", "mlp"] = "linear"
    head_hidden: int = Field(128, gt=0, le=65536)
    optimizer: Literal["shared", "per_chunk"] = "shared"
    execution: Literal["simulate", "pipeline"] = "simulate"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    sparse_method: SingleRunMethodName = "dense"
    analysis: LocalAnalysisSection = LocalAnalysisSection()

    @model_validator(mode="after")
    def _pipeline_is_dense(self) -> "LocalSection":
        if self.execution == "pipeline" and registry.spec(self.sparse_method).family != "dense":
            raise ValueError(
                f"local.execution 'pipeline' trains dense chunks only; local.sparse_method {self.sparse_method!r} "
                "needs execution 'simulate'"
            )
        return self


class RetrainSection(_Section):
    """Fine-tuning with a frozen mask (masked gradients) of the listed train runs."""

    runs: list[str] = Field(default_factory=list)
    epochs: int = Field(3, gt=0, le=MAX_EPOCHS)
    optim: OptimSection = OptimSection(lr=0.01)


class CollectSection(_Section):
    """Ensembles whose member probabilities are cached in ``ensembles/<name>/``."""

    ensembles: list[EnsembleName] = Field(
        default_factory=list
    )
    batch_size: int = Field(1000, gt=0, le=MAX_BATCH)


class EvaluateSection(_Section):
    runs: list[str] = Field(default_factory=list)
    batch_size: int = Field(1000, gt=0, le=MAX_BATCH)
    #: Equal-width bins of the expected calibration error (Guo et al. 2017 use 15).
    calibration_bins: int = Field(15, ge=1, le=1000)


#: Synthetic OOD sets, always available: seeded noise images of the in-distribution shape.
SYNTHETIC_OOD = ("gaussian", "uniform")
_DEFAULT_OOD = {
    "fashion_mnist": ["mnist", "gaussian", "uniform"],
    "mnist": ["fashion_mnist", "gaussian", "uniform"],
    "cifar10": ["svhn", "cifar100", "mnist", "fashion_mnist", "gaussian", "uniform"],
    "cifar100": ["svhn", "cifar10", "gaussian", "uniform"],
    "svhn": ["cifar10", "cifar100", "gaussian", "uniform"],
    "imagefolder": ["gaussian", "uniform"],
}


class OODSection(_Section):
    """Out-of-distribution test sets per in-distribution dataset (``ood`` stage).

    Each set is converted to the in-distribution image shape (grayscale <-> RGB, bilinear
    resize) and normalised with the in-distribution statistics. A dataset set whose archives
    are not found (locally or in the mirror; downloads only when ``download``) is skipped
    with a warning row in the report, unless it is listed in ``required``.
    """

    sets: dict[Literal[DATASETS], list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in _DEFAULT_OOD.items()})  # type: ignore[valid-type]
    required: list[str] = Field(default_factory=list)
    #: At most this many test images per OOD set (the first ones; noise sets have exactly this many).
    max_examples: int = Field(2000, gt=0, le=MAX_EXAMPLES)
    download: bool = False

    @field_validator("sets")
    @classmethod
    def _known_sets(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        allowed = set(DATASETS) - {"imagefolder"} | set(SYNTHETIC_OOD)
        for dataset, names in v.items():
            for name in names:
                if name not in allowed:
                    raise ValueError(f"ood.sets.{dataset}: unknown OOD set {name!r}; allowed: {sorted(allowed)}")
                if name == dataset:
                    raise ValueError(f"ood.sets.{dataset}: a dataset cannot be its own OOD set")
        return v


class CorruptSection(_Section):
    """Corruption robustness sets (``corrupt`` stage; Hendrycks & Dietterich 2019)."""

    #: Corruption names (see :mod:`sparse_core.corruptions`); default: the 15 standard + 4 extra.
    corruptions: list[str] | None = None
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], max_length=5)
    #: Corrupt the first N test images only; 0 corrupts the whole test split.
    test_subset: int = Field(2000, ge=0, le=MAX_EXAMPLES)

    @field_validator("corruptions")
    @classmethod
    def _known_corruptions(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        from sparse_core.corruption_names import ALL_CORRUPTIONS

        for name in v:
            if name not in ALL_CORRUPTIONS:
                raise ValueError(f"unknown corruption {name!r}; allowed: {list(ALL_CORRUPTIONS)}")
        return v

    @field_validator("severities")
    @classmethod
    def _severity_range(cls, v: list[int]) -> list[int]:
        for s in v:
            if s not in (1, 2, 3, 4, 5):
                raise ValueError(f"severity {s} is outside 1..5")
        if len(set(v)) != len(v):
            raise ValueError(f"severities {v} repeat a value")
        return sorted(v)

    def names(self) -> list[str]:
        from sparse_core.corruption_names import ALL_CORRUPTIONS

        return list(ALL_CORRUPTIONS) if self.corruptions is None else list(self.corruptions)


class CurvesSection(_Section):
    """Accuracy vs sparsity (Lin et al. 2020, Fig. 2 / Table 1 style): every method of
    ``methods`` trained at every sparsity of ``sparsities`` for every seed of ``base.seeds``,
    with the recipe of the ``train`` (and ``retrain``) sections and each seed's own warmup
    (``dvc repro curves/dvc.yaml``; results in ``reports/curves/``)."""

    methods: list[SweepMethodName] = Field(
        default_factory=lambda: ["dpf", "gmp", "rigl", "oneshot_retrain"], min_length=1
    )
    sparsities: list[float] = Field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95, 0.98], min_length=1, max_length=50)

    @field_validator("sparsities")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        for s in v:
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity {s} is outside [0, 1)")
        if len(set(v)) != len(v):
            raise ValueError(f"sparsities {v} repeat a value")
        return sorted(v)


class OrchestrationSection(_Section):
    """Where the independent units of work inside a stage run (DST Ensemble members, sweep
    points, local-parallelism sweep points). Not a DVC params dependency: the results are the
    same whichever runner executes them, so changing it never makes a stage stale.

    ``task_runner``: ``sequential`` (one after another, the default), ``thread`` (Prefect's
    ThreadPoolTaskRunner), ``process`` (ProcessPoolTaskRunner) or ``dask`` (prefect-dask's
    DaskTaskRunner: a local cluster of ``dask_workers`` processes, or the scheduler at
    ``dask_address``). The environment variables ``SPARSEFLOW_TASK_RUNNER`` and
    ``SPARSEFLOW_DASK_ADDRESS`` override the file.
    """

    task_runner: Literal["sequential", "thread", "process", "dask"] = "sequential"
    #: Concurrent tasks of the ``thread`` and ``process`` runners.
    max_workers: int = Field(2, ge=1, le=MAX_WORKERS)
    #: ``tcp://host:8786`` of an existing Dask scheduler; null starts a local cluster.
    dask_address: str | None = None
    #: Worker processes of the local Dask cluster (one thread each).
    dask_workers: int = Field(2, ge=1, le=MAX_WORKERS)


class Params(_Section):
    """The whole ``params.yaml``."""

    base: BaseSection
    data: DataSection
    augment: AugmentSection = AugmentSection()
    model: ModelSection
    warmup: WarmupSection
    train: TrainSection
    retrain: RetrainSection
    collect: CollectSection = CollectSection()
    evaluate: EvaluateSection
    ood: OODSection = OODSection()
    local: LocalSection = LocalSection()
    corrupt: CorruptSection = CorruptSection()
    curves: CurvesSection = CurvesSection()
    orchestration: OrchestrationSection = OrchestrationSection()

    @model_validator(mode="after")
    def _runs_exist(self) -> "Params":
        for run in self.retrain.runs:
            if run not in self.train.methods:
                raise ValueError(
                    f"retrain.runs names {run!r}, which is not in train.methods {list(self.train.methods)}"
                )
        for name in self.collect.ensembles:
            if name not in self.train.methods:
                raise ValueError(f"collect.ensembles names {name!r}, which is not in train.methods {list(self.train.methods)}")
        for run in self.retrain.runs:
            if registry.spec(run).ensemble is not None:
                raise ValueError(f"retrain.runs: {run!r} is an ensemble; retrain single runs only")
        produced = [m for m in self.train.methods if registry.spec(m).ensemble is None]
        produced += [retrain_run_name(r) for r in self.retrain.runs]
        for run in self.evaluate.runs:
            if run not in produced:
                raise ValueError(f"evaluate.runs names {run!r}; runs produced by train/retrain are {produced}")
        return self

    @model_validator(mode="after")
    def _gradual_schedule_reaches_target(self) -> "Params":
        from sparse_core.sparsity.schedules import gradual_schedule_problem

        scheduled = {m for m, spec in registry.specs().items() if spec.pruning_schedule}
        gradual = {m for m in self.train.methods if m in scheduled}
        if self.local.sparse_method in scheduled and any(registry.spec(m).family == "local" for m in self.train.methods):
            gradual.add(f"local.sparse_method {self.local.sparse_method}")
        n = train_images(self.data)
        if not gradual or n is None:
            return self
        steps = -(-n // self.train.optim.batch_size) * self.train.epochs
        p = self.train.pruning
        problem = gradual_schedule_problem(steps, p.start_fraction, p.end_fraction, p.update_period)
        if problem:
            raise ValueError(f"train.pruning ({', '.join(sorted(gradual))}): {problem}; {SCHEDULE_KEYS_HINT}")
        return self

    @model_validator(mode="after")
    def _paths_stay_inside_project(self) -> "Params":
        problems = []
        spec = self.data.imagefolder
        if spec is not None and spec.archive:
            # The root names a folder inside the extracted archive, whatever the setting.
            problem = path_escape(spec.root)
            if problem:
                problems.append(f"data.imagefolder.root = {spec.root!r}: {problem}; with an archive, root is a folder "
                                "inside the extracted archive")  # fmt: skip
        for key in PATH_KEYS:
            value = self._get(key)
            if value is None or (key == "data.imagefolder.root" and spec is not None and spec.archive):
                continue  # unset, or checked above
            if "\x00" in value:  # no file system takes it, whatever the setting
                problems.append(f"{key} = {value!r}: contains a NUL byte")
                continue
            problem = None if self.base.allow_external_paths else path_escape(value)
            if problem:
                where = "the mirror folder" if key == "data.imagefolder.archive" else "the project folder"
                problems.append(f"{key} = {value!r}: {problem}; paths in params must stay inside {where} "
                                "(set base.allow_external_paths: true to allow it)")  # fmt: skip
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    @model_validator(mode="after")
    def _outputs_apart(self) -> "Params":
        problems = output_overlaps({key: self._get(key) for key in OUTPUT_KEYS})
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    def _get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part, None)
            if node is None:
                return None
        return node

    def for_seed(self, seed: int) -> "Params":
        """The params of training seed ``seed``: ``base.seed`` is ``seed`` and every output folder
        of runs moves into a per-seed subfolder, so the stage functions of one seed never see
        another's files::

            <runs_dir>/s<seed>/<run>/              <ensembles_dir>/s<seed>/<ensemble>/
            <metrics_dir>/seeds/s<seed>/<model>.json   <plots_dir>/seeds/s<seed>/...

        ``base.data_dir`` is shared: the prepared data and evaluation sets do not depend on the
        training seed. Stage functions that train or evaluate take these params.
        """
        b = self.base
        base = b.model_copy(update={
            "seed": seed, "seeds": [seed],
            "runs_dir": f"{b.runs_dir}/s{seed}", "ensembles_dir": f"{b.ensembles_dir}/s{seed}",
            "metrics_dir": f"{b.metrics_dir}/seeds/s{seed}", "plots_dir": f"{b.plots_dir}/seeds/s{seed}",
        })  # fmt: skip
        return self.model_copy(update={"base": base})

    def fingerprint(self, *sections: str) -> str:
        """sha256 (hex, first 16 chars) of the named sections, to tell whether a checkpoint fits.

        Settings that cannot change results (:data:`NOT_FINGERPRINTED`) are left out, so adding
        one never invalidates existing checkpoints.
        """
        blob = json.dumps(
            {s: getattr(self, s).model_dump(mode="json", exclude=NOT_FINGERPRINTED.get(s)) for s in sections},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Training images of each registry dataset (before the validation split), to check schedules
#: against the number of steps at validation time; image folders are checked when training starts.
TRAIN_IMAGES = {"fashion_mnist": 60000, "mnist": 60000, "cifar10": 50000, "cifar100": 50000, "svhn": 73257}
#: What to change when a gradual-pruning schedule cannot reach its target (see
#: :func:`sparse_core.sparsity.schedules.gradual_schedule_problem`).
SCHEDULE_KEYS_HINT = ("change train.pruning.end_fraction (below 1), train.pruning.update_period, train.pruning.start_fraction, "
                      "or the number of steps (train.epochs, train.optim.batch_size, data.train_subset)")


def train_images(data: DataSection) -> int | None:
    """Images in the training split after the validation split (None for image folders)."""
    total = TRAIN_IMAGES.get(data.dataset)
    if total is None:
        return None
    n = min(data.train_subset, total) if data.train_subset else total
    return n - int(round(data.val_fraction * n))


#: Params values that name files or folders; checked by :func:`path_escape` unless
#: ``base.allow_external_paths``. ``data.imagefolder.archive`` is relative to the mirror folder,
#: the others to the project folder (the working directory of every stage).
PATH_KEYS = (
    "base.data_dir",
    "base.runs_dir",
    "base.metrics_dir",
    "base.plots_dir",
    "base.ensembles_dir",
    "base.reports_dir",
    "data.imagefolder.archive",
    "data.imagefolder.root",
)
#: Params values that name an output folder of the stages. Each must be apart from every other
#: (neither the same folder nor inside another) and from :data:`RESERVED_PATHS`, or one stage's
#: outputs would land in, or replace, another's (:func:`output_overlaps`).
OUTPUT_KEYS = ("base.data_dir", "base.runs_dir", "base.metrics_dir", "base.plots_dir", "base.ensembles_dir", "base.reports_dir")
#: Project paths no output setting may name, contain or lie inside: version control, DVC, the
#: code, the profiles, the folders of the other DVC pipelines and the files at the top of the project.
RESERVED_PATHS = (".git", ".dvc", ".ci", ".venv", "sparse_core", "flows", "tasks", "tests", "benchmarks", "profiles",
                  "curves", "analysis", "stage_code", "params.yaml", "dvc.yaml", "dvc.lock", "pyproject.toml", "Makefile",
                  "README.md")  # fmt: skip


def _within(inner: str, outer: str) -> bool:
    """Whether the folder ``inner`` is ``outer`` or lies inside it (both absolute, normalised)."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def output_overlaps(outputs: dict[str, str | None], root: str | Path = ".") -> list[str]:
    """Why the output folders ``{params key: path}`` are not apart, one line per clash (empty
    when they are). Paths are relative to ``root`` (the project folder, the working directory of
    every stage) or absolute; the check is lexical (``os.path.normpath``), like
    :func:`path_escape`.

    Two outputs clash when they are the same folder or one lies inside the other; an output
    clashes with a reserved path (:data:`RESERVED_PATHS`) when either lies inside the other
    (``base.runs_dir: .`` contains the code; ``base.plots_dir: reports/plots`` lies in reports).
    """
    root = os.path.abspath(root)
    where = {k: os.path.normpath(os.path.join(root, v)) for k, v in outputs.items() if v and "\x00" not in v}
    problems = []
    keys = list(where)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            pa, pb = where[a], where[b]
            if pa == pb:
                problems.append(f"{a} = {outputs[a]!r} and {b} = {outputs[b]!r} name the same folder; "
                                "every output setting needs its own folder")  # fmt: skip
            elif _within(pa, pb) or _within(pb, pa):
                inner, outer = (a, b) if _within(pa, pb) else (b, a)
                problems.append(f"{inner} = {outputs[inner]!r} lies inside {outer} = {outputs[outer]!r}; a stage "
                                f"clearing {outer} would delete it. Give each output setting its own folder")  # fmt: skip
    for key, path in where.items():
        for name in RESERVED_PATHS:
            reserved = os.path.join(root, name)
            if _within(path, reserved) or _within(reserved, path):
                what = "is" if path == reserved else ("lies inside" if _within(path, reserved) else "contains")
                problems.append(f"{key} = {outputs[key]!r} {what} the project's {name!r}, which no output setting "
                                "may use; choose another folder")  # fmt: skip
                break
    return problems


#: Per section, settings excluded from :meth:`Params.fingerprint`.
#: The non-finite retry settings are left out too: turning retries on after a failed run must
#: resume that run's last good checkpoint, not start it over.
#: ``seeds`` is left out because each seed's runs are trained with ``base.seed`` set to that seed
#: (:meth:`Params.for_seed`); the list itself does not change any run.
#: ``ensembles_dir`` and ``reports_dir`` hold no run (only caches and reports).
NOT_FINGERPRINTED: dict[str, set[str]] = {
    "base": {"allow_external_paths", "allow_slow_bf16", "nonfinite_retries", "nonfinite_lr_factor", "seeds", "ensembles_dir", "reports_dir"}
}


def path_escape(value: str) -> str | None:
    """Why ``value`` would leave the folder it is relative to, or None when it stays inside.

    The check is lexical (``os.path.normpath``), independent of the working directory and of
    what exists on disk: absolute paths and paths whose ``..`` climb above their starting
    folder are refused. A symlink already inside the project is the user's own choice and is
    followed as usual.
    """
    if "\x00" in value:
        return "contains a NUL byte"
    if os.path.isabs(value):
        return "absolute path"
    norm = os.path.normpath(value)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return f"resolves outside ({norm!r}) through '..'"
    return None


class UnknownNameError(ValueError):
    """A name given on the command line or as a flow parameter (profile, run, method, ensemble,
    stage) is not one of those that exist."""


def plain_name(value: Any, known: Iterable[str], what: str) -> str:
    """The element of ``known`` equal to ``value``: every name that becomes part of a path (a
    profile, run, method, ensemble or stage name) is matched against what exists, never joined
    as given, so ``../../x``, an absolute path or a name with a NUL byte cannot reach a file
    outside the folder it names.

    Raises:
        UnknownNameError: ``value`` is not in ``known`` (the message lists ``known``, and says
            that a path is not a name when ``value`` looks like one).
    """
    names = sorted(set(known))
    for name in names:
        if value == name:
            return name
    text = reprlib.repr(value)
    pathlike = isinstance(value, str) and ("/" in value or os.sep in value or value in (".", "..") or "\x00" in value)
    why = "; give a plain name, not a path" if pathlike else ""
    raise UnknownNameError(f"{what} {text} is unknown{why}; known: {', '.join(names) or 'none'}")


def seeded(params: Params, seed: int | None = None) -> Params:
    """``params.for_seed(seed)``; ``seed`` None picks the first training seed (``base.seeds[0]``),
    so a stage run by hand without ``--seed`` writes where ``dvc repro`` would."""
    return params.for_seed(params.base.run_seeds()[0] if seed is None else seed)


def curve_points_path(params: Params, method: str, seed: int) -> Path:
    """``<reports_dir>/curves/points/<method>-s<seed>.csv``: one ``curves@<method>-<seed>`` stage's rows."""
    return Path(params.base.reports_dir) / "curves" / "points" / f"{method}-s{seed}.csv"


def retrain_run_name(run: str) -> str:
    """Name of the fine-tuned copy of ``run`` (``dpf`` -> ``dpf_retrain``)."""
    return f"{run}_retrain"


#: Short reprs of offending values: a junk value (a huge list, a deep mapping) stays one line.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def _format_error(path: Path, err: ValidationError, raw: dict) -> str:
    lines = [f"{path}: {err.error_count()} invalid value(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "missing":
            lines.append(f"  - {key}: missing required key")
            continue
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error" and isinstance(value, dict):
            # A whole-section (or whole-file) check: its message names the keys; the section
            # itself would be a screenful.
            lines.append(f"  - {key + ': ' if key else ''}{msg}")
        else:
            lines.append(f"  - {key} = {_REPR.repr(value)}: {msg}")
    return "\n".join(lines)


#: Values a params file may hold after YAML aliases are expanded: an alias "bomb" (a few lines
#: that expand to billions of items) would otherwise exhaust memory when serialised.
MAX_PARAMS_VALUES = 100_000


def _check_size(raw: Any, path: Path) -> None:
    """Refuse recursive structures and ones that expand to more than :data:`MAX_PARAMS_VALUES`.

    Sizes are memoised by object identity, so shared (aliased) sub-trees cost one visit.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list, tuple, set)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{path}: a value contains itself (recursive YAML alias)")
        active.add(key)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else list(node)
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_PARAMS_VALUES:
                break
        active.discard(key)
        sizes[key] = total
        return total

    try:
        total = size(raw)
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply") from None
    if total > MAX_PARAMS_VALUES:
        raise ConfigError(f"{path}: more than {MAX_PARAMS_VALUES} values once YAML aliases are expanded")


def parse_params(raw: Any, source: str | Path = "<params>") -> Params:
    """Validate an already-loaded params mapping.

    Raises:
        ConfigError: naming ``source``, each bad key (dotted), its value and what is allowed.
    """
    path = Path(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    _check_size(raw, path)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(path, err, raw)) from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply") from None


class _ParamsLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader (plain data only, no Python tags) that also refuses duplicate keys;
    on LibYAML's parser where PyYAML has it (``CSafeLoader``: the default params file in 2 ms
    instead of 21 ms, and a stage process reads it up to three times), constructing in Python.

    PyYAML keeps the last of two equal keys silently, so ``sparsity: 0.9`` written twice would
    train with whichever comes second.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark,
                    )  # fmt: skip
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (YAML safe loader: no Python tags, no duplicate keys).

    Raises:
        ConfigError: the file is missing, is not UTF-8 text, is not valid YAML (an unsafe tag
            such as ``!!python/object/apply`` included: nothing is constructed or run), or
            fails validation. The message starts with the file's path.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    try:
        stream = io.StringIO(text)
        stream.name = str(path)  # error marks name the file, not "<unicode string>"
        loader = _ParamsLoader(stream)  # a SafeLoader subclass
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.constructor.ConstructorError as exc:
        hint = ""
        if "python/" in str(exc.problem):
            hint = " (Python tags are refused: a params file holds plain data only)"
        raise ConfigError(f"{path}: not valid YAML{hint}: {exc}") from None
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # LibYAML's limit (1000 levels)
            raise ConfigError(f"{path}: not valid YAML: values nested too deeply ({getattr(exc, 'problem_mark', '')})") from None
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:  # the pure-Python parser's limit
        raise ConfigError(f"{path}: not valid YAML: values nested too deeply") from None
    return parse_params(raw, path)
