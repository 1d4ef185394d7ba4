//! `splitserve proxy` (the xPyD front) and `splitserve up` (a whole pair on loopback).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use splitserve_engine::CpuList;
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
    /// Clients must send `Authorization: Bearer <key>`; the proxy sends it to the
    /// instances too. Prefer the environment variable: a command line is visible to all.
    #[arg(long, env = "SPLITSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
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

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The proxy's admin base URL (its --admin-port).
    #[arg(long)]
    pub proxy_admin: String,
    /// The decode instance to drain, as the proxy knows it (its --decode URL).
    #[arg(long)]
    pub decode: String,
    /// Put the instance back into rotation instead.
    #[arg(long)]
    pub undo: bool,
}

/// `splitserve drain`: asks the proxy to drain a decode instance and prints its report.
pub fn drain(a: DrainArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let path = if a.undo { "undrain" } else { "drain" };
        let url = format!("{}/admin/{path}", a.proxy_admin.trim_end_matches('/'));
        let r = reqwest::Client::new()
            .post(&url)
            .json(&serde_json::json!({ "decode": a.decode }))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.context("reading the proxy's answer")?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        anyhow::ensure!(status.is_success(), "{path} failed ({status})");
        Ok(())
    })
}

fn proxy_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

async fn run_proxy(a: &ProxyArgs, shutdown: tokio::sync::oneshot::Receiver<()>) -> Result<()> {
    let proxy = Proxy::new(Pools {
        prefill: a.prefill.clone(),
        decode: a.decode.clone(),
        disagg_threshold: a.disagg_threshold,
        decode_admin: a.decode_admin.clone(),
        api_key: a
            .api_key
            .as_deref()
            .and_then(splitserve_server::http::ApiKey::new),
        routing: a.routing.routing()?,
    })
    .map_err(anyhow::Error::msg)?;
    if let Some(port) = a.admin_port {
        let routes = splitserve_router::admin_router(proxy.clone());
        crate::spawn_admin(&a.admin_host, port, routes, "proxy admin endpoints (drain)").await?;
    }
    let addr = format!("{}:{}", a.host, a.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, prefill = ?a.prefill, decode = ?a.decode, "proxy serving OpenAI-compatible API");
    splitserve_router::serve(listener, proxy, async {
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

#[derive(clap::Args)]
pub struct UpArgs {
    /// Prefill instances.
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Decode instances.
    #[arg(long, default_value_t = 1)]
    pub decode: usize,
    /// GGUF model file (default: the default model, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Proxy port (the one URL clients use).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// First instance HTTP port; instances take the ports after it.
    #[arg(long, default_value_t = 8100)]
    pub base_port: u16,
    /// First admin port: decode instance i gets this + i, the proxy this - 1.
    #[arg(long, default_value_t = 8200)]
    pub admin_base_port: u16,
    /// First producer side-channel port.
    #[arg(long, default_value_t = 5600)]
    pub side_channel_port: u16,
    /// Threads for all instances together (default: all cores), split between them.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Threads of each prefill instance (overrides the split of --threads).
    #[arg(long)]
    pub prefill_threads: Option<usize>,
    /// Threads of each decode instance (overrides the split of --threads).
    #[arg(long)]
    pub decode_threads: Option<usize>,
    /// CPUs to run the instances' kernel threads on ("0-7"): each instance takes the next
    /// ones, as many as it has threads, so prefill and decode never share a core. Default:
    /// the CPUs this process may use, in order, when there are enough for every instance's
    /// threads. Without --threads, one thread per CPU listed.
    #[arg(long)]
    pub cpu_bind: Option<CpuList>,
    /// Leave the instances' threads wherever the OS puts them (no default --cpu-bind).
    #[arg(long, conflicts_with = "cpu_bind")]
    pub no_cpu_bind: bool,
    /// KV blocks per instance.
    #[arg(long, default_value_t = 2048)]
    pub num_kv_blocks: usize,
    /// Prompts shorter than this many tokens are prefilled on the decode instance.
    #[arg(long, default_value_t = 0)]
    pub disagg_threshold: usize,
    /// Extra flags passed to every `serve` (e.g. "--max-num-seqs 8").
    #[arg(long, allow_hyphen_values = true)]
    pub serve_args: Option<String>,
    /// Extra flags for the prefill instances only, after --serve-args. Default:
    /// "--long-prefill-token-threshold 64", so that short prompts do not queue behind a long
    /// one; give "" for none.
    #[arg(long, allow_hyphen_values = true)]
    pub prefill_args: Option<String>,
    /// Clients of the proxy and of each instance must send `Authorization: Bearer <key>`
    /// (passed to the instances in their environment). Prefer the environment variable.
    #[arg(long, env = "SPLITSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub routing: RoutingArgs,
}

fn split_flags(s: &Option<String>) -> Vec<String> {
    s.as_deref()
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Children that are killed when this is dropped (Ctrl-C, an error, the proxy's end).
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
        }
        for (_, c) in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// Children end with us even when we are killed outright (no destructor runs then).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

fn wait_listening(
    port: u16,
    children: &mut Children,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<()> {
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if stop.load(Ordering::Relaxed) {
            bail!("stopped by a signal while the instances were starting");
        }
        for (name, c) in &mut children.0 {
            if let Some(st) = c.try_wait()? {
                bail!("{name} exited while starting ({st})");
            }
        }
        if Instant::now() > deadline {
            bail!("port {port} did not open within the startup time");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kernel threads of instance `i` of `up` (prefill instances first): `total` split as evenly
/// as it goes, unless the role's own count is given; at least one.
pub(crate) fn instance_threads(
    total: usize,
    (prefill, decode): (usize, usize),
    (prefill_threads, decode_threads): (Option<usize>, Option<usize>),
    i: usize,
) -> usize {
    let n = prefill + decode;
    let split = (total / n + usize::from(i < total % n)).max(1);
    if i < prefill {
        prefill_threads.unwrap_or(split)
    } else {
        decode_threads.unwrap_or(split)
    }
    .max(1)
}

pub fn up(a: UpArgs) -> Result<()> {
    anyhow::ensure!(
        a.prefill >= 1 && a.decode >= 1,
        "--prefill and --decode must be at least 1"
    );
    let model = crate::model_path(&a.model)?;
    let exe = std::env::current_exe()?;
    let given = a.cpu_bind.clone().unwrap_or_default().0;
    let total = a.threads.unwrap_or_else(|| match given.len() {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    });
    // Ctrl-C or SIGTERM while the instances load their model must still stop them (the
    // children are dropped, so killed and waited for), not kill this process outright.
    let rt = proxy_runtime()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    rt.spawn(async move {
        crate::shutdown_signal().await;
        flag.store(true, Ordering::Relaxed);
    });
    let mut next_cpu = 0;
    let n = a.prefill + a.decode;
    let mut children = Children(Vec::new());
    // Kept to restart an instance that dies.
    let mut commands: Vec<Command> = Vec::new();
    let mut prefill_urls = Vec::new();
    let mut decode_urls = Vec::new();
    let mut decode_admin = Vec::new();
    let extra = split_flags(&a.serve_args);
    let prefill_extra = match &a.prefill_args {
        Some(_) => split_flags(&a.prefill_args),
        None => vec!["--long-prefill-token-threshold".into(), "64".into()],
    };
    let threads_of = |i: usize| {
        instance_threads(
            total,
            (a.prefill, a.decode),
            (a.prefill_threads, a.decode_threads),
            i,
        )
    };
    let need: usize = (0..n).map(threads_of).sum();
    // Disjoint cores by default, where there are enough: a prefill step then never takes a
    // decode instance's core.
    let bind = match (&a.cpu_bind, a.no_cpu_bind) {
        (Some(_), _) => given,
        (None, true) => Vec::new(),
        (None, false) => CpuList::allowed()
            .map(|c| c.0)
            .filter(|c| c.len() >= need)
            .unwrap_or_default(),
    };
    if !bind.is_empty() {
        tracing::info!(cpus = %CpuList(bind.clone()), "instances bound to disjoint CPUs (--no-cpu-bind to leave them to the OS)");
    }
    if !bind.is_empty() && need > bind.len() {
        bail!(
            "--cpu-bind lists {} CPUs; the {n} instances have {need} threads, one CPU each",
            bind.len()
        );
    }
    for i in 0..n {
        let producer = i < a.prefill;
        let threads = threads_of(i);
        let cpus = (!bind.is_empty()).then(|| CpuList(bind[next_cpu..next_cpu + threads].to_vec()));
        next_cpu += threads;
        let port = a.base_port + i as u16;
        let (role, name) = if producer {
            ("kv_producer", format!("prefill[{i}]"))
        } else {
            ("kv_consumer", format!("decode[{}]", i - a.prefill))
        };
        let side = a.side_channel_port + i as u16;
        let kv = format!(
            r#"{{"kv_connector":"TcpConnector","kv_role":"{role}","kv_connector_extra_config":{{"side_channel_port":{side}}}}}"#
        );
        let mut child = Command::new(&exe);
        child
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .args(["--port", &port.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--num-kv-blocks", &a.num_kv_blocks.to_string()])
            .args(["--kv-transfer-config", &kv])
            .args(&extra);
        if let Some(c) = &cpus {
            child.args(["--cpu-bind", &c.to_string()]);
        }
        if producer {
            child.args(&prefill_extra);
        }
        let admin_port = a.admin_base_port + (i - a.prefill.min(i)) as u16;
        if !producer {
            // Decode instances can be drained: their requests migrate to the others, and
            // only to them.
            let others: Vec<String> = (a.prefill..n)
                .filter(|&j| j != i)
                .map(|j| {
                    format!(
                        "http://127.0.0.1:{}",
                        a.admin_base_port + (j - a.prefill) as u16
                    )
                })
                .collect();
            child.args(["--admin-port", &admin_port.to_string()]);
            if !others.is_empty() {
                child.args(["--migrate-targets", &others.join(",")]);
            }
        }
        // The key travels in the environment, never on a command line.
        match &a.api_key {
            Some(k) => child.env("SPLITSERVE_API_KEY", k),
            None => child.env_remove("SPLITSERVE_API_KEY"),
        };
        die_with_parent(&mut child);
        let mut command = child;
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        commands.push(command);
        let url = format!("http://127.0.0.1:{port}");
        println!(
            "{name}: {url} ({role}, {threads} thread{}{}{})",
            if threads == 1 { "" } else { "s" },
            match &cpus {
                Some(c) if c.0.len() == 1 => format!(" on CPU {c}"),
                Some(c) => format!(" on CPUs {c}"),
                None => String::new(),
            },
            if producer {
                format!(", KV side channel 127.0.0.1:{side}")
            } else {
                format!(", admin http://127.0.0.1:{admin_port}")
            }
        );
        if producer {
            prefill_urls.push(url);
        } else {
            decode_urls.push(url);
            decode_admin.push(format!("http://127.0.0.1:{admin_port}"));
        }
        children.0.push((name, child));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..n {
        wait_listening(a.base_port + i as u16, &mut children, deadline, &stop)?;
    }
    let args = ProxyArgs {
        prefill: prefill_urls,
        decode: decode_urls,
        host: "127.0.0.1".into(),
        port: a.port,
        disagg_threshold: a.disagg_threshold,
        decode_admin,
        admin_port: Some(a.admin_base_port.saturating_sub(1)),
        admin_host: "127.0.0.1".into(),
        api_key: a.api_key.clone(),
        routing: a.routing.clone(),
    };
    println!(
        "proxy: http://127.0.0.1:{} (OpenAI API; Ctrl-C stops everything), admin http://127.0.0.1:{}",
        a.port,
        a.admin_base_port.saturating_sub(1)
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A watcher restarts an instance that dies (with backoff; the others keep serving), and
    // ends the proxy on a stop signal that came before the proxy listened for one.
    // If the thread cannot start, the closure (and the children in it) is dropped, which
    // stops them.
    let watcher = std::thread::Builder::new()
        .name("up-watcher".into())
        .spawn(move || -> Children {
            supervise(&mut children, &mut commands, &stop, &tx);
            // A stop signal: end the proxy too (a no-op if it already ended).
            let _ = tx.send(());
            children
        })
        .context("start the thread that watches the instances")?;
    let r = rt.block_on(run_proxy(&args, rx));
    drop(rt);
    // The proxy's receiver is gone now: the watcher hands the children back to be killed.
    let children = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))?;
    drop(children);
    r
}

/// First wait before restarting a dead instance; it doubles per quick death, up to the max.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An instance that ran this long before dying starts over at the first backoff.
const RESTART_STABLE: Duration = Duration::from_secs(60);

/// Restarts children that exit, each with its own backoff, until a stop is asked for
/// (signal, or the proxy ended and closed `tx`).
fn supervise(
    children: &mut Children,
    commands: &mut [Command],
    stop: &AtomicBool,
    tx: &tokio::sync::oneshot::Sender<()>,
) {
    struct State {
        started: Instant,
        failures: u32,
        due: Option<Instant>,
    }
    let now = Instant::now();
    let mut st: Vec<State> = children
        .0
        .iter()
        .map(|_| State {
            started: now,
            failures: 0,
            due: None,
        })
        .collect();
    let stopping = || stop.load(Ordering::Relaxed) || tx.is_closed();
    while !stopping() {
        for (i, (name, c)) in children.0.iter_mut().enumerate() {
            let s = &mut st[i];
            let now = Instant::now();
            if s.due.is_none() {
                if let Ok(Some(status)) = c.try_wait() {
                    if now.duration_since(s.started) >= RESTART_STABLE {
                        s.failures = 0;
                    }
                    let wait = RESTART_BACKOFF
                        .saturating_mul(1 << s.failures.min(5))
                        .min(RESTART_BACKOFF_MAX);
                    s.failures += 1;
                    tracing::error!(instance = %name, %status, "instance exited; restarting it in {wait:?} (the others keep serving)");
                    eprintln!("{name} exited ({status}); restarting it in {wait:?}");
                    s.due = Some(now + wait);
                }
            }
            if s.due.is_some_and(|d| now >= d) {
                match commands[i].spawn() {
                    Ok(child) => {
                        *c = child;
                        s.started = now;
                        s.due = None;
                        tracing::info!(instance = %name, "instance restarted");
                        eprintln!("{name} restarted");
                    }
                    Err(e) => {
                        tracing::error!(instance = %name, error = %e, "cannot restart the instance; trying again");
                        s.due = Some(now + RESTART_BACKOFF_MAX);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
