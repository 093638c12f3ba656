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
///   the calling thread and, on Linux, on every thread started after it.
///   This changes float results of the whole program, the embedder's own
///   code included: values below 1.2e-38 in f32 become 0.
///
/// # Safety
///
/// It changes the process environment (`std::env::set_var`) and the
/// allocator's parameters, which is only sound while no other thread can
/// read the environment or allocate concurrently, and the floating-point
/// mode ([`flush_subnormals`]'s contract): call it first thing in `main`,
/// before any thread (rayon's pools, candle's, a test harness' workers)
/// exists. Threads that exist already keep subnormals, so a parallel
/// result could depend on which thread computed a chunk.
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
    // SAFETY: no other thread exists yet and no float code depends on
    // subnormals (this function's contract).
    unsafe { flush_subnormals() };
}

/// Makes the calling thread's float arithmetic flush subnormal results and
/// inputs to zero (x86-64: the MXCSR's FTZ and DAZ bits; elsewhere
/// nothing). On Linux, threads started afterwards inherit the setting (the
/// kernel copies the creating thread's floating-point state; elsewhere they
/// may not), so calling it first in `main`, as [`tune_cpu`] does, covers
/// rayon's pool, candle's and the in-process ranks of data-parallel
/// training.
///
/// Why: on Intel CPUs every operation on a subnormal float (|x| < 1.2e-38
/// in f32) takes a microcode assist of about a hundred cycles. Activations
/// and gradients pass through that range in training (the exponential of
/// a large negative input; products of small gradients), and the tiny mel
/// VAE's step ran 1.4x slower without the flush with its log-mels
/// normalised by 0.5 on such a CPU (docs/benchmarks.md, "Two threads").
/// Values that small contribute nothing a float32 sum can keep. XLA's CPU
/// runtime and oneDNN flush the same way.
///
/// # Safety
///
/// Rust and LLVM assume the default floating-point environment: code
/// compiled or constant-folded under that assumption can give a subnormal
/// where the same expression computed at run time after this call gives 0.
/// Call it only where no code relies on subnormals being kept (melvae's
/// does not), and before other threads start, so every thread computes
/// alike.
pub unsafe fn flush_subnormals() {
    #[cfg(target_arch = "x86_64")]
    {
        /// MXCSR bit 15 (flush to zero) and bit 6 (denormals are zero).
        const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr stores the 32-bit MXCSR to a valid, aligned
        // local; ldmxcsr loads it back with only the FTZ and DAZ bits set
        // in addition (no exception is unmasked, the rounding mode is
        // kept). That the changed mode is acceptable to the caller is this
        // function's contract.
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
            // SAFETY: this thread's and its child's float code is the
            // test's own, which expects the flush.
            unsafe { flush_subnormals() };
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
