//! Expanding a seed into the challenge matrices.
//!
//! Why the results are exact on every backend: every entry of A and B is an
//! integer in `[-bound, bound]`, so every product is an integer of magnitude
//! at most `bound^2` and every partial sum of a dot product (in whatever
//! order and with or without fused multiply-add) is an integer of magnitude
//! at most `n * bound^2`. [`bound_for`] picks the largest bound with
//! `n * bound^2 < 2^24`, and f32 represents every integer below 2^24
//! exactly, so no rounding ever happens: C = A x B is the same bits on the
//! CPU, on wgpu and on CUDA, in any summation order. Between rounds, C is
//! mapped back into `[-bound, bound]` (C mod (2 bound + 1), shifted), which
//! is also exact, and multiplied by B again.

use serde::{Deserialize, Serialize};

/// Domain separation for the seed expansion.
const CONTEXT: &str = "troop proof-of-hardware v1 matrices";

/// What the coordinator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// 32 random bytes, hex.
    pub seed: String,
    pub n: usize,
    pub rounds: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    #[error("seed must be 64 hex digits (32 bytes)")]
    Seed,
    #[error("size must be from 16 to 16384, got {0}")]
    Size(usize),
    #[error("rounds must be from 1 to 64, got {0}")]
    Rounds(u32),
}

impl Challenge {
    pub fn new(seed: [u8; 32], n: usize, rounds: u32) -> Self {
        Self {
            seed: hex::encode(seed),
            n,
            rounds,
        }
    }

    /// Checks the fields and returns the raw seed.
    pub fn validate(&self) -> Result<[u8; 32], ChallengeError> {
        if !(16..=16_384).contains(&self.n) {
            return Err(ChallengeError::Size(self.n));
        }
        if !(1..=64).contains(&self.rounds) {
            return Err(ChallengeError::Rounds(self.rounds));
        }
        let bytes = hex::decode(&self.seed).map_err(|_| ChallengeError::Seed)?;
        bytes.try_into().map_err(|_| ChallengeError::Seed)
    }

    /// Floating point operations of the whole proof.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n as f64).powi(3) * f64::from(self.rounds)
    }
}

/// The largest entry bound for size `n` such that `n * bound^2 < 2^24`
/// (capped at 127).
pub fn bound_for(n: usize) -> i32 {
    let limit = (1u64 << 24) - 1;
    let mut b: u64 = 1;
    while b < 127 && (n as u64) * (b + 1) * (b + 1) <= limit {
        b += 1;
    }
    b as i32
}

/// Maps an integer-valued float back into `[-bound, bound]`.
pub fn reduce(x: f32, bound: i32) -> f32 {
    let m = (2 * bound + 1) as f32;
    let r = ((x % m) + m) % m;
    r - bound as f32
}

/// [`reduce`] without `fmodf`: an integer-valued `x` below 2^24 (every
/// product of a valid challenge is one) is reduced as an `i32`, which
/// gives the same value; anything else goes through [`reduce`].
#[inline]
pub fn reduce_exact(x: f32, bound: i32) -> f32 {
    const EXACT: f32 = 16_777_216.0;
    if x.abs() < EXACT && x == x.trunc() {
        let m = 2 * bound + 1;
        ((x as i32).rem_euclid(m) - bound) as f32
    } else {
        reduce(x, bound)
    }
}

/// One XOF stream per row, so rows expand in parallel and a verifier can
/// make row `i` of A alone.
fn row_reader(seed: &[u8; 32], which: u8, row: usize) -> blake3::OutputReader {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT);
    h.update(seed);
    h.update(&[which]);
    h.update(&(row as u64).to_le_bytes());
    h.finalize_xof()
}

fn fill(out: &mut [f32], mut xof: blake3::OutputReader, bound: i32) {
    let m = (2 * bound + 1) as u32;
    // Rejection sampling keeps every value equally likely.
    let limit = 256 - (256 % m);
    let mut buf = [0u8; 1024];
    let mut pos = buf.len();
    for slot in out.iter_mut() {
        loop {
            if pos == buf.len() {
                xof.fill(&mut buf);
                pos = 0;
            }
            let v = u32::from(buf[pos]);
            pos += 1;
            if v < limit {
                *slot = ((v % m) as i32 - bound) as f32;
                break;
            }
        }
    }
}

fn matrix(seed: &[u8; 32], n: usize, which: u8) -> Vec<f32> {
    use rayon::prelude::*;
    let bound = bound_for(n);
    let mut v = vec![0f32; n * n];
    v.par_chunks_mut(n)
        .enumerate()
        .for_each(|(i, row)| fill(row, row_reader(seed, which, i), bound));
    v
}

/// Matrix A (row-major, `n x n`).
pub fn matrix_a(seed: &[u8; 32], n: usize) -> Vec<f32> {
    matrix(seed, n, b'A')
}

/// Matrix B (row-major, `n x n`).
pub fn matrix_b(seed: &[u8; 32], n: usize) -> Vec<f32> {
    matrix(seed, n, b'B')
}

/// Row `i` of A alone.
pub fn row_a(seed: &[u8; 32], n: usize, i: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    fill(&mut v, row_reader(seed, b'A', i), bound_for(n));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_keeps_every_sum_below_2_pow_24() {
        for n in [16usize, 64, 1000, 1024, 4096, 8192, 16384] {
            let b = bound_for(n) as u64;
            assert!((n as u64) * b * b < 1 << 24, "n {n} bound {b}");
            assert!(b == 127 || (n as u64) * (b + 1) * (b + 1) >= 1 << 24);
        }
        assert_eq!(bound_for(4096), 63);
    }

    #[test]
    fn expansion_is_deterministic_and_bounded() {
        let seed = [7u8; 32];
        let a = matrix_a(&seed, 64);
        assert_eq!(a, matrix_a(&seed, 64));
        assert_ne!(a, matrix_b(&seed, 64));
        assert_ne!(a, matrix_a(&[8u8; 32], 64));
        let b = bound_for(64) as f32;
        assert!(a.iter().all(|x| x.fract() == 0.0 && x.abs() <= b));
        assert_eq!(row_a(&seed, 64, 5), a[5 * 64..6 * 64].to_vec());
    }

    proptest::proptest! {
        /// The integer fold equals `reduce` on every integer below 2^24
        /// and on anything else it is handed.
        #[test]
        fn reduce_exact_is_reduce(i in -16_777_215i32..16_777_215, f in proptest::num::f32::ANY, bound in 1i32..128) {
            let x = i as f32;
            proptest::prop_assert_eq!(reduce_exact(x, bound).to_bits(), reduce(x, bound).to_bits());
            proptest::prop_assert_eq!(reduce_exact(f, bound).to_bits(), reduce(f, bound).to_bits());
        }
    }

    #[test]
    fn reduce_maps_into_range() {
        for x in [
            -1000.0f32,
            -64.0,
            -63.0,
            0.0,
            63.0,
            64.0,
            127.0,
            16_000_000.0,
        ] {
            let r = reduce(x, 63);
            assert!(
                (-63.0..=63.0).contains(&r) && r.fract() == 0.0,
                "{x} -> {r}"
            );
            // r + bound is x modulo 2 bound + 1.
            assert_eq!((x - (r + 63.0)) % 127.0, 0.0, "{x} -> {r}");
        }
    }
}
