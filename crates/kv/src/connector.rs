//! `TcpConnector`: the engine's [`KvConnector`] over the TCP transport (consumer side).
//!
//! Scheduler side: a request whose `kv_transfer_params` were a grant signed by a producer of
//! this pair (`remote_host`, `remote_port`, `remote_request_id`, `remote_capability`,
//! `remote_expires_at`, `kv_signature`; see [`crate::grant`]), verified when it arrived
//! ([`crate::role`]), can have its prompt's KV loaded; nothing else names a producer. Worker side: a
//! thread per load pulls it straight into the blocks the engine lent, then ends the load
//! with the producer's first token (our `first_token_ids`) or, under vLLM's contract
//! (none given), with no token: the engine recomputes the last prompt position.

use std::sync::Arc;
use std::time::{Duration, Instant};

use splitserve_engine::{KvConnector, LoadTarget, RemoteFirst, RemoteKv};

use crate::auth::Secret;
use crate::grant::RemoteAddr;
use crate::tcp;
use crate::tls::Tls;
use crate::Fingerprint;

/// One load as it ended, for metrics and logs.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub request_id: String,
    pub producer: String,
    pub blocks: usize,
    pub bytes: u64,
    pub took: Duration,
    /// The failure, if it failed.
    pub error: Option<String>,
}

pub type LoadObserver = Arc<dyn Fn(&LoadReport) + Send + Sync>;

pub struct TcpConnector {
    fingerprint: Fingerprint,
    secret: Secret,
    tls: Tls,
    spawner: Spawner,
    /// Called when a load starts (`None`) and when it ends.
    observer: Option<LoadObserver>,
    on_start: Option<Arc<dyn Fn() + Send + Sync>>,
    /// NixlConnector: the KV is read over NIXL, not sent down the side channel.
    #[cfg(feature = "nixl")]
    nixl: Option<Arc<crate::nixl::Nixl>>,
}

impl TcpConnector {
    pub fn new(
        fingerprint: Fingerprint,
        secret: Secret,
        on_start: Option<Arc<dyn Fn() + Send + Sync>>,
        observer: Option<LoadObserver>,
    ) -> Self {
        Self {
            fingerprint,
            secret,
            tls: Tls::default(),
            spawner: Spawner::new(),
            observer,
            on_start,
            #[cfg(feature = "nixl")]
            nixl: None,
        }
    }

    /// Reads the KV over NIXL through this agent (NixlConnector).
    #[cfg(feature = "nixl")]
    pub fn with_nixl(mut self, nixl: Arc<crate::nixl::Nixl>) -> Self {
        self.nixl = Some(nixl);
        self
    }
}

impl TcpConnector {
    /// Pulls in TLS (the producer's certificate checked against these trust roots).
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = tls;
        self
    }
}

impl KvConnector for TcpConnector {
    fn remote_tokens(&self, remote: &RemoteKv, prompt_len: usize) -> usize {
        // A grant verified when the request arrived (`role::KvRoleConnector::plan`).
        match remote.get::<RemoteAddr>() {
            Some(_) => prompt_len,
            None => 0,
        }
    }

    fn start_load(&self, remote: RemoteKv, mut target: LoadTarget) {
        let Some(r) = remote.get::<RemoteAddr>().cloned() else {
            target.finish(Err("not a TcpConnector grant".into()));
            return;
        };
        if let Some(f) = &self.on_start {
            f();
        }
        let (fp, secret, tls) = (
            self.fingerprint.clone(),
            self.secret.clone(),
            self.tls.clone(),
        );
        let observer = self.observer.clone();
        #[cfg(feature = "nixl")]
        let nixl = self.nixl.clone();
        self.spawner.spawn("kv-load", move || {
            let t0 = Instant::now();
            let blocks = target.n_blocks();
            #[cfg(feature = "nixl")]
            let result = match &nixl {
                Some(n) => tcp::load_over_nixl(&r, &fp, &secret, &tls, n, &mut target),
                None => tcp::load_into(&r, &fp, &secret, &tls, &mut target),
            };
            #[cfg(not(feature = "nixl"))]
            let result = tcp::load_into(&r, &fp, &secret, &tls, &mut target);
            // A read that may still be writing: the blocks must never be reused.
            if let Err(tcp::KvError::InFlight(e)) = &result {
                let msg = format!(
                    "KV transfer of request {} from {} failed: {e}",
                    r.request_id, r.addr
                );
                if let Some(o) = &observer {
                    o(&LoadReport {
                        request_id: target.request_id().to_string(),
                        producer: r.addr.clone(),
                        blocks,
                        bytes: 0,
                        took: t0.elapsed(),
                        error: Some(msg.clone()),
                    });
                }
                target.fail_keeping_blocks(msg);
                return;
            }
            let (bytes, outcome) = match result {
                Ok(l) => {
                    let first = match &r.first_tokens {
                        // vLLM's contract: the engine samples the first token itself.
                        None => Ok(RemoteFirst::default()),
                        Some(f) if *f != l.generated => Err(format!(
                            "producer's first tokens {f:?} differ from the KV's {:?}",
                            l.generated
                        )),
                        Some(_) => Ok(RemoteFirst {
                            generated: l.generated,
                            sampler: Some(l.sampler),
                            loaded_tokens: None,
                        }),
                    };
                    (l.bytes, first)
                }
                Err(e @ tcp::KvError::Handshake(_)) => {
                    (0, Err(format!("KV transfer from {} refused: {e}", r.addr)))
                }
                Err(e) => (
                    0,
                    Err(format!(
                        "KV transfer of request {} from {} failed: {e}",
                        r.request_id, r.addr
                    )),
                ),
            };
            let report = LoadReport {
                request_id: target.request_id().to_string(),
                producer: r.addr.clone(),
                blocks,
                bytes,
                took: t0.elapsed(),
                error: outcome.as_ref().err().cloned(),
            };
            // Counted before the engine hears of it: whoever sees the response sees the
            // transfer in the metrics too.
            if let Some(o) = observer {
                o(&report);
            }
            target.finish(outcome);
        });
    }

    fn release(&self, remote: RemoteKv) {
        if let Some(r) = remote.get::<RemoteAddr>().cloned() {
            let (fp, secret, tls) = (
                self.fingerprint.clone(),
                self.secret.clone(),
                self.tls.clone(),
            );
            self.spawner
                .spawn("kv-release", move || release_now(&fp, &secret, &tls, &r));
        }
    }
}

/// Tells the producer, in the background, to free the KV it holds for a request we will
/// never load. Called from ordinary (server) threads, so the job needs no [`Spawner`]. If no
/// thread can start, the hold lapses at the producer's hold timeout instead.
pub fn release_hold(fingerprint: Fingerprint, secret: Secret, tls: Tls, r: RemoteAddr) {
    let id = r.request_id.clone();
    let started = std::thread::Builder::new()
        .name("kv-release".into())
        .spawn(move || release_now(&fingerprint, &secret, &tls, &r));
    if let Err(e) = started {
        tracing::error!(%id, error = %e, "cannot start a thread to release the producer's hold; it lapses at its timeout");
    }
}

fn release_now(fingerprint: &Fingerprint, secret: &Secret, tls: &Tls, r: &RemoteAddr) {
    tracing::info!(id = %r.request_id, producer = %r.addr, "releasing the producer's hold on KV we will not pull");
    if let Err(e) = tcp::release(r, fingerprint, secret, tls) {
        tracing::warn!(id = %r.request_id, producer = %r.addr, error = %e, "could not release the producer's hold");
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Starts the connector's threads from a thread of its own. The engine thread that asks for
/// a load may run under SCHED_IDLE on one CPU (`--compute-priority idle`, `--cpu-bind`), and
/// a new thread inherits both from the thread that creates it; a transfer must not.
pub(crate) struct Spawner(std::sync::mpsc::Sender<(&'static str, Job)>);

impl Spawner {
    /// Call from an ordinary thread: its class and CPUs are the ones the jobs get.
    pub(crate) fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<(&'static str, Job)>();
        let started = std::thread::Builder::new()
            .name("kv-spawner".into())
            .spawn(move || {
                for (name, job) in rx {
                    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(job) {
                        tracing::error!(error = %e, thread = name, "cannot start a KV thread");
                    }
                }
            });
        if let Err(e) = started {
            // Jobs sent now are dropped unrun: a load's target then fails its request.
            tracing::error!(error = %e, "cannot start the KV connector's spawner thread");
        }
        Self(tx)
    }

    pub(crate) fn spawn(&self, name: &'static str, job: impl FnOnce() + Send + 'static) {
        if self.0.send((name, Box::new(job))).is_err() {
            tracing::error!(thread = name, "the KV connector's spawner thread is gone");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::Spawner;

    /// (policy, allowed CPUs) of the calling thread, from procfs.
    fn placement() -> (String, String) {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").expect("sched");
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        let policy = sched
            .lines()
            .find(|l| l.starts_with("policy"))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .expect("policy");
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string())
            .expect("cpus");
        (policy, cpus)
    }

    #[test]
    fn jobs_run_as_the_creator_of_the_spawner_not_as_the_caller() {
        let ours = placement();
        let spawner = Spawner::new();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                // Become what an engine thread under `--compute-priority idle --cpu-bind` is.
                let first: usize = ours
                    .1
                    .split([',', '-'])
                    .next()
                    .and_then(|c| c.parse().ok())
                    .expect("a CPU");
                // SAFETY: pid 0 is the calling thread; the structs outlive the calls.
                unsafe {
                    let p = libc::sched_param { sched_priority: 0 };
                    assert_eq!(libc::sched_setscheduler(0, libc::SCHED_IDLE, &p), 0);
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(first, &mut set);
                    let n = std::mem::size_of::<libc::cpu_set_t>();
                    assert_eq!(libc::sched_setaffinity(0, n, &set), 0);
                }
                assert_eq!(placement(), ("5".to_string(), first.to_string()));
                let tx = tx.clone();
                spawner.spawn("probe", move || {
                    let _ = tx.send(placement());
                });
            });
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the job ran");
        assert_eq!(got, ours);
    }
}
