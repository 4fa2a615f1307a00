//! What a journal's writer has done since it opened: commits, the jobs they
//! carried and how long each commit took. Counted with atomics by the writer
//! thread, read by anyone (the engine's `/metrics`, the benches) without
//! stopping it.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Upper bounds, in seconds, of the commit-duration buckets. An fsync on an
/// idle local disk takes about 0.1–0.3 ms; a busy or virtual disk stalls for
/// tens of milliseconds, which is what these should make visible.
pub const COMMIT_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A snapshot of the writer's counters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: u64,
    /// Jobs those transactions carried (an ingest, a lease, a group of
    /// completions): `jobs / commits` is the group-commit factor.
    pub jobs: u64,
    /// How long each commit took: WAL frames written and synced, and the
    /// checkpoint when one was due.
    pub commit_seconds: DurationHistogram,
}

/// Durations counted by bucket; the bounds are [`COMMIT_BUCKETS`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DurationHistogram {
    /// Per bucket, not cumulative: one more than the bounds, the last for
    /// everything above the largest bound.
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
}

impl DurationHistogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(upper bound, count)` per bucket, the last bound infinite.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        COMMIT_BUCKETS.iter().copied().chain([f64::INFINITY]).zip(self.counts.iter().copied()).collect()
    }
}

/// The writer's live counters.
#[derive(Debug, Default)]
pub(crate) struct WriterCounters {
    commits: AtomicU64,
    jobs: AtomicU64,
    buckets: [AtomicU64; COMMIT_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl WriterCounters {
    /// One commit of `jobs` jobs that took `took`.
    pub(crate) fn committed(&self, jobs: usize, took: Duration) {
        self.commits.fetch_add(1, Relaxed);
        self.jobs.fetch_add(jobs as u64, Relaxed);
        let seconds = took.as_secs_f64();
        let slot = COMMIT_BUCKETS.iter().position(|bound| seconds <= *bound).unwrap_or(COMMIT_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// The counters now. Read one by one while the writer may be counting,
    /// so a commit may show in one figure and not yet in another.
    pub(crate) fn snapshot(&self) -> WriterStats {
        WriterStats {
            commits: self.commits.load(Relaxed),
            jobs: self.jobs.load(Relaxed),
            commit_seconds: DurationHistogram {
                counts: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
                sum_seconds: self.sum_nanos.load(Relaxed) as f64 / 1e9,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_commit_lands_in_the_first_bucket_that_holds_it() {
        let c = WriterCounters::default();
        for took in [
            Duration::from_micros(50),  // ≤ 100 µs
            Duration::from_micros(100), // a bound belongs to its own bucket
            Duration::from_micros(101), // ≤ 250 µs
            Duration::from_millis(7),   // ≤ 10 ms
            Duration::from_secs(3),     // above every bound
        ] {
            c.committed(4, took);
        }
        let s = c.snapshot();
        assert_eq!((s.commits, s.jobs), (5, 20));
        let h = &s.commit_seconds;
        assert_eq!(h.count(), 5);
        let expected: Vec<(f64, u64)> = vec![
            (0.0001, 2),
            (0.00025, 1),
            (0.0005, 0),
            (0.001, 0),
            (0.0025, 0),
            (0.005, 0),
            (0.01, 1),
            (0.025, 0),
            (0.05, 0),
            (0.1, 0),
            (0.25, 0),
            (0.5, 0),
            (1.0, 0),
            (2.5, 0),
            (f64::INFINITY, 1),
        ];
        assert_eq!(h.buckets(), expected);
        assert!((h.sum_seconds - 3.007_251).abs() < 1e-9, "{}", h.sum_seconds);
    }

    #[test]
    fn a_new_writer_has_counted_nothing() {
        let s = WriterCounters::default().snapshot();
        assert_eq!((s.commits, s.jobs, s.commit_seconds.count()), (0, 0, 0));
        assert_eq!(s.commit_seconds.buckets().len(), COMMIT_BUCKETS.len() + 1);
    }
}
