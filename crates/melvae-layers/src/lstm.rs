//! Stacked LSTM with its state carried across calls.

use candle_core::Tensor;
use candle_nn::rnn::{LSTMConfig, LSTMState, RNN};
use candle_nn::VarBuilder;

use crate::error::ensure;
use crate::{Error, Result, Streaming};

/// A multi-layer LSTM on candle-nn's cell, `[batch, time, input]` to
/// `[batch, time, hidden]`. Parameters as torch's `nn.LSTM`:
/// `weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`.
#[derive(Debug, Clone)]
pub struct LstmStack {
    layers: Vec<candle_nn::LSTM>,
    input: usize,
    hidden: usize,
    /// Streaming state (one per layer).
    state: Option<Vec<LSTMState>>,
}

impl LstmStack {
    /// `num_layers` LSTM layers: `input` features in, `hidden` out.
    pub fn new(input: usize, hidden: usize, num_layers: usize, vb: VarBuilder) -> Result<Self> {
        ensure(num_layers > 0, "lstm.num_layers", || "must be > 0".into())?;
        ensure(input > 0 && hidden > 0, "lstm.hidden", || {
            "input and hidden sizes must be > 0".into()
        })?;
        let layers = (0..num_layers)
            .map(|k| {
                let cfg = LSTMConfig {
                    layer_idx: k,
                    ..Default::default()
                };
                candle_nn::lstm(if k == 0 { input } else { hidden }, hidden, cfg, vb.clone())
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            layers,
            input,
            hidden,
            state: None,
        })
    }

    /// Hidden size of every layer.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Zero state for `batch` sequences.
    pub fn zero_state(&self, batch: usize) -> Result<Vec<LSTMState>> {
        Ok(self
            .layers
            .iter()
            .map(|l| l.zero_state(batch))
            .collect::<candle_core::Result<_>>()?)
    }

    /// One time step: `x` `[batch, input]` and the per-layer state to the top
    /// layer's `h` `[batch, hidden]` and the new state.
    pub fn step(&self, x: &Tensor, state: &[LSTMState]) -> Result<(Tensor, Vec<LSTMState>)> {
        ensure(state.len() == self.layers.len(), "lstm state", || {
            format!("{} layers, got {} states", self.layers.len(), state.len())
        })?;
        let mut h = x.clone();
        let mut next = Vec::with_capacity(state.len());
        for (layer, s) in self.layers.iter().zip(state) {
            let ns = layer.step(&h, s)?;
            h = ns.h().clone();
            next.push(ns);
        }
        Ok((h, next))
    }

    /// A whole sequence `x` `[batch, time, input]` from `state` (zeros if
    /// `None`): outputs `[batch, time, hidden]` and the final state.
    pub fn forward(
        &self,
        x: &Tensor,
        state: Option<&[LSTMState]>,
    ) -> Result<(Tensor, Vec<LSTMState>)> {
        let (b, t, i) = x.dims3()?;
        if i != self.input || t == 0 {
            return Err(Error::shape(
                "lstm input",
                format!("[batch, time >= 1, {}]", self.input),
                x.dims(),
            ));
        }
        let mut s = match state {
            Some(s) => s.to_vec(),
            None => self.zero_state(b)?,
        };
        let mut outs = Vec::with_capacity(t);
        for k in 0..t {
            let (h, ns) = self.step(&x.narrow(1, k, 1)?.squeeze(1)?, &s)?;
            outs.push(h);
            s = ns;
        }
        Ok((Tensor::stack(&outs, 1)?, s))
    }
}

impl Streaming for LstmStack {
    /// Chunks `[batch, t, input]` give `[batch, t, hidden]`, the state
    /// carried from chunk to chunk.
    fn step(&mut self, chunk: &Tensor) -> Result<Option<Tensor>> {
        let (y, s) = self.forward(chunk, self.state.as_deref())?;
        // The carried state holds no autograd graph.
        self.state = Some(
            s.into_iter()
                .map(|s| LSTMState::new(s.h.detach(), s.c.detach()))
                .collect(),
        );
        Ok(Some(y))
    }

    fn reset(&mut self) {
        self.state = None;
    }

    fn state_elements(&self) -> usize {
        self.state.as_ref().map_or(0, |s| {
            s.iter().map(|s| s.h.elem_count() + s.c.elem_count()).sum()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        check_gradients, max_abs_diff, named_vars, noise, randomize, stream_in_chunks, GradCheck,
    };
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn gradients_and_names() {
        let vm = VarMap::new();
        let l = LstmStack::new(
            3,
            4,
            2,
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let names: Vec<String> = named_vars(&vm).into_iter().map(|(n, _)| n).collect();
        assert!(
            names.contains(&"weight_ih_l1".to_string())
                && names.contains(&"bias_hh_l0".to_string()),
            "{names:?}"
        );
        randomize(&vm, 0.5, 1).unwrap();
        let x = Var::from_tensor(&noise(&[2, 4, 3], 2).unwrap()).unwrap();
        let mut vars = named_vars(&vm);
        vars.push(("input".into(), x.clone()));
        check_gradients(&vars, GradCheck::default(), || {
            l.forward(x.as_tensor(), None)
                .map(|(y, _)| y)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .unwrap();
    }

    #[test]
    fn state_carries_across_calls() {
        let vm = VarMap::new();
        let mut l = LstmStack::new(
            3,
            5,
            3,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = noise(&[2, 17, 3], 3).unwrap().to_dtype(DType::F32).unwrap();
        let (full, _) = l.forward(&x, None).unwrap();
        let streamed = stream_in_chunks(&mut l, &x, 1, 5, 1).unwrap();
        assert!(max_abs_diff(&full, &streamed).unwrap() < 1e-5);
        // One step at a time, as in autoregressive sampling.
        let mut s = l.zero_state(2).unwrap();
        let mut last = None;
        for k in 0..17 {
            let (h, ns) = l
                .step(&x.narrow(1, k, 1).unwrap().squeeze(1).unwrap(), &s)
                .unwrap();
            s = ns;
            last = Some(h);
        }
        let last = last.unwrap();
        assert!(
            max_abs_diff(&last, &full.narrow(1, 16, 1).unwrap().squeeze(1).unwrap()).unwrap()
                < 1e-5
        );
        let e = l
            .forward(
                &noise(&[2, 4, 2], 1).unwrap().to_dtype(DType::F32).unwrap(),
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("lstm input"), "{e}");
    }
}
