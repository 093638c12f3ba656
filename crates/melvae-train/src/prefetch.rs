//! Background prefetching, so the model does not wait on data.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use crate::{Error, Result};

/// Produces batches on a background thread, `depth` ahead of the consumer.
///
/// The producer is called with consecutive batch indices `start, start + 1,
/// ...` and must derive any randomness from the index (e.g.
/// `SplitMix64::new(seed ^ index)`), so a resumed run that restarts at its
/// saved index sees exactly the batches it would have seen. Batches arrive
/// in index order; a producer error is delivered in its place and ends the
/// stream. Dropping the prefetcher stops the thread.
pub struct Prefetcher<B: Send + 'static> {
    rx: Option<Receiver<(u64, Result<B>)>>,
    handle: Option<JoinHandle<()>>,
    next_index: u64,
}

impl<B: Send + 'static> Prefetcher<B> {
    /// Starts producing batches `start..` with up to `depth` ready ahead.
    pub fn new(
        start: u64,
        depth: usize,
        mut produce: impl FnMut(u64) -> Result<B> + Send + 'static,
    ) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::spawn(move || {
            let mut i = start;
            loop {
                let r = produce(i);
                let failed = r.is_err();
                if tx.send((i, r)).is_err() || failed {
                    return;
                }
                i += 1;
            }
        });
        Self {
            rx: Some(rx),
            handle: Some(handle),
            next_index: start,
        }
    }

    /// The index of the batch [`Prefetcher::next_batch`] returns next (save it to
    /// resume).
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// The next batch, waiting if it is not ready.
    pub fn next_batch(&mut self) -> Result<B> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| Error::invalid("prefetcher", "the producer has stopped"))?;
        let (i, r) = rx
            .recv()
            .map_err(|_| Error::invalid("prefetcher", "the producer thread ended"))?;
        debug_assert_eq!(i, self.next_index);
        self.next_index = i + 1;
        if r.is_err() {
            self.rx = None;
        }
        r
    }
}

impl<B: Send + 'static> Drop for Prefetcher<B> {
    fn drop(&mut self) {
        // Closing the receiver makes the producer's next send fail.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use melvae_dsp::SplitMix64;

    fn batch(seed: u64, i: u64) -> Result<Vec<u64>> {
        let mut r = SplitMix64::new(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Ok((0..4).map(|_| r.next_u64() % 100).collect())
    }

    #[test]
    fn ordered_deterministic_and_resumable() {
        let mut p = Prefetcher::new(0, 3, |i| batch(7, i));
        let first: Vec<Vec<u64>> = (0..10).map(|_| p.next_batch().unwrap()).collect();
        assert_eq!(p.next_index(), 10);
        // "Resume" at index 6: the same batches from there on.
        let mut q = Prefetcher::new(6, 2, |i| batch(7, i));
        for b in &first[6..] {
            assert_eq!(&q.next_batch().unwrap(), b);
        }
    }

    #[test]
    fn errors_arrive_in_order_and_end_the_stream() {
        let mut p = Prefetcher::new(0, 4, |i| {
            if i == 2 {
                Err(Error::invalid("batch 2", "corrupt"))
            } else {
                Ok(i)
            }
        });
        assert_eq!(p.next_batch().unwrap(), 0);
        assert_eq!(p.next_batch().unwrap(), 1);
        let e = p.next_batch().unwrap_err().to_string();
        assert!(e.contains("batch 2") && e.contains("corrupt"), "{e}");
        assert!(p.next_batch().unwrap_err().to_string().contains("stopped"));
    }

    #[test]
    fn runs_ahead_by_depth_then_waits() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let produced = Arc::new(AtomicU64::new(0));
        let counter = produced.clone();
        let mut p = Prefetcher::new(0, 3, move |i| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(i)
        });
        // Without any consumption the producer fills the queue (3) and
        // blocks on the 4th send: 4 batches made, no more.
        let wait_for = |n: u64| {
            for _ in 0..500 {
                if produced.load(Ordering::SeqCst) >= n {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("producer stuck at {}", produced.load(Ordering::SeqCst));
        };
        wait_for(4);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(produced.load(Ordering::SeqCst), 4);
        assert_eq!(p.next_batch().unwrap(), 0);
        wait_for(5);
    }
}
