"""Golden values for src/eval/population.rs (tests/population.rs).

    population_reference.py OUT.json [SEED]

Draws fixed sets of per-model margins for a number of "examples" with
NumPy (seeded), and computes every population statistic with the
NumPy / SciPy / scikit-learn calls that define it, as literally as possible:

- KLoM: the binned KL divergence of data-unlearning-bench
  (unlearning_bench/eval.py::compute_binned_KL_div, Georgiev et al., ICLR
  2025), restated step by step: np.clip, np.linspace, np.digitize,
  scipy.stats.entropy.
- U-LiRA (Hayes et al., SaTML 2025): leave-one-out Gaussian fits (np.mean,
  np.std, floored at 1e-6) and scipy.stats.norm.logpdf; ROC curves with
  sklearn.metrics.roc_curve(drop_intermediate=False) and sklearn.metrics.auc;
  TPR at FPR as max(tpr[fpr <= x]).
- The NeurIPS 2023 unlearning challenge's per-example epsilon, H score,
  forgetting quality and final score (Triantafillou et al., arXiv:2406.09073,
  section 3), written out as defined there.
- np.percentile, np.mean, np.std(ddof=1).

Writes JSON: floats as Python floats (repr round-trips float64 exactly), the
non-finite ones as the strings "nan", "inf", "-inf".
"""

import json
import math
import sys
import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import auc, roc_curve

warnings.simplefilter("ignore")  # 0/0 in entropy, log of <= 0, one-class ROC

ULIRA_MIN_STD = 1e-6
CHALLENGE_DELTA = 0.01
TPR_AT = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
PERCENTILES = [0.0, 1.0, 5.0, 25.0, 33.3, 50.0, 75.0, 95.0, 99.0, 100.0]


def num(x):
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def nums(a):
    return [num(v) for v in np.asarray(a, dtype=np.float64).ravel()]


# ------------------------------------------------------------------ KLoM
def binned_kl(unlearned, oracle, bin_count=20, eps=1e-5, clip_lo=-100, clip_hi=100):
    """KL(unlearned || oracle) of shared-bin histograms, step by step as in
    data-unlearning-bench's compute_binned_KL_div (called there with the
    unlearned margins first). Returns the value, the edges and the counts."""
    u = np.clip(unlearned, clip_lo, clip_hi)
    o = np.clip(oracle, clip_lo, clip_hi)
    start = min(u.min(), o.min())
    end = max(u.max(), o.max())
    if start >= end:
        end = start + 1
    edges = np.linspace(start, end, bin_count + 1)
    u_idx = np.digitize(u, edges)  # 1-based bin of each margin
    o_idx = np.digitize(o, edges)
    u_counts = np.array([np.sum(u_idx == i) for i in range(1, bin_count + 1)])
    o_counts = np.array([np.sum(o_idx == i) for i in range(1, bin_count + 1)])
    u_total, o_total = u_counts.sum(), o_counts.sum()
    p = u_counts / u_total if u_total > 0 else np.zeros_like(u_counts, dtype=float)
    q = o_counts / o_total if o_total > 0 else np.zeros_like(o_counts, dtype=float)
    q_safe = np.where(p > 0, np.maximum(q, eps), q)
    value = stats.entropy(pk=p, qk=q_safe)
    return float(value), edges, u_counts, o_counts


# ---------------------------------------------------------------- U-LiRA
def fit(values):
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean(values)), max(float(np.std(values)), ULIRA_MIN_STD)


def ulira(positives, negatives):
    """Leave-one-out statistics logpdf_in(x) - logpdf_out(x), with for each
    the fits used (for the test's error bound): [x, mu_in, sd_in, n_in,
    max|in|, mu_out, sd_out, n_out, max|out|, statistic]."""
    if len(positives) < 3 or len(negatives) < 3:
        return None

    def stat(x, side_in, side_out):
        (mi, si), (mo, so) = fit(side_in), fit(side_out)
        s = stats.norm.logpdf(x, mi, si) - stats.norm.logpdf(x, mo, so)
        return [float(x), mi, si, len(side_in), float(np.max(np.abs(side_in))),
                mo, so, len(side_out), float(np.max(np.abs(side_out))), float(s)]

    pos = [stat(x, np.delete(positives, i), negatives) for i, x in enumerate(positives)]
    neg = [stat(x, positives, np.delete(negatives, j)) for j, x in enumerate(negatives)]
    return pos, neg


def roc_entry(scores, labels):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "fpr": nums(fpr),
        "tpr": nums(tpr),
        "auc": num(auc(fpr, tpr)),
        "tpr_at": [num(np.max(tpr[fpr <= x])) for x in TPR_AT],
    }


# ------------------------------------------------------------- challenge
def challenge_epsilon(unlearned, retrained, delta=CHALLENGE_DELTA):
    """Returns epsilon and the largest |ln a| + |ln b| of the finite attack
    epsilons (for the test's error bound)."""
    unlearned = np.asarray(unlearned, dtype=np.float64)
    retrained = np.asarray(retrained, dtype=np.float64)
    thresholds = list(np.unique(np.concatenate([unlearned, retrained]))) + [np.inf]
    best, cond = None, 0.0
    for t in thresholds:
        fpr = np.count_nonzero(retrained >= t) / retrained.size
        fnr = np.count_nonzero(unlearned < t) / unlearned.size
        for a_fpr, a_fnr in [(fpr, fnr), (1 - fpr, 1 - fnr)]:
            if a_fpr == 0 and a_fnr == 0:
                e = np.inf
            elif a_fpr == 0 or a_fnr == 0:
                continue
            else:
                arg1 = 1 - delta - a_fpr
                arg2 = 1 - delta - a_fnr
                e1 = np.log(arg1) - np.log(a_fnr) if arg1 > 0 else np.nan
                e2 = np.log(arg2) - np.log(a_fpr) if arg2 > 0 else np.nan
                if np.isnan(e1) and np.isnan(e2):
                    e = np.inf
                else:
                    e = np.nanmax([e1, e2])
                if not np.isnan(e1):
                    cond = max(cond, abs(np.log(arg1)) + abs(np.log(a_fnr)))
                if not np.isnan(e2):
                    cond = max(cond, abs(np.log(arg2)) + abs(np.log(a_fpr)))
            best = e if best is None else max(best, e)
    return (0.0 if best is None else float(best)), float(cond)


EDGES = np.arange(0.0, 6.5, 0.5)  # [0, 0.5, ..., 6.0], 13 edges


def example_score(eps):
    n = int(np.digitize(eps, EDGES))
    return n, 2.0 / 2**n


# ----------------------------------------------------------------- cases
def cases(rng):
    out = []

    def add(name, u, o):
        out.append((name, np.asarray(u, dtype=np.float64), np.asarray(o, dtype=np.float64)))

    add("overlap", rng.normal(2.0, 1.0, 100), rng.normal(2.3, 1.2, 100))
    add("separated", rng.normal(5.0, 0.5, 50), rng.normal(-5.0, 0.5, 40))
    add("separated_reversed", rng.normal(-5.0, 0.5, 30), rng.normal(5.0, 0.5, 35))
    add("identical_values", np.full(10, 1.5), np.full(12, 1.5))
    add("identical_samples", *(lambda a: (a, a.copy()))(rng.normal(0.0, 3.0, 25)))
    big = rng.normal(0.0, 80.0, 60)
    big[:4] = [150.0, -150.0, 1e3, -2.5e4]
    add("beyond_clip", big, rng.normal(30.0, 60.0, 45))
    add("all_clipped_high", np.full(5, 300.0), rng.normal(120.0, 5.0, 6))
    add("ties", np.round(rng.normal(0.0, 1.0, 30) * 4) / 4,
        np.round(rng.normal(0.3, 1.0, 25) * 4) / 4)
    # The maximum, several times over and on both sides, sits on the top edge.
    top = rng.normal(0.0, 1.0, 20)
    top[:3] = 3.0
    oracle_top = rng.normal(0.5, 1.0, 20).clip(max=3.0)
    oracle_top[:2] = 3.0
    add("max_at_top_edge", top, oracle_top)
    # Every unlearned margin at the pooled maximum: no unlearned mass (NaN).
    add("unlearned_all_at_top", np.full(4, 2.0), rng.normal(0.0, 1.0, 6).clip(max=1.9))
    # Every oracle margin at the pooled maximum: no oracle mass, eps floors.
    add("oracle_all_at_top", rng.normal(0.0, 1.0, 8).clip(max=1.9), np.full(5, 2.0))
    add("n3", rng.normal(1.0, 1.0, 3), rng.normal(1.5, 1.0, 3))
    add("n2", rng.normal(1.0, 1.0, 2), rng.normal(1.5, 1.0, 7))
    add("unequal_3_100", rng.normal(0.0, 1.0, 3), rng.normal(0.5, 2.0, 100))
    add("unequal_100_3", rng.normal(0.0, 1.0, 100), rng.normal(-0.5, 0.1, 3))
    add("tiny_spread", 7.0 + rng.normal(0.0, 1e-8, 10), 7.0 + rng.normal(0.0, 1e-8, 10))
    for k in range(20):
        nu, nr = rng.integers(3, 101, 2)
        shift = rng.choice([0.0, 0.2, 1.0, 3.0])
        add(f"random{k}", rng.normal(shift, rng.uniform(0.3, 3.0), nu),
            rng.normal(0.0, rng.uniform(0.3, 3.0), nr))
    return out


def main():
    path = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    rng = np.random.default_rng(seed)
    result = {"seed": seed, "tpr_at": TPR_AT, "percentiles": PERCENTILES,
              "delta": CHALLENGE_DELTA, "examples": []}
    pooled_scores, pooled_labels, kloms, epsilons = [], [], [], []
    for name, u, o in cases(rng):
        value, edges, uc, oc = binned_kl(u, o)
        entry = {
            "name": name,
            "unlearned": nums(u),
            "oracle": nums(o),
            "klom": num(value),
            "edges": nums(edges),
            "counts_unlearned": [int(c) for c in uc],
            "counts_oracle": [int(c) for c in oc],
        }
        if not math.isnan(value):
            kloms.append(value)
        lira = ulira(u, o)
        if lira is None:
            entry["ulira"] = None
        else:
            pos, neg = lira
            scores = [r[-1] for r in pos] + [r[-1] for r in neg]
            labels = [1] * len(pos) + [0] * len(neg)
            entry["ulira"] = {"pos": [nums(r) for r in pos], "neg": [nums(r) for r in neg],
                              "roc": roc_entry(np.array(scores), np.array(labels))}
            pooled_scores += scores
            pooled_labels += labels
        eps, cond = challenge_epsilon(u, o)
        n, h = example_score(eps)
        epsilons.append(eps)
        entry["epsilon"] = num(eps)
        entry["epsilon_cond"] = num(cond)
        entry["bin"] = n
        entry["score"] = num(h)
        result["examples"].append(entry)

    result["pooled_roc"] = roc_entry(np.array(pooled_scores), np.array(pooled_labels))
    # Forgetting quality and the final score, with drawn accuracies (%).
    f = float(np.mean([example_score(e)[1] for e in epsilons]))
    ra_u, ra_r, ta_u, ta_r = (float(v) for v in rng.uniform(60.0, 100.0, 4))
    result["forgetting_quality"] = num(f)
    result["accuracies"] = [ra_u, ra_r, ta_u, ta_r]
    result["challenge_score"] = num(f * (ra_u / ra_r) * (ta_u / ta_r))
    # Percentiles of the finite KLoMs, and of a few plain arrays.
    arrays = {
        "klom": np.array(kloms),
        "normal": rng.normal(0.0, 10.0, 57),
        "ties": np.round(rng.normal(0.0, 2.0, 40)),
        "one": np.array([3.25]),
        "two": rng.normal(0.0, 1.0, 2),
    }
    result["summaries"] = [
        {
            "name": name,
            "values": nums(a),
            "percentiles": [num(np.percentile(a, q)) for q in PERCENTILES],
            "mean": num(np.mean(a)),
            "std": num(np.std(a, ddof=1)),
        }
        for name, a in arrays.items()
    ]
    # ROC curves of raw scores with many ties (integers), as sklearn draws them.
    rocs = []
    for n in [5, 40, 200]:
        scores = rng.integers(0, 6, n).astype(np.float64)
        labels = rng.integers(0, 2, n)
        labels[0], labels[1] = 0, 1  # both classes present
        rocs.append({"scores": nums(scores), "labels": [int(v) for v in labels],
                     **roc_entry(scores, labels)})
    result["rocs"] = rocs
    with open(path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
