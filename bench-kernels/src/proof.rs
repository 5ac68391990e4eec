//! The commitment: a blake3 Merkle tree over the rows of the result.
//!
//! Leaf `i` = blake3("troop-leaf" || i as u64 LE || row as f32 LE bytes).
//! Node = blake3("troop-node" || left || right). A level with an odd number
//! of nodes carries its last node up unchanged.

pub type Hash = [u8; 32];

pub fn leaf_hash(i: usize, row: &[f32]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"troop-leaf");
    h.update(&(i as u64).to_le_bytes());
    for x in row {
        h.update(&x.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

fn node_hash(l: &Hash, r: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"troop-node");
    h.update(l);
    h.update(r);
    *h.finalize().as_bytes()
}

/// All levels of the tree, leaves first.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
}

/// One step of a path: the sibling and whether it sits on the left. A
/// step with any other field is refused when it is read (the coordinator
/// then answers 400 before the round's one try is spent).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Sibling hash, hex; absent when the node was carried up alone.
    pub sibling: Option<String>,
    pub left: bool,
}

impl MerkleTree {
    pub fn from_rows(c: &[f32], n: usize) -> Self {
        let leaves: Vec<Hash> = c
            .chunks(n)
            .enumerate()
            .map(|(i, r)| leaf_hash(i, r))
            .collect();
        Self::from_leaves(leaves)
    }

    pub fn from_leaves(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let prev = levels.last().map(Vec::as_slice).unwrap_or_default();
            let next: Vec<Hash> = prev
                .chunks(2)
                .map(|p| {
                    if p.len() == 2 {
                        node_hash(&p[0], &p[1])
                    } else {
                        p[0]
                    }
                })
                .collect();
            levels.push(next);
        }
        Self { levels }
    }

    pub fn root(&self) -> Hash {
        self.levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or([0; 32])
    }

    /// The path from leaf `i` to the root.
    pub fn open(&self, mut i: usize) -> Vec<Step> {
        let mut path = Vec::new();
        for level in &self.levels[..self.levels.len().saturating_sub(1)] {
            let sib = i ^ 1;
            path.push(Step {
                sibling: level.get(sib).map(hex::encode),
                left: sib < i,
            });
            i /= 2;
        }
        path
    }
}

/// Checks that `leaf` at index `i` leads to `root` along `path`.
pub fn verify_path(root: &Hash, mut i: usize, leaf: Hash, path: &[Step]) -> bool {
    let mut h = leaf;
    for step in path {
        match &step.sibling {
            Some(s) => {
                let Ok(bytes) = hex::decode(s) else {
                    return false;
                };
                let Ok(sib) = <Hash>::try_from(bytes.as_slice()) else {
                    return false;
                };
                // The side must match the index, or a path could be replayed elsewhere.
                if step.left != (i % 2 == 1) {
                    return false;
                }
                h = if step.left {
                    node_hash(&sib, &h)
                } else {
                    node_hash(&h, &sib)
                };
            }
            None => {
                if i % 2 == 1 {
                    return false;
                }
            }
        }
        i /= 2;
    }
    h == *root
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_leaf_opens_and_wrong_paths_fail(rows in 1usize..40, pick in 0usize..40) {
            let n = 3;
            let c: Vec<f32> = (0..rows * n).map(|x| x as f32).collect();
            let t = MerkleTree::from_rows(&c, n);
            let i = pick % rows;
            let path = t.open(i);
            let leaf = leaf_hash(i, &c[i * n..(i + 1) * n]);
            prop_assert!(verify_path(&t.root(), i, leaf, &path));
            // A changed value, another index or a changed sibling fails.
            let mut bad = c[i * n..(i + 1) * n].to_vec();
            bad[0] += 1.0;
            prop_assert!(!verify_path(&t.root(), i, leaf_hash(i, &bad), &path));
            if rows > 1 {
                let j = (i + 1) % rows;
                prop_assert!(!verify_path(&t.root(), j, leaf, &path));
                let mut p2 = path.clone();
                if let Some(step) = p2.iter_mut().find(|s| s.sibling.is_some()) {
                    step.sibling = Some(hex::encode([9u8; 32]));
                    prop_assert!(!verify_path(&t.root(), i, leaf, &p2));
                }
            }
        }
    }
}
