//! Data-parallel ranks as the layers and losses that keep statistics of a
//! whole batch see them (a quantiser's codebook averages and restarts, a
//! loss balancer's gradient norms): each rank holds an equal shard of the
//! global batch, and [`Ranks::sum`] adds values over the ranks. The
//! transport is the trainer's (`melvae_train::dist`); one process uses
//! [`Ranks::single`].

use crate::error::{Error, Result};

/// The elementwise sum over the ranks of its argument, the same on every
/// rank.
pub type SumFn<'a> = dyn FnMut(&[f64]) -> Result<Vec<f64>> + 'a;

/// This rank's place among the ranks, and the sum over them.
pub struct Ranks<'a> {
    index: usize,
    count: usize,
    sum: Box<SumFn<'a>>,
}

impl std::fmt::Debug for Ranks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ranks {{ index: {}, count: {} }}",
            self.index, self.count
        )
    }
}

impl<'a> Ranks<'a> {
    /// Rank `index` of `count`, whose shards of a batch are equal and in
    /// rank order (rank `r` holds rows `r * n .. (r + 1) * n`); `sum`
    /// returns the elementwise sum over the ranks, every rank calling it
    /// alike.
    pub fn new(
        index: usize,
        count: usize,
        sum: impl FnMut(&[f64]) -> Result<Vec<f64>> + 'a,
    ) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::invalid(
                "ranks",
                format!("rank {index} of {count} ranks"),
            ));
        }
        Ok(Self {
            index,
            count,
            sum: Box::new(sum),
        })
    }

    /// One process: the whole batch, sums of one.
    pub fn single() -> Ranks<'static> {
        Ranks {
            index: 0,
            count: 1,
            sum: Box::new(|v| Ok(v.to_vec())),
        }
    }

    /// This rank, `0..count`.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The number of ranks.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The elementwise sum of `values` over the ranks (`values` itself for
    /// one rank); every rank must call it with as many values.
    pub fn sum(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        if self.count == 1 {
            return Ok(values.to_vec());
        }
        let total = (self.sum)(values)?;
        if total.len() != values.len() {
            return Err(Error::invalid(
                "sum over the ranks",
                format!("returned {} values for {}", total.len(), values.len()),
            ));
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_is_the_identity_and_bad_ranks_are_named() {
        let mut one = Ranks::single();
        assert_eq!((one.index(), one.count()), (0, 1));
        assert_eq!(one.sum(&[1.5, -2.0]).unwrap(), vec![1.5, -2.0]);
        let e = Ranks::new(2, 2, |v| Ok(v.to_vec())).unwrap_err();
        assert!(e.to_string().contains("rank 2 of 2"), "{e}");
        let mut short = Ranks::new(0, 2, |_| Ok(vec![0.0])).unwrap();
        let e = short.sum(&[1.0, 2.0]).unwrap_err();
        assert!(e.to_string().contains("returned 1 values for 2"), "{e}");
    }
}
