//! A pool of instances (prefill or decode): each one's last `/health`, the requests in
//! flight to it, its circuit breaker and counters; the policy that orders them; the poller
//! that keeps the loads fresh and, where members are named by host name, re-resolves the
//! names (every address of a name is an instance: a Kubernetes headless Service gives one
//! name many pods).

use std::net::IpAddr;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::health::{Breaker, State, Thresholds};
use crate::policy::{Ask, Load, Policy};

pub struct Instance {
    pub url: String,
    /// The member it came from: its own URL, or the name it was resolved from.
    member: String,
    /// A hash of `url`, which policies remember it by.
    id: u64,
    /// Its admin base URL (decode instances that can be drained).
    pub admin: Option<String>,
    /// False once drained: no new requests.
    pub in_rotation: AtomicBool,
    in_flight: AtomicU64,
    in_flight_blocks: AtomicU64,
    polled: Mutex<Option<Load>>,
    breaker: Mutex<Breaker>,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

impl Instance {
    fn new(url: String, member: String, admin: Option<String>, t: Thresholds) -> Self {
        Self {
            id: crate::policy::fnv1a(crate::policy::FNV_OFFSET, url.as_bytes()),
            url,
            member,
            admin,
            in_rotation: AtomicBool::new(true),
            in_flight: AtomicU64::new(0),
            in_flight_blocks: AtomicU64::new(0),
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
        l.in_flight_blocks = self.in_flight_blocks.load(Ordering::Relaxed);
        l.id = self.id;
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

    /// Counts a request, and the KV blocks it will take, as in flight until the guard is
    /// dropped.
    pub fn start(self: &Arc<Self>, blocks: u64) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_blocks.fetch_add(blocks, Ordering::Relaxed);
        InFlight(self.clone(), blocks)
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
            "in_flight_blocks": l.in_flight_blocks,
            "requests": self.requests.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
        })
    }
}

pub struct InFlight(Arc<Instance>, u64);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.in_flight_blocks.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// A configured member of a pool: a URL, and its admin URL (decode instances).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    url: String,
    admin: Option<String>,
}

pub struct Pool {
    pub name: &'static str,
    members: Mutex<Vec<Member>>,
    instances: RwLock<Vec<Arc<Instance>>>,
    pub policy: Box<dyn Policy>,
    thresholds: Thresholds,
}

/// Most members a pool takes (an admin `add` beyond it is refused).
pub const MAX_MEMBERS: usize = 256;

impl Pool {
    pub fn new(
        name: &'static str,
        urls: Vec<String>,
        admins: Vec<String>,
        policy: Box<dyn Policy>,
        t: Thresholds,
    ) -> Self {
        let members: Vec<Member> = urls
            .into_iter()
            .enumerate()
            .map(|(i, url)| Member {
                url,
                admin: admins.get(i).cloned(),
            })
            .collect();
        let instances = members
            .iter()
            .map(|m| {
                Arc::new(Instance::new(
                    m.url.clone(),
                    m.url.clone(),
                    m.admin.clone(),
                    t,
                ))
            })
            .collect();
        Self {
            name,
            members: Mutex::new(members),
            instances: RwLock::new(instances),
            policy,
            thresholds: t,
        }
    }

    /// The instances now (a copy: membership may change meanwhile).
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.instances
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Available instances, best first by the policy.
    pub fn choose(&self, ask: &Ask<'_>) -> Vec<Arc<Instance>> {
        let up: Vec<Arc<Instance>> = self
            .instances()
            .into_iter()
            .filter(|i| i.available())
            .collect();
        let loads: Vec<Load> = up.iter().map(|i| i.load()).collect();
        self.policy
            .order(&loads, ask)
            .into_iter()
            .filter_map(|k| up.get(k).cloned())
            .collect()
    }

    pub fn find(&self, url: &str) -> Option<Arc<Instance>> {
        self.instances().into_iter().find(|i| i.url == url)
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a member (an admin call); its instance takes requests once it answers a poll
    /// or a request.
    pub fn add(&self, url: &str, admin: Option<String>) -> Result<(), String> {
        let url = url.trim_end_matches('/').to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 512 {
            return Err(format!("{url:?} is not an http(s) base URL"));
        }
        let mut m = self.members();
        if m.iter().any(|x| x.url == url) {
            return Err(format!("{url} is already a {} member", self.name));
        }
        if m.len() >= MAX_MEMBERS {
            return Err(format!("the {} pool has {MAX_MEMBERS} members", self.name));
        }
        m.push(Member {
            url: url.clone(),
            admin: admin.clone(),
        });
        drop(m);
        let mut list = self.instances.write().unwrap_or_else(|e| e.into_inner());
        if !list.iter().any(|i| i.url == url) {
            list.push(Arc::new(Instance::new(
                url.clone(),
                url,
                admin,
                self.thresholds,
            )));
        }
        Ok(())
    }

    /// Removes a member and its instances: no new requests go there; those under way finish.
    pub fn remove(&self, url: &str) -> bool {
        let url = url.trim_end_matches('/');
        let mut m = self.members();
        let before = m.len();
        m.retain(|x| x.url != url);
        let removed = m.len() < before;
        drop(m);
        if removed {
            self.instances
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|i| i.member != url);
        }
        removed
    }

    /// Re-resolves members named by host name; each address becomes an instance (one kept
    /// with its health and counters while its address stays).
    async fn resolve(&self) {
        let members = self.members().clone();
        for m in members {
            let Some((scheme, host, port)) = split_url(&m.url) else {
                continue;
            };
            if host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
                continue;
            }
            let addrs = match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(a) => a.collect::<Vec<_>>(),
                Err(e) => {
                    tracing::warn!(member = %m.url, error = %e, "cannot resolve a pool member; keeping its instances");
                    continue;
                }
            };
            let mut urls: Vec<String> = addrs.iter().map(|a| format!("{scheme}://{a}")).collect();
            urls.sort();
            urls.dedup();
            let mut list = self.instances.write().unwrap_or_else(|e| e.into_inner());
            let before: Vec<String> = list
                .iter()
                .filter(|i| i.member == m.url)
                .map(|i| i.url.clone())
                .collect();
            if before == urls {
                continue;
            }
            list.retain(|i| i.member != m.url || urls.contains(&i.url));
            for (u, a) in urls.iter().zip(&addrs_sorted(&addrs)) {
                if !list.iter().any(|i| &i.url == u) {
                    list.push(Arc::new(Instance::new(
                        u.clone(),
                        m.url.clone(),
                        m.admin.as_deref().and_then(|x| admin_at(x, &host, a.ip())),
                        self.thresholds,
                    )));
                }
            }
            tracing::info!(member = %m.url, instances = ?urls, "pool member resolved");
        }
    }
}

/// `scheme://host:port` of a base URL (the port defaulting by scheme).
/// The addresses in the order of their URLs (sorted, without repeats).
fn addrs_sorted(addrs: &[std::net::SocketAddr]) -> Vec<std::net::SocketAddr> {
    let mut v: Vec<(String, std::net::SocketAddr)> =
        addrs.iter().map(|a| (a.to_string(), *a)).collect();
    v.sort();
    v.dedup_by(|x, y| x.0 == y.0);
    v.into_iter().map(|(_, a)| a).collect()
}

/// A resolved instance's admin URL: the member's admin URL, where it names the member's
/// host, at the instance's address (a headless Service's pod at its admin port).
fn admin_at(admin: &str, host: &str, ip: IpAddr) -> Option<String> {
    let (scheme, admin_host, port) = split_url(admin)?;
    if admin_host != host {
        return None;
    }
    let ip = match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    Some(format!("{scheme}://{ip}:{port}"))
}

fn split_url(url: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h.to_string(), p.parse().ok()?),
        _ => (
            authority.to_string(),
            if scheme == "https" { 443 } else { 80 },
        ),
    };
    Some((scheme.to_string(), host, port))
}

/// Polls every instance's `/health` each `interval`, and re-resolves named members each
/// `resolve_every` (if set), until the pools are dropped.
pub fn spawn_poller(
    pools: std::sync::Weak<[Pool; 2]>,
    client: reqwest::Client,
    interval: Duration,
    timeout: Duration,
    resolve_every: Option<Duration>,
) {
    tokio::spawn(async move {
        let mut resolved: Option<std::time::Instant> = None;
        loop {
            let Some(p) = pools.upgrade() else { return };
            if let Some(every) = resolve_every {
                if resolved.is_none_or(|t| t.elapsed() >= every) {
                    for pool in p.iter() {
                        pool.resolve().await;
                    }
                    resolved = Some(std::time::Instant::now());
                }
            }
            let all: Vec<Arc<Instance>> = p.iter().flat_map(|x| x.instances()).collect();
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
        total_blocks: n("total_blocks"),
        running: n("running"),
        waiting: n("waiting"),
        ..Load::default()
    });
    i.success();
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_resolved_instance_gets_the_members_admin_port_at_its_address() {
        let ip = "10.1.2.3".parse().expect("ip");
        assert_eq!(
            super::admin_at("http://decode:9000", "decode", ip).as_deref(),
            Some("http://10.1.2.3:9000")
        );
        assert_eq!(super::admin_at("http://other:9000", "decode", ip), None);
        let v6 = "fd00::7".parse().expect("ip");
        assert_eq!(
            super::admin_at("http://decode:9000", "decode", v6).as_deref(),
            Some("http://[fd00::7]:9000")
        );
    }

    use super::*;
    use crate::policy::RoundRobin;

    fn pool(urls: &[&str]) -> Pool {
        Pool::new(
            "decode",
            urls.iter().map(|u| u.to_string()).collect(),
            vec![],
            Box::new(RoundRobin::default()),
            Thresholds::default(),
        )
    }

    #[test]
    fn urls_split_into_scheme_host_and_port() {
        let s = |u: &str| split_url(u);
        assert_eq!(s("http://a:80"), Some(("http".into(), "a".into(), 80)));
        assert_eq!(
            s("http://decode-0.decode.svc:8100/x"),
            Some(("http".into(), "decode-0.decode.svc".into(), 8100))
        );
        assert_eq!(s("https://h"), Some(("https".into(), "h".into(), 443)));
        assert_eq!(
            s("http://[::1]:9"),
            Some(("http".into(), "[::1]".into(), 9))
        );
        assert_eq!(s("http://h:x"), None);
        assert_eq!(s("h:1"), None);
    }

    #[test]
    fn members_are_added_and_removed() {
        let p = pool(&["http://127.0.0.1:1"]);
        assert!(p.add("http://127.0.0.1:2/", None).is_ok());
        assert!(p.add("http://127.0.0.1:2", None).is_err(), "twice");
        assert!(p.add("ftp://x", None).is_err());
        assert_eq!(p.instances().len(), 2);
        assert!(p.remove("http://127.0.0.1:1"));
        assert!(!p.remove("http://127.0.0.1:1"));
        let left: Vec<String> = p.instances().iter().map(|i| i.url.clone()).collect();
        assert_eq!(left, ["http://127.0.0.1:2"]);
    }

    #[tokio::test]
    async fn a_name_becomes_an_instance_per_address() {
        let p = pool(&["http://localhost:8100", "http://127.0.0.1:9"]);
        p.resolve().await;
        let urls: Vec<String> = p.instances().iter().map(|i| i.url.clone()).collect();
        assert!(
            urls.contains(&"http://127.0.0.1:8100".to_string()),
            "{urls:?}"
        );
        assert!(
            !urls.contains(&"http://localhost:8100".to_string()),
            "{urls:?}"
        );
        assert!(
            urls.contains(&"http://127.0.0.1:9".to_string()),
            "literal kept"
        );
        // Resolving again keeps the same instances (and their state).
        let before = p.find("http://127.0.0.1:8100").expect("resolved");
        before.requests.fetch_add(5, Ordering::Relaxed);
        p.resolve().await;
        let after = p.find("http://127.0.0.1:8100").expect("still there");
        assert_eq!(after.requests.load(Ordering::Relaxed), 5);
        // Removing the name removes what it resolved to.
        assert!(p.remove("http://localhost:8100"));
        assert!(p.find("http://127.0.0.1:8100").is_none());
    }
}
