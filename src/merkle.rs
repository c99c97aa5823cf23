//! Merkle trees over a segment's chain entries (RFC 9162 §2.1 shapes, SHA-256, domain-separated
//! leaves and nodes), so one entry can be proven to belong to a segment with log2(n) hashes.
//!
//! ```text
//! leaf(e)    = SHA-256(0x00 || entry_hash)          -- entry_hash: the 32 raw bytes
//! node(l, r) = SHA-256(0x01 || l || r)
//! MTH([e])   = leaf(e)
//! MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n]))       -- k: largest power of two < n
//! ```
//! The leaves are the segment's rows in row order (ascending offset).

use sha2::{Digest, Sha256};

use crate::chain::Hash;

pub fn leaf(entry_hash: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry_hash);
    h.finalize().into()
}

pub fn node(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

fn split(n: usize) -> usize {
    debug_assert!(n > 1);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Root over already-hashed leaves. An empty tree has no root.
fn root_of_leaves(leaves: &[Hash]) -> Option<Hash> {
    match leaves.len() {
        0 => None,
        1 => Some(leaves[0]),
        n => {
            let k = split(n);
            Some(node(&root_of_leaves(&leaves[..k])?, &root_of_leaves(&leaves[k..])?))
        }
    }
}

/// Merkle root over entry hashes (`None` for no entries).
pub fn root(entries: &[Hash]) -> Option<Hash> {
    let leaves: Vec<Hash> = entries.iter().map(leaf).collect();
    root_of_leaves(&leaves)
}

/// The audit path of entry `index`: sibling hashes from the leaf's level up to the root's.
pub fn path(entries: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= entries.len() {
        return None;
    }
    let leaves: Vec<Hash> = entries.iter().map(leaf).collect();
    let mut out = Vec::new();
    collect_path(&leaves, index, &mut out);
    Some(out)
}

fn collect_path(leaves: &[Hash], index: usize, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if index < k {
        collect_path(&leaves[..k], index, out);
        out.push(root_of_leaves(&leaves[k..]).expect("non-empty"));
    } else {
        collect_path(&leaves[k..], index - k, out);
        out.push(root_of_leaves(&leaves[..k]).expect("non-empty"));
    }
}

/// The root implied by an entry, its index among `count` entries and its audit path; `None` if
/// the path has the wrong length for that position.
pub fn root_from_path(entry_hash: &Hash, index: usize, count: usize, path: &[Hash]) -> Option<Hash> {
    if index >= count {
        return None;
    }
    climb(leaf(entry_hash), index, count, path)
}

fn climb(hash: Hash, index: usize, count: usize, path: &[Hash]) -> Option<Hash> {
    if count == 1 {
        return path.is_empty().then_some(hash);
    }
    let (sibling, rest) = path.split_last()?;
    let k = split(count);
    if index < k {
        Some(node(&climb(hash, index, k, rest)?, sibling))
    } else {
        Some(node(sibling, &climb(hash, index - k, count - k, rest)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize) -> Vec<Hash> {
        (0..n).map(|i| Sha256::digest((i as u32).to_be_bytes()).into()).collect()
    }

    #[test]
    fn every_path_proves_its_entry_and_no_other() {
        for n in 1..=33 {
            let e = entries(n);
            let r = root(&e).unwrap();
            for i in 0..n {
                let p = path(&e, i).unwrap();
                assert_eq!(root_from_path(&e[i], i, n, &p), Some(r), "n={n} i={i}");
                let other = (i + 1) % n;
                if other != i {
                    assert_ne!(root_from_path(&e[other], i, n, &p), Some(r));
                    assert_ne!(root_from_path(&e[i], other, n, &p), Some(r));
                }
            }
        }
    }

    #[test]
    fn shapes_match_the_definition() {
        let e = entries(3);
        let expected = node(&node(&leaf(&e[0]), &leaf(&e[1])), &leaf(&e[2]));
        assert_eq!(root(&e), Some(expected));
        assert_eq!(root(&e[..1]), Some(leaf(&e[0])));
        assert_eq!(root(&[]), None);
    }

    /// The vectors in schemas/CHAIN.md ("Merkle root"): entries are SHA-256 of the 4-byte
    /// big-endian integers 0..n.
    #[test]
    fn chain_md_vectors() {
        assert_eq!(
            hex::encode(root(&entries(1)).unwrap()),
            "965053f8e65891f8079863a0808b66d6dbba6e4ac34b710f797019ed633adf92"
        );
        assert_eq!(
            hex::encode(root(&entries(3)).unwrap()),
            "b1782769b8906e20ab9b2648e93f64b15e98d20ebdc70e9d5dd2737378bfa0cd"
        );
        assert_eq!(
            hex::encode(root(&entries(5)).unwrap()),
            "1a5bc16137527daa24003b99e35095b4d66d4c997f8986a46842f3cc4a81e275"
        );
    }
}
