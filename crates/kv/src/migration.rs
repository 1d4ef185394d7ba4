//! The unit a live request travels in between engines (one HTTP body), version 1.
//! Every integer is little-endian.
//!
//! ```text
//! unit   := magic "SSMG" (4) | version u16 | header_len u32 | header | n_layers u32
//!           | n_layers × (len u64 | len bytes: each block's K then V, in position order)
//! header := JSON {"fingerprint": {...}, "state": {...}}  — self-describing: the receiver
//!           checks the fingerprint before it looks at any KV byte
//! ```
//!
//! Decoding checks every length against what is there; bad bytes give a
//! [`MigrationError`], never a panic.

use serde::{Deserialize, Serialize};
use splitserve_engine::{LiveState, Migration};

use crate::Fingerprint;

pub const MAGIC: &[u8; 4] = b"SSMG";
pub const VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationError {
    #[error("not a migration unit: bad magic {0:02x?} (expected \"SSMG\")")]
    BadMagic(Vec<u8>),
    #[error("unsupported migration format version {0} (we speak {VERSION})")]
    Version(u16),
    #[error("migration unit truncated: {0}")]
    Truncated(&'static str),
    #[error("malformed migration header: {0}")]
    Header(String),
    #[error("{0} trailing bytes after the last layer")]
    Trailing(usize),
}

#[derive(Serialize, Deserialize)]
struct Header {
    fingerprint: Fingerprint,
    state: LiveState,
}

/// Serializes a parked request with the fingerprint of the engine it comes from.
pub fn encode(fingerprint: &Fingerprint, m: &Migration) -> Vec<u8> {
    let header = serde_json::to_vec(&Header {
        fingerprint: fingerprint.clone(),
        state: m.state.clone(),
    })
    .unwrap_or_default();
    let kv: usize = m.layers.iter().map(|l| 8 + l.len()).sum();
    let mut out = Vec::with_capacity(14 + header.len() + kv);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&(m.layers.len() as u32).to_le_bytes());
    for l in &m.layers {
        out.extend_from_slice(&(l.len() as u64).to_le_bytes());
        out.extend_from_slice(l);
    }
    out
}

/// Reads a unit back: the sender's fingerprint and the request.
pub fn decode(b: &[u8]) -> Result<(Fingerprint, Migration), MigrationError> {
    let mut r = Reader { b, at: 0 };
    let magic = r.take(4, "magic")?;
    if magic != MAGIC {
        return Err(MigrationError::BadMagic(magic.to_vec()));
    }
    let version = u16::from_le_bytes([r.take(1, "version")?[0], r.take(1, "version")?[0]]);
    if version != VERSION {
        return Err(MigrationError::Version(version));
    }
    let hlen = r.u32("header length")? as usize;
    let h: Header = serde_json::from_slice(r.take(hlen, "header")?)
        .map_err(|e| MigrationError::Header(e.to_string()))?;
    let n = r.u32("layer count")? as usize;
    // Bounded by what is there: each layer needs at least its 8-byte length.
    if n > (b.len() - r.at) / 8 {
        return Err(MigrationError::Truncated("layers"));
    }
    let mut layers = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.u64("layer length")?;
        let len = usize::try_from(len).map_err(|_| MigrationError::Truncated("layer"))?;
        layers.push(r.take(len, "layer")?.to_vec());
    }
    if r.at != b.len() {
        return Err(MigrationError::Trailing(b.len() - r.at));
    }
    Ok((
        h.fingerprint,
        Migration {
            state: h.state,
            layers,
        },
    ))
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], MigrationError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(MigrationError::Truncated(what))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, MigrationError> {
        let x = self.take(4, what)?;
        Ok(u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, MigrationError> {
        let x = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(x);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitserve_engine::{IncrementalDecoder, Sampler, SamplingParams};

    fn fp() -> Fingerprint {
        Fingerprint {
            format_version: 1,
            model_sha256: "ab".into(),
            architecture: "llama".into(),
            n_layer: 2,
            n_kv_head: 1,
            head_dim: 4,
            kv_dtype: "f16".into(),
            block_size: 16,
        }
    }

    fn unit() -> Migration {
        Migration {
            state: LiveState {
                id: "r-0".into(),
                prompt_len: 3,
                tokens: vec![1, 2, 3, 4],
                kv_tokens: 3,
                params: SamplingParams::greedy(8),
                sampler: Sampler::new(7),
                detok: IncrementalDecoder::default(),
                text: "x".into(),
                sent: 1,
                return_logits: false,
            },
            layers: vec![vec![1, 2, 3], vec![4, 5, 6]],
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let bytes = encode(&fp(), &unit());
        let (f, m) = decode(&bytes).expect("decode");
        assert_eq!(f, fp());
        assert_eq!(m.layers, unit().layers);
        assert_eq!(m.state.tokens, vec![1, 2, 3, 4]);
        assert_eq!(m.state.sent, 1);
        assert_eq!(encode(&f, &m), bytes, "byte-identical re-encoding");
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error() {
        let bytes = encode(&fp(), &unit());
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix of {n} bytes accepted");
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(MigrationError::BadMagic(_))));
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert_eq!(decode(&v2).err(), Some(MigrationError::Version(2)));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long).err(), Some(MigrationError::Trailing(1)));
        // A huge layer length is refused without allocating it.
        let n = bytes.len();
        let mut huge = bytes[..n - 3 - 8].to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            decode(&huge).err(),
            Some(MigrationError::Truncated("layer"))
        );
    }
}
