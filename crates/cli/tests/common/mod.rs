//! Real `splitserve` processes on loopback for integration tests.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A child process killed when dropped; its stderr goes to a log file shown on failure.
pub struct Proc {
    child: Mutex<Option<Child>>,
    pub port: u16,
    host: String,
    log: PathBuf,
}

impl Proc {
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        let g = self.child.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|c| c.id())
    }

    pub fn kill(&self) {
        let mut g = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut c) = g.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and returns the exit status; panics if it has not exited within 30 s.
    #[cfg(unix)]
    pub fn terminate(&self) -> std::process::ExitStatus {
        let mut g = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let c = g.as_mut().expect("process still held");
        let pid = i32::try_from(c.id()).expect("pid");
        // SAFETY: our own child, not yet reaped, so the pid is its.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                g.take();
                return st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{} still running 30 s after SIGTERM",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics with the log's tail if the process has exited.
    pub fn check_alive(&self) {
        let mut g = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: String = log
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("{} exited ({st}):\n{tail}", self.url());
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A loopback port free now, from the same range as [`free_port_range`]: tests pick ports
/// before the servers bind them, and meanwhile a client's outgoing socket could take a port
/// from the ephemeral range (a server then fails to start; seen in a drain test).
pub fn free_port() -> u16 {
    free_port_range(1)
}

/// The first of `n` consecutive loopback ports that are free now, below Linux's ephemeral
/// range (32768 and up), where outgoing connections take their local ports: a command that
/// derives its ports from one base (`up`, `bench pd`) must not meet a client's socket there.
/// Each call in this process starts its search in a different place.
pub fn free_port_range(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LO: u16 = 20000;
    const SPAN: u16 = 12000;
    // Test processes may run side by side: each starts somewhere of its own; within one,
    // successive calls start 397 ports apart.
    static SALT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    let salt = *SALT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        ((std::process::id() ^ nanos) % u32::from(SPAN)) as u16
    });
    for _ in 0..200 {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = LO + (salt.wrapping_add(k.wrapping_mul(397)) % (SPAN - n));
        let held: Vec<TcpListener> = (base..base + n)
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!(
        "no {n} consecutive free loopback ports in {LO}..{}",
        LO + SPAN
    );
}

pub fn model() -> String {
    splitserve_engine::model_file::default_model(true)
        .expect("default model")
        .display()
        .to_string()
}

/// Starts `splitserve <args> --port P`.
pub fn spawn(args: &[String]) -> Proc {
    spawn_env(args, &[])
}

/// [`spawn`] with extra environment variables.
pub fn spawn_env(args: &[String], env: &[(&str, &str)]) -> Proc {
    spawn_at(free_port(), args, env)
}

/// [`spawn_env`] on a given port (to restart an instance where it was).
pub fn spawn_at(port: u16, args: &[String], env: &[(&str, &str)]) -> Proc {
    spawn_on(None, "127.0.0.1", port, args, env)
}

/// [`spawn_at`] inside network namespace `netns` (when given; `ip netns exec`), listening on
/// `host`.
pub fn spawn_on(
    netns: Option<&str>,
    host: &str,
    port: u16,
    args: &[String],
    env: &[(&str, &str)],
) -> Proc {
    let log = std::env::temp_dir().join(format!(
        "splitserve-test-{}-{host}-{port}.log",
        std::process::id()
    ));
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_splitserve")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_splitserve")),
    };
    let child = cmd
        .args(args)
        .args(["--port", &port.to_string()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .spawn()
        .expect("start splitserve");
    Proc {
        child: Mutex::new(Some(child)),
        port,
        host: host.to_string(),
        log,
    }
}

/// `up` with the default model and a 256-block pool on a free port range, plus `extra`.
pub fn up(extra: &[&str]) -> Proc {
    up_at(free_port_range(24), extra)
}

/// [`up`] with its instances at `base` and `base + 1`, the side channel at `base + 10` and
/// admin ports from `base + 21` (24 ports from `base`).
pub fn up_at(base: u16, extra: &[&str]) -> Proc {
    let mut a: Vec<String> = vec!["up".into(), "--model".into(), model()];
    a.extend(extra.iter().map(|s| s.to_string()));
    a.extend([
        "--num-kv-blocks".into(),
        "256".into(),
        "--base-port".into(),
        base.to_string(),
        "--side-channel-port".into(),
        (base + 10).to_string(),
        "--admin-base-port".into(),
        (base + 21).to_string(),
    ]);
    spawn(&a)
}

/// `serve` with the default model, one thread, and an optional KV role.
pub fn serve(extra: &[&str], kv: Option<String>) -> Proc {
    serve_env(extra, kv, &[])
}

/// [`serve`] with extra environment variables.
pub fn serve_env(extra: &[&str], kv: Option<String>, env: &[(&str, &str)]) -> Proc {
    spawn_env(&serve_args(extra, kv), env)
}

/// [`serve`] on a given port.
pub fn serve_at(port: u16, extra: &[&str], kv: Option<String>) -> Proc {
    spawn_at(port, &serve_args(extra, kv), &[])
}

fn serve_args(extra: &[&str], kv: Option<String>) -> Vec<String> {
    let mut a: Vec<String> = vec!["serve".into()];
    if !extra.contains(&"--model") {
        a.extend(["--model".into(), model()]);
    }
    if !extra.contains(&"--threads") {
        a.extend(["--threads".into(), "1".into()]);
    }
    if !extra.contains(&"--num-kv-blocks") {
        a.extend(["--num-kv-blocks".into(), "512".into()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    if let Some(kv) = kv {
        a.push("--kv-transfer-config".into());
        a.push(kv);
    }
    a
}

pub fn kv_config(role: &str, side_port: u16, hold_s: f64) -> String {
    kv_config_for("TcpConnector", role, side_port, hold_s)
}

/// As [`kv_config`], for a connector with a side channel (TcpConnector, NixlConnector).
#[allow(dead_code)]
pub fn kv_config_for(connector: &str, role: &str, side_port: u16, hold_s: f64) -> String {
    format!(
        r#"{{"kv_connector":"{connector}","kv_role":"{role}","kv_buffer_device":"cpu","kv_connector_extra_config":{{"side_channel_host":"127.0.0.1","side_channel_port":{side_port},"hold_timeout_s":{hold_s}}}}}"#
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client")
}

/// Waits until `/health` answers 200.
pub async fn ready(p: &Proc) {
    let c = client();
    let t0 = Instant::now();
    loop {
        p.check_alive();
        if let Ok(r) = c.get(format!("{}/health", p.url())).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{} did not become ready",
            p.url()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn health(p: &Proc) -> Value {
    client()
        .get(format!("{}/health", p.url()))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("health json")
}

/// Waits until the engine's free blocks equal its total; returns how long that took.
pub async fn all_free(p: &Proc, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let h = health(p).await;
        if h["free_blocks"] == h["total_blocks"]
            && h["free_window_slots"] == h["total_window_slots"]
            && h["running"] == 0
            && h["waiting"] == 0
        {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{}: blocks not all free within {within:?}: {h}",
            p.url()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/metrics` as text.
pub async fn metrics_text(p: &Proc) -> String {
    client()
        .get(format!("{}/metrics", p.url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// A gauge or counter from `/metrics`.
pub async fn metric(p: &Proc, name: &str) -> f64 {
    metrics_text(p)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&format!("splitserve:{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found"))
}

pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(Value::Null);
    (status, v)
}
