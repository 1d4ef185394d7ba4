//! Entry points for fuzzing what a peer or a client controls: the wire decoder, the side
//! channel's handshake, `kv_transfer_params` and the migration unit. Each takes arbitrary
//! bytes and must return without a panic and without allocating more than its input
//! implies. The `fuzz/` crate drives them with libFuzzer (`cargo fuzz`); a stable test
//! (`tests/fuzz_smoke.rs`) runs them over generated inputs in every test run.

use std::io::{Read, Write};
use std::time::Duration;

use crate::auth::Secret;
use crate::fingerprint::Fingerprint;
use crate::grant::{Grants, RemoteAddr};
use crate::params::KvTransferParams;
use crate::tcp::{handshake as shake, read_frame, Conn, Role};
use crate::wire::Frame;

/// The fingerprint and secret the targets' producer has.
fn producer() -> (Fingerprint, Secret) {
    let fp = Fingerprint {
        format_version: crate::fingerprint::FORMAT_VERSION,
        model_sha256: "0".repeat(64),
        architecture: "llama".into(),
        n_layer: 30,
        n_kv_head: 3,
        head_dim: 64,
        kv_dtype: "f16".into(),
        block_size: 16,
    };
    let secret = Secret::from_bytes(b"fuzzing secret, 32 bytes long!!!", "fuzz")
        .unwrap_or_else(|_| unreachable!("32 bytes"));
    (fp, secret)
}

/// A peer whose bytes are `input`; what we write is dropped.
struct Feed<'a>(&'a [u8]);

impl Read for Feed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Feed<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Conn for Feed<'_> {
    fn set_read_wait(&mut self, _: Duration) {}
}

/// Decodes a frame; whatever decodes must survive encoding and decoding again.
pub fn wire(data: &[u8]) {
    if let Ok(Some((f, _))) = Frame::decode(data) {
        let b = f.encode();
        assert_eq!(Frame::decode(&b), Ok(Some((f, b.len()))));
    }
}

/// The producer's side of the handshake against `data`, then a request frame read as the
/// side channel reads it.
pub fn handshake(data: &[u8]) {
    let (fp, secret) = producer();
    let mut feed = Feed(data);
    if shake(&mut feed, "fuzz", &fp, &secret, Role::Producer).is_ok() {
        panic!("a peer without the secret passed the handshake");
    }
    let _ = read_frame(&mut Feed(data), "fuzz");
}

/// `data` as `kv_transfer_params`, alone and spliced into a real grant's fields; only the
/// untouched grant may verify.
pub fn transfer_params(data: &[u8]) {
    let (_, secret) = producer();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(Some(p)) = KvTransferParams::parse(Some(&v)) {
            assert!(
                RemoteAddr::verify(&p, &secret).is_err(),
                "unsigned params verified: {v}"
            );
        }
    }
    let grants = Grants::new(secret.clone(), ([127, 0, 0, 1], 5600).into());
    let Ok(grant) = grants.issue("fuzz-0", Duration::from_secs(60)) else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    for field in [
        "remote_host",
        "remote_port",
        "remote_request_id",
        "remote_capability",
        "remote_expires_at",
        "kv_signature",
    ] {
        let mut v = grant.clone();
        let new =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.to_string()));
        if v[field] == new {
            continue;
        }
        v[field] = new;
        if let Ok(Some(p)) = KvTransferParams::parse(Some(&v)) {
            assert!(
                RemoteAddr::verify(&p, &secret).is_err(),
                "{field} changed, still verified"
            );
        }
    }
}

/// Decodes a migration unit.
pub fn migration(data: &[u8]) {
    let _ = crate::migration::decode(data);
}
