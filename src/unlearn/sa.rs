//! SA, Selective Amnesia (Heck et al., NeurIPS 2023), on a class-conditional
//! diffusion model, as the DDPM release runs it (`[sa]`; the release's
//! `sample.py --mode sample_classes`, `fim.py`/`save_fim` and `sa_forget`
//! with `cifar10_sa.yml`). The data is never read: the original's own
//! generated images stand in for it.
//!
//! Before the loop, on the original weights:
//! 1. **Replay set.** `sa.per_class` images of every class (the forget
//!    class too when `sa.fisher_forget_class`, for the Fisher only) are
//!    generated with `[sample]`'s sampler and guidance (`sa.sample_steps`
//!    steps when set), from the original's
//!    EMA when `sample.weights = "ema"` and `ema.safetensors` sits beside
//!    `unlearn.from` (the release samples its checkpoint's EMA), else from
//!    the raw weights. Images are seeded as `sfron sample` seeds them, kept
//!    as uint8 as the release keeps PNGs.
//! 2. **Fisher.** `F = (1/M) Σ_i (∇ Σ_t ℓ(x_i, t, ε_it))²` over the M
//!    generated images: each image's gradient of its denoising loss summed
//!    over timesteps (the release sums all T = 1000, in `n_chunks` forward
//!    passes), squared, averaged. Here the sum runs over `sa.fisher_timesteps`
//!    evenly spaced timesteps scaled by T / `fisher_timesteps` (= 1 for the
//!    release's value). As the release: dropout off, condition dropout at
//!    the training rate (`mode="train"` with the loss's default
//!    `cond_drop_prob = 0.1`), fresh noise per (image, timestep).
//!    **Deviation:** the release feeds `fim.py` the PNGs through `ToTensor`
//!    only, i.e. pixels in [0, 1] while the model was trained on [−1, 1];
//!    here the Fisher sees the images in the model's range, as the replay
//!    does. **Estimator:** with `k` < T timesteps scaled by T/k, the mean
//!    part of `(Σ_t g_t)²` is estimated without bias but its noise part
//!    (the per-timestep variances) is inflated by T/k; set T timesteps (the
//!    default) for the release's quantity. Images are sharded across ranks and the squared gradients
//!    summed, so the Fisher is the one rank's.
//!
//! Iteration `t` (train mode, no condition dropout; the release's
//! `cond_drop_prob=0.0`), with `B = unlearn.batch`:
//!
//! `L = (1/B) Σ_{i≤B} ℓ(u_i, c_f) + γ (1/B) Σ_{i≤B} ℓ(x_i, c_i)
//!      + λ Σ_k F_k (θ_k − θ*_k)²`,
//!
//! `u_i` uniform noise images in [−1, 1] labelled with the forget class
//! (the surrogate), `(x_i, c_i)` the next replay batch of the remaining
//! classes (an endless sequence of seeded shuffles of the replay set, so a
//! resume needs no cursor), θ* the original weights. The gradient's L2 norm
//! is clipped to `sa.clip` and Adam steps at `sa.lr`. The EWC term's
//! gradient `2λF(θ − θ*)` is added after the reduction, identically on
//! every rank. Noise and timesteps are keyed per row as every denoising
//! step's are ([`crate::diffusion::draws`]); the two halves draw from
//! separate streams (the release shares one timestep vector between them:
//! the same distribution). The run's EMA decays at `sa.ema_decay`
//! (`cifar10_sa.yml`: 0.9999).
//!
//! The replay set and the Fisher are kept in the run folder
//! (`sa_prep.safetensors`, keyed by everything they depend on), so a
//! resumed run does not generate them again.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::{Budget, Edit, Iteration, Method, Session};
use crate::config::raw::{DecaySchedule, SaSection};
use crate::data::sampler::share;
use crate::diffusion::draws::{Draws, Key, Purpose};
use crate::diffusion::loss::{Denoising, Rows, per_sample};
use crate::engine::progress::Progress;
use crate::engine::{Local, Scale};
use crate::fsx::sha256_hex;
use crate::model::unet::{Cond, Dropout};
use crate::model::weights;
use crate::rng::{Rng, tag};

/// The file of the prepared replay set and Fisher in the run folder.
pub const PREP_FILE: &str = "sa_prep.safetensors";
const KEY: &str = "sfron.sa.key";

pub struct Sa {
    plan: SaSection,
    forget_class: i64,
    /// The remaining classes' generated images `[N, C, H, W]` in [−1, 1]
    /// and their labels `[N]`.
    replay: Option<(Tensor, Tensor)>,
    /// Per parameter: the Fisher diagonal and the original weights θ*.
    ewc: Vec<(Tensor, Tensor)>,
    /// The replay order of one epoch (cached: a batch mostly stays in one).
    order: Option<(u64, Vec<i64>)>,
}

impl Sa {
    pub fn new(plan: SaSection) -> Self {
        Sa {
            plan,
            forget_class: 0,
            replay: None,
            ewc: Vec::new(),
            order: None,
        }
    }

    /// Replay rows at global positions `positions` of iteration `t`'s batch.
    fn replay_rows(&mut self, seed: u64, t: u64, batch: u64, positions: &[usize]) -> Vec<i64> {
        let n = self.replay.as_ref().map_or(0, |r| r.1.size()[0]) as u64;
        positions
            .iter()
            .map(|&p| {
                let q = t * batch + p as u64;
                let epoch = q / n;
                if self.order.as_ref().is_none_or(|o| o.0 != epoch) {
                    self.order = Some((epoch, shuffled(n, seed, epoch)));
                }
                self.order.as_ref().expect("set above").1[(q % n) as usize]
            })
            .collect()
    }
}

/// A seeded permutation of `0..n` (Fisher-Yates).
fn shuffled(n: u64, seed: u64, epoch: u64) -> Vec<i64> {
    let mut rng = Rng::keyed(&[seed, tag::REPLAY, epoch]);
    let mut v: Vec<i64> = (0..n as i64).collect();
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

/// Uniform noise images in [−1, 1], one per global position, keyed.
fn surrogate(seed: u64, t: u64, positions: &[usize], shape: [i64; 3]) -> Tensor {
    let rows: Vec<Tensor> = positions
        .iter()
        .map(|&p| {
            let key = Rng::keyed(&[seed, tag::SURROGATE, t, p as u64]).next_u64() >> 1;
            tch::manual_seed(key as i64);
            Tensor::rand(shape, (Kind::Float, Device::Cpu)) * 2.0 - 1.0
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// The original's EMA beside `unlearn.from`, when the replay is sampled
/// from it (`sample.weights = "ema"` and the file exists).
fn replay_ema(s: &Session) -> Option<std::path::PathBuf> {
    crate::sample::ema_beside(s.plan.unlearn.from.as_ref()?, s.plan.sample.weights)
}

/// What the prepared file depends on.
fn prep_key(s: &Session, plan: &SaSection, class: i64) -> Result<String> {
    let mut deps = plan.clone();
    // The loop's settings do not change what is prepared.
    deps.iterations = 0;
    deps.lr = 0.0;
    deps.gamma = 0.0;
    deps.lambda = 0.0;
    deps.clip = 0.0;
    deps.ema_decay = 0.0;
    let mut sample = s.plan.sample.clone();
    sample.from = String::new();
    sample.grid = 0;
    // The weights that generate the replay set.
    let replay = replay_ema(s)
        .map(|p| weights::identify(&weights::read(&p)?, &p))
        .transpose()?;
    let recipe = json!({
        "from": s.from_hash, "replay_weights": replay, "seed": s.plan.seed, "class": class,
        "sa": deps,
        "sample": sample, "diffusion": s.plan.diffusion,
        "arch": s.plan.model.arch.name(),
    });
    Ok(format!(
        "sha256:{}",
        sha256_hex(recipe.to_string().as_bytes())
    ))
}

impl Sa {
    /// The generated images of `classes` (uint8 `[M, C, H, W]`, labels
    /// `[M]`), on every rank.
    fn generate(
        &self,
        s: &Session,
        classes: &[i64],
        progress: &mut Progress,
    ) -> Result<(Tensor, Tensor)> {
        let loaded;
        let (model, which) = if let Some(ema) = replay_ema(s) {
            loaded = crate::sample::load_denoiser(s.plan, &ema, s.device)?;
            (&loaded, "EMA")
        } else {
            (&s.model, "raw")
        };
        let rows: Vec<(i64, u64)> = classes
            .iter()
            .flat_map(|&c| (0..self.plan.per_class).map(move |i| (c, i)))
            .collect();
        progress.say(&format!(
            "SA: generating {} images of classes {classes:?} with the original's {which} weights",
            rows.len()
        ));
        let schedule = s.task.denoising(false).expect("a denoiser").schedule;
        let mut plan = s.plan.clone();
        if self.plan.sample_steps > 0 {
            plan.sample.steps = self.plan.sample_steps;
        }
        // Pixel data only (unlearn refuses SA on latents before it starts).
        let images = crate::sample::generate_sharded(
            s.comm,
            (model, None),
            schedule,
            &plan,
            &rows,
            progress,
        )?
        .0;
        let mut bytes = match images {
            Some(images) => Vec::<u8>::try_from(images.reshape([-1]))?,
            None => Vec::new(),
        };
        s.comm.broadcast_bytes(&mut bytes, 0);
        let shape = s.model.image_shape().context("a denoiser")?;
        let images =
            Tensor::from_slice(&bytes).view([rows.len() as i64, shape[0], shape[1], shape[2]]);
        let labels = Tensor::from_slice(&rows.iter().map(|r| r.0).collect::<Vec<_>>());
        Ok((images, labels))
    }

    /// The Fisher (module docs) of `images` (in [−1, 1]) labelled `labels`,
    /// per parameter; `None`: a stop was requested meanwhile.
    fn fisher(
        &self,
        s: &mut Session,
        images: &Tensor,
        labels: &Tensor,
        progress: &mut Progress,
    ) -> Result<Option<Vec<Tensor>>> {
        let den = s.task.denoising(false).expect("a denoiser");
        let total = den.schedule.steps();
        let k = (self.plan.fisher_timesteps as i64).min(total);
        let ts: Vec<f32> = (0..k).map(|j| (j * total / k) as f32).collect();
        let scale = total as f64 / k as f64;
        let cond_drop = s.plan.diffusion.cond_drop;
        let m = images.size()[0] as usize;
        let shape = s.model.image_shape().context("a denoiser")?;
        let mine = share(m, s.comm.rank(), s.comm.size());
        let numel = s.engine.flat_grad().numel() as i64;
        let mut sum = Tensor::zeros([numel], (Kind::Double, s.device));
        for (done, i) in mine.clone().enumerate() {
            s.engine.zero_grad();
            let x = images.get(i as i64).to_device(s.device);
            let c = labels.get(i as i64);
            let key = Key {
                seed: s.plan.seed,
                purpose: Purpose::SaFisher,
                step: i as u64,
            };
            let positions: Vec<usize> = (0..k as usize).collect();
            for chunk in positions.chunks(self.plan.fisher_batch as usize) {
                let n = chunk.len() as i64;
                let antithetic = den.schedule.antithetic();
                let mut draws =
                    Draws::new(key, chunk, shape, total, antithetic, cond_drop, s.device);
                draws.t =
                    Tensor::from_slice(&ts[chunk[0]..chunk[0] + chunk.len()]).to_device(s.device);
                let x0 = x.unsqueeze(0).expand([n, -1, -1, -1], false);
                let cs = c.expand([n], false).to_device(s.device);
                let xt = den.schedule.noised(&x0, &draws.t, &draws.noise);
                let cond = Cond {
                    t: &draws.t,
                    c: &cs,
                    keep: (cond_drop > 0.0).then_some(&draws.keep),
                };
                let out = s.model.denoise(&xt, &cond, &Dropout::Off);
                let loss = den
                    .schedule
                    .row_losses(&out, &x0, &xt, &draws.t, &draws.noise)
                    .sum(Kind::Float)
                    * scale;
                s.engine.backward(&loss);
            }
            let _ = sum.g_add_(&s.engine.flat_local_grad().to_kind(Kind::Double).square());
            progress.show(
                done as u64 + 1,
                &format!("SA Fisher: {} of {} images", done + 1, mine.len()),
            );
        }
        if !s.end_pass(&mut sum)? {
            return Ok(None);
        }
        let fisher = (sum / m as f64).to_kind(Kind::Float);
        Ok(Some(split_like(&fisher, &s.engine.params)))
    }
}

/// A flat tensor cut into tensors shaped as `params`.
fn split_like(flat: &Tensor, params: &[Tensor]) -> Vec<Tensor> {
    let mut offset = 0;
    params
        .iter()
        .map(|p| {
            let n = p.numel() as i64;
            let part = flat.narrow(0, offset, n).view(p.size().as_slice()).copy();
            offset += n;
            part
        })
        .collect()
}

impl Method for Sa {
    fn budget(&mut self, _: &mut Session) -> Budget {
        Budget::iterations_with(self.plan.iterations, self.plan.lr, DecaySchedule::Constant)
    }

    fn ema_decay(&self) -> Option<f64> {
        Some(self.plan.ema_decay)
    }

    fn prepare(&mut self, s: &mut Session, progress: &mut Progress) -> Result<bool> {
        let class = s.inputs.forget_class()?;
        self.forget_class = class;
        let classes: Vec<i64> = (0..s.model.classes)
            .filter(|&c| self.plan.fisher_forget_class || c != class)
            .collect();
        let key = prep_key(s, &self.plan, class)?;
        let path = s.plan.run_dir.join(PREP_FILE);
        // Rank 0 decides whether the prepared file is reusable; every rank
        // gets its bytes.
        let mut bytes = Vec::new();
        if s.comm.is_root() && path.is_file() {
            let b = weights::read(&path)?;
            let (_, meta) = weights::parse(&b, &path)?;
            if meta.get(KEY) == Some(&key) {
                bytes = b;
            }
        }
        s.comm.broadcast_bytes(&mut bytes, 0);
        let (images, labels, fisher) = if bytes.is_empty() {
            let started = std::time::Instant::now();
            let (images, labels) = self.generate(s, &classes, progress)?;
            let x = images.to_kind(Kind::Float) / 127.5 - 1.0;
            let Some(fisher) = self.fisher(s, &x, &labels, progress)? else {
                return Ok(false);
            };
            if s.comm.is_root() {
                let mut tensors = vec![
                    ("replay.images".to_string(), images.shallow_clone()),
                    ("replay.labels".to_string(), labels.shallow_clone()),
                ];
                for (name, f) in s.engine.names.iter().zip(&fisher) {
                    tensors.push((format!("fisher.{name}"), f.shallow_clone()));
                }
                let mut meta = BTreeMap::new();
                meta.insert(KEY.to_string(), key);
                std::fs::create_dir_all(&s.plan.run_dir)?;
                weights::save(&path, &tensors, &meta)?;
            }
            progress.say(&format!(
                "SA: replay set and Fisher ({} images) in {:.1} s",
                images.size()[0],
                started.elapsed().as_secs_f64()
            ));
            (images, labels, fisher)
        } else {
            let (tensors, _) = weights::parse(&bytes, &path)?;
            let get = |name: &str| {
                tensors
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.shallow_clone())
                    .with_context(|| format!("{}: no {name}", path.display()))
            };
            let fisher = s
                .engine
                .names
                .iter()
                .map(|n| get(&format!("fisher.{n}")))
                .collect::<Result<Vec<_>>>()?;
            progress.say(&format!(
                "SA: replay set and Fisher from {}",
                path.display()
            ));
            (get("replay.images")?, get("replay.labels")?, fisher)
        };
        // Replay: the remaining classes only.
        let keep = labels.ne(class).nonzero().squeeze_dim(1);
        if keep.size()[0] == 0 {
            bail!("SA: no remaining class to replay (the data has one class)");
        }
        let x = images.index_select(0, &keep).to_kind(Kind::Float) / 127.5 - 1.0;
        self.replay = Some((x.to_device(s.device), labels.index_select(0, &keep)));
        self.ewc = fisher
            .into_iter()
            .zip(&s.engine.params)
            .map(|(f, p)| (f.to_device(s.device), p.detach().copy()))
            .collect();
        self.order = None;
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        s.engine.zero_grad();
        let batch = s.plan.unlearn.batch as u64;
        let positions: Vec<usize> = share(batch as usize, s.comm.rank(), s.comm.size()).collect();
        let seed = s.plan.seed;
        let mut local = Local::default();
        if !positions.is_empty() {
            let den = Denoising {
                cond_drop: 0.0,
                ..s.task.denoising(false).expect("a denoiser")
            };
            let shape = s.model.image_shape().context("a denoiser")?;
            let (steps, antithetic) = (den.schedule.steps(), den.schedule.antithetic());
            let draws = |purpose| {
                let key = Key {
                    seed,
                    purpose,
                    step: t,
                };
                Draws::new(key, &positions, shape, steps, antithetic, 0.0, s.device)
            };
            let n = positions.len() as i64;
            let forget = Rows {
                x0: surrogate(seed, t, &positions, shape).to_device(s.device),
                c: Tensor::full([n], self.forget_class, (Kind::Int64, s.device)),
                draws: draws(Purpose::Surrogate),
            };
            let idx = self.replay_rows(seed, t, batch, &positions);
            let idx = Tensor::from_slice(&idx).to_device(s.device);
            let (x, c) = self.replay.as_ref().expect("prepared");
            let remember = Rows {
                x0: x.index_select(0, &idx),
                c: c.to_device(s.device).index_select(0, &idx),
                draws: draws(Purpose::Remain),
            };
            let f = per_sample(&s.model, &den, &forget, true).sum(Kind::Float);
            let r = per_sample(&s.model, &den, &remember, true).sum(Kind::Float);
            let loss = (f + r * self.plan.gamma) / batch as f64;
            local.loss_sum = loss.double_value(&[]);
            s.engine.backward(&loss);
        }
        local.count = f64::from(u8::from(s.comm.is_root()));
        let mut out = s.reduce(local, Scale::Sum, t)?;
        // EWC: + λ Σ F (θ − θ*)², gradient 2λ F (θ − θ*), on the reduced
        // gradient (the same on every rank).
        let lambda = self.plan.lambda;
        if lambda > 0.0 {
            let mut penalty = 0.0;
            tch::no_grad(|| {
                for ((p, g), (f, anchor)) in
                    s.engine.params.iter().zip(s.engine.grads()).zip(&self.ewc)
                {
                    let weighted = f * (p - anchor);
                    penalty += (&weighted * (p - anchor))
                        .sum(Kind::Double)
                        .double_value(&[]);
                    let _ = g.shallow_clone().g_add_(&(weighted * (2.0 * lambda)));
                }
            });
            out.loss_sum += lambda * penalty;
        }
        let edit = Edit {
            clip: (self.plan.clip > 0.0).then_some(self.plan.clip),
            ..Edit::default()
        };
        s.finish(
            &mut out,
            &edit,
            s.lr(t),
            &format!("iteration {t} (SA step)"),
        )?;
        Ok(Iteration::one(super::Which::Union, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_order_is_a_seeded_permutation() {
        let a = shuffled(50, 1, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, shuffled(50, 1, 0));
        assert_ne!(a, shuffled(50, 1, 1));
        assert_ne!(a, shuffled(50, 2, 0));
    }

    #[test]
    fn surrogate_images_are_uniform_in_the_data_range_and_keyed_per_position() {
        let all = surrogate(3, 7, &[0, 1, 2], [1, 8, 8]);
        let part = surrogate(3, 7, &[2], [1, 8, 8]);
        assert!(all.get(2).equal(&part.get(0)));
        assert!(all.min().double_value(&[]) >= -1.0 && all.max().double_value(&[]) <= 1.0);
        assert!(all.mean(Kind::Float).double_value(&[]).abs() < 0.2);
    }
}
