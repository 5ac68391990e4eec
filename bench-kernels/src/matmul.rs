//! The proving work: `r` chained matmuls on a burn backend picked at run time.

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};

use crate::challenge::{self, Challenge, ChallengeError, bound_for};
use crate::proof::MerkleTree;

/// Where the matmul runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// burn's Flex CPU backend (AVX-512 kernels when the CPU has them).
    Cpu,
    /// burn's wgpu backend (Vulkan, Metal, DX12); needs the `wgpu` feature.
    Wgpu,
    /// burn's CUDA backend; needs the `cuda` feature.
    Cuda,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" | "flex" => Ok(Backend::Cpu),
            "wgpu" | "vulkan" | "gpu" => Ok(Backend::Wgpu),
            "cuda" => Ok(Backend::Cuda),
            other => Err(format!("unknown backend {other:?} (cpu, wgpu or cuda)")),
        }
    }
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }

    /// The burn device, or why this build can't run it.
    pub fn device(self) -> Result<Device, ProveError> {
        match self {
            Backend::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Ok(Device::cuda(0)),
            #[allow(unreachable_patterns)]
            other => Err(ProveError::NotBuilt(other.name())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error(transparent)]
    Challenge(#[from] ChallengeError),
    #[error("this build has no {0} backend (rebuild with `--features {0}`)")]
    NotBuilt(&'static str),
    #[error("the backend failed: {0}")]
    Backend(String),
    #[error("stopped after {0} s")]
    Timeout(u64),
}

/// The result of proving.
pub struct Proof {
    pub n: usize,
    /// The last product, row-major (kept to open rows).
    pub c: Vec<f32>,
    pub tree: MerkleTree,
    /// Wall time of expansion, all rounds and hashing.
    pub seconds: f64,
    /// Wall time of the matmul rounds alone.
    pub matmul_seconds: f64,
}

impl Proof {
    pub fn root_hex(&self) -> String {
        hex::encode(self.tree.root())
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.c[i * self.n..(i + 1) * self.n]
    }

    /// Opens the asked rows for the verifier: Merkle paths only, since the
    /// verifier recomputes the values from the seed.
    pub fn openings(&self, rows: &[usize]) -> Vec<crate::verify::Opening> {
        rows.iter()
            .filter(|&&i| i < self.n)
            .map(|&i| crate::verify::Opening {
                row: i,
                values: None,
                path: self.tree.open(i),
            })
            .collect()
    }

    /// Openings with the rows' values as well (optional on the wire; the
    /// refusal then names the first wrong column).
    pub fn openings_with_values(&self, rows: &[usize]) -> Vec<crate::verify::Opening> {
        let mut out = self.openings(rows);
        for o in &mut out {
            o.values = Some(self.row(o.row).to_vec());
        }
        out
    }
}

/// How a round's product is mapped back into `[-bound, bound]` before the
/// next multiplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// On the host, all cores at once, with integer arithmetic that gives
    /// exactly [`challenge::reduce`]'s values (the verifier's function):
    /// the CPU backend's way. Four passes of `fmodf` cost a quarter of a
    /// 4-round proof.
    Host,
    /// As four tensor operations on the device (GPU backends, where they
    /// run in parallel next to the data).
    Device,
}

impl Backend {
    /// The fold this backend proves with.
    pub fn fold(self) -> Fold {
        match self {
            Backend::Cpu => Fold::Host,
            Backend::Wgpu | Backend::Cuda => Fold::Device,
        }
    }
}

/// Runs the challenge on `backend`. `progress(done_rounds, total)` is called
/// after each round; `deadline` stops the work between rounds.
pub fn prove(
    ch: &Challenge,
    backend: Backend,
    deadline: Option<Instant>,
    progress: impl FnMut(u32, u32),
) -> Result<Proof, ProveError> {
    prove_with(ch, backend, backend.fold(), deadline, progress)
}

/// Maps every entry back into `[-bound, bound]` with the verifier's own
/// [`challenge::reduce`], in parallel over rows.
fn fold_on_host(c: Tensor<2>, n: usize, bound: i32) -> Result<Tensor<2>, ProveError> {
    use rayon::prelude::*;
    let device = c.device();
    let mut v: Vec<f32> = c
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| ProveError::Backend(format!("{e:?}")))?;
    v.par_chunks_mut(n.max(1) * 16).for_each(|rows| {
        for x in rows {
            *x = challenge::reduce_exact(*x, bound);
        }
    });
    Ok(Tensor::<2>::from_data(TensorData::new(v, [n, n]), &device))
}

/// [`prove`] with the fold chosen (the tests compare both on one backend:
/// the same values, so the same root).
pub fn prove_with(
    ch: &Challenge,
    backend: Backend,
    fold: Fold,
    deadline: Option<Instant>,
    mut progress: impl FnMut(u32, u32),
) -> Result<Proof, ProveError> {
    let seed = ch.validate()?;
    let device = backend.device()?;
    let n = ch.n;
    let start = Instant::now();
    let a = challenge::matrix_a(&seed, n);
    let b = challenge::matrix_b(&seed, n);
    let bound = bound_for(n);
    let m = (2 * bound + 1) as f32;
    let a = Tensor::<2>::from_data(TensorData::new(a, [n, n]), &device);
    let b = Tensor::<2>::from_data(TensorData::new(b, [n, n]), &device);
    let t0 = Instant::now();
    let mut c = a.matmul(b.clone());
    progress(1, ch.rounds);
    for round in 1..ch.rounds {
        if deadline.is_some_and(|d| Instant::now() > d) {
            return Err(ProveError::Timeout(start.elapsed().as_secs()));
        }
        // Back into [-bound, bound], exactly, then multiply by B again.
        let reduced = match fold {
            Fold::Host => fold_on_host(c, n, bound)?,
            Fold::Device => c
                .remainder_scalar(m)
                .add_scalar(m)
                .remainder_scalar(m)
                .sub_scalar(bound as f32),
        };
        c = reduced.matmul(b.clone());
        progress(round + 1, ch.rounds);
    }
    let data = c.into_data();
    let matmul_seconds = t0.elapsed().as_secs_f64();
    let c: Vec<f32> = data
        .try_into_vec::<f32>()
        .map_err(|e| ProveError::Backend(format!("{e:?}")))?;
    if c.len() != n * n {
        return Err(ProveError::Backend(format!(
            "got {} values, expected {}",
            c.len(),
            n * n
        )));
    }
    let tree = MerkleTree::from_rows(&c, n);
    Ok(Proof {
        n,
        c,
        tree,
        seconds: start.elapsed().as_secs_f64(),
        matmul_seconds,
    })
}

/// Plain matmul on a backend, for benchmarks: returns seconds for one n x n product.
pub fn time_matmul(n: usize, backend: Backend, reps: u32) -> Result<f64, ProveError> {
    let device = backend.device()?;
    let seed = [1u8; 32];
    let a = Tensor::<2>::from_data(
        TensorData::new(challenge::matrix_a(&seed, n), [n, n]),
        &device,
    );
    let b = Tensor::<2>::from_data(
        TensorData::new(challenge::matrix_b(&seed, n), [n, n]),
        &device,
    );
    // Warm up (kernel selection, thread pool).
    let _ = a.clone().matmul(b.clone()).into_data();
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let _ = a.clone().matmul(b.clone()).into_data();
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}
