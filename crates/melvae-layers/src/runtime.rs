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
}
