//! The input pipeline: decode and augment on worker threads, deliver batches
//! as tensors in order, with a bounded number of batches in flight.
//!
//! The main thread submits batches (lists of dataset indices) and takes them
//! back in submission order; workers pull jobs from a shared queue, so at most
//! `prefetch` batches are decoded ahead (memory stays bounded). Each worker
//! owns its resizer. Augmentation randomness is keyed by (seed, epoch, sample
//! index), so a batch's pixels do not depend on which worker made it or on
//! the number of workers. With `workers = 0` batches are made on the calling
//! thread (cheapest for small in-memory data such as MNIST).
//!
//! Corrupt or unreadable images: by default an error naming the file; with
//! [`CorruptPolicy::Skip`] the sample is left out of its batch, counted, and
//! its name logged once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fast_image_resize::Resizer;
use tch::{Device, Kind, Tensor};

use super::DataError;
use super::dataset::Dataset;
use super::sampler::{Cursor, Sampler};
use super::transform::Transform;
use crate::rng::Rng;

/// What to do with an image that cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptPolicy {
    Error,
    Skip,
}

#[derive(Clone, Debug)]
pub struct LoaderOptions {
    /// Decode threads; 0 decodes on the calling thread.
    pub workers: usize,
    /// Batches decoded ahead of the consumer (at least 1).
    pub prefetch: usize,
    pub on_corrupt: CorruptPolicy,
    /// Seed of the augmentations.
    pub seed: u64,
    /// Put batches in pinned memory (for asynchronous copies to CUDA).
    pub pin_memory: bool,
}

/// A batch: images `[n, C, H, W]` (f32, normalised) and labels `[n]` (i64),
/// on the CPU (pinned when asked).
#[derive(Debug)]
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    /// Dataset indices of the rows, in order.
    pub indices: Vec<usize>,
    /// Samples of the job left out under the skip policy.
    pub skipped: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

struct Job {
    seq: u64,
    epoch: u64,
    indices: Vec<usize>,
}

type Done = (u64, Result<Batch, DataError>);

struct Shared {
    dataset: Arc<Dataset>,
    transform: Transform,
    options: LoaderOptions,
    skipped: AtomicUsize,
}

pub struct Loader {
    shared: Arc<Shared>,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    /// Jobs kept for `workers = 0`.
    local_jobs: std::collections::VecDeque<Job>,
    local_resizer: Resizer,
    early: BTreeMap<u64, Result<Batch, DataError>>,
    next_seq: u64,
    next_out: u64,
}

impl Loader {
    pub fn new(dataset: Arc<Dataset>, transform: Transform, options: LoaderOptions) -> Self {
        let shared = Arc::new(Shared {
            dataset,
            transform,
            options,
            skipped: AtomicUsize::new(0),
        });
        let (job_tx, job_rx) = channel::<Job>();
        let (done_tx, done) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..shared.options.workers)
            .map(|w| {
                let (shared, job_rx, done_tx) = (shared.clone(), job_rx.clone(), done_tx.clone());
                let span = tracing::Span::current();
                std::thread::Builder::new()
                    .name(format!("sfron-data-{w}"))
                    .spawn(move || {
                        let _entered = span.enter();
                        let mut resizer = Resizer::new();
                        loop {
                            let job = job_rx.lock().expect("job queue poisoned").recv();
                            let Ok(job) = job else { break };
                            let result = make_batch(&shared, &job, &mut resizer);
                            if done_tx.send((job.seq, result)).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawn data worker")
            })
            .collect();
        Loader {
            shared,
            jobs: Some(job_tx),
            done,
            workers,
            local_jobs: Default::default(),
            local_resizer: Resizer::new(),
            early: BTreeMap::new(),
            next_seq: 0,
            next_out: 0,
        }
    }

    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.shared.dataset
    }

    /// Queues a batch of `indices` (augmented as `epoch`).
    pub fn submit(&mut self, epoch: u64, indices: Vec<usize>) {
        let job = Job {
            seq: self.next_seq,
            epoch,
            indices,
        };
        self.next_seq += 1;
        if self.workers.is_empty() {
            self.local_jobs.push_back(job);
        } else {
            self.jobs
                .as_ref()
                .expect("loader running")
                .send(job)
                .expect("data workers alive");
        }
    }

    /// Batches submitted and not yet taken.
    pub fn in_flight(&self) -> usize {
        (self.next_seq - self.next_out) as usize
    }

    /// The next batch in submission order (blocks until it is ready).
    pub fn take(&mut self) -> Result<Batch, DataError> {
        assert!(self.in_flight() > 0, "Loader::take with nothing submitted");
        let want = self.next_out;
        self.next_out += 1;
        if self.workers.is_empty() {
            let job = self.local_jobs.pop_front().expect("a queued job");
            return make_batch(&self.shared, &job, &mut self.local_resizer);
        }
        loop {
            if let Some(result) = self.early.remove(&want) {
                return result;
            }
            let (seq, result) = self.done.recv().expect("data workers alive");
            self.early.insert(seq, result);
        }
    }

    /// Samples skipped as corrupt so far.
    pub fn skipped(&self) -> usize {
        self.shared.skipped.load(Ordering::Relaxed)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.jobs = None; // workers see the queue close and exit
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn make_batch(shared: &Shared, job: &Job, resizer: &mut Resizer) -> Result<Batch, DataError> {
    let t = &shared.transform;
    let per = t.numel();
    let [c, h, w] = t.shape;
    let n = job.indices.len();
    // Written in place: no zero-fill, no copy into a tensor afterwards.
    let images = Tensor::empty(
        [n as i64, c as i64, h as i64, w as i64],
        (Kind::Float, Device::Cpu),
    );
    // SAFETY: `images` is a fresh contiguous CPU f32 tensor of n·per elements,
    // owned here and not aliased until it is returned.
    let pixels = unsafe { std::slice::from_raw_parts_mut(images.data_ptr() as *mut f32, n * per) };
    let mut labels = Vec::with_capacity(job.indices.len());
    let mut kept = Vec::with_capacity(job.indices.len());
    for &i in &job.indices {
        let slot = kept.len();
        let result = shared.dataset.load(i).and_then(|img| {
            let mut rng = Rng::keyed(&[
                shared.options.seed,
                job.epoch,
                i as u64,
                crate::rng::tag::AUGMENT,
            ]);
            t.apply(
                &img,
                &mut rng,
                resizer,
                &mut pixels[slot * per..(slot + 1) * per],
            )
            .map_err(|reason| DataError::Corrupt {
                sample: shared.dataset.describe(i),
                reason,
            })
        });
        match result {
            Ok(()) => {
                kept.push(i);
                labels.push(shared.dataset.labels[i]);
            }
            Err(e) if shared.options.on_corrupt == CorruptPolicy::Skip => {
                let total = shared.skipped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(skipped_so_far = total, "skipping: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    let mut images = if kept.len() == n {
        images
    } else {
        images.narrow(0, 0, kept.len() as i64)
    };
    let mut labels = Tensor::from_slice(&labels).to_kind(Kind::Int64);
    if shared.options.pin_memory && tch::Cuda::is_available() {
        images = images.pin_memory(Device::Cuda(0));
        labels = labels.pin_memory(Device::Cuda(0));
    }
    let skipped = job.indices.len() - kept.len();
    Ok(Batch {
        images,
        labels,
        indices: kept,
        skipped,
    })
}

/// A sampler and a loader together: this rank's batches of one stream, read
/// ahead, with the position of the last batch *taken* (what a checkpoint saves).
pub struct BatchStream {
    sampler: Sampler,
    loader: Loader,
    submitted: Cursor,
    taken: Cursor,
    rank: usize,
    world: usize,
}

impl BatchStream {
    /// Starts reading at `start` (a fresh `Cursor::default()` or a restored one).
    pub fn new(sampler: Sampler, loader: Loader, start: Cursor, rank: usize, world: usize) -> Self {
        let mut stream = BatchStream {
            sampler,
            loader,
            submitted: start,
            taken: start,
            rank,
            world,
        };
        stream.fill();
        stream
    }

    fn fill(&mut self) {
        let ahead = self.loader.shared.options.prefetch.max(1);
        while self.loader.in_flight() < ahead {
            let epoch = self.submitted.epoch;
            let indices = self
                .sampler
                .next_local(&mut self.submitted, self.rank, self.world);
            self.loader.submit(epoch, indices);
        }
    }

    /// This rank's next batch.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let batch = self.loader.take()?;
        self.taken.advance(self.sampler.batches_per_epoch());
        self.fill();
        Ok(batch)
    }

    /// Every rank's samples of the batch [`BatchStream::next_batch`] returns next.
    pub fn next_global(&mut self) -> Vec<usize> {
        self.sampler
            .global_batch(self.taken.epoch, self.taken.batch)
    }

    /// Position after the last batch taken.
    pub fn cursor(&self) -> Cursor {
        self.taken
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.sampler.batches_per_epoch()
    }

    pub fn skipped(&self) -> usize {
        self.loader.skipped()
    }
}
