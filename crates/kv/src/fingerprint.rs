//! Invariant (docs/design.md): before any KV crosses, both sides compare fingerprints; any
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
        // Destructured without `..`: a field added to the struct does not compile until it
        // is compared here too.
        let Fingerprint {
            format_version,
            model_sha256,
            architecture,
            n_layer,
            n_kv_head,
            head_dim,
            kv_dtype,
            block_size,
        } = self;
        let fields: [(&'static str, String, String); 8] = [
            pair("format_version", format_version, &theirs.format_version),
            pair("model_sha256", model_sha256, &theirs.model_sha256),
            pair("architecture", architecture, &theirs.architecture),
            pair("n_layer", n_layer, &theirs.n_layer),
            pair("n_kv_head", n_kv_head, &theirs.n_kv_head),
            pair("head_dim", head_dim, &theirs.head_dim),
            pair("kv_dtype", kv_dtype, &theirs.kv_dtype),
            pair("block_size", block_size, &theirs.block_size),
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

fn pair<T: ToString>(field: &'static str, ours: &T, theirs: &T) -> (&'static str, String, String) {
    (field, ours.to_string(), theirs.to_string())
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
        let e = fp()
            .check(&Fingerprint {
                block_size: 32,
                ..fp()
            })
            .expect_err("block size");
        assert_eq!(
            e.to_string(),
            "KV handshake refused: block_size differs (ours 16, theirs 32)"
        );
        // Every field, through its serialized name: a field the check skipped would pass.
        let ours = serde_json::to_value(fp()).unwrap_or_default();
        let names: Vec<String> = ours
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(names.len(), 8, "{ours}");
        for name in names {
            let mut v = ours.clone();
            let (o, t) = match &ours[&name] {
                serde_json::Value::String(s) => (s.clone(), format!("{s}x")),
                n => {
                    let n = n.as_u64().unwrap_or_default();
                    (n.to_string(), (n + 1).to_string())
                }
            };
            v[&name] = serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t.clone()));
            let theirs: Fingerprint = serde_json::from_value(v).unwrap_or_else(|_| fp());
            assert_eq!(
                fp().check(&theirs),
                Err(HandshakeError::Mismatch {
                    field: match name.as_str() {
                        "format_version" => "format_version",
                        "model_sha256" => "model_sha256",
                        "architecture" => "architecture",
                        "n_layer" => "n_layer",
                        "n_kv_head" => "n_kv_head",
                        "head_dim" => "head_dim",
                        "kv_dtype" => "kv_dtype",
                        "block_size" => "block_size",
                        other => panic!("unknown field {other}"),
                    },
                    ours: o,
                    theirs: t,
                }),
                "{name}"
            );
        }
    }

    #[test]
    fn survives_json() {
        let j = serde_json::to_string(&fp()).unwrap_or_default();
        let back: Fingerprint =
            serde_json::from_str(&j).unwrap_or_else(|_| Fingerprint { n_layer: 0, ..fp() });
        assert_eq!(back, fp());
    }
}
