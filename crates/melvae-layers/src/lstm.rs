//! Stacked LSTM with its state carried across calls.

use candle_core::Tensor;
use candle_nn::rnn::LSTMState;
use candle_nn::VarBuilder;

use crate::error::ensure;
use crate::{Error, Result, Streaming};

/// One LSTM layer (torch's gate order: input, forget, cell, output).
#[derive(Debug, Clone)]
struct LstmLayer {
    /// `[4 * hidden, input]`.
    w_ih: Tensor,
    /// `[4 * hidden, hidden]`.
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

impl LstmLayer {
    /// Variables and initialisation as candle-nn's `lstm` (torch's names).
    fn new(input: usize, hidden: usize, k: usize, vb: &VarBuilder) -> Result<Self> {
        let kaiming = candle_nn::init::DEFAULT_KAIMING_UNIFORM;
        let zero = candle_nn::Init::Const(0.);
        Ok(Self {
            w_ih: vb.get_with_hints((4 * hidden, input), &format!("weight_ih_l{k}"), kaiming)?,
            w_hh: vb.get_with_hints((4 * hidden, hidden), &format!("weight_hh_l{k}"), kaiming)?,
            b_ih: vb.get_with_hints(4 * hidden, &format!("bias_ih_l{k}"), zero)?,
            b_hh: vb.get_with_hints(4 * hidden, &format!("bias_hh_l{k}"), zero)?,
        })
    }

    /// The input's share of the gates, `x W_ih^T + b_ih + b_hh` for inputs
    /// `[rows, input]`: `[rows, 4 * hidden]`.
    fn input_gates(&self, x: &Tensor) -> Result<Tensor> {
        let bias = (&self.b_ih + &self.b_hh)?;
        Ok(crate::kernels::rows_affine(
            &crate::kernels::linear(x, &self.w_ih)?,
            None,
            Some(&bias),
        )?)
    }

    /// The layer over a sequence from the input's share of the gates
    /// `[batch, time, 4 * hidden]` and state `s`: outputs `[batch, time,
    /// hidden]` and the final state. One fused op on the CPU in f32/f64
    /// (`kernels::lstm_sequence`), the composed cell stepped elsewhere.
    fn run(&self, gates: &Tensor, s: LSTMState) -> Result<(Tensor, LSTMState)> {
        let (t, h) = (gates.dim(1)?, self.w_hh.dim(1)?);
        if let Some(out) = crate::kernels::lstm_sequence(gates, &self.w_hh, &s.h, &s.c)? {
            // Per step h, c (then the gates, kept for the backward).
            let end = out.narrow(1, t - 1, 1)?.squeeze(1)?;
            let last = LSTMState::new(end.narrow(1, 0, h)?, end.narrow(1, h, h)?);
            return Ok((out.narrow(2, 0, h)?, last));
        }
        let mut s = s;
        let mut outs = Vec::with_capacity(t);
        for k in 0..t {
            s = self.cell(&gates.narrow(1, k, 1)?.squeeze(1)?, &s)?;
            outs.push(s.h.clone());
        }
        Ok((Tensor::stack(&outs, 1)?, s))
    }

    /// One step from the input's share of the gates `[batch, 4 * hidden]`.
    fn cell(&self, input_gates: &Tensor, s: &LSTMState) -> Result<LSTMState> {
        let gates = (input_gates + s.h.matmul(&self.w_hh.t()?)?)?;
        let g = gates.chunk(4, 1)?;
        let (i, f) = (
            candle_nn::ops::sigmoid(&g[0])?,
            candle_nn::ops::sigmoid(&g[1])?,
        );
        let (cell, o) = (g[2].tanh()?, candle_nn::ops::sigmoid(&g[3])?);
        let c = ((f * &s.c)? + (i * cell)?)?;
        let h = (o * c.tanh()?)?;
        Ok(LSTMState::new(h, c))
    }
}

/// A multi-layer LSTM, `[batch, time, input]` to `[batch, time, hidden]`.
/// Parameters as torch's `nn.LSTM`: `weight_ih_l{k}`, `weight_hh_l{k}`,
/// `bias_ih_l{k}`, `bias_hh_l{k}`. A sequence runs layer by layer, each
/// layer's input projection one matrix product over all time steps (only
/// the recurrent product is stepped).
#[derive(Debug, Clone)]
pub struct LstmStack {
    layers: Vec<LstmLayer>,
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
            .map(|k| LstmLayer::new(if k == 0 { input } else { hidden }, hidden, k, &vb))
            .collect::<Result<_>>()?;
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
        let w = &self.layers[0].w_hh;
        let zeros = Tensor::zeros((batch, self.hidden), w.dtype(), w.device())?;
        Ok(self
            .layers
            .iter()
            .map(|_| LSTMState::new(zeros.clone(), zeros.clone()))
            .collect())
    }

    fn check_state(&self, state: &[LSTMState]) -> Result<()> {
        ensure(state.len() == self.layers.len(), "lstm state", || {
            format!("{} layers, got {} states", self.layers.len(), state.len())
        })
    }

    /// One time step: `x` `[batch, input]` and the per-layer state to the top
    /// layer's `h` `[batch, hidden]` and the new state.
    pub fn step(&self, x: &Tensor, state: &[LSTMState]) -> Result<(Tensor, Vec<LSTMState>)> {
        self.check_state(state)?;
        let mut h = x.clone();
        let mut next = Vec::with_capacity(state.len());
        for (layer, s) in self.layers.iter().zip(state) {
            let (out, ns) = layer.run(&layer.input_gates(&h)?.unsqueeze(1)?, s.clone())?;
            h = out.squeeze(1)?;
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
        let init = match state {
            Some(s) => {
                self.check_state(s)?;
                s.to_vec()
            }
            None => self.zero_state(b)?,
        };
        let mut y = x.clone();
        let mut last = Vec::with_capacity(self.layers.len());
        for (layer, s) in self.layers.iter().zip(init) {
            let width = y.dim(2)?;
            let gates =
                layer
                    .input_gates(&y.reshape((b * t, width))?)?
                    .reshape((b, t, 4 * self.hidden))?;
            let (out, s) = layer.run(&gates, s)?;
            y = out;
            last.push(s);
        }
        Ok((y, last))
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
    fn fused_sequence_equals_the_stepped_cell_and_its_gradients_check() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let layer = LstmLayer::new(3, 4, 0, &vb).unwrap();
        randomize(&vm, 0.5, 1).unwrap();
        // [batch, 4h, time] transposed: non-contiguous gates [2, 3, 16].
        let gt = Var::from_tensor(&noise(&[2, 16, 3], 2).unwrap()).unwrap();
        let gates = || gt.as_tensor().transpose(1, 2).unwrap();
        assert!(!gates().is_contiguous());
        let h0 = Var::from_tensor(&noise(&[2, 4], 3).unwrap()).unwrap();
        let c0 = Var::from_tensor(&noise(&[2, 4], 4).unwrap()).unwrap();
        let state = || LSTMState::new(h0.as_tensor().clone(), c0.as_tensor().clone());
        let (py, pc) = (noise(&[2, 3, 4], 5).unwrap(), noise(&[2, 4], 6).unwrap());
        let w_hh = named_vars(&vm)
            .into_iter()
            .find(|(n, _)| n == "weight_hh_l0")
            .unwrap()
            .1;
        let run = |fused: bool| {
            let (y, s) = if fused {
                layer.run(&gates(), state()).unwrap()
            } else {
                let mut s = state();
                let mut outs = Vec::new();
                for k in 0..3 {
                    s = layer
                        .cell(&gates().narrow(1, k, 1).unwrap().squeeze(1).unwrap(), &s)
                        .unwrap();
                    outs.push(s.h.clone());
                }
                (Tensor::stack(&outs, 1).unwrap(), s)
            };
            let loss = ((&y * &py).unwrap().sum_all().unwrap()
                + (&s.c * &pc).unwrap().sum_all().unwrap())
            .unwrap();
            let g = loss.backward().unwrap();
            let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            vec![y, s.h, s.c, grad(&gt), grad(&h0), grad(&c0), grad(&w_hh)]
        };
        for (i, (a, b)) in run(true).iter().zip(&run(false)).enumerate() {
            let d = max_abs_diff(a, b).unwrap();
            assert!(d < 1e-12, "output {i}: {d}");
        }
        let vars = vec![
            ("gates".to_string(), gt.clone()),
            ("h0".to_string(), h0.clone()),
            ("c0".to_string(), c0.clone()),
            ("w_hh".to_string(), w_hh.clone()),
        ];
        check_gradients(&vars, GradCheck::default(), || {
            layer
                .run(&gates(), state())
                .map(|(y, s)| (y.sum_all().unwrap() + s.c.sum_all().unwrap()).unwrap())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .unwrap();
    }

    /// An empty batch runs (the fused op hands it to the stepped cell).
    #[test]
    fn empty_batch_gives_empty_outputs() {
        let vm = VarMap::new();
        let l = LstmStack::new(
            3,
            4,
            2,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = Tensor::zeros((0, 5, 3), DType::F32, &Device::Cpu).unwrap();
        let (y, s) = l.forward(&x, None).unwrap();
        assert_eq!(y.dims(), &[0, 5, 4]);
        assert_eq!(s[1].c.dims(), &[0, 4]);
    }

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

    /// The layer-by-layer sequence pass equals candle-nn's LSTM cell
    /// stepped layer over layer on the same variables (f64), final state
    /// included.
    #[test]
    fn equals_candle_nn_lstm() {
        use candle_nn::rnn::RNN;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let l = LstmStack::new(3, 4, 2, vb.clone()).unwrap();
        randomize(&vm, 0.5, 4).unwrap();
        let x = noise(&[2, 9, 3], 5).unwrap();
        let (y, last) = l.forward(&x, None).unwrap();
        let mut h = x.clone();
        for (k, s) in last.iter().enumerate() {
            let cfg = candle_nn::rnn::LSTMConfig {
                layer_idx: k,
                ..Default::default()
            };
            let reference =
                candle_nn::lstm(if k == 0 { 3 } else { 4 }, 4, cfg, vb.clone()).unwrap();
            let states = reference.seq(&h).unwrap();
            h = reference.states_to_tensor(&states).unwrap();
            let end = states.last().unwrap();
            assert!(max_abs_diff(&end.c, &s.c).unwrap() < 1e-12, "layer {k}");
        }
        assert!(max_abs_diff(&h, &y).unwrap() < 1e-12);
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
