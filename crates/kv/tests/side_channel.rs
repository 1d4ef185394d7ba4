//! The side channel as an attacker meets it, with a raw client that speaks the wire format
//! by hand: no proof of the pair's secret, no pull; a forged or spent capability, no KV and
//! no release; an oversized frame, no allocation and a closed connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use splitserve_engine::{
    model_file, Engine, EngineConfig, Event, KvTransfer, Model, Request, SamplingParams,
};
use splitserve_kv::tcp::SideChannel;
use splitserve_kv::wire::{Frame, HEADER, MAGIC, VERSION};
use splitserve_kv::{Fingerprint, Grants, Secret};

struct Producer {
    engine: Engine,
    fp: Fingerprint,
    grants: Arc<Grants>,
    addr: std::net::SocketAddr,
}

fn producer() -> Producer {
    let p = model_file::default_model(false).expect("model");
    let sha = model_file::sha256_file(&p, false).expect("sha");
    let m = Arc::new(Model::load(&p).expect("load"));
    let engine = Engine::start(m.clone(), EngineConfig::default(), None).expect("engine");
    let fp = Fingerprint::new(&sha, &m.config, &engine.kv_layout());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let grants = Arc::new(Grants::new(Secret::random().expect("secret"), addr));
    let side = SideChannel {
        engine: engine.clone(),
        fingerprint: fp.clone(),
        grants: grants.clone(),
        on_sent: None,
        tls: Default::default(),
        #[cfg(feature = "nixl")]
        nixl: None,
    };
    std::thread::spawn(move || side.serve(listener));
    Producer {
        engine,
        fp,
        grants,
        addr,
    }
}

fn read(s: &mut TcpStream) -> Result<Frame, String> {
    let mut h = [0u8; HEADER];
    s.read_exact(&mut h).map_err(|e| e.to_string())?;
    let len = Frame::payload_len(&h).map_err(|e| e.to_string())?;
    assert!(
        len < 1 << 20,
        "a control frame of {len} bytes from the producer"
    );
    let mut b = h.to_vec();
    b.resize(HEADER + len, 0);
    s.read_exact(&mut b[HEADER..]).map_err(|e| e.to_string())?;
    Ok(Frame::decode(&b)
        .map_err(|e| e.to_string())?
        .expect("whole")
        .0)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The consumer's half of the handshake, by hand, proving `secret`.
fn handshake(p: &Producer, secret: &Secret) -> (TcpStream, Result<(), String>) {
    let mut s = TcpStream::connect(p.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let nonce = [7u8; 16];
    let hello = serde_json::json!({"nonce": hex(&nonce)});
    s.write_all(&Frame::Hello(serde_json::to_vec(&hello).unwrap()).encode())
        .unwrap();
    let theirs = match read(&mut s) {
        Ok(Frame::Hello(j)) => j,
        other => return (s, Err(format!("{other:?}"))),
    };
    let v: serde_json::Value = serde_json::from_slice(&theirs).unwrap();
    // Before any proof, a peer learns only a nonce: nothing of the model.
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
    let tn = v["nonce"].as_str().unwrap();
    let tn: Vec<u8> = (0..tn.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&tn[i..i + 2], 16).unwrap())
        .collect();
    let proof = secret.mac(&[b"splitserve-kv-auth-v2", b"consumer", &nonce, &tn]);
    s.write_all(&Frame::Auth(proof.to_vec()).encode()).unwrap();
    let r = match read(&mut s) {
        Ok(Frame::Auth(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    };
    if r.is_err() {
        return (s, r);
    }
    // Both proven: the fingerprints cross.
    let ours = serde_json::json!({"fingerprint": p.fp});
    s.write_all(&Frame::Hello(serde_json::to_vec(&ours).unwrap()).encode())
        .unwrap();
    let r = match read(&mut s) {
        Ok(Frame::Hello(j)) => {
            let v: serde_json::Value = serde_json::from_slice(&j).unwrap();
            assert_eq!(v["fingerprint"], serde_json::json!(p.fp));
            Ok(())
        }
        other => Err(format!("{other:?}")),
    };
    (s, r)
}

fn hold(e: &Engine, id: &str, max_tokens: usize, kv: KvTransfer) -> Vec<u32> {
    let prompt: Vec<u32> = (100..140).collect();
    let mut rx = e
        .submit(Request {
            id: id.into(),
            prompt,
            params: SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(max_tokens)
            },
            return_logits: false,
            kv,
            cache_salt: None,

            resumed: 0,
        })
        .expect("submit");
    let mut out = vec![];
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => out.push(t.token),
            Event::Finished(_) => break,
        }
    }
    out
}

fn held(e: &Engine) -> usize {
    e.stats().held_blocks
}

#[test]
fn no_secret_no_pull_and_no_capability_no_kv() {
    let p = producer();
    hold(&p.engine, "victim-0", 1, KvTransfer::Hold);
    let blocks = held(&p.engine);
    assert_eq!(blocks, 3, "40 prompt tokens in blocks of 16");
    let grant = p.grants.issue("victim-0", Duration::from_secs(30)).unwrap();
    let cap = grant["remote_capability"].as_str().unwrap().to_string();

    // Without the pair's secret the handshake fails, whatever follows.
    let (mut s, r) = handshake(&p, &Secret::random().unwrap());
    let e = r.expect_err("a stranger is refused");
    assert!(e.contains("authentication failed"), "{e}");
    let _ = s.write_all(
        &Frame::Pull {
            request_id: "victim-0".into(),
            capability: cap.clone(),
            from_block: 0,
        }
        .encode(),
    );
    assert!(read(&mut s).is_err(), "the connection is closed");
    assert_eq!(held(&p.engine), blocks);

    // With the secret but a forged capability: refused, the hold stays.
    for forged in [&"0".repeat(32), "", &cap[..31]] {
        let (mut s, r) = handshake(&p, p.grants.secret());
        r.expect("authenticated");
        s.write_all(
            &Frame::Pull {
                request_id: "victim-0".into(),
                capability: forged.to_string(),
                from_block: 0,
            }
            .encode(),
        )
        .unwrap();
        match read(&mut s) {
            Ok(Frame::Error(m)) => assert!(m.contains("no live grant"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(held(&p.engine), blocks);
    }
    // The right capability for another request id is refused too.
    let (mut s, _) = handshake(&p, p.grants.secret());
    s.write_all(
        &Frame::Release {
            request_id: "other-0".into(),
            capability: cap.clone(),
        }
        .encode(),
    )
    .unwrap();
    assert!(matches!(read(&mut s), Ok(Frame::Error(_))));
    assert_eq!(held(&p.engine), blocks);

    // The grant itself releases the hold, once.
    for (i, want_done) in [(0, true), (1, false)] {
        let (mut s, _) = handshake(&p, p.grants.secret());
        s.write_all(
            &Frame::Release {
                request_id: "victim-0".into(),
                capability: cap.clone(),
            }
            .encode(),
        )
        .unwrap();
        let f = read(&mut s).unwrap();
        assert_eq!(matches!(f, Frame::Done), want_done, "release {i}: {f:?}");
    }
    for _ in 0..200 {
        if held(&p.engine) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(held(&p.engine), 0);
    // Free blocks are published at the end of the engine's loop turn, just after the release.
    for _ in 0..500 {
        let s = p.engine.stats();
        if s.free_blocks == s.total_blocks {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = p.engine.stats();
    assert_eq!(s.free_blocks, s.total_blocks);
}

#[test]
fn a_running_request_cannot_be_released() {
    let p = producer();
    let (engine, secret) = (p.engine.clone(), p.grants.secret().clone());
    let runner = std::thread::spawn(move || hold(&engine, "running-0", 200, KvTransfer::None));
    // Wait until it runs, then try to stop it by id with every capability we can make up.
    for _ in 0..500 {
        if p.engine.stats().running == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (mut s, r) = handshake(&p, &secret);
    r.expect("authenticated");
    s.write_all(
        &Frame::Release {
            request_id: "running-0".into(),
            capability: "00".repeat(16),
        }
        .encode(),
    )
    .unwrap();
    assert!(matches!(read(&mut s), Ok(Frame::Error(_))));
    let out = runner.join().expect("runner");
    assert_eq!(out.len(), 200, "the request ran to its max_tokens");
}

#[test]
fn an_oversized_frame_is_refused_unread() {
    let p = producer();
    for kind in [1u8, 2, 8] {
        let mut s = TcpStream::connect(p.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut h = [0u8; HEADER];
        h[..4].copy_from_slice(MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6] = kind;
        h[8..].copy_from_slice(&(200u32 << 20).to_le_bytes());
        s.write_all(&h).unwrap();
        // The producer's hello, then an error naming the size, read from the header alone.
        assert!(matches!(read(&mut s), Ok(Frame::Hello(_))));
        match read(&mut s) {
            Ok(Frame::Error(m)) => assert!(
                m.contains("announces 209715200 bytes") && m.contains("at most 65536"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(read(&mut s).is_err(), "then the connection is closed");
    }
}

#[test]
fn a_peer_that_drips_its_handshake_is_cut_off_at_the_deadline() {
    let p = producer();
    let mut s = TcpStream::connect(p.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(matches!(read(&mut s), Ok(Frame::Hello(_))));
    // A byte per second of a hello: every read ends well within a per-read timeout, but the
    // whole handshake must end within HANDSHAKE_TIMEOUT.
    let hello = serde_json::json!({"nonce": hex(&[7u8; 16])});
    let frame = Frame::Hello(serde_json::to_vec(&hello).unwrap()).encode();
    let t0 = std::time::Instant::now();
    let mut cut = None;
    for b in &frame {
        if s.write_all(&[*b]).is_err() {
            cut = Some(t0.elapsed());
            break;
        }
        // A closed peer shows as end-of-stream, or a reset if our bytes were left unread.
        s.set_nonblocking(true).unwrap();
        let mut one = [0u8; 1];
        let closed = match s.read(&mut one) {
            Ok(n) => n == 0,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        s.set_nonblocking(false).unwrap();
        if closed {
            cut = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still open after 15 s"
        );
    }
    let cut = cut.expect("the producer closed the connection");
    let limit = splitserve_kv::tcp::HANDSHAKE_TIMEOUT;
    assert!(
        cut >= limit - Duration::from_secs(1) && cut <= limit + Duration::from_secs(3),
        "closed after {cut:?}; the deadline is {limit:?}"
    );
}
