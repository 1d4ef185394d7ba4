//! `splitserve proxy`: the xPyD front (the router crate) as a command, with its flags.

use std::time::Duration;

use anyhow::Result;
use splitserve_router::{Pools, Proxy};

/// `proxy`'s flags; each help is one line so that `--help` fits a screen (docs/pd.md says more).
#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Prefill (kv_producer) instance URLs
    #[arg(long, value_name = "URL", num_args = 1.., required = true)]
    pub prefill: Vec<String>,
    /// Decode (kv_consumer) instance URLs
    #[arg(long, value_name = "URL", num_args = 1.., required = true)]
    pub decode: Vec<String>,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Prefill shorter prompts on the decode side
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub disagg_threshold: usize,
    /// Decode instances' admin URLs, in --decode order
    #[arg(long, value_name = "URL", num_args = 1..)]
    pub decode_admin: Vec<String>,
    /// Port of the proxy's admin endpoints
    #[arg(long, value_name = "PORT")]
    pub admin_port: Option<u16>,
    /// Address of the admin listener
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    pub admin_host: String,
    /// The API key (the proxy sends it to the instances too) and the header-read timeout.
    #[command(flatten)]
    pub http: crate::serve::HttpArgs,
    #[command(flatten, next_help_heading = "Routing (docs/pd.md)")]
    pub routing: RoutingArgs,
}

/// How the proxy chooses instances, watches their health and falls back.
#[derive(clap::Args, Clone, Debug)]
pub struct RoutingArgs {
    /// Prefill choice (policies: docs/pd.md)
    #[arg(long, value_name = "POLICY", default_value = "least_load")]
    pub prefill_policy: String,
    /// Decode choice (same policies)
    #[arg(long, value_name = "POLICY", default_value = "free_blocks")]
    pub decode_policy: String,
    /// Seconds between /health polls
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub health_interval_s: f64,
    /// Seconds a /health poll may take
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    pub health_timeout_s: f64,
    /// Failures in a row that take an instance out
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub failure_threshold: u32,
    /// Successes in a row that bring it back
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub success_threshold: u32,
    /// Seconds a failed instance rests
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    pub circuit_cooldown_s: f64,
    /// Queue at which prefill moves to decode (0: off)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub prefill_busy_threshold: u64,
    /// 502 rather than prefill on a decode instance
    #[arg(long)]
    pub no_fallback: bool,
    /// Seconds between DNS lookups of hosts (0: off)
    #[arg(long, value_name = "S", default_value_t = 0.0)]
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
