//! The metrics of DESIGN §2, computed on rank 0 from the per-example outputs
//! (so that `eval.json` can be recomputed from `examples.safetensors`).

use serde::{Deserialize, Serialize};

use super::examples::{Examples, Subset};
use super::mia;

/// One model's metrics on one split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// FA: top-1 accuracy (%) on the forget set.
    pub forget_acc: f64,
    /// UA = 100 − FA.
    pub unlearn_acc: f64,
    /// RA, TA.
    pub remain_acc: f64,
    pub test_acc: f64,
    pub forget_loss: f64,
    pub remain_loss: f64,
    pub test_loss: f64,
    /// The authors' MIA: share (%) of the forget set that a balanced logistic
    /// regression on softmax entropy (remain = member, test = non-member)
    /// calls member.
    pub mia_entropy: f64,
    /// SalUn's MIA-efficacy: share (%) of the forget set that an RBF SVC on the
    /// true-class confidence (|D_t| remain samples = member, test = non-member)
    /// calls non-member.
    pub mia_efficacy: f64,
    /// Mean KL(reference ‖ model) and JS over the forget set (with a reference).
    pub kl_forget: Option<f64>,
    pub js_forget: Option<f64>,
    /// Test accuracy (%) per class (NaN for a class without test samples).
    pub test_acc_per_class: Vec<f64>,
    pub forget: usize,
    pub remain: usize,
    pub test: usize,
    /// Members of the MIA-efficacy attack: the first min(|D_t|, |D_r|) remain samples.
    pub shadow_members: usize,
}

/// |model − reference| per metric, and the averages.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Gap {
    pub forget_acc: f64,
    pub remain_acc: f64,
    pub test_acc: f64,
    pub mia_entropy: f64,
    pub mia_efficacy: f64,
    /// Avg. Gap (DESIGN §2): mean over FA, RA, TA and the authors' MIA (entropy).
    pub avg_gap: f64,
    /// The same mean with MIA-efficacy in place of the entropy MIA.
    pub avg_gap_efficacy: f64,
}

impl Metrics {
    pub fn of(ex: &Examples, classes: usize) -> Metrics {
        let rows = |s: Subset| (0..ex.len()).filter(move |&i| ex.subset[i] == s as u8);
        let acc = |s: Subset| {
            let (hit, n) = rows(s).fold((0usize, 0usize), |(h, n), i| {
                (h + ex.correct[i] as usize, n + 1)
            });
            percent(hit, n)
        };
        let mean = |s: Subset, v: &[f32]| {
            let (sum, n) = rows(s).fold((0f64, 0usize), |(a, n), i| (a + v[i] as f64, n + 1));
            if n == 0 { f64::NAN } else { sum / n as f64 }
        };
        let values = |s: Subset, v: &[f32]| rows(s).map(|i| v[i] as f64).collect::<Vec<f64>>();
        let (forget, remain, test) = (
            rows(Subset::Forget).count(),
            rows(Subset::Remain).count(),
            rows(Subset::Test).count(),
        );

        let test_entropy = values(Subset::Test, &ex.entropy);
        let mia_entropy = mia::entropy_mia(
            &values(Subset::Remain, &ex.entropy),
            &test_entropy,
            &values(Subset::Forget, &ex.entropy),
        );
        // The remain rows are in index order: the first |D_t| of them.
        let mut shadow = values(Subset::Remain, &ex.confidence);
        shadow.truncate(test);
        let mia_efficacy = mia::efficacy_mia(
            &shadow,
            &values(Subset::Test, &ex.confidence),
            &values(Subset::Forget, &ex.confidence),
        );

        let mut per_class = vec![(0usize, 0usize); classes];
        for i in rows(Subset::Test) {
            if let Some(c) = per_class.get_mut(ex.label[i] as usize) {
                c.0 += ex.correct[i] as usize;
                c.1 += 1;
            }
        }
        let forget_acc = acc(Subset::Forget);
        Metrics {
            forget_acc,
            unlearn_acc: 100.0 - forget_acc,
            remain_acc: acc(Subset::Remain),
            test_acc: acc(Subset::Test),
            forget_loss: mean(Subset::Forget, &ex.loss),
            remain_loss: mean(Subset::Remain, &ex.loss),
            test_loss: mean(Subset::Test, &ex.loss),
            mia_entropy,
            mia_efficacy,
            kl_forget: ex.kl.as_ref().map(|kl| mean(Subset::Forget, kl)),
            js_forget: ex.js.as_ref().map(|js| mean(Subset::Forget, js)),
            test_acc_per_class: per_class.iter().map(|&(h, n)| percent(h, n)).collect(),
            forget,
            remain,
            test,
            shadow_members: shadow.len(),
        }
    }

    /// The gaps of `self` to `reference` (Retrain).
    pub fn gap(&self, reference: &Metrics) -> Gap {
        let d = |a: f64, b: f64| (a - b).abs();
        let fa = d(self.forget_acc, reference.forget_acc);
        let ra = d(self.remain_acc, reference.remain_acc);
        let ta = d(self.test_acc, reference.test_acc);
        let mia = d(self.mia_entropy, reference.mia_entropy);
        let eff = d(self.mia_efficacy, reference.mia_efficacy);
        Gap {
            forget_acc: fa,
            remain_acc: ra,
            test_acc: ta,
            mia_entropy: mia,
            mia_efficacy: eff,
            avg_gap: (fa + ra + ta + mia) / 4.0,
            avg_gap_efficacy: (fa + ra + ta + eff) / 4.0,
        }
    }
}

fn percent(hit: usize, n: usize) -> f64 {
    if n == 0 {
        f64::NAN
    } else {
        100.0 * hit as f64 / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-made outputs: 4 forget, 6 remain, 4 test rows, 3 classes.
    fn examples() -> Examples {
        let subset = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2];
        let correct = [1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0];
        let label = [0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 1, 2, 2];
        let n = subset.len();
        Examples {
            subset: subset.to_vec(),
            index: (0..n as i64).collect(),
            label: label.to_vec(),
            loss: (0..n).map(|i| i as f32).collect(),
            margin: vec![0.0; n],
            predicted: vec![0; n],
            // Members confident, non-members not; forget rows in between.
            confidence: vec![
                0.9, 0.2, 0.25, 0.95, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.3, 0.2, 0.1, 0.4,
            ],
            entropy: vec![
                0.01, 1.5, 1.2, 0.02, 0.0, 0.01, 0.02, 0.01, 0.0, 0.03, 1.0, 1.1, 1.3, 0.9,
            ],
            correct: correct.to_vec(),
            kl: Some(vec![
                1.0, 2.0, 3.0, 6.0, 0., 0., 0., 0., 0., 0., 0., 0., 0., 0.,
            ]),
            js: Some(vec![0.5; n]),
            logits: None,
        }
    }

    #[test]
    fn accuracies_losses_and_divergences_of_hand_made_outputs() {
        let m = Metrics::of(&examples(), 3);
        assert_eq!(m.forget_acc, 25.0);
        assert_eq!(m.unlearn_acc, 75.0);
        assert!((m.remain_acc - 500.0 / 6.0).abs() < 1e-12);
        assert_eq!(m.test_acc, 50.0);
        assert_eq!(m.forget_loss, 1.5); // (0 + 1 + 2 + 3) / 4
        assert_eq!(m.test_loss, 11.5);
        assert_eq!(m.kl_forget, Some(3.0));
        assert_eq!(m.js_forget, Some(0.5));
        // Test labels 0, 1, 2, 2 with correct 1, 1, 0, 0.
        assert_eq!(m.test_acc_per_class, vec![100.0, 100.0, 0.0]);
        assert_eq!((m.forget, m.remain, m.test, m.shadow_members), (4, 6, 4, 4));
    }

    #[test]
    fn both_attacks_call_confident_forget_rows_members() {
        let m = Metrics::of(&examples(), 3);
        // Forget rows 0 and 3 look like members (low entropy, high confidence),
        // rows 1 and 2 like non-members.
        assert_eq!(m.mia_entropy, 50.0);
        assert_eq!(m.mia_efficacy, 50.0);
    }

    #[test]
    fn gap_averages_fa_ra_ta_and_the_entropy_mia() {
        let a = Metrics {
            forget_acc: 10.0,
            remain_acc: 99.0,
            test_acc: 90.0,
            mia_entropy: 20.0,
            mia_efficacy: 70.0,
            ..Metrics::default()
        };
        let b = Metrics {
            forget_acc: 0.0,
            remain_acc: 100.0,
            test_acc: 88.0,
            mia_entropy: 1.0,
            mia_efficacy: 99.0,
            ..Metrics::default()
        };
        let g = a.gap(&b);
        assert_eq!(g.avg_gap, (10.0 + 1.0 + 2.0 + 19.0) / 4.0);
        assert_eq!(g.avg_gap_efficacy, (10.0 + 1.0 + 2.0 + 29.0) / 4.0);
    }
}
