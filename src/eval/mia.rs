//! The two membership-inference attacks of DESIGN §2, each fitted to the
//! exact optimum of the problem scikit-learn solves, so that the numbers do
//! not depend on a solver's stopping point:
//!
//! - [`entropy_mia`]: `LogisticRegression(class_weight="balanced")` (L2,
//!   C = 1, intercept not penalised) on the softmax entropy, members the
//!   remain set, non-members the test set; the share of the forget set
//!   predicted *member*.
//! - [`efficacy_mia`]: SalUn's `SVC(C=3, gamma="auto", kernel="rbf")` on the
//!   true-class confidence, members |D_t| remain samples, non-members the test
//!   set; the share of the forget set predicted *non-member*. Solved with
//!   libsvm's algorithm (SMO, second-order working set selection, tolerance
//!   1e-3, the same bias rule); identical feature values are merged into one
//!   point with the summed bound, which leaves the optimum unchanged.

/// Share (%) of `target` that a balanced logistic regression on one feature,
/// fitted on `members` versus `nonmembers`, predicts to be members.
pub fn entropy_mia(members: &[f64], nonmembers: &[f64], target: &[f64]) -> f64 {
    let fit = Logistic::fit(members, nonmembers, 1.0);
    share(target, |x| fit.decision(x) > 0.0)
}

/// Share (%) of `target` that an RBF SVC (C = 3, γ = 1 for one feature)
/// on `members` versus `nonmembers` predicts to be non-members.
pub fn efficacy_mia(members: &[f64], nonmembers: &[f64], target: &[f64]) -> f64 {
    let svc = Svc::fit(members, nonmembers, 3.0, 1.0);
    share(target, |x| svc.decision(x) <= 0.0)
}

fn share(target: &[f64], hit: impl Fn(f64) -> bool) -> f64 {
    if target.is_empty() {
        return f64::NAN;
    }
    100.0 * target.iter().filter(|&&x| hit(x)).count() as f64 / target.len() as f64
}

/// `decision(x) = w·x + b`, member when positive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Logistic {
    pub w: f64,
    pub b: f64,
}

impl Logistic {
    /// Minimises `Σ s_i log(1 + exp(−y_i (w x_i + b))) + w²/(2C)` with
    /// balanced weights `s_i = n / (2 n_class(i))` by Newton's method with a
    /// backtracking line search (the problem is strictly convex in w and,
    /// with both classes present, in b).
    pub fn fit(members: &[f64], nonmembers: &[f64], c: f64) -> Self {
        let n = (members.len() + nonmembers.len()) as f64;
        if members.is_empty() || nonmembers.is_empty() {
            // One class only: the regression predicts it everywhere.
            let b = if members.is_empty() { -1.0 } else { 1.0 };
            return Logistic { w: 0.0, b };
        }
        let s_pos = n / (2.0 * members.len() as f64);
        let s_neg = n / (2.0 * nonmembers.len() as f64);
        let data = || {
            members
                .iter()
                .map(move |&x| (x, 1.0, s_pos))
                .chain(nonmembers.iter().map(move |&x| (x, -1.0, s_neg)))
        };
        let objective = |w: f64, b: f64| {
            data()
                .map(|(x, y, s)| s * softplus(-y * (w * x + b)))
                .sum::<f64>()
                + w * w / (2.0 * c)
        };
        let (mut w, mut b) = (0.0f64, 0.0f64);
        let mut f = objective(w, b);
        for _ in 0..200 {
            // Gradient and Hessian of the objective at (w, b).
            let (mut gw, mut gb, mut hww, mut hwb, mut hbb) = (w / c, 0.0, 1.0 / c, 0.0, 0.0);
            for (x, y, s) in data() {
                let z = w * x + b;
                let p = sigmoid(z);
                let r = s * (p - if y > 0.0 { 1.0 } else { 0.0 });
                gw += r * x;
                gb += r;
                let h = s * p * (1.0 - p);
                hww += h * x * x;
                hwb += h * x;
                hbb += h;
            }
            let det = hww * hbb - hwb * hwb;
            let (dw, db) = if det > 0.0 && det.is_finite() {
                (-(hbb * gw - hwb * gb) / det, -(-hwb * gw + hww * gb) / det)
            } else {
                (-gw / hww, if hbb > 0.0 { -gb / hbb } else { 0.0 })
            };
            let decrease = -(gw * dw + gb * db);
            if decrease.is_nan() || decrease <= 1e-14 * f.abs().max(1.0) {
                break;
            }
            let mut step = 1.0;
            loop {
                let (w2, b2) = (w + step * dw, b + step * db);
                let f2 = objective(w2, b2);
                if f2 <= f - 1e-4 * step * decrease || step < 1e-12 {
                    w = w2;
                    b = b2;
                    f = f2;
                    break;
                }
                step *= 0.5;
            }
        }
        Logistic { w, b }
    }

    pub fn decision(&self, x: f64) -> f64 {
        self.w * x + self.b
    }
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// `log(1 + exp(z))` without overflow.
fn softplus(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

/// An RBF support-vector classifier on one feature:
/// `decision(x) = Σ_t coef_t exp(−γ (x − x_t)²) − ρ`, member when positive.
#[derive(Clone, Debug)]
pub struct Svc {
    pub points: Vec<f64>,
    /// `α_t y_t` per support point.
    pub coef: Vec<f64>,
    pub rho: f64,
    pub gamma: f64,
}

/// libsvm's `TAU` and default tolerance.
const TAU: f64 = 1e-12;
const EPS: f64 = 1e-3;

impl Svc {
    /// libsvm's C-SVC dual: `min ½ αᵀQα − Σα`, `Σ y_i α_i = 0`, `0 ≤ α_i ≤ C_i`,
    /// `Q_ij = y_i y_j K(x_i, x_j)`, solved by SMO with libsvm's
    /// second-order working-set selection (no shrinking) to its stopping
    /// rule `m(α) − M(α) < 1e-3`.
    pub fn fit(members: &[f64], nonmembers: &[f64], c: f64, gamma: f64) -> Self {
        // Identical (x, y) pairs have identical rows of Q: one point with the
        // summed bound C·count has the same optimum (in the sums of α).
        let mut merged: std::collections::BTreeMap<(u64, bool), f64> = Default::default();
        for (&x, y) in members
            .iter()
            .map(|x| (x, true))
            .chain(nonmembers.iter().map(|x| (x, false)))
        {
            *merged.entry((x.to_bits(), y)).or_default() += c;
        }
        let x: Vec<f64> = merged.keys().map(|(b, _)| f64::from_bits(*b)).collect();
        let y: Vec<f64> = merged
            .keys()
            .map(|(_, m)| if *m { 1.0 } else { -1.0 })
            .collect();
        let upper: Vec<f64> = merged.values().copied().collect();
        let n = x.len();
        let kernel = |a: f64, b: f64| (-gamma * (a - b) * (a - b)).exp();
        let mut alpha = vec![0.0f64; n];
        let mut grad = vec![-1.0f64; n];
        let mut row_i = vec![0.0f64; n];
        let mut row_j = vec![0.0f64; n];
        let max_iter = (100 * n).max(10_000_000);
        let at_upper = |a: f64, u: f64| a >= u;
        let at_lower = |a: f64| a <= 0.0;
        for _ in 0..max_iter {
            // i: the maximal violator of the "up" set.
            let mut gmax = f64::NEG_INFINITY;
            let mut i = usize::MAX;
            for t in 0..n {
                let v = if y[t] > 0.0 {
                    (!at_upper(alpha[t], upper[t])).then_some(-grad[t])
                } else {
                    (!at_lower(alpha[t])).then_some(grad[t])
                };
                if let Some(v) = v
                    && v >= gmax
                {
                    gmax = v;
                    i = t;
                }
            }
            if i == usize::MAX {
                break;
            }
            for t in 0..n {
                row_i[t] = y[i] * y[t] * kernel(x[i], x[t]);
            }
            // j: the second-order choice among the "low" set.
            let mut gmax2 = f64::NEG_INFINITY;
            let mut j = usize::MAX;
            let mut best = f64::INFINITY;
            for t in 0..n {
                let candidate = if y[t] > 0.0 {
                    (!at_lower(alpha[t])).then_some(grad[t])
                } else {
                    (!at_upper(alpha[t], upper[t])).then_some(-grad[t])
                };
                let Some(g) = candidate else { continue };
                gmax2 = gmax2.max(g);
                let diff = gmax + g;
                if diff > 0.0 {
                    // Q_ii + Q_tt − 2 y_i y_t Q_it = 2 − 2 K_it for an RBF kernel.
                    let mut quad = 2.0 - 2.0 * y[i] * y[t] * row_i[t];
                    if quad <= 0.0 {
                        quad = TAU;
                    }
                    let obj = -(diff * diff) / quad;
                    if obj <= best {
                        best = obj;
                        j = t;
                    }
                }
            }
            if gmax + gmax2 < EPS || j == usize::MAX {
                break;
            }
            for t in 0..n {
                row_j[t] = y[j] * y[t] * kernel(x[j], x[t]);
            }
            let (old_i, old_j) = (alpha[i], alpha[j]);
            let (ci, cj) = (upper[i], upper[j]);
            let (mut a_i, mut a_j) = (old_i, old_j);
            if y[i] != y[j] {
                let mut quad = 2.0 + 2.0 * row_i[j];
                if quad <= 0.0 {
                    quad = TAU;
                }
                let delta = (-grad[i] - grad[j]) / quad;
                let diff = a_i - a_j;
                a_i += delta;
                a_j += delta;
                if diff > 0.0 {
                    if a_j < 0.0 {
                        a_j = 0.0;
                        a_i = diff;
                    }
                } else if a_i < 0.0 {
                    a_i = 0.0;
                    a_j = -diff;
                }
                if diff > ci - cj {
                    if a_i > ci {
                        a_i = ci;
                        a_j = ci - diff;
                    }
                } else if a_j > cj {
                    a_j = cj;
                    a_i = cj + diff;
                }
            } else {
                let mut quad = 2.0 - 2.0 * row_i[j];
                if quad <= 0.0 {
                    quad = TAU;
                }
                let delta = (grad[i] - grad[j]) / quad;
                let sum = a_i + a_j;
                a_i -= delta;
                a_j += delta;
                if sum > ci {
                    if a_i > ci {
                        a_i = ci;
                        a_j = sum - ci;
                    }
                } else if a_j < 0.0 {
                    a_j = 0.0;
                    a_i = sum;
                }
                if sum > cj {
                    if a_j > cj {
                        a_j = cj;
                        a_i = sum - cj;
                    }
                } else if a_i < 0.0 {
                    a_i = 0.0;
                    a_j = sum;
                }
            }
            alpha[i] = a_i;
            alpha[j] = a_j;
            let (di, dj) = (a_i - old_i, a_j - old_j);
            for t in 0..n {
                grad[t] += row_i[t] * di + row_j[t] * dj;
            }
        }
        // ρ: the mean of y_t G_t over free points, else the middle of the bounds.
        let (mut ub, mut lb) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut free, mut sum_free) = (0usize, 0.0f64);
        for t in 0..n {
            let yg = y[t] * grad[t];
            if at_upper(alpha[t], upper[t]) {
                if y[t] < 0.0 {
                    ub = ub.min(yg);
                } else {
                    lb = lb.max(yg);
                }
            } else if at_lower(alpha[t]) {
                if y[t] > 0.0 {
                    ub = ub.min(yg);
                } else {
                    lb = lb.max(yg);
                }
            } else {
                free += 1;
                sum_free += yg;
            }
        }
        let rho = if free > 0 {
            sum_free / free as f64
        } else {
            (ub + lb) / 2.0
        };
        let (points, coef) = (0..n)
            .filter(|&t| alpha[t] > 0.0)
            .map(|t| (x[t], alpha[t] * y[t]))
            .unzip();
        Svc {
            points,
            coef,
            rho,
            gamma,
        }
    }

    pub fn decision(&self, x: f64) -> f64 {
        self.points
            .iter()
            .zip(&self.coef)
            .map(|(&p, &c)| c * (-self.gamma * (x - p) * (x - p)).exp())
            .sum::<f64>()
            - self.rho
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_separates_a_threshold_and_sits_at_the_optimum() {
        // Members below 0.5, non-members above: w < 0, boundary near 0.5.
        let members: Vec<f64> = (0..50).map(|i| i as f64 / 100.0).collect();
        let nonmembers: Vec<f64> = (50..100).map(|i| i as f64 / 100.0).collect();
        let fit = Logistic::fit(&members, &nonmembers, 1.0);
        assert!(fit.w < 0.0, "{fit:?}");
        let boundary = -fit.b / fit.w;
        assert!((boundary - 0.495).abs() < 0.01, "{boundary}");
        assert_eq!(
            entropy_mia(&members, &nonmembers, &[0.1, 0.2, 0.9]),
            100.0 * 2.0 / 3.0
        );
    }

    #[test]
    fn logistic_balances_unequal_classes() {
        // 10 members at 0, 1000 non-members at 1: without balancing the
        // intercept would favour non-members at 0 too.
        let members = vec![0.0; 10];
        let nonmembers = vec![1.0; 1000];
        let fit = Logistic::fit(&members, &nonmembers, 1.0);
        assert!(
            fit.decision(0.0) > 0.0 && fit.decision(1.0) < 0.0,
            "{fit:?}"
        );
    }

    #[test]
    fn svc_kkt_conditions_hold_at_the_solution() {
        // Overlapping classes: members around 0.8, non-members around 0.6.
        let members: Vec<f64> = (0..200)
            .map(|i| 0.8 + 0.2 * ((i as f64) * 0.37).sin())
            .collect();
        let nonmembers: Vec<f64> = (0..200)
            .map(|i| 0.6 + 0.2 * ((i as f64) * 0.73).cos())
            .collect();
        let svc = Svc::fit(&members, &nonmembers, 3.0, 1.0);
        // Σ y α = 0 (coef = α y).
        let sum: f64 = svc.coef.iter().sum();
        assert!(sum.abs() < 1e-9, "Σ y α = {sum}");
        // Points at the bound are on the wrong side of the margin or on it.
        let margin_violations = members
            .iter()
            .filter(|&&x| svc.decision(x) < 1.0 - 1e-2)
            .count();
        assert!(margin_violations > 0, "the classes overlap");
        // High confidence (member-like) is predicted member, low is not.
        assert!(svc.decision(1.0) > 0.0 && svc.decision(0.4) < 0.0);
        let e = efficacy_mia(&members, &nonmembers, &[0.4, 0.45, 1.0]);
        assert!((e - 100.0 * 2.0 / 3.0).abs() < 1e-9, "{e}");
    }

    #[test]
    fn svc_merging_duplicates_changes_nothing() {
        let members = [0.9, 0.9, 0.9, 0.8, 0.95, 1.0, 1.0];
        let nonmembers = [0.7, 0.9, 0.6, 0.5, 0.85];
        let a = Svc::fit(&members, &nonmembers, 3.0, 1.0);
        // The same data with the duplicates spelled out differently ordered.
        let mut m2 = members.to_vec();
        m2.reverse();
        let b = Svc::fit(&m2, &nonmembers, 3.0, 1.0);
        for x in [0.5, 0.7, 0.9, 1.0] {
            assert!((a.decision(x) - b.decision(x)).abs() < 1e-12);
        }
    }
}
