//! A server's KV connector with both its sides, built from `--kv-transfer-config` by
//! [`build`] (the only place a transport is chosen by name). It reads each request's
//! `kv_transfer_params` against the role ([`KvRoleConnector::plan`]); as a producer it
//! serves the engine's held KV ([`KvRoleConnector::start`]) and tells a finished request's
//! caller where it waits ([`KvRoleConnector::request_finished`]); as a consumer it gives the
//! engine its [`KvConnector`] (which loads into lent blocks) and frees a producer's hold a
//! refused request will never read ([`KvRoleConnector::release`]). `docs/connectors.md`
//! follows one request through these calls.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use splitserve_engine::{Engine, KvConnector, RemoteKv};

use crate::auth::Secret;
use crate::config::{ConfigError, ConnectorKind, KvRole, KvTransferConfig};
use crate::connector::{release_hold, LoadObserver, TcpConnector};
use crate::fingerprint::Fingerprint;
use crate::grant::{GrantError, Grants, RemoteAddr};
use crate::params::{Ask, KvTransferParams};
use crate::tcp::{SentHook, SideChannel};
use crate::tls::Tls;

/// What a server knows of its part in a pair when it starts.
pub struct Setup {
    pub config: KvTransferConfig,
    pub fingerprint: Fingerprint,
    pub secret: Secret,
    pub tls: Tls,
    pub engine_id: String,
    /// Producer: the side channel's listener, bound already (so a busy port is a startup
    /// error).
    pub listener: Option<TcpListener>,
}

/// Callbacks for metrics and logs.
#[derive(Default, Clone)]
pub struct Hooks {
    pub on_load_start: Option<Arc<dyn Fn() + Send + Sync>>,
    pub on_load_end: Option<LoadObserver>,
    pub on_sent: Option<SentHook>,
    /// What a store connector loaded, saved and missed.
    pub on_store_event: Option<crate::storage::StoreHook>,
}

/// What one request asks of the connector.
#[derive(Debug)]
pub enum Plan {
    Local,
    /// Prefill, then hold the prompt's KV for a decode instance.
    Produce,
    /// Prefill; the connector saves the prompt's KV as it is computed (a store), nothing is
    /// held. The answer carries the connector's params, as for `Produce`.
    Save,
    /// The prompt's KV waits remotely: submit with this.
    Consume(RemoteKv),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{ask} asks for a {wants}; this server is {is}")]
    Role {
        ask: &'static str,
        wants: &'static str,
        is: &'static str,
    },
    #[error(transparent)]
    Grant(#[from] GrantError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("this server does not produce KV")]
    NotProducer,
    #[error("the KV side channel: {0}")]
    SideChannel(String),
    #[error("cannot issue a grant: {0}")]
    Grant(String),
}

/// Both sides of a server's KV connector.
pub trait KvRoleConnector: Send + Sync {
    fn config(&self) -> &KvTransferConfig;
    /// What a peer's KV must match.
    fn fingerprint(&self) -> &Fingerprint;
    /// Where consumers reach this producer (none for a consumer).
    fn side_channel(&self) -> Option<SocketAddr>;
    /// The engine's side, for [`Engine::start_with`] (consumer roles).
    fn engine_connector(&self) -> Option<Arc<dyn KvConnector>>;
    /// What `params` ask of this server; a consumer acts only on params it can verify.
    fn plan(&self, params: Option<&KvTransferParams>) -> Result<Plan, PlanError>;
    /// Producer: starts serving `engine`'s held KV.
    fn start(&self, engine: &Engine) -> Result<(), RoleError>;
    /// Producer: a request finished holding its KV (its first tokens sampled); the
    /// `kv_transfer_params` its caller gets.
    fn request_finished(&self, request_id: &str, first: &[u32]) -> Result<Value, RoleError>;
    /// Consumer: a request whose KV waits remotely ended before the engine took it; the
    /// producer may free the KV.
    fn release(&self, remote: &RemoteKv);
}

/// The connector `--kv-transfer-config` names.
pub fn build(setup: Setup, hooks: Hooks) -> Result<Arc<dyn KvRoleConnector>, ConfigError> {
    match setup.config.kind {
        ConnectorKind::Tcp | ConnectorKind::Nixl => Ok(Arc::new(TcpRole::new(setup, hooks)?)),
        ConnectorKind::Multi => Ok(Arc::new(crate::multi::MultiRole::new(setup, hooks)?)),
        ConnectorKind::SharedStorage | ConnectorKind::Offloading | ConnectorKind::RedisStore => {
            Ok(Arc::new(crate::storage::StorageRole::new(setup, hooks)?))
        }
    }
}

/// `TcpConnector`: grants signed with the pair's secret, pulls over the side channel.
/// `NixlConnector` is the same with the KV itself read over NIXL.
struct TcpRole {
    config: KvTransferConfig,
    fingerprint: Fingerprint,
    secret: Secret,
    tls: Tls,
    engine_id: String,
    side_channel: Option<SocketAddr>,
    grants: Option<Arc<Grants>>,
    listener: Mutex<Option<TcpListener>>,
    on_sent: Option<SentHook>,
    consumer: Option<Arc<TcpConnector>>,
    #[cfg(feature = "nixl")]
    nixl: Option<Arc<crate::nixl::Nixl>>,
}

impl TcpRole {
    fn new(s: Setup, hooks: Hooks) -> Result<Self, ConfigError> {
        let role = s.config.kv_role;
        let side_channel = match (&s.listener, role.produces()) {
            (Some(l), true) => Some(l.local_addr().map_err(|e| ConfigError::Field {
                field: "kv_connector_extra_config.side_channel_port",
                reason: e.to_string(),
            })?),
            (None, true) => {
                return Err(ConfigError::Field {
                    field: "kv_connector_extra_config.side_channel_port",
                    reason: "a producer needs its side channel's listener".into(),
                })
            }
            _ => None,
        };
        let grants = side_channel.map(|a| Arc::new(Grants::new(s.secret.clone(), a)));
        #[cfg(feature = "nixl")]
        let nixl = if s.config.kind == crate::config::ConnectorKind::Nixl {
            let backends = s
                .config
                .kv_connector_extra_config
                .backends
                .clone()
                .unwrap_or_else(|| vec!["UCX".into()]);
            // Only a reader uses the threads.
            let threads = if role.consumes() {
                let x = &s.config.kv_connector_extra_config;
                x.num_threads.unwrap_or(crate::config::DEFAULT_NIXL_THREADS)
            } else {
                0
            };
            let n = crate::nixl::Nixl::new(role.as_str(), &backends, threads).map_err(|e| {
                ConfigError::Field {
                    field: "kv_connector",
                    reason: e.to_string(),
                }
            })?;
            Some(n)
        } else {
            None
        };
        let consumer = role.consumes().then(|| {
            let c = TcpConnector::new(
                s.fingerprint.clone(),
                s.secret.clone(),
                hooks.on_load_start.clone(),
                hooks.on_load_end.clone(),
            )
            .with_tls(s.tls.clone());
            #[cfg(feature = "nixl")]
            let c = match &nixl {
                Some(n) => c.with_nixl(n.clone()),
                None => c,
            };
            Arc::new(c)
        });
        Ok(Self {
            config: s.config,
            fingerprint: s.fingerprint,
            secret: s.secret,
            tls: s.tls,
            engine_id: s.engine_id,
            side_channel,
            grants,
            listener: Mutex::new(s.listener),
            on_sent: hooks.on_sent,
            consumer,
            #[cfg(feature = "nixl")]
            nixl,
        })
    }

    fn role(&self) -> KvRole {
        self.config.kv_role
    }
}

impl KvRoleConnector for TcpRole {
    fn config(&self) -> &KvTransferConfig {
        &self.config
    }

    fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    fn side_channel(&self) -> Option<SocketAddr> {
        self.side_channel
    }

    fn engine_connector(&self) -> Option<Arc<dyn KvConnector>> {
        self.consumer.clone().map(|c| c as Arc<dyn KvConnector>)
    }

    fn plan(&self, params: Option<&KvTransferParams>) -> Result<Plan, PlanError> {
        let Some(p) = params else {
            return Ok(Plan::Local);
        };
        let is = self.role().as_str();
        match p.ask {
            Ask::Local => Ok(Plan::Local),
            Ask::Produce if self.role().produces() => Ok(Plan::Produce),
            Ask::Produce => Err(PlanError::Role {
                ask: "do_remote_decode",
                wants: "kv_producer",
                is,
            }),
            Ask::Consume if self.role().consumes() => {
                // Only a grant signed with this pair's secret is acted on: a client cannot
                // send this server to an address of its choosing, nor redeem someone
                // else's grant.
                let remote = RemoteAddr::verify(p, &self.secret)?;
                Ok(Plan::Consume(RemoteKv::new(remote)))
            }
            Ask::Consume => Err(PlanError::Role {
                ask: "do_remote_prefill",
                wants: "kv_consumer",
                is,
            }),
        }
    }

    fn start(&self, engine: &Engine) -> Result<(), RoleError> {
        let Some(grants) = self.grants.clone() else {
            return Err(RoleError::NotProducer);
        };
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| RoleError::SideChannel("already started".into()))?;
        let side = SideChannel {
            engine: engine.clone(),
            fingerprint: self.fingerprint.clone(),
            grants,
            on_sent: self.on_sent.clone(),
            tls: self.tls.clone(),
            #[cfg(feature = "nixl")]
            nixl: self.nixl.clone(),
        };
        std::thread::Builder::new()
            .name("kv-side-channel".into())
            .spawn(move || side.serve(listener))
            .map(|_| ())
            .map_err(|e| RoleError::SideChannel(e.to_string()))
    }

    fn request_finished(&self, request_id: &str, first: &[u32]) -> Result<Value, RoleError> {
        let grants = self.grants.as_ref().ok_or(RoleError::NotProducer)?;
        let mut v = grants
            .issue(request_id, self.config.hold_timeout())
            .map_err(|e| RoleError::Grant(e.to_string()))?;
        let extra = json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": self.engine_id,
            "tp_size": 1,
            "first_token_ids": first,
            "fingerprint": self.fingerprint,
        });
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        Ok(v)
    }

    fn release(&self, remote: &RemoteKv) {
        if let Some(r) = remote.get::<RemoteAddr>() {
            release_hold(
                self.fingerprint.clone(),
                self.secret.clone(),
                self.tls.clone(),
                r.clone(),
            );
        }
    }
}
