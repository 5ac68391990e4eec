//! The proving work: `r` chained matmuls on a backend picked at run time:
//! burn's Flex on the CPU (and burn's CUDA backend, opt-in), the proof's own
//! WGSL kernels on a graphics adapter ([`crate::gpu`]).

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};

use crate::adapters::Adapter;
use crate::challenge::{self, Challenge, ChallengeError, bound_for};
use crate::proof::MerkleTree;

/// Where the matmul runs, as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The fastest real adapter found: a discrete GPU, then an integrated
    /// one (wgpu), else the CPU. A software adapter (llvmpipe, SwiftShader)
    /// is never chosen over the CPU.
    Auto,
    /// burn's Flex CPU backend (AVX-512 kernels when the CPU has them).
    Cpu,
    /// wgpu (Vulkan, Metal, DX12) on the best adapter found, software ones
    /// included: two WGSL kernels ([`crate::gpu`]); needs the `wgpu` feature
    /// (on in the default `troop` build).
    Wgpu,
    /// burn's CUDA backend; needs the `cuda` feature.
    Cuda,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "cpu" | "flex" => Ok(Backend::Cpu),
            "wgpu" | "vulkan" | "gpu" => Ok(Backend::Wgpu),
            "cuda" => Ok(Backend::Cuda),
            other => Err(format!(
                "unknown backend {other:?} (auto, cpu, wgpu or cuda)"
            )),
        }
    }
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }

    /// What this choice runs on here: `auto` resolved, the adapter named.
    pub fn target(self) -> Result<Target, ProveError> {
        use crate::adapters::{adapters, best_any, best_gpu};
        match self {
            Backend::Auto => Ok(match best_gpu(adapters()) {
                Some(a) if cfg!(feature = "wgpu") => Target {
                    backend: Backend::Wgpu,
                    adapter: Some(a.clone()),
                },
                _ => Target::cpu(),
            }),
            Backend::Cpu => Ok(Target::cpu()),
            Backend::Wgpu if !cfg!(feature = "wgpu") => Err(ProveError::NotBuilt("wgpu")),
            Backend::Wgpu => match best_any(adapters()) {
                Some(a) => Ok(Target {
                    backend: Backend::Wgpu,
                    adapter: Some(a.clone()),
                }),
                None => Err(ProveError::Backend(
                    "no Vulkan, Metal or DX12 adapter found (a GPU driver is missing; \
                     on Linux without a GPU, Mesa's lavapipe: apt-get install mesa-vulkan-drivers)"
                        .into(),
                )),
            },
            Backend::Cuda => Ok(Target {
                backend: Backend::Cuda,
                adapter: None,
            }),
        }
    }
}

/// A backend resolved to what runs the work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `Cpu`, `Wgpu` or `Cuda`, never `Auto`.
    pub backend: Backend,
    /// The wgpu adapter.
    pub adapter: Option<Adapter>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.adapter {
            Some(a) => write!(f, "{} on {a}", self.backend.name()),
            None => f.write_str(self.backend.name()),
        }
    }
}

impl Target {
    pub fn cpu() -> Target {
        Target {
            backend: Backend::Cpu,
            adapter: None,
        }
    }

    /// The burn device (CPU, CUDA), or why this build can't run it. wgpu
    /// runs the proof's own kernels instead ([`crate::gpu`]).
    pub fn device(&self) -> Result<Device, ProveError> {
        match self.backend {
            Backend::Cpu => Ok(Device::flex()),
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
    /// What computed it.
    pub target: Target,
    /// Set when the backend asked for failed and the CPU proved instead:
    /// what failed.
    pub fallback: Option<String>,
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
            Backend::Cpu | Backend::Auto => Fold::Host,
            Backend::Wgpu | Backend::Cuda => Fold::Device,
        }
    }
}

/// Runs the challenge on `backend`. `progress(done_rounds, total)` is called
/// after each round; `deadline` stops the work between rounds. A GPU that
/// fails (an error or a panic in its driver) is replaced by the CPU, and
/// [`Proof::fallback`] says what failed; the deadline still holds.
pub fn prove(
    ch: &Challenge,
    backend: Backend,
    deadline: Option<Instant>,
    progress: impl FnMut(u32, u32),
) -> Result<Proof, ProveError> {
    ch.validate()?;
    let target = match backend.target() {
        Ok(t) => t,
        Err(e @ ProveError::Backend(_)) => {
            let mut p = prove_on(ch, &Target::cpu(), Fold::Host, deadline, progress)?;
            p.fallback = Some(format!("{}: {e}", backend.name()));
            return Ok(p);
        }
        Err(e) => return Err(e),
    };
    prove_falling_back(ch, &target, deadline, progress)
}

/// Proves on `target`; when a GPU fails, on the CPU (see [`prove`]).
pub fn prove_falling_back(
    ch: &Challenge,
    target: &Target,
    deadline: Option<Instant>,
    mut progress: impl FnMut(u32, u32),
) -> Result<Proof, ProveError> {
    let fold = target.backend.fold();
    match prove_on(ch, target, fold, deadline, &mut progress) {
        Err(ProveError::Backend(e)) if target.backend != Backend::Cpu => {
            let mut p = prove_on(ch, &Target::cpu(), Fold::Host, deadline, progress)?;
            p.fallback = Some(format!("{target}: {e}"));
            Ok(p)
        }
        other => other,
    }
}

/// [`prove_on`] for a backend by name, without falling back: an error is
/// the backend's.
pub fn prove_with(
    ch: &Challenge,
    backend: Backend,
    fold: Fold,
    deadline: Option<Instant>,
    progress: impl FnMut(u32, u32),
) -> Result<Proof, ProveError> {
    prove_on(ch, &backend.target()?, fold, deadline, progress)
}

/// Runs the challenge on `target` with `fold`, nothing else: a panic in the
/// backend (its driver, its kernels) comes back as [`ProveError::Backend`].
pub fn prove_on(
    ch: &Challenge,
    target: &Target,
    fold: Fold,
    deadline: Option<Instant>,
    progress: impl FnMut(u32, u32),
) -> Result<Proof, ProveError> {
    let run =
        std::panic::AssertUnwindSafe(|| prove_unguarded(ch, target, fold, deadline, progress));
    match std::panic::catch_unwind(run) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            // A device that panicked is not kept for the next proof.
            #[cfg(feature = "wgpu")]
            crate::gpu::Gpu::forget();
            Err(ProveError::Backend(format!("{target} panicked: {msg}")))
        }
    }
}

/// Maps every entry back into `[-bound, bound]` with the verifier's own
/// [`challenge::reduce`], in parallel over rows.
pub(crate) fn fold_slice(v: &mut [f32], n: usize, bound: i32) {
    use rayon::prelude::*;
    v.par_chunks_mut(n.max(1) * 16).for_each(|rows| {
        for x in rows {
            *x = challenge::reduce_exact(*x, bound);
        }
    });
}

/// [`fold_slice`] on a burn tensor.
fn fold_on_host(c: Tensor<2>, n: usize, bound: i32) -> Result<Tensor<2>, ProveError> {
    let device = c.device();
    let mut v: Vec<f32> = c
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| ProveError::Backend(format!("{e:?}")))?;
    fold_slice(&mut v, n, bound);
    Ok(Tensor::<2>::from_data(TensorData::new(v, [n, n]), &device))
}

fn prove_unguarded(
    ch: &Challenge,
    target: &Target,
    fold: Fold,
    deadline: Option<Instant>,
    mut progress: impl FnMut(u32, u32),
) -> Result<Proof, ProveError> {
    let seed = ch.validate()?;
    let n = ch.n;
    let start = Instant::now();
    let a = challenge::matrix_a(&seed, n);
    let b = challenge::matrix_b(&seed, n);
    let (c, matmul_seconds) = match (target.backend, &target.adapter) {
        #[cfg(feature = "wgpu")]
        (Backend::Wgpu, Some(adapter)) => crate::gpu::chain(
            adapter,
            &a,
            &b,
            n,
            ch.rounds,
            bound_for(n),
            fold,
            deadline,
            start,
            &mut progress,
        )?,
        #[cfg(feature = "wgpu")]
        (Backend::Wgpu, None) => {
            return Err(ProveError::Backend("no adapter named to prove on".into()));
        }
        #[cfg(not(feature = "wgpu"))]
        (Backend::Wgpu, _) => return Err(ProveError::NotBuilt("wgpu")),
        _ => burn_chain(
            &target.device()?,
            a,
            b,
            ch,
            fold,
            deadline,
            start,
            &mut progress,
        )?,
    };
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
        target: target.clone(),
        fallback: None,
    })
}

/// The rounds on a burn device: the last product, and the seconds from the
/// first product to the values on the host.
#[allow(clippy::too_many_arguments)]
fn burn_chain(
    device: &Device,
    a: Vec<f32>,
    b: Vec<f32>,
    ch: &Challenge,
    fold: Fold,
    deadline: Option<Instant>,
    start: Instant,
    progress: &mut dyn FnMut(u32, u32),
) -> Result<(Vec<f32>, f64), ProveError> {
    let n = ch.n;
    let bound = bound_for(n);
    let m = (2 * bound + 1) as f32;
    let a = Tensor::<2>::from_data(TensorData::new(a, [n, n]), device);
    let b = Tensor::<2>::from_data(TensorData::new(b, [n, n]), device);
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
    // The clock stops when the values are on the host: on a lazy backend
    // `into_data` returns at once and the work happens while the bytes are
    // taken.
    let c: Vec<f32> = c
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| ProveError::Backend(format!("{e:?}")))?;
    Ok((c, t0.elapsed().as_secs_f64()))
}
