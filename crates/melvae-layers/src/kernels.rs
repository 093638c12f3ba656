//! Fused CPU kernels: custom candle ops with their own backward, for the
//! hot paths profiles show (docs/benchmarks.md, "CPU speed"). Each has a
//! composed fallback built from candle ops, used on other devices and
//! dtypes, and a test that the two agree in value and gradient.
//!
//! [`gather_conv`]: a convolution given as a gather — output position `p`,
//! tap `k` reads input position `idx[p * K + k]` of the flattened spatial
//! axis — computed as im2col into a scratch buffer and one GEMM per batch
//! item and group, its backward as two GEMMs and a direct col2im
//! accumulation (no index_select/index_add round trips, no permute
//! copies). CPU, f32 and f64.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// The element types the CPU kernels run on.
trait Elem: Copy + Default + Send + Sync + std::ops::AddAssign + 'static {
    const ONE: Self;
    /// This thread's scratch buffer of this type ([`with_scratch`]).
    fn scratch() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<Self>>>;
}

/// Implements [`Elem`] for a float type, with its per-thread scratch.
macro_rules! elem {
    ($t:ty) => {
        impl Elem for $t {
            const ONE: Self = 1.0;
            fn scratch() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<Self>>> {
                thread_local!(static SCRATCH: std::cell::Cell<Vec<$t>> = const { std::cell::Cell::new(Vec::new()) });
                &SCRATCH
            }
        }
    };
}
elem!(f32);
elem!(f64);

/// Whether the fused kernels take tensors of this device and dtype.
pub(crate) fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Whether kernel `name` (`conv`, `act`, `affine`, `linear`, `lstm`,
/// `softmax`) is on: the environment variable `MELVAE_NO_FUSED_KERNELS` (a
/// comma-separated list of names, or `all`) turns kernels off, so each can
/// be benchmarked against its composed path. The list is melvae-dsp's
/// [`melvae_dsp::kernel_enabled`], which also knows its `fft` (`all`
/// turns that off too).
fn enabled(name: &str) -> bool {
    melvae_dsp::kernel_enabled(name)
}

/// [`fused`] for kernel `name` (and the kernel not turned off).
pub(crate) fn use_kernel(name: &str, t: &Tensor) -> bool {
    fused(t) && enabled(name)
}

/// Sizes of one gather convolution.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    c_in: usize,
    len: usize,
    c_out: usize,
    /// Input channels per group.
    cg: usize,
    k: usize,
    p: usize,
    groups: usize,
}

impl Dims {
    fn of(x: &Layout, w: &Layout, p: usize, k: usize, groups: usize) -> candle_core::Result<Self> {
        let (batch, c_in, len) = x.shape().dims3()?;
        let (c_out, cg, kw) = w.shape().dims3()?;
        if groups == 0 || kw != k || cg * groups != c_in || c_out % groups != 0 {
            candle_core::bail!(
                "gather_conv: input {:?}, weight {:?}, {k} taps, {groups} groups do not fit",
                x.shape(),
                w.shape()
            );
        }
        Ok(Self {
            batch,
            c_in,
            len,
            c_out,
            cg,
            k,
            p,
            groups,
        })
    }

    /// Output channels per group.
    fn og(&self) -> usize {
        self.c_out / self.groups
    }

    /// Rows of one group's column matrix (`cg * k`).
    fn rows(&self) -> usize {
        self.cg * self.k
    }
}

/// One run of [`Taps`]: tap `tap` fills column-matrix entries `p0..p0 + n`
/// from input positions `i0, i0 + step, ..`, or with zeros where `zero`
/// (the taps that fall on padding, [`crate::conv::PAD`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Run {
    tap: usize,
    p0: usize,
    i0: usize,
    n: usize,
    step: usize,
    zero: bool,
}

/// The gather indices, per tap as runs of evenly spaced positions (a
/// stride-1 conv reads whole rows at once, so fills and accumulations are
/// slice copies and adds; a strided one reads every `stride`-th position
/// in one loop instead of one copy per element).
#[derive(Debug)]
struct Taps {
    runs: Vec<Run>,
    /// One tap reading every position in order (a 1x1 conv): the input is
    /// its own column matrix.
    identity: bool,
}

impl Taps {
    fn new(idx: &[u32], p: usize, k: usize, len: usize) -> Self {
        let mut runs: Vec<Run> = Vec::new();
        for ki in 0..k {
            for pi in 0..p {
                let zero = idx[pi * k + ki] == crate::conv::PAD;
                let i = if zero { 0 } else { idx[pi * k + ki] as usize };
                match runs.last_mut() {
                    Some(r) if r.tap == ki && r.p0 + r.n == pi && zero && r.zero => r.n += 1,
                    // A run's second position sets its step.
                    Some(r)
                        if r.tap == ki
                            && r.p0 + r.n == pi
                            && !zero
                            && !r.zero
                            && r.n == 1
                            && i > r.i0 =>
                    {
                        r.step = i - r.i0;
                        r.n = 2;
                    }
                    Some(r)
                        if r.tap == ki
                            && r.p0 + r.n == pi
                            && !zero
                            && !r.zero
                            && i == r.i0 + r.n * r.step =>
                    {
                        r.n += 1
                    }
                    _ => runs.push(Run {
                        tap: ki,
                        p0: pi,
                        i0: i,
                        n: 1,
                        step: 1,
                        zero,
                    }),
                }
            }
        }
        let identity = k == 1 && p == len && idx.iter().enumerate().all(|(i, &v)| v as usize == i);
        Self { runs, identity }
    }

    /// Fills `cols` (`[cg * k, p]`) from `x` (`[cg, len]`, one group of one
    /// batch item).
    fn im2col<T: Elem>(&self, x: &[T], d: &Dims, cols: &mut [T]) {
        for c in 0..d.cg {
            let row = &x[c * d.len..(c + 1) * d.len];
            for r in &self.runs {
                let at = (c * d.k + r.tap) * d.p + r.p0;
                let dst = &mut cols[at..at + r.n];
                if r.zero {
                    dst.fill(T::default());
                } else if r.step == 1 {
                    dst.copy_from_slice(&row[r.i0..r.i0 + r.n]);
                } else {
                    for (o, &v) in dst.iter_mut().zip(row[r.i0..].iter().step_by(r.step)) {
                        *o = v;
                    }
                }
            }
        }
    }

    /// Adds `cols` (`[cg * k, p]`) into `dx` (`[cg, len]`) at the gathered
    /// positions.
    fn col2im<T: Elem>(&self, cols: &[T], d: &Dims, dx: &mut [T]) {
        for c in 0..d.cg {
            let row = &mut dx[c * d.len..(c + 1) * d.len];
            for r in self.runs.iter().filter(|r| !r.zero) {
                let at = (c * d.k + r.tap) * d.p + r.p0;
                let src = &cols[at..at + r.n];
                if r.step == 1 {
                    for (o, &v) in row[r.i0..r.i0 + r.n].iter_mut().zip(src) {
                        *o += v;
                    }
                } else {
                    for (o, &v) in row[r.i0..].iter_mut().step_by(r.step).zip(src) {
                        *o += v;
                    }
                }
            }
        }
    }
}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]` on row-major slices given by
/// their (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    // The bounds the unsafe call relies on (O(1) next to the product).
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the slices hold every element the strides address (asserted
    // above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Runs `$body` on the contiguous f32 or f64 slices of the storages (all
/// of one dtype), naming the op and the culprit otherwise.
macro_rules! float_op {
    ($what:expr, [$(($v:ident, $s:expr, $l:expr, $name:expr)),+], $body:expr) => {
        match ($($s,)+) {
            ($(CpuStorage::F32($v),)+) => {
                $(let $v = contiguous($v, $l, $name)?;)+
                CpuStorage::F32($body)
            }
            ($(CpuStorage::F64($v),)+) => {
                $(let $v = contiguous($v, $l, $name)?;)+
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 tensors of one dtype", $what),
        }
    };
}

/// Output rows per parallel chunk of a [`Gemm`]: the rows split in at most
/// [`MAX_CHUNKS`] chunks of at least 64, fixed by the shape alone (the
/// same result on any thread count).
fn gemm_chunk_rows(m: usize) -> usize {
    m.div_ceil(MAX_CHUNKS).max(64)
}

/// [`matmul`] into a fresh `[m, n]`, the output rows in parallel chunks
/// (each chunk one GEMM over the whole reduction, so no partial sums).
fn par_matmul<T: Elem>(
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
) -> Vec<T> {
    let mut dst = vec![T::default(); m * n];
    let rows = gemm_chunk_rows(m);
    par_chunks(&mut dst, rows * n, |ci, chunk| {
        let r0 = ci * rows;
        let lhs = &lhs[(r0 * lhs_rs).min(lhs.len())..];
        let m = chunk.len() / n.max(1);
        matmul(
            (m, n, k),
            chunk,
            false,
            lhs,
            (lhs_rs, lhs_cs),
            rhs,
            rhs_strides,
        );
    });
    dst
}

/// The products a linear layer needs, on contiguous 2-D operands.
#[derive(Debug, Clone, Copy)]
enum Gemm {
    /// `a [m, k] * b^T` (`b` `[n, k]`): the forward `x W^T`.
    ABt,
    /// `a [m, n] * b [n, k]`: the input gradient `dY W`.
    AB,
    /// `a^T * b` (`a` `[r, m]`, `b` `[r, k]`): the weight gradient `dY^T X`.
    AtB,
}

impl Gemm {
    /// `(m, n, k)`, the left and the right strides, from the operands'
    /// shapes.
    #[allow(clippy::type_complexity)]
    fn dims(
        self,
        (ar, ac): (usize, usize),
        (br, bc): (usize, usize),
    ) -> candle_core::Result<((usize, usize, usize), (usize, usize), (usize, usize))> {
        let (ok, out) = match self {
            Gemm::ABt => (ac == bc, ((ar, br, ac), (ac, 1), (1, bc))),
            Gemm::AB => (ac == br, ((ar, bc, ac), (ac, 1), (bc, 1))),
            Gemm::AtB => (ar == br, ((ac, bc, ar), (1, ac), (bc, 1))),
        };
        if !ok {
            candle_core::bail!("melvae gemm {self:?}: [{ar}, {ac}] and [{br}, {bc}] do not fit");
        }
        Ok(out)
    }
}

impl candle_core::CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "melvae-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((m, n, k), ls, rs) = self.dims(l1.shape().dims2()?, l2.shape().dims2()?)?;
        let out = float_op!(
            "gemm",
            [(a, s1, l1, "left operand"), (b, s2, l2, "right operand")],
            par_matmul((m, n, k), a, ls, b, rs)
        );
        Ok((out, Shape::from((m, n))))
    }
}

/// `x W^T` as one op with its own backward: the forward and both
/// gradients are [`Gemm`]s.
struct LinearOp;

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "melvae-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Gemm::ABt.cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(w, &Gemm::AB)?;
        let dw = dy.apply_op2_no_bwd(x, &Gemm::AtB)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `x W^T` for `x` `[m, k]` and `w` `[n, k]`: the fused op on the CPU in
/// f32/f64 (the output rows in parallel chunks), candle's matmul
/// elsewhere.
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !use_kernel("linear", x) || w.dtype() != x.dtype() || x.rank() != 2 || w.rank() != 2 {
        return x.matmul(&w.t()?);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp)
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("melvae kernel: {what} must be contiguous"),
    }
}

/// At most this many chunks of batch items run in parallel in a conv.
const MAX_CHUNKS: usize = 8;

/// Batch items per parallel chunk of a conv: fixed by the batch alone (at
/// most [`MAX_CHUNKS`] chunks), never by the thread count, so the
/// weight gradient's summation order, and the result, is the same on any
/// number of threads.
fn chunk_items(batch: usize) -> usize {
    batch.div_ceil(MAX_CHUNKS).max(1)
}

/// Runs `f` on a scratch slice of `n` elements kept per thread and element
/// type between calls, so a conv's column matrix is neither allocated nor
/// zeroed on every call. Its contents are whatever an earlier call left:
/// `f` must write every element before reading it. A call made while the
/// thread's buffer is in use (rayon may run another task on a thread that
/// waits) gets a fresh buffer. The buffer keeps the largest size used.
fn with_scratch<T: Elem, R>(n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    // Taking the buffer leaves an empty one for a nested call.
    let mut buf = T::scratch().take();
    if buf.len() < n {
        buf.resize(n, T::default());
    }
    let r = f(&mut buf[..n]);
    T::scratch().set(buf);
    r
}

/// Runs `f(chunk index, chunk)` on consecutive chunks of `len` elements of
/// `data` (the last may be shorter) on rayon's pool, collecting the
/// results in chunk order.
fn par_chunks<T: Send, R: Send>(
    data: &mut [T],
    len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    data.par_chunks_mut(len.max(1))
        .enumerate()
        .map(|(i, c)| f(i, c))
        .collect()
}

fn forward<T: ActElem>(
    x: &[T],
    w: &[T],
    bias: &[T],
    taps: &Taps,
    d: &Dims,
    act: Option<Act>,
) -> Vec<T> {
    let (og, rows) = (d.og(), d.rows());
    // Every output row starts at its bias; the GEMMs accumulate onto it.
    let mut y = Vec::with_capacity(d.batch * d.c_out * d.p);
    for r in 0..d.batch * d.c_out {
        y.extend(std::iter::repeat_n(bias[r % d.c_out], d.p));
    }
    let chunk = chunk_items(d.batch);
    // Every (tap, position) of the column matrix belongs to a run, so
    // `im2col` writes all of it: the scratch needs no zeroing.
    let n_cols = if taps.identity { 0 } else { rows * d.p };
    // The pre-activation of one group of one item, written before it is read.
    let n_act = if act.is_some() { d.cg * d.len } else { 0 };
    par_chunks(&mut y, chunk * d.c_out * d.p, |ci, yc| {
        with_scratch(n_cols + n_act, |scratch: &mut [T]| {
            let (cols, acted) = scratch.split_at_mut(n_cols);
            for (bi, b) in (ci * chunk..d.batch.min((ci + 1) * chunk)).enumerate() {
                for g in 0..d.groups {
                    let xs =
                        &x[(b * d.c_in + g * d.cg) * d.len..(b * d.c_in + (g + 1) * d.cg) * d.len];
                    let xs = pre_activated(act, xs, acted);
                    let cols: &[T] = if taps.identity {
                        xs
                    } else {
                        taps.im2col(xs, d, cols);
                        cols
                    };
                    let ys =
                        &mut yc[(bi * d.c_out + g * og) * d.p..(bi * d.c_out + (g + 1) * og) * d.p];
                    let wg = &w[g * og * rows..(g + 1) * og * rows];
                    matmul((og, d.p, rows), ys, true, wg, (rows, 1), cols, (d.p, 1));
                }
            }
        })
    });
    y
}

/// `dx` (`[batch, c_in, len]`), `dw` (`[c_out, cg, k]`) and the bias
/// gradient (`[c_out]`), flattened one after the other. Batch chunks run in
/// parallel, each with its own weight-gradient partial; the partials are
/// added in chunk order.
///
/// With a pre-activation `act` the conv reads `act(x)`, recomputed here
/// (into scratch, never a tensor); `dx` is then the column gradient
/// gathered back and multiplied by `act'(x)`.
fn backward<T: ActElem>(
    x: &[T],
    w: &[T],
    dy: &[T],
    taps: &Taps,
    d: &Dims,
    act: Option<Act>,
) -> Vec<T> {
    let (og, rows) = (d.og(), d.rows());
    let n_x = d.batch * d.c_in * d.len;
    let mut out = vec![T::default(); n_x + d.c_out * rows + d.c_out];
    let (dx, rest) = out.split_at_mut(n_x);
    let (dw, db) = rest.split_at_mut(d.c_out * rows);
    for (r, row) in dy.chunks_exact(d.p.max(1)).enumerate() {
        let mut acc = T::default();
        for &v in row {
            acc += v;
        }
        db[r % d.c_out] += acc;
    }
    let chunk = chunk_items(d.batch);
    // `im2col` and then the product write the whole column matrix.
    let n_cols = if taps.identity { 0 } else { rows * d.p };
    // `act(x)` of one group of one item, then the gradient at `act(x)`.
    let n_act = if act.is_some() { d.cg * d.len } else { 0 };
    let partials = par_chunks(dx, chunk * d.c_in * d.len, |ci, dxc| {
        with_scratch(n_cols + n_act, |scratch: &mut [T]| {
            let (cols, acted) = scratch.split_at_mut(n_cols);
            let mut dw = vec![T::default(); d.c_out * rows];
            for (bi, b) in (ci * chunk..d.batch.min((ci + 1) * chunk)).enumerate() {
                for g in 0..d.groups {
                    let span =
                        (b * d.c_in + g * d.cg) * d.len..(b * d.c_in + (g + 1) * d.cg) * d.len;
                    let local =
                        (bi * d.c_in + g * d.cg) * d.len..(bi * d.c_in + (g + 1) * d.cg) * d.len;
                    let dys = &dy[(b * d.c_out + g * og) * d.p..(b * d.c_out + (g + 1) * og) * d.p];
                    let wg = &w[g * og * rows..(g + 1) * og * rows];
                    let dwg = &mut dw[g * og * rows..(g + 1) * og * rows];
                    let dxs = &mut dxc[local];
                    let xs = &x[span];
                    // What the conv read: `x`, or `act(x)` recomputed.
                    let read = pre_activated(act, xs, acted);
                    // The gradient at what the conv read lands in `dxs`
                    // directly, or first in `acted` (done with `act(x)`).
                    if taps.identity {
                        // The input is its own column matrix, and its gradient
                        // the column gradient.
                        matmul((og, rows, d.p), dwg, true, dys, (d.p, 1), read, (1, d.p));
                        let dread = if act.is_some() {
                            &mut *acted
                        } else {
                            &mut *dxs
                        };
                        matmul((rows, d.p, og), dread, false, wg, (1, rows), dys, (d.p, 1));
                    } else {
                        // dW_g += dY [og, p] * cols^T [p, rows].
                        taps.im2col(read, d, cols);
                        matmul((og, rows, d.p), dwg, true, dys, (d.p, 1), cols, (1, d.p));
                        // dcols [rows, p] = W_g^T [rows, og] * dY [og, p], then col2im.
                        matmul((rows, d.p, og), cols, false, wg, (1, rows), dys, (d.p, 1));
                        if act.is_some() {
                            acted.fill(T::default());
                            taps.col2im(cols, d, acted);
                        } else {
                            taps.col2im(cols, d, dxs);
                        }
                    }
                    if let Some(a) = act {
                        let dread: &[T] = acted;
                        act_grads_into(a, xs, dread, dxs);
                    }
                }
            }
            dw
        })
    });
    for part in partials {
        for (a, v) in dw.iter_mut().zip(part) {
            *a += v;
        }
    }
    out
}

/// The forward op: `(x [batch, c_in, len], w [c_out, c_in / groups, k],
/// bias [c_out])` to `[batch, c_out, p]`.
struct GatherConv {
    taps: Arc<Taps>,
    p: usize,
    k: usize,
    groups: usize,
    /// Applied to the input before the conv reads it.
    act: Option<Act>,
}

impl CustomOp3 for GatherConv {
    fn name(&self) -> &'static str {
        "melvae-gather-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1, l2, self.p, self.k, self.groups)?;
        let shape = Shape::from((d.batch, d.c_out, d.p));
        let y = float_op!(
            "gather_conv",
            [
                (x, s1, l1, "input"),
                (w, s2, l2, "weight"),
                (b, s3, l3, "bias")
            ],
            forward(x, w, b, &self.taps, &d, self.act)
        );
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = GatherConvBackward {
            taps: self.taps.clone(),
            p: self.p,
            k: self.k,
            groups: self.groups,
            act: self.act,
        };
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &op)?;
        let (n_x, n_w) = (x.elem_count(), w.elem_count());
        let dx = packed.narrow(0, 0, n_x)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n_x, n_w)?.reshape(w.shape())?;
        let db = packed.narrow(0, n_x + n_w, b.elem_count())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The backward op: `(x, w, dy)` to `dx` and `dw` flattened into one vector.
struct GatherConvBackward {
    taps: Arc<Taps>,
    p: usize,
    k: usize,
    groups: usize,
    act: Option<Act>,
}

impl CustomOp3 for GatherConvBackward {
    fn name(&self) -> &'static str {
        "melvae-gather-conv-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1, l2, self.p, self.k, self.groups)?;
        let n = d.batch * d.c_in * d.len + d.c_out * d.rows() + d.c_out;
        let out = float_op!(
            "gather_conv backward",
            [
                (x, s1, l1, "input"),
                (w, s2, l2, "weight"),
                (dy, s3, l3, "output gradient")
            ],
            backward(x, w, dy, &self.taps, &d, self.act)
        );
        Ok((out, Shape::from(n)))
    }
}

/// A conv's gather indices for one input length and padding, checked once
/// and kept with their runs (built on the first CPU call), so a layer that
/// sees the same input size again reuses them.
#[derive(Debug)]
pub(crate) struct Gather {
    /// `[outputs * k]`: the position tap `j` of output `p` reads, at
    /// `p * k + j`, below `len`, or [`crate::conv::PAD`] (reads zero).
    pub idx: Vec<u32>,
    pub outputs: usize,
    pub k: usize,
    pub len: usize,
    taps: std::sync::OnceLock<Arc<Taps>>,
}

impl Gather {
    /// Fails when `idx` is not `outputs * k` positions below `len` (or
    /// padding), naming the op.
    pub(crate) fn new(
        idx: Vec<u32>,
        outputs: usize,
        k: usize,
        len: usize,
    ) -> candle_core::Result<Self> {
        if idx.len() != outputs * k
            || idx
                .iter()
                .any(|&i| i != crate::conv::PAD && i as usize >= len)
        {
            candle_core::bail!(
                "gather_conv: {} indices for {outputs} outputs of {k} taps below {len}",
                idx.len()
            );
        }
        Ok(Self {
            idx,
            outputs,
            k,
            len,
            taps: std::sync::OnceLock::new(),
        })
    }

    fn taps(&self) -> Arc<Taps> {
        self.taps
            .get_or_init(|| Arc::new(Taps::new(&self.idx, self.outputs, self.k, self.len)))
            .clone()
    }
}

/// The fused gather convolution (see the module docs): `x` `[batch, c_in,
/// len]`, `weight` `[c_out, c_in / groups, k]`, `bias` `[c_out]` (added to
/// every output, its gradient the sum of the output gradient's rows), the
/// taps of `gather`; `[batch, c_out, outputs]`. With `act` the conv reads
/// `act(x)`, which is never stored: the gradient is taken through it.
/// CPU f32/f64 only ([`fused`]).
pub(crate) fn gather_conv(
    x: &Tensor,
    gather: &Gather,
    weight: &Tensor,
    bias: Option<&Tensor>,
    groups: usize,
    act: Option<Act>,
) -> candle_core::Result<Tensor> {
    let (_, _, len) = x.dims3()?;
    let (c_out, _, k) = weight.dims3()?;
    if (len, k) != (gather.len, gather.k) {
        candle_core::bail!(
            "gather_conv: taps for {} positions and {} taps, input {len} and weight {k}",
            gather.len,
            gather.k
        );
    }
    let bias = match bias {
        Some(b) => b.reshape(c_out)?.contiguous()?,
        None => Tensor::zeros(c_out, weight.dtype(), weight.device())?,
    };
    let op = GatherConv {
        taps: gather.taps(),
        p: gather.outputs,
        k,
        groups,
        act,
    };
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias, op)
}

/// The activations with a fused kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Act {
    /// `x * Phi(x)` (exact, erf), as torch's `nn.GELU()`.
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
    /// `x` for `x > 0`, `alpha (e^x - 1)` otherwise (SEANet's ELU).
    Elu(f64),
}

/// `e^x` in f32 to about 2 ulp, branch-free so loops over it vectorise
/// (Cephes' `expf` polynomial; the argument clamped to the finite range,
/// rounding by the 1.5 * 2^23 trick, the power of two built from bits).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    // x - n ln 2, with ln 2 split in two for precision.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from t's bits: the low mantissa bits of t hold n (its ulp is 1),
    // integer arithmetic that vectorises (`n as i32` would not: it
    // saturates, element by element).
    let n_bits = t.to_bits().wrapping_sub(SHIFT.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `e^x - 1` in f32 without the cancellation near 0 (ELU's negative
/// branch): a Taylor polynomial for `|x| < 0.35` (relative error under
/// 1e-7), [`exp_f32`] minus one elsewhere; branch-free, so it vectorises.
#[inline(always)]
fn expm1_f32(x: f32) -> f32 {
    let taylor = x
        * (1.0
            + x * (0.5
                + x * (1.0 / 6.0
                    + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0 + x / 5040.0))))));
    if x.abs() < 0.35 {
        taylor
    } else {
        exp_f32(x) - 1.0
    }
}

/// `erf` in f32 to about 3e-7 absolute (4 ulp near 1): Abramowitz &
/// Stegun 7.1.26 with one [`exp_f32`] (candle's `gelu_erf` calls a slower
/// exact one).
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_f32(-a * a);
    y.copysign(x)
}

/// Per-element value and derivative of the activations.
trait ActElem:
    Elem + std::ops::Mul<Output = Self> + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self>
{
    fn act(a: Act, x: Self) -> Self;
    fn act_grad(a: Act, x: Self) -> Self;
}

macro_rules! act_elem {
    ($t:ty, $exp:expr, $expm1:expr, $erf:expr, $sqrt1_2:expr, $two_sqrt_pi:expr) => {
        impl ActElem for $t {
            #[inline(always)]
            fn act(a: Act, x: Self) -> Self {
                match a {
                    Act::Gelu => 0.5 * x * (1.0 + $erf(x * $sqrt1_2)),
                    Act::Silu => x / (1.0 + $exp(-x)),
                    Act::Elu(alpha) => {
                        let em1 = $expm1(x);
                        let neg = alpha as $t * em1;
                        if x > 0.0 {
                            x
                        } else {
                            neg
                        }
                    }
                }
            }

            #[inline(always)]
            fn act_grad(a: Act, x: Self) -> Self {
                match a {
                    Act::Gelu => {
                        let cdf = 0.5 * (1.0 + $erf(x * $sqrt1_2));
                        let pdf = $exp(-0.5 * x * x) * ($two_sqrt_pi * $sqrt1_2 * 0.5);
                        cdf + x * pdf
                    }
                    Act::Silu => {
                        let s = 1.0 / (1.0 + $exp(-x));
                        s * (1.0 + x * (1.0 - s))
                    }
                    Act::Elu(alpha) => {
                        let neg = alpha as $t * $exp(x);
                        if x > 0.0 {
                            1.0
                        } else {
                            neg
                        }
                    }
                }
            }
        }
    };
}

act_elem!(
    f32,
    exp_f32,
    expm1_f32,
    erf_f32,
    std::f32::consts::FRAC_1_SQRT_2,
    std::f32::consts::FRAC_2_SQRT_PI
);
act_elem!(
    f64,
    f64::exp,
    libm::expm1,
    libm::erf,
    std::f64::consts::FRAC_1_SQRT_2,
    std::f64::consts::FRAC_2_SQRT_PI
);

/// Elements per parallel chunk of an element-wise kernel.
const ELEMWISE_CHUNK: usize = 16 * 1024;

/// A vector of `n` elements filled by `fill(offset, chunk)` over chunks of
/// [`ELEMWISE_CHUNK`] on rayon's pool (element-wise work: the result does
/// not depend on the thread count).
fn par_fill<T: Elem>(n: usize, fill: impl Fn(usize, &mut [T]) + Sync + Send) -> Vec<T> {
    let mut out = vec![T::default(); n];
    par_chunks(&mut out, ELEMWISE_CHUNK, |i, c| fill(i * ELEMWISE_CHUNK, c));
    out
}

/// A copy of an element-wise loop compiled for AVX2: 8 f32 lanes instead
/// of the baseline's 4, the same arithmetic (no FMA contraction), so the
/// same result. Called through [`with_avx2!`].
macro_rules! avx2_copy {
    ($name:ident = $f:ident($($a:ident: $t:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $name<T: ActElem>($($a: $t),*) {
            $f($($a),*)
        }
    };
}

/// Calls the AVX2 copy when the CPU has AVX2, else the portable loop.
macro_rules! with_avx2 {
    ($portable:ident, $avx2:ident, ($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                unsafe { $avx2($($arg),*) }
            } else {
                $portable($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $portable($($arg),*)
        }
    }};
}

avx2_copy!(act_values_avx2 = act_values(a: Act, x: &[T], out: &mut [T]));
avx2_copy!(act_grads_avx2 = act_grads(a: Act, x: &[T], dy: &[T], out: &mut [T]));

/// `out = act(x)`, on AVX2 where the CPU has it.
fn act_into<T: ActElem>(a: Act, x: &[T], out: &mut [T]) {
    with_avx2!(act_values, act_values_avx2, (a, x, out))
}

/// What a pre-activation conv reads: `x`, or `act(x)` written into `buf`.
fn pre_activated<'a, T: ActElem>(act: Option<Act>, x: &'a [T], buf: &'a mut [T]) -> &'a [T] {
    match act {
        Some(a) => {
            act_into(a, x, buf);
            buf
        }
        None => x,
    }
}

/// `out = dy * act'(x)`, on AVX2 where the CPU has it.
fn act_grads_into<T: ActElem>(a: Act, x: &[T], dy: &[T], out: &mut [T]) {
    with_avx2!(act_grads, act_grads_avx2, (a, x, dy, out))
}

/// `out = act(x)`, one loop per activation (the match outside) so each
/// vectorises.
#[inline(always)]
fn act_values<T: ActElem>(a: Act, x: &[T], out: &mut [T]) {
    match a {
        Act::Gelu => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = T::act(Act::Gelu, v);
            }
        }
        Act::Silu => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = T::act(Act::Silu, v);
            }
        }
        Act::Elu(alpha) => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = T::act(Act::Elu(alpha), v);
            }
        }
    }
}

/// `out = dy * act'(x)`, one loop per activation.
#[inline(always)]
fn act_grads<T: ActElem>(a: Act, x: &[T], dy: &[T], out: &mut [T]) {
    match a {
        Act::Gelu => {
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
                *o = g * T::act_grad(Act::Gelu, v);
            }
        }
        Act::Silu => {
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
                *o = g * T::act_grad(Act::Silu, v);
            }
        }
        Act::Elu(alpha) => {
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
                *o = g * T::act_grad(Act::Elu(alpha), v);
            }
        }
    }
}

/// The activation's forward op (one pass) with its own backward.
struct Activation(Act);

impl candle_core::CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        "melvae-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: ActElem>(a: Act, x: &[T]) -> Vec<T> {
            par_fill(x.len(), |at, out| act_into(a, &x[at..at + out.len()], out))
        }
        let out = float_op!("activation", [(x, s, l, "input")], run(self.0, x));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(
            &dy.contiguous()?,
            &ActivationGrad(self.0),
        )?))
    }
}

/// `(x, dy)` to `dy * act'(x)`.
struct ActivationGrad(Act);

impl candle_core::CustomOp2 for ActivationGrad {
    fn name(&self) -> &'static str {
        "melvae-activation-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: ActElem>(a: Act, x: &[T], dy: &[T]) -> Vec<T> {
            par_fill(x.len(), |at, out| {
                act_grads_into(a, &x[at..at + out.len()], &dy[at..at + out.len()], out)
            })
        }
        let out = float_op!(
            "activation backward",
            [(x, s1, l1, "input"), (dy, s2, l2, "output gradient")],
            run(self.0, x, dy)
        );
        Ok((out, l1.shape().clone()))
    }
}

/// The activation `a` of `x` (any shape): one fused op with its own
/// backward on the CPU in f32/f64 ([`fused`]), candle's ops elsewhere.
pub(crate) fn activation(x: &Tensor, a: Act) -> candle_core::Result<Tensor> {
    if use_kernel("act", x) {
        return x.contiguous()?.apply_op1(Activation(a));
    }
    match a {
        Act::Gelu => x.gelu_erf(),
        Act::Silu => x.silu(),
        Act::Elu(alpha) => x.elu(alpha),
    }
}

/// `x * scale + shift` with `x` viewed as `[outer, inner, dim]` and
/// `scale`, `shift` `[outer, dim]` (each broadcast over `inner`): the
/// bias of a linear layer (`outer` 1), adaLN's modulation and gate
/// (`outer` the batch). `(x, scale, shift)`; the flags say which of the
/// two are real (a missing one is ones or zeros and gets no gradient).
struct RowsAffine {
    outer: usize,
    has_scale: bool,
}

impl CustomOp3 for RowsAffine {
    fn name(&self) -> &'static str {
        "melvae-rows-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: ActElem>(x: &[T], s: &[T], h: &[T], outer: usize, scale: bool) -> Vec<T> {
            let d = s.len() / outer;
            let per = x.len() / outer;
            let mut y = Vec::with_capacity(x.len());
            for o in 0..outer {
                let (so, ho) = (&s[o * d..(o + 1) * d], &h[o * d..(o + 1) * d]);
                for row in x[o * per..(o + 1) * per].chunks_exact(d) {
                    if scale {
                        y.extend(row.iter().zip(so).zip(ho).map(|((&v, &a), &b)| v * a + b));
                    } else {
                        y.extend(row.iter().zip(ho).map(|(&v, &b)| v + b));
                    }
                }
            }
            y
        }
        let (o, has) = (self.outer, self.has_scale);
        let out = float_op!(
            "rows_affine",
            [
                (x, s1, l1, "input"),
                (sc, s2, l2, "scale"),
                (h, s3, l3, "shift")
            ],
            run(x, sc, h, o, has)
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        h: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = RowsAffineBackward {
            outer: self.outer,
            has_scale: self.has_scale,
        };
        let packed = x.apply_op3_no_bwd(s, &dy.contiguous()?, &op)?;
        let (n_x, n_s) = (x.elem_count(), s.elem_count());
        let dx = packed.narrow(0, 0, n_x)?.reshape(x.shape())?;
        let ds = packed.narrow(0, n_x, n_s)?.reshape(s.shape())?;
        let dh = packed
            .narrow(0, n_x + n_s, h.elem_count())?
            .reshape(h.shape())?;
        Ok((Some(dx), self.has_scale.then_some(ds), Some(dh)))
    }
}

/// `(x, scale, dy)` to `dx = dy * scale`, `dscale = sum dy * x`, `dshift =
/// sum dy` (sums over `inner`), flattened one after the other.
struct RowsAffineBackward {
    outer: usize,
    has_scale: bool,
}

impl CustomOp3 for RowsAffineBackward {
    fn name(&self) -> &'static str {
        "melvae-rows-affine-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: ActElem>(x: &[T], s: &[T], dy: &[T], outer: usize, scale: bool) -> Vec<T> {
            let d = s.len() / outer;
            let per = x.len() / outer;
            let mut dx = Vec::with_capacity(x.len() + 2 * s.len());
            let (mut ds, mut dh) = (vec![T::default(); s.len()], vec![T::default(); s.len()]);
            for o in 0..outer {
                let so = &s[o * d..(o + 1) * d];
                let (dso, dho) = (&mut ds[o * d..(o + 1) * d], &mut dh[o * d..(o + 1) * d]);
                let rows = x[o * per..(o + 1) * per]
                    .chunks_exact(d)
                    .zip(dy[o * per..(o + 1) * per].chunks_exact(d));
                for (xr, gr) in rows {
                    for (acc, &g) in dho.iter_mut().zip(gr) {
                        *acc += g;
                    }
                    if scale {
                        for ((acc, &g), &v) in dso.iter_mut().zip(gr).zip(xr) {
                            *acc += g * v;
                        }
                        dx.extend(gr.iter().zip(so).map(|(&g, &a)| g * a));
                    } else {
                        dx.extend_from_slice(gr);
                    }
                }
            }
            dx.extend(ds);
            dx.extend(dh);
            dx
        }
        let (o, has) = (self.outer, self.has_scale);
        let out = float_op!(
            "rows_affine backward",
            [
                (x, s1, l1, "input"),
                (sc, s2, l2, "scale"),
                (dy, s3, l3, "output gradient")
            ],
            run(x, sc, dy, o, has)
        );
        let n = l1.shape().elem_count() + 2 * l2.shape().elem_count();
        Ok((out, Shape::from(n)))
    }
}

/// `x * scale + shift` for `x` `[..., dim]` and `scale`, `shift` (either
/// may be absent) of `[dim]` or `[batch, 1, dim]` with `x` `[batch, t,
/// dim]`, broadcast over the rows: one fused op with its own backward (the
/// sums over rows in one pass; candle reduces such broadcasts with a slow
/// strided sum). CPU f32/f64 ([`use_kernel`] `"affine"`), candle's
/// broadcasts elsewhere.
pub(crate) fn rows_affine(
    x: &Tensor,
    scale: Option<&Tensor>,
    shift: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let composed = || -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        if let Some(s) = scale {
            y = y.broadcast_mul(s)?;
        }
        if let Some(h) = shift {
            y = y.broadcast_add(h)?;
        }
        Ok(y)
    };
    let Some(like) = scale.or(shift) else {
        return Ok(x.clone());
    };
    if !use_kernel("affine", x) || like.dtype() != x.dtype() {
        return composed();
    }
    if x.rank() == 0 || x.elem_count() == 0 {
        return composed();
    }
    let d = x.dim(candle_core::D::Minus1)?;
    let outer = match like.dims() {
        [n] if *n == d => 1,
        [b, 1, n] if *n == d && x.rank() == 3 && x.dim(0)? == *b => *b,
        _ => return composed(),
    };
    if let (Some(a), Some(b)) = (scale, shift) {
        if a.dims() != b.dims() || a.dtype() != b.dtype() {
            // Mixed shapes: candle's broadcasting handles them.
            return composed();
        }
    }
    let shaped = |t: Option<&Tensor>, fill: f64| -> candle_core::Result<Tensor> {
        match t {
            Some(t) => t.contiguous(),
            None => Tensor::full(fill, like.dims(), x.device())?.to_dtype(x.dtype()),
        }
    };
    let (s, h) = (shaped(scale, 1.0)?, shaped(shift, 0.0)?);
    x.contiguous()?.apply_op3(
        &s,
        &h,
        RowsAffine {
            outer,
            has_scale: scale.is_some(),
        },
    )
}

/// Snake, `x + sin^2(alpha x) / (alpha + 1e-9)` with `alpha` per channel:
/// `(x [batch, channels, inner...], alpha [channels])` to `x`'s shape, one
/// pass; its backward gives `dx` and `d alpha` in one pass too (the
/// per-channel sums over batch and time reduced in a fixed order).
struct Snake;

/// The sine and cosine Snake needs (std's, as candle's `sin`).
trait SnakeElem: ActElem + SoftmaxElem {
    fn sin_cos(self) -> (Self, Self);
}

impl SnakeElem for f32 {
    fn sin_cos(self) -> (Self, Self) {
        f32::sin_cos(self)
    }
}

impl SnakeElem for f64 {
    fn sin_cos(self) -> (Self, Self) {
        f64::sin_cos(self)
    }
}

/// `(channels, inner)` of a Snake input `[batch, channels, inner...]`.
fn snake_dims(x: &Layout, alpha: &Layout) -> candle_core::Result<(usize, usize)> {
    let dims = x.shape().dims();
    let c = alpha.shape().elem_count();
    if dims.len() < 2 || dims[1] != c || alpha.shape().rank() != 1 {
        candle_core::bail!(
            "melvae snake: input {:?} and alpha {:?} do not fit",
            x.shape(),
            alpha.shape()
        );
    }
    Ok((c, dims[2..].iter().product()))
}

fn snake_forward<T: SnakeElem>(x: &[T], alpha: &[T], c: usize, inner: usize) -> Vec<T> {
    let eps = T::of(1e-9);
    let mut y = vec![T::default(); x.len()];
    // Rows ([batch, channel] pairs) grouped into chunks of about
    // ELEMWISE_CHUNK elements.
    let rows = softmax_chunk_rows(inner);
    par_chunks(&mut y, rows * inner, |ci, yc| {
        for (k, yr) in yc.chunks_exact_mut(inner.max(1)).enumerate() {
            let row = ci * rows + k;
            let a = alpha[row % c];
            let inv = T::ONE / (a + eps);
            for (o, &v) in yr.iter_mut().zip(&x[row * inner..(row + 1) * inner]) {
                let (s, _) = (a * v).sin_cos();
                *o = v + s * s * inv;
            }
        }
    });
    y
}

/// `dx` (the input's shape) then `d alpha` (`[channels]`), flattened.
fn snake_backward<T: SnakeElem>(x: &[T], alpha: &[T], dy: &[T], c: usize, inner: usize) -> Vec<T> {
    let eps = T::of(1e-9);
    let mut out = vec![T::default(); x.len() + c];
    let (dx, dalpha) = out.split_at_mut(x.len());
    let rows = softmax_chunk_rows(inner);
    // Per row, its share of d alpha; rows reduced in order below.
    let partials = par_chunks(dx, rows * inner, |ci, dc| {
        let mut shares = Vec::with_capacity(rows);
        for (k, dr) in dc.chunks_exact_mut(inner.max(1)).enumerate() {
            let row = ci * rows + k;
            let a = alpha[row % c];
            let inv = T::ONE / (a + eps);
            let mut da = T::default();
            let span = row * inner..(row + 1) * inner;
            for ((o, &v), &g) in dr.iter_mut().zip(&x[span.clone()]).zip(&dy[span]) {
                let (s, co) = (a * v).sin_cos();
                let s2 = T::of(2.0) * s * co;
                *o = g * (T::ONE + s2 * a * inv);
                da += g * (s2 * v * inv - s * s * inv * inv);
            }
            shares.push(da);
        }
        shares
    });
    for (row, p) in partials.into_iter().flatten().enumerate() {
        dalpha[row % c] += p;
    }
    out
}

impl candle_core::CustomOp2 for Snake {
    fn name(&self) -> &'static str {
        "melvae-snake"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, inner) = snake_dims(l1, l2)?;
        let out = float_op!(
            "snake",
            [(x, s1, l1, "input"), (a, s2, l2, "alpha")],
            snake_forward(x, a, c, inner)
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let all = x.apply_op3_no_bwd(alpha, &dy.contiguous()?, &SnakeBackward)?;
        let n = x.elem_count();
        Ok((
            Some(all.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(all.narrow(0, n, alpha.elem_count())?),
        ))
    }
}

/// `(x, alpha, dy)` to [`snake_backward`]'s flattened gradients.
struct SnakeBackward;

impl CustomOp3 for SnakeBackward {
    fn name(&self) -> &'static str {
        "melvae-snake-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, inner) = snake_dims(l1, l2)?;
        if l3.shape() != l1.shape() {
            candle_core::bail!(
                "melvae snake backward: gradient {:?} for input {:?}",
                l3.shape(),
                l1.shape()
            );
        }
        let out = float_op!(
            "snake backward",
            [
                (x, s1, l1, "input"),
                (a, s2, l2, "alpha"),
                (dy, s3, l3, "output gradient")
            ],
            snake_backward(x, a, dy, c, inner)
        );
        Ok((out, Shape::from(l1.shape().elem_count() + c)))
    }
}

/// Snake of `x` `[batch, channels, ...]` with `alpha` `[channels]`: the
/// fused op on the CPU in f32/f64, `None` elsewhere (the caller composes
/// it).
pub(crate) fn snake(x: &Tensor, alpha: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !use_kernel("act", x) || alpha.dtype() != x.dtype() || x.rank() < 2 || x.elem_count() == 0 {
        return Ok(None);
    }
    Ok(Some(
        x.contiguous()?.apply_op2(&alpha.contiguous()?, Snake)?,
    ))
}

/// Rows per parallel chunk of the softmax: about [`ELEMWISE_CHUNK`]
/// elements, fixed by the shape.
fn softmax_chunk_rows(len: usize) -> usize {
    (ELEMWISE_CHUNK / len.max(1)).max(1)
}

/// `softmax(scale * x)` over the last axis, one pass per row (max, exp,
/// sum, normalise), rows in parallel chunks; its backward
/// `dx = scale * y * (dy - sum(dy * y))` per row.
struct ScaledSoftmax(f64);

/// The exponential the softmax uses: [`exp_f32`] in f32, std's in f64.
trait SoftmaxElem: ActElem + PartialOrd + std::ops::Div<Output = Self> {
    fn exp_(self) -> Self;
    fn of(v: f64) -> Self;
}

impl SoftmaxElem for f32 {
    #[inline(always)]
    fn exp_(self) -> Self {
        exp_f32(self)
    }
    fn of(v: f64) -> Self {
        v as f32
    }
}

impl SoftmaxElem for f64 {
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
    fn of(v: f64) -> Self {
        v
    }
}

fn softmax_rows<T: SoftmaxElem>(x: &[T], len: usize, scale: f64) -> Vec<T> {
    let mut y = vec![T::default(); x.len()];
    let rows = softmax_chunk_rows(len);
    let scale = T::of(scale);
    par_chunks(&mut y, rows * len, |ci, yc| {
        let xc = &x[ci * rows * len..ci * rows * len + yc.len()];
        for (yr, xr) in yc.chunks_exact_mut(len).zip(xc.chunks_exact(len)) {
            // The largest scaled value (any sign of scale).
            let mut max = xr[0] * scale;
            for &v in xr {
                if v * scale > max {
                    max = v * scale;
                }
            }
            let mut sum = T::default();
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (v * scale - max).exp_();
                sum += *o;
            }
            let inv = T::ONE / sum;
            for o in yr.iter_mut() {
                *o = *o * inv;
            }
        }
    });
    y
}

fn softmax_grad_rows<T: SoftmaxElem>(y: &[T], dy: &[T], len: usize, scale: f64) -> Vec<T> {
    let mut dx = vec![T::default(); y.len()];
    let rows = softmax_chunk_rows(len);
    let scale = T::of(scale);
    par_chunks(&mut dx, rows * len, |ci, dc| {
        let at = ci * rows * len;
        let (yc, gc) = (&y[at..at + dc.len()], &dy[at..at + dc.len()]);
        for ((dr, yr), gr) in dc
            .chunks_exact_mut(len)
            .zip(yc.chunks_exact(len))
            .zip(gc.chunks_exact(len))
        {
            let mut dot = T::default();
            for (&a, &g) in yr.iter().zip(gr) {
                dot += a * g;
            }
            for ((o, &a), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *o = scale * a * (g - dot);
            }
        }
    });
    dx
}

impl candle_core::CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "melvae-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let len = l.shape().dims().last().copied().unwrap_or(1);
        let out = float_op!(
            "softmax",
            [(x, s, l, "input")],
            softmax_rows(x, len, self.0)
        );
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &dy.contiguous()?,
            &ScaledSoftmaxGrad(self.0),
        )?))
    }
}

/// `(y, dy)` to the softmax's input gradient.
struct ScaledSoftmaxGrad(f64);

impl candle_core::CustomOp2 for ScaledSoftmaxGrad {
    fn name(&self) -> &'static str {
        "melvae-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let len = l1.shape().dims().last().copied().unwrap_or(1);
        let out = float_op!(
            "softmax backward",
            [(y, s1, l1, "output"), (dy, s2, l2, "output gradient")],
            softmax_grad_rows(y, dy, len, self.0)
        );
        Ok((out, l1.shape().clone()))
    }
}

/// `softmax(scale * x)` over the last axis: one fused op on the CPU in
/// f32/f64 (rows in parallel), candle's ops elsewhere.
pub(crate) fn scaled_softmax(x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if !use_kernel("softmax", x) || x.rank() == 0 || x.elem_count() == 0 {
        return candle_nn::ops::softmax(&(x * scale)?, candle_core::D::Minus1);
    }
    x.contiguous()?.apply_op1(ScaledSoftmax(scale))
}

/// The element functions the fused LSTM needs (the same formulas as
/// candle's `sigmoid` and `tanh`).
trait LstmElem: ActElem {
    fn sigmoid(self) -> Self;
    fn tanh_(self) -> Self;
}

impl LstmElem for f32 {
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
    fn tanh_(self) -> Self {
        self.tanh()
    }
}

impl LstmElem for f64 {
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
    fn tanh_(self) -> Self {
        self.tanh()
    }
}

/// Sizes of one fused LSTM layer pass.
#[derive(Debug, Clone, Copy)]
struct LstmDims {
    batch: usize,
    time: usize,
    hidden: usize,
}

impl LstmDims {
    /// Values per output step: `h`, `c` and the four activated gates.
    fn width(&self) -> usize {
        6 * self.hidden
    }

    /// Offset of step `t` of batch item `b` in the output.
    fn at(&self, b: usize, t: usize) -> usize {
        (b * self.time + t) * self.width()
    }
}

/// One LSTM layer over a whole sequence (torch's gate order i, f, g, o):
/// `(xg [batch, time, 4h]` (the input's share of the gates, biases
/// included), `w_hh [4h, h]`, `s0 [batch, 2h]` (`h0` then `c0`)) to
/// `[batch, time, 6h]`: per step `h_t`, `c_t` and the activated gates
/// (kept for the backward). Each step is one GEMM for the recurrent
/// product and one pass over the gates, instead of a dozen candle ops.
struct LstmSeq;

fn lstm_forward<T: LstmElem>(xg: &[T], w: &[T], s0: &[T], d: LstmDims) -> Vec<T> {
    let (hd, wd) = (d.hidden, d.width());
    let mut out = vec![T::default(); d.batch * d.time * wd];
    let mut gates = vec![T::default(); d.batch * 4 * hd];
    for t in 0..d.time {
        // gates = xg_t + h_{t-1} W^T.
        for b in 0..d.batch {
            let src = &xg[(b * d.time + t) * 4 * hd..(b * d.time + t + 1) * 4 * hd];
            gates[b * 4 * hd..(b + 1) * 4 * hd].copy_from_slice(src);
        }
        let (h_prev, h_rs): (&[T], usize) = if t == 0 {
            (s0, 2 * hd)
        } else {
            (&out[d.at(0, t - 1)..], d.time * wd)
        };
        matmul(
            (d.batch, 4 * hd, hd),
            &mut gates,
            true,
            h_prev,
            (h_rs, 1),
            w,
            (1, hd),
        );
        for b in 0..d.batch {
            let g = &gates[b * 4 * hd..(b + 1) * 4 * hd];
            // Step t - 1 lies before step t: split there, no copy.
            let (before, rest) = out.split_at_mut(d.at(b, t));
            let c_prev = if t == 0 {
                &s0[b * 2 * hd + hd..(b + 1) * 2 * hd]
            } else {
                &before[d.at(b, t - 1) + hd..d.at(b, t - 1) + 2 * hd]
            };
            let o = &mut rest[..wd];
            for j in 0..hd {
                let (i, f) = (g[j].sigmoid(), g[hd + j].sigmoid());
                let (gg, og) = (g[2 * hd + j].tanh_(), g[3 * hd + j].sigmoid());
                let c = f * c_prev[j] + i * gg;
                o[j] = og * c.tanh_();
                o[hd + j] = c;
                o[2 * hd + j] = i;
                o[3 * hd + j] = f;
                o[4 * hd + j] = gg;
                o[5 * hd + j] = og;
            }
        }
    }
    out
}

/// The backward of [`lstm_forward`]: `d xg` (`[batch, time, 4h]`), `d w_hh`
/// (`[4h, h]`) and `d s0` (`[batch, 2h]`), flattened one after the other.
/// `dout` holds the gradients of every output value (`h_t`, `c_t`, gates).
fn lstm_backward<T: LstmElem>(w: &[T], s0: &[T], out: &[T], dout: &[T], d: LstmDims) -> Vec<T> {
    let (hd, wd) = (d.hidden, d.width());
    let n_xg = d.batch * d.time * 4 * hd;
    let mut res = vec![T::default(); n_xg + 4 * hd * hd + d.batch * 2 * hd];
    let (dxg, rest) = res.split_at_mut(n_xg);
    let (dw, ds0) = rest.split_at_mut(4 * hd * hd);
    // The recurrent gradients into step t (from step t + 1).
    let mut dh_rec = vec![T::default(); d.batch * hd];
    let mut dc_rec = vec![T::default(); d.batch * hd];
    let mut da = vec![T::default(); d.batch * 4 * hd];
    let one = T::ONE;
    for t in (0..d.time).rev() {
        for b in 0..d.batch {
            let o = &out[d.at(b, t)..d.at(b, t) + wd];
            let go = &dout[d.at(b, t)..d.at(b, t) + wd];
            let c_prev = |j: usize| {
                if t == 0 {
                    s0[b * 2 * hd + hd + j]
                } else {
                    out[d.at(b, t - 1) + hd + j]
                }
            };
            for j in 0..hd {
                let (c, i, f, g, og) = (
                    o[hd + j],
                    o[2 * hd + j],
                    o[3 * hd + j],
                    o[4 * hd + j],
                    o[5 * hd + j],
                );
                let dh = go[j] + dh_rec[b * hd + j];
                let tc = c.tanh_();
                let dog = dh * tc + go[5 * hd + j];
                let dc = dc_rec[b * hd + j] + go[hd + j] + dh * og * (one - tc * tc);
                let di = dc * g + go[2 * hd + j];
                let dgg = dc * i + go[4 * hd + j];
                let df = dc * c_prev(j) + go[3 * hd + j];
                dc_rec[b * hd + j] = dc * f;
                let a = &mut da[b * 4 * hd..(b + 1) * 4 * hd];
                a[j] = di * i * (one - i);
                a[hd + j] = df * f * (one - f);
                a[2 * hd + j] = dgg * (one - g * g);
                a[3 * hd + j] = dog * og * (one - og);
            }
            let at = (b * d.time + t) * 4 * hd;
            dxg[at..at + 4 * hd].copy_from_slice(&da[b * 4 * hd..(b + 1) * 4 * hd]);
        }
        // dW += da^T h_{t-1}; dh_rec = da W.
        let (h_prev, h_rs): (&[T], usize) = if t == 0 {
            (s0, 2 * hd)
        } else {
            (&out[d.at(0, t - 1)..], d.time * wd)
        };
        matmul(
            (4 * hd, hd, d.batch),
            dw,
            true,
            &da,
            (1, 4 * hd),
            h_prev,
            (h_rs, 1),
        );
        matmul(
            (d.batch, hd, 4 * hd),
            &mut dh_rec,
            false,
            &da,
            (4 * hd, 1),
            w,
            (hd, 1),
        );
    }
    for b in 0..d.batch {
        ds0[b * 2 * hd..b * 2 * hd + hd].copy_from_slice(&dh_rec[b * hd..(b + 1) * hd]);
        ds0[b * 2 * hd + hd..(b + 1) * 2 * hd].copy_from_slice(&dc_rec[b * hd..(b + 1) * hd]);
    }
    res
}

impl LstmSeq {
    fn dims(xg: &Layout, w: &Layout, s0: &Layout) -> candle_core::Result<LstmDims> {
        let (batch, time, g4) = xg.shape().dims3()?;
        let (wr, hidden) = w.shape().dims2()?;
        let (sb, s2) = s0.shape().dims2()?;
        if g4 != 4 * hidden || wr != 4 * hidden || sb != batch || s2 != 2 * hidden {
            candle_core::bail!(
                "melvae lstm: gates {:?}, w_hh {:?}, state {:?} do not fit",
                xg.shape(),
                w.shape(),
                s0.shape()
            );
        }
        Ok(LstmDims {
            batch,
            time,
            hidden,
        })
    }
}

impl CustomOp3 for LstmSeq {
    fn name(&self) -> &'static str {
        "melvae-lstm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Self::dims(l1, l2, l3)?;
        let out = float_op!(
            "lstm",
            [
                (xg, s1, l1, "gates"),
                (w, s2, l2, "w_hh"),
                (s0, s3, l3, "state")
            ],
            lstm_forward(xg, w, s0, d)
        );
        Ok((out, Shape::from((d.batch, d.time, d.width()))))
    }

    fn bwd(
        &self,
        xg: &Tensor,
        w: &Tensor,
        s0: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, g4) = xg.dims3()?;
        let h = g4 / 4;
        let all = w.apply_op3_no_bwd(
            &Tensor::cat(&[s0.flatten_all()?, out.flatten_all()?], 0)?,
            &dout.contiguous()?,
            &LstmSeqBackward { batch: b, time: t },
        )?;
        let n_xg = b * t * g4;
        Ok((
            Some(all.narrow(0, 0, n_xg)?.reshape((b, t, g4))?),
            Some(all.narrow(0, n_xg, g4 * h)?.reshape((g4, h))?),
            Some(
                all.narrow(0, n_xg + g4 * h, b * 2 * h)?
                    .reshape((b, 2 * h))?,
            ),
        ))
    }
}

/// `(w_hh, [s0 | out] flattened, dout)` to the flattened gradients of
/// [`lstm_backward`].
struct LstmSeqBackward {
    batch: usize,
    time: usize,
}

impl CustomOp3 for LstmSeqBackward {
    fn name(&self) -> &'static str {
        "melvae-lstm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g4, hidden) = l1.shape().dims2()?;
        let d = LstmDims {
            batch: self.batch,
            time: self.time,
            hidden,
        };
        let n_s0 = d.batch * 2 * hidden;
        if g4 != 4 * hidden
            || l2.shape().elem_count() != n_s0 + d.batch * d.time * d.width()
            || l3.shape().elem_count() != d.batch * d.time * d.width()
        {
            candle_core::bail!("melvae lstm backward: sizes do not fit");
        }
        let out = float_op!(
            "lstm backward",
            [
                (w, s1, l1, "w_hh"),
                (so, s2, l2, "state and outputs"),
                (dout, s3, l3, "output gradient")
            ],
            lstm_backward(w, &so[..n_s0], &so[n_s0..], dout, d)
        );
        let n = d.batch * d.time * 4 * hidden + 4 * hidden * hidden + n_s0;
        Ok((out, Shape::from(n)))
    }
}

/// One LSTM layer over a sequence from the input's share of the gates
/// `xg` `[batch, time, 4h]`, `w_hh` `[4h, h]` and the state `h0`, `c0`
/// (`[batch, h]`): `[batch, time, 6h]` (per step `h_t`, `c_t`, then the
/// gates), or `None` where the fused op does not apply (the caller steps
/// the composed cell).
pub(crate) fn lstm_sequence(
    xg: &Tensor,
    w_hh: &Tensor,
    h0: &Tensor,
    c0: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !use_kernel("lstm", xg)
        || [w_hh, h0, c0].iter().any(|t| t.dtype() != xg.dtype())
        || xg.elem_count() == 0
    {
        // (An empty batch: the stepped cell handles it.)
        return Ok(None);
    }
    let s0 = Tensor::cat(&[h0, c0], 1)?.contiguous()?;
    Ok(Some(xg.contiguous()?.apply_op3(
        &w_hh.contiguous()?,
        &s0,
        LstmSeq,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::gather_conv_composed;
    use crate::testing::{
        check_gradients, max_abs_diff, max_abs_diff_all, noise, value_and_grads, GradCheck,
    };
    use candle_core::Var;

    /// Strided, dilated taps over `len` positions: output `p`, tap `k` reads
    /// `(p * 2 + k * 3) % len` (repeats included), except the padding taps:
    /// where `p + k` is 3 mod 4 (isolated), and the last tap of the last two
    /// outputs (a run of two).
    fn taps(outputs: usize, k: usize, len: usize) -> Vec<u32> {
        (0..outputs)
            .flat_map(|p| {
                (0..k).map(move |ki| {
                    if (p + ki) % 4 == 3 || (ki == k - 1 && p + 2 >= outputs) {
                        crate::conv::PAD
                    } else {
                        ((p * 2 + ki * 3) % len) as u32
                    }
                })
            })
            .collect()
    }

    /// The fused scaled softmax equals candle's `softmax(scale * x)` in value
    /// and gradient (f64; f32 within 1e-6; a non-contiguous input; more
    /// rows than one parallel chunk, the last shorter) and passes a
    /// finite-difference check.
    #[test]
    fn fused_softmax_equals_candles_and_its_gradients_check() {
        for (shape, scale) in [(vec![2, 5, 7], 0.37), (vec![2, 7, 2503], -1.3)] {
            // The last two axes swapped: a non-contiguous input.
            let xt = Var::from_tensor(&(noise(&shape, 1).unwrap() * 3.0).unwrap()).unwrap();
            let x = || xt.as_tensor().transpose(1, 2).unwrap();
            assert!(!x().is_contiguous());
            let probe = noise(x().dims(), 2).unwrap();
            let run = |fused: bool| {
                let y = if fused {
                    scaled_softmax(&x(), scale).unwrap()
                } else {
                    candle_nn::ops::softmax(&(x() * scale).unwrap(), candle_core::D::Minus1)
                        .unwrap()
                };
                value_and_grads(y, &probe, &[&xt]).unwrap()
            };
            let d = max_abs_diff_all(&run(true), &run(false)).unwrap();
            assert!(d < 1e-12, "{shape:?}: {d}");
            let x32 = x().to_dtype(DType::F32).unwrap();
            let y32 = scaled_softmax(&x32, scale).unwrap();
            let r32 =
                candle_nn::ops::softmax(&(&x32 * scale).unwrap(), candle_core::D::Minus1).unwrap();
            assert!(max_abs_diff(&y32, &r32).unwrap() < 1e-6, "{shape:?} f32");
            if shape[2] < 10 {
                let vars = vec![("x".to_string(), xt.clone())];
                check_gradients(&vars, GradCheck::default(), || scaled_softmax(&x(), scale))
                    .unwrap();
            }
        }
    }

    /// The fused linear product equals candle's matmul in value and in both
    /// gradients (f64, a non-contiguous input, more than one parallel row
    /// block with a shorter last one), passes a finite-difference check,
    /// and runs in f32.
    #[test]
    fn fused_linear_equals_matmul_and_its_gradients_check() {
        for rows in [5, 150] {
            // [k, rows] transposed: a non-contiguous [rows, k].
            let xt = Var::from_tensor(&noise(&[3, rows], 1).unwrap()).unwrap();
            let w = Var::from_tensor(&noise(&[4, 3], 2).unwrap()).unwrap();
            let x = || xt.as_tensor().t().unwrap();
            assert!(!x().is_contiguous());
            let probe = noise(&[rows, 4], 3).unwrap();
            let run = |fused: bool| {
                let y = if fused {
                    linear(&x(), w.as_tensor()).unwrap()
                } else {
                    x().matmul(&w.as_tensor().t().unwrap()).unwrap()
                };
                value_and_grads(y, &probe, &[&xt, &w]).unwrap()
            };
            let d = max_abs_diff_all(&run(true), &run(false)).unwrap();
            assert!(d < 1e-12, "{rows} rows: {d}");
            let vars = vec![("x".to_string(), xt.clone()), ("w".to_string(), w.clone())];
            check_gradients(&vars, GradCheck::default(), || linear(&x(), w.as_tensor())).unwrap();
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let y32 = linear(&f32(&x()), &f32(w.as_tensor())).unwrap();
            let y = linear(&x(), w.as_tensor()).unwrap();
            assert!(max_abs_diff(&y32.to_dtype(DType::F64).unwrap(), &y).unwrap() < 1e-5);
        }
        let bad = linear(&noise(&[2, 3], 1).unwrap(), &noise(&[4, 5], 1).unwrap());
        assert!(bad.is_err());
    }

    /// The fused row affine equals candle's broadcasts (bias `[dim]`,
    /// per-batch scale and shift `[batch, 1, dim]`, scale or shift alone)
    /// in value and gradients, and passes finite-difference checks.
    #[test]
    fn fused_rows_affine_equals_broadcasts() {
        let xt = Var::from_tensor(&noise(&[2, 5, 4], 13).unwrap()).unwrap();
        let x = || xt.as_tensor().transpose(1, 2).unwrap(); // [2, 4, 5]
        let v = |shape: &[usize], seed| Var::from_tensor(&noise(shape, seed).unwrap()).unwrap();
        let (bs, bh) = (v(&[2, 1, 5], 14), v(&[2, 1, 5], 15));
        let (s1, h1) = (v(&[5], 16), v(&[5], 17));
        let probe = noise(&[2, 4, 5], 18).unwrap();
        for (scale, shift) in [
            (Some(&bs), Some(&bh)),
            (Some(&s1), Some(&h1)),
            (None, Some(&h1)),
            (Some(&bs), None),
        ] {
            let (so, ho) = (scale.map(|v| v.as_tensor()), shift.map(|v| v.as_tensor()));
            let fused = || rows_affine(&x(), so, ho);
            let composed = || {
                let mut y = x();
                if let Some(s) = so {
                    y = y.broadcast_mul(s).unwrap();
                }
                if let Some(h) = ho {
                    y = y.broadcast_add(h).unwrap();
                }
                y
            };
            let mut vars = vec![("x".to_string(), xt.clone())];
            vars.extend(scale.map(|v| ("scale".to_string(), v.clone())));
            vars.extend(shift.map(|v| ("shift".to_string(), v.clone())));
            let grads = |y: Tensor| {
                let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                vars.iter()
                    .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
                    .collect::<Vec<_>>()
            };
            let (yf, yc) = (fused().unwrap(), composed());
            assert!(max_abs_diff(&yf, &yc).unwrap() < 1e-12);
            for (a, b) in grads(yf).iter().zip(grads(yc)) {
                assert!(max_abs_diff(a, &b).unwrap() < 1e-12);
            }
            check_gradients(&vars, GradCheck::default(), fused).unwrap();
        }
    }

    /// The fused activations equal candle's (values within 1e-12 in f64 and
    /// 1e-6 in f32, gradients within 1e-6) and pass finite-difference
    /// checks on a non-contiguous input.
    #[test]
    fn fused_activations_equal_candles() {
        let xt = Var::from_tensor(&(noise(&[2, 7, 3], 8).unwrap() * 4.0).unwrap()).unwrap();
        let x = || xt.as_tensor().transpose(1, 2).unwrap();
        for a in [Act::Gelu, Act::Silu, Act::Elu(1.0), Act::Elu(0.7)] {
            let reference = |x: &Tensor| match a {
                Act::Gelu => x.gelu_erf().unwrap(),
                Act::Silu => x.silu().unwrap(),
                Act::Elu(alpha) => x.elu(alpha).unwrap(),
            };
            let grad_of = |y: Tensor| {
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                g.get(xt.as_tensor()).unwrap().clone()
            };
            let (y, r) = (activation(&x(), a).unwrap(), reference(&x()));
            assert!(max_abs_diff(&y, &r).unwrap() < 1e-12, "{a:?}");
            // (candle's f64 GELU gradient carries its erf's ~4e-7 error;
            // the finite differences below are the reference.)
            let d = max_abs_diff(&grad_of(y), &grad_of(r)).unwrap();
            assert!(d < 1e-6, "{a:?}: {d}");
            let x32 = x().to_dtype(DType::F32).unwrap();
            let d = max_abs_diff(&activation(&x32, a).unwrap(), &reference(&x32)).unwrap();
            assert!(d < 1e-6, "{a:?} f32: {d}");
            let vars = vec![("x".to_string(), xt.clone())];
            check_gradients(&vars, GradCheck::default(), || activation(&x(), a)).unwrap();
        }
        // Longer than one parallel chunk, not a multiple of it.
        let long = (noise(&[3 * ELEMWISE_CHUNK + 5], 9).unwrap() * 4.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        for a in [Act::Gelu, Act::Silu, Act::Elu(1.0)] {
            let r = match a {
                Act::Gelu => long.gelu_erf().unwrap(),
                Act::Silu => long.silu().unwrap(),
                Act::Elu(alpha) => long.elu(alpha).unwrap(),
            };
            assert!(max_abs_diff(&activation(&long, a).unwrap(), &r).unwrap() < 1e-5);
        }
        // exp_f32 against std's exp, relative, over its range [-87, 88].
        let worst = (-869..=879)
            .map(|i| {
                let v = i as f32 / 10.0 + 0.037;
                ((exp_f32(v) as f64 - (v as f64).exp()) / (v as f64).exp()).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 4e-7, "exp {worst}");
        // expm1_f32 against the exact expm1 over [-20, 5], relative.
        let worst = (-2000..=500)
            .map(|i| {
                let v = i as f64 / 100.0 + 0.0037;
                ((expm1_f32(v as f32) as f64 - libm::expm1(v)) / libm::expm1(v)).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 4e-7, "expm1 {worst}");
        // erf_f32 against the exact erf over [-6, 6].
        let worst = (-600..=600)
            .map(|i| {
                let v = i as f64 / 100.0;
                (erf_f32(v as f32) as f64 - libm::erf(v)).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "{worst}");
    }

    /// The fused op equals the composed one (plus a broadcast bias) in
    /// value and in every gradient (f64, batch 3, 2 groups, a
    /// non-contiguous input, padding taps, with and without a
    /// pre-activation), and passes a finite-difference check of its own.
    #[test]
    fn fused_equals_composed_and_its_gradients_check() {
        // Batch 3 runs in chunks of 1 item, batch 9 in chunks of 2 with a
        // shorter last one (the weight gradient summed over partials).
        let acts = [None, Some(Act::Silu), Some(Act::Elu(0.7)), Some(Act::Gelu)];
        for (b, act) in [3, 9].into_iter().flat_map(|b| acts.map(|a| (b, a))) {
            // The composed reference reads the activation's own op.
            let pre = |x: &Tensor| match act {
                Some(a) => activation(x, a).unwrap(),
                None => x.clone(),
            };
            let (c_in, len, c_out, k, groups, outputs) = (4, 11, 6, 3, 2, 5);
            let idx = Gather::new(taps(outputs, k, len), outputs, k, len).unwrap();
            // [batch, len, c_in] transposed: a non-contiguous [batch, c_in, len].
            let xt = Var::from_tensor(&noise(&[b, len, c_in], 1).unwrap()).unwrap();
            let w = Var::from_tensor(&noise(&[c_out, c_in / groups, k], 2).unwrap()).unwrap();
            let bias = Var::from_tensor(&noise(&[c_out], 4).unwrap()).unwrap();
            let x = || xt.as_tensor().transpose(1, 2).unwrap();
            assert!(!x().is_contiguous());
            let probe = noise(&[b, c_out, outputs], 3).unwrap();
            let fused_conv = || {
                gather_conv(
                    &x(),
                    &idx,
                    w.as_tensor(),
                    Some(bias.as_tensor()),
                    groups,
                    act,
                )
            };
            let run = |fused: bool| {
                let y = if fused {
                    fused_conv().unwrap()
                } else {
                    gather_conv_composed(&pre(&x()), &idx, w.as_tensor(), groups)
                        .unwrap()
                        .broadcast_add(&bias.as_tensor().reshape((1, c_out, 1)).unwrap())
                        .unwrap()
                };
                value_and_grads(y, &probe, &[&xt, &w, &bias]).unwrap()
            };
            // The column matrices live in reused scratch: NaN left there on
            // every thread must never reach a result.
            let poison = || with_scratch::<f64, _>(1 << 12, |s| s.fill(f64::NAN));
            poison();
            rayon::broadcast(|_| poison());
            assert!(max_abs_diff_all(&run(true), &run(false)).unwrap() < 1e-12);
            let vars = vec![
                ("x".to_string(), xt.clone()),
                ("w".to_string(), w.clone()),
                ("bias".to_string(), bias.clone()),
            ];
            check_gradients(&vars, GradCheck::default(), fused_conv).unwrap();
            // f32 runs too; bad indices are refused, naming the op.
            let f32 = |v: &Var| v.as_tensor().to_dtype(DType::F32).unwrap();
            let x32 = x().to_dtype(DType::F32).unwrap();
            let y32 = gather_conv(&x32, &idx, &f32(&w), Some(&f32(&bias)), groups, act).unwrap();
            let y = fused_conv().unwrap();
            assert!(max_abs_diff(&y32.to_dtype(DType::F64).unwrap(), &y).unwrap() < 1e-5);
            let e = Gather::new(vec![99; 15], outputs, k, len).unwrap_err();
            assert!(e.to_string().contains("gather_conv"), "{e}");
            let short = x().narrow(2, 0, len - 1).unwrap();
            let e = gather_conv(&short, &idx, w.as_tensor(), None, groups, act).unwrap_err();
            assert!(e.to_string().contains("gather_conv"), "{e}");
            assert!(!fused(&x().to_dtype(DType::BF16).unwrap()));
            // A 1x1 conv (the input its own column matrix) agrees too.
            let one = Var::from_tensor(&noise(&[c_out, c_in / groups, 1], 5).unwrap()).unwrap();
            let ident = Gather::new((0..len as u32).collect(), len, 1, len).unwrap();
            let pair = |fused: bool| {
                let y = if fused {
                    gather_conv(&x(), &ident, one.as_tensor(), None, groups, act).unwrap()
                } else {
                    gather_conv_composed(&pre(&x()), &ident, one.as_tensor(), groups).unwrap()
                };
                let p = noise(&[b, c_out, len], 6).unwrap();
                let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
                let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                vec![y, grad(&xt), grad(&one)]
            };
            for (a, b) in pair(true).iter().zip(&pair(false)) {
                assert!(max_abs_diff(a, b).unwrap() < 1e-12);
            }
        }
    }
}
