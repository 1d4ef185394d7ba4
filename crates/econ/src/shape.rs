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
    /// Layers that see only the last `window` positions (Gemma 3's local layers), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

/// Sliding-window attention: `layers` of the model's layers see only the last `positions`
/// positions, so their KV is kept (and shipped) only for those.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    pub positions: u64,
    pub layers: u64,
}

impl ModelShape {
    /// Bytes of K and V per token: layers × KV heads × 2 × the bytes of one head's values.
    pub fn kv_bytes_per_token(&self, f: KvFormat) -> u64 {
        self.layers * self.layer_bytes_per_token(f)
    }

    /// Bytes of K and V per token in one layer.
    pub fn layer_bytes_per_token(&self, f: KvFormat) -> u64 {
        self.kv_heads * 2 * self.head_dim.div_ceil(f.group) * f.group_bytes
    }

    /// Layers with a window, and the positions they see (0 and 0: none).
    fn windowed(&self) -> (u64, u64) {
        self.window
            .map_or((0, 0), |w| (w.layers.min(self.layers), w.positions))
    }

    /// Query-key pairs of a causal prefill of `n` tokens, summed over layers: `n²/2` in a
    /// global layer, `n·w − w²/2` in one with a window of `w < n`.
    pub fn attention_pairs(&self, n: f64) -> f64 {
        let (wl, w) = self.windowed();
        let w = w as f64;
        let windowed = if n <= w {
            n * n / 2.0
        } else {
            n * w - w * w / 2.0
        };
        (self.layers - wl) as f64 * n * n / 2.0 + wl as f64 * windowed
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
        window: None,
    };
    vec![
        s("SmolLM2-135M", 30, 3, 64, 9, 134_515_008),
        s("Qwen2.5-0.5B", 24, 2, 64, 14, 494_032_768),
        s("Llama-3.1-8B", 32, 8, 128, 32, 8_030_261_248),
        s("Llama-3.1-70B", 80, 8, 128, 64, 70_553_706_496),
        // 15 of its 18 layers see the last 512 positions (every sixth is global).
        ModelShape {
            window: Some(Window {
                positions: 512,
                layers: 15,
            }),
            ..s("Gemma-3-270M", 18, 1, 256, 4, 268_098_176)
        },
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
    /// Of `blocks`, those the windowed layers keep (none without a window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_blocks: Option<u64>,
}

/// A prompt's KV. Windowed layers keep what the window of the position after the prompt
/// reaches, as the engine ships it: its positions, and the blocks from the one holding
/// position `tokens - window` on.
pub fn freight(shape: &ModelShape, kv: KvFormat, tokens: u64, block_size: u64) -> Freight {
    let bs = block_size.max(1);
    let per_layer = shape.layer_bytes_per_token(kv);
    let blocks = tokens.div_ceil(bs);
    let (wl, w) = shape.windowed();
    let global = shape.layers - wl;
    let (w_tokens, w_blocks) = if wl > 0 {
        (tokens.min(w), blocks - tokens.saturating_sub(w) / bs)
    } else {
        (tokens, blocks)
    };
    Freight {
        tokens,
        bytes_per_token: shape.kv_bytes_per_token(kv),
        bytes: per_layer * (global * tokens + wl * w_tokens),
        block_size,
        blocks,
        block_bytes: per_layer * bs * (global * blocks + wl * w_blocks),
        window_blocks: (wl > 0).then_some(w_blocks),
    }
}

pub const MIB: f64 = 1024.0 * 1024.0;

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma 3 270M: 15 of 18 layers see 512 positions. A 1,503-token prompt keeps 33 of
    /// its 94 blocks in those layers (from the one holding position 991), as the engine
    /// ships it; the attention pairs of a windowed layer stop growing as n².
    #[test]
    fn windowed_layers_keep_only_the_window() {
        let g = ModelShape {
            name: "gemma-3-270m".into(),
            layers: 18,
            kv_heads: 1,
            head_dim: 256,
            heads: 4,
            params: 0,
            window: Some(Window {
                positions: 512,
                layers: 15,
            }),
        };
        let f = freight(&g, KvFormat::F16, 1503, 16);
        assert_eq!(f.blocks, 94);
        assert_eq!(f.window_blocks, Some(33));
        assert_eq!(f.bytes_per_token, 18 * 1024);
        assert_eq!(f.bytes, 1024 * (3 * 1503 + 15 * 512));
        assert_eq!(f.block_bytes, 16_384 * (3 * 94 + 15 * 33));
        let short = freight(&g, KvFormat::F16, 500, 16);
        assert_eq!(short.block_bytes, 16_384 * 18 * 32);
        assert_eq!(
            g.attention_pairs(1000.0),
            3.0 * 500_000.0 + 15.0 * 380_928.0
        );
        assert_eq!(g.attention_pairs(400.0), 18.0 * 80_000.0);
    }

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
