//! The xPyD router: one OpenAI-compatible front over pools of prefill (`kv_producer`) and
//! decode (`kv_consumer`) instances.
//!
//! Per request: a prefill instance gets the request with `max_tokens=1`, `stream=false` and
//! `kv_transfer_params: {"do_remote_decode": true}`; its response's `kv_transfer_params` go
//! with the original request to a decode instance, whose answer (SSE or JSON) is passed
//! through. Each pool's instance is chosen by its policy (`policy`) among those whose
//! circuit is not open (`health`), from loads a poller keeps fresh (`pool`); an instance
//! that cannot be reached is retried on the next before anything reached the client. When
//! no prefill instance can take the request, it is prefilled on its decode instance
//! (fallback to colocated); so is a short prompt, or any prompt while every prefill queue is
//! over a threshold (conditional disaggregation; `proxy`). Errors before the first byte are
//! 502/503 with an OpenAI error body; after it, an SSE error event and the end of the stream.
//!
//! Admin routes (on their own loopback listener, see [`admin_router`]) drain a decode
//! instance: it leaves the rotation and its live requests migrate to the others.

mod admin;
pub mod health;
mod metrics;
pub mod policy;
mod pool;
mod proxy;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use splitserve_server::http::ApiKey;

pub use admin::admin_router;
use metrics::Metrics;
use pool::Pool;

/// The instances behind the proxy and how requests are spread over them.
#[derive(Clone, Debug)]
pub struct Pools {
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
    /// Prompts shorter than this many tokens are prefilled on the decode instance itself
    /// (conditional disaggregation); 0 disaggregates every request.
    pub disagg_threshold: usize,
    /// Admin base URL of each decode instance, in `decode`'s order (empty: no draining).
    pub decode_admin: Vec<String>,
    /// Clients must present this key; the proxy presents it to the instances too.
    pub api_key: Option<ApiKey>,
    pub routing: Routing,
}

/// Policies, health checks and the fallback.
#[derive(Clone, Debug)]
pub struct Routing {
    pub prefill_policy: String,
    pub decode_policy: String,
    /// `/health` of every instance this often, each with this timeout.
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub thresholds: health::Thresholds,
    /// Prefill locally while every prefill instance has at least this many requests
    /// running, waiting or on their way (0: never).
    pub prefill_busy_threshold: u64,
    /// Prefill on the decode instance when no prefill instance can (else a 502).
    pub fallback: bool,
    /// Re-resolve members named by host name this often (`None`: use URLs as given).
    pub resolve_interval: Option<Duration>,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            prefill_policy: "least_load".into(),
            decode_policy: "free_blocks".into(),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(2),
            thresholds: health::Thresholds::default(),
            prefill_busy_threshold: 0,
            fallback: true,
            resolve_interval: None,
        }
    }
}

struct Inner {
    /// [prefill, decode].
    pools: Arc<[Pool; 2]>,
    disagg_threshold: usize,
    routing: Routing,
    api_key: Option<ApiKey>,
    client: reqwest::Client,
    metrics: Metrics,
    /// Whether the last request that wanted a prefill instance fell back (for logging the
    /// changes only).
    falling_back: AtomicBool,
}

#[derive(Clone)]
pub struct Proxy(Arc<Inner>);

impl Proxy {
    /// The proxy and its `/health` poller (call inside a tokio runtime).
    pub fn new(pools: Pools) -> Result<Self, String> {
        if pools.prefill.is_empty() || pools.decode.is_empty() {
            return Err("give at least one --prefill and one --decode URL".into());
        }
        if !pools.decode_admin.is_empty() && pools.decode_admin.len() != pools.decode.len() {
            return Err(format!(
                "give one --decode-admin URL per --decode URL ({} and {})",
                pools.decode_admin.len(),
                pools.decode.len()
            ));
        }
        let r = &pools.routing;
        let secs = |d: Duration| d.as_secs_f64();
        if !(0.05..=3600.0).contains(&secs(r.health_interval))
            || !(0.05..=600.0).contains(&secs(r.health_timeout))
        {
            return Err("health interval and timeout must be between 0.05 s and an hour".into());
        }
        if r.thresholds.failure_threshold == 0 || r.thresholds.success_threshold == 0 {
            return Err("failure and success thresholds must be at least 1".into());
        }
        let trim = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect()
        };
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(v) = pools.api_key.as_ref().and_then(ApiKey::header) {
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .default_headers(headers)
            .build()
            .map_err(|e| e.to_string())?;
        let t = r.thresholds;
        let both = Arc::new([
            Pool::new(
                "prefill",
                trim(pools.prefill),
                vec![],
                policy::by_name(&r.prefill_policy)?,
                t,
            ),
            Pool::new(
                "decode",
                trim(pools.decode),
                trim(pools.decode_admin),
                policy::by_name(&r.decode_policy)?,
                t,
            ),
        ]);
        pool::spawn_poller(
            Arc::downgrade(&both),
            client.clone(),
            r.health_interval,
            r.health_timeout,
            r.resolve_interval,
        );
        Ok(Self(Arc::new(Inner {
            pools: both,
            disagg_threshold: pools.disagg_threshold,
            routing: pools.routing,
            api_key: pools.api_key,
            client,
            metrics: Metrics::new(),
            falling_back: AtomicBool::new(false),
        })))
    }

    fn prefill_pool(&self) -> &Pool {
        &self.0.pools[0]
    }

    fn decode_pool(&self) -> &Pool {
        &self.0.pools[1]
    }
}

/// The proxy's routes: the API behind `--api-key` when one is set, `/health` and
/// `/metrics` open.
pub fn router(proxy: Proxy) -> Router {
    let key = proxy.0.api_key.clone();
    let protected = Router::new()
        .route("/v1/completions", post(proxy::completions))
        .route("/v1/chat/completions", post(proxy::chat))
        .route("/v1/models", get(proxy::models))
        .with_state(proxy.clone());
    let open = Router::new()
        .route("/health", get(proxy::health))
        .route("/metrics", get(proxy::metrics))
        .with_state(proxy);
    splitserve_server::http::with_layers(protected, open, key)
}

/// Serves the proxy on `listener`; a client gets `header_timeout` to send a request's headers.
pub async fn serve(
    listener: tokio::net::TcpListener,
    proxy: Proxy,
    header_timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    splitserve_server::http::serve_router(listener, router(proxy), header_timeout, shutdown).await
}
