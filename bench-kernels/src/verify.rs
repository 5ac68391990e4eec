//! The coordinator's side: recompute opened rows from the seed and check
//! them against the committed root.
//!
//! Row `i` of the last product depends only on row `i` of A and on B:
//! `c = a_i B`, then `r - 1` times `c = reduce(c) B`. That is `r n^2`
//! multiply-adds a row against `r n^3` for the whole proof, so `k` rows cost
//! `k / n` of the proving work (132 rows at n = 4096: about 3 %).
//!
//! How many rows: a worker that faked a fraction `f` of the rows passes one
//! random check with probability `1 - f`, and `k` independent checks with
//! `(1 - f)^k`. For `f = 10 %` and `k = 132`, `0.9^132 = 9.1e-7 < 10^-6`
//! (131 rows would give 1.01e-6), so [`SAMPLES`] is 132.

use crate::challenge::{self, Challenge, ChallengeError, bound_for, reduce};
use crate::proof::{Hash, Step, leaf_hash, verify_path};

/// Rows checked per proof (see the module docs).
pub const SAMPLES: usize = 132;

/// Longest Merkle path accepted: a tree over at most 2^32 rows.
pub const MAX_PATH: usize = 32;

/// One opened row: its index and its Merkle path.
///
/// The verifier recomputes the row's values from the seed, so it needs only
/// the path to check them against the committed root: 132 paths at
/// n = 4096 are about 140 KB of JSON, where the values were 3.7 MB.
/// `values` is optional: when present they are compared first, which names
/// the first wrong column in the refusal.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Opening {
    pub row: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<f32>>,
    pub path: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Challenge(#[from] ChallengeError),
    #[error("root must be 64 hex digits")]
    Root,
    #[error("row {0} was not asked for or is out of range")]
    Row(usize),
    #[error("row {0} has {1} values, expected {2}")]
    Length(usize, usize, usize),
    #[error("row {0}'s Merkle path does not lead to the root from the recomputed row")]
    Path(usize),
    #[error("row {0}'s Merkle path has {1} steps (at most {MAX_PATH})")]
    PathLength(usize, usize),
    #[error("row {row} is wrong at column {col}: {got} instead of {want}")]
    Value {
        row: usize,
        col: usize,
        got: f32,
        want: f32,
    },
    #[error("{0} rows were asked for, {1} were opened")]
    Count(usize, usize),
    #[error("recomputing rows failed: {0}")]
    Backend(String),
}

/// Recomputes row `i` of the last product.
pub fn expected_row(seed: &[u8; 32], n: usize, rounds: u32, b: &[f32], i: usize) -> Vec<f32> {
    let bound = bound_for(n);
    let mut row = challenge::row_a(seed, n, i);
    let mut out = vec![0f32; n];
    for round in 0..rounds {
        if round > 0 {
            for x in row.iter_mut() {
                *x = reduce(*x, bound);
            }
        }
        out.iter_mut().for_each(|x| *x = 0.0);
        for (k, &a) in row.iter().enumerate() {
            if a == 0.0 {
                continue;
            }
            let brow = &b[k * n..(k + 1) * n];
            for (o, &bv) in out.iter_mut().zip(brow) {
                *o += a * bv;
            }
        }
        std::mem::swap(&mut row, &mut out);
    }
    row
}

/// Picks `k` distinct rows from `0..n` from 32 bytes of fresh randomness.
pub fn pick_rows(randomness: &[u8; 32], n: usize, k: usize) -> Vec<usize> {
    let mut xof = blake3::Hasher::new_derive_key("troop proof-of-hardware v1 rows")
        .update(randomness)
        .finalize_xof();
    let k = k.min(n);
    let mut rows = Vec::with_capacity(k);
    let mut buf = [0u8; 8];
    while rows.len() < k {
        xof.fill(&mut buf);
        let r = (u64::from_le_bytes(buf) % n as u64) as usize;
        if !rows.contains(&r) {
            rows.push(r);
        }
    }
    rows
}

/// Recomputes the given rows of the last product at once, as one
/// `(rows x n) . (n x n)` matmul a round on the CPU backend: `k / n` of
/// the proving work, at the speed of the proving kernel.
pub fn expected_rows(
    seed: &[u8; 32],
    n: usize,
    rounds: u32,
    rows: &[usize],
) -> Result<Vec<Vec<f32>>, String> {
    use burn::tensor::{Device, Tensor, TensorData};
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let k = rows.len();
    let mut a_rows = Vec::with_capacity(k * n);
    for &r in rows {
        a_rows.extend_from_slice(&challenge::row_a(seed, n, r));
    }
    let device = Device::flex();
    let bound = bound_for(n);
    let m = (2 * bound + 1) as f32;
    let a = Tensor::<2>::from_data(TensorData::new(a_rows, [k, n]), &device);
    let b = Tensor::<2>::from_data(
        TensorData::new(challenge::matrix_b(seed, n), [n, n]),
        &device,
    );
    let mut c = a.matmul(b.clone());
    for _ in 1..rounds {
        c = c
            .remainder_scalar(m)
            .add_scalar(m)
            .remainder_scalar(m)
            .sub_scalar(bound as f32)
            .matmul(b.clone());
    }
    let flat: Vec<f32> = c
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| format!("{e:?}"))?;
    Ok(flat.chunks(n).map(<[f32]>::to_vec).collect())
}

/// Checks the openings of `asked` rows against `root_hex`.
pub fn verify(
    ch: &Challenge,
    root_hex: &str,
    asked: &[usize],
    openings: &[Opening],
) -> Result<(), VerifyError> {
    let seed = ch.validate()?;
    let root: Hash = hex::decode(root_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(VerifyError::Root)?;
    if openings.len() != asked.len() {
        return Err(VerifyError::Count(asked.len(), openings.len()));
    }
    let n = ch.n;
    let mut seen = std::collections::HashSet::new();
    // Everything cheap first: the recomputation below is the costly part.
    for o in openings {
        if !asked.contains(&o.row) || o.row >= n || !seen.insert(o.row) {
            return Err(VerifyError::Row(o.row));
        }
        if let Some(values) = &o.values
            && values.len() != n
        {
            return Err(VerifyError::Length(o.row, values.len(), n));
        }
        if o.path.len() > MAX_PATH {
            return Err(VerifyError::PathLength(o.row, o.path.len()));
        }
    }
    let rows: Vec<usize> = openings.iter().map(|o| o.row).collect();
    let want = expected_rows(&seed, n, ch.rounds, &rows).map_err(VerifyError::Backend)?;
    for (o, w) in openings.iter().zip(&want) {
        if let Some((col, (got, w))) = o
            .values
            .iter()
            .flatten()
            .zip(w)
            .enumerate()
            .find(|(_, (g, w))| g.to_bits() != w.to_bits())
        {
            return Err(VerifyError::Value {
                row: o.row,
                col,
                got: *got,
                want: *w,
            });
        }
        // The recomputed row must be the leaf the worker committed to.
        if !verify_path(&root, o.row, leaf_hash(o.row, w), &o.path) {
            return Err(VerifyError::Path(o.row));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::{Backend, prove};

    fn openings(p: &crate::Proof, rows: &[usize]) -> Vec<Opening> {
        p.openings(rows)
    }

    #[test]
    fn an_honest_proof_verifies_and_one_changed_element_is_caught() {
        let ch = Challenge::new([3u8; 32], 96, 3);
        let p = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("prove");
        let rows = pick_rows(&[5u8; 32], ch.n, 20);
        verify(&ch, &p.root_hex(), &rows, &openings(&p, &rows)).expect("honest proof verifies");

        // Every row is checked against the seed: change one element of C
        // and commit to it honestly; opening that row fails.
        let mut c = p.c.clone();
        c[rows[0] * ch.n + 7] += 1.0;
        let tree = crate::proof::MerkleTree::from_rows(&c, ch.n);
        let forged: Vec<Opening> = rows
            .iter()
            .map(|&i| Opening {
                row: i,
                values: Some(c[i * ch.n..(i + 1) * ch.n].to_vec()),
                path: tree.open(i),
            })
            .collect();
        let err = verify(&ch, &hex::encode(tree.root()), &rows, &forged).expect_err("caught");
        assert!(matches!(err, VerifyError::Value { col: 7, .. }), "{err}");
        // Without values (the usual upload) the same forgery fails its path.
        let bare: Vec<Opening> = forged
            .iter()
            .map(|o| Opening {
                values: None,
                ..o.clone()
            })
            .collect();
        let err = verify(&ch, &hex::encode(tree.root()), &rows, &bare).expect_err("caught");
        assert!(matches!(err, VerifyError::Path(_)), "{err}");
        // Honest values under the forged root: the path fails.
        assert!(matches!(
            verify(&ch, &hex::encode(tree.root()), &rows, &openings(&p, &rows)),
            Err(VerifyError::Path(_))
        ));
        // A row that was not asked for.
        let mut extra = openings(&p, &rows);
        extra[0].row = (rows[0] + 1) % ch.n;
        assert!(verify(&ch, &p.root_hex(), &rows, &extra).is_err());
        // Another seed, same answers: refused.
        let other = Challenge::new([4u8; 32], 96, 3);
        assert!(verify(&other, &p.root_hex(), &rows, &openings(&p, &rows)).is_err());
    }

    #[test]
    fn skipping_a_round_is_caught() {
        let ch = Challenge::new([9u8; 32], 64, 4);
        let fewer = Challenge {
            rounds: 3,
            ..ch.clone()
        };
        let p = prove(&fewer, Backend::Cpu, None, |_, _| {}).expect("prove");
        let rows = pick_rows(&[1u8; 32], ch.n, 8);
        assert!(matches!(
            verify(&ch, &p.root_hex(), &rows, &openings(&p, &rows)),
            Err(VerifyError::Path(_))
        ));
        assert!(matches!(
            verify(&ch, &p.root_hex(), &rows, &p.openings_with_values(&rows)),
            Err(VerifyError::Value { .. })
        ));
    }

    #[test]
    fn the_root_is_the_same_across_runs_and_sizes_stay_exact() {
        for (n, rounds) in [(64usize, 1u32), (100, 2), (257, 3)] {
            let ch = Challenge::new([1u8; 32], n, rounds);
            let a = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("prove");
            let b = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("prove");
            assert_eq!(a.root_hex(), b.root_hex());
            // The backend's product equals the exact row recomputation.
            let seed = ch.validate().expect("seed");
            let bm = challenge::matrix_b(&seed, n);
            let rows = [0, n / 2, n - 1];
            let fast = expected_rows(&seed, n, rounds, &rows).expect("rows");
            for (j, &i) in rows.iter().enumerate() {
                assert_eq!(a.row(i), expected_row(&seed, n, rounds, &bm, i).as_slice());
                assert_eq!(a.row(i), fast[j].as_slice());
            }
        }
    }

    /// The fold on the host (all cores) and the fold as tensor operations
    /// give the same values, so the same root, round after round.
    #[test]
    fn the_host_fold_gives_the_root_of_the_tensor_fold() {
        use crate::matmul::{Fold, prove_with};
        for (n, rounds) in [(64usize, 4u32), (100, 2), (257, 3), (512, 4)] {
            let ch = Challenge::new([3u8; 32], n, rounds);
            let host = prove_with(&ch, Backend::Cpu, Fold::Host, None, |_, _| {}).expect("host");
            let dev = prove_with(&ch, Backend::Cpu, Fold::Device, None, |_, _| {}).expect("device");
            assert_eq!(host.root_hex(), dev.root_hex(), "n {n} rounds {rounds}");
            assert_eq!(host.c, dev.c);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Made-up openings (rows, paths of any length, siblings that are
        /// not hex, values of any length) are refused, never a panic.
        #[test]
        fn random_openings_are_refused(
            rows in proptest::collection::vec(0usize..80, 0..6),
            steps in proptest::collection::vec((proptest::option::of("[0-9a-fz]{0,70}"), proptest::bool::ANY), 0..40),
            values in proptest::option::of(proptest::collection::vec(proptest::num::f32::ANY, 0..70)),
            json in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        ) {
            let _ = serde_json::from_slice::<Vec<Opening>>(&json);
            let ch = Challenge::new([1u8; 32], 64, 1);
            let asked = pick_rows(&[2u8; 32], ch.n, 4);
            let path: Vec<Step> = steps.into_iter().map(|(sibling, left)| Step { sibling, left }).collect();
            let openings: Vec<Opening> = rows.iter().map(|&row| Opening { row, values: values.clone(), path: path.clone() }).collect();
            proptest::prop_assert!(verify(&ch, &"ab".repeat(32), &asked, &openings).is_err());
        }
    }

    #[test]
    fn openings_at_the_default_size_fit_a_one_mib_body() {
        // The upload's size depends only on n and the rows asked: build the
        // tree over 4096 leaves without proving.
        let n = 4096;
        let leaves: Vec<Hash> = (0..n)
            .map(|i| *blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
            .collect();
        let tree = crate::proof::MerkleTree::from_leaves(leaves);
        let rows = pick_rows(&[7u8; 32], n, SAMPLES);
        let openings: Vec<Opening> = rows
            .iter()
            .map(|&row| Opening {
                row,
                values: None,
                path: tree.open(row),
            })
            .collect();
        let body = serde_json::json!({ "challenge_id": "0".repeat(32), "openings": openings });
        let size = serde_json::to_vec(&body)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        println!("openings at n = {n}: {size} bytes");
        assert!(size < 1024 * 1024, "{size} bytes");
        assert!(openings.iter().all(|o| o.path.len() <= MAX_PATH));
    }

    #[test]
    fn rows_are_distinct_and_in_range() {
        let r = pick_rows(&[2u8; 32], 4096, SAMPLES);
        assert_eq!(r.len(), SAMPLES);
        let set: std::collections::HashSet<_> = r.iter().collect();
        assert_eq!(set.len(), SAMPLES);
        assert!(r.iter().all(|&x| x < 4096));
        assert!(0.9f64.powi(SAMPLES as i32) < 1e-6);
        assert!(0.9f64.powi(SAMPLES as i32 - 1) >= 1e-6);
    }
}

/// Needs a Vulkan driver (Mesa's lavapipe on a CPU-only machine:
/// `apt-get install mesa-vulkan-drivers`) and `--features wgpu` (the troop
/// binary's default). Without an adapter they say "skipped", and fail when
/// `TROOP_REQUIRE_VULKAN_TESTS=1` (CI).
#[cfg(all(test, feature = "wgpu"))]
mod wgpu_tests {
    use crate::Challenge;
    use crate::adapters::{AdapterKind, adapters};
    use crate::matmul::{Backend, Fold, prove, prove_with};

    /// Whether an adapter is here; otherwise says why the test is skipped.
    fn have_adapter(test: &str) -> bool {
        if !adapters().is_empty() {
            return true;
        }
        let why = "no Vulkan adapter (apt-get install mesa-vulkan-drivers)";
        if std::env::var("TROOP_REQUIRE_VULKAN_TESTS").as_deref() == Ok("1") {
            panic!("TROOP_REQUIRE_VULKAN_TESTS=1 but {why}");
        }
        eprintln!("skipped: {test}: {why}");
        false
    }

    /// Sizes up to 2048 and the 4-round chain the coordinator asks by
    /// default, with several seeds: wgpu's root is the CPU's, with no
    /// fallback. (n = 4096 with 4 rounds, the coordinator's default, takes
    /// minutes on lavapipe in a test build: `scripts/bench-proof` checks it
    /// on release binaries, and the root's exactness does not depend on n
    /// below the bound `n bound^2 < 2^24`.)
    #[test]
    fn the_root_is_the_same_on_flex_and_wgpu() {
        if !have_adapter("the_root_is_the_same_on_flex_and_wgpu") {
            return;
        }
        // Sizes that are not a multiple of the kernel's 64 x 64 tile (97,
        // 200) are padded with zeros on the device: the padding must not
        // leak into the fold or the product.
        for (seed, n, rounds, fold) in [
            (5u8, 64usize, 1u32, Fold::Device),
            (9, 97, 3, Fold::Device),
            (9, 97, 3, Fold::Host),
            (6, 200, 3, Fold::Device),
            (7, 1024, 4, Fold::Device),
            (8, 2048, 1, Fold::Device),
        ] {
            let ch = Challenge::new([seed; 32], n, rounds);
            let cpu = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("cpu");
            let gpu = prove_with(&ch, Backend::Wgpu, fold, None, |_, _| {}).expect("wgpu");
            assert_eq!(gpu.target.backend, Backend::Wgpu);
            assert!(gpu.target.adapter.is_some());
            assert_eq!(
                cpu.root_hex(),
                gpu.root_hex(),
                "seed {seed} n {n} rounds {rounds} {fold:?} fold on {}",
                gpu.target
            );
            eprintln!(
                "n {n} rounds {rounds}: cpu {:.1} GFLOP/s, {} {:.1} GFLOP/s",
                ch.flops() / cpu.matmul_seconds / 1e9,
                gpu.target,
                ch.flops() / gpu.matmul_seconds / 1e9
            );
        }
    }

    /// An adapter that fails (here one that is not there) gives way to the
    /// CPU: the same root, and the failure said.
    #[test]
    fn a_failing_gpu_falls_back_to_the_cpu() {
        use crate::adapters::Adapter;
        use crate::matmul::{Target, prove_falling_back};
        let ghost = Target {
            backend: Backend::Wgpu,
            adapter: Some(Adapter {
                name: "a GPU that is not there".into(),
                kind: AdapterKind::Discrete,
                api: "vulkan".into(),
                driver: String::new(),
                index: 99,
            }),
        };
        let ch = Challenge::new([4u8; 32], 96, 2);
        let p = prove_falling_back(&ch, &ghost, None, |_, _| {}).expect("the CPU proves");
        assert_eq!(p.target.backend, Backend::Cpu);
        let why = p.fallback.clone().expect("the failure is said");
        assert!(why.contains("not there"), "{why}");
        let cpu = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("cpu");
        assert_eq!(p.root_hex(), cpu.root_hex());
    }

    /// `auto` never takes a software adapter over the CPU backend.
    #[test]
    fn auto_chooses_the_cpu_over_a_software_adapter() {
        if !have_adapter("auto_chooses_the_cpu_over_a_software_adapter") {
            return;
        }
        let found = adapters();
        let target = Backend::Auto.target().expect("auto");
        if found.iter().any(|a| a.kind.is_gpu()) {
            eprintln!("this machine has a GPU: auto chose {target}");
            assert_eq!(target.backend, Backend::Wgpu);
            return;
        }
        assert!(
            found.iter().any(|a| a.kind == AdapterKind::Cpu),
            "{found:?}"
        );
        assert_eq!(target.backend, Backend::Cpu, "{target}");
        let ch = Challenge::new([3u8; 32], 128, 2);
        let p = prove(&ch, Backend::Auto, None, |_, _| {}).expect("auto");
        assert_eq!(p.target.backend, Backend::Cpu);
        assert_eq!(p.fallback, None);
    }
}
