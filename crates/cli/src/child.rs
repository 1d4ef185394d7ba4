//! Child processes of the commands that start others (`up`, the benchmarks): started so
//! that they die with us, stopped on drop, waited for until they answer `/health`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// A child process. On drop it is asked to stop (SIGTERM) and waited for: `up` then stops
/// its own children, so the next run finds the ports free. Past 10 s it is killed.
pub(crate) struct Kill(pub(crate) Child);

impl Drop for Kill {
    fn drop(&mut self) {
        // Already reaped (it died while starting): its pid may belong to someone else now.
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        #[cfg(unix)]
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: signals our own child, not reaped (checked above), so the pid is its.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            tracing::warn!(
                pid,
                "a child did not stop within 10 s of SIGTERM; killing it"
            );
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
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

/// Starts a child that dies with us and logs warnings only, unless the user asks for
/// more (e.g. the step trace).
pub(crate) fn spawn_quiet(mut cmd: Command) -> std::io::Result<Kill> {
    die_with_parent(&mut cmd);
    cmd.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
    )
    .stdout(Stdio::null())
    .spawn()
    .map(Kill)
}

pub(crate) async fn wait_ready(
    client: &reqwest::Client,
    url: &str,
    child: &mut Kill,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{url}/health")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Some(st) = child.0.try_wait()? {
            bail!("the process exited while starting ({st})");
        }
        if t0.elapsed() > Duration::from_secs(180) {
            bail!("{url} not ready after 180 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// POSTs `body` as JSON to `url`; the answer's JSON, or an error with its status.
pub(crate) async fn post_json(
    client: &reqwest::Client,
    url: String,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let r = client.post(url).json(&body).send().await?;
    let st = r.status();
    let v: serde_json::Value = r.json().await?;
    anyhow::ensure!(st.is_success(), "{st}: {v}");
    Ok(v)
}

/// The `/metrics` text of the server at `url`.
pub(crate) async fn metrics(client: &reqwest::Client, url: &str) -> Result<String> {
    Ok(client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// A counter or a histogram's `_sum`/`_count` from a `/metrics` text (0 when absent).
pub(crate) fn counter(text: &str, name: &str) -> f64 {
    let want = format!("splitserve:{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want)?.trim().parse().ok())
        .unwrap_or(0.0)
}
