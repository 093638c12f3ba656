//! Residual units: dilated 1-D units (SEANet/Encodec style) and 2-D units
//! causal in time (for mel encoders); both stream when causal.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::act::{Activation, ActivationKind};
use crate::conv::{CausalConv2d, Conv1d, Conv1dConfig, Conv2dConfig, ConvPadding, PreActivated};
use crate::error::ensure;
use crate::{Error, Result, Streaming};

/// Configuration of a [`ResidualUnit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResidualUnitConfig {
    /// Input and output channels.
    pub channels: usize,
    /// Kernel of the dilated conv (SEANet: 3).
    pub kernel_size: usize,
    /// Dilation of the kernel-sized conv.
    pub dilation: usize,
    /// Hidden channels are `channels / compress` (SEANet: 2).
    pub compress: usize,
    /// Activation before each conv.
    pub activation: ActivationKind,
    /// Causal (streams) or "same" padding.
    pub causal: bool,
    /// Weight-norm parameterisation (`weight_g`, `weight_v`).
    pub weight_norm: bool,
    /// Identity shortcut if true, else a learned 1x1 conv (`shortcut`).
    pub true_skip: bool,
}

impl ResidualUnitConfig {
    /// SEANet defaults: kernel 3, compress 2, ELU, causal, weight norm,
    /// identity skip.
    pub fn seanet(channels: usize, dilation: usize) -> Self {
        Self {
            channels,
            kernel_size: 3,
            dilation,
            compress: 2,
            activation: ActivationKind::Elu { alpha: 1.0 },
            causal: true,
            weight_norm: true,
            true_skip: true,
        }
    }
}

/// `x + conv2(act2(conv1(act1(x))))` over `[batch, channels, time]`, with
/// `conv1` the dilated `kernel_size` conv to `channels / compress` and
/// `conv2` a 1x1 back to `channels`. Parameters: `act1.alpha`, `conv1.*`,
/// `act2.alpha`, `conv2.*`, `shortcut.*`.
#[derive(Debug, Clone)]
pub struct ResidualUnit {
    act1: Activation,
    conv1: Conv1d,
    act2: Activation,
    conv2: Conv1d,
    shortcut: Option<Conv1d>,
}

impl ResidualUnit {
    /// Builds the unit; fails on an invalid config, naming the field.
    pub fn new(cfg: ResidualUnitConfig, vb: VarBuilder) -> Result<Self> {
        ensure(
            cfg.compress > 0 && cfg.channels % cfg.compress == 0,
            "residual.compress",
            || format!("{} must divide channels {}", cfg.compress, cfg.channels),
        )?;
        let hidden = cfg.channels / cfg.compress;
        let padding = if cfg.causal {
            ConvPadding::Causal
        } else {
            ConvPadding::Same
        };
        let conv = |i, o, k, d| Conv1dConfig {
            dilation: d,
            weight_norm: cfg.weight_norm,
            padding,
            ..Conv1dConfig::causal(i, o, k)
        };
        Ok(Self {
            act1: Activation::new(cfg.activation, cfg.channels, vb.pp("act1"))?,
            conv1: Conv1d::new(
                conv(cfg.channels, hidden, cfg.kernel_size, cfg.dilation),
                vb.pp("conv1"),
            )?,
            act2: Activation::new(cfg.activation, hidden, vb.pp("act2"))?,
            conv2: Conv1d::new(conv(hidden, cfg.channels, 1, 1), vb.pp("conv2"))?,
            shortcut: if cfg.true_skip {
                None
            } else {
                Some(Conv1d::new(
                    conv(cfg.channels, cfg.channels, 1, 1),
                    vb.pp("shortcut"),
                )?)
            },
        })
    }

    /// `[batch, channels, time]` to the same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward_after(&self.act1, x)?;
        let y = self.conv2.forward_after(&self.act2, &h)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((y + skip)?)
    }
}

fn step_all(conv: &mut Conv1d, x: &Tensor) -> Result<Tensor> {
    // A stride-1 causal conv emits one frame per input frame.
    conv.step(x)?
        .ok_or_else(|| Error::invalid("residual stream", "stride-1 conv emitted nothing"))
}

impl Streaming for ResidualUnit {
    /// Chunks `[batch, channels, t]` give `[batch, channels, t]`.
    fn step(&mut self, chunk: &Tensor) -> Result<Option<Tensor>> {
        let h = self.act1.forward(chunk)?;
        let h = step_all(&mut self.conv1, &h)?;
        let y = step_all(&mut self.conv2, &self.act2.forward(&h)?)?;
        let skip = match &mut self.shortcut {
            Some(s) => step_all(s, chunk)?,
            None => chunk.clone(),
        };
        Ok(Some((y + skip)?))
    }

    fn reset(&mut self) {
        self.conv1.reset();
        self.conv2.reset();
        if let Some(s) = &mut self.shortcut {
            s.reset();
        }
    }

    fn state_elements(&self) -> usize {
        self.conv1.state_elements()
            + self.conv2.state_elements()
            + self.shortcut.as_ref().map_or(0, Streaming::state_elements)
    }
}

/// Residual units in sequence, one per dilation (SEANet: 1, 3, 9).
/// Parameters `units.{i}.*`.
#[derive(Debug, Clone)]
pub struct ResidualStack {
    units: Vec<ResidualUnit>,
}

impl ResidualStack {
    /// `base` with its dilation replaced by each of `dilations` in turn.
    pub fn new(base: ResidualUnitConfig, dilations: &[usize], vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("units");
        let units = dilations
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                ResidualUnit::new(
                    ResidualUnitConfig {
                        dilation: d,
                        ..base
                    },
                    vb.pp(i),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { units })
    }

    /// `[batch, channels, time]` to the same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.units.iter().try_fold(x.clone(), |h, u| u.forward(&h))
    }
}

impl Streaming for ResidualStack {
    fn step(&mut self, chunk: &Tensor) -> Result<Option<Tensor>> {
        let mut h = chunk.clone();
        for u in &mut self.units {
            h = u
                .step(&h)?
                .ok_or_else(|| Error::invalid("residual stream", "unit emitted nothing"))?;
        }
        Ok(Some(h))
    }

    fn reset(&mut self) {
        self.units.iter_mut().for_each(Streaming::reset);
    }

    fn state_elements(&self) -> usize {
        self.units.iter().map(Streaming::state_elements).sum()
    }
}

/// A 2-D residual unit over `[batch, channels, freq, time]`, causal in time:
/// `x + conv2(act2(conv1(act1(x))))` with `conv1` a `kernel` conv dilated
/// `(1, dilation)` and `conv2` a 1x1 conv. Parameters as [`ResidualUnit`].
#[derive(Debug, Clone)]
pub struct ResidualUnit2d {
    act1: Activation,
    conv1: CausalConv2d,
    act2: Activation,
    conv2: CausalConv2d,
}

impl ResidualUnit2d {
    /// `kernel` is `(freq, time)`.
    pub fn new(
        channels: usize,
        kernel: (usize, usize),
        dilation: usize,
        activation: ActivationKind,
        weight_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = |k| Conv2dConfig {
            weight_norm,
            dilation: (1, dilation),
            ..Conv2dConfig::new(channels, channels, k)
        };
        Ok(Self {
            act1: Activation::new(activation, channels, vb.pp("act1"))?,
            conv1: CausalConv2d::new(cfg(kernel), vb.pp("conv1"))?,
            act2: Activation::new(activation, channels, vb.pp("act2"))?,
            conv2: CausalConv2d::new(
                Conv2dConfig {
                    dilation: (1, 1),
                    ..cfg((1, 1))
                },
                vb.pp("conv2"),
            )?,
        })
    }

    /// `[batch, channels, freq, time]` to the same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward_after(&self.act1, x)?;
        let y = self.conv2.forward_after(&self.act2, &h)?;
        Ok((y + x)?)
    }
}

impl Streaming for ResidualUnit2d {
    /// Chunks `[batch, channels, freq, t]` give the same shape.
    fn step(&mut self, chunk: &Tensor) -> Result<Option<Tensor>> {
        let none = || Error::invalid("residual stream", "stride-1 conv emitted nothing");
        let h = self
            .conv1
            .step(&self.act1.forward(chunk)?)?
            .ok_or_else(none)?;
        let y = self.conv2.step(&self.act2.forward(&h)?)?.ok_or_else(none)?;
        Ok(Some((y + chunk)?))
    }

    fn reset(&mut self) {
        self.conv1.reset();
        self.conv2.reset();
    }

    fn state_elements(&self) -> usize {
        self.conv1.state_elements() + self.conv2.state_elements()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_module, max_abs_diff, noise, randomize, stream_in_chunks};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn grad_check(vm: &VarMap, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
        let x = Var::from_tensor(x).unwrap();
        check_module(vm, 0.5, 9, &[("input", &x)], || f(x.as_tensor())).unwrap();
    }

    fn vb(vm: &VarMap, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_varmap(vm, dtype, &Device::Cpu)
    }

    #[test]
    fn units_have_gradients() {
        for cfg in [
            ResidualUnitConfig::seanet(4, 3),
            ResidualUnitConfig {
                activation: ActivationKind::Snake,
                true_skip: false,
                weight_norm: false,
                ..ResidualUnitConfig::seanet(4, 2)
            },
            ResidualUnitConfig {
                causal: false,
                activation: ActivationKind::Gelu,
                ..ResidualUnitConfig::seanet(2, 1)
            },
        ] {
            let vm = VarMap::new();
            let u = ResidualUnit::new(cfg, vb(&vm, DType::F64)).unwrap();
            grad_check(&vm, &noise(&[2, cfg.channels, 9], 1).unwrap(), |x| {
                u.forward(x)
            });
        }
        let vm = VarMap::new();
        let u = ResidualUnit2d::new(
            2,
            (3, 3),
            2,
            ActivationKind::LeakyRelu { slope: 0.1 },
            true,
            vb(&vm, DType::F64),
        )
        .unwrap();
        grad_check(&vm, &noise(&[2, 2, 4, 6], 2).unwrap(), |x| u.forward(x));
    }

    #[test]
    fn stacks_stream() {
        let vm = VarMap::new();
        let base = ResidualUnitConfig {
            true_skip: false,
            activation: ActivationKind::Snake,
            ..ResidualUnitConfig::seanet(4, 1)
        };
        let mut stack = ResidualStack::new(base, &[1, 3, 9], vb(&vm, DType::F32)).unwrap();
        randomize(&vm, 0.5, 3).unwrap();
        let x = noise(&[2, 4, 90], 4).unwrap().to_dtype(DType::F32).unwrap();
        let offline = stack.forward(&x).unwrap();
        for seed in 0..3 {
            let streamed = stream_in_chunks(&mut stack, &x, 2, 11, seed).unwrap();
            assert!(max_abs_diff(&offline, &streamed).unwrap() < 1e-5);
        }
        let vm = VarMap::new();
        let mut u = ResidualUnit2d::new(
            3,
            (3, 2),
            4,
            ActivationKind::Elu { alpha: 1.0 },
            false,
            vb(&vm, DType::F32),
        )
        .unwrap();
        let x = noise(&[2, 3, 5, 40], 5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let offline = u.forward(&x).unwrap();
        let streamed = stream_in_chunks(&mut u, &x, 3, 6, 1).unwrap();
        assert!(max_abs_diff(&offline, &streamed).unwrap() < 1e-5);
    }

    #[test]
    fn bad_compress_is_named() {
        let vm = VarMap::new();
        let e = ResidualUnit::new(
            ResidualUnitConfig {
                compress: 3,
                ..ResidualUnitConfig::seanet(4, 1)
            },
            vb(&vm, DType::F32),
        )
        .unwrap_err();
        assert!(e.to_string().contains("residual.compress"), "{e}");
    }
}
