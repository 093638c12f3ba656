//! A small deterministic random generator whose whole state is one `u64`, so
//! it can be saved in a checkpoint and restored exactly.

/// SplitMix64 (Steele, Lea, Flood 2014): fast, statistically solid for
/// initialisation, sampling and data order; not for cryptography.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64 {
    /// The full state; restoring it resumes the exact sequence.
    pub state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias worth noticing for
    /// `n` far below 2^64 (Lemire's multiply-shift).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_resumable() {
        let mut a = SplitMix64::new(7);
        let first: Vec<u64> = (0..3).map(|_| a.next_u64()).collect();
        let saved = a;
        let next = a.next_u64();
        let mut b = SplitMix64::new(7);
        assert_eq!(first, (0..3).map(|_| b.next_u64()).collect::<Vec<_>>());
        let mut c = saved;
        assert_eq!(c.next_u64(), next);
    }

    #[test]
    fn ranges() {
        let mut r = SplitMix64::new(1);
        let mut hist = [0usize; 5];
        for _ in 0..10000 {
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
            hist[r.below(5)] += 1;
        }
        assert!(hist.iter().all(|&h| (1800..2200).contains(&h)), "{hist:?}");
        let m: f64 = (0..20000).map(|_| r.normal()).sum::<f64>() / 20000.0;
        assert!(m.abs() < 0.03, "{m}");
    }
}
