//! The sharded sampler: which samples each rank reads at each step, as a pure
//! function of (seed, stream, epoch, rank, world size).
//!
//! An epoch is a seeded permutation of the split's members (keyed by seed,
//! stream and epoch, so the remain and forget streams are independent), cut
//! into *global* batches of `batch` samples. Global batch k is the same set of
//! samples whatever the world size; rank r of W takes a contiguous share of it,
//! shares differing in size by at most one (the first `len mod W` ranks take
//! one more). Every rank therefore steps the same number of times per epoch,
//! and over an epoch every sample is seen exactly once across ranks.
//!
//! Remainder: the last global batch holds `len mod batch` samples. With
//! `drop_last = false` it is kept (a small final step, and a rank may get an
//! empty share: losses are weighted by share size, so that is exact); with
//! `drop_last = true` those samples are skipped this epoch (a different
//! permutation includes them next epoch).
//!
//! The position within the run is a [`Cursor`] (epoch, batch) that a
//! checkpoint stores; restoring it continues with exactly the next batch.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Streams of one run: separate permutations for each role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Train = 1,
    Remain = 2,
    Forget = 3,
    Eval = 4,
    /// Remain ∪ forget (the baselines that train on both: RL, SalUn, Bad Teacher).
    Union = 5,
}

#[derive(Clone, Debug)]
pub struct Sampler {
    members: Vec<usize>,
    seed: u64,
    stream: Stream,
    batch: usize,
    shuffle: bool,
    drop_last: bool,
    cached: Option<(u64, Vec<usize>)>,
}

/// Where a sampler is: the next batch to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub batch: usize,
}

impl Cursor {
    /// Moves to the next batch of an epoch of `per_epoch` batches.
    pub fn advance(&mut self, per_epoch: usize) {
        self.batch += 1;
        if self.batch >= per_epoch {
            self.batch = 0;
            self.epoch += 1;
        }
    }
}

impl Sampler {
    /// `members`: the dataset indices of the split part (e.g. the remain set).
    pub fn new(
        members: Vec<usize>,
        seed: u64,
        stream: Stream,
        batch: usize,
        shuffle: bool,
        drop_last: bool,
    ) -> Self {
        assert!(batch > 0, "batch size 0");
        Sampler {
            members,
            seed,
            stream,
            batch,
            shuffle,
            drop_last,
            cached: None,
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }

    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            self.members.len() / self.batch
        } else {
            self.members.len().div_ceil(self.batch)
        }
    }

    /// The epoch's order of members.
    pub fn permutation(&mut self, epoch: u64) -> &[usize] {
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order = self.members.clone();
            if self.shuffle {
                Rng::keyed(&[self.seed, self.stream as u64, epoch]).shuffle(&mut order);
            }
            self.cached = Some((epoch, order));
        }
        &self.cached.as_ref().expect("just cached").1
    }

    /// Dataset indices of global batch `k` of `epoch`.
    pub fn global_batch(&mut self, epoch: u64, k: usize) -> Vec<usize> {
        assert!(
            k < self.batches_per_epoch(),
            "batch {k} of {}",
            self.batches_per_epoch()
        );
        let batch = self.batch;
        let order = self.permutation(epoch);
        order[k * batch..((k + 1) * batch).min(order.len())].to_vec()
    }

    /// This rank's share of global batch `k` of `epoch`.
    pub fn local_batch(&mut self, epoch: u64, k: usize, rank: usize, world: usize) -> Vec<usize> {
        let global = self.global_batch(epoch, k);
        let range = share(global.len(), rank, world);
        global[range].to_vec()
    }

    /// The batch at `cursor`, advancing it (to the next epoch after the last batch).
    pub fn next_local(&mut self, cursor: &mut Cursor, rank: usize, world: usize) -> Vec<usize> {
        let batch = self.local_batch(cursor.epoch, cursor.batch, rank, world);
        cursor.advance(self.batches_per_epoch());
        batch
    }
}

/// Rank `rank`'s contiguous share of `len` items split over `world` ranks.
pub fn share(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members() -> Vec<usize> {
        // A split part: every third index of 0..1000 (not 0..n, on purpose).
        (0..1000).filter(|i| i % 3 != 1).collect()
    }

    #[test]
    fn shares_are_disjoint_contiguous_and_cover() {
        for len in [0, 1, 5, 128, 131] {
            for world in 1..=5 {
                let mut next = 0;
                for rank in 0..world {
                    let r = share(len, rank, world);
                    assert_eq!(r.start, next);
                    assert!(r.len() == len / world || r.len() == len / world + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn every_sample_once_per_epoch_across_ranks_for_1_2_3_ranks() {
        let m = members();
        for world in 1..=3 {
            let mut s = Sampler::new(m.clone(), 5, Stream::Remain, 64, true, false);
            let mut seen = Vec::new();
            for k in 0..s.batches_per_epoch() {
                for rank in 0..world {
                    seen.extend(s.local_batch(2, k, rank, world));
                }
            }
            let mut sorted = seen.clone();
            sorted.sort();
            assert_eq!(sorted, m, "world {world}");
        }
    }

    #[test]
    fn global_batches_do_not_depend_on_world_size() {
        let mut one = Sampler::new(members(), 9, Stream::Forget, 50, true, false);
        let mut three = Sampler::new(members(), 9, Stream::Forget, 50, true, false);
        for k in 0..one.batches_per_epoch() {
            let joined: Vec<usize> = (0..3).flat_map(|r| three.local_batch(1, k, r, 3)).collect();
            assert_eq!(joined, one.local_batch(1, k, 0, 1));
        }
    }

    #[test]
    fn deterministic_and_different_per_epoch_seed_and_stream() {
        let mut a = Sampler::new(members(), 1, Stream::Remain, 32, true, false);
        let mut b = Sampler::new(members(), 1, Stream::Remain, 32, true, false);
        assert_eq!(a.global_batch(0, 3), b.global_batch(0, 3));
        assert_ne!(a.global_batch(0, 0), a.global_batch(1, 0));
        let mut other_seed = Sampler::new(members(), 2, Stream::Remain, 32, true, false);
        assert_ne!(a.global_batch(0, 0), other_seed.global_batch(0, 0));
        let mut forget = Sampler::new(members(), 1, Stream::Forget, 32, true, false);
        assert_ne!(a.global_batch(0, 0), forget.global_batch(0, 0));
    }

    #[test]
    fn drop_last_and_no_shuffle() {
        let mut s = Sampler::new((0..10).collect(), 0, Stream::Eval, 4, false, true);
        assert_eq!(s.batches_per_epoch(), 2);
        assert_eq!(s.global_batch(0, 1), vec![4, 5, 6, 7]);
        let mut keep = Sampler::new((0..10).collect(), 0, Stream::Eval, 4, false, false);
        assert_eq!(keep.batches_per_epoch(), 3);
        assert_eq!(keep.global_batch(0, 2), vec![8, 9]);
        assert_eq!(
            keep.local_batch(0, 2, 2, 3),
            Vec::<usize>::new(),
            "an empty share on the last rank"
        );
    }

    #[test]
    fn resuming_from_a_saved_cursor_continues_exactly() {
        let mut s = Sampler::new(members(), 4, Stream::Train, 100, true, false);
        let mut cursor = Cursor::default();
        let straight: Vec<Vec<usize>> = (0..25).map(|_| s.next_local(&mut cursor, 1, 2)).collect();
        // Stop after 13 batches (mid-epoch 1), save, restore into a fresh sampler.
        let mut c2 = Cursor::default();
        let mut first = Sampler::new(members(), 4, Stream::Train, 100, true, false);
        let mut resumed: Vec<Vec<usize>> =
            (0..13).map(|_| first.next_local(&mut c2, 1, 2)).collect();
        let saved = serde_json::to_string(&c2).unwrap();
        let mut c3: Cursor = serde_json::from_str(&saved).unwrap();
        assert_eq!(c3, Cursor { epoch: 1, batch: 6 });
        let mut fresh = Sampler::new(members(), 4, Stream::Train, 100, true, false);
        resumed.extend((13..25).map(|_| fresh.next_local(&mut c3, 1, 2)));
        assert_eq!(resumed, straight);
    }
}
