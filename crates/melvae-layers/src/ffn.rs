//! Position-wise feed-forward with sequence masking.

use crate::Linear;
use candle_core::{DType, Tensor, D};
use candle_nn::{Module, VarBuilder};

use crate::error::ensure;
use crate::{Error, Mode, Result};

/// Feed-forward nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnActivation {
    /// `max(x, 0)`.
    Relu,
    /// Exact GELU.
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
    /// `silu(gate(x)) * fc1(x)` (Shazeer 2020; LLaMA).
    SwiGlu,
}

/// Configuration of [`FeedForward`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedForwardConfig {
    /// Model dimension (input and output).
    pub dim: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Nonlinearity.
    pub activation: FfnActivation,
    /// Dropout after the nonlinearity, in training.
    pub dropout: f64,
    /// Learn bias terms.
    pub bias: bool,
}

impl FeedForwardConfig {
    /// GELU, `hidden = 4 * dim`, bias, no dropout.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            hidden: 4 * dim,
            activation: FfnActivation::Gelu,
            dropout: 0.0,
            bias: true,
        }
    }
}

/// Zeroes `x` (`[batch, time, ...]`) where `mask` (`[batch, time]`) is 0.
pub fn masked_fill_zero(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t) = (x.dim(0)?, x.dim(1)?);
    if mask.dims() != [b, t] {
        return Err(Error::shape(
            "sequence mask",
            format!("[{b}, {t}]"),
            mask.dims(),
        ));
    }
    let mut shape = vec![b, t];
    shape.resize(x.rank(), 1);
    let keep = mask
        .ne(0.0)?
        .reshape(shape.as_slice())?
        .broadcast_as(x.shape())?;
    Ok(keep.where_cond(x, &x.zeros_like()?)?)
}

/// `fc2(dropout(act(fc1(x))))` over `[batch, time, dim]`, with padded
/// positions (mask 0) zeroed in the hidden and the output. Parameters:
/// `fc1` `[hidden, dim]`, `fc2` `[dim, hidden]`, and for SwiGLU `gate`
/// `[hidden, dim]`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    cfg: FeedForwardConfig,
    fc1: Linear,
    gate: Option<Linear>,
    fc2: Linear,
}

impl FeedForward {
    /// Builds the layers; fails on an invalid config, naming the field.
    pub fn new(cfg: FeedForwardConfig, vb: VarBuilder) -> Result<Self> {
        ensure(cfg.dim > 0 && cfg.hidden > 0, "ffn.hidden", || {
            "dim and hidden must be > 0".into()
        })?;
        ensure((0.0..1.0).contains(&cfg.dropout), "ffn.dropout", || {
            format!("must be in [0, 1), got {}", cfg.dropout)
        })?;
        let lin = |i, o, name: &str| -> Result<Linear> {
            Ok(if cfg.bias {
                crate::linear(i, o, vb.pp(name))?
            } else {
                crate::linear_no_bias(i, o, vb.pp(name))?
            })
        };
        Ok(Self {
            fc1: lin(cfg.dim, cfg.hidden, "fc1")?,
            gate: if cfg.activation == FfnActivation::SwiGlu {
                Some(lin(cfg.dim, cfg.hidden, "gate")?)
            } else {
                None
            },
            fc2: lin(cfg.hidden, cfg.dim, "fc2")?,
            cfg,
        })
    }

    /// `x` `[batch, time, dim]`, `mask` `[batch, time]` (non-zero = keep).
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        if x.dims().last() != Some(&self.cfg.dim) {
            return Err(Error::shape(
                "ffn input",
                format!("[..., {}]", self.cfg.dim),
                x.dims(),
            ));
        }
        let h = self.fc1.forward(x)?;
        let mut h = match self.cfg.activation {
            FfnActivation::Relu => h.relu()?,
            FfnActivation::Gelu => crate::act::gelu(&h)?,
            FfnActivation::Silu => crate::act::silu(&h)?,
            FfnActivation::SwiGlu => match &self.gate {
                Some(g) => (crate::act::silu(&g.forward(x)?)? * h)?,
                None => return Err(Error::invalid("ffn.gate", "missing")),
            },
        };
        if let Some(m) = mask {
            h = masked_fill_zero(&h, m)?;
        }
        h = mode.dropout(&h, self.cfg.dropout)?;
        let y = self.fc2.forward(&h)?;
        match mask {
            Some(m) => masked_fill_zero(&y, m),
            None => Ok(y),
        }
    }
}

/// Sinusoidal position table `[len, dim]` for positions `offset..offset+len`
/// (Vaswani et al.): `PE[p, 2i] = sin(p / 10000^(2i/dim))`,
/// `PE[p, 2i+1] = cos(...)`.
pub fn sinusoidal_positions(
    len: usize,
    dim: usize,
    offset: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut v = Vec::with_capacity(len * dim);
    for p in offset..offset + len {
        for j in 0..dim {
            let a = p as f64 / 10000f64.powf((j - j % 2) as f64 / dim as f64);
            v.push((if j % 2 == 0 { a.sin() } else { a.cos() }) as f32);
        }
    }
    Ok(Tensor::from_vec(v, (len, dim), device)?)
}

/// The dtype in which timesteps and their embeddings are computed for a
/// model in `dtype`: f64 for f64 models, f32 otherwise. In bf16 a flow time
/// keeps 8 significant bits and `sin(t f)` loses its high frequencies.
pub fn time_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Sinusoidal embedding of (possibly fractional) timesteps `t` (`[batch]`)
/// as DiT: `[cos(t f_i), sin(t f_i)]` with `f_i = max_period^(-i/half)`,
/// `[batch, dim]` (a zero column appended for odd `dim`), computed and
/// returned in [`time_dtype`] of `t`'s dtype. Differentiable in `t`.
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let half = dim / 2;
    let t = t.to_dtype(time_dtype(t.dtype()))?;
    let freqs: Vec<f64> = (0..half)
        .map(|i| (-(max_period.ln()) * i as f64 / half as f64).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?.to_dtype(t.dtype())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[&args.cos()?, &args.sin()?], D::Minus1)?;
    Ok(if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)?
    } else {
        emb
    })
}

/// DiT's timestep embedder: [`timestep_embedding`] of size `freq_dim`
/// (256), then `Linear -> SiLU -> Linear` to `dim`. Parameters `mlp.0`,
/// `mlp.2`. `[batch]` to `[batch, dim]`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    l1: Linear,
    l2: Linear,
    freq_dim: usize,
}

impl TimestepEmbedder {
    /// Embeds `freq_dim` sinusoidal features into `dim`.
    pub fn new(dim: usize, freq_dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("mlp");
        Ok(Self {
            l1: crate::linear(freq_dim, dim, vb.pp(0))?,
            l2: crate::linear(dim, dim, vb.pp(2))?,
            freq_dim,
        })
    }

    /// `t` `[batch]` (timesteps, may be fractional; pass them in
    /// [`time_dtype`], not in half precision) to `[batch, dim]` in the
    /// weights' dtype.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let e =
            timestep_embedding(t, self.freq_dim, 10000.0)?.to_dtype(self.l1.weight().dtype())?;
        Ok(self.l2.forward(&crate::act::silu(&self.l1.forward(&e)?)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, named_vars, noise, randomize, GradCheck};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn ffn_gradients_and_masking() {
        let mask = crate::attention::lengths_to_mask(&[3, 5], 5, &Device::Cpu).unwrap();
        for act in [
            FfnActivation::Relu,
            FfnActivation::Gelu,
            FfnActivation::Silu,
            FfnActivation::SwiGlu,
        ] {
            let vm = VarMap::new();
            let cfg = FeedForwardConfig {
                hidden: 6,
                activation: act,
                ..FeedForwardConfig::new(4)
            };
            let f = FeedForward::new(cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu))
                .unwrap();
            randomize(&vm, 0.7, 2).unwrap();
            let x = Var::from_tensor(&noise(&[2, 5, 4], 3).unwrap()).unwrap();
            let y = f.forward(x.as_tensor(), Some(&mask), Mode::Eval).unwrap();
            let padded = y.narrow(0, 0, 1).unwrap().narrow(1, 3, 2).unwrap();
            assert_eq!(
                padded
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
                0.0
            );
            let mut vars = named_vars(&vm);
            vars.push(("input".into(), x.clone()));
            check_gradients(&vars, GradCheck::default(), || {
                f.forward(x.as_tensor(), Some(&mask), Mode::Eval)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            })
            .unwrap_or_else(|e| panic!("{act:?}: {e}"));
        }
    }

    #[test]
    fn dropout_only_in_training() {
        let vm = VarMap::new();
        let cfg = FeedForwardConfig {
            dropout: 0.5,
            ..FeedForwardConfig::new(8)
        };
        let f =
            FeedForward::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let x = noise(&[2, 16, 8], 1).unwrap().to_dtype(DType::F32).unwrap();
        let a = f.forward(&x, None, Mode::Eval).unwrap();
        let b = f.forward(&x, None, Mode::Eval).unwrap();
        assert_eq!(a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
        let r = crate::DropoutRng::new(5);
        let c = f.forward(&x, None, Mode::Train(&r)).unwrap();
        assert_ne!(a.to_vec3::<f32>().unwrap(), c.to_vec3::<f32>().unwrap());
        // The same seed draws the same masks.
        let r2 = crate::DropoutRng::new(5);
        let d = f.forward(&x, None, Mode::Train(&r2)).unwrap();
        assert_eq!(c.to_vec3::<f32>().unwrap(), d.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn embeddings() {
        let pe = sinusoidal_positions(4, 6, 0, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(pe[0], vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        assert!((pe[3][2] - (3.0f64 / 10000f64.powf(2.0 / 6.0)).sin() as f32).abs() < 1e-6);
        let shifted = sinusoidal_positions(2, 6, 2, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(shifted[1], pe[3]);
        let t = Tensor::new(&[0.0f64, 0.5], &Device::Cpu).unwrap();
        let e = timestep_embedding(&t, 5, 10000.0)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        assert_eq!(e[0], vec![1.0, 1.0, 0.0, 0.0, 0.0]);
        assert!((e[1][1] - (0.5 * (-(10000f64.ln()) * 0.5).exp()).cos()).abs() < 1e-12);
        let vm = VarMap::new();
        let te =
            TimestepEmbedder::new(4, 8, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu))
                .unwrap();
        let tv = Var::from_tensor(&Tensor::new(&[0.1f64, 0.7], &Device::Cpu).unwrap()).unwrap();
        let mut vars = named_vars(&vm);
        vars.push(("t".into(), tv.clone()));
        check_gradients(&vars, GradCheck::default(), || {
            te.forward(tv.as_tensor())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .unwrap();
    }
}
