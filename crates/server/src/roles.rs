//! Role wiring for disaggregation: a server's KV connector (built in `splitserve_kv::role`
//! from `--kv-transfer-config`) meets its requests' `kv_transfer_params` (vLLM's NIXL-proxy
//! names, plus our own fields) and its metrics.
//!
//! Producer, given `{"do_remote_decode": true}`: prefills, samples the first token, holds the
//! prompt's blocks and answers with the connector's params (for `TcpConnector`: where the
//! side channel is, the first token, the fingerprint and a signed, single-use grant).
//! Consumer, given those: the connector refuses them unless it can verify them (nothing is
//! connected to), else the request is submitted with them; the engine's connector loads the
//! KV into the request's blocks (WAITING_FOR_REMOTE_KVS, off the engine thread, so running
//! requests keep decoding), then it decodes from there.

use std::sync::Arc;

use serde_json::Value;
use splitserve_kv::connector::LoadObserver;
use splitserve_kv::role::{Hooks, KvRoleConnector, Plan};
use splitserve_kv::storage::StoreEvent;
use splitserve_kv::{KvTransferParams, LoadReport};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Reads `kv_transfer_params` against this server's role.
pub(crate) fn plan(
    role: Option<&Arc<dyn KvRoleConnector>>,
    params: &Option<Value>,
) -> Result<Plan, ApiError> {
    let bad = |e: String| ApiError::bad(e, Some("kv_transfer_params"));
    let p = KvTransferParams::parse(params.as_ref()).map_err(|e| bad(e.to_string()))?;
    match (p, role) {
        (None, _) => Ok(Plan::Local),
        (Some(p), None) if p.ask == splitserve_kv::Ask::Local => Ok(Plan::Local),
        (Some(_), None) => Err(bad(
            "kv_transfer_params given, but this server runs without --kv-transfer-config".into(),
        )),
        (Some(p), Some(r)) => r.plan(Some(&p)).map_err(|e| bad(e.to_string())),
    }
}

/// Loads counted in `metrics` and logged; bytes served counted.
pub(crate) fn hooks(metrics: &Arc<Metrics>) -> Hooks {
    let m = metrics.clone();
    let on_load_start: Arc<dyn Fn() + Send + Sync> =
        Arc::new(move || m.kv_transfers_in_flight.inc());
    let m = metrics.clone();
    let on_load_end: LoadObserver = Arc::new(move |r: &LoadReport| {
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
    let m = metrics.clone();
    let on_sent: splitserve_kv::tcp::SentHook =
        Arc::new(move |bytes| m.kv_bytes_sent.inc_by(bytes));
    let m = metrics.clone();
    Hooks {
        on_load_start: Some(on_load_start),
        on_load_end: Some(on_load_end),
        on_sent: Some(on_sent),
        on_store_event: Some(Arc::new(move |connector, e| match e {
            StoreEvent::Loaded { blocks, bytes, .. } => {
                m.kv_store_loaded_blocks
                    .with_label_values(&[connector])
                    .inc_by(blocks);
                m.kv_store_loaded_bytes
                    .with_label_values(&[connector])
                    .inc_by(bytes);
            }
            StoreEvent::Saved { bytes, .. } => {
                m.kv_store_saved_blocks
                    .with_label_values(&[connector])
                    .inc();
                m.kv_store_saved_bytes
                    .with_label_values(&[connector])
                    .inc_by(bytes);
            }
            StoreEvent::Miss { reason } => m
                .kv_store_misses
                .with_label_values(&[connector, reason])
                .inc(),
        })),
    }
}
