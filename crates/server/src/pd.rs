//! Role wiring for disaggregation: what a producer or a consumer does with a request's
//! `kv_transfer_params` (names of vLLM's NIXL proxy contract, plus our own fields).
//!
//! Producer, given `{"do_remote_decode": true}`: prefills, samples the first token, holds the
//! prompt's blocks and answers with `{"do_remote_prefill": true, "remote_engine_id",
//! "remote_request_id", "remote_block_ids", "remote_host", "remote_port", "first_token_ids",
//! "fingerprint"}`. Consumer, given those: submits the request with them; its engine's
//! `TcpConnector` loads the KV into the request's blocks (WAITING_FOR_REMOTE_KVS, off the
//! engine thread, so running requests keep decoding), then it decodes from there. Without
//! `first_token_ids` (a proxy that only knows vLLM's fields) the consumer recomputes the last
//! prompt position itself.

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{json, Value};
use splitserve_engine::KvConnector;
use splitserve_kv::tcp;
use splitserve_kv::{Fingerprint, KvTransferConfig, LoadReport, RemoteAddr, TcpConnector};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::AppState;

/// A server's part in a disaggregated pair.
#[derive(Clone, Debug)]
pub struct PdConfig {
    pub config: KvTransferConfig,
    pub fingerprint: Fingerprint,
    /// Where consumers reach our side channel (producer role).
    pub side_channel: Option<SocketAddr>,
    pub engine_id: String,
}

/// What one request asks of the connector.
pub(crate) enum Plan {
    Local,
    Produce,
    Consume(RemoteAddr),
}

fn flag(p: &Value, name: &str) -> bool {
    p.get(name).and_then(Value::as_bool).unwrap_or(false)
}

fn field<'a>(p: &'a Value, name: &'static str) -> Result<&'a Value, ApiError> {
    p.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
        ApiError::bad(
            format!("kv_transfer_params.{name} is required with do_remote_prefill"),
            Some("kv_transfer_params"),
        )
    })
}

/// Reads `kv_transfer_params` against this server's role.
pub(crate) fn plan(pd: Option<&PdConfig>, params: &Option<Value>) -> Result<Plan, ApiError> {
    let p = match params {
        None | Some(Value::Null) => return Ok(Plan::Local),
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return Err(ApiError::bad(
                "kv_transfer_params must be an object",
                Some("kv_transfer_params"),
            ))
        }
    };
    let (decode, prefill) = (flag(p, "do_remote_decode"), flag(p, "do_remote_prefill"));
    if !decode && !prefill {
        return Ok(Plan::Local);
    }
    let Some(pd) = pd else {
        return Err(ApiError::bad(
            "kv_transfer_params given, but this server runs without --kv-transfer-config",
            Some("kv_transfer_params"),
        ));
    };
    let role = pd.config.kv_role;
    if decode && prefill {
        return Err(ApiError::bad(
            "do_remote_decode and do_remote_prefill are exclusive",
            Some("kv_transfer_params"),
        ));
    }
    if decode {
        if !role.produces() {
            return Err(ApiError::bad(
                format!(
                    "do_remote_decode asks for a kv_producer; this server is {}",
                    role.as_str()
                ),
                Some("kv_transfer_params"),
            ));
        }
        return Ok(Plan::Produce);
    }
    if !role.consumes() {
        return Err(ApiError::bad(
            format!(
                "do_remote_prefill asks for a kv_consumer; this server is {}",
                role.as_str()
            ),
            Some("kv_transfer_params"),
        ));
    }
    // Each field checked on its own so that a bad one is named.
    field(p, "remote_host")?.as_str().ok_or_else(|| {
        ApiError::bad(
            "kv_transfer_params.remote_host must be a string",
            Some("kv_transfer_params"),
        )
    })?;
    field(p, "remote_port")?
        .as_u64()
        .filter(|&x| x > 0 && x <= u16::MAX as u64)
        .ok_or_else(|| {
            ApiError::bad(
                "kv_transfer_params.remote_port must be a port number",
                Some("kv_transfer_params"),
            )
        })?;
    field(p, "remote_request_id")?.as_str().ok_or_else(|| {
        ApiError::bad(
            "kv_transfer_params.remote_request_id must be a string",
            Some("kv_transfer_params"),
        )
    })?;
    if let Some(v) = p.get("first_token_ids").filter(|v| !v.is_null()) {
        serde_json::from_value::<Vec<u32>>(v.clone()).map_err(|_| {
            ApiError::bad(
                "kv_transfer_params.first_token_ids must be a list of token ids",
                Some("kv_transfer_params"),
            )
        })?;
    }
    let remote = RemoteAddr::parse(p).ok_or_else(|| {
        ApiError::bad(
            "kv_transfer_params do not name a producer",
            Some("kv_transfer_params"),
        )
    })?;
    Ok(Plan::Consume(remote))
}

/// The producer's answer: where and under which id a consumer finds the held KV.
pub(crate) fn produced_params(pd: &PdConfig, request_id: &str, first: &[u32]) -> Value {
    let (host, port) = match pd.side_channel {
        Some(a) => (a.ip().to_string(), a.port()),
        None => (String::new(), 0),
    };
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_engine_id": pd.engine_id,
        "remote_request_id": request_id,
        // Blocks are found by request id on our side channel; ids are not needed remotely.
        "remote_block_ids": [],
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
        "first_token_ids": first,
        "fingerprint": pd.fingerprint,
    })
}

/// The consumer's connector, its loads counted in `metrics` and logged.
pub(crate) fn connector(pd: &PdConfig, metrics: &Arc<Metrics>) -> Arc<dyn KvConnector> {
    let m = metrics.clone();
    let on_start: Arc<dyn Fn() + Send + Sync> = Arc::new(move || m.kv_transfers_in_flight.inc());
    let m = metrics.clone();
    let observer: splitserve_kv::connector::LoadObserver = Arc::new(move |r: &LoadReport| {
        m.kv_transfers_in_flight.dec();
        match &r.error {
            None => {
                m.kv_bytes_received.inc_by(r.bytes);
                m.kv_transfer.observe(r.took.as_secs_f64());
                tracing::info!(
                    "received KV for request {}: {} blocks ({:.2} MiB) in {:.1} ms",
                    r.request_id,
                    r.blocks,
                    r.bytes as f64 / (1 << 20) as f64,
                    r.took.as_secs_f64() * 1e3
                );
            }
            Some(e) => {
                tracing::warn!(id = %r.request_id, producer = %r.producer, error = %e, "KV load failed")
            }
        }
    });
    Arc::new(TcpConnector::new(
        pd.fingerprint.clone(),
        Some(on_start),
        Some(observer),
    ))
}

/// Tells the producer, in the background, to free KV it holds for a request we dropped.
pub(crate) fn release(pd: &PdConfig, remote: RemoteAddr) {
    splitserve_kv::connector::release_hold(pd.fingerprint.clone(), remote);
}

/// Starts the producer's side channel on `listener`, counting bytes sent in the metrics.
pub fn start_side_channel(state: &AppState, pd: &PdConfig, listener: std::net::TcpListener) {
    let engine = state.engine().clone();
    let metrics = state.metrics().clone();
    let fp = pd.fingerprint.clone();
    let hook: tcp::SentHook = Arc::new(move |bytes| metrics.kv_bytes_sent.inc_by(bytes));
    std::thread::Builder::new()
        .name("kv-side-channel".into())
        .spawn(move || tcp::serve(listener, engine, fp, Some(hook)))
        .map(|_| ())
        .unwrap_or_else(|e| tracing::error!(error = %e, "could not start the KV side channel"));
}
