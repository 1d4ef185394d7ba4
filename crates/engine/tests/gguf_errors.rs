//! Broken model files give a clear error naming the file and the problem, never a panic.

mod common;

use splitserve_engine::{GgufError, Model};

fn tiny_bytes() -> (std::path::PathBuf, Vec<u8>) {
    let p = common::tiny_model_path("ok.gguf");
    let b = std::fs::read(&p).expect("read");
    (p, b)
}

fn write(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = common::tiny_model_path("scratch.gguf").with_file_name(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

fn load_err(p: &std::path::Path) -> GgufError {
    match Model::load(p) {
        Ok(_) => panic!("{} loaded but should not", p.display()),
        Err(e) => e,
    }
}

#[test]
fn tiny_model_loads() {
    let (p, _) = tiny_bytes();
    let m = Model::load(&p).expect("tiny model loads");
    assert_eq!(m.config.n_layer, 2);
    assert_eq!(m.config.n_head_kv, 2);
    assert_eq!(m.config.head_dim, 16);
    assert_eq!(
        m.tokenizer.encode("<|im_start|> the").expect("encode")[0],
        1
    );
}

#[test]
fn missing_file() {
    let e = load_err(std::path::Path::new("/nonexistent/model.gguf"));
    assert!(matches!(e, GgufError::Open { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/model.gguf"));
}

#[test]
fn wrong_magic_and_empty_file() {
    let (_, mut b) = tiny_bytes();
    b[..4].copy_from_slice(b"GGML");
    let p = write("magic.gguf", &b);
    let e = load_err(&p);
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    assert!(
        e.to_string().contains("magic.gguf") && e.to_string().contains("not a GGUF file"),
        "{e}"
    );
    let p = write("empty.gguf", &[]);
    assert!(matches!(load_err(&p), GgufError::BadMagic { .. }));
}

#[test]
fn truncated_file_names_a_tensor() {
    let (_, b) = tiny_bytes();
    let p = write("cut.gguf", &b[..b.len() - 100]);
    let e = load_err(&p);
    match &e {
        GgufError::Truncated {
            name, needed, size, ..
        } => {
            assert!(!name.is_empty());
            assert!(needed > size);
            assert_eq!(*size as usize, b.len() - 100);
        }
        other => panic!("expected Truncated, got {other}"),
    }
    // Cut inside the header: a malformed-header error, not a panic.
    let p = write("cut-header.gguf", &b[..200]);
    let e = load_err(&p);
    assert!(matches!(e, GgufError::Malformed { .. }), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let (_, mut b) = tiny_bytes();
    let at = find(&b, b"blk.1.ffn_up.weight");
    b[at..at + 19].copy_from_slice(b"blk.1.ffn_XX.weight");
    let e = load_err(&write("missing.gguf", &b));
    match &e {
        GgufError::MissingTensor { name, .. } => assert_eq!(name, "blk.1.ffn_up.weight"),
        other => panic!("expected MissingTensor, got {other}"),
    }
}

/// Where the type of tensor `blk.0.ffn_up.weight` lies in the file: GGUF v2 tensor info
/// is the name, u32 n_dims (2), 2 × u64 dims, then the u32 type.
fn ffn_up_type_at(b: &[u8]) -> usize {
    let name = b"blk.0.ffn_up.weight";
    find(b, name) + name.len() + 4 + 16
}

#[test]
fn unsupported_tensor_type_is_named() {
    let (_, mut b) = tiny_bytes();
    let ty = ffn_up_type_at(&b);
    b[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = load_err(&write("type.gguf", &b));
    assert!(matches!(e, GgufError::UnsupportedTensorType { .. }), "{e}");
    assert!(e.to_string().contains("99"), "{e}");
}

#[test]
fn unsupported_architecture_is_named() {
    let (_, mut b) = tiny_bytes();
    let key = find(&b, b"general.architecture");
    let at = key + find(&b[key..], b"llama");
    b[at..at + 5].copy_from_slice(b"mamba");
    let e = load_err(&write("arch.gguf", &b));
    match &e {
        GgufError::UnsupportedArchitecture { arch, .. } => assert_eq!(arch, "mamba"),
        other => panic!("expected UnsupportedArchitecture, got {other}"),
    }
}

/// A weight type our kernels do not run (here F16) is refused at load, naming the tensor and
/// the type, unless the slow f32 path is asked for.
#[test]
fn weights_the_kernels_lack_are_refused_unless_allowed() {
    let (_, mut b) = tiny_bytes();
    let ty = ffn_up_type_at(&b);
    assert_eq!(b[ty..ty + 4], 3u32.to_le_bytes(), "Q4_1 in the tiny model");
    b[ty..ty + 4].copy_from_slice(&1u32.to_le_bytes());
    let p = write("f16.gguf", &b);
    let e = load_err(&p);
    match &e {
        GgufError::UnsupportedTensorType {
            name, ggml_type, ..
        } => assert_eq!(
            (name.as_str(), ggml_type.as_str()),
            ("blk.0.ffn_up.weight", "F16")
        ),
        other => panic!("expected UnsupportedTensorType, got {other}"),
    }
    assert!(e.to_string().contains("--allow-f32-weights"), "{e}");
    let opts = splitserve_engine::LoadOptions {
        allow_f32_weights: true,
    };
    Model::load_with(&p, opts).expect("the f32 path loads it");
}
