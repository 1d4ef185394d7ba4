//! `splitserve proxy`: the xPyD front (the router crate) as a command, with its flags.

use std::time::Duration;

use anyhow::Result;
use splitserve_router::{Pools, Proxy};

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Prefill (kv_producer) instance base URLs.
    #[arg(long, num_args = 1.., required = true)]
    pub prefill: Vec<String>,
    /// Decode (kv_consumer) instance base URLs.
    #[arg(long, num_args = 1.., required = true)]
    pub decode: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Prompts shorter than this many tokens are prefilled on the decode instance
    /// (conditional disaggregation); 0 sends every request through a prefill instance.
    #[arg(long, default_value_t = 0)]
    pub disagg_threshold: usize,
    /// Admin base URL of each decode instance (their `serve --admin-port`), in --decode's
    /// order; needed to drain one.
    #[arg(long, num_args = 1..)]
    pub decode_admin: Vec<String>,
    /// Serve the proxy's admin endpoints (drain, undrain, instances) on this port.
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// Address of the admin listener; loopback unless you mean otherwise (then the admin
    /// endpoints require the token in $SPLITSERVE_ADMIN_TOKEN).
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_host: String,
    /// The API key (the proxy sends it to the instances too) and the header-read timeout.
    #[command(flatten)]
    pub http: crate::serve::HttpArgs,
    #[command(flatten)]
    pub routing: RoutingArgs,
}

/// How the proxy chooses instances, watches their health and falls back.
#[derive(clap::Args, Clone, Debug)]
pub struct RoutingArgs {
    /// Prefill instance choice: round_robin, random, least_load, power_of_two, free_blocks
    /// or cache_aware.
    #[arg(long, default_value = "least_load")]
    pub prefill_policy: String,
    /// Decode instance choice (same names); free_blocks: the most free KV blocks after
    /// this request.
    #[arg(long, default_value = "free_blocks")]
    pub decode_policy: String,
    /// Seconds between polls of every instance's /health.
    #[arg(long, default_value_t = 1.0)]
    pub health_interval_s: f64,
    /// Seconds a /health poll may take.
    #[arg(long, default_value_t = 2.0)]
    pub health_timeout_s: f64,
    /// Failures in a row (unreachable, 5xx, failed poll) that take an instance out.
    #[arg(long, default_value_t = 3)]
    pub failure_threshold: u32,
    /// Successes in a row, after the cool-down, that bring it back.
    #[arg(long, default_value_t = 1)]
    pub success_threshold: u32,
    /// Seconds an instance that failed gets no requests before it is tried again.
    #[arg(long, default_value_t = 2.0)]
    pub circuit_cooldown_s: f64,
    /// Prefill on the decode instance while every prefill instance has at least this many
    /// requests running, waiting or on their way (0: never).
    #[arg(long, default_value_t = 0)]
    pub prefill_busy_threshold: u64,
    /// Answer 502 instead of prefilling on a decode instance when no prefill instance can.
    #[arg(long)]
    pub no_fallback: bool,
    /// Re-resolve instances named by host name this often, every address an instance
    /// (a Kubernetes headless Service); 0: use the URLs as given.
    #[arg(long, default_value_t = 0.0)]
    pub resolve_interval_s: f64,
}

impl RoutingArgs {
    pub fn routing(&self) -> Result<splitserve_router::Routing> {
        let secs = |name: &str, v: f64| -> Result<Duration> {
            anyhow::ensure!(
                v.is_finite() && (0.05..=3600.0).contains(&v),
                "--{name} must be between 0.05 and 3600 seconds, got {v}"
            );
            Ok(Duration::from_secs_f64(v))
        };
        Ok(splitserve_router::Routing {
            prefill_policy: self.prefill_policy.clone(),
            decode_policy: self.decode_policy.clone(),
            health_interval: secs("health-interval-s", self.health_interval_s)?,
            health_timeout: secs("health-timeout-s", self.health_timeout_s)?,
            thresholds: splitserve_router::health::Thresholds {
                failure_threshold: self.failure_threshold,
                success_threshold: self.success_threshold,
                cooldown: secs("circuit-cooldown-s", self.circuit_cooldown_s)?,
            },
            prefill_busy_threshold: self.prefill_busy_threshold,
            fallback: !self.no_fallback,
            resolve_interval: if self.resolve_interval_s == 0.0 {
                None
            } else {
                Some(secs("resolve-interval-s", self.resolve_interval_s)?)
            },
        })
    }
}

pub(crate) fn proxy_runtime() -> Result<tokio::runtime::Runtime> {
    // Two I/O threads, so that one slow body (a 4 MiB prompt's JSON) cannot stall the rest.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub(crate) async fn run_proxy(
    a: &ProxyArgs,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> Result<()> {
    let proxy = Proxy::new(Pools {
        prefill: a.prefill.clone(),
        decode: a.decode.clone(),
        disagg_threshold: a.disagg_threshold,
        decode_admin: a.decode_admin.clone(),
        api_key: a.http.api_key(),
        routing: a.routing.routing()?,
    })
    .map_err(anyhow::Error::msg)?;
    if let Some(port) = a.admin_port {
        let routes = splitserve_router::admin_router(proxy.clone());
        crate::spawn_admin(&a.admin_host, port, routes, "proxy admin endpoints (drain)").await?;
    }
    let listener = crate::listen(&a.host, a.port, "the proxy's listener").await?;
    tracing::info!(addr = %listener.local_addr()?, prefill = ?a.prefill, decode = ?a.decode, "proxy serving OpenAI-compatible API");
    let header_timeout = a.http.options()?.header_read_timeout;
    splitserve_router::serve(listener, proxy, header_timeout, async {
        tokio::select! {
            _ = crate::shutdown_signal() => {}
            _ = shutdown => {}
        }
    })
    .await?;
    Ok(())
}

pub fn proxy(a: ProxyArgs) -> Result<()> {
    let (_tx, rx) = tokio::sync::oneshot::channel();
    proxy_runtime()?.block_on(run_proxy(&a, rx))
}
