//! Content-addressed KV blocks (automatic prefix caching).
//!
//! A full block's hash is SHA-256 over its parent's hash followed by its token ids as
//! little-endian u32. The first block's parent is the root: SHA-256 over a version tag, the
//! engine's identity (the model fingerprint: file hash and KV layout, so two models never
//! share a hash) and the request's `cache_salt`, each length-prefixed. The function is fixed:
//! the same tokens give the same hash in every process, on every machine, after restarts.

use sha2::{Digest, Sha256};

/// The hash of one full block and, through its parent, of every token before it.
pub type BlockHash = [u8; 32];

const VERSION: &[u8] = b"splitserve prefix cache v1";

fn put(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The parent of a request's first block: the engine's identity and the request's salt
/// (requests with different salts share nothing).
pub fn root(identity: &str, salt: Option<&str>) -> BlockHash {
    let mut h = Sha256::new();
    put(&mut h, VERSION);
    put(&mut h, identity.as_bytes());
    match salt {
        Some(s) => {
            h.update([1]);
            put(&mut h, s.as_bytes());
        }
        None => h.update([0]),
    }
    h.finalize().into()
}

/// The hash of a block of `tokens` following `parent`.
pub fn block_hash(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(parent);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

/// Extends `hashes` to cover every full block of `tokens`.
pub fn extend(root: &BlockHash, tokens: &[u32], block_size: usize, hashes: &mut Vec<BlockHash>) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let parent = if i == 0 { *root } else { hashes[i - 1] };
        hashes.push(block_hash(
            &parent,
            &tokens[i * block_size..(i + 1) * block_size],
        ));
    }
}

/// Lowercase hex, for logs and docs.
pub fn hex(h: &BlockHash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_fixed_chained_and_salted() {
        // Pinned: a change of the function would silently orphan every shared store.
        let r = root("model", None);
        let mut hs = Vec::new();
        extend(&r, &[1, 2, 3, 4, 5, 6, 7, 8, 9], 4, &mut hs);
        assert_eq!(hs.len(), 2, "only full blocks");
        assert_eq!(hs[0], block_hash(&r, &[1, 2, 3, 4]));
        assert_eq!(hs[1], block_hash(&hs[0], &[5, 6, 7, 8]));
        assert_eq!(
            hex(&r),
            hex(&Sha256::digest(
                [
                    &(VERSION.len() as u64).to_le_bytes()[..],
                    VERSION,
                    &5u64.to_le_bytes(),
                    b"model",
                    &[0],
                ]
                .concat()
            )
            .into())
        );
        // Same tokens after a different first block: a different hash.
        let mut other = Vec::new();
        extend(&r, &[0, 2, 3, 4, 5, 6, 7, 8], 4, &mut other);
        assert_ne!(other[1], hs[1]);
        // Salt and model change the root, so every block.
        assert_ne!(root("model", Some("tenant-a")), r);
        assert_ne!(
            root("model", Some("tenant-a")),
            root("model", Some("tenant-b"))
        );
        assert_ne!(root("other model", None), r);
        // No ambiguity between an empty salt and none.
        assert_ne!(root("model", Some("")), r);
    }
}
