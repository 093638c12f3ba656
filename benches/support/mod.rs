//! What the criterion benches share.

/// `criterion_main!` after the CPU tuning melvae's programs apply
/// (`melvae::layers::tune_cpu`), so the numbers match theirs
/// (docs/benchmarks.md).
macro_rules! tuned_main {
    ($group:ident) => {
        fn main() {
            // SAFETY: first thing in main, before any other thread exists.
            unsafe { melvae::layers::tune_cpu() };
            $group();
            criterion::Criterion::default()
                .configure_from_args()
                .final_summary();
        }
    };
}
