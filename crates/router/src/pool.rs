//! A pool of instances (prefill or decode): each one's last `/health`, the requests in
//! flight to it, its circuit breaker and counters; the policy that orders them; the poller
//! that keeps the loads fresh.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::health::{Breaker, State, Thresholds};
use crate::policy::{Ask, Load, Policy};

pub struct Instance {
    pub url: String,
    /// Its admin base URL (decode instances that can be drained).
    pub admin: Option<String>,
    /// False once drained: no new requests.
    pub in_rotation: AtomicBool,
    in_flight: AtomicU64,
    polled: Mutex<Option<Load>>,
    breaker: Mutex<Breaker>,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

impl Instance {
    fn new(url: String, admin: Option<String>, t: Thresholds) -> Self {
        Self {
            url,
            admin,
            in_rotation: AtomicBool::new(true),
            in_flight: AtomicU64::new(0),
            polled: Mutex::new(None),
            breaker: Mutex::new(Breaker::new(t)),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn load(&self) -> Load {
        let mut l = self
            .polled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_default();
        l.in_flight = self.in_flight.load(Ordering::Relaxed);
        l
    }

    pub fn state(&self) -> State {
        self.breaker().state(Instant::now())
    }

    pub fn available(&self) -> bool {
        self.in_rotation.load(Ordering::Relaxed) && self.breaker().available(Instant::now())
    }

    /// A request or a poll got an answer.
    pub fn success(&self) {
        let now = Instant::now();
        let mut b = self.breaker();
        let before = b.state(now);
        b.success(now);
        if before != State::Closed && b.state(now) == State::Closed {
            tracing::info!(instance = %self.url, "instance is healthy again");
        }
    }

    /// A request or a poll failed.
    pub fn failure(&self, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if self.breaker().failure(Instant::now()) {
            tracing::warn!(instance = %self.url, error = %why, "instance failing; no requests for it until it answers again");
        }
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn describe(&self) -> Value {
        let l = self.load();
        json!({
            "url": self.url,
            "admin": self.admin,
            "in_rotation": self.in_rotation.load(Ordering::Relaxed),
            "circuit": self.state().as_str(),
            "free_blocks": l.free_blocks,
            "running": l.running,
            "waiting": l.waiting,
            "in_flight": l.in_flight,
            "requests": self.requests.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
        })
    }
}

pub struct InFlight(Arc<Instance>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pool {
    pub name: &'static str,
    pub instances: Vec<Arc<Instance>>,
    pub policy: Box<dyn Policy>,
}

impl Pool {
    pub fn new(
        name: &'static str,
        urls: Vec<String>,
        admins: Vec<String>,
        policy: Box<dyn Policy>,
        t: Thresholds,
    ) -> Self {
        let instances = urls
            .into_iter()
            .enumerate()
            .map(|(i, u)| Arc::new(Instance::new(u, admins.get(i).cloned(), t)))
            .collect();
        Self {
            name,
            instances,
            policy,
        }
    }

    /// Available instances, best first by the policy.
    pub fn choose(&self, ask: &Ask<'_>) -> Vec<Arc<Instance>> {
        let up: Vec<&Arc<Instance>> = self.instances.iter().filter(|i| i.available()).collect();
        let loads: Vec<Load> = up.iter().map(|i| i.load()).collect();
        self.policy
            .order(&loads, ask)
            .into_iter()
            .filter_map(|k| up.get(k).map(|i| (*i).clone()))
            .collect()
    }

    pub fn any_available(&self) -> bool {
        self.instances.iter().any(|i| i.available())
    }

    pub fn find(&self, url: &str) -> Option<&Arc<Instance>> {
        self.instances.iter().find(|i| i.url == url)
    }
}

/// Polls every instance's `/health` each `interval`, until the pools are dropped.
pub fn spawn_poller(
    pools: std::sync::Weak<[Pool; 2]>,
    client: reqwest::Client,
    interval: Duration,
    timeout: Duration,
) {
    tokio::spawn(async move {
        loop {
            let Some(p) = pools.upgrade() else { return };
            let all: Vec<Arc<Instance>> = p.iter().flat_map(|x| x.instances.clone()).collect();
            drop(p);
            futures_util::future::join_all(all.into_iter().map(|i| {
                let c = client.clone();
                async move { poll(&c, &i, timeout).await }
            }))
            .await;
            tokio::time::sleep(interval).await;
        }
    });
}

async fn poll(client: &reqwest::Client, i: &Instance, timeout: Duration) {
    let r = client
        .get(format!("{}/health", i.url))
        .timeout(timeout)
        .send()
        .await;
    let v = match r {
        Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
        Ok(r) => {
            i.failure(&format!("/health answered {}", r.status()));
            return;
        }
        Err(e) => {
            i.failure(&format!("/health: {e}"));
            return;
        }
    };
    let Some(v) = v else {
        i.failure("/health sent no JSON");
        return;
    };
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    *i.polled.lock().unwrap_or_else(|e| e.into_inner()) = Some(Load {
        free_blocks: v["free_blocks"].as_u64(),
        running: n("running"),
        waiting: n("waiting"),
        in_flight: 0,
    });
    i.success();
}
