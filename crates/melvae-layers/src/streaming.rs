//! Streaming: feed a chunk, get what is final.

use candle_core::Tensor;

use crate::Result;

/// A causal module that processes its input in chunks of any size.
///
/// `step` takes the next chunk (same layout as the module's offline
/// `forward`, cut along its time axis) and returns the outputs that no future
/// input can change, or `None` when nothing is final yet. The invariant,
/// tested for every implementation: concatenating the outputs of any chunking
/// equals the offline output on the same input (to 1e-5 in f32). `reset`
/// forgets all state, as if no input had been seen.
pub trait Streaming {
    /// Feeds one chunk; returns the newly final output, if any.
    fn step(&mut self, chunk: &Tensor) -> Result<Option<Tensor>>;
    /// Forgets the streaming state.
    fn reset(&mut self);
    /// Numbers held as streaming state (buffers, caches). For a stream to
    /// run for hours this must stop growing once the stream is past its
    /// receptive field; tests compare it along long streams.
    fn state_elements(&self) -> usize;
}
