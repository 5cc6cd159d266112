"""Paper claims as statistical tests over per-seed metrics.

A :class:`Claim` compares two sides, each a :class:`Term` (a linear combination of metric
values, e.g. ``dpf.test.accuracy`` or ``oneshot_retrain.test.accuracy - oneshot.test.accuracy``).
The statistics below are this project's own definitions, not a procedure taken from the
cited papers:

* **Paired by seed.** Only seeds present for every model a claim names are used; for each
  seed ``s`` the *oriented difference* is ``d_s = lhs_s - rhs_s`` when higher is better and
  ``d_s = rhs_s - lhs_s`` when lower is better (NLL, ECE, FLOPs), so ``d > 0`` always favours
  the claim. Pairing removes the seed-to-seed variance that both sides share (same data
  order, same initialisation stream).
* **Student t.** The interval is ``mean(d) ± t_{(1+c)/2, n-1} · std(d) / √n`` (``std`` with
  ``ddof=1``, ``c`` the confidence, 0.95 by default). With one seed the interval is infinite.
* **Verdicts** on the interval ``[lo, hi]`` of ``d`` with margin ``δ ≥ 0``:

  - ``">"`` (superiority): *holds* if ``lo > 0``, *contradicted* if ``hi < 0``.
  - ``">="`` (non-inferiority): *holds* if ``lo > -δ``, *contradicted* if ``hi < -δ`` (the
    left side is worse by more than ``δ`` with confidence ``c``).
  - ``"≈"`` (equivalence, two one-sided tests on the same interval): *holds* if
    ``-δ < lo`` and ``hi < δ``, *contradicted* if ``lo > δ`` or ``hi < -δ``.
  - Anything else, and every infinite interval, is *inconclusive*.

  Per-seed differences are rounded to 12 decimals first, so sides equal up to floating-point
  summation order give a difference of exactly 0 (with zero spread, ``lo = hi = 0``).

* **Design.** A claim names the design ratios of the paper's experiment it depends on
  (:mod:`sparse_core.recipes`). Given the profile's values (``design``), each row lists the
  ratios that differ from the paper's (``design_vs_paper``, e.g. "EDST budget 1.0× (paper
  1.8×)") and such a claim's verdict carries the qualifier "(off-paper design)".
* **Power.** ``half_width`` is the interval's half-width ``t · std / √n``: the smallest
  difference the seeds can tell from zero. For an inconclusive claim, ``n_needed`` is the
  smallest ``n`` at which an interval of the observed spread would clear the nearest decision
  boundary from the observed mean (``0`` for ``>``, ``-δ`` for ``>=``, ``±δ`` for ``≈``); an
  estimate that assumes the mean and spread stay as observed.

Margins are in the metric's own units. "A is as good as B" can never be shown with
``δ = 0`` (an interval never has zero width at finite noise), so non-inferiority and
equivalence claims carry a tolerance judged practically irrelevant: half a point of
accuracy (0.005) or 0.01 nats of NLL.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from sparse_core import recipes as _D

RELATIONS = (">", ">=", "≈")
COLUMNS = ("id", "paper", "statement", "relation", "metric_direction", "margin", "n", "seeds", "lhs_mean", "lhs_std",
           "rhs_mean", "rhs_std", "diff_mean", "diff_std", "ci_low", "ci_high", "verdict", "note", "half_width",
           "n_needed", "design", "design_vs_paper", "off_paper")
#: Qualifier of a verdict decided on a profile whose design departs from the paper's.
OFF_PAPER = "(off-paper design)"
#: Largest ``n_needed`` computed; beyond it the row says more than this many seeds.
MAX_N_NEEDED = 1000


def _get(metrics: Mapping, path: str) -> Any:
    node: Any = metrics
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(path)
        node = node[key]
    return node


@dataclass(frozen=True)
class Term:
    """A linear combination of one seed's metric values: ``Σ c · model.path + const``."""

    parts: tuple[tuple[float, str, str], ...]
    const: float = 0.0

    def models(self) -> set[str]:
        """The models this term reads."""
        return {model for _, model, _ in self.parts}

    def value(self, metrics_of: Callable[[str], Mapping]) -> float:
        """Evaluates the term; ``metrics_of(model)`` returns that model's metrics dict.

        Raises:
            KeyError: a path is missing (the message names model and path).
        """
        total = float(self.const)
        for coef, model, path in self.parts:
            try:
                leaf = _get(metrics_of(model), path)
            except KeyError:
                raise KeyError(f"model {model!r} has no metric {path!r}") from None
            total += coef * float(leaf)
        return total

    def __add__(self, other: Term | float) -> Term:
        other = other if isinstance(other, Term) else const(other)
        return Term(self.parts + other.parts, self.const + other.const)

    __radd__ = __add__

    def __neg__(self) -> Term:
        return -1.0 * self

    def __sub__(self, other: Term | float) -> Term:
        return self + -(other if isinstance(other, Term) else const(other))

    def __rsub__(self, other: float) -> Term:
        return const(other) + -self

    def __mul__(self, k: float) -> Term:
        if not isinstance(k, numbers.Real) or isinstance(k, bool):
            return NotImplemented
        return Term(tuple((k * c, m, p) for c, m, p in self.parts), k * self.const)

    __rmul__ = __mul__


def term(model: str, path: str) -> Term:
    """``1.0 · model.path``."""
    return Term(((1.0, model, path),))


def const(x: float) -> Term:
    """A constant term (no model)."""
    return Term((), float(x))


@dataclass(frozen=True)
class Claim:
    """A claim ``lhs <relation> rhs``; with ``higher_is_better=False`` "better" means lower."""

    id: str
    paper: str
    statement: str
    lhs: Term
    rhs: Term
    relation: Literal[">", ">=", "≈"]
    higher_is_better: bool = True
    margin: float = 0.0
    #: Keys of :data:`sparse_core.recipes.RATIOS`: the paper design this claim depends on.
    design: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"claim {self.id!r}: relation {self.relation!r} not in {RELATIONS}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"claim {self.id!r}: margin must be finite and >= 0, got {self.margin!r}")
        if self.relation == ">" and self.margin != 0:
            raise ValueError(f"claim {self.id!r}: a margin only applies to '>=' and '≈'")
        if self.relation == "≈" and self.margin == 0:
            raise ValueError(f"claim {self.id!r}: equivalence needs a margin > 0 (it can never hold with 0)")
        unknown = [k for k in self.design if k not in _D.RATIOS]
        if unknown:
            raise ValueError(f"claim {self.id!r}: unknown design ratio(s) {unknown}; known: {sorted(_D.RATIOS)}")

    def models(self) -> set[str]:
        """Every model either side reads."""
        return self.lhs.models() | self.rhs.models()


def paired_t_interval(diffs: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Student-t interval of the mean of per-seed differences.

    Returns:
        ``(mean, std, lo, hi)``: ``std`` with ddof=1 (0 for one value), ``[lo, hi]`` =
        ``mean ± t_{(1+c)/2, n-1} · std/√n``; ``(d, 0, -inf, inf)`` for one value.

    Raises:
        ValueError: empty input, a non-finite value, or confidence outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    values = [float(v) for v in diffs]
    if not values:
        raise ValueError("paired_t_interval needs at least one difference")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"non-finite difference {v!r} at index {i}")
    n, mean = len(values), float(np.mean(values))
    if n == 1:
        return mean, 0.0, -math.inf, math.inf
    std = float(np.std(values, ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def verdict(lo: float, hi: float, relation: str, margin: float) -> str:
    """``"holds"``, ``"contradicted"`` or ``"inconclusive"`` for an oriented interval (module docstring)."""
    if relation not in RELATIONS:
        raise ValueError(f"relation {relation!r} not in {RELATIONS}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be finite and >= 0, got {margin!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if relation == ">":
        holds, contradicted = lo > 0, hi < 0
    elif relation == ">=":
        holds, contradicted = lo > -margin, hi < -margin
    else:
        holds, contradicted = -margin < lo and hi < margin, lo > margin or hi < -margin
    return "holds" if holds else "contradicted" if contradicted else "inconclusive"


def boundary_distance(mean: float, relation: str, margin: float) -> float:
    """Distance from an oriented mean difference to the nearest verdict boundary of ``relation``
    (module docstring, "Power"): the half-width an interval must fall below to decide."""
    if relation == ">":
        return abs(mean)
    if relation == ">=":
        return abs(mean + margin)
    return abs(margin - abs(mean))


def seeds_needed(mean: float, std: float, relation: str, margin: float, confidence: float = 0.95) -> int | None:
    """Smallest ``n`` with ``t_{(1+c)/2, n-1} · std / √n`` below :func:`boundary_distance`;
    None when it cannot be estimated (``std`` 0 or not finite, the mean on a boundary) or
    exceeds :data:`MAX_N_NEEDED`."""
    distance = boundary_distance(mean, relation, margin)
    if not (math.isfinite(std) and std > 0 and distance > 0):
        return None
    q = (1 + confidence) / 2
    for n in range(2, MAX_N_NEEDED + 1):
        if float(stats.t.ppf(q, n - 1)) * std / math.sqrt(n) < distance:
            return n
    return None


def _design_columns(claim: Claim, design: Mapping[str, Any] | None) -> dict[str, Any]:
    if not claim.design:
        return {"design": [], "design_vs_paper": "no paper ratio declared", "off_paper": False}
    if design is None:
        return {"design": [], "design_vs_paper": "design not checked", "off_paper": False}
    rows = _D.compare(claim.design, design)
    off = [r["text"] for r in rows if r["matches"] is not True]
    return {"design": rows, "design_vs_paper": "; ".join(off) if off else "paper's ratios", "off_paper": bool(off)}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def evaluate_claims(claims: Sequence[Claim], per_seed: Mapping[str, Mapping[int, Mapping]],
                    confidence: float = 0.95, design: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per claim (columns :data:`COLUMNS`); ``table.attrs["confidence"]`` records ``confidence``.

    ``design``: the profile's value of each design ratio
    (:func:`sparse_core.recipes.profile_design`); None leaves the design unchecked.

    Raises:
        KeyError: a present model's metrics lack a path (names claim, model, seed, path).
        ValueError: duplicate claim ids, or a non-finite metric value.
    """
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate claim ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    rows = []
    for claim in claims:
        base = {"id": claim.id, "paper": claim.paper, "statement": claim.statement, "relation": claim.relation,
                "metric_direction": "higher" if claim.higher_is_better else "lower", "margin": float(claim.margin),
                **_design_columns(claim, design)}
        models = sorted(claim.models())
        missing = [m for m in models if not per_seed.get(m)]
        shared = sorted(set.intersection(*(set(per_seed[m]) for m in models))) if models and not missing else []
        if not shared:
            note = (f"missing models: {', '.join(missing)}" if missing else
                    "claim names no model" if not models else f"models {', '.join(models)} share no seed")
            rows.append({**base, "n": 0, "seeds": [], **dict.fromkeys(COLUMNS[8:16], math.nan),
                         "verdict": "not tested", "note": note, "half_width": math.nan, "n_needed": None})
            continue
        lhs, rhs = [], []
        for seed in shared:
            metrics_of = {m: per_seed[m][seed] for m in models}.__getitem__
            try:
                lhs.append(claim.lhs.value(metrics_of))
                rhs.append(claim.rhs.value(metrics_of))
            except KeyError as err:
                raise KeyError(f"claim {claim.id!r}, seed {seed}: {err.args[0]}") from None
        # Rounded to 1e-12: two sides that are equal up to summation order (an ensemble of
        # identical members vs their mean) must give 0, not a "significant" 1e-17.
        diffs = [round(a - b if claim.higher_is_better else b - a, 12) for a, b in zip(lhs, rhs)]
        try:
            mean, std, lo, hi = paired_t_interval(diffs, confidence)
        except ValueError as err:
            raise ValueError(f"claim {claim.id!r} (seeds {shared}): {err}") from None
        dropped = sorted({s for m in models for s in per_seed[m]} - set(shared))
        decided = verdict(lo, hi, claim.relation, claim.margin)
        needed = seeds_needed(mean, std, claim.relation, claim.margin, confidence) if decided == "inconclusive" else None
        rows.append({**base, "n": len(shared), "seeds": [int(s) for s in shared],
                     "half_width": (hi - lo) / 2 if math.isfinite(hi - lo) else math.inf, "n_needed": needed,
                     **dict(zip(("lhs_mean", "lhs_std"), _mean_std(lhs))), **dict(zip(("rhs_mean", "rhs_std"), _mean_std(rhs))),
                     "diff_mean": mean, "diff_std": std, "ci_low": lo, "ci_high": hi,
                     "verdict": f"{decided} {OFF_PAPER}" if base["off_paper"] else decided,
                     "note": f"seeds {dropped} unpaired (not run for every model), left out" if dropped else ""})
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.attrs["confidence"] = confidence
    return table


def _finite_or_none(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _plain(x: Any) -> Any:
    """A design value as JSON: finite floats, ints and strings; None for unknown or non-finite."""
    if x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    return _finite_or_none(x)


def claims_json(table: pd.DataFrame) -> dict:
    """``{id: {verdict, n, diff_mean, ci_low, ci_high, lhs_mean, rhs_mean, half_width, n_needed,
    off_paper, design_vs_paper, design: {ratio: {profile, paper, matches, source}}}}``, NaN/inf as
    ``None``."""
    keys = ("diff_mean", "ci_low", "ci_high", "lhs_mean", "rhs_mean", "half_width")
    out = {}
    for r in table.to_dict("records"):
        design = {d["key"]: {"profile": _plain(d["profile"]), "paper": _plain(d["paper"]), "matches": d["matches"],
                             "source": d["source"]} for d in r["design"]}
        needed = r["n_needed"]
        out[str(r["id"])] = {"verdict": str(r["verdict"]), "n": int(r["n"]), **{k: _finite_or_none(r[k]) for k in keys},
                             "n_needed": None if needed is None or pd.isna(needed) else int(needed),
                             "off_paper": bool(r["off_paper"]), "design_vs_paper": str(r["design_vs_paper"]),
                             "design": design}
    return out


def _fmt(x: float, digits: int) -> str:
    if math.isnan(x):
        return "—"
    return ("∞" if x > 0 else "-∞") if math.isinf(x) else f"{x:.{digits}f}"


def claims_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A markdown table of an :func:`evaluate_claims` result (∞ for infinite bounds, — for NaN)."""
    pct = f"{100 * table.attrs.get('confidence', 0.95):g}%"
    lines = [f"| Claim | Paper | n | lhs mean ± std | rhs mean ± std | Δ (oriented) [{pct} CI] | ± (decidable) | Verdict "
             "| Design vs paper |",
             "|---|---|---:|---|---|---|---:|---|---|"]
    for r in table.to_dict("records"):
        f = lambda x: _fmt(float(x), digits)  # noqa: E731
        pm = lambda side: "—" if math.isnan(r[f"{side}_mean"]) else f"{f(r[side + '_mean'])} ± {f(r[side + '_std'])}"  # noqa: E731
        ci = "—" if math.isnan(r["diff_mean"]) else f"{f(r['diff_mean'])} [{f(r['ci_low'])}, {f(r['ci_high'])}]"
        needed = r["n_needed"]
        power = "" if needed is None or pd.isna(needed) else f"; the observed Δ needs about n = {int(needed)}"
        if r["verdict"].startswith("inconclusive") and not power and int(r["n"]) > 1:
            power = f"; more than {MAX_N_NEEDED} seeds, or never, at the observed Δ"
        cells = [f"{r['statement']} (`{r['id']}`)", r["paper"], str(int(r["n"])), pm("lhs"), pm("rhs"), ci,
                 f(r["half_width"]), r["verdict"] + (f" ({r['note']})" if r["note"] else "") + power, r["design_vs_paper"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def aggregate(per_seed_metrics: Mapping[int, Mapping]) -> dict:
    """Mean and std over seeds of nested metrics dicts.

    Returns:
        ``{"n", "seeds", "mean", "std", "per_seed": {"s<seed>": dict}}``; numeric leaves get
        mean / sample std (0.0 over one seed) over the seeds that have them; other leaves
        (strings) are copied into both when identical across those seeds, else dropped.

    Raises:
        ValueError: no seeds, a non-finite value, or a key that is a dict in one seed and a
            leaf (or numeric and non-numeric) in another.
    """
    if not per_seed_metrics:
        raise ValueError("aggregate needs at least one seed")
    seeds = sorted(per_seed_metrics)
    leaves: dict[tuple[str, ...], list[tuple[Any, Any]]] = {}

    def walk(node: Mapping, prefix: tuple[str, ...], seed: Any) -> None:
        for key, value in node.items():
            path = prefix + (str(key),)
            if isinstance(value, Mapping):
                walk(value, path, seed)
                continue
            if _is_number(value) and not math.isfinite(float(value)):
                raise ValueError(f"seed {seed}: non-finite value {value!r} at {'.'.join(path)!r}")
            leaves.setdefault(path, []).append((seed, value))

    for seed in seeds:
        walk(per_seed_metrics[seed], (), seed)
    inner = {path[:i] for path in leaves for i in range(1, len(path))}
    mean: dict = {}
    std: dict = {}
    for path, pairs in leaves.items():
        if path in inner:
            raise ValueError(f"{'.'.join(path)!r} is a dict in some seeds and a value in others")
        values = [v for _, v in pairs]
        numeric = [_is_number(v) for v in values]
        if any(numeric) and not all(numeric):
            raise ValueError(f"{'.'.join(path)!r} is numeric in some seeds and not in others: {pairs}")
        if all(numeric):
            m, s = _mean_std([float(v) for v in values])
        elif all(v == values[0] for v in values):
            m = s = values[0]
        else:
            continue
        for out, v in ((mean, m), (std, s)):
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = v
    return {"n": len(seeds), "seeds": seeds, "mean": mean, "std": std,
            "per_seed": {f"s{seed}": per_seed_metrics[seed] for seed in seeds}}


_DPF = 'Lin et al. 2020, "Dynamic Model Pruning with Feedback" (ICLR)'
_FT = 'Liu et al. 2022, "Deep Ensembling with No Overhead for either Training or Testing" (FreeTickets, ICLR)'
_LOCAL = 'Laskin et al. 2020, "Parallel Training of Deep Networks with Local Updates"'
_ACC = 0.005  # accuracy margin; an NLL claim needing one would use 0.01 (none of the defaults does)


def _vs(cid: str, paper: str, statement: str, a: str, b: str, path: str, relation: str, **kw: Any) -> Claim:
    return Claim(cid, paper, statement, term(a, path), term(b, path), relation, **kw)


_EDST_VS_RIGL = tuple(dict.fromkeys(_D.EDST_DESIGN + _D.DST_SINGLE_DESIGN))
_BOTH = tuple(dict.fromkeys(_D.EDST_DESIGN + _D.DST_ENSEMBLE_DESIGN))

DEFAULT_CLAIMS: tuple[Claim, ...] = (
    _vs("dpf_ge_gmp", _DPF, "DPF ≥ GMP (test accuracy, δ 0.005)", "dpf", "gmp", "test.accuracy", ">=", margin=_ACC, design=_D.DPF_DESIGN),
    _vs("dpf_gt_oneshot", _DPF, "DPF > one-shot pruning (test accuracy)", "dpf", "oneshot", "test.accuracy", ">", design=_D.DPF_DESIGN),
    Claim("retrain_helps_oneshot_more", _DPF, "Retraining gains more after one-shot pruning than after DPF (test accuracy)",
          term("oneshot_retrain", "test.accuracy") - term("oneshot", "test.accuracy"),
          term("dpf_retrain", "test.accuracy") - term("dpf", "test.accuracy"), ">", design=_D.DPF_DESIGN),
    Claim("edst_gt_tickets_acc", _FT, "EDST ensemble > its mean member (test accuracy)",
          term("edst_ensemble", "test.accuracy"), term("edst_ensemble", "test.member_accuracy_mean"), ">", design=_D.EDST_DESIGN),
    Claim("edst_gt_tickets_nll", _FT, "EDST ensemble NLL < its mean member's NLL (test)",
          term("edst_ensemble", "test.nll"), term("edst_ensemble", "test.member_nll_mean"), ">", higher_is_better=False, design=_D.EDST_DESIGN),
    _vs("edst_ge_rigl", _FT, "EDST ensemble ≥ single RigL model (test accuracy, δ 0.005)", "edst_ensemble", "rigl",
        "test.accuracy", ">=", margin=_ACC, design=_EDST_VS_RIGL),
    _vs("dst_ge_edst", _FT, "DST ensemble ≥ EDST ensemble (test accuracy, δ 0.005)", "dst_ensemble", "edst_ensemble",
        "test.accuracy", ">=", margin=_ACC, design=_BOTH),
    _vs("dst_more_diverse", _FT, "DST ensemble members disagree more than EDST members (test)", "dst_ensemble",
        "edst_ensemble", "test.disagreement", ">", design=_BOTH),
    Claim("edst_cheaper_than_dense", _FT, "EDST ensemble training FLOPs < one dense model's",
          term("edst_ensemble", "flops.training_ratio"), const(1.0), ">", higher_is_better=False, design=_D.EDST_DESIGN),
    _vs("dst_better_calibrated", _FT, "DST ensemble ECE < single RigL model's (test)", "dst_ensemble", "rigl", "test.ece",
        ">", higher_is_better=False, design=_D.DST_ENSEMBLE_DESIGN),
    _vs("edst_better_calibrated", _FT, "EDST ensemble ECE < single RigL model's (test)", "edst_ensemble", "rigl",
        "test.ece", ">", higher_is_better=False, design=_EDST_VS_RIGL),
    _vs("dst_better_ood", _FT, "DST ensemble OOD AUROC (MSP, mean over sets) > single RigL model's", "dst_ensemble", "rigl",
        "ood.mean.msp.auroc", ">", design=_D.DST_ENSEMBLE_DESIGN),
    _vs("edst_better_ood", _FT, "EDST ensemble OOD AUROC (MSP, mean over sets) > single RigL model's", "edst_ensemble",
        "rigl", "ood.mean.msp.auroc", ">", design=_EDST_VS_RIGL),
    _vs("chunked_matches_backprop", _LOCAL, "Chunked local updates ≈ end-to-end backprop from the same warmup "
        "(test accuracy, δ 0.005)", "local_chunked", "dense", "test.accuracy", "≈", margin=_ACC),
    _vs("chunked_gt_greedy", _LOCAL, "Chunked local updates > greedy local updates (test accuracy)", "local_chunked",
        "local_greedy", "test.accuracy", ">"),
)
