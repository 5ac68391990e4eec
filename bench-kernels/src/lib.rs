//! Proof of hardware: a matmul challenge whose answer can be checked for a
//! tiny fraction of its cost.
//!
//! The coordinator sends a fresh 32-byte seed, a size `n` and a number of
//! rounds `r`. The worker expands the seed into two `n x n` matrices of small
//! integers held as f32 ([`challenge`]), multiplies them `r` times on the
//! CPU with burn or on a graphics adapter with wgpu ([`matmul`]), and commits to the rows of the last product with a blake3
//! Merkle tree ([`proof`]). The coordinator then asks for random rows and
//! recomputes each from the seed alone in `O(r n^2)` ([`verify`]).

pub mod adapters;
pub mod challenge;
#[cfg(feature = "wgpu")]
mod gpu;
pub mod matmul;
pub mod proof;
pub mod verify;

pub use adapters::{Adapter, AdapterKind, adapters, adapters_listed};
pub use challenge::Challenge;
pub use matmul::{Backend, Proof, Target, prove};
