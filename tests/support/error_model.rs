//! Where every numeric tolerance of the tests comes from.
//!
//! Two computations that are equal in exact arithmetic (sfron on 1 rank and
//! on N, sfron and its PyTorch reference, this CPU and another) differ by
//! rounding only: float32 sums taken in another order or cut at other
//! places (per-rank partial sums, other kernel blockings and SIMD widths,
//! other thread counts). A tolerance says how far apart rounding alone can
//! put them; it must also stay well below what a real defect does, or the
//! test could not fail. The pieces:
//!
//! - **Unit roundoff** `U = 2^-24` (float32).
//! - **Sums.** A float32 sum of `n` terms has error at most `γ_n Σ|x_i|`,
//!   `γ_n = nU/(1 − nU)` (Higham, *Accuracy and Stability of Numerical
//!   Algorithms*, §4.2), a bound reached only by adversarial data. With
//!   rounding errors that behave as independent and mean-zero (Higham &
//!   Mary, SIAM J. Sci. Comput. 41(5), 2019) the error is of order
//!   `√n U Σ|x_i|`. A gradient holds many such sums; the norm of their
//!   errors concentrates near its mean, so a norm-wise bound needs no tail
//!   factor: two computations differ by `2 √n U κ` of the norm (the 2 for
//!   two errors, which add in quadrature to √2), `κ = Σ|x_i| / |Σ x_i|` the
//!   cancellation.
//! - **Gradients.** The longest float32 reduction of a step of the tests'
//!   models is a convolution's weight gradient, or a BatchNorm layer's
//!   statistics: the batch times the output pixels, 32 × 28 × 28 = 25,088
//!   terms for `resnet18_cifar`'s first layers at batch 32 on the digits
//!   (21,632 for `mnist_cnn`). The per-sample gradients of the tests'
//!   briefly trained models largely agree; `κ = 4` allows their mean to be
//!   a quarter of the mean per-sample magnitude. So one step's gradient
//!   differs between two computations by at most `ρ = 2 √25088 U 4 =
//!   7.6e-5` of its norm.
//! - **Trajectories.** A discrepancy `r_t` in step `t`'s gradient moves the
//!   weights by `η_t r_t`, momentum spreads it over later steps by at most
//!   `1/(1 − μ)`, and the dynamics then grow it by at most `A = exp(Σ_t η_t
//!   h)`, `h` the most negative curvature of the loss. So `‖θ_a − θ_b‖₂ ≤ A
//!   ρ P` with the **path** `P = Σ_t η_t ‖g_t‖ / (1 − μ)` (`‖g_t‖` the norm of
//!   the gradient stepped with, after masks, clipping and penalties: sfron
//!   logs it as `*grad_norm` in `metrics.jsonl`). The tests run in the
//!   smooth regime: learning rates ≤ 0.01 over ≤ 40 steps (`Σ η_t ≤ 0.4`)
//!   and `h ≤ 5` give `A ≤ e²`; so [`trajectory`] `= A ρ = 5.6e-4` of the
//!   path. Ascent steps (SFR-on's forget steps, GA) count the forget loss's
//!   curvature with its sign flipped; the tests keep them short and clipped.
//! - **Kinks.** ReLU and max-pool switch where a pre-activation crosses zero
//!   or two inputs tie; one within rounding of the switch may go either way,
//!   which changes one unit's share of the gradient (~1e-5 of it, seen). In
//!   the smooth regime that is of the order of the rounding around it; a
//!   chaotic run grows it like any perturbation (seen: 2e-3 of the path for
//!   SFR-on with clip 7 on a 10-sample forget set, whose loss the ascent
//!   drives from 2 to 11): such a run cannot be compared to rounding
//!   precision by any test, and the tests avoid it.
//! - **What it must catch.** A rank's share weighted by 1/N instead of by
//!   its size (shares of 11 and 10 of a 32-sample batch), one sample lost
//!   or counted twice, a normaliser summed per rank instead of globally, a
//!   penalty added on every rank: each changes every affected step's
//!   gradient by 3% to 100%. Errors in the same direction every step (a
//!   normaliser, a penalty) move the weights by that fraction of the path;
//!   errors of unrelated directions by that fraction over √T, 3%/√20 =
//!   7e-3 of the path for the smallest of them in a 20-step test: over ten
//!   times the tolerance, which is itself thousands of times what the tests
//!   measure (about 1e-7 of the path; 1e-5 for ℓ1-sparse, [`l1_flips`]).
//!
//! Checked on one machine (Intel Xeon, AVX-512) under
//! `ATEN_CPU_CAPABILITY=default`, `avx2` and native, with 1 and 2 threads per
//! rank (`SFRON_TEST_THREADS`); what moved is noted beside each test.

/// float32's unit roundoff, `2^-24`.
pub const U: f64 = 5.960_464_477_539_063e-8;

/// How far two computations of a vector of float32 sums of `n` terms, of
/// cancellation `kappa`, can differ, norm-wise and relative.
pub fn sum_difference(n: f64, kappa: f64) -> f64 {
    2.0 * n.sqrt() * U * kappa
}

/// `ρ`: one step's gradient, relative (the module docs).
pub fn gradient_difference() -> f64 {
    sum_difference(25_088.0, 4.0)
}

/// `A`: growth of a discrepancy over a run in the smooth regime (`Σ η_t h ≤ 2`).
pub const GROWTH: f64 = std::f64::consts::E * std::f64::consts::E;

/// Tolerance on `‖θ_a − θ_b‖₂` as a fraction of the path `P`: `A ρ`.
pub fn trajectory() -> f64 {
    GROWTH * gradient_difference()
}

/// The path `P = Σ_t η_t Σ_s ‖g_{t,s}‖ / (1 − μ)` of a run whose
/// `metrics.jsonl` has a step record every iteration (`log_every = 1`):
/// each record's `lr` times the sum of its `*grad_norm` fields (an
/// unlearning iteration may hold a forget and a remain step).
pub fn path(metrics: &std::path::Path, momentum: f64) -> f64 {
    let text = std::fs::read_to_string(metrics)
        .unwrap_or_else(|e| panic!("reading {}: {e}", metrics.display()));
    let mut sum = 0.0;
    let mut records = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        if v["event"] != "step" {
            continue;
        }
        records += 1;
        let norms: f64 = v
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.ends_with("grad_norm"))
            .map(|(_, n)| n.as_f64().unwrap())
            .sum();
        sum += v["lr"].as_f64().unwrap() * norms;
    }
    assert!(records > 0, "{}: no step records", metrics.display());
    sum / (1.0 - momentum)
}

/// The Fisher `F = (1/N_b) Σ_b ḡ_b²` of two computations, relative and
/// norm-wise: each `ḡ_b` is a mean gradient in eval mode (batch 16 in the
/// tests: 16 × 26 × 26 = 10,816 terms in the longest sum) with relative
/// error `ρ_F`, and squaring doubles it: `2 ρ_F (1 + ρ_F)`. Per tensor the
/// cancellation may be larger (a bias's gradient sums one channel's
/// back-propagated error over every pixel and sample, of both signs):
/// `κ = 40` for [`fisher_tensor`], 4 for the whole.
pub fn fisher() -> f64 {
    2.0 * sum_difference(10_816.0, 4.0)
}

/// [`fisher`], one tensor at a time.
pub fn fisher_tensor() -> f64 {
    2.0 * sum_difference(10_816.0, 40.0)
}

/// A hard mask entry `1[S ≥ γ]` may differ between two computations only
/// where rounding explains it: the two saliencies lie on either side of
/// `γ` and are within `rel` of each other.
pub fn mask_flip_explained(s_a: f64, s_b: f64, gamma: f64, rel: f64) -> bool {
    (s_a >= gamma) != (s_b >= gamma) && (s_a - s_b).abs() <= rel * s_a.abs().max(s_b.abs())
}

/// ℓ1-sparse adds `α_t sign(θ)` to the gradient, which jumps by `2α_t` where
/// a weight crosses zero: a weight within rounding of zero may get opposite
/// signs in the two computations. The ℓ1 term holds weights near zero in a
/// band `|θ| ≤ ε = α η / (1 − μ)` (each step kicks them by `α η` toward zero,
/// momentum adds up at most `1/(1 − μ)` kicks); a weight at distance `x`
/// from zero flips when the discrepancy `δ` reaches `x`, so with `n_band`
/// weights spread over the band a step flips about `n_band δ / ε` of them.
/// Each flip changes that weight's kick by `2 α η` and, through momentum, its
/// value by up to `2ε`; flips of independent signs add in quadrature. Over
/// `steps` steps, grown by [`GROWTH`]:
/// `A · 2ε · √(steps · n_band · δ / ε)`, with `δ` the smooth model's
/// per-weight discrepancy `trajectory() · P / √n_weights`. Returned as an
/// allowance on `‖θ_a − θ_b‖₂`, added to the smooth one.
pub fn l1_flips(
    alpha: f64,
    lr: f64,
    momentum: f64,
    steps: f64,
    n_band: f64,
    n_weights: f64,
    path: f64,
) -> f64 {
    let band = alpha * lr / (1.0 - momentum);
    let delta = trajectory() * path / n_weights.sqrt();
    let flips = steps * n_band * (delta / band).min(1.0);
    GROWTH * 2.0 * band * flips.sqrt()
}

/// Eval-mode logits of one model computed twice, relative to the largest
/// logit: each of `layers` weighted layers adds `sum_difference(fan_in, 4)`
/// (its dot products have at most `fan_in` terms) and passes the earlier
/// layers' error on; BatchNorm in eval mode and residual additions are
/// affine and add ulps. The gain through a layer is taken as 1 (the tests'
/// initialisations keep activations of order 1; κ = 4 leaves room).
pub fn forward(layers: f64, fan_in: f64) -> f64 {
    layers * sum_difference(fan_in, 4.0)
}
