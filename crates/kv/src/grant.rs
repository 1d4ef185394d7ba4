//! Capabilities for held KV. The producer answers a prefill with `kv_transfer_params` that
//! name where the KV waits, a random 128-bit capability and an expiry, all signed with the
//! pair's secret. A consumer acts only on params whose signature checks (so a client can
//! neither point it at an address of its choosing nor forge another client's grant), and
//! the side channel serves a pull or a release only for a live capability, once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::auth::{hex, random_bytes, unhex, Secret, SecretError};
use crate::params::KvTransferParams;

const LABEL: &[u8] = b"splitserve-kv-grant-v1";
/// Grants outstanding at most; a hold's blocks bound them in practice.
const MAX_GRANTS: usize = 1 << 16;
/// How far a consumer's wall clock may run ahead of its producer's before it refuses a
/// grant by its expiry alone.
const MAX_CLOCK_SKEW_S: u64 = 120;

/// Why a consumer refuses `kv_transfer_params`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("kv_transfer_params.{0} is missing or malformed")]
    Field(&'static str),
    #[error("kv_transfer_params are not signed by a producer of this pair (kv_signature does not check)")]
    Signature,
    #[error("kv_transfer_params expired {0} s ago")]
    Expired(u64),
}

/// Where a request's KV waits, as a verified grant names it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteAddr {
    pub addr: String,
    pub request_id: String,
    pub capability: String,
    pub first_tokens: Option<Vec<u32>>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn signed_parts<'a>(
    host: &'a str,
    port: &'a [u8],
    id: &'a str,
    cap: &'a str,
    expires: &'a [u8],
) -> [&'a [u8]; 6] {
    [
        LABEL,
        host.as_bytes(),
        port,
        id.as_bytes(),
        cap.as_bytes(),
        expires,
    ]
}

impl RemoteAddr {
    /// Checks the producer's signature and expiry; only then are the params acted on.
    pub fn verify(p: &KvTransferParams, secret: &Secret) -> Result<Self, GrantError> {
        let s = |name: &'static str| {
            p.get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty() && s.len() <= 256)
                .ok_or(GrantError::Field(name))
        };
        let host = s("remote_host")?;
        let port = p
            .get("remote_port")
            .and_then(Value::as_u64)
            .filter(|&x| x > 0 && x <= u16::MAX as u64)
            .ok_or(GrantError::Field("remote_port"))? as u16;
        let request_id = s("remote_request_id")?;
        let capability = s("remote_capability")?;
        let expires = p
            .get("remote_expires_at")
            .and_then(Value::as_u64)
            .ok_or(GrantError::Field("remote_expires_at"))?;
        let tag = unhex(s("kv_signature")?).ok_or(GrantError::Field("kv_signature"))?;
        let (pb, eb) = (port.to_le_bytes(), expires.to_le_bytes());
        if !secret.verify(&signed_parts(host, &pb, request_id, capability, &eb), &tag) {
            return Err(GrantError::Signature);
        }
        // The producer's own clock decides (it serves a grant only while its hold lives);
        // this early refusal, on our clock, allows for the two hosts' clocks to differ.
        let now = now_unix();
        if now > expires.saturating_add(MAX_CLOCK_SKEW_S) {
            return Err(GrantError::Expired(now - expires));
        }
        // Not signed (a vLLM-contract proxy may drop it): checked against the KV's own.
        let first_tokens = match p.get("first_token_ids") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value::<Vec<u32>>(v.clone())
                    .map_err(|_| GrantError::Field("first_token_ids"))?,
            ),
        };
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            addr,
            request_id: request_id.to_string(),
            capability: capability.to_string(),
            first_tokens,
        })
    }
}

/// The producer's outstanding capabilities, and the secret that signs them.
pub struct Grants {
    secret: Secret,
    advertised: SocketAddr,
    live: Mutex<HashMap<String, (String, Instant)>>,
}

impl Grants {
    /// Grants that send consumers to the side channel at `advertised`.
    pub fn new(secret: Secret, advertised: SocketAddr) -> Self {
        Self {
            secret,
            advertised,
            live: Mutex::new(HashMap::new()),
        }
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // Every critical section leaves the map whole; a panic elsewhere cannot tear it.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A signed grant of `request_id`'s held KV, valid for `ttl`: the fields to put in
    /// the answer's `kv_transfer_params`.
    pub fn issue(&self, request_id: &str, ttl: Duration) -> Result<Value, SecretError> {
        let cap = hex(&random_bytes(16)?);
        let expires = now_unix() + ttl.as_secs().max(1);
        let host = self.advertised.ip().to_string();
        let port = self.advertised.port();
        let (pb, eb) = (port.to_le_bytes(), expires.to_le_bytes());
        let tag = self
            .secret
            .mac(&signed_parts(&host, &pb, request_id, &cap, &eb));
        {
            let mut live = self.live();
            let now = Instant::now();
            live.retain(|_, (_, until)| *until > now);
            if live.len() >= MAX_GRANTS {
                // The oldest-expiring goes; its hold lapses at its own timeout.
                if let Some(k) = live.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| k.clone()) {
                    live.remove(&k);
                }
            }
            live.insert(cap.clone(), (request_id.to_string(), now + ttl));
        }
        Ok(json!({
            "remote_host": host,
            "remote_port": port,
            "remote_request_id": request_id,
            "remote_capability": cap,
            "remote_expires_at": expires,
            "kv_signature": hex(&tag),
        }))
    }

    /// Takes the capability for `request_id`: true once, while it lives.
    pub fn redeem(&self, request_id: &str, capability: &str) -> bool {
        let mut live = self.live();
        match live.get(capability) {
            Some((id, until)) if id == request_id && *until > Instant::now() => {
                live.remove(capability);
                true
            }
            _ => false,
        }
    }

    /// Drops the grant of `request_id` (its hold ended another way).
    pub fn revoke(&self, request_id: &str) {
        self.live().retain(|_, (id, _)| id != request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kp(v: &Value) -> KvTransferParams {
        KvTransferParams::parse(Some(v))
            .expect("an object")
            .expect("not null")
    }

    fn grants() -> Grants {
        Grants::new(
            Secret::from_bytes(b"a shared secret of this pair", "test").unwrap(),
            "127.0.0.1:5600".parse().unwrap(),
        )
    }

    #[test]
    fn a_grant_verifies_and_redeems_once() {
        let g = grants();
        let p = g.issue("cmpl-1-0", Duration::from_secs(30)).unwrap();
        let r = RemoteAddr::verify(&kp(&p), g.secret()).unwrap();
        // Fields a proxy adds on the way are not signed and change nothing.
        let mut hop = p.clone();
        hop["x_proxy_hop"] = json!({"via": "router-1"});
        assert_eq!(RemoteAddr::verify(&kp(&hop), g.secret()), Ok(r.clone()));
        assert_eq!(r.addr, "127.0.0.1:5600");
        assert_eq!(r.request_id, "cmpl-1-0");
        assert_eq!(r.capability.len(), 32);
        assert!(!g.redeem("cmpl-2-0", &r.capability), "another id");
        assert!(g.redeem("cmpl-1-0", &r.capability));
        assert!(!g.redeem("cmpl-1-0", &r.capability), "single use");
        let p2 = g.issue("cmpl-1-0", Duration::from_secs(30)).unwrap();
        assert_ne!(p2["remote_capability"], p["remote_capability"]);
        g.revoke("cmpl-1-0");
        let c2 = p2["remote_capability"].as_str().unwrap();
        assert!(!g.redeem("cmpl-1-0", c2), "revoked");
    }

    #[test]
    fn every_signed_field_is_bound() {
        let g = grants();
        let p = g.issue("victim-0", Duration::from_secs(30)).unwrap();
        for (field, v) in [
            ("remote_host", json!("10.0.0.1")),
            ("remote_port", json!(22)),
            ("remote_request_id", json!("other-0")),
            ("remote_capability", json!("00".repeat(16))),
            ("remote_expires_at", json!(u64::MAX)),
        ] {
            let mut q = p.clone();
            q[field] = v;
            assert_eq!(
                RemoteAddr::verify(&kp(&q), g.secret()),
                Err(GrantError::Signature),
                "{field}"
            );
        }
        let mut q = p.clone();
        q.as_object_mut().unwrap().remove("kv_signature");
        assert_eq!(
            RemoteAddr::verify(&kp(&q), g.secret()),
            Err(GrantError::Field("kv_signature"))
        );
        // Another pair's secret.
        let other = Secret::from_bytes(b"another pair's secret......", "t").unwrap();
        assert_eq!(
            RemoteAddr::verify(&kp(&p), &other),
            Err(GrantError::Signature)
        );
        // first_token_ids is not signed but must be well-formed.
        let mut q = p.clone();
        q["first_token_ids"] = json!(["x"]);
        assert_eq!(
            RemoteAddr::verify(&kp(&q), g.secret()),
            Err(GrantError::Field("first_token_ids"))
        );
    }

    #[test]
    fn expired_grants_are_refused_and_not_redeemed() {
        let g = grants();
        let p = g.issue("r-0", Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let cap = p["remote_capability"].as_str().unwrap();
        assert!(!g.redeem("r-0", cap));
        // A signature over an expiry in the past.
        let host = "127.0.0.1";
        let (pb, eb) = (5600u16.to_le_bytes(), 1000u64.to_le_bytes());
        let tag = g.secret().mac(&signed_parts(host, &pb, "r-0", cap, &eb));
        let mut q = p.clone();
        q["remote_expires_at"] = json!(1000);
        q["kv_signature"] = json!(hex(&tag));
        assert!(matches!(
            RemoteAddr::verify(&kp(&q), g.secret()),
            Err(GrantError::Expired(_))
        ));
        // A minute past on our clock may be a producer whose clock runs behind ours: its
        // own hold decides. Ten minutes past is refused here.
        for (ago, ok) in [(60, true), (600, false)] {
            let at = now_unix() - ago;
            let eb = at.to_le_bytes();
            let tag = g.secret().mac(&signed_parts(host, &pb, "r-0", cap, &eb));
            q["remote_expires_at"] = json!(at);
            q["kv_signature"] = json!(hex(&tag));
            assert_eq!(
                RemoteAddr::verify(&kp(&q), g.secret()).is_ok(),
                ok,
                "{ago} s"
            );
        }
    }
}
