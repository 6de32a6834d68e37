//! The ADM Gaussian diffusion DiT trains and samples with
//! ([`sfron::diffusion::adm`]) against a line-for-line PyTorch re-declaration
//! of DiT's diffusion/ package (tests/golden/adm_reference.py): the 250-step
//! respacing's timestep map, q_sample, the training loss (MSE, plus the
//! variational bound with a learned variance, the t = 0 decoder NLL
//! included), p_sample and DDIM (η 0 and 1), clipped and not, for the full
//! 1000-step process and its 250-step respacing, learned-range and
//! fixed-large variances.

use std::collections::BTreeMap;

use sfron::diffusion::adm::{Process, Variance, linear_betas};
use sfron::model::weights;
use tch::{Kind, Tensor};

mod support;
use support::temp_dir;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/adm_reference.py");

/// Both sides evaluate the same float32 expressions on coefficients rounded
/// from the same float64 tables; they differ in the order of a few
/// additions (normal_kl's terms), in libm's exp/log/tanh (≤ 1 ulp each) and
/// in mean_flat's summation order over C·H·W = 144 elements. Each value
/// passes through at most 32 float32 operations whose relative condition
/// is at most 16 (the KL's `exp(Δ log σ²)` and the decoder NLL's
/// `log(Φ(a) − Φ(b))` on bins of width 2/255 with σ ≥ 0.1): 32 · 16 · 2⁻²⁴
/// ≈ 3.1e-5 of the largest value compared. A wrong coefficient (β̃ for β,
/// the respacing's map off by one step, a missing `/ ln 2`) moves a value
/// by 1e-3 or more.
const TOLERANCE: f64 = 32.0 * 16.0 / 16_777_216.0;

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn the_adm_process_gives_dits_losses_and_sampling_steps() {
    let dir = temp_dir("adm-golden");
    support::run_python(REFERENCE, &["make".as_ref(), dir.as_os_str()]);
    let io: BTreeMap<String, Tensor> = weights::load(&dir.join("adm.safetensors"))
        .unwrap()
        .0
        .into_iter()
        .collect();
    let betas = linear_betas(1000);
    let (x0, noise, z, out) = (&io["x0"], &io["noise"], &io["z"], &io["out"]);
    let c = x0.size()[1];
    let mut worst = (String::new(), 0f64);
    let mut check = |name: &str, ours: &Tensor| {
        let theirs = &io[name];
        assert_eq!(ours.size(), theirs.size(), "{name}");
        let rel = max_abs(&(ours - theirs)) / max_abs(theirs).max(1e-30);
        assert!(
            rel <= TOLERANCE,
            "{name}: relative difference {rel:e} (allowed {TOLERANCE:e})"
        );
        if rel > worst.1 {
            worst = (name.to_string(), rel);
        }
    };
    for (proc, respacing) in [("full", ""), ("r250", "250")] {
        for (var_name, var) in [
            ("learned", Variance::LearnedRange),
            ("fixed", Variance::FixedLarge),
        ] {
            let p = Process::spaced(&betas, respacing, var).unwrap();
            let t = io[&format!("{proc}_t")].shallow_clone();
            let map = &io[&format!("{proc}_map")];
            let steps = Tensor::arange(p.steps(), (Kind::Int64, tch::Device::Cpu));
            let ours_map = p.model_timesteps(&steps).to_kind(Kind::Int64);
            assert!(ours_map.equal(map), "{proc}: the timestep map differs");
            let o = match var {
                Variance::LearnedRange => out.shallow_clone(),
                Variance::FixedLarge => out.narrow(1, 0, c),
            };
            let xt = p.q_sample(x0, &t, noise);
            check(&format!("{proc}_xt"), &xt);
            let xt = io[&format!("{proc}_xt")].shallow_clone();
            check(
                &format!("{proc}_{var_name}_loss"),
                &p.training_losses(&o, x0, &xt, &t, noise),
            );
            for clip in [false, true] {
                let sfx = if clip { "_clip" } else { "" };
                check(
                    &format!("{proc}_{var_name}_psample{sfx}"),
                    &p.p_sample(&o, &xt, &t, z, clip),
                );
                for eta in [0, 1] {
                    check(
                        &format!("{proc}_{var_name}_ddim{eta}{sfx}"),
                        &p.ddim_sample(&o, &xt, &t, z, f64::from(eta), clip),
                    );
                }
            }
        }
    }
    println!(
        "worst relative difference: {} {:e} (allowed {TOLERANCE:e})",
        worst.0, worst.1
    );
}

/// The variational-bound term trains the variance only: the loss's gradient
/// with respect to the ε channels is the MSE's alone.
#[test]
fn the_bound_reaches_the_variance_channels_only() {
    let p = Process::spaced(&linear_betas(1000), "", Variance::LearnedRange).unwrap();
    tch::manual_seed(3);
    let x0 = Tensor::rand([2, 3, 4, 4], (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0;
    let noise = Tensor::randn([2, 3, 4, 4], (Kind::Float, tch::Device::Cpu));
    let t = Tensor::from_slice(&[0i64, 400]);
    let xt = p.q_sample(&x0, &t, &noise);
    let out = Tensor::randn([2, 6, 4, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let loss = p
        .training_losses(&out, &x0, &xt, &t, &noise)
        .sum(Kind::Float);
    let g = Tensor::run_backward(&[loss], &[&out], false, false)
        .pop()
        .unwrap();
    // d/dε̂ mean((ε − ε̂)²) = −2 (ε − ε̂) / (C H W).
    let mse_grad = (&noise - out.narrow(1, 0, 3).detach()) * (-2.0 / 48.0);
    assert!(max_abs(&(g.narrow(1, 0, 3) - mse_grad)) <= 1e-7);
    assert!(
        max_abs(&g.narrow(1, 3, 3)) > 1e-4,
        "the variance channels get a gradient"
    );
}
