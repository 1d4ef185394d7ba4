//! Reading a GGUF file (architectures `llama` and `gemma3`): metadata into a [`ModelConfig`], tensors as raw bytes.
//!
//! Candle's `gguf_file` parses the header (it bounds-checks every length); we keep the raw
//! tensor bytes because the decode path runs our own quantized kernels over them.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};

use crate::error::GgufError;

/// The architectures the forward pass knows.
pub const ARCHITECTURES: [&str; 2] = ["llama", "gemma3"];

/// Local attention: every layer but each `global_every`-th (counting from 1) sees only the
/// last `window` positions, its own included (Gemma 3's interleaved pattern).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlidingWindow {
    pub window: usize,
    pub global_every: usize,
}

impl SlidingWindow {
    /// The window of `layer` (`None`: a global layer).
    pub fn of_layer(&self, layer: usize) -> Option<usize> {
        (!(layer + 1).is_multiple_of(self.global_every)).then_some(self.window)
    }
}

/// The shape of a model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub sliding_window: Option<SlidingWindow>,
}

impl ModelConfig {
    /// How many positions layer `layer` sees (`None`: all of them).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.and_then(|s| s.of_layer(layer))
    }

    /// Values of K and V stored per token over all layers.
    pub fn kv_values_per_token(&self) -> usize {
        self.n_layer * self.n_head_kv * self.head_dim * 2
    }
}

/// One tensor's type, dims (rows last-to-first as candle orders them: `[rows, cols]`) and bytes.
pub(crate) struct RawTensor {
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// A parsed GGUF file with its tensor bytes loaded.
pub(crate) struct GgufFile {
    pub path: PathBuf,
    pub metadata: HashMap<String, gguf_file::Value>,
    pub tensors: HashMap<String, RawTensor>,
    pub config: ModelConfig,
}

const MAGIC: &[u8; 4] = b"GGUF";

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let bytes = std::fs::read(path).map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, bytes)
    }

    fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, GgufError> {
        let p = || path.to_path_buf();
        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            return Err(GgufError::BadMagic {
                path: p(),
                magic: bytes.iter().take(4).copied().collect(),
            });
        }
        let mut cursor = Cursor::new(&bytes[..]);
        let content = gguf_file::Content::read(&mut cursor).map_err(|e| {
            let msg = e.to_string();
            if let Some(id) = msg.strip_prefix("unknown dtype for tensor ") {
                GgufError::UnsupportedTensorType {
                    path: p(),
                    name: "(in header)".into(),
                    ggml_type: format!("ggml type id {id}"),
                }
            } else {
                GgufError::Malformed {
                    path: p(),
                    reason: msg,
                }
            }
        })?;
        let size = bytes.len() as u64;
        let mut tensors = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            if elems % bs != 0 {
                return Err(GgufError::Malformed {
                    path: p(),
                    reason: format!(
                        "tensor {name} has {elems} elements, not a multiple of its block size {bs}"
                    ),
                });
            }
            let len = (elems / bs * info.ggml_dtype.type_size()) as u64;
            let start = content.tensor_data_offset.saturating_add(info.offset);
            let end = start.saturating_add(len);
            if end > size {
                return Err(GgufError::Truncated {
                    path: p(),
                    name: name.clone(),
                    needed: end,
                    size,
                });
            }
            tensors.insert(
                name.clone(),
                RawTensor {
                    dtype: info.ggml_dtype,
                    dims: info.shape.dims().to_vec(),
                    data: bytes[start as usize..end as usize].to_vec(),
                },
            );
        }
        let config = read_config(path, &content.metadata, &tensors)?;
        Ok(Self {
            path: p(),
            metadata: content.metadata,
            tensors,
            config,
        })
    }

    /// Takes a tensor out, checking its shape.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<RawTensor, GgufError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        if t.dims != expected {
            return Err(GgufError::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                found: t.dims,
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(gguf_file::Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }
}

fn meta_usize(
    path: &Path,
    md: &HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<usize, GgufError> {
    let v = md.get(key).ok_or_else(|| GgufError::MissingMetadata {
        path: path.to_path_buf(),
        key: key.to_string(),
    })?;
    v.to_u64()
        .map(|x| x as usize)
        .or_else(|_| v.to_u32().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as usize))
        .map_err(|e| GgufError::BadMetadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason: e.to_string(),
        })
}

fn meta_f32(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<f32> {
    md.get(key).and_then(|v| v.to_f32().ok())
}

fn read_config(
    path: &Path,
    md: &HashMap<String, gguf_file::Value>,
    tensors: &HashMap<String, RawTensor>,
) -> Result<ModelConfig, GgufError> {
    let arch = match md.get("general.architecture") {
        Some(gguf_file::Value::String(s)) => s.clone(),
        _ => {
            return Err(GgufError::MissingMetadata {
                path: path.to_path_buf(),
                key: "general.architecture".into(),
            })
        }
    };
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(GgufError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            arch,
        });
    }
    let k = |s: &str| format!("{arch}.{s}");
    let n_embd = meta_usize(path, md, &k("embedding_length"))?;
    let n_head = meta_usize(path, md, &k("attention.head_count"))?;
    let n_head_kv = md
        .get(&k("attention.head_count_kv"))
        .map(|_| meta_usize(path, md, &k("attention.head_count_kv")))
        .transpose()?
        .unwrap_or(n_head);
    let bad = |key: String, reason: String| GgufError::BadMetadata {
        path: path.to_path_buf(),
        key,
        reason,
    };
    // Gemma's heads are wider than the embedding divided by the head count.
    let key_length = md
        .get(&k("attention.key_length"))
        .map(|_| meta_usize(path, md, &k("attention.key_length")))
        .transpose()?;
    if n_head == 0
        || n_head_kv == 0
        || (key_length.is_none() && n_embd % n_head != 0)
        || n_head % n_head_kv != 0
    {
        return Err(bad(
            k("attention.head_count"),
            format!("{n_head} heads / {n_head_kv} KV heads do not divide embedding {n_embd}"),
        ));
    }
    let head_dim = key_length.unwrap_or(n_embd / n_head);
    if let Some(v) = md.get(&k("attention.value_length")) {
        let v = meta_usize(path, md, &k("attention.value_length"))
            .map_err(|_| bad(k("attention.value_length"), format!("{v:?} is not a count")))?;
        if v != head_dim {
            return Err(bad(
                k("attention.value_length"),
                format!("value heads of {v} differ from key heads of {head_dim}"),
            ));
        }
    }
    if head_dim == 0 || head_dim % 2 != 0 || head_dim > 1024 {
        return Err(bad(
            k("embedding_length"),
            format!("head dim {head_dim} is not even and at most 1024"),
        ));
    }
    let vocab_size = tensors
        .get("token_embd.weight")
        .map(|t| t.dims[0])
        .ok_or_else(|| GgufError::MissingTensor {
            path: path.to_path_buf(),
            name: "token_embd.weight".into(),
        })?;
    let sliding_window = if arch == "gemma3" {
        let window = meta_usize(path, md, &k("attention.sliding_window"))?;
        if window == 0 {
            return Err(bad(k("attention.sliding_window"), "zero".into()));
        }
        // Fixed for the architecture in the reference implementations, not in the file.
        Some(SlidingWindow {
            window,
            global_every: 6,
        })
    } else {
        None
    };
    let rms_default = if arch == "gemma3" { 1e-6 } else { 1e-5 };
    Ok(ModelConfig {
        sliding_window,
        n_layer: meta_usize(path, md, &k("block_count"))?,
        n_embd,
        n_ff: meta_usize(path, md, &k("feed_forward_length"))?,
        n_head,
        n_head_kv,
        head_dim,
        rope_base: meta_f32(md, &k("rope.freq_base")).unwrap_or(10_000.0),
        rms_eps: meta_f32(md, &k("attention.layer_norm_rms_epsilon")).unwrap_or(rms_default),
        context_length: meta_usize(path, md, &k("context_length"))?,
        vocab_size,
        architecture: arch,
    })
}

/// Reads a GGUF's model shape and parameter count without building the model.
pub fn inspect(path: &Path) -> Result<(ModelConfig, u64), GgufError> {
    let g = GgufFile::open(path)?;
    let params = g
        .tensors
        .values()
        .map(|t| t.dims.iter().product::<usize>() as u64)
        .sum();
    Ok((g.config, params))
}
