//! `MultiConnector` (vLLM's name): several connectors behind one, e.g. a side channel for PD
//! and a store as a cache. Saves go to every child that saves; a prompt looked up is loaded
//! from the child that has the most of it; KV named by a request's params goes to the
//! child that understands them. On the server's side, a request's plan is the first
//! child's that asks for anything (an error of any child is the answer), and a producer's
//! answer merges every producing child's params.

use std::sync::{Arc, Mutex};

use serde_json::Value;
use splitserve_engine::prefix_cache::BlockHash;
use splitserve_engine::{Engine, KvConnector, LoadTarget, RemoteKv, SavedBlock};

use crate::config::{ConfigError, KvTransferConfig};
use crate::fingerprint::Fingerprint;
use crate::params::KvTransferParams;
use crate::role::{build, Hooks, KvRoleConnector, Plan, PlanError, RoleError, Setup};

/// The engine's side: the children's engine connectors.
struct Multi {
    children: Vec<Arc<dyn KvConnector>>,
    /// The child whose `stored_tokens` answered last with the most: the engine starts that
    /// load right after asking, on the same thread.
    lookup: Mutex<Option<usize>>,
}

impl KvConnector for Multi {
    fn remote_tokens(&self, remote: &RemoteKv, prompt_len: usize) -> usize {
        self.children
            .iter()
            .map(|c| c.remote_tokens(remote, prompt_len))
            .max()
            .unwrap_or(0)
    }

    fn start_load(&self, remote: RemoteKv, target: LoadTarget) {
        let n = target.n_tokens();
        // A child that understands `remote` (a peer's grant), else the store asked last.
        let by_params = self
            .children
            .iter()
            .position(|c| c.remote_tokens(&remote, n) > 0);
        let lookup = *self.lookup.lock().unwrap_or_else(|e| e.into_inner());
        match by_params.or(lookup) {
            Some(i) => self.children[i].start_load(remote, target),
            None => target.finish(Err("no connector of MultiConnector has this KV".into())),
        }
    }

    fn release(&self, remote: RemoteKv) {
        for c in &self.children {
            c.release(remote.clone());
        }
    }

    fn wants_saves(&self) -> bool {
        self.children.iter().any(|c| c.wants_saves())
    }

    fn save_block(&self, hash: &BlockHash, block: SavedBlock<'_>) {
        for c in self.children.iter().filter(|c| c.wants_saves()) {
            c.save_block(hash, block);
        }
    }

    fn looks_up(&self) -> bool {
        self.children.iter().any(|c| c.looks_up())
    }

    fn stored_tokens(&self, hashes: &[BlockHash]) -> usize {
        let best = self
            .children
            .iter()
            .enumerate()
            .filter(|(_, c)| c.looks_up())
            .map(|(i, c)| (c.stored_tokens(hashes), i))
            .max_by_key(|&(n, i)| (n, std::cmp::Reverse(i)));
        *self.lookup.lock().unwrap_or_else(|e| e.into_inner()) = best.map(|(_, i)| i);
        best.map_or(0, |(n, _)| n)
    }
}

/// `MultiConnector` as a server sees it.
pub(crate) struct MultiRole {
    config: KvTransferConfig,
    fingerprint: Fingerprint,
    children: Vec<Arc<dyn KvRoleConnector>>,
    engine: Option<Arc<dyn KvConnector>>,
}

impl MultiRole {
    pub(crate) fn new(mut s: Setup, hooks: Hooks) -> Result<Self, ConfigError> {
        let mut children = Vec::new();
        for c in &s.config.children {
            // The side channel's listener goes to the child that serves it.
            let listener = if c.serves_side_channel() {
                s.listener.take()
            } else {
                None
            };
            let setup = Setup {
                config: c.clone(),
                fingerprint: s.fingerprint.clone(),
                secret: s.secret.clone(),
                tls: s.tls.clone(),
                engine_id: s.engine_id.clone(),
                listener,
            };
            children.push(build(setup, hooks.clone())?);
        }
        let engines: Vec<_> = children
            .iter()
            .filter_map(|c| c.engine_connector())
            .collect();
        let engine = (!engines.is_empty()).then(|| {
            Arc::new(Multi {
                children: engines,
                lookup: Mutex::new(None),
            }) as Arc<dyn KvConnector>
        });
        Ok(Self {
            config: s.config,
            fingerprint: s.fingerprint,
            children,
            engine,
        })
    }
}

/// Which of two plans a request follows: the one that asks more of this server.
fn rank(p: &Plan) -> u8 {
    match p {
        Plan::Local => 0,
        Plan::Save => 1,
        Plan::Produce => 2,
        Plan::Consume(_) => 3,
    }
}

impl KvRoleConnector for MultiRole {
    fn config(&self) -> &KvTransferConfig {
        &self.config
    }

    fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    fn side_channel(&self) -> Option<std::net::SocketAddr> {
        self.children.iter().find_map(|c| c.side_channel())
    }

    fn engine_connector(&self) -> Option<Arc<dyn KvConnector>> {
        self.engine.clone()
    }

    fn plan(&self, params: Option<&KvTransferParams>) -> Result<Plan, PlanError> {
        let mut best = Plan::Local;
        for c in &self.children {
            // A child that refuses the params (a forged grant, say) refuses the request.
            let p = c.plan(params)?;
            if rank(&p) > rank(&best) {
                best = p;
            }
        }
        Ok(best)
    }

    fn start(&self, engine: &Engine) -> Result<(), RoleError> {
        for c in self
            .children
            .iter()
            .filter(|c| c.config().kv_role.produces())
        {
            c.start(engine)?;
        }
        Ok(())
    }

    fn request_finished(&self, request_id: &str, first: &[u32]) -> Result<Value, RoleError> {
        let mut merged = serde_json::Map::new();
        for c in &self.children {
            if let Value::Object(o) = c.request_finished(request_id, first)? {
                // A child's null never hides another's value (a store names no host).
                for (k, v) in o {
                    if !v.is_null() || !merged.contains_key(&k) {
                        merged.insert(k, v);
                    }
                }
            }
        }
        Ok(Value::Object(merged))
    }

    fn release(&self, remote: &RemoteKv) {
        for c in &self.children {
            c.release(remote);
        }
    }
}
