//! DESIGN.md invariant: before any KV crosses, both sides compare fingerprints; any
//! difference is refused with an error naming the field and both values.

use serde::{Deserialize, Serialize};
use splitserve_engine::{KvLayout, ModelConfig};

/// Version of our KV wire format; part of the fingerprint.
pub const FORMAT_VERSION: u32 = 1;

/// Everything that must match for one engine's KV blocks to mean the same to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub format_version: u32,
    pub model_sha256: String,
    pub architecture: String,
    pub n_layer: u32,
    pub n_kv_head: u32,
    pub head_dim: u32,
    pub kv_dtype: String,
    pub block_size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("KV handshake refused: {field} differs (ours {ours}, theirs {theirs})")]
    Mismatch {
        field: &'static str,
        ours: String,
        theirs: String,
    },
}

impl Fingerprint {
    pub fn new(model_sha256: &str, config: &ModelConfig, layout: &KvLayout) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            model_sha256: model_sha256.to_string(),
            architecture: config.architecture.clone(),
            n_layer: layout.n_layer as u32,
            n_kv_head: layout.n_kv_head as u32,
            head_dim: layout.head_dim as u32,
            kv_dtype: layout.dtype.to_string(),
            block_size: layout.block_size as u32,
        }
    }

    /// Accepts `theirs` only if every field equals ours; the first difference is named.
    pub fn check(&self, theirs: &Fingerprint) -> Result<(), HandshakeError> {
        let fields: [(&'static str, String, String); 8] = [
            (
                "format_version",
                self.format_version.to_string(),
                theirs.format_version.to_string(),
            ),
            (
                "model_sha256",
                self.model_sha256.clone(),
                theirs.model_sha256.clone(),
            ),
            (
                "architecture",
                self.architecture.clone(),
                theirs.architecture.clone(),
            ),
            (
                "n_layer",
                self.n_layer.to_string(),
                theirs.n_layer.to_string(),
            ),
            (
                "n_kv_head",
                self.n_kv_head.to_string(),
                theirs.n_kv_head.to_string(),
            ),
            (
                "head_dim",
                self.head_dim.to_string(),
                theirs.head_dim.to_string(),
            ),
            ("kv_dtype", self.kv_dtype.clone(), theirs.kv_dtype.clone()),
            (
                "block_size",
                self.block_size.to_string(),
                theirs.block_size.to_string(),
            ),
        ];
        for (field, ours, theirs) in fields {
            if ours != theirs {
                return Err(HandshakeError::Mismatch {
                    field,
                    ours,
                    theirs,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprint {
        Fingerprint {
            format_version: FORMAT_VERSION,
            model_sha256: "b179c952".into(),
            architecture: "llama".into(),
            n_layer: 30,
            n_kv_head: 3,
            head_dim: 64,
            kv_dtype: "f16".into(),
            block_size: 16,
        }
    }

    #[test]
    fn equal_fingerprints_pass() {
        assert_eq!(fp().check(&fp()), Ok(()));
    }

    #[test]
    fn each_difference_is_named_with_both_values() {
        let mut t = fp();
        t.block_size = 32;
        let e = fp().check(&t).expect_err("block size");
        assert_eq!(
            e.to_string(),
            "KV handshake refused: block_size differs (ours 16, theirs 32)"
        );
        let mut t = fp();
        t.kv_dtype = "f32".into();
        assert_eq!(
            fp().check(&t),
            Err(HandshakeError::Mismatch {
                field: "kv_dtype",
                ours: "f16".into(),
                theirs: "f32".into()
            })
        );
        let mut t = fp();
        t.model_sha256 = "00ff".into();
        assert!(matches!(
            fp().check(&t),
            Err(HandshakeError::Mismatch {
                field: "model_sha256",
                ..
            })
        ));
    }

    #[test]
    fn survives_json() {
        let j = serde_json::to_string(&fp()).unwrap_or_default();
        let back: Fingerprint =
            serde_json::from_str(&j).unwrap_or_else(|_| Fingerprint { n_layer: 0, ..fp() });
        assert_eq!(back, fp());
    }
}
