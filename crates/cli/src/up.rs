//! `splitserve up`: a whole xPyD deployment on loopback (instances and the proxy),
//! supervised.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use splitserve_engine::CpuList;

use crate::proxy::{proxy_runtime, run_proxy, ProxyArgs, RoutingArgs};

/// `up`'s flags; each help is one line so that `--help` fits a screen (docs/pd.md says more).
#[derive(clap::Args)]
pub struct UpArgs {
    /// Prefill instances
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub prefill: usize,
    /// Decode instances
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub decode: usize,
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// The proxy's port: the URL clients use
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// First instance HTTP port
    #[arg(long, value_name = "PORT", default_value_t = 8100)]
    pub base_port: u16,
    /// First admin port (the proxy's is one below)
    #[arg(long, value_name = "PORT", default_value_t = 8200)]
    pub admin_base_port: u16,
    /// First producer side-channel port
    #[arg(long, value_name = "PORT", default_value_t = 5600)]
    pub side_channel_port: u16,
    /// Threads of all instances (default: all cores)
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Threads of each prefill instance
    #[arg(long, value_name = "N")]
    pub prefill_threads: Option<usize>,
    /// Threads of each decode instance
    #[arg(long, value_name = "N")]
    pub decode_threads: Option<usize>,
    /// CPUs, taken in turn (default: ours, roles apart)
    #[arg(long, value_name = "CPUS")]
    pub cpu_bind: Option<CpuList>,
    /// Leave threads where the OS puts them
    #[arg(long, conflicts_with = "cpu_bind")]
    pub no_cpu_bind: bool,
    /// KV blocks per instance
    #[arg(long, value_name = "N", default_value_t = 2048)]
    pub num_kv_blocks: usize,
    /// Prefill shorter prompts on the decode side
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub disagg_threshold: usize,
    /// The pair's connector (or NixlConnector)
    #[arg(long, value_name = "NAME", default_value = "TcpConnector",
          value_parser = ["TcpConnector", "NixlConnector"], hide_possible_values = true)]
    pub kv_connector: String,
    /// Extra flags for every `serve`
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    pub serve_args: Option<String>,
    /// Extra flags for prefill (default: threshold 64)
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    pub prefill_args: Option<String>,
    /// Bearer key for all; env SPLITSERVE_API_KEY
    #[arg(long, value_name = "KEY", env = "SPLITSERVE_API_KEY", hide_env = true)]
    pub api_key: Option<String>,
    /// Run the pair on hosts.sh's hosts NAME (root)
    #[arg(long, value_name = "NAME")]
    pub hosts: Option<String>,
    /// The hosts harness, for --hosts
    #[arg(long, value_name = "PATH", default_value = "deploy/netns/hosts.sh")]
    pub hosts_script: PathBuf,
    #[command(flatten, next_help_heading = "Routing (docs/pd.md)")]
    pub routing: RoutingArgs,
}

/// Where each role runs with `--hosts`: its host and address (prefill, decode).
struct Placement {
    hosts: crate::hosts::Hosts,
    addr: [String; 2],
    /// The pair's shared secret, for the children's environment only.
    secret: String,
}

impl Placement {
    fn of(a: &UpArgs) -> Result<Option<Self>> {
        let Some(name) = &a.hosts else {
            return Ok(None);
        };
        anyhow::ensure!(
            a.prefill == 1 && a.decode == 1,
            "--hosts runs one prefill and one decode instance"
        );
        let hosts = crate::hosts::Hosts::existing(&a.hosts_script, name);
        Ok(Some(Self {
            addr: [hosts.addr("prefill")?, hosts.addr("decode")?],
            hosts,
            secret: crate::hosts::pair_secret()?,
        }))
    }
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

fn wait_listening(
    host: &str,
    port: u16,
    children: &mut Children,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<()> {
    loop {
        if TcpStream::connect((host, port)).is_ok() {
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
    let hosts = Placement::of(&a)?;
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
        let host = hosts
            .as_ref()
            .map_or("127.0.0.1", |h| &h.addr[usize::from(!producer)]);
        let connector = &a.kv_connector;
        let kv = match &hosts {
            None => format!(
                r#"{{"kv_connector":"{connector}","kv_role":"{role}","kv_connector_extra_config":{{"side_channel_port":{side}}}}}"#
            ),
            Some(_) => format!(
                r#"{{"kv_connector":"{connector}","kv_role":"{role}","kv_connector_extra_config":{{"side_channel_host":"{host}","side_channel_port":{side},"secret_env":"SPLITSERVE_KV_SECRET"}}}}"#
            ),
        };
        let mut child = match &hosts {
            None => Command::new(&exe),
            Some(h) => {
                let mut c = h
                    .hosts
                    .exec(if producer { "prefill" } else { "decode" }, &exe);
                c.env("SPLITSERVE_KV_SECRET", &h.secret);
                c
            }
        };
        child
            .arg("serve")
            .args(["--host", host])
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
        // Across hosts one decode instance has no other to migrate to: no admin listener.
        if !producer && hosts.is_none() {
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
        crate::child::die_with_parent(&mut child);
        let mut command = child;
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        commands.push(command);
        let url = format!("http://{host}:{port}");
        println!(
            "{name}: {url} ({role}, {threads} thread{}{}{})",
            if threads == 1 { "" } else { "s" },
            match &cpus {
                Some(c) if c.0.len() == 1 => format!(" on CPU {c}"),
                Some(c) => format!(" on CPUs {c}"),
                None => String::new(),
            },
            if producer {
                format!(", KV side channel {host}:{side}")
            } else if hosts.is_none() {
                format!(", admin http://127.0.0.1:{admin_port}")
            } else {
                String::new()
            }
        );
        if producer {
            prefill_urls.push(url);
        } else {
            decode_urls.push(url);
            if hosts.is_none() {
                decode_admin.push(format!("http://127.0.0.1:{admin_port}"));
            }
        }
        children.0.push((name, child));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..n {
        let host = hosts
            .as_ref()
            .map_or("127.0.0.1", |h| &h.addr[usize::from(i >= a.prefill)]);
        wait_listening(host, a.base_port + i as u16, &mut children, deadline, &stop)?;
    }
    // The decode instances' CPUs run their engines only: every other thread (this proxy's,
    // each instance's HTTP and KV transfer threads, and those they start later) moves to
    // the prefill instances' CPUs, whose work waits better than a decode step does.
    let prefill_cpus: usize = (0..a.prefill).map(threads_of).sum();
    if prefill_cpus > 0 && prefill_cpus < bind.len() {
        let (spare, decode) = (
            CpuList(bind[..prefill_cpus].to_vec()),
            &bind[prefill_cpus..],
        );
        // Our own main thread stays as it is: the instances restarted later are its children,
        // and their engines bind to the decode CPUs (the moved threads' children could not).
        let pids =
            std::iter::once(std::process::id()).chain(children.0.iter().map(|(_, c)| c.id()));
        let moved: usize = pids.map(|pid| keep_off(pid, decode, &spare)).sum();
        tracing::info!(cpus = %spare, threads = moved, "I/O threads kept off the decode CPUs");
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
        http: crate::serve::HttpArgs {
            api_key: a.api_key.clone(),
            header_read_timeout_s: 10.0,
        },
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

/// Moves process `pid`'s threads to `spare`, but its engine threads (the step loop, and
/// compute threads bound within `decode`); how many moved.
fn keep_off(pid: u32, decode: &[usize], spare: &CpuList) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut moved = 0;
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() && tid as u32 == pid {
            continue;
        }
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let mask: Option<CpuList> = std::fs::read_to_string(t.path().join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .and_then(|v| v.trim().parse().ok())
            });
        let bound_to_decode = mask.is_some_and(|m| m.0.iter().all(|c| decode.contains(c)));
        if comm.starts_with("splitserve-engi") || bound_to_decode {
            continue;
        }
        if spare.confine_thread(tid).is_ok() {
            moved += 1;
        }
    }
    moved
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
