//! Two engines, one TCP side channel on loopback: the consumer's `TcpConnector` loads the
//! producer's KV straight into its blocks and the request continues token-identical to a
//! colocated engine; a mismatched peer is refused by name before any KV crosses; a grant is
//! served once; in TLS, a consumer that does not trust the producer's certificate gets
//! nothing and the grant stays for one that does.

use std::sync::{Arc, OnceLock};

use splitserve_engine::{
    model_file, Engine, EngineConfig, EngineError, Event, KvDtype, KvTransfer, Model, RemoteKv,
    Request, SamplingParams,
};
use splitserve_kv::tcp::SideChannel;
use splitserve_kv::tls::Tls;
use splitserve_kv::{Fingerprint, Grants, KvTransferParams, RemoteAddr, Secret, TcpConnector};

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
    try_run(engine, id, prompt, params, kv).expect("request ok")
}

fn try_run(
    engine: &Engine,
    id: &str,
    prompt: &[u32],
    params: &SamplingParams,
    kv: KvTransfer,
) -> Result<Vec<u32>, EngineError> {
    try_run_logits(engine, id, prompt, params, kv).map(|(tokens, _)| tokens)
}

/// Each token's logits as bits: `None` for a token this engine did not compute (the
/// producer's first token, carried with the KV).
type LogitBits = Vec<Option<Vec<u32>>>;

fn try_run_logits(
    engine: &Engine,
    id: &str,
    prompt: &[u32],
    params: &SamplingParams,
    kv: KvTransfer,
) -> Result<(Vec<u32>, LogitBits), EngineError> {
    let mut rx = engine
        .submit(Request {
            id: id.into(),
            prompt: prompt.to_vec(),
            params: params.clone(),
            return_logits: true,
            kv,
            cache_salt: None,

            resumed: 0,
        })
        .expect("submit");
    let (mut out, mut bits) = (vec![], vec![]);
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => {
                out.push(t.token);
                bits.push(t.logits.map(|l| l.iter().map(|x| x.to_bits()).collect()));
            }
            Event::Finished(f) => match f.error {
                Some(e) => return Err(e),
                None => break,
            },
        }
    }
    Ok((out, bits))
}

/// A consumer engine whose connector speaks with fingerprint `fp` and holds `secret`.
fn consumer_with(fp: Fingerprint, secret: Secret, cfg: EngineConfig) -> Engine {
    let (m, _) = model();
    let c = Arc::new(TcpConnector::new(fp, secret, None, None));
    Engine::start_with(m, cfg, None, Some(c)).expect("engine")
}

fn consumer(fp: Fingerprint, g: &Grants, cfg: EngineConfig) -> Engine {
    consumer_with(fp, g.secret().clone(), cfg)
}

/// The signed params of a fresh grant of `id`'s held KV.
fn grant(g: &Grants, id: &str, first: Option<&[u32]>) -> serde_json::Value {
    let mut p = g
        .issue(id, std::time::Duration::from_secs(30))
        .expect("grant");
    p["do_remote_prefill"] = true.into();
    if let Some(f) = first {
        p["first_token_ids"] = serde_json::json!(f);
    }
    p
}

/// What the consumer's server submits for `params`: the grant, verified as a request
/// arrives.
fn verified(g: &Grants, params: &serde_json::Value) -> KvTransfer {
    let p = KvTransferParams::parse(Some(params))
        .expect("an object")
        .expect("not null");
    let r = RemoteAddr::verify(&p, g.secret()).expect("signed by the pair");
    KvTransfer::Remote(RemoteKv::new(r))
}

fn remote(g: &Grants, id: &str, first: Option<&[u32]>) -> KvTransfer {
    verified(g, &grant(g, id, first))
}

/// The producer's part: prefills `prompt`, samples its first token and holds its KV.
fn prefill(p: &Engine, id: &str, prompt: &[u32], params: &SamplingParams) -> Vec<u32> {
    let one = SamplingParams {
        max_tokens: 1,
        ..params.clone()
    };
    run(p, id, prompt, &one, KvTransfer::Hold)
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

fn producer(cfg: EngineConfig) -> (Engine, Fingerprint, Arc<Grants>) {
    producer_in(cfg, Tls::default())
}

fn producer_in(cfg: EngineConfig, tls: Tls) -> (Engine, Fingerprint, Arc<Grants>) {
    let (m, sha) = model();
    let e = Engine::start(m.clone(), cfg, None).expect("engine");
    let fp = Fingerprint::new(&sha, &m.config, &e.kv_layout());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let grants = Arc::new(Grants::new(Secret::random().expect("secret"), addr));
    let side = SideChannel {
        engine: e.clone(),
        fingerprint: fp.clone(),
        grants: grants.clone(),
        on_sent: None,
        tls,
        #[cfg(feature = "nixl")]
        nixl: None,
    };
    std::thread::spawn(move || side.serve(listener));
    (e, fp, grants)
}

#[test]
fn loaded_over_tcp_equals_colocated() {
    for dtype in [KvDtype::F16, KvDtype::Q8_0] {
        over_tcp_equals_colocated(EngineConfig {
            kv_dtype: dtype,
            ..EngineConfig::default()
        });
    }
}

fn over_tcp_equals_colocated(cfg: EngineConfig) {
    let (m, _) = model();
    let (p, fp, g) = producer(cfg.clone());
    let d = consumer(fp, &g, cfg.clone());
    let colo = Engine::start(m.clone(), cfg, None).expect("engine");
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
        let (reference, ref_bits) =
            try_run_logits(&colo, "c", &prompt, &params, KvTransfer::None).expect("colocated");
        for with_first in [true, false] {
            let id = format!("req-{i}-{with_first}");
            let first = prefill(&p, &id, &prompt, &params);
            assert_eq!(first, reference[..1]);
            let kv = remote(&g, &id, with_first.then_some(&first[..]));
            let before = d.stats().prompt_tokens_computed;
            let (got, bits) = try_run_logits(&d, &id, &prompt, &params, kv).expect("pulled");
            assert_eq!(got, reference, "{}", p.kv_layout().dtype);
            // Logits bit for bit, on the KV that crossed: every token the consumer computed
            // (all but the producer's first when it travels with the KV).
            for (i, (b, r)) in bits.iter().zip(&ref_bits).enumerate() {
                let computed_here = i > 0 || !with_first;
                assert_eq!(b.is_some(), computed_here, "token {i}");
                if let Some(b) = b {
                    assert!(
                        Some(b) == r.as_ref(),
                        "{}: logits bits of token {i} differ",
                        p.kv_layout().dtype
                    );
                }
            }
            // Without the first token (vLLM's contract) the last prompt position is recomputed.
            assert_eq!(
                d.stats().prompt_tokens_computed - before,
                u64::from(!with_first)
            );
        }
    }
    // Loaded blocks were freed on the producer; a second load of the same id is refused.
    assert!(all_free(&p));
    let prompt = m
        .tokenizer
        .encode("The capital of France is")
        .expect("encode");
    let err = try_run(
        &d,
        "again",
        &prompt,
        &params,
        remote(&g, "req-0-true", None),
    )
    .expect_err("nothing held");
    assert!(err.to_string().contains("no KV held"), "{err}");
    assert!(all_free(&d));
}

#[test]
fn mismatched_fingerprint_is_refused_before_kv_crosses() {
    let (p, fp, g) = producer(EngineConfig::default());
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
        let d = consumer(theirs, &g, EngineConfig::default());
        let err = try_run(
            &d,
            "r",
            &prompt,
            &SamplingParams::greedy(4),
            remote(&g, "held", None),
        )
        .expect_err("refused");
        assert!(
            err.to_string().contains(&format!("{field} differs")),
            "{field}: {err}"
        );
        assert!(all_free(&d), "the consumer freed the blocks it had lent");
    }
    // The KV is still held (nothing crossed) and can be taken by a matching peer.
    assert!(p.stats().free_blocks < p.stats().total_blocks);
    let d = consumer(fp, &g, EngineConfig::default());
    let params = grant(&g, "held", None);
    let again = || verified(&g, &params);
    let got = run(&d, "r", &prompt, &SamplingParams::greedy(4), again());
    assert_eq!(got.len(), 4);
    assert!(all_free(&p));
    // Held again under the same id, the spent grant is still refused: served once.
    run(
        &p,
        "held",
        &prompt,
        &SamplingParams::greedy(1),
        KvTransfer::Hold,
    );
    let err =
        try_run(&d, "r2", &prompt, &SamplingParams::greedy(4), again()).expect_err("a spent grant");
    assert!(err.to_string().contains("no live grant"), "{err}");
    assert!(all_free(&d));
    assert!(p.stats().held_blocks > 0, "the new hold is untouched");
}

/// A CA, and a certificate it signed for 127.0.0.1 with its key; PEM files in `dir`.
fn pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    std::fs::create_dir_all(dir).expect("dir");
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).expect("write");
    std::fs::write(&paths.1, cert.pem()).expect("write");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write");
    paths
}

#[test]
fn tls_pulls_are_token_identical_and_untrusted_consumers_get_nothing() {
    let tmp = std::env::temp_dir().join(format!("splitserve-tls-{}", std::process::id()));
    let (ca, cert, key) = pki(&tmp.join("good"));
    let (other_ca, _, _) = pki(&tmp.join("other"));
    let cfg = EngineConfig::default();
    let (m, _) = model();
    let (p, fp, g) = producer_in(cfg.clone(), Tls::server(&cert, &key).expect("server"));
    let connector = |tls: Tls| {
        let c = TcpConnector::new(fp.clone(), g.secret().clone(), None, None).with_tls(tls);
        Engine::start_with(m.clone(), cfg.clone(), None, Some(Arc::new(c))).expect("engine")
    };
    let trusting = connector(Tls::client(&ca).expect("client"));
    let plain = connector(Tls::default());
    let wrong_ca = connector(Tls::client(&other_ca).expect("client"));
    let colo = Engine::start(m.clone(), cfg.clone(), None).expect("engine");
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(24)
    };
    let prompt = m
        .tokenizer
        .encode("Disaggregation ships the KV cache of each prompt.")
        .expect("encode");
    let reference = run(&colo, "c", &prompt, &params, KvTransfer::None);
    let first = prefill(&p, "held", &prompt, &params);
    let kv = grant(&g, "held", Some(&first));
    let again = || verified(&g, &kv);
    let e = try_run(&plain, "p", &prompt, &params, again()).expect_err("plain TCP to TLS");
    assert!(e.to_string().contains("failed"), "{e}");
    let e = try_run(&wrong_ca, "w", &prompt, &params, again()).expect_err("untrusted cert");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // Neither got the grant: the consumer that trusts the certificate still can.
    let got = run(&trusting, "t", &prompt, &params, again());
    assert_eq!(got, reference);
    for e in [&p, &trusting, &plain, &wrong_ca] {
        assert!(all_free(e));
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_consumer_loads_only_what_its_prefix_cache_lacks() {
    let (m, _) = model();
    let cfg = EngineConfig::default();
    let (p, fp, g) = producer(cfg.clone());
    let bytes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bytes.clone();
    let observer: splitserve_kv::connector::LoadObserver = Arc::new(move |r| {
        seen.lock().expect("lock").push((r.bytes, r.error.clone()));
    });
    let c = Arc::new(TcpConnector::new(
        fp,
        g.secret().clone(),
        None,
        Some(observer),
    ));
    let d = Engine::start_with(m.clone(), cfg.clone(), None, Some(c)).expect("engine");
    let colo = Engine::start(m.clone(), cfg, None).expect("engine");
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(8)
    };
    // A 64-token system prompt (4 blocks) shared by two requests with their own questions.
    let head = m
        .tokenizer
        .encode(&"Answer briefly and cite your sources. ".repeat(12))
        .expect("encode");
    let head = &head[..64];
    let block_bytes = p.kv_layout().block_bytes() as u64;
    for (k, q) in [
        "Question: why is the sky blue?",
        "Question: how do tides work?",
    ]
    .iter()
    .enumerate()
    {
        let tail = m.tokenizer.encode(q).expect("encode");
        let prompt = [head, &tail[..]].concat();
        let (reference, ref_bits) =
            try_run_logits(&colo, "c", &prompt, &params, KvTransfer::None).expect("colocated");
        let id = format!("q{k}");
        let computed = p.stats().prompt_tokens_computed;
        let first = prefill(&p, &id, &prompt, &params);
        // The producer prefills what its own cache lacks: all of the first prompt, only
        // the question of the second (at least the last token is always computed).
        let cached = if k == 0 { 0 } else { 64 };
        assert_eq!(
            p.stats().prompt_tokens_computed - computed,
            (prompt.len() - cached) as u64
        );
        let kv = remote(&g, &id, Some(&first[..]));
        let (got, bits) = try_run_logits(&d, &id, &prompt, &params, kv).expect("pulled");
        assert_eq!(got, reference, "request {k}");
        assert_eq!(bits[1..], ref_bits[1..], "request {k}: logits bits");
        // On the wire: every block of the first prompt; of the second, only the blocks
        // after the head the consumer cached while decoding the first.
        let sent = bytes.lock().expect("lock").pop().expect("a load report");
        assert_eq!(sent.1, None);
        let blocks = prompt.len().div_ceil(16) as u64 - if k == 0 { 0 } else { 4 };
        assert_eq!(sent.0, blocks * block_bytes, "request {k}: bytes pulled");
    }
    assert_eq!(
        d.stats().prompt_tokens_computed,
        0,
        "the consumer computed no prompt"
    );
    assert_eq!(d.stats().prefix_cache_hits, 64);
    assert!(all_free(&p));
    assert!(all_free(&d));
}
