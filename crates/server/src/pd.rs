//! Role wiring for disaggregation: what a producer or a consumer does with a request's
//! `kv_transfer_params` (names of vLLM's NIXL proxy contract, plus our own fields).
//!
//! Producer, given `{"do_remote_decode": true}`: prefills, samples the first token, holds the
//! prompt's blocks and answers with `{"do_remote_prefill": true, "remote_engine_id",
//! "remote_request_id", "remote_host", "remote_port", "first_token_ids",
//! "fingerprint"}` plus a grant: `remote_capability`, `remote_expires_at` and `kv_signature`
//! (see `splitserve_kv::grant`). Consumer, given those: refuses them unless the signature
//! checks (nothing is connected to), else submits the request with them; its engine's
//! `TcpConnector` loads the KV into the request's blocks (WAITING_FOR_REMOTE_KVS, off the
//! engine thread, so running requests keep decoding), then it decodes from there. Without
//! `first_token_ids` (a proxy that only knows vLLM's fields) the consumer recomputes the last
//! prompt position itself.

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{json, Value};
use splitserve_engine::KvConnector;
use splitserve_kv::tcp;
use splitserve_kv::{
    Fingerprint, Grants, KvTransferConfig, LoadReport, RemoteAddr, Secret, TcpConnector,
};

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
    /// The pair's shared secret: authenticates the side channel, signs and checks grants.
    pub secret: Secret,
    /// TLS of the side channel (producer: served; consumer: required of the producer).
    pub tls: splitserve_kv::tls::Tls,
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
    // Only a grant signed with this pair's secret is acted on: a client cannot send this
    // server to an address of its choosing, nor redeem someone else's grant.
    let remote = RemoteAddr::verify(p, &pd.secret)
        .map_err(|e| ApiError::bad(e.to_string(), Some("kv_transfer_params")))?;
    Ok(Plan::Consume(remote))
}

/// The producer's answer: a signed, single-use grant of the held KV.
pub(crate) fn produced_params(
    pd: &PdConfig,
    grants: &Grants,
    request_id: &str,
    first: &[u32],
) -> Result<Value, ApiError> {
    let mut v = grants
        .issue(request_id, pd.config.hold_timeout())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let extra = json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_engine_id": pd.engine_id,
        "tp_size": 1,
        "first_token_ids": first,
        "fingerprint": pd.fingerprint,
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    Ok(v)
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
    Arc::new(
        TcpConnector::new(
            pd.fingerprint.clone(),
            pd.secret.clone(),
            Some(on_start),
            Some(observer),
        )
        .with_tls(pd.tls.clone()),
    )
}

/// Tells the producer, in the background, to free KV it holds for a request we dropped.
pub(crate) fn release(pd: &PdConfig, remote: RemoteAddr) {
    splitserve_kv::connector::release_hold(
        pd.fingerprint.clone(),
        pd.secret.clone(),
        pd.tls.clone(),
        remote,
    );
}

/// Starts the producer's side channel on `listener`, counting bytes sent in the metrics.
pub fn start_side_channel(state: &AppState, pd: &PdConfig, listener: std::net::TcpListener) {
    let Some(grants) = state.grants() else {
        tracing::error!("a side channel was asked of a server that produces no KV");
        return;
    };
    let metrics = state.metrics().clone();
    let side = tcp::SideChannel {
        engine: state.engine().clone(),
        fingerprint: pd.fingerprint.clone(),
        grants,
        on_sent: Some(Arc::new(move |bytes| metrics.kv_bytes_sent.inc_by(bytes))),
        tls: pd.tls.clone(),
    };
    std::thread::Builder::new()
        .name("kv-side-channel".into())
        .spawn(move || side.serve(listener))
        .map(|_| ())
        .unwrap_or_else(|e| tracing::error!(error = %e, "could not start the KV side channel"));
}
