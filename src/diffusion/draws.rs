//! The random draws of a denoising step, each a pure function of
//! `(seed, stream, step, position in the global batch)`: the rows a rank
//! holds draw what they would draw in one rank's whole batch, so N ranks
//! compute the loss one rank computes.
//!
//! - timesteps in antithetic pairs as the DDPM release draws them
//!   (`t = cat([t, T − 1 − t])[:n]` pairs row k with row k + n/2 there;
//!   here positions 2k and 2k + 1 share a pair: the same distribution), or
//!   each row its own as ADM (DiT) draws them;
//! - the noise ε of each row, N(0, 1) from libtorch's CPU generator seeded
//!   by the row's key (the same numbers on any device);
//! - the dropped conditions (classifier-free guidance training), each row's
//!   own Bernoulli draw;
//! - the dropout keys of [`crate::model::unet::Dropout::Keyed`];
//! - and, for a classifier, the keys of its rows' stochastic depth
//!   ([`row_keys`], [`crate::model::Model::forward_keyed`]).

use tch::{Device, Kind, Tensor};

use crate::rng::{Rng, tag};

/// Which loss a draw belongs to, so that two losses of one step never share
/// noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Train = 1,
    Forget = 2,
    Remain = 3,
    Fisher = 4,
    Eval = 5,
    Union = 6,
    /// The Fisher pass over the remain set (the forget pass is `Fisher`).
    FisherRemain = 7,
    /// A second forward pass of the same rows towards a target (RL's
    /// relabelled prediction): its own condition dropout and dropout.
    Target = 8,
    /// SA's Fisher pass over the generated images (`step`: the image).
    SaFisher = 9,
    /// SA's forget half (the surrogate images; the replay half is `Remain`).
    Surrogate = 10,
}

/// The draws of the rows of one batch.
pub struct Draws {
    /// Timesteps `[N]`, float32 integers (as the release feeds the model).
    pub t: Tensor,
    /// ε `[N, C, H, W]`.
    pub noise: Tensor,
    /// Rows whose class is kept (`[N]` bool).
    pub keep: Tensor,
    /// Per-row dropout keys.
    pub dropout: Vec<u64>,
}

/// Where the draws of a step come from.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    pub seed: u64,
    pub purpose: Purpose,
    pub step: u64,
}

impl Draws {
    /// The draws of the rows at `positions` of the global batch, for images
    /// of `shape` `[C, H, W]`, `timesteps` T (in antithetic pairs or
    /// not), condition dropout `drop`.
    pub fn new(
        key: Key,
        positions: &[usize],
        shape: [i64; 3],
        timesteps: i64,
        antithetic: bool,
        drop: f64,
        device: Device,
    ) -> Self {
        let row =
            |what: u64, pos: u64| Rng::keyed(&[key.seed, what, key.purpose as u64, key.step, pos]);
        let t: Vec<f32> = positions
            .iter()
            .map(|&p| {
                if !antithetic {
                    return row(tag::TIMESTEP, p as u64).below(timesteps as u64) as f32;
                }
                let base = row(tag::TIMESTEP, (p / 2) as u64).below(timesteps as u64) as i64;
                (if p % 2 == 0 {
                    base
                } else {
                    timesteps - 1 - base
                }) as f32
            })
            .collect();
        let noise: Vec<Tensor> = positions
            .iter()
            .map(|&p| {
                tch::manual_seed((row(tag::NOISE, p as u64).next_u64() >> 1) as i64);
                Tensor::randn(shape, (Kind::Float, Device::Cpu))
            })
            .collect();
        let keep: Vec<bool> = positions
            .iter()
            .map(|&p| drop <= 0.0 || !row(tag::COND_DROP, p as u64).chance(drop))
            .collect();
        let dropout = positions
            .iter()
            .map(|&p| row(tag::DROPOUT, p as u64).next_u64())
            .collect();
        let noise = if noise.is_empty() {
            Tensor::zeros([0, shape[0], shape[1], shape[2]], (Kind::Float, device))
        } else {
            Tensor::stack(&noise, 0).to_device(device)
        };
        Draws {
            t: Tensor::from_slice(&t).to_device(device),
            noise,
            keep: Tensor::from_slice(&keep).to_device(device),
            dropout,
        }
    }
}

/// The keys of a classifier's rows at `positions` of the global batch
/// (its train-mode random choices: [`crate::model::Model::forward_keyed`]).
pub fn row_keys(key: Key, positions: &[usize]) -> Vec<u64> {
    positions
        .iter()
        .map(|&p| {
            Rng::keyed(&[
                key.seed,
                tag::DROP_PATH,
                key.purpose as u64,
                key.step,
                p as u64,
            ])
            .next_u64()
        })
        .collect()
}

/// Positions in `global` of the rows of `local`, a rank's share
/// (`global[share]`, in order, possibly with rows left out by the skip
/// policy).
pub fn positions(global: &[usize], share: std::ops::Range<usize>, local: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(local.len());
    let mut p = share.start;
    for &idx in local {
        while p < share.end && global[p] != idx {
            p += 1;
        }
        out.push(p.min(share.end.saturating_sub(1)));
        p += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_draws_the_same_wherever_it_is_held() {
        let key = Key {
            seed: 3,
            purpose: Purpose::Train,
            step: 7,
        };
        let all = Draws::new(
            key,
            &[0, 1, 2, 3, 4],
            [1, 4, 4],
            1000,
            true,
            0.1,
            Device::Cpu,
        );
        let part = Draws::new(key, &[3, 4], [1, 4, 4], 1000, true, 0.1, Device::Cpu);
        assert!(all.noise.narrow(0, 3, 2).equal(&part.noise));
        assert!(all.t.narrow(0, 3, 2).equal(&part.t));
        assert_eq!(all.dropout[3..], part.dropout[..]);
        let t: Vec<f32> = Vec::try_from(&all.t).unwrap();
        assert_eq!(t[0] + t[1], 999.0, "antithetic pair");
        assert_eq!(t[2] + t[3], 999.0, "antithetic pair");
    }

    #[test]
    fn positions_follow_the_share_and_skip_left_out_rows() {
        let global = [10, 11, 12, 13, 14, 15];
        assert_eq!(positions(&global, 3..6, &[13, 14, 15]), vec![3, 4, 5]);
        assert_eq!(positions(&global, 3..6, &[13, 15]), vec![3, 5]);
        assert_eq!(positions(&global, 0..3, &[10, 11, 12]), vec![0, 1, 2]);
    }
}
