//! Hosts on this machine: the network namespaces of `deploy/netns/hosts.sh` (a prefill,
//! a decode and a router host over shaped links), for the commands that run roles on them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// A harness's hosts: made (and removed on drop, also on failure) by [`Hosts::up`], or
/// found as someone made them by [`Hosts::existing`].
pub(crate) struct Hosts {
    script: PathBuf,
    name: String,
    owned: bool,
}

impl Hosts {
    /// Makes the hosts `name`, their links shaped to tc rate `rate`.
    pub(crate) fn up(script: &Path, name: &str, rate: &str) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        ensure!(
            unsafe { libc::geteuid() } == 0,
            "hosts in network namespaces with shaped links need root"
        );
        let h = Self {
            script: script.to_path_buf(),
            name: name.to_string(),
            owned: true,
        };
        h.run(&["up", name, rate])?;
        h.down_on_signal();
        Ok(h)
    }

    /// Ctrl-C or SIGTERM ends the process without running destructors: the hosts are
    /// removed first (the children die with us).
    fn down_on_signal(&self) {
        let (script, name) = (self.script.clone(), self.name.clone());
        let started = std::thread::Builder::new()
            .name("hosts-signal".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(crate::shutdown_signal());
                eprintln!("stopped: removing hosts {name}");
                let _ = Command::new(&script).args(["down", &name]).status();
                std::process::exit(130);
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "a signal will leave the hosts behind (hosts.sh down removes them)");
        }
    }

    /// Hosts `name` as made by `hosts.sh up` beforehand (left as they are).
    pub(crate) fn existing(script: &Path, name: &str) -> Self {
        Self {
            script: script.to_path_buf(),
            name: name.to_string(),
            owned: false,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.script)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.script.display()))?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.trim().is_empty() {
            eprint!("{err}");
        }
        ensure!(
            out.status.success(),
            "{} {args:?} failed",
            self.script.display()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Reshapes every link; hosts.sh's report ("rate=R delay=D|none").
    pub(crate) fn shape(&self, rate: &str, delay: Option<&str>) -> Result<String> {
        let mut args = vec!["shape", &self.name, rate];
        args.extend(delay);
        self.run(&args)
    }

    /// The address of `role`'s host (prefill, decode, router, or this).
    pub(crate) fn addr(&self, role: &str) -> Result<String> {
        self.run(&["addr", &self.name, role])
    }

    /// `program` to run on `role`'s host (`ip netns exec`).
    pub(crate) fn exec(&self, role: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{}-{role}", self.name)])
            .arg(program);
        c
    }
}

/// A pair's fresh shared secret (hex), for its instances' environment only: off loopback
/// the side channel needs one.
pub(crate) fn pair_secret() -> Result<String> {
    Ok(splitserve_kv::auth::random_bytes(32)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A link as `rate[:delay]` (tc's units, e.g. `1gbit:200us`): the rate and the delay.
pub(crate) fn split_link(s: &str) -> (&str, Option<&str>) {
    match s.split_once(':') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new(&self.script)
                .args(["down", &self.name])
                .status();
        }
    }
}
