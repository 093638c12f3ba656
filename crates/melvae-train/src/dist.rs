//! Data-parallel training across processes: a [`Communicator`] (rank, world
//! size, all-reduce, broadcast, barrier) with backends on existing engines.
//!
//! - [`SingleProcess`]: one rank, every call a no-op (the default).
//! - [`LocalComm`]: ranks as threads of one process, for tests and for
//!   checking a data-parallel set-up without a launcher.
//! - `Mpi` (feature `mpi`): Open MPI or MPICH through the `mpi` crate,
//!   across machines; `mpirun -n N` launches the ranks.
//! - `Nccl` (feature `nccl`): CUDA tensors reduced on the GPUs,
//!   bootstrapped over MPI or a shared id file.
//!
//! Collectives move 1-D `f32` tensors; [`all_reduce`] and [`broadcast`]
//! pack a list of tensors of any shapes and float dtypes into flat buckets
//! of about [`DEFAULT_BUCKET_BYTES`] (one call per bucket, not per tensor)
//! and unpack the result into the original shapes and dtypes.
//!
//! Every rank must call the same collectives in the same order. A rank that
//! fails calls [`Communicator::abort`], which stops every rank (MPI: the
//! whole job; [`LocalComm`]: every pending and later call fails with the
//! failing rank's message).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use melvae_train::dist::{all_reduce, Communicator, LocalComm, ReduceOp, DEFAULT_BUCKET_BYTES};
//!
//! let handles: Vec<_> = LocalComm::group(2)
//!     .into_iter()
//!     .map(|comm| {
//!         std::thread::spawn(move || {
//!             let x = Tensor::new(&[comm.rank() as f32 + 1.0, 10.0], &Device::Cpu).unwrap();
//!             let m = all_reduce(&comm, &[x], ReduceOp::Mean, DEFAULT_BUCKET_BYTES).unwrap();
//!             m[0].to_vec1::<f32>().unwrap()
//!         })
//!     })
//!     .collect();
//! for h in handles {
//!     assert_eq!(h.join().unwrap(), vec![1.5, 10.0]);
//! }
//! ```

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Bytes of `f32` per all-reduce call in [`all_reduce`] (4 MiB): large
/// enough that a call's latency is small against its transfer, small enough
/// that a bucket never needs a buffer the size of the model.
pub const DEFAULT_BUCKET_BYTES: usize = 4 << 20;

/// Processes training one model together: this process is rank
/// [`Communicator::rank`] of [`Communicator::world_size`].
///
/// The primitives move 1-D `f32` tensors on the backend's device (CPU for
/// MPI); use [`all_reduce`] and [`broadcast`] for lists of tensors.
pub trait Communicator {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// The backend's name (`single`, `local`, `mpi`, `nccl`), for
    /// messages.
    fn backend(&self) -> &'static str;
    /// The element-wise sum over all ranks of `flat` (1-D `f32`, the same
    /// length on every rank); every rank receives the same sum.
    fn all_reduce_sum_flat(&self, flat: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `flat` (1-D `f32`; the same length on every rank).
    fn broadcast_flat(&self, flat: &Tensor, root: usize) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Stops every rank because this one failed with `reason`. MPI aborts
    /// the job here and does not return; [`LocalComm`] makes every other
    /// rank's pending and later calls fail with `reason`.
    fn abort(&self, reason: &str);
}

/// How [`all_reduce`] combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean (the sum divided by the world size).
    Mean,
}

/// One rank alone: every collective returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum_flat(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.clone())
    }
    fn broadcast_flat(&self, flat: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(flat.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _reason: &str) {}
}

/// Reduces `tensors` (any shapes, float dtypes, one device) over all ranks,
/// packed into flat `f32` buckets of at most `bucket_bytes` (a tensor larger
/// than that travels alone). Returns the results in the input's order,
/// shapes and dtypes. With one rank, returns the input.
pub fn all_reduce(
    comm: &dyn Communicator,
    tensors: &[Tensor],
    op: ReduceOp,
    bucket_bytes: usize,
) -> Result<Vec<Tensor>> {
    if comm.world_size() == 1 {
        return Ok(tensors.to_vec());
    }
    let world = comm.world_size() as f64;
    bucketed(tensors, bucket_bytes, |flat| {
        let sum = comm.all_reduce_sum_flat(flat)?;
        Ok(match op {
            ReduceOp::Sum => sum,
            ReduceOp::Mean => (sum / world)?,
        })
    })
}

/// Rank `root`'s values of `tensors` on every rank (every rank passes
/// tensors of the same shapes), in buckets as [`all_reduce`].
pub fn broadcast(
    comm: &dyn Communicator,
    tensors: &[Tensor],
    root: usize,
    bucket_bytes: usize,
) -> Result<Vec<Tensor>> {
    if comm.world_size() == 1 {
        return Ok(tensors.to_vec());
    }
    bucketed(tensors, bucket_bytes, |flat| {
        comm.broadcast_flat(flat, root)
    })
}

/// Packs consecutive tensors into flat `f32` buckets, applies `f` to each
/// and unpacks its result.
fn bucketed(
    tensors: &[Tensor],
    bucket_bytes: usize,
    mut f: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let cap = (bucket_bytes / 4).max(1);
    let mut out = Vec::with_capacity(tensors.len());
    let mut i = 0;
    while i < tensors.len() {
        let mut j = i;
        let mut n = 0;
        while j < tensors.len() && (j == i || n + tensors[j].elem_count() <= cap) {
            n += tensors[j].elem_count();
            j += 1;
        }
        let group = &tensors[i..j];
        if n == 0 {
            out.extend(group.iter().cloned());
        } else {
            let parts = group
                .iter()
                .map(|t| t.to_dtype(DType::F32)?.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let flat = f(&Tensor::cat(&parts, 0)?)?;
            let mut off = 0;
            for t in group {
                let k = t.elem_count();
                out.push(
                    flat.narrow(0, off, k)?
                        .reshape(t.shape())?
                        .to_dtype(t.dtype())?,
                );
                off += k;
            }
        }
        i = j;
    }
    Ok(out)
}

/// One rank of an in-process group: ranks as threads of one process, for
/// tests and for checking a data-parallel set-up without a launcher. Sums
/// are taken in rank order, so every rank gets bit-identical results.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    n: usize,
    state: Mutex<Round>,
    cv: Condvar,
}

/// One all-gather round: every rank deposits a buffer; once all have, each
/// takes the full set; the next round starts when all have taken it.
struct Round {
    bufs: Vec<Option<Vec<f32>>>,
    arrived: usize,
    result: Option<Arc<Vec<Vec<f32>>>>,
    taken: usize,
    aborted: Option<String>,
}

impl LocalComm {
    /// The `n` ranks (`n >= 1`) of a new group, each to be moved into its
    /// own thread.
    pub fn group(n: usize) -> Vec<LocalComm> {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            n,
            state: Mutex::new(Round {
                bufs: vec![None; n],
                arrived: 0,
                result: None,
                taken: 0,
                aborted: None,
            }),
            cv: Condvar::new(),
        });
        (0..n)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Round>> {
        self.shared
            .state
            .lock()
            .map_err(|_| Error::invalid("local group", "a rank panicked"))
    }

    fn wait<'a>(&'a self, g: MutexGuard<'a, Round>) -> Result<MutexGuard<'a, Round>> {
        let g = self
            .shared
            .cv
            .wait(g)
            .map_err(|_| Error::invalid("local group", "a rank panicked"))?;
        match &g.aborted {
            Some(why) => Err(Error::invalid(
                format!("local group (rank {})", self.rank),
                why.clone(),
            )),
            None => Ok(g),
        }
    }

    /// Every rank's `data`, in rank order.
    fn all_gather(&self, data: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>> {
        let mut g = self.lock()?;
        if let Some(why) = &g.aborted {
            return Err(Error::invalid(
                format!("local group (rank {})", self.rank),
                why.clone(),
            ));
        }
        // The previous round is still being collected.
        while g.result.is_some() {
            g = self.wait(g)?;
        }
        g.bufs[self.rank] = Some(data);
        g.arrived += 1;
        if g.arrived == self.shared.n {
            let all: Vec<Vec<f32>> = g
                .bufs
                .iter_mut()
                .map(|b| b.take().unwrap_or_default())
                .collect();
            g.result = Some(Arc::new(all));
            g.arrived = 0;
            self.shared.cv.notify_all();
        } else {
            // A later round's result cannot appear before this rank has
            // taken this one's.
            while g.result.is_none() {
                g = self.wait(g)?;
            }
        }
        let result = g.result.clone().unwrap_or_default();
        g.taken += 1;
        if g.taken == self.shared.n {
            g.taken = 0;
            g.result = None;
            self.shared.cv.notify_all();
        }
        Ok(result)
    }
}

fn flat_vec(flat: &Tensor) -> Result<Vec<f32>> {
    Ok(flat.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.n
    }
    fn backend(&self) -> &'static str {
        "local"
    }
    fn all_reduce_sum_flat(&self, flat: &Tensor) -> Result<Tensor> {
        let all = self.all_gather(flat_vec(flat)?)?;
        let mut sum = vec![0f32; flat.elem_count()];
        for (r, buf) in all.iter().enumerate() {
            if buf.len() != sum.len() {
                return Err(Error::invalid(
                    "all-reduce",
                    format!(
                        "rank {r} sent {} values, rank {} {}",
                        buf.len(),
                        self.rank,
                        sum.len()
                    ),
                ));
            }
            for (s, x) in sum.iter_mut().zip(buf) {
                *s += x;
            }
        }
        Ok(Tensor::from_vec(sum, flat.elem_count(), flat.device())?)
    }
    fn broadcast_flat(&self, flat: &Tensor, root: usize) -> Result<Tensor> {
        let all = self.all_gather(flat_vec(flat)?)?;
        let got = all.get(root).ok_or_else(|| {
            Error::invalid(
                "broadcast",
                format!("root {root} is not a rank of {}", self.shared.n),
            )
        })?;
        if got.len() != flat.elem_count() {
            return Err(Error::invalid(
                "broadcast",
                format!(
                    "rank {root} sent {} values, rank {} expected {}",
                    got.len(),
                    self.rank,
                    flat.elem_count()
                ),
            ));
        }
        Ok(Tensor::from_vec(got.clone(), got.len(), flat.device())?)
    }
    fn barrier(&self) -> Result<()> {
        self.all_gather(Vec::new()).map(|_| ())
    }
    fn abort(&self, reason: &str) {
        if let Ok(mut g) = self.shared.state.lock() {
            g.aborted
                .get_or_insert_with(|| format!("rank {} failed: {reason}", self.rank));
        }
        self.shared.cv.notify_all();
    }
}

#[cfg(feature = "mpi")]
pub use self::mpi_backend::Mpi;

#[cfg(feature = "mpi")]
mod mpi_backend {
    use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
    use ::mpi::environment::Universe;
    use ::mpi::topology::{Communicator as _, SimpleCommunicator};
    use ::mpi::Threading;
    use candle_core::Tensor;

    use super::{flat_vec, Communicator};
    use crate::{Error, Result};

    /// The MPI world (feature `mpi`), any number of machines. Tensors travel
    /// through host memory (a GPU tensor is copied there and back; the
    /// `nccl` backend keeps them on the device). Created once per process by
    /// [`Mpi::init`]; dropping it finalises MPI.
    pub struct Mpi {
        world: SimpleCommunicator,
        _universe: Universe,
    }

    impl Mpi {
        /// Rank `root`'s bytes in `buf` on every rank (the same length
        /// everywhere).
        pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) {
            self.world.process_at_rank(root as i32).broadcast_into(buf);
        }

        /// Initialises MPI (only the calling thread makes MPI calls).
        pub fn init() -> Result<Self> {
            let (universe, _) = ::mpi::initialize_with_threading(Threading::Funneled)
                .ok_or_else(|| Error::invalid("MPI", "already initialised in this process"))?;
            let world = universe.world();
            Ok(Self {
                world,
                _universe: universe,
            })
        }
    }

    impl Communicator for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn world_size(&self) -> usize {
            self.world.size() as usize
        }
        fn backend(&self) -> &'static str {
            "mpi"
        }
        fn all_reduce_sum_flat(&self, flat: &Tensor) -> Result<Tensor> {
            let send = flat_vec(flat)?;
            let mut recv = vec![0f32; send.len()];
            self.world
                .all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
            Ok(Tensor::from_vec(recv, send.len(), flat.device())?)
        }
        fn broadcast_flat(&self, flat: &Tensor, root: usize) -> Result<Tensor> {
            let mut buf = flat_vec(flat)?;
            self.world
                .process_at_rank(root as i32)
                .broadcast_into(&mut buf[..]);
            let n = buf.len();
            Ok(Tensor::from_vec(buf, n, flat.device())?)
        }
        fn barrier(&self) -> Result<()> {
            self.world.barrier();
            Ok(())
        }
        fn abort(&self, reason: &str) {
            eprintln!(
                "rank {} of {}: {reason}; stopping every rank",
                self.rank(),
                self.world_size()
            );
            self.world.abort(1)
        }
    }
}

#[cfg(feature = "nccl")]
pub use self::nccl_backend::Nccl;

#[cfg(feature = "nccl")]
mod nccl_backend {
    use std::path::Path;

    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::{
        backend::BackendStorage, CpuStorage, CustomOp1, Device, Layout, Shape, Tensor,
    };

    use super::Communicator;
    use crate::{Error, Result};

    /// NCCL over CUDA tensors (feature `nccl`): one rank per GPU, tensors
    /// reduced on the device. Bootstrapped over MPI ([`Nccl::over_mpi`],
    /// features `mpi` and `nccl`) or through a unique-id file on a shared
    /// file system ([`Nccl::from_id_file`]).
    pub struct Nccl {
        comm: Comm,
        device: CudaDevice,
        // Keeps MPI initialised (barriers, abort) when it bootstrapped NCCL.
        #[cfg(feature = "mpi")]
        mpi: Option<super::Mpi>,
    }

    fn cuda(device: &Device, what: &str) -> Result<CudaDevice> {
        match device {
            Device::Cuda(d) => Ok(d.clone()),
            d => Err(Error::invalid(
                what,
                format!("the nccl backend needs a CUDA device, not {d:?}"),
            )),
        }
    }

    fn nccl_err(e: impl std::fmt::Debug) -> Error {
        Error::invalid("NCCL", format!("{e:?}"))
    }

    impl Nccl {
        /// Rank `rank` of `world` on `device`: rank 0 writes a new unique id
        /// to `id_file` (atomically), the others wait up to `timeout` for it.
        /// Every rank must pass the same file; delete it before a new run.
        pub fn from_id_file(
            id_file: &Path,
            rank: usize,
            world: usize,
            device: &Device,
            timeout: std::time::Duration,
        ) -> Result<Self> {
            let dev = cuda(device, "NCCL")?;
            let id = if rank == 0 {
                let id = Id::new().map_err(nccl_err)?;
                let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
                let tmp = id_file.with_extension("tmp");
                std::fs::write(&tmp, &bytes).map_err(|e| Error::file(&tmp, e))?;
                std::fs::rename(&tmp, id_file).map_err(|e| Error::file(id_file, e))?;
                id
            } else {
                let start = std::time::Instant::now();
                loop {
                    match std::fs::read(id_file) {
                        Ok(b) if b.len() == 128 => break id_from_bytes(&b),
                        _ if start.elapsed() > timeout => {
                            return Err(Error::file(
                                id_file,
                                format!("rank {rank}: no NCCL id from rank 0 after {timeout:?}"),
                            ))
                        }
                        _ => std::thread::sleep(std::time::Duration::from_millis(50)),
                    }
                }
            };
            let comm = Comm::from_rank(dev.cuda_stream(), rank, world, id).map_err(nccl_err)?;
            Ok(Self {
                comm,
                device: dev,
                #[cfg(feature = "mpi")]
                mpi: None,
            })
        }

        /// The ranks of `mpi` on their CUDA `device`s, rank 0's unique id
        /// broadcast over MPI.
        #[cfg(feature = "mpi")]
        pub fn over_mpi(mpi: super::Mpi, device: &Device) -> Result<Self> {
            let dev = cuda(device, "NCCL")?;
            let mut bytes = vec![0u8; 128];
            // A failure here stops every rank (MPI_Abort): the others
            // would wait in the broadcast or in NCCL's initialisation.
            if mpi.rank() == 0 {
                match Id::new() {
                    Ok(id) => bytes = id.internal().iter().map(|&c| c as u8).collect(),
                    Err(e) => {
                        mpi.abort(&format!("NCCL unique id: {e:?}"));
                        return Err(nccl_err(e));
                    }
                }
            }
            mpi.broadcast_bytes(&mut bytes, 0);
            let comm = match Comm::from_rank(
                dev.cuda_stream(),
                mpi.rank(),
                mpi.world_size(),
                id_from_bytes(&bytes),
            ) {
                Ok(c) => c,
                Err(e) => {
                    mpi.abort(&format!("NCCL initialisation: {e:?}"));
                    return Err(nccl_err(e));
                }
            };
            Ok(Self {
                comm,
                device: dev,
                mpi: Some(mpi),
            })
        }

        fn collective(&self, flat: &Tensor, op: Collective) -> Result<Tensor> {
            // A CUDA tensor stays where it is (its GPU is this rank's; a
            // second candle device for the same GPU would force a copy).
            let flat = match flat.device() {
                Device::Cuda(_) => flat.contiguous()?,
                _ => flat
                    .to_device(&Device::Cuda(self.device.clone()))?
                    .contiguous()?,
            };
            Ok(flat.apply_op1_no_bwd(&NcclOp {
                comm: &self.comm,
                op,
            })?)
        }
    }

    fn id_from_bytes(b: &[u8]) -> Id {
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, &s) in internal.iter_mut().zip(b) {
            *d = s as std::ffi::c_char;
        }
        Id::uninit(internal)
    }

    #[derive(Clone, Copy)]
    enum Collective {
        Sum,
        Broadcast(usize),
    }

    struct NcclOp<'a> {
        comm: &'a Comm,
        op: Collective,
    }

    // SAFETY: candle requires custom ops to be Send + Sync; the op lives for
    // one call on the thread that owns the communicator.
    unsafe impl Send for NcclOp<'_> {}
    unsafe impl Sync for NcclOp<'_> {}

    impl CustomOp1 for NcclOp<'_> {
        fn name(&self) -> &'static str {
            "nccl"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the nccl backend moves CUDA tensors")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let n = l.shape().elem_count();
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("nccl: the tensor is not contiguous")
            };
            let dev = s.device().clone();
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let mut dst = dev.alloc_zeros::<f32>(n)?;
            match self.op {
                Collective::Sum => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
                Collective::Broadcast(root) => {
                    self.comm.broadcast(Some(&src), &mut dst, root as i32)
                }
            }
            .map_err(|e| candle_core::Error::Msg(format!("nccl: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    impl Communicator for Nccl {
        fn rank(&self) -> usize {
            self.comm.rank()
        }
        fn world_size(&self) -> usize {
            self.comm.world_size()
        }
        fn backend(&self) -> &'static str {
            "nccl"
        }
        fn all_reduce_sum_flat(&self, flat: &Tensor) -> Result<Tensor> {
            self.collective(flat, Collective::Sum)
        }
        fn broadcast_flat(&self, flat: &Tensor, root: usize) -> Result<Tensor> {
            self.collective(flat, Collective::Broadcast(root))
        }
        fn barrier(&self) -> Result<()> {
            // An all-reduce of one value, then wait for the stream.
            let t = Tensor::zeros(
                1,
                candle_core::DType::F32,
                &Device::Cuda(self.device.clone()),
            )?;
            self.all_reduce_sum_flat(&t)?.to_vec1::<f32>()?;
            Ok(())
        }
        fn abort(&self, reason: &str) {
            #[cfg(feature = "mpi")]
            if let Some(m) = &self.mpi {
                return m.abort(reason);
            }
            eprintln!(
                "rank {} of {}: {reason}; stopping",
                self.rank(),
                self.world_size()
            );
            std::process::exit(1);
        }
    }
}

/// The world size an MPI launcher (`mpirun`, `mpiexec`, `srun` with PMI)
/// gave this process, from the environment variables Open MPI, MPICH and
/// Slurm set for every rank; `None` when none started it.
pub fn launched_by_mpi() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
}

/// This process's rank among the ranks on its machine, from the variables
/// Open MPI, MPICH, Slurm and torchrun-style launchers set
/// (`OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID`, `SLURM_LOCALID`,
/// `LOCAL_RANK`); `None` outside a launcher.
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
}

/// The communicator this process should train with on `device`:
/// - one process alone: [`SingleProcess`];
/// - under an MPI launcher: MPI, or with the `nccl` feature and a CUDA
///   `device`, NCCL bootstrapped over MPI;
/// - under a launcher in a build without the `mpi` feature: an error naming
///   the cure, rather than N unconnected copies of one run.
pub fn from_env(device: &candle_core::Device) -> Result<Box<dyn Communicator>> {
    let _ = device;
    match launched_by_mpi() {
        None => match std::env::var("WORLD_SIZE").ok().and_then(|w| w.parse::<usize>().ok()) {
            // torchrun and similar launchers start N unconnected copies.
            Some(n) if n > 1 => Err(Error::invalid(
                "launch",
                format!(
                    "WORLD_SIZE={n} but no MPI launcher started this process: melvae's ranks \
                     connect through MPI (mpirun -n {n} with --features mpi), or run \
                     training.local_ranks={n} in one process"
                ),
            )),
            _ => Ok(Box::new(SingleProcess)),
        },
        #[cfg(all(feature = "mpi", feature = "nccl"))]
        Some(_) if device.is_cuda() => {
            let mpi = Mpi::init()?;
            Ok(Box::new(Nccl::over_mpi(mpi, device)?))
        }
        #[cfg(feature = "mpi")]
        Some(_) => Ok(Box::new(Mpi::init()?)),
        #[cfg(not(feature = "mpi"))]
        Some(1) => Ok(Box::new(SingleProcess)),
        #[cfg(not(feature = "mpi"))]
        Some(n) => Err(Error::invalid(
            "launch",
            format!(
                "started by an MPI launcher with {n} ranks, but this build has no MPI backend: \
                 build with `--features mpi` (needs Open MPI or MPICH: apt-get install libopenmpi-dev)"
            ),
        )),
    }
}

/// The element-wise sums over the ranks of `values`, for small vectors
/// (flags, logged losses, statistics of a task's losses) sent as one 1-D
/// tensor on `device` (the backend's: CUDA for NCCL); one process returns
/// `values` untouched.
pub fn sum_values(comm: &dyn Communicator, values: Vec<f32>, device: &Device) -> Result<Vec<f32>> {
    if comm.world_size() == 1 {
        return Ok(values);
    }
    let n = values.len();
    let t = Tensor::from_vec(values, n, device)?;
    Ok(comm.all_reduce_sum_flat(&t)?.to_vec1::<f32>()?)
}

/// `comm` as the layers and losses that share batch statistics see it
/// ([`melvae_layers::Ranks`]): its rank, world size and [`sum_values`] on
/// `device` (values travel as `f32`).
pub fn ranks<'a>(
    comm: &'a dyn Communicator,
    device: &'a Device,
) -> Result<melvae_layers::Ranks<'a>> {
    let sum = move |values: &[f64]| -> melvae_layers::Result<Vec<f64>> {
        let v = values.iter().map(|&x| x as f32).collect();
        let total = sum_values(comm, v, device).map_err(|e| melvae_layers::Error::Invalid {
            what: format!("sum over {} ranks", comm.world_size()),
            reason: e.to_string(),
        })?;
        Ok(total.into_iter().map(f64::from).collect())
    };
    Ok(melvae_layers::Ranks::new(
        comm.rank(),
        comm.world_size(),
        sum,
    )?)
}

/// A rank's part of every global batch: rows `index * rows .. (index + 1) *
/// rows` of a batch of `count * rows`, the rows every rank draws in the same
/// seeded order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub index: usize,
    /// Ranks sharing each batch.
    pub count: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// The shard of `comm`'s rank.
    pub fn of(comm: &dyn Communicator) -> Self {
        Self {
            index: comm.rank(),
            count: comm.world_size(),
        }
    }

    /// The rows `start..start + len` of a global batch of `batch` rows that
    /// this rank builds; an error naming `key` when `batch` does not split
    /// evenly (the losses are per-row means, so equal shards make the mean
    /// of the ranks' losses the global batch's loss).
    pub fn rows(&self, batch: usize, key: &str) -> Result<std::ops::Range<usize>> {
        if batch % self.count != 0 {
            return Err(Error::invalid(
                key,
                format!(
                    "{batch} does not split evenly over {} ranks; make the global batch a multiple of the number of ranks",
                    self.count
                ),
            ));
        }
        let len = batch / self.count;
        Ok(self.index * len..(self.index + 1) * len)
    }

    /// `self`, checked against a global batch of `batch` rows (the error of
    /// [`Shard::rows`], naming `data.batch_size`): what a task's
    /// `set_shard` keeps.
    pub fn for_batch(self, batch: usize) -> Result<Self> {
        self.rows(batch, "data.batch_size")?;
        Ok(self)
    }

    /// This rank's stream of a seed every rank draws alike (dropout masks):
    /// `seed` itself on rank 0, so one rank reproduces a single-process run,
    /// and a distinct mix of `seed` and the rank elsewhere.
    pub fn seed(&self, seed: u64) -> u64 {
        if self.index == 0 {
            seed
        } else {
            melvae_dsp::SplitMix64::new(
                seed ^ (self.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )
            .next_u64()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f(comm)` on every rank of a group of `n` threads.
    fn on_ranks<R: Send>(n: usize, f: impl Fn(&LocalComm) -> R + Sync) -> Vec<R> {
        let comms = LocalComm::group(n);
        std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    let f = &f;
                    s.spawn(move || f(c))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn buckets_keep_shapes_dtypes_and_order() {
        let out = on_ranks(3, |c| {
            let r = c.rank() as f32;
            let ts = vec![
                Tensor::new(&[[r, 1.0], [2.0, 3.0]], &Device::Cpu).unwrap(),
                Tensor::new(&[r as f64; 5], &Device::Cpu).unwrap(),
                Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap(),
                Tensor::new(&[10.0 * r], &Device::Cpu).unwrap(),
            ];
            // 16 bytes: the 4- and 5-element tensors travel alone.
            let sum = all_reduce(c, &ts, ReduceOp::Sum, 16).unwrap();
            let mean = all_reduce(c, &ts, ReduceOp::Mean, DEFAULT_BUCKET_BYTES).unwrap();
            let root = broadcast(c, &ts, 2, 8).unwrap();
            (sum, mean, root)
        });
        for (sum, mean, root) in out {
            assert_eq!(sum[0].dims(), &[2, 2]);
            assert_eq!(sum[0].to_vec2::<f32>().unwrap(), [[3.0, 3.0], [6.0, 9.0]]);
            assert_eq!(sum[1].dtype(), DType::F64);
            assert_eq!(sum[1].to_vec1::<f64>().unwrap(), [3.0; 5]);
            assert_eq!(sum[2].elem_count(), 0);
            assert_eq!(sum[3].to_vec1::<f32>().unwrap(), [30.0]);
            assert_eq!(mean[0].to_vec2::<f32>().unwrap(), [[1.0, 1.0], [2.0, 3.0]]);
            assert_eq!(mean[3].to_vec1::<f32>().unwrap(), [10.0]);
            assert_eq!(root[0].to_vec2::<f32>().unwrap(), [[2.0, 1.0], [2.0, 3.0]]);
            assert_eq!(root[1].to_vec1::<f64>().unwrap(), [2.0; 5]);
        }
    }

    #[test]
    fn an_aborting_rank_releases_the_others_with_its_reason() {
        let out = on_ranks(3, |c| {
            if c.rank() == 1 {
                c.abort("out of memory");
                return String::new();
            }
            let t = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
            c.all_reduce_sum_flat(&t).unwrap_err().to_string()
        });
        assert!(out[0].contains("rank 1 failed: out of memory"), "{out:?}");
        assert!(out[2].contains("rank 1 failed: out of memory"), "{out:?}");
    }

    #[test]
    fn mismatched_lengths_are_named() {
        let out = on_ranks(2, |c| {
            let t = Tensor::ones(2 + c.rank(), DType::F32, &Device::Cpu).unwrap();
            c.all_reduce_sum_flat(&t).unwrap_err().to_string()
        });
        assert!(out[0].contains("rank 1 sent 3 values"), "{out:?}");
    }

    #[test]
    fn shards_split_evenly_and_seed_per_rank() {
        let s = Shard { index: 1, count: 4 };
        assert_eq!(s.rows(8, "data.batch_size").unwrap(), 2..4);
        let e = s.rows(6, "data.batch_size").unwrap_err().to_string();
        assert!(
            e.contains("data.batch_size") && e.contains("4 ranks"),
            "{e}"
        );
        assert_eq!(Shard::WHOLE.seed(7), 7);
        assert_ne!(s.seed(7), 7);
        assert_ne!(s.seed(7), Shard { index: 2, count: 4 }.seed(7));
        assert_eq!(SingleProcess.world_size(), 1);
    }
}
