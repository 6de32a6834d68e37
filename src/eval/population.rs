//! Population statistics of an unlearning evaluation: quantities computed
//! per example over *many* models (several unlearned models, several
//! retrained oracles), then summarised over the forget set.
//!
//! - **KLoM** ([`klom`], [`KlomBins`]): the binned KL divergence of the
//!   unlearned models' margins from the oracles' margins (Georgiev et al.,
//!   "Attribute-to-Delete: Machine Unlearning via Datamodel Matching", ICLR
//!   2025; data-unlearning-bench `unlearning_bench/eval.py::compute_binned_KL_div`),
//!   summarised by [`percentile`]s over the forget set.
//! - **U-LiRA** ([`ulira_example`], [`roc`], [`Roc`]): the per-example
//!   likelihood-ratio attack of Hayes et al., "Inexact Unlearning Needs More
//!   Careful Evaluations to Avoid a False Sense of Privacy" (SaTML 2025), built
//!   on LiRA (Carlini et al., "Membership Inference Attacks From First
//!   Principles", IEEE S&P 2022), read off a ROC curve.
//! - **The NeurIPS 2023 unlearning challenge score** ([`challenge_epsilon`],
//!   [`challenge_example_score`], [`forgetting_quality`], [`challenge_score`]):
//!   Triantafillou et al., "Are we making progress in unlearning? Findings
//!   from the first NeurIPS unlearning competition", arXiv:2406.09073, §3.
//! - [`mean_std`] for the usual "mean ± std over seeds" summaries.
//!
//! Everything is plain `f64` arithmetic on slices, with no dependency. The
//! operations follow the NumPy / SciPy / scikit-learn code that defines each
//! quantity step by step, sums included: [`pairwise_sum`] is NumPy's
//! summation, so on the same machine the results usually agree with the
//! references to the last bit (tests/population.rs bounds the difference
//! without relying on that).
//!
//! Inputs must be free of NaN; where a reference would fail (empty input, a
//! percentile outside [0, 100]) the result is NaN, as documented per item.

/// NumPy's float64 sum (`np.sum`, `np.add.reduce` of a contiguous array):
/// pairwise summation (numpy `_core/src/umath/loops_utils.h.src`,
/// `pairwise_sum`): fewer than 8 terms are added in order from 0; up to 128
/// terms go into 8 interleaved partial sums, combined as
/// `((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))`, then the remainder is added in
/// order; longer arrays are split at half the length rounded down to a
/// multiple of 8 and both halves summed recursively. Its error bound grows
/// with `log n` rather than `n` (Higham, *Accuracy and Stability of
/// Numerical Algorithms*, §4.2).
pub fn pairwise_sum(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 8 {
        let mut sum = 0.0;
        for &v in values {
            sum += v;
        }
        sum
    } else if n <= 128 {
        let mut r = [0f64; 8];
        r.copy_from_slice(&values[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += values[i + j];
            }
            i += 8;
        }
        let mut sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &values[i..] {
            sum += v;
        }
        sum
    } else {
        let half = n / 2;
        let half = half - half % 8;
        pairwise_sum(&values[..half]) + pairwise_sum(&values[half..])
    }
}

/// `np.mean`: the [`pairwise_sum`] divided by the count (NaN when empty).
fn mean(values: &[f64]) -> f64 {
    pairwise_sum(values) / values.len() as f64
}

/// `Σ (x − mean)²` as `np.var`/`np.std` form it: the deviations squared
/// elementwise, then [`pairwise_sum`]med.
fn squared_deviations(values: &[f64], mean: f64) -> f64 {
    let squares: Vec<f64> = values
        .iter()
        .map(|&x| {
            let d = x - mean;
            d * d
        })
        .collect();
    pairwise_sum(&squares)
}

// ---------------------------------------------------------------- KLoM

/// The binning of [`klom`] (KL divergence of margins), with the defaults of
/// data-unlearning-bench `compute_binned_KL_div` (Georgiev et al., ICLR
/// 2025): `bins` = 20 equal-width bins, margins clipped to `[-clip, clip]`
/// with `clip` = 100, and `eps` = 1e-5 as the floor of an oracle bin's
/// probability where the unlearned models have mass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlomBins {
    /// Number of equal-width bins (at least 1).
    pub bins: usize,
    /// Margins are clipped to `[-clip, clip]` before binning.
    pub clip: f64,
    /// Floor of the oracle's bin probability where the unlearned models
    /// have mass (keeps the divergence finite).
    pub eps: f64,
}

impl Default for KlomBins {
    /// 20 bins, clip 100, eps 1e-5: the defaults of data-unlearning-bench's
    /// `compute_binned_KL_div` (and of its `kl_from_margins`).
    fn default() -> Self {
        KlomBins {
            bins: 20,
            clip: 100.0,
            eps: 1e-5,
        }
    }
}

/// The shared histogram of one example's unlearned and oracle margins that
/// [`KlomBins::histogram`] builds: `edges` (`bins + 1` of them) and the
/// number of margins of each side in each bin, bin `i` (0-based) holding
/// the values `x` with `edges[i] <= x < edges[i + 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct KlomHistogram {
    /// `np.linspace(lo, hi, bins + 1)` of the pooled clipped margins' range.
    pub edges: Vec<f64>,
    /// Unlearned margins per bin.
    pub unlearned: Vec<usize>,
    /// Oracle margins per bin.
    pub oracle: Vec<usize>,
}

/// `np.linspace(lo, hi, num)` (endpoint included) as NumPy 2 evaluates it
/// (`_core/function_base.py`): `step = (hi − lo)/(num − 1)`, the points
/// `i·step + lo`, and the last point set to `hi` exactly; when `step`
/// underflows to 0, `(i/(num − 1))·(hi − lo) + lo` instead (gh-5437).
fn linspace(lo: f64, hi: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![0.0 * (hi - lo) + lo];
    }
    let div = (num - 1) as f64;
    let delta = hi - lo;
    let step = delta / div;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            let i = i as f64;
            if step == 0.0 {
                i / div * delta + lo
            } else {
                i * step + lo
            }
        })
        .collect();
    y[num - 1] = hi;
    y
}

/// SciPy's `special.rel_entr(x, y)`: `x ln(x/y)` for `x, y > 0`, 0 for
/// `x = 0 ≤ y`, +∞ otherwise, NaN if either is NaN.
fn rel_entr(x: f64, y: f64) -> f64 {
    if x.is_nan() || y.is_nan() {
        f64::NAN
    } else if x > 0.0 && y > 0.0 {
        x * (x / y).ln()
    } else if x == 0.0 && y >= 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

impl KlomBins {
    /// The histogram of `compute_binned_KL_div` (data-unlearning-bench
    /// `unlearning_bench/eval.py`): both sides clipped to `[-clip, clip]`;
    /// `lo`/`hi` the smallest/largest clipped margin of both sides (`hi =
    /// lo + 1` when `lo >= hi`); edges `np.linspace(lo, hi, bins + 1)`;
    /// each margin `x` counted in bin `i` (1-based) when `np.digitize`
    /// gives `i`, i.e. `edges[i−1] <= x < edges[i]`.
    ///
    /// As in the reference, a margin equal to the top edge `hi` falls in no
    /// bin: the largest pooled margin (and every copy of it) is always left
    /// out of the counts. (So an example whose unlearned margins all equal
    /// the pooled maximum has no unlearned mass, and [`klom`] is NaN.)
    ///
    /// `None` when either side is empty (the reference fails on `.min()`
    /// of an empty array) or holds a NaN (its `min`/`max` are then
    /// order-dependent). Panics when `bins` is 0.
    pub fn histogram(&self, unlearned: &[f64], oracle: &[f64]) -> Option<KlomHistogram> {
        assert!(self.bins >= 1, "KlomBins::bins must be at least 1");
        if unlearned.is_empty() || oracle.is_empty() {
            return None;
        }
        if unlearned.iter().chain(oracle).any(|x| x.is_nan()) {
            return None;
        }
        // np.clip(a, lo, hi) = minimum(maximum(a, lo), hi).
        let clip = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .map(|&x| x.max(-self.clip).min(self.clip))
                .collect()
        };
        let (u, o) = (clip(unlearned), clip(oracle));
        let lo = u.iter().chain(&o).copied().fold(f64::INFINITY, f64::min);
        let mut hi = u
            .iter()
            .chain(&o)
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        if lo >= hi {
            hi = lo + 1.0;
        }
        let edges = linspace(lo, hi, self.bins + 1);
        let count = |v: &[f64]| -> Vec<usize> {
            let mut counts = vec![0usize; self.bins];
            for &x in v {
                // np.digitize(x, edges) for non-decreasing edges:
                // searchsorted(edges, x, side="right") = #edges <= x.
                let k = edges.partition_point(|&e| e <= x);
                if (1..=self.bins).contains(&k) {
                    counts[k - 1] += 1;
                }
            }
            counts
        };
        Some(KlomHistogram {
            unlearned: count(&u),
            oracle: count(&o),
            edges,
        })
    }

    /// KLoM of one example with this binning: see [`klom`]. NaN when
    /// [`KlomBins::histogram`] is `None`.
    pub fn klom(&self, unlearned: &[f64], oracle: &[f64]) -> f64 {
        match self.histogram(unlearned, oracle) {
            Some(h) => h.divergence(self.eps),
            None => f64::NAN,
        }
    }
}

impl KlomHistogram {
    /// `KL(unlearned ‖ oracle)` of the histogram, as `compute_binned_KL_div`
    /// (data-unlearning-bench) computes it: `p = counts_unlearned / total`,
    /// `q = counts_oracle / total` (each side over its own total, all zeros
    /// when that total is 0); `q_safe = where(p > 0, max(q, eps), q)`; then
    /// `scipy.stats.entropy(p, q_safe)`, which renormalises both to sum 1
    /// and returns `Σ rel_entr(p_i, q_i)`, i.e. `Σ_{p_i>0} p_i ln(p_i/q_i)`.
    ///
    /// NaN when no unlearned margin was counted (`p` is all zeros and
    /// SciPy's renormalisation divides 0 by 0).
    pub fn divergence(&self, eps: f64) -> f64 {
        let probabilities = |counts: &[usize]| -> Vec<f64> {
            let total: usize = counts.iter().sum();
            counts
                .iter()
                .map(|&c| {
                    if total > 0 {
                        c as f64 / total as f64
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let p = probabilities(&self.unlearned);
        let q = probabilities(&self.oracle);
        let q_safe: Vec<f64> = p
            .iter()
            .zip(&q)
            .map(|(&pi, &qi)| if pi > 0.0 { qi.max(eps) } else { qi })
            .collect();
        // scipy.stats.entropy: qk / sum(qk), pk / sum(pk), sum(rel_entr).
        let (p_sum, q_sum) = (pairwise_sum(&p), pairwise_sum(&q_safe));
        let terms: Vec<f64> = p
            .iter()
            .zip(&q_safe)
            .map(|(&pi, &qi)| rel_entr(pi / p_sum, qi / q_sum))
            .collect();
        pairwise_sum(&terms)
    }
}

/// KLoM ("KL divergence of margins") of one example with the default
/// [`KlomBins`]: the binned `KL(unlearned ‖ oracle)` of the margins
/// (correct-class logit minus the log-sum-exp of the others) of the
/// unlearned models, `unlearned`, and of the models retrained without the
/// forget set, `oracle` (Georgiev et al., "Attribute-to-Delete: Machine
/// Unlearning via Datamodel Matching", ICLR 2025, §5;
/// data-unlearning-bench `unlearning_bench/eval.py::compute_binned_KL_div`,
/// called by `kl_from_margins` as `compute_binned_KL_div(unlearned,
/// oracle)`). 0 when both sides fill the bins alike; larger is worse. See
/// [`KlomBins::histogram`] for the binning (the top edge falls in no bin)
/// and [`KlomHistogram::divergence`] for the divergence.
pub fn klom(unlearned: &[f64], oracle: &[f64]) -> f64 {
    KlomBins::default().klom(unlearned, oracle)
}

/// The `q`-th percentile (`q` in [0, 100]) of `values`, as
/// `numpy.percentile(values, q)` computes it with its default `"linear"`
/// method (Hyndman & Fan's type 7): with the values sorted, the virtual
/// index `h = (n − 1)·(q/100)`, `a`, `b` the values at `⌊h⌋` and `⌊h⌋ + 1`
/// (both the last value when `h >= n − 1`) and `t = h − ⌊h⌋`, NumPy's
/// `_lerp`: `a + (b − a)·t` when `t < 0.5`, `b − (b − a)·(1 − t)` otherwise.
///
/// Georgiev et al. (ICLR 2025) summarise KLoM over a forget set by such
/// percentiles (e.g. the 95th). NaN for empty `values` or `q` outside
/// [0, 100] (where NumPy raises); `values` must be NaN-free.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() || !(0.0..=100.0).contains(&q) {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let h = (n - 1) as f64 * (q / 100.0);
    // NumPy's _get_indexes: past the last index both neighbours are the
    // last value (index -1, hence t = h + 1 in _get_gamma).
    let (below, above, t) = if h >= (n - 1) as f64 {
        (n - 1, n - 1, h + 1.0)
    } else {
        let f = h.floor();
        (f as usize, f as usize + 1, h - f)
    };
    let (a, b) = (sorted[below], sorted[above]);
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

// -------------------------------------------------------------- U-LiRA

/// Floor of the fitted standard deviations of [`ulira_example`]: `1e-6`.
///
/// Without it a side whose margins are all equal (a deterministic training
/// run, a saturated example) has std 0 and the log-likelihood ratio is
/// ±∞ or NaN, which no ROC can rank (scikit-learn rejects it). Margins come
/// from float32 logits, whose rounding is about 1e-7 of their size, so
/// spreads below 1e-6 are rounding noise rather than signal. LiRA's own
/// code adds 1e-30 to the std instead (Carlini et al. 2022,
/// `mi_lira_2021/plot.py`), which turns a degenerate side into statistics of
/// order 1e60.
pub const ULIRA_MIN_STD: f64 = 1e-6;

/// `ln √(2π)`, SciPy's `_norm_pdf_logC` (`np.log(np.sqrt(2*np.pi))`).
const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_7;

/// Mean and population std (`np.mean`, `np.std` with ddof = 0) of a side,
/// the std floored at [`ULIRA_MIN_STD`].
fn gaussian_fit(values: &[f64]) -> (f64, f64) {
    let m = mean(values);
    let std = (squared_deviations(values, m) / values.len() as f64).sqrt();
    (m, std.max(ULIRA_MIN_STD))
}

/// `scipy.stats.norm.logpdf(x, mean, std)`: `z = (x − mean)/std`, then
/// `−z²/2 − ln√(2π) − ln std` in that order.
fn norm_logpdf(x: f64, (mean, std): (f64, f64)) -> f64 {
    let z = (x - mean) / std;
    -(z * z) / 2.0 - LN_SQRT_2PI - std.ln()
}

/// The U-LiRA statistics of one target example (Hayes et al., "Inexact
/// Unlearning Needs More Careful Evaluations to Avoid a False Sense of
/// Privacy", SaTML 2025, §4; the Gaussian likelihood ratio of LiRA,
/// Carlini et al., IEEE S&P 2022).
///
/// A model's score on the example is its margin, correct logit minus the
/// log-sum-exp of the other logits, which equals LiRA's logit-scaled
/// confidence `ln(p/(1 − p))` of the softmax probability `p`. `positives`
/// are the scores of models that trained on the example and then unlearned
/// it, `negatives` those of models that never trained on it.
///
/// Leave-one-out: for positive `i`, a Gaussian ("in") is fitted to the
/// positives without `i` and another ("out") to all negatives; for negative
/// `j`, "in" to all positives and "out" to the negatives without `j`. Each
/// fit is the mean and the std with ddof = 0 (`np.std`), floored at
/// [`ULIRA_MIN_STD`]. The statistic of a held-out score `x` is
/// `norm.logpdf(x; in) − norm.logpdf(x; out)` (SciPy's `norm.logpdf`):
/// large when `x` looks unlearned-from-trained rather than never-trained.
///
/// Returns the statistics of the positives and of the negatives, in input
/// order; `None` when a side has fewer than 3 scores (a fit needs 2 left
/// after leaving one out), in which case the example is skipped. Pool the
/// statistics of many examples and read them off [`roc`].
pub fn ulira_example(positives: &[f64], negatives: &[f64]) -> Option<(Vec<f64>, Vec<f64>)> {
    if positives.len() < 3 || negatives.len() < 3 {
        return None;
    }
    let without = |v: &[f64], i: usize| -> Vec<f64> {
        v.iter()
            .enumerate()
            .filter(|&(k, _)| k != i)
            .map(|(_, &x)| x)
            .collect()
    };
    let (fit_in, fit_out) = (gaussian_fit(positives), gaussian_fit(negatives));
    let pos = positives
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            norm_logpdf(x, gaussian_fit(&without(positives, i))) - norm_logpdf(x, fit_out)
        })
        .collect();
    let neg = negatives
        .iter()
        .enumerate()
        .map(|(j, &x)| {
            norm_logpdf(x, fit_in) - norm_logpdf(x, gaussian_fit(&without(negatives, j)))
        })
        .collect();
    Some((pos, neg))
}

/// A ROC curve: false- and true-positive rates, one point per distinct
/// score threshold, in decreasing threshold order, starting at (0, 0), as
/// scikit-learn's `roc_curve(y_true, y_score, drop_intermediate=False)`
/// returns them (so `fpr` and `tpr` are non-decreasing).
#[derive(Clone, Debug, PartialEq)]
pub struct Roc {
    /// False-positive rate of each point (NaN everywhere without negatives).
    pub fpr: Vec<f64>,
    /// True-positive rate of each point (NaN everywhere without positives).
    pub tpr: Vec<f64>,
}

/// The ROC curve of `scores` (higher = more likely positive) against the
/// labels `positive`, with the semantics of scikit-learn's
/// `sklearn.metrics.roc_curve(positive, scores, drop_intermediate=False)`
/// (`_binary_clf_curve`): scores sorted in decreasing order, one point at
/// each distinct score counting every example scored at least that
/// (`tps` positives, `fps` negatives), a first point (0, 0), `fpr = fps /
/// #negatives`, `tpr = tps / #positives` (NaN when that class is absent).
///
/// Panics when the lengths differ or a score is not finite (scikit-learn
/// raises on both).
pub fn roc(scores: &[f64], positive: &[bool]) -> Roc {
    assert_eq!(
        scores.len(),
        positive.len(),
        "roc: scores and labels differ in length"
    );
    assert!(
        scores.iter().all(|s| s.is_finite()),
        "roc: scores must be finite"
    );
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut fps, mut tps) = (vec![0usize], vec![0usize]);
    let (mut f, mut t) = (0usize, 0usize);
    for (k, &i) in order.iter().enumerate() {
        if positive[i] {
            t += 1;
        } else {
            f += 1;
        }
        // The last example of a run of equal scores closes a threshold
        // (-0.0 and 0.0 are one threshold, as np.diff sees them).
        if k + 1 == order.len() || scores[order[k + 1]] != scores[i] {
            fps.push(f);
            tps.push(t);
        }
    }
    let rates = |counts: &[usize], total: usize| -> Vec<f64> {
        counts
            .iter()
            .map(|&c| {
                if total > 0 {
                    c as f64 / total as f64
                } else {
                    f64::NAN
                }
            })
            .collect()
    };
    Roc {
        fpr: rates(&fps, f),
        tpr: rates(&tps, t),
    }
}

impl Roc {
    /// Area under the curve by the trapezoidal rule, as
    /// `sklearn.metrics.auc(fpr, tpr)` computes it
    /// (`scipy.integrate.trapezoid`: `Σ (fpr[k+1] − fpr[k])·(tpr[k+1] +
    /// tpr[k])/2`, summed as NumPy sums, negated when `fpr` decreases).
    /// For [`roc`]'s curve this is the probability that a random positive
    /// outscores a random negative, ties counting one half. NaN with fewer
    /// than 2 points or an `fpr` that both increases and decreases (where
    /// scikit-learn raises).
    pub fn auc(&self) -> f64 {
        let (x, y) = (&self.fpr, &self.tpr);
        if x.len() < 2 || x.len() != y.len() {
            return f64::NAN;
        }
        let dx: Vec<f64> = x.windows(2).map(|w| w[1] - w[0]).collect();
        let direction = if dx.iter().any(|&d| d < 0.0) {
            if dx.iter().all(|&d| d <= 0.0) {
                -1.0
            } else {
                return f64::NAN;
            }
        } else {
            1.0
        };
        let terms: Vec<f64> = dx
            .iter()
            .zip(y.windows(2))
            .map(|(&d, w)| d * (w[1] + w[0]) / 2.0)
            .collect();
        direction * pairwise_sum(&terms)
    }

    /// TPR at a low FPR: the largest `tpr` among the points with `fpr <=
    /// max_fpr` (NaN if none, e.g. without negatives).
    ///
    /// The comparison is `<=`, so a point exactly at `max_fpr` counts (with
    /// 100 negatives, TPR at 1% FPR includes the threshold letting one
    /// negative through). LiRA's code (Carlini et al. 2022) reads
    /// `tpr[np.where(fpr < max_fpr)[0][-1]]` with a strict `<`; the two
    /// agree whenever `max_fpr` is not a multiple of `1/#negatives`.
    pub fn tpr_at_fpr(&self, max_fpr: f64) -> f64 {
        self.fpr
            .iter()
            .zip(&self.tpr)
            .filter(|&(&f, _)| f <= max_fpr)
            .map(|(_, &t)| t)
            .reduce(f64::max)
            .unwrap_or(f64::NAN)
    }
}

// ------------------------------------------- NeurIPS 2023 challenge score

/// The δ of the NeurIPS 2023 machine unlearning challenge's (ε, δ)
/// estimate: `0.01` (Triantafillou et al., arXiv:2406.09073, §3).
pub const CHALLENGE_DELTA: f64 = 0.01;

/// The edges of the challenge's ε bins, `[0, 0.5, 1.0, …, 6.0]` (13 edges,
/// width 0.5; Triantafillou et al., arXiv:2406.09073, §3).
pub const CHALLENGE_EPSILON_EDGES: [f64; 13] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0,
];

/// ε of one attack with false-positive rate `fpr` and false-negative rate
/// `fnr`, `None` when the attack is discarded (see [`challenge_epsilon`]).
fn attack_epsilon(fpr: f64, fnr: f64, delta: f64) -> Option<f64> {
    if fpr == 0.0 && fnr == 0.0 {
        return Some(f64::INFINITY);
    }
    if fpr == 0.0 || fnr == 0.0 {
        return None;
    }
    let ln_or_nan = |a: f64| if a > 0.0 { a.ln() } else { f64::NAN };
    let e1 = ln_or_nan(1.0 - delta - fpr) - fnr.ln();
    let e2 = ln_or_nan(1.0 - delta - fnr) - fpr.ln();
    Some(match (e1.is_nan(), e2.is_nan()) {
        (true, true) => f64::INFINITY,
        (true, false) => e2,
        (false, true) => e1,
        (false, false) => e1.max(e2),
    })
}

/// The empirical ε of one forget example in the NeurIPS 2023 machine
/// unlearning challenge (Triantafillou et al., "Are we making progress in
/// unlearning? Findings from the first NeurIPS unlearning competition",
/// arXiv:2406.09073, §3, and the competition's evaluation code), from the
/// scores of the example under `unlearned` models and `retrained` models.
///
/// The attacks: for each threshold `t` among the sorted distinct pooled
/// scores and +∞, the rule "unlearned when score ≥ t", with `FPR` = share
/// of `retrained` scores ≥ t and `FNR` = share of `unlearned` scores < t,
/// and the reversed rule, with `(1 − FPR, 1 − FNR)`. An attack's ε: +∞ if
/// `FPR = FNR = 0`; the attack is discarded if only one of them is 0;
/// otherwise `ε1 = ln(1 − δ − FPR) − ln(FNR)` and `ε2 = ln(1 − δ − FNR) −
/// ln(FPR)`, each NaN when its log argument is ≤ 0, and ε the larger
/// non-NaN one (+∞ if both are NaN). The example's ε is the largest over
/// the attacks, 0 if all were discarded; it may be negative. `delta` is
/// [`CHALLENGE_DELTA`] in the challenge.
///
/// NaN when a side is empty or holds a NaN.
pub fn challenge_epsilon(unlearned: &[f64], retrained: &[f64], delta: f64) -> f64 {
    if unlearned.is_empty() || retrained.is_empty() {
        return f64::NAN;
    }
    if unlearned.iter().chain(retrained).any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let sorted = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s
    };
    let (u, r) = (sorted(unlearned), sorted(retrained));
    let mut thresholds: Vec<f64> = u.iter().chain(&r).copied().collect();
    thresholds.sort_by(f64::total_cmp);
    thresholds.push(f64::INFINITY);
    thresholds.dedup_by(|a, b| a == b);
    let (nu, nr) = (u.len() as f64, r.len() as f64);
    let mut eps: Option<f64> = None;
    for t in thresholds {
        let fp = r.len() - r.partition_point(|&x| x < t);
        let fn_ = u.partition_point(|&x| x < t);
        let (fpr, fnr) = (fp as f64 / nr, fn_ as f64 / nu);
        for (a, b) in [(fpr, fnr), (1.0 - fpr, 1.0 - fnr)] {
            if let Some(e) = attack_epsilon(a, b, delta) {
                eps = Some(eps.map_or(e, |m| m.max(e)));
            }
        }
    }
    eps.unwrap_or(0.0)
}

/// The bin `n` of an example's ε in the challenge: `numpy.digitize(eps,
/// CHALLENGE_EPSILON_EDGES)`, the number of edges `<= eps` (0 for ε < 0,
/// 1 for ε in [0, 0.5), …, 13 for ε ≥ 6 and ε = +∞). As in NumPy, NaN gives
/// 13 (but [`challenge_example_score`] of NaN is NaN).
pub fn challenge_bin(eps: f64) -> usize {
    if eps.is_nan() {
        return CHALLENGE_EPSILON_EDGES.len();
    }
    CHALLENGE_EPSILON_EDGES.partition_point(|&e| e <= eps)
}

/// The per-example score of the challenge, `H(ε) = 2 / 2^n` with `n` =
/// [`challenge_bin`]`(ε)` (Triantafillou et al., arXiv:2406.09073, §3): 2 for
/// ε < 0, 1 for ε in [0, 0.5), halving with every 0.5 of ε, `2/8192` for
/// ε ≥ 6 and ε = +∞. NaN for NaN (no data).
pub fn challenge_example_score(eps: f64) -> f64 {
    if eps.is_nan() {
        return f64::NAN;
    }
    2.0 / 2f64.powi(challenge_bin(eps) as i32)
}

/// The challenge's forgetting quality `F`: the mean of
/// [`challenge_example_score`] over the forget examples' ε (Triantafillou
/// et al., arXiv:2406.09073, §3). NaN when `eps` is empty.
pub fn forgetting_quality(eps: &[f64]) -> f64 {
    let scores: Vec<f64> = eps.iter().map(|&e| challenge_example_score(e)).collect();
    mean(&scores)
}

/// The challenge's final score `F × (RA_u / RA_r) × (TA_u / TA_r)`:
/// forgetting quality `f` ([`forgetting_quality`]) times the ratios of the
/// mean remain (retain) accuracy and mean test accuracy of the unlearned
/// models (`ra_u`, `ta_u`) to those of the retrained models (`ra_r`, `ta_r`)
/// (Triantafillou et al., arXiv:2406.09073, §3). Evaluated left to right.
pub fn challenge_score(f: f64, ra_u: f64, ra_r: f64, ta_u: f64, ta_r: f64) -> f64 {
    f * (ra_u / ra_r) * (ta_u / ta_r)
}

// ------------------------------------------------------------- summary

/// Mean and sample standard deviation (ddof = 1, i.e. `Σ(x − mean)²/(n −
/// 1)` under the root) of `values`, as `np.mean(values)` and
/// `np.std(values, ddof=1)` compute them: the "mean ± std over N runs" of
/// tables. The std is NaN for one value; both are NaN when `values` is
/// empty.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = mean(values);
    let std = (squared_deviations(values, m) / (values.len() as f64 - 1.0)).sqrt();
    (m, std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_sum_follows_numpys_grouping() {
        // Short arrays add in order; 8..=128 use 8 partial sums. With a
        // large term first, the order decides what rounds away.
        assert_eq!(pairwise_sum(&[]), 0.0);
        assert_eq!(pairwise_sum(&[1.0, 2.0, 3.0]), 6.0);
        // 1e16 and eight ones (the float64 spacing at 1e16 is 2, so a lone
        // +1 is a tie and rounds to even). In order, every +1 rounds away:
        // 1e16. NumPy: partial sums (1e16 + 1) + (1 + 1) = 1e16 + 2, plus
        // the other six ones in pairs, 1e16 + 6, then the ninth term: the
        // tie 1e16 + 7 rounds to 1e16 + 8 (np.sum gives 1e16 + 8).
        let mut v = vec![1e16];
        v.extend([1.0; 8]);
        let in_order = v.iter().fold(0.0, |s, x| s + x);
        assert_eq!(in_order, 1e16);
        assert_eq!(pairwise_sum(&v), 1e16 + 8.0);
        // Over 128 terms: split, and the integers sum exactly either way.
        let long: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        assert_eq!(pairwise_sum(&long), 499_500.0);
    }

    #[test]
    fn linspace_ends_exactly_at_hi() {
        let e = linspace(-1.0, 0.1, 21);
        assert_eq!(e.len(), 21);
        assert_eq!(e[0], -1.0);
        assert_eq!(e[20], 0.1);
        assert!(e.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn klom_of_identical_samples_is_zero_and_of_disjoint_ones_large() {
        let a = [0.3, -1.2, 2.5, 0.7, 1.1, -0.4];
        assert_eq!(klom(&a, &a), 0.0);
        // All values equal: one range [v, v + 1), everything in bin 1.
        assert_eq!(klom(&[2.0; 5], &[2.0; 7]), 0.0);
        // Unlearned at 0, 0, oracle at 10, 10, and the maximum 20 (in no
        // bin): p = (1, 0, …), q = (0, …, 1 in bin 11, …); q_safe(bin 1) =
        // 1e-5, renormalised by 1 + 1e-5: KL = ln((1 + 1e-5)/1e-5).
        let k = klom(&[0.0, 0.0], &[10.0, 10.0, 20.0]);
        let expected = ((1.0f64 + 1e-5) / 1e-5).ln();
        assert!((k - expected).abs() < 1e-12, "{k} vs {expected}");
        // Every unlearned margin at the pooled maximum: no unlearned mass.
        assert!(klom(&[5.0, 5.0], &[1.0, 2.0]).is_nan());
        assert!(klom(&[], &[1.0]).is_nan());
    }

    #[test]
    fn klom_histogram_clips_and_leaves_the_top_edge_out() {
        let bins = KlomBins {
            bins: 4,
            ..KlomBins::default()
        };
        let h = bins
            .histogram(&[-500.0, 0.0, 49.0], &[100.0, 250.0])
            .unwrap();
        assert_eq!(h.edges, vec![-100.0, -50.0, 0.0, 50.0, 100.0]);
        assert_eq!(h.unlearned, vec![1, 0, 2, 0]);
        // Both oracle margins clip to 100, the top edge: counted nowhere.
        assert_eq!(h.oracle, vec![0, 0, 0, 0]);
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert_eq!(percentile(&v, 50.0), 2.5);
        // h = 3·0.9 = 2.7: b − (b − a)·0.3 between 3 and 4.
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-15);
        assert_eq!(percentile(&[7.0], 37.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert!(percentile(&v, 101.0).is_nan());
    }

    #[test]
    fn ulira_needs_three_per_side_and_ranks_members_high() {
        assert!(ulira_example(&[1.0, 2.0], &[0.0, 1.0, 2.0]).is_none());
        // Positives near 5, negatives near 0: every positive is far more
        // likely under "in", every negative under "out".
        let pos = [4.8, 5.0, 5.3, 4.9];
        let neg = [0.1, -0.2, 0.3, 0.0, -0.1];
        let (sp, sn) = ulira_example(&pos, &neg).unwrap();
        assert_eq!((sp.len(), sn.len()), (4, 5));
        assert!(sp.iter().all(|&s| s > 0.0) && sn.iter().all(|&s| s < 0.0));
        // Hand check of one statistic: negative 0 against all positives and
        // the other negatives.
        let fit_in = (
            5.0,
            ((0.04 + 0.0 + 0.09 + 0.01) / 4.0f64).sqrt(), // mean exactly 5
        );
        let rest = [-0.2, 0.3, 0.0, -0.1];
        let m: f64 = 0.0;
        let sd = (rest.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / 4.0).sqrt();
        let lp = |x: f64, mu: f64, s: f64| {
            -((x - mu) / s).powi(2) / 2.0 - (2.0 * std::f64::consts::PI).sqrt().ln() - s.ln()
        };
        let expected = lp(0.1, fit_in.0, fit_in.1) - lp(0.1, m, sd);
        assert!(
            (sn[0] - expected).abs() < 1e-9 * expected.abs(),
            "{} vs {expected}",
            sn[0]
        );
        // Identical margins everywhere: floored stds, statistic 0.
        let (a, b) = ulira_example(&[0.5; 4], &[0.5; 3]).unwrap();
        assert!(a.iter().chain(&b).all(|&s| s == 0.0));
    }

    #[test]
    fn roc_of_separated_scores_has_auc_one() {
        let r = roc(&[0.9, 0.8, 0.3, 0.1], &[true, true, false, false]);
        assert_eq!(r.fpr, vec![0.0, 0.0, 0.0, 0.5, 1.0]);
        assert_eq!(r.tpr, vec![0.0, 0.5, 1.0, 1.0, 1.0]);
        assert_eq!(r.auc(), 1.0);
        assert_eq!(r.tpr_at_fpr(0.0), 1.0);
        // Reversed labels: AUC 0. All tied: one diagonal step, AUC 1/2.
        assert_eq!(roc(&[0.9, 0.8, 0.3], &[false, true, true]).auc(), 0.0);
        let tied = roc(
            &[1.0, 1.0, 1.0, -0.0, 0.0],
            &[true, false, true, true, false],
        );
        assert_eq!(tied.fpr, vec![0.0, 0.5, 1.0]);
        assert_eq!(tied.tpr, vec![0.0, 2.0 / 3.0, 1.0]);
        assert_eq!(tied.tpr_at_fpr(0.5), 2.0 / 3.0);
        assert_eq!(tied.tpr_at_fpr(0.49), 0.0);
        // No negatives: fpr NaN, so no point qualifies.
        let one_class = roc(&[1.0, 2.0], &[true, true]);
        assert!(one_class.fpr.iter().all(|f| f.is_nan()));
        assert!(one_class.tpr_at_fpr(1.0).is_nan());
    }

    #[test]
    fn challenge_epsilon_of_identical_scores_is_zero_and_of_separated_infinite() {
        // Every attack is discarded (one of FPR, FNR is 0, the other 1).
        assert_eq!(
            challenge_epsilon(&[1.0; 5], &[1.0; 5], CHALLENGE_DELTA),
            0.0
        );
        // Unlearned all above retrained: "score >= min unlearned" is perfect.
        assert_eq!(
            challenge_epsilon(&[5.0, 6.0], &[1.0, 2.0], CHALLENGE_DELTA),
            f64::INFINITY
        );
        // Interleaved: u = {1, 3}, r = {2, 4}. t = 1 and +∞: discarded.
        // t = 2: (FPR, FNR) = (1, 1/2): ε1 NaN, ε2 = ln 0.49; reversed (0,
        // 1/2) discarded. t = 3: (1/2, 1/2) both ways: ε = ln 0.49 − ln 0.5,
        // the largest. t = 4: (1/2, 1): ε = ln 0.49; reversed discarded.
        let e = challenge_epsilon(&[1.0, 3.0], &[2.0, 4.0], CHALLENGE_DELTA);
        assert!((e - (0.49f64.ln() - 0.5f64.ln())).abs() < 1e-15, "{e}");
        assert!(challenge_epsilon(&[], &[1.0], CHALLENGE_DELTA).is_nan());
    }

    #[test]
    fn challenge_example_score_halves_per_half_epsilon() {
        assert_eq!(challenge_example_score(0.0), 1.0);
        assert_eq!(challenge_example_score(0.49), 1.0);
        assert_eq!(challenge_example_score(0.5), 0.5);
        assert_eq!(challenge_example_score(-0.1), 2.0);
        assert_eq!(challenge_example_score(6.0), 2.0 / 8192.0);
        assert_eq!(challenge_example_score(f64::INFINITY), 2.0 / 8192.0);
        assert_eq!(challenge_bin(f64::INFINITY), 13);
        assert!(challenge_example_score(f64::NAN).is_nan());
    }

    #[test]
    fn forgetting_quality_is_the_mean_score() {
        assert_eq!(
            forgetting_quality(&[0.0, 0.5, f64::INFINITY, -1.0]),
            (1.0 + 0.5 + 2.0 / 8192.0 + 2.0) / 4.0
        );
        assert!(forgetting_quality(&[]).is_nan());
    }

    #[test]
    fn challenge_score_scales_by_accuracy_ratios() {
        assert_eq!(challenge_score(0.5, 90.0, 90.0, 80.0, 80.0), 0.5);
        assert_eq!(challenge_score(0.5, 45.0, 90.0, 40.0, 80.0), 0.125);
    }

    #[test]
    fn mean_std_uses_ddof_one() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-15);
        let (m, s) = mean_std(&[3.0]);
        assert_eq!(m, 3.0);
        assert!(s.is_nan());
        let (m, s) = mean_std(&[]);
        assert!(m.is_nan() && s.is_nan());
    }
}
