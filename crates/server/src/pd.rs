//! Role wiring for disaggregation: what a producer or a consumer does with a request's
//! `kv_transfer_params` (names of vLLM's NIXL proxy contract, plus our own fields).
//!
//! Producer, given `{"do_remote_decode": true}`: prefills, samples the first token, holds the
//! prompt's blocks and answers with `{"do_remote_prefill": true, "remote_engine_id",
//! "remote_request_id", "remote_block_ids", "remote_host", "remote_port", "first_token_ids",
//! "fingerprint"}`. Consumer, given those: pulls the KV over the side channel (off the engine
//! thread, so running requests keep decoding), then decodes from it. Without
//! `first_token_ids` (a proxy that only knows vLLM's fields) the consumer recomputes the last
//! prompt position itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use splitserve_engine::KvImport;
use splitserve_kv::tcp::{self, KvError};
use splitserve_kv::{Fingerprint, KvTransferConfig};

use crate::error::ApiError;
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
    Consume(Remote),
}

#[derive(Clone)]
pub(crate) struct Remote {
    addr: String,
    request_id: String,
    first_tokens: Option<Vec<u32>>,
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
    let host = field(p, "remote_host")?.as_str().ok_or_else(|| {
        ApiError::bad(
            "kv_transfer_params.remote_host must be a string",
            Some("kv_transfer_params"),
        )
    })?;
    let port = field(p, "remote_port")?
        .as_u64()
        .filter(|&x| x > 0 && x <= u16::MAX as u64)
        .ok_or_else(|| {
            ApiError::bad(
                "kv_transfer_params.remote_port must be a port number",
                Some("kv_transfer_params"),
            )
        })?;
    let request_id = field(p, "remote_request_id")?.as_str().ok_or_else(|| {
        ApiError::bad(
            "kv_transfer_params.remote_request_id must be a string",
            Some("kv_transfer_params"),
        )
    })?;
    let first_tokens = match p.get("first_token_ids") {
        None | Some(Value::Null) => None,
        Some(v) => Some(serde_json::from_value::<Vec<u32>>(v.clone()).map_err(|_| {
            ApiError::bad(
                "kv_transfer_params.first_token_ids must be a list of token ids",
                Some("kv_transfer_params"),
            )
        })?),
    };
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Plan::Consume(Remote {
        addr,
        request_id: request_id.to_string(),
        first_tokens,
    }))
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

/// Pulls a request's KV from its producer, off the async runtime's threads.
pub(crate) async fn pull(
    state: &AppState,
    pd: &PdConfig,
    remote: Remote,
    our_id: &str,
) -> Result<KvImport, ApiError> {
    let metrics = state.metrics().clone();
    metrics.kv_transfers_in_flight.inc();
    let t0 = Instant::now();
    let fp = pd.fingerprint.clone();
    let (addr, rid) = (remote.addr.clone(), remote.request_id.clone());
    let r = tokio::task::spawn_blocking(move || tcp::pull(&addr, &fp, &rid)).await;
    metrics.kv_transfers_in_flight.dec();
    let mut kv = match r {
        Ok(Ok(kv)) => kv,
        Ok(Err(e @ KvError::Handshake(_))) => {
            return Err(ApiError::BadGateway(format!(
                "KV transfer from {} refused: {e}",
                remote.addr
            )))
        }
        Ok(Err(e)) => {
            return Err(ApiError::BadGateway(format!(
                "KV transfer of request {} from {} failed: {e}",
                remote.request_id, remote.addr
            )))
        }
        Err(e) => return Err(ApiError::Internal(format!("KV pull task: {e}"))),
    };
    let took = t0.elapsed();
    let bytes: usize = kv.layers.iter().map(Vec::len).sum();
    metrics.kv_bytes_received.inc_by(bytes as u64);
    metrics.kv_transfer.observe(took.as_secs_f64());
    let blocks = kv.n_tokens.div_ceil(kv.layout.block_size.max(1));
    tracing::info!(
        "received KV for request {our_id}: {blocks} blocks ({:.2} MiB) in {:.1} ms",
        bytes as f64 / (1 << 20) as f64,
        took.as_secs_f64() * 1e3
    );
    match remote.first_tokens {
        // vLLM's contract: no first token travels; the last prompt position is recomputed.
        None => kv.generated.clear(),
        Some(f) if f != kv.generated => {
            return Err(ApiError::BadGateway(format!(
                "producer's first tokens {f:?} differ from the KV's {:?}",
                kv.generated
            )))
        }
        Some(_) => {}
    }
    Ok(kv)
}

/// Tells the producer, in the background, to free KV it holds for a request we dropped.
pub(crate) fn release(pd: &PdConfig, remote: Remote) {
    tracing::info!(id = %remote.request_id, producer = %remote.addr, "releasing the producer's hold on KV we will not pull");
    let fp = pd.fingerprint.clone();
    std::thread::spawn(move || {
        if let Err(e) = tcp::release(&remote.addr, &fp, &remote.request_id) {
            tracing::warn!(id = %remote.request_id, producer = %remote.addr, error = %e, "could not release the producer's hold");
        }
    });
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
