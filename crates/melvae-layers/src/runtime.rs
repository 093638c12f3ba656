//! Process-wide CPU tuning for melvae's training and inference: what the
//! programs call first thing in `main`, and what an embedding program
//! should call to get the numbers in docs/benchmarks.md.

/// Tunes the process for melvae on the CPU. Call it first thing in
/// `main`, before any other thread exists and before the first tensor op.
///
/// - **Allocator** (glibc on Linux; elsewhere nothing): candle allocates a
///   fresh buffer for every tensor op; with glibc's defaults each buffer
///   over 128 KiB is a new `mmap` that the kernel must zero page by page,
///   then `munmap` on drop. On the 2-core development machine that
///   page-fault traffic cost 40% of a mel VAE training step and 55% of
///   sampling time. Raising the mmap and trim thresholds to their maximum
///   makes the heap reuse freed buffers; peak memory is unchanged.
/// - **Threads**: melvae's fused kernels and candle's GEMMs run their
///   parallel work on rayon's pool (`RAYON_NUM_THREADS` threads, default
///   one per core). candle's element-wise ops have a pool of their own
///   (`CANDLE_NUM_THREADS`) whose workers are pinned to cores and spin
///   between ops, so on a machine without spare cores they take time from
///   rayon's workers: the tiny mel VAE's training step on 2 cores took
///   131-135 ms without that pool and 134-207 ms with it (bimodal, the
///   slow mode most runs; docs/benchmarks.md). Unless `CANDLE_NUM_THREADS`
///   is set, it is set to 1 here: candle's element-wise ops then run on
///   the calling thread. Setting `CANDLE_NUM_THREADS` yourself overrides
///   this (`RAYON_NUM_THREADS` alone does not).
/// - **Subnormal floats** are flushed to zero ([`flush_subnormals`]) on
///   the calling thread, and so on every thread started after it.
///
/// # Safety
///
/// It changes the process environment (`std::env::set_var`) and the
/// allocator's parameters, which is only sound while no other thread can
/// read the environment or allocate concurrently: call it first thing in
/// `main`, before any thread (rayon's pools, candle's, a test harness'
/// workers) exists.
pub unsafe fn tune_cpu() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; no other thread
    // exists yet (this function's contract).
    unsafe {
        // glibc caps the mmap threshold at 32 MiB on 64-bit targets.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // No other thread exists yet (this function's contract), so none
        // reads the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    flush_subnormals();
}

/// Makes the calling thread's float arithmetic flush subnormal results and
/// inputs to zero (x86-64: the MXCSR's FTZ and DAZ bits; elsewhere
/// nothing). Threads started afterwards inherit the setting (Linux copies
/// the creating thread's floating-point state), so calling it first in
/// `main`, as [`tune_cpu`] does, covers rayon's pool, candle's and the
/// in-process ranks of data-parallel training.
///
/// Why: on Intel CPUs every operation on a subnormal float (|x| < 1.2e-38
/// in f32) takes a microcode assist of about a hundred cycles. Activations
/// and gradients pass through that range in training (the exponential of
/// a large negative input; products of small gradients), and the tiny mel
/// VAE's step ran 1.5x slower with its log-mels normalised by 0.5 instead
/// of 3 on such a CPU (docs/benchmarks.md). Values that small contribute
/// nothing a float32 sum can keep. XLA's CPU runtime and oneDNN flush the
/// same way.
pub fn flush_subnormals() {
    #[cfg(target_arch = "x86_64")]
    {
        /// MXCSR bit 15 (flush to zero) and bit 6 (denormals are zero).
        const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr stores the 32-bit MXCSR to a valid, aligned
        // local; ldmxcsr loads it back with only the FTZ and DAZ bits set
        // in addition, which changes rounding of subnormals only (no
        // exception is unmasked).
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
            csr |= FTZ_DAZ;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags));
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The smallest normal f32 halved: a subnormal, unless flushed.
    fn halved_min() -> f32 {
        std::hint::black_box(f32::MIN_POSITIVE) * std::hint::black_box(0.5f32)
    }

    #[test]
    fn flushes_subnormals_here_and_in_threads_started_later() {
        // A fresh thread, so the test harness' threads keep their setting.
        std::thread::spawn(|| {
            assert!(halved_min() > 0.0, "subnormals exist before the call");
            flush_subnormals();
            assert_eq!(halved_min(), 0.0);
            let child = std::thread::spawn(halved_min).join().unwrap();
            assert_eq!(child, 0.0, "a thread started afterwards inherits it");
            // Normal numbers are untouched.
            assert_eq!(std::hint::black_box(1.5f32) * 2.0, 3.0);
        })
        .join()
        .unwrap();
    }
}
