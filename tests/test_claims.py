"""Paper-claim statistics (``sparse_core.claims``): the paired t interval, the verdict rules, pairing by seed,
orientation of lower-is-better metrics, aggregation over seeds and the JSON / markdown outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from sparse_core.claims import (
    COLUMNS,
    DEFAULT_CLAIMS,
    Claim,
    aggregate,
    boundary_distance,
    claims_json,
    claims_markdown,
    const,
    evaluate_claims,
    paired_t_interval,
    seeds_needed,
    term,
    verdict,
)

from sparse_core.recipes import RATIOS

ACC = "test.accuracy"


def per_seed(path: str = ACC, **models: list[float]) -> dict:
    """``model -> seed -> {"test": {"accuracy": v}}`` (or another dotted path), seeds 0, 1, 2, ..."""
    out: dict = {}
    for model, values in models.items():
        out[model] = {}
        for seed, v in enumerate(values):
            node = out[model].setdefault(seed, {})
            *inner, leaf = path.split(".")
            for key in inner:
                node = node.setdefault(key, {})
            node[leaf] = v
    return out


def one(claim: Claim, data: dict) -> dict:
    table = evaluate_claims([claim], data)
    assert list(table.columns) == list(COLUMNS)
    return table.iloc[0].to_dict()


def vs(relation: str, margin: float = 0.0, higher_is_better: bool = True, path: str = ACC) -> Claim:
    return Claim("a_vs_b", "Test 2024", f"A {relation} B", term("a", path), term("b", path), relation,
                 higher_is_better=higher_is_better, margin=margin)


# --- paired_t_interval --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 5, 10])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_interval_matches_scipy(n: int, confidence: float) -> None:
    d = np.random.default_rng(n).normal(0.01, 0.02, size=n)
    mean, std, lo, hi = paired_t_interval(list(d), confidence)
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(confidence)
    assert mean == pytest.approx(d.mean())
    assert std == pytest.approx(d.std(ddof=1))
    assert (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-9)


def test_interval_one_seed_is_infinite() -> None:
    assert paired_t_interval([0.3]) == (0.3, 0.0, -math.inf, math.inf)


def test_interval_zero_variance_collapses() -> None:
    mean, std, lo, hi = paired_t_interval([0.02, 0.02, 0.02, 0.02])
    assert std == 0.0 and lo == hi == mean == pytest.approx(0.02)


@pytest.mark.parametrize("bad", [[], [0.1, math.nan], [math.inf, 0.2]])
def test_interval_rejects_bad_input(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="nan|inf|at least one"):
        paired_t_interval(bad)


# --- verdict rules -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("lo", "hi", "relation", "margin", "expected"),
    [
        (0.001, 0.02, ">", 0.0, "holds"),
        (-0.02, -0.001, ">", 0.0, "contradicted"),
        (-0.01, 0.01, ">", 0.0, "inconclusive"),
        (-0.004, 0.01, ">=", 0.005, "holds"),  # possibly worse, but by less than the margin
        (-0.006, 0.01, ">=", 0.005, "inconclusive"),
        (-0.02, -0.004, ">=", 0.005, "inconclusive"),  # worse, yet maybe within the margin
        (-0.02, -0.006, ">=", 0.005, "contradicted"),
        (-0.004, 0.004, "≈", 0.005, "holds"),
        (-0.004, 0.006, "≈", 0.005, "inconclusive"),
        (0.006, 0.02, "≈", 0.005, "contradicted"),
        (-0.02, -0.006, "≈", 0.005, "contradicted"),
        (-math.inf, math.inf, ">", 0.0, "inconclusive"),
        (-math.inf, math.inf, ">=", 0.005, "inconclusive"),
        (-math.inf, math.inf, "≈", 0.005, "inconclusive"),
    ],
)
def test_verdict_rules(lo: float, hi: float, relation: str, margin: float, expected: str) -> None:
    assert verdict(lo, hi, relation, margin) == expected


def test_verdict_rejects_unknown_relation_and_negative_margin() -> None:
    with pytest.raises(ValueError):
        verdict(0.0, 1.0, "<", 0.0)
    with pytest.raises(ValueError):
        verdict(0.0, 1.0, ">=", -0.1)


def test_claim_validates_relation_and_margin() -> None:
    with pytest.raises(ValueError, match="relation"):
        vs("<")
    with pytest.raises(ValueError, match="margin"):
        vs(">=", margin=-0.01)
    with pytest.raises(ValueError, match="margin"):
        vs("≈", margin=0.0)


# --- synthetic per-seed numbers with known answers -----------------------------------------------

A = [0.90, 0.91, 0.92]


@pytest.mark.parametrize(
    ("relation", "margin", "b", "expected"),
    [
        (">", 0.0, [0.88, 0.89, 0.90], "holds"),
        (">", 0.0, [0.92, 0.93, 0.94], "contradicted"),
        (">", 0.0, [0.89, 0.92, 0.915], "inconclusive"),  # differences +0.01, -0.01, +0.005
        (">=", 0.005, [0.902, 0.911, 0.9215], "holds"),  # A slightly worse, but within δ
        (">", 0.0, [0.902, 0.911, 0.9215], "contradicted"),  # ... which superiority rejects
        (">=", 0.005, [0.92, 0.931, 0.939], "contradicted"),  # worse by ~0.02 > δ
        (">=", 0.005, [0.89, 0.92, 0.915], "inconclusive"),
        ("≈", 0.005, [0.899, 0.911, 0.9195], "holds"),
        ("≈", 0.005, [0.88, 0.889, 0.901], "contradicted"),  # A better by ~0.02 > δ
        ("≈", 0.005, [0.92, 0.931, 0.939], "contradicted"),  # A worse by ~0.02 > δ
        ("≈", 0.005, [0.89, 0.92, 0.915], "inconclusive"),
    ],
)
def test_known_verdicts(relation: str, margin: float, b: list[float], expected: str) -> None:
    row = one(vs(relation, margin), per_seed(a=A, b=b))
    d = np.subtract(A, b)
    assert row["verdict"] == expected
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2] and row["note"] == ""
    assert row["diff_mean"] == pytest.approx(d.mean()) and row["diff_std"] == pytest.approx(d.std(ddof=1))
    assert row["lhs_mean"] == pytest.approx(np.mean(A)) and row["lhs_std"] == pytest.approx(np.std(A, ddof=1))
    assert row["rhs_mean"] == pytest.approx(np.mean(b)) and row["rhs_std"] == pytest.approx(np.std(b, ddof=1))


def test_lower_is_better_flips_the_sign() -> None:
    data = per_seed("test.nll", a=[0.30, 0.31, 0.33], b=[0.35, 0.37, 0.38])  # A has the lower NLL: A is better
    better = one(vs(">", higher_is_better=False, path="test.nll"), data)
    assert better["verdict"] == "holds" and better["metric_direction"] == "lower"
    assert better["diff_mean"] == pytest.approx(0.16 / 3) and better["ci_low"] > 0
    assert one(vs(">", higher_is_better=True, path="test.nll"), data)["verdict"] == "contradicted"
    # B claimed better than A: contradicted once oriented.
    flipped = Claim("b_vs_a", "p", "B better", term("b", "test.nll"), term("a", "test.nll"), ">", higher_is_better=False)
    assert one(flipped, data)["verdict"] == "contradicted"


def test_single_seed_is_inconclusive() -> None:
    row = one(vs(">"), per_seed(a=[0.9], b=[0.1]))
    assert row["n"] == 1 and row["verdict"] == "inconclusive"
    assert row["ci_low"] == -math.inf and row["ci_high"] == math.inf and row["lhs_std"] == 0.0


def test_term_arithmetic() -> None:
    metrics = {"x": {"test": {"accuracy": 0.8}}, "y": {"test": {"accuracy": 0.5}}}
    t = 2 * (term("x", ACC) - term("y", ACC)) + const(0.1)
    assert t.models() == {"x", "y"}
    assert t.value(metrics.__getitem__) == pytest.approx(2 * 0.3 + 0.1)
    assert (term("x", ACC) + term("y", ACC)).value(metrics.__getitem__) == pytest.approx(1.3)


def test_difference_of_differences() -> None:
    data = per_seed(o=[0.70, 0.71, 0.72], o_r=[0.80, 0.80, 0.83], d=[0.85, 0.86, 0.86], d_r=[0.86, 0.86, 0.87])
    claim = Claim("r", "p", "s", term("o_r", ACC) - term("o", ACC), term("d_r", ACC) - term("d", ACC), ">")
    row = one(claim, data)
    assert row["lhs_mean"] == pytest.approx(0.1) and row["rhs_mean"] == pytest.approx(0.02 / 3)
    assert row["verdict"] == "holds"


# --- pairing -------------------------------------------------------------------------------------

def test_only_shared_seeds_are_paired() -> None:
    data = per_seed(a=[0.90, 0.91, 0.92, 0.5], b=[0.88, 0.89, 0.90])
    del data["b"][2]
    row = one(vs(">"), data)
    assert row["n"] == 2 and row["seeds"] == [0, 1]
    assert row["diff_mean"] == pytest.approx(0.02) and "2" in row["note"] and "3" in row["note"]


def test_missing_model_is_not_tested() -> None:
    row = one(vs(">"), per_seed(a=A))
    assert row["verdict"] == "not tested" and row["n"] == 0 and row["seeds"] == []
    assert "b" in row["note"]
    assert all(math.isnan(row[c]) for c in ("lhs_mean", "rhs_std", "diff_mean", "ci_low", "ci_high"))


def test_no_shared_seed_is_not_tested() -> None:
    data = {"a": {0: {"test": {"accuracy": 0.9}}}, "b": {1: {"test": {"accuracy": 0.8}}}}
    assert one(vs(">"), data)["verdict"] == "not tested"


def test_missing_path_names_model_seed_and_path() -> None:
    data = per_seed(dpf=A, gmp=A)
    del data["gmp"][1]["test"]["accuracy"]
    claim = Claim("c", "p", "s", term("dpf", ACC), term("gmp", ACC), ">")
    with pytest.raises(KeyError, match=r"gmp.*test\.accuracy") as err:
        evaluate_claims([claim], data)
    assert "seed 1" in str(err.value)


def test_duplicate_ids_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        evaluate_claims([vs(">"), vs(">=", 0.005)], per_seed(a=A, b=A))


# --- aggregate -----------------------------------------------------------------------------------

def test_aggregate_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    vals = rng.random((3, 3))
    runs = {s: {"run": "dpf", "seed_name": f"s{s}", "test": {"accuracy": vals[s, 0], "nll": vals[s, 1]},
                "ood": {"mean": {"msp": {"auroc": vals[s, 2]}}}, "members": 3} for s in (2, 0, 1)}
    runs[1]["extra"] = {"only_here": 0.5}
    runs[2]["extra"] = {"only_here": 0.7}
    agg = aggregate(runs)
    assert agg["n"] == 3 and agg["seeds"] == [0, 1, 2]
    assert agg["mean"]["test"]["accuracy"] == pytest.approx(vals[:, 0].mean())
    assert agg["std"]["test"]["nll"] == pytest.approx(vals[:, 1].std(ddof=1))
    assert agg["mean"]["ood"]["mean"]["msp"]["auroc"] == pytest.approx(vals[:, 2].mean())
    assert agg["mean"]["members"] == 3.0 and agg["std"]["members"] == 0.0
    assert agg["mean"]["extra"]["only_here"] == pytest.approx(0.6)  # over the seeds that have it
    assert agg["std"]["extra"]["only_here"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert agg["mean"]["run"] == "dpf" and agg["std"]["run"] == "dpf"  # identical strings copied
    assert "seed_name" not in agg["mean"] and "seed_name" not in agg["std"]  # differing strings dropped
    assert agg["per_seed"] == {f"s{s}": runs[s] for s in (0, 1, 2)}
    json.dumps(agg, allow_nan=False)


def test_aggregate_one_seed_has_zero_std() -> None:
    agg = aggregate({7: {"test": {"accuracy": 0.9}}})
    assert agg["n"] == 1 and agg["seeds"] == [7]
    assert agg["mean"] == {"test": {"accuracy": 0.9}} and agg["std"] == {"test": {"accuracy": 0.0}}


def test_aggregate_rejects_non_finite_naming_seed_and_key() -> None:
    with pytest.raises(ValueError, match=r"seed 3.*test\.nll"):
        aggregate({1: {"test": {"nll": 0.3}}, 3: {"test": {"nll": math.nan}}})
    with pytest.raises(ValueError):
        aggregate({})


# --- outputs -------------------------------------------------------------------------------------

def test_json_and_markdown() -> None:
    claims = [vs(">"), Claim("missing", "Q 2020", "C > A", term("c", ACC), term("a", ACC), ">"),
              Claim("single", "R 2021", "A > 0.5", term("a", ACC), const(0.5), ">")]
    data = per_seed(a=A, b=[0.88, 0.89, 0.90])
    table = evaluate_claims(claims, data)
    table_single = evaluate_claims(claims[2:], {"a": {0: {"test": {"accuracy": 0.9}}}})
    out = claims_json(table)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text)["missing"] == {"verdict": "not tested", "n": 0, "diff_mean": None, "ci_low": None,
                                           "ci_high": None, "lhs_mean": None, "rhs_mean": None, "half_width": None,
                                           "n_needed": None, "off_paper": False,
                                           "design_vs_paper": "no paper ratio declared", "design": {}}
    assert out["a_vs_b"]["verdict"] == "holds" and out["a_vs_b"]["n"] == 3
    assert claims_json(table_single)["single"]["ci_low"] is None
    json.dumps(claims_json(table_single), allow_nan=False)
    md = claims_markdown(table)
    assert md.count("\n") == 2 + len(claims)
    for cid in ("a_vs_b", "missing", "single"):
        assert cid in md
    assert "holds" in md and "not tested" in md and "—" in md and "95% CI" in md
    assert "∞" in claims_markdown(table_single)


# --- the default claims ---------------------------------------------------------------------------

PAPER_LIKE = {  # per-model means chosen so that every default claim holds
    "dense": {ACC: 0.851}, "dpf": {ACC: 0.90}, "gmp": {ACC: 0.895}, "oneshot": {ACC: 0.80},
    "oneshot_retrain": {ACC: 0.88}, "dpf_retrain": {ACC: 0.905}, "rigl": {ACC: 0.90, "test.ece": 0.03,
                                                                          "ood.mean.msp.auroc": 0.80},
    "edst_ensemble": {ACC: 0.91, "test.member_accuracy_mean": 0.89, "test.nll": 0.30, "test.member_nll_mean": 0.35,
                      "test.disagreement": 0.05, "flops.training_ratio": 0.4, "test.ece": 0.015,
                      "ood.mean.msp.auroc": 0.88},
    "dst_ensemble": {ACC: 0.92, "test.disagreement": 0.08, "test.ece": 0.01, "ood.mean.msp.auroc": 0.90},
    "local_chunked": {ACC: 0.85}, "local_greedy": {ACC: 0.80},
}


def default_data(sign: float = 1.0) -> dict:
    """Every default model, 3 seeds, every path a default claim reads; a shared seed effect plus small noise."""
    rng = np.random.default_rng(1)
    paths = {p for c in DEFAULT_CLAIMS for t in (c.lhs, c.rhs) for _, _, p in t.parts}
    out: dict = {}
    for model, means in PAPER_LIKE.items():
        out[model] = {}
        for seed in range(3):
            metrics: dict = {}
            for path in sorted(paths):
                value = 0.5 + sign * (means.get(path, 0.5) - 0.5) + 0.003 * seed + rng.normal(0, 0.0005)
                node = metrics
                *inner, leaf = path.split(".")
                for key in inner:
                    node = node.setdefault(key, {})
                node[leaf] = float(value)
            out[model][seed] = metrics
    return out


def test_default_claims_ids_unique_and_models_named() -> None:
    ids = [c.id for c in DEFAULT_CLAIMS]
    assert len(ids) == 15 and len(set(ids)) == len(ids)
    assert set().union(*(c.models() for c in DEFAULT_CLAIMS)) == set(PAPER_LIKE)


def test_default_claims_hold_on_paper_like_numbers() -> None:
    table = evaluate_claims(DEFAULT_CLAIMS, default_data())
    assert list(table["id"]) == [c.id for c in DEFAULT_CLAIMS]
    assert (table["n"] == 3).all()
    assert dict(zip(table["id"], table["verdict"])) == {c.id: "holds" for c in DEFAULT_CLAIMS}
    json.dumps(claims_json(table), allow_nan=False)


def test_default_claims_fail_on_reversed_numbers() -> None:
    """Mirroring every mean around 0.5 reverses each comparison; the two claims a mirror cannot reverse (a bound
    of 1.0, an equivalence) are broken by hand. No default claim may then hold, and every ">" is contradicted."""
    data = default_data(sign=-1.0)
    for seed in range(3):
        data["edst_ensemble"][seed]["flops"]["training_ratio"] += 1.2  # 1.6 dense trainings
        data["dense"][seed]["test"]["accuracy"] += 0.02  # backprop 2 points better than chunked
    table = evaluate_claims(DEFAULT_CLAIMS, data)
    assert (table["verdict"] != "holds").all()
    assert (table.loc[table["relation"] != ">=", "verdict"] == "contradicted").all()


def test_default_claims_with_a_profile_missing_methods() -> None:
    data = {m: v for m, v in default_data().items() if m not in ("local_chunked", "local_greedy", "dense")}
    table = evaluate_claims(DEFAULT_CLAIMS, data).set_index("id")
    assert table.loc["chunked_gt_greedy", "verdict"] == "not tested"
    assert "local_chunked" in table.loc["chunked_matches_backprop", "note"]
    assert table.loc["dpf_ge_gmp", "verdict"] == "holds"


def test_differences_equal_up_to_rounding_are_zero_not_significant():
    # An ensemble of identical members: accuracy 7/60 computed two ways differs by ~1e-17.
    a, b = 7 / 60, sum([7 / 60] * 3) / 3
    per_seed = {"e": {s: {"test": {"accuracy": a, "member_accuracy_mean": b}} for s in (0, 1, 2)}}
    claim = Claim("c", "p", "s", term("e", "test.accuracy"), term("e", "test.member_accuracy_mean"), ">")
    row = evaluate_claims([claim], per_seed).iloc[0]
    assert row["diff_mean"] == 0.0 and row["verdict"] == "inconclusive"


# --- design vs paper, power ----------------------------------------------------------------------

def _edst_claim(**kw) -> Claim:
    return Claim("e", "FT", "E > R", term("a", ACC), term("b", ACC), ">", design=("edst_budget", "edst_growth"), **kw)


def test_an_off_paper_design_qualifies_the_verdict_and_names_each_ratio() -> None:
    data = per_seed(a=[0.91, 0.92, 0.93], b=[0.88, 0.89, 0.90])
    paper = {"edst_budget": 1.8, "edst_growth": "gradient"}
    on = evaluate_claims([_edst_claim()], data, design=paper).iloc[0]
    assert on["verdict"] == "holds" and on["design_vs_paper"] == "paper's ratios" and not on["off_paper"]
    off = evaluate_claims([_edst_claim()], data, design={**paper, "edst_budget": 1.0}).iloc[0]
    assert off["verdict"] == "holds (off-paper design)" and off["off_paper"]
    assert off["design_vs_paper"] == "EDST budget 1.0× (paper 1.8×)"
    both = evaluate_claims([_edst_claim()], data, design={"edst_budget": 1.0, "edst_growth": "random"}).iloc[0]
    assert both["design_vs_paper"] == "EDST budget 1.0× (paper 1.8×); EDST growth random (paper gradient)"
    # within the 5% tolerance of rounding to whole epochs: still the paper's (22 / 12 = 1.83)
    assert not evaluate_claims([_edst_claim()], data, design={**paper, "edst_budget": 22 / 12}).iloc[0]["off_paper"]
    unknown = evaluate_claims([_edst_claim()], data, design={}).iloc[0]  # a value the profile cannot tell
    assert unknown["off_paper"] and "EDST budget unknown" in unknown["design_vs_paper"]
    row = claims_json(evaluate_claims([_edst_claim()], data, design={**paper, "edst_budget": 1.0}))["e"]
    assert row["design"]["edst_budget"] == {"profile": 1.0, "paper": 1.8, "matches": False,
                                            "source": RATIOS["edst_budget"].source}
    assert row["off_paper"] and row["verdict"].endswith("(off-paper design)")
    assert "Design vs paper" in claims_markdown(evaluate_claims([_edst_claim()], data, design=paper))


def test_a_claim_naming_an_unknown_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown design ratio"):
        Claim("x", "P", "A > B", term("a", ACC), term("b", ACC), ">", design=("no_such_ratio",))


def test_every_default_freetickets_claim_declares_its_design_and_the_default_profile_keeps_the_edst_ratios() -> None:
    from sparse_core.config import load_params
    from sparse_core.recipes import profile_design

    for claim in DEFAULT_CLAIMS:
        if "FreeTickets" in claim.paper:
            assert "edst_budget" in claim.design or "dst_member_budget" in claim.design, claim.id
    design = profile_design(load_params("params.yaml"))
    assert design["edst_budget"] == pytest.approx(1.8) and design["edst_growth"] == "gradient"
    table = evaluate_claims(DEFAULT_CLAIMS, default_data(), design=design).set_index("id")
    assert not table.loc["edst_gt_tickets_acc", "off_paper"]  # EDST alone: every ratio the paper's
    assert "DST drop schedule cosine (paper constant)" in table.loc["edst_ge_rigl", "design_vs_paper"]


def test_half_width_and_seeds_needed() -> None:
    # d = 0.01 ± 0.01 (std) over 3 seeds: half-width t(0.975, 2) * 0.01 / sqrt(3) = 0.0248, inconclusive for ">".
    data = per_seed(a=[0.90, 0.91, 0.92], b=[0.90, 0.90, 0.90])
    row = evaluate_claims([vs(">")], data).iloc[0]
    assert row["verdict"] == "inconclusive"
    assert row["half_width"] == pytest.approx(stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3))
    # the smallest n with t(0.975, n-1) * 0.01 / sqrt(n) < 0.01 is 7 (t = 2.447, 2.447/sqrt(7) = 0.925)
    assert row["n_needed"] == 7 == seeds_needed(0.01, 0.01, ">", 0.0)
    assert seeds_needed(0.01, 0.01, ">", 0.0) - 1 == 6 and stats.t.ppf(0.975, 5) * 0.01 / math.sqrt(6) >= 0.01
    assert "needs about n = 7" in claims_markdown(evaluate_claims([vs(">")], data))
    # ">=" with margin: the nearest boundary is -δ; "≈": δ - |mean|
    assert boundary_distance(-0.002, ">=", 0.005) == pytest.approx(0.003)
    assert boundary_distance(0.002, "≈", 0.005) == pytest.approx(0.003)
    assert seeds_needed(0.0, 0.01, ">", 0.0) is None and seeds_needed(0.01, 0.0, ">", 0.0) is None
    decided = evaluate_claims([vs(">")], per_seed(a=A, b=[0.88, 0.89, 0.90])).iloc[0]
    assert decided["verdict"] == "holds" and decided["n_needed"] is None
