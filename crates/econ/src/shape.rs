//! Model shapes and the KV freight of a prompt.

use serde::Serialize;

/// The numbers of a model that decide its KV size and compute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub name: String,
    pub layers: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Query heads (attention FLOPs).
    pub heads: u64,
    /// Total parameters (for the FLOPs estimate of prefill).
    pub params: u64,
}

impl ModelShape {
    /// Bytes of K and V per token: layers × KV heads × 2 × the bytes of one head's values.
    pub fn kv_bytes_per_token(&self, f: KvFormat) -> u64 {
        self.layers * self.kv_heads * 2 * self.head_dim.div_ceil(f.group) * f.group_bytes
    }
}

/// How KV values are stored: `group_bytes` bytes for every `group` values of a head (1 and
/// 2 for f16; 32 and 34 for llama.cpp's q8_0, whose groups carry an f16 scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KvFormat {
    pub group: u64,
    pub group_bytes: u64,
}

impl KvFormat {
    pub const F16: Self = Self::per_value(2);

    const fn per_value(bytes: u64) -> Self {
        Self {
            group: 1,
            group_bytes: bytes,
        }
    }
}

/// Published shapes (config.json of each model).
pub fn presets() -> Vec<ModelShape> {
    let s = |name: &str, layers, kv_heads, head_dim, heads, params| ModelShape {
        name: name.into(),
        layers,
        kv_heads,
        head_dim,
        heads,
        params,
    };
    vec![
        s("SmolLM2-135M", 30, 3, 64, 9, 134_515_008),
        s("Qwen2.5-0.5B", 24, 2, 64, 14, 494_032_768),
        s("Llama-3.1-8B", 32, 8, 128, 32, 8_030_261_248),
        s("Llama-3.1-70B", 80, 8, 128, 64, 70_553_706_496),
    ]
}

pub fn preset(name: &str) -> Option<ModelShape> {
    presets()
        .into_iter()
        .find(|p| p.name.eq_ignore_ascii_case(name))
}

/// The storage format a KV dtype name stands for.
pub fn kv_format(name: &str) -> Option<KvFormat> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Some(KvFormat::per_value(4)),
        "f16" | "fp16" | "bf16" | "float16" | "bfloat16" => Some(KvFormat::F16),
        "fp8" | "int8" => Some(KvFormat::per_value(1)),
        "q8_0" => Some(KvFormat {
            group: 32,
            group_bytes: 34,
        }),
        _ => None,
    }
}

/// What one prompt's KV weighs on the wire.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Freight {
    pub tokens: u64,
    pub bytes_per_token: u64,
    /// Exact bytes of the prompt's tokens.
    pub bytes: u64,
    pub block_size: u64,
    pub blocks: u64,
    /// Bytes of the whole blocks that carry them (what a paged transfer moves).
    pub block_bytes: u64,
}

pub fn freight(shape: &ModelShape, kv: KvFormat, tokens: u64, block_size: u64) -> Freight {
    let per = shape.kv_bytes_per_token(kv);
    let blocks = tokens.div_ceil(block_size.max(1));
    Freight {
        tokens,
        bytes_per_token: per,
        bytes: per * tokens,
        block_size,
        blocks,
        block_bytes: per * blocks * block_size,
    }
}

pub const MIB: f64 = 1024.0 * 1024.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_8b_2048_tokens_fp16_is_256_mib() {
        let s = preset("llama-3.1-8b").expect("preset");
        assert_eq!(s.kv_bytes_per_token(KvFormat::F16), 131_072); // 128 KiB per token
        let f = freight(&s, KvFormat::F16, 2048, 16);
        assert_eq!(f.bytes as f64 / MIB, 256.0);
        assert_eq!(f.blocks, 128);
        assert_eq!(f.block_bytes, f.bytes);
    }

    #[test]
    fn smollm_matches_model_md() {
        let s = preset("SmolLM2-135M").expect("preset");
        let f32 = kv_format("f32").expect("f32");
        // 30 layers × 3 KV heads × K and V × 2 groups of 34 bytes: the engine's q8_0 block
        // of 16 tokens is 195,840 bytes.
        let q8 = kv_format("q8_0").expect("q8_0");
        assert_eq!(s.kv_bytes_per_token(KvFormat::F16), 23_040); // 22.5 KiB
        assert_eq!(s.kv_bytes_per_token(f32), 46_080); // 45 KiB
        assert_eq!(s.kv_bytes_per_token(q8), 12_240);
        let f = freight(&s, KvFormat::F16, 100, 16);
        assert_eq!(f.blocks, 7);
        assert_eq!(f.block_bytes, 23_040 * 112);
    }
}
