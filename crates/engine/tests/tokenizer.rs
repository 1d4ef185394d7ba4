//! The tokenizer built from the GGUF reproduces llama.cpp's ids exactly.

mod common;

use splitserve_engine::ChatMessage;

#[derive(serde::Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}
#[derive(serde::Deserialize)]
struct Vector {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn matches_llama_cpp_reference_ids() {
    let model = common::real_model();
    let raw = include_str!("data/tokenizer-vectors.json");
    let v: Vectors = serde_json::from_str(raw).expect("vectors json");
    assert_eq!(v.vectors.len(), 3);
    for case in v.vectors {
        let ids = model.tokenizer.encode(&case.text).expect("encode");
        assert_eq!(ids, case.ids, "text {:?}", case.text);
        // Decoding without skipping specials gives the text back.
        assert_eq!(
            model.tokenizer.decode(&ids, false).expect("decode"),
            case.text
        );
    }
}

#[test]
fn special_tokens_are_single_ids_and_no_bos_is_added() {
    let t = &common::real_model().tokenizer;
    assert_eq!(t.encode("<|im_start|>").expect("encode"), vec![1]);
    assert_eq!(t.encode("<|im_end|>").expect("encode"), vec![2]);
    assert_eq!(t.encode("Hello").expect("encode").first(), Some(&19556));
    assert_eq!(t.eos_id(), Some(2));
    assert_eq!(t.vocab_size(), 49152);
}

#[test]
fn chat_template_from_gguf() {
    let t = &common::real_model().tokenizer;
    let text = t
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "What is the KV cache?".into(),
            }],
            true,
        )
        .expect("template");
    // SmolLM2's template adds its default system prompt when none is given.
    assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    assert!(
        text.ends_with(
            "<|im_start|>user\nWhat is the KV cache?<|im_end|>\n<|im_start|>assistant\n"
        ),
        "{text}"
    );
    let ids = t.encode(&text).expect("encode");
    assert_eq!(
        &ids[ids.len() - 16..],
        &[1, 4093, 198, 1780, 314, 260, 659, 70, 13842, 47, 2, 198, 1, 520, 9531, 198]
    );
}
