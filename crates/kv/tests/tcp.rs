//! Two engines, one TCP side channel on loopback: the consumer pulls the producer's KV and
//! continues token-identical to a colocated engine; a mismatched peer is refused by name.

use std::sync::{Arc, OnceLock};

use splitserve_engine::{
    model_file, Engine, EngineConfig, Event, KvTransfer, Model, Request, SamplingParams,
};
use splitserve_kv::tcp::{pull, serve, KvError};
use splitserve_kv::{Fingerprint, HandshakeError};

fn model() -> (Arc<Model>, String) {
    static M: OnceLock<(Arc<Model>, String)> = OnceLock::new();
    M.get_or_init(|| {
        let p = model_file::default_model(false).expect("model");
        let sha = model_file::sha256_file(&p, false).expect("sha");
        (Arc::new(Model::load(&p).expect("load")), sha)
    })
    .clone()
}

fn run(
    engine: &Engine,
    id: &str,
    prompt: &[u32],
    params: &SamplingParams,
    kv: KvTransfer,
) -> Vec<u32> {
    let mut rx = engine
        .submit(Request {
            id: id.into(),
            prompt: prompt.to_vec(),
            params: params.clone(),
            return_logits: false,
            kv,
        })
        .expect("submit");
    let mut out = vec![];
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => out.push(t.token),
            Event::Finished(f) => {
                assert!(f.error.is_none(), "{:?}", f.error);
                break;
            }
        }
    }
    out
}

/// Waits (bounded) until every block of `e` is free again.
fn all_free(e: &Engine) -> bool {
    for _ in 0..500 {
        let s = e.stats();
        if s.free_blocks == s.total_blocks {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

fn producer() -> (Engine, Fingerprint, String) {
    let (m, sha) = model();
    let e = Engine::start(m.clone(), EngineConfig::default(), None).expect("engine");
    let fp = Fingerprint::new(&sha, &m.config, &e.kv_layout());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (e2, fp2) = (e.clone(), fp.clone());
    std::thread::spawn(move || serve(listener, e2, fp2, None));
    (e, fp, addr)
}

#[test]
fn pulled_over_tcp_equals_colocated() {
    let (m, sha) = model();
    let (p, _, addr) = producer();
    let d = Engine::start(m.clone(), EngineConfig::default(), None).expect("engine");
    let d_fp = Fingerprint::new(&sha, &m.config, &d.kv_layout());
    let colo = Engine::start(m.clone(), EngineConfig::default(), None).expect("engine");
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(32)
    };
    for (i, text) in [
        "The capital of France is",
        "Disaggregation ships the KV cache of each prompt.",
    ]
    .iter()
    .enumerate()
    {
        let prompt = m.tokenizer.encode(text).expect("encode");
        let reference = run(&colo, "c", &prompt, &params, KvTransfer::None);
        let id = format!("req-{i}");
        let first = run(
            &p,
            &id,
            &prompt,
            &SamplingParams {
                max_tokens: 1,
                ..params.clone()
            },
            KvTransfer::Hold,
        );
        let kv = pull(&addr, &d_fp, &id).expect("pull");
        assert_eq!(kv.generated, first);
        let got = run(&d, &id, &prompt, &params, KvTransfer::Import(Box::new(kv)));
        assert_eq!(got, reference);
    }
    assert_eq!(d.stats().prompt_tokens_computed, 0);
    // Pulled blocks were freed on the producer; a second pull of the same id is refused.
    assert_eq!(p.stats().free_blocks, p.stats().total_blocks);
    assert!(
        matches!(pull(&addr, &d_fp, "req-0"), Err(KvError::Peer(m)) if m.contains("no KV held"))
    );
}

#[test]
fn mismatched_fingerprint_is_refused_before_kv_crosses() {
    let (p, fp, addr) = producer();
    let (m, _) = model();
    let prompt = m.tokenizer.encode("Hello").expect("encode");
    run(
        &p,
        "held",
        &prompt,
        &SamplingParams::greedy(1),
        KvTransfer::Hold,
    );
    for (field, theirs) in [
        (
            "block_size",
            Fingerprint {
                block_size: 32,
                ..fp.clone()
            },
        ),
        (
            "kv_dtype",
            Fingerprint {
                kv_dtype: "f32".into(),
                ..fp.clone()
            },
        ),
        (
            "model_sha256",
            Fingerprint {
                model_sha256: "0".repeat(64),
                ..fp.clone()
            },
        ),
    ] {
        match pull(&addr, &theirs, "held") {
            Err(KvError::Handshake(HandshakeError::Mismatch { field: f, .. })) => {
                assert_eq!(f, field)
            }
            other => panic!("expected a refusal naming {field}, got {other:?}"),
        }
    }
    // The KV is still held (nothing crossed) and can be taken by a matching peer.
    assert!(p.stats().free_blocks < p.stats().total_blocks);
    let kv = pull(&addr, &fp, "held").expect("matching peer");
    assert_eq!(kv.n_tokens, prompt.len());
    assert!(all_free(&p));
}
