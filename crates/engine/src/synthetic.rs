//! A tiny Llama-architecture GGUF with random weights, written on the spot: fast tests of
//! loading, scheduling and serving that do not need the real model's numbers.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Shape of the synthetic model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub context_length: usize,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            n_layer: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            context_length: 512,
            seed: 1,
        }
    }
}

/// GPT-2's byte-to-character table, so that byte-level BPE covers every byte.
fn byte_chars() -> Vec<char> {
    let mut n = 0u32;
    (0u32..256)
        .map(|b| {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            if printable {
                char::from_u32(b).unwrap_or('?')
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('?')
            }
        })
        .collect()
}

fn random(shape: (usize, usize), seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..shape.0 * shape.1)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// Writes the tiny model to `path`. Vocabulary: `<|endoftext|>`, `<|im_start|>`,
/// `<|im_end|>`, the 256 bytes, and a few merges.
pub fn write_tiny_model(path: &Path, spec: &TinySpec) -> Result<(), String> {
    let e = |x: candle_core::Error| x.to_string();
    let chars = byte_chars();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3i32, 3, 3];
    for c in &chars {
        tokens.push(c.to_string());
        types.push(1);
    }
    let sp = chars[b' ' as usize];
    let merges: Vec<String> = vec![format!("{sp} t"), "h e".into(), format!("{sp}t he")];
    tokens.extend([format!("{sp}t"), "he".into(), format!("{sp}the")]);
    types.extend([1, 1, 1]);
    let vocab = tokens.len().div_ceil(32) * 32;
    while tokens.len() < vocab {
        tokens.push(format!("<pad{}>", tokens.len()));
        types.push(4);
    }
    let s = spec;
    let head_dim = s.n_embd / s.n_head;
    let kvd = s.n_head_kv * head_dim;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut seed = s.seed;
    let mut add = |name: String,
                   rows: usize,
                   cols: usize,
                   dtype: GgmlDType,
                   scale: f32|
     -> Result<(), String> {
        seed += 1;
        let data = if rows == 1 {
            vec![1.0f32; cols]
        } else {
            random((rows, cols), seed, scale)
        };
        let t = if rows == 1 {
            Tensor::from_vec(data, cols, &Device::Cpu).map_err(e)?
        } else {
            Tensor::from_vec(data, (rows, cols), &Device::Cpu).map_err(e)?
        };
        tensors.push((name, QTensor::quantize(&t, dtype).map_err(e)?));
        Ok(())
    };
    add(
        "token_embd.weight".into(),
        vocab,
        s.n_embd,
        GgmlDType::Q8_0,
        1.0,
    )?;
    add(
        "output_norm.weight".into(),
        1,
        s.n_embd,
        GgmlDType::F32,
        1.0,
    )?;
    for i in 0..s.n_layer {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        let w = 1.0 / (s.n_embd as f32).sqrt();
        add(n("attn_norm"), 1, s.n_embd, GgmlDType::F32, 1.0)?;
        add(n("attn_q"), s.n_embd, s.n_embd, GgmlDType::Q4_1, w)?;
        add(n("attn_k"), kvd, s.n_embd, GgmlDType::Q4_1, w)?;
        add(n("attn_v"), kvd, s.n_embd, GgmlDType::Q4_1, w)?;
        add(n("attn_output"), s.n_embd, s.n_embd, GgmlDType::Q4_1, w)?;
        add(n("ffn_norm"), 1, s.n_embd, GgmlDType::F32, 1.0)?;
        add(n("ffn_gate"), s.n_ff, s.n_embd, GgmlDType::Q4_1, w)?;
        add(n("ffn_up"), s.n_ff, s.n_embd, GgmlDType::Q4_1, w)?;
        add(
            n("ffn_down"),
            s.n_embd,
            s.n_ff,
            GgmlDType::Q4_1,
            1.0 / (s.n_ff as f32).sqrt(),
        )?;
    }
    let u32v = |x: usize| Value::U32(x as u32);
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("splitserve-tiny".into())),
        ("llama.block_count", u32v(s.n_layer)),
        ("llama.embedding_length", u32v(s.n_embd)),
        ("llama.feed_forward_length", u32v(s.n_ff)),
        ("llama.attention.head_count", u32v(s.n_head)),
        ("llama.attention.head_count_kv", u32v(s.n_head_kv)),
        ("llama.context_length", u32v(s.context_length)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).map_err(|x| x.to_string())?;
    gguf_file::write(&mut f, &md_refs, &t_refs).map_err(e)
}
