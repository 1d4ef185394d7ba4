//! `TcpConnector`: the engine's [`KvConnector`] over the TCP transport (consumer side).
//!
//! Scheduler side: a request whose `kv_transfer_params` name a producer (`remote_host`,
//! `remote_port`, `remote_request_id`) can have its whole prompt's KV loaded. Worker side: a
//! thread per load pulls it straight into the blocks the engine lent, then ends the load
//! with the producer's first token (our `first_token_ids`) or, under vLLM's contract
//! (none given), with no token: the engine recomputes the last prompt position.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use splitserve_engine::{KvConnector, LoadTarget, RemoteFirst, RemoteKv};

use crate::tcp;
use crate::Fingerprint;

/// One load as it ended, for metrics and logs.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub request_id: String,
    pub producer: String,
    pub blocks: usize,
    pub bytes: u64,
    pub took: Duration,
    /// The failure, if it failed.
    pub error: Option<String>,
}

pub type LoadObserver = Arc<dyn Fn(&LoadReport) + Send + Sync>;

pub struct TcpConnector {
    fingerprint: Fingerprint,
    /// Called when a load starts (`None`) and when it ends.
    observer: Option<LoadObserver>,
    on_start: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// Where a request's KV waits, read from its `kv_transfer_params`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteAddr {
    pub addr: String,
    pub request_id: String,
    pub first_tokens: Option<Vec<u32>>,
}

impl RemoteAddr {
    /// `None` if the params name no producer.
    pub fn parse(p: &Value) -> Option<Self> {
        let host = p.get("remote_host")?.as_str()?;
        let port = p
            .get("remote_port")?
            .as_u64()
            .filter(|&x| x > 0 && x <= u16::MAX as u64)?;
        let request_id = p.get("remote_request_id")?.as_str()?.to_string();
        let first_tokens = match p.get("first_token_ids") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value::<Vec<u32>>(v.clone()).ok()?),
        };
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Some(Self {
            addr,
            request_id,
            first_tokens,
        })
    }
}

impl TcpConnector {
    pub fn new(
        fingerprint: Fingerprint,
        on_start: Option<Arc<dyn Fn() + Send + Sync>>,
        observer: Option<LoadObserver>,
    ) -> Self {
        Self {
            fingerprint,
            observer,
            on_start,
        }
    }
}

impl KvConnector for TcpConnector {
    fn remote_tokens(&self, remote: &RemoteKv, prompt_len: usize) -> usize {
        match RemoteAddr::parse(&remote.params) {
            Some(_) => prompt_len,
            None => 0,
        }
    }

    fn start_load(&self, remote: RemoteKv, mut target: LoadTarget) {
        let Some(r) = RemoteAddr::parse(&remote.params) else {
            target.finish(Err("kv_transfer_params name no producer".into()));
            return;
        };
        if let Some(f) = &self.on_start {
            f();
        }
        let fp = self.fingerprint.clone();
        let observer = self.observer.clone();
        let spawned = std::thread::Builder::new()
            .name("kv-load".into())
            .spawn(move || {
                let t0 = Instant::now();
                let blocks = target.n_blocks();
                let result = tcp::load_into(&r.addr, &fp, &r.request_id, &mut target);
                let (bytes, outcome) = match result {
                    Ok(l) => {
                        let first = match &r.first_tokens {
                            // vLLM's contract: the engine samples the first token itself.
                            None => Ok(RemoteFirst::default()),
                            Some(f) if *f != l.generated => Err(format!(
                                "producer's first tokens {f:?} differ from the KV's {:?}",
                                l.generated
                            )),
                            Some(_) => Ok(RemoteFirst {
                                generated: l.generated,
                                sampler: Some(l.sampler),
                            }),
                        };
                        (l.bytes, first)
                    }
                    Err(e @ tcp::KvError::Handshake(_)) => {
                        (0, Err(format!("KV transfer from {} refused: {e}", r.addr)))
                    }
                    Err(e) => (
                        0,
                        Err(format!(
                            "KV transfer of request {} from {} failed: {e}",
                            r.request_id, r.addr
                        )),
                    ),
                };
                let report = LoadReport {
                    request_id: target.request_id().to_string(),
                    producer: r.addr.clone(),
                    blocks,
                    bytes,
                    took: t0.elapsed(),
                    error: outcome.as_ref().err().cloned(),
                };
                target.finish(outcome);
                if let Some(o) = observer {
                    o(&report);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a KV load thread");
        }
    }

    fn release(&self, remote: RemoteKv) {
        if let Some(r) = RemoteAddr::parse(&remote.params) {
            release_hold(self.fingerprint.clone(), r);
        }
    }
}

/// Tells the producer, in the background, to free the KV it holds for a request we will
/// never load.
pub fn release_hold(fingerprint: Fingerprint, r: RemoteAddr) {
    std::thread::spawn(move || {
        tracing::info!(id = %r.request_id, producer = %r.addr, "releasing the producer's hold on KV we will not pull");
        if let Err(e) = tcp::release(&r.addr, &fingerprint, &r.request_id) {
            tracing::warn!(id = %r.request_id, producer = %r.addr, error = %e, "could not release the producer's hold");
        }
    });
}
