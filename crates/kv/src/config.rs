//! `--kv-transfer-config`: the role of a server in a disaggregated pair, in vLLM's JSON shape.
//!
//! ```json
//! {"kv_connector": "TcpConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu",
//!  "kv_connector_extra_config": {"side_channel_host": "127.0.0.1", "side_channel_port": 5600,
//!                                "hold_timeout_s": 30, "secret_env": "SPLITSERVE_KV_SECRET"}}
//! ```
//!
//! The pair's secret is named, never given: `secret_env` (an environment variable) or
//! `secret_file` (a file only its owner can read). With neither, a per-user cookie file in
//! the cache directory serves, and a producer's side channel must bind loopback.

use std::time::Duration;

use serde::Deserialize;

use crate::auth::Secret;
use crate::tls::Tls;
use splitserve_engine::LoadFailurePolicy;

/// What a connector is, whatever name `kv_connector` gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectorKind {
    /// `TcpConnector`: grants and a side channel.
    #[default]
    Tcp,
    /// `ExampleConnector` (or `SharedStorageConnector`): block files in a shared directory.
    SharedStorage,
    /// `OffloadingConnector`: block files in host memory.
    Offloading,
    /// `RedisStoreConnector`: block files in Redis.
    RedisStore,
    /// `MultiConnector`: several of the others.
    Multi,
    /// `NixlConnector`: the side channel's grants and handshake, the KV read over NIXL
    /// (builds with the cargo feature `nixl`).
    Nixl,
}

/// Connectors this build has, by the names `kv_connector` takes.
const CONNECTORS: &[(&str, ConnectorKind)] = &[
    ("TcpConnector", ConnectorKind::Tcp),
    ("ExampleConnector", ConnectorKind::SharedStorage),
    ("SharedStorageConnector", ConnectorKind::SharedStorage),
    ("OffloadingConnector", ConnectorKind::Offloading),
    ("RedisStoreConnector", ConnectorKind::RedisStore),
    ("MultiConnector", ConnectorKind::Multi),
    ("NixlConnector", ConnectorKind::Nixl),
];

/// The connector `name` names, as this build's own string (for metric labels).
fn connector(name: &str) -> Option<(&'static str, ConnectorKind)> {
    CONNECTORS.iter().copied().find(|(n, _)| *n == name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvRole {
    /// Prefills, holds the prompt's KV and serves it to consumers.
    KvProducer,
    /// Pulls the prompt's KV from a producer and decodes.
    KvConsumer,
    /// Either, request by request.
    KvBoth,
}

impl KvRole {
    pub fn as_str(self) -> &'static str {
        match self {
            KvRole::KvProducer => "kv_producer",
            KvRole::KvConsumer => "kv_consumer",
            KvRole::KvBoth => "kv_both",
        }
    }

    pub fn produces(self) -> bool {
        matches!(self, KvRole::KvProducer | KvRole::KvBoth)
    }

    pub fn consumes(self) -> bool {
        matches!(self, KvRole::KvConsumer | KvRole::KvBoth)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraConfig {
    /// Address the side channel binds to and advertises as `remote_host`.
    #[serde(default = "default_host")]
    pub side_channel_host: String,
    /// Side-channel port (0: any free port).
    #[serde(default = "default_port")]
    pub side_channel_port: u16,
    /// Seconds a producer keeps a prompt's blocks for a consumer that has not pulled them.
    #[serde(default = "default_hold")]
    pub hold_timeout_s: f64,
    /// Environment variable that holds the pair's shared secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// File that holds the pair's shared secret (mode 600).
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    /// Producer: serve the side channel in TLS with this certificate chain (PEM)...
    #[serde(default)]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// ...and this private key (PEM).
    #[serde(default)]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Consumer: pull in TLS, trusting producers' certificates signed by this CA (PEM).
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// `ExampleConnector`: the directory of stored KV blocks that instances share.
    #[serde(default)]
    pub shared_storage_path: Option<std::path::PathBuf>,
    /// `OffloadingConnector`: host memory the offloaded blocks may take, in bytes.
    #[serde(default)]
    pub cpu_bytes_to_use: Option<u64>,
    /// `OffloadingConnector`: tokens per offloaded block (a multiple of the engine's).
    #[serde(default)]
    pub block_size: Option<usize>,
    /// `RedisStoreConnector`: the Redis server, `redis://host:port` (no password here: a
    /// command line is visible to every user).
    #[serde(default)]
    pub remote_url: Option<String>,
    /// `NixlConnector`: the NIXL backends to create (default `["UCX"]`).
    #[serde(default)]
    pub backends: Option<Vec<String>>,
    /// `NixlConnector`, consumer: UCX threads that share each read between them (vLLM's
    /// name and default, 4); 0 leaves the whole read to the loading thread.
    #[serde(default)]
    pub num_threads: Option<usize>,
    /// `MultiConnector`: the connectors it chains, each a `--kv-transfer-config` object
    /// (`kv_role` taken from the outer one when absent).
    #[serde(default)]
    pub connectors: Option<Vec<serde_json::Value>>,
    /// `RedisStoreConnector`: tokens per stored chunk (a multiple of the engine's block
    /// size; 256 as LMCache's).
    #[serde(default)]
    pub chunk_size: Option<usize>,
    /// `OffloadingConnector`: tiers below host memory that take what it evicts (one disk
    /// tier today).
    #[serde(default)]
    pub secondary_tiers: Option<Vec<SecondaryTier>>,
}

/// A tier below host memory: `{"kind": "disk", "path": DIR, "bytes": N}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondaryTier {
    pub kind: String,
    pub path: std::path::PathBuf,
    pub bytes: u64,
}

/// `num_threads` above this is a mistake, not a tuning.
const MAX_NIXL_THREADS: usize = 64;

/// vLLM's default for `num_threads`.
pub const DEFAULT_NIXL_THREADS: usize = 4;

fn default_host() -> String {
    "127.0.0.1".into()
}

fn default_port() -> u16 {
    5600
}

fn default_hold() -> f64 {
    30.0
}

impl Default for ExtraConfig {
    fn default() -> Self {
        Self {
            side_channel_host: default_host(),
            side_channel_port: default_port(),
            hold_timeout_s: default_hold(),
            secret_env: None,
            secret_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            shared_storage_path: None,
            cpu_bytes_to_use: None,
            block_size: None,
            remote_url: None,
            chunk_size: None,
            connectors: None,
            secondary_tiers: None,
            backends: None,
            num_threads: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvTransferConfig {
    pub kv_connector: String,
    pub kv_role: KvRole,
    #[serde(default = "default_device")]
    pub kv_buffer_device: String,
    #[serde(default)]
    pub kv_connector_extra_config: ExtraConfig,
    /// Accepted for vLLM compatibility; the side channel decides where KV goes.
    #[serde(default)]
    pub kv_rank: Option<u32>,
    #[serde(default)]
    pub kv_parallel_size: Option<u32>,
    #[serde(default)]
    pub engine_id: Option<String>,
    /// What a consumer does when a KV load fails: `fail` the request (vLLM's default) or
    /// `recompute` the prompt itself.
    #[serde(default)]
    pub kv_load_failure_policy: LoadFailurePolicy,
    /// `MultiConnector`: its connectors, parsed.
    #[serde(skip)]
    pub children: Vec<KvTransferConfig>,
    /// What `kv_connector` names, and that name as this build's own string.
    #[serde(skip)]
    pub kind: ConnectorKind,
    #[serde(skip)]
    pub connector_name: &'static str,
}

fn default_device() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--kv-transfer-config: {0}")]
    Json(String),
    #[error("--kv-transfer-config: {0}")]
    Secret(String),
    #[error("--kv-transfer-config: {field}: {reason}")]
    Field { field: &'static str, reason: String },
}

impl KvTransferConfig {
    /// Parses and checks the JSON given on the command line.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| ConfigError::Json(e.to_string()))?;
        if let Some(r) = v.get("kv_role") {
            if !matches!(r.as_str(), Some("kv_producer" | "kv_consumer" | "kv_both")) {
                return Err(ConfigError::Field {
                    field: "kv_role",
                    reason: format!("expected kv_producer, kv_consumer or kv_both, got {r}"),
                });
            }
        }
        let mut c: Self =
            serde_json::from_value(v).map_err(|e| ConfigError::Json(e.to_string()))?;
        (c.connector_name, c.kind) = connector(&c.kv_connector).ok_or_else(|| {
            let names: Vec<&str> = CONNECTORS.iter().map(|(n, _)| *n).collect();
            ConfigError::Field {
                field: "kv_connector",
                reason: format!(
                    "unknown connector {:?}; this build has {}",
                    c.kv_connector,
                    names.join(", ")
                ),
            }
        })?;
        c.children = c.parse_children()?;
        if c.kind == ConnectorKind::Nixl && !cfg!(feature = "nixl") {
            return Err(ConfigError::Field {
                field: "kv_connector",
                reason: "this build has no NixlConnector: build with `cargo build --release --features splitserve/nixl` (docs/pd.md)".into(),
            });
        }
        let x = &c.kv_connector_extra_config;
        if c.kind == ConnectorKind::Nixl
            && (x.tls_cert_file.is_some() || x.tls_key_file.is_some() || x.tls_ca_file.is_some())
        {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.tls",
                reason: "TLS would cover only NixlConnector's side channel, not the KV that UCX moves; use TcpConnector where the link needs encryption".into(),
            });
        }
        if c.kind != ConnectorKind::Nixl && c.kv_connector_extra_config.backends.is_some() {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.backends",
                reason: format!("{} has no NIXL backends", c.kv_connector),
            });
        }
        match c.kv_connector_extra_config.num_threads {
            Some(_) if c.kind != ConnectorKind::Nixl => {
                return Err(ConfigError::Field {
                    field: "kv_connector_extra_config.num_threads",
                    reason: format!("{} has no NIXL threads", c.kv_connector),
                })
            }
            Some(n) if n > MAX_NIXL_THREADS => {
                return Err(ConfigError::Field {
                    field: "kv_connector_extra_config.num_threads",
                    reason: format!("{n} threads; at most {MAX_NIXL_THREADS}"),
                })
            }
            _ => {}
        }
        let dir = c.kind == ConnectorKind::SharedStorage;
        if c.kind == ConnectorKind::Offloading
            && c.kv_connector_extra_config
                .cpu_bytes_to_use
                .is_none_or(|b| b == 0)
        {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.cpu_bytes_to_use",
                reason: "OffloadingConnector needs the host memory it may use, in bytes".into(),
            });
        }
        if let Some(url) = &c.kv_connector_extra_config.remote_url {
            if c.kind != ConnectorKind::RedisStore {
                return Err(ConfigError::Field {
                    field: "kv_connector_extra_config.remote_url",
                    reason: format!("{} has no remote store", c.kv_connector),
                });
            }
            // redis://host:port[/db]; a password would sit on the command line.
            let rest = url.strip_prefix("redis://").unwrap_or("");
            if rest.is_empty() || rest.contains('@') {
                return Err(ConfigError::Field {
                    field: "kv_connector_extra_config.remote_url",
                    reason: "expected redis://host:port[/db], without credentials: the password comes from SPLITSERVE_REDIS_PASSWORD".into(),
                });
            }
        } else if c.kind == ConnectorKind::RedisStore {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.remote_url",
                reason: "RedisStoreConnector needs the server, redis://host:port".into(),
            });
        }
        if let Some(tiers) = &c.kv_connector_extra_config.secondary_tiers {
            let field = "kv_connector_extra_config.secondary_tiers";
            let reason = if c.kind != ConnectorKind::Offloading {
                Some(format!(
                    "{} has no tiers; OffloadingConnector does",
                    c.kv_connector
                ))
            } else if tiers.len() > 1 {
                Some("one tier below host memory is supported: {\"kind\": \"disk\", ...}".into())
            } else {
                tiers.iter().find_map(|t| {
                    if t.kind != "disk" {
                        Some(format!("kind {:?}: \"disk\" is the one kind", t.kind))
                    } else if t.bytes == 0 {
                        Some("a disk tier needs bytes > 0".into())
                    } else {
                        None
                    }
                })
            };
            if let Some(reason) = reason {
                return Err(ConfigError::Field { field, reason });
            }
        }
        if dir && c.kv_connector_extra_config.shared_storage_path.is_none() {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.shared_storage_path",
                reason: format!("{} needs the directory its instances share", c.kv_connector),
            });
        }
        if !dir && c.kv_connector_extra_config.shared_storage_path.is_some() {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.shared_storage_path",
                reason: format!("{} keeps no store; ExampleConnector does", c.kv_connector),
            });
        }
        if c.kv_buffer_device != "cpu" {
            return Err(ConfigError::Field {
                field: "kv_buffer_device",
                reason: format!("{:?} is not supported; use \"cpu\"", c.kv_buffer_device),
            });
        }
        let x = &c.kv_connector_extra_config;
        let h = x.hold_timeout_s;
        if !(h.is_finite() && h > 0.0 && h <= 86_400.0) {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.hold_timeout_s",
                reason: format!("{h} is not a number of seconds in (0, 86400]"),
            });
        }
        if x.tls_cert_file.is_some() != x.tls_key_file.is_some() {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.tls_cert_file",
                reason: "give tls_cert_file and tls_key_file together".into(),
            });
        }
        if x.tls_cert_file.is_some() && !c.kv_role.produces() {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.tls_cert_file",
                reason: "only a producer serves the side channel; a consumer names the CA it trusts with tls_ca_file".into(),
            });
        }
        if x.tls_ca_file.is_some() && !c.kv_role.consumes() {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.tls_ca_file",
                reason: "only a consumer pulls KV; a producer gives tls_cert_file and tls_key_file"
                    .into(),
            });
        }
        if x.secret_env.is_some() && x.secret_file.is_some() {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.secret_env",
                reason: "give secret_env or secret_file, not both".into(),
            });
        }
        Ok(c)
    }

    /// The side channel's TLS settings (none unless the tls_* files are named).
    /// `MultiConnector`'s connectors, each checked as a config of its own.
    fn parse_children(&self) -> Result<Vec<KvTransferConfig>, ConfigError> {
        let field = |reason: String| ConfigError::Field {
            field: "kv_connector_extra_config.connectors",
            reason,
        };
        let given = &self.kv_connector_extra_config.connectors;
        if self.kind != ConnectorKind::Multi {
            if given.is_some() {
                return Err(field(format!("{} chains no connectors", self.kv_connector)));
            }
            return Ok(Vec::new());
        }
        let list = given.as_deref().unwrap_or_default();
        if list.is_empty() || list.len() > 4 {
            return Err(field("MultiConnector needs 1 to 4 connectors".into()));
        }
        let mut out = Vec::new();
        for v in list {
            let mut v = v.clone();
            let Some(o) = v.as_object_mut() else {
                return Err(field(format!("{v} is not a connector's config object")));
            };
            o.entry("kv_role")
                .or_insert_with(|| self.kv_role.as_str().into());
            let named = o.get("kv_connector").and_then(|x| x.as_str());
            match named.and_then(connector).map(|(_, k)| k) {
                Some(ConnectorKind::Multi) => {
                    return Err(field("a MultiConnector inside a MultiConnector".into()))
                }
                Some(ConnectorKind::Nixl) => {
                    return Err(field("a NixlConnector inside a MultiConnector is not supported; use TcpConnector there".into()))
                }
                _ => {}
            }
            let c = Self::parse(&v.to_string())?;
            if c.kv_role != self.kv_role {
                return Err(field(format!(
                    "{} is {}, the MultiConnector {}",
                    c.kv_connector,
                    c.kv_role.as_str(),
                    self.kv_role.as_str()
                )));
            }
            out.push(c);
        }
        if out.iter().filter(|c| c.kind == ConnectorKind::Tcp).count() > 1 {
            return Err(field("at most one TcpConnector".into()));
        }
        Ok(out)
    }

    /// The config whose `kv_connector_extra_config` holds the side channel's settings
    /// (secret, TLS, address, hold timeout): this one, or a MultiConnector's TcpConnector.
    pub fn tcp(&self) -> &KvTransferConfig {
        self.children
            .iter()
            .find(|c| c.kind == ConnectorKind::Tcp)
            .unwrap_or(self)
    }

    pub fn tls(&self) -> Result<Tls, ConfigError> {
        let x = &self.tcp().kv_connector_extra_config;
        let e = |e: crate::tls::TlsError| ConfigError::Field {
            field: "kv_connector_extra_config.tls",
            reason: e.to_string(),
        };
        let mut tls = Tls::default();
        if let (Some(c), Some(k)) = (&x.tls_cert_file, &x.tls_key_file) {
            tls = tls.merge(Tls::server(c, k).map_err(e)?);
        }
        if let Some(ca) = &x.tls_ca_file {
            tls = tls.merge(Tls::client(ca).map_err(e)?);
        }
        Ok(tls)
    }

    /// The pair's shared secret. Without `secret_env` or `secret_file`, this user's cookie
    /// in `cache_dir`; then a producer's side channel must be on loopback.
    pub fn secret(&self, cache_dir: &std::path::Path) -> Result<Secret, ConfigError> {
        let x = &self.tcp().kv_connector_extra_config;
        let e = |e: crate::auth::SecretError| ConfigError::Secret(e.to_string());
        match (&x.secret_env, &x.secret_file) {
            (Some(v), _) => Secret::from_env(v).map_err(e),
            (None, Some(f)) => Secret::from_file(f).map_err(e),
            (None, None) => {
                let loopback = x
                    .side_channel_host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
                    || x.side_channel_host == "localhost";
                if self.kv_role.produces() && !loopback {
                    return Err(ConfigError::Field {
                        field: "kv_connector_extra_config.side_channel_host",
                        reason: format!(
                            "{} is not loopback, and no secret is set: put the pair's shared secret (at least 16 bytes) in a file or an environment variable and name it with \"secret_file\" or \"secret_env\"",
                            x.side_channel_host
                        ),
                    });
                }
                Secret::cookie(cache_dir).map_err(e)
            }
        }
    }

    /// Whether the connector keeps KV in a store (no side channel, no holds).
    pub fn is_store(&self) -> bool {
        matches!(
            self.kind,
            ConnectorKind::SharedStorage | ConnectorKind::Offloading | ConnectorKind::RedisStore
        )
    }

    /// Whether a producer of this connector serves a side channel.
    pub fn serves_side_channel(&self) -> bool {
        match self.kind {
            ConnectorKind::Multi => self.children.iter().any(|c| c.serves_side_channel()),
            _ => self.kv_role.produces() && !self.is_store(),
        }
    }

    pub fn hold_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.tcp().kv_connector_extra_config.hold_timeout_s)
    }
}

#[cfg(test)]
mod tests {
    /// NixlConnector: refused without the feature (saying how to build it); with it, TLS
    /// settings are refused (UCX would move the KV in the clear) and `backends` is its own.
    #[test]
    fn nixl_connector_settings_are_checked() {
        use super::*;
        let tls = r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer",
                      "kv_connector_extra_config":{"tls_ca_file":"/ca.pem"}}"#;
        let err = KvTransferConfig::parse(tls)
            .expect_err("refused")
            .to_string();
        if cfg!(feature = "nixl") {
            assert!(err.contains("kv_connector_extra_config.tls"), "{err}");
            let ok = r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer",
                         "kv_connector_extra_config":{"backends":["UCX"]}}"#;
            let c = KvTransferConfig::parse(ok).expect("parses");
            assert_eq!(c.kind, ConnectorKind::Nixl);
        } else {
            assert!(err.contains("--features splitserve/nixl"), "{err}");
        }
        let other = r#"{"kv_connector":"TcpConnector","kv_role":"kv_consumer",
                        "kv_connector_extra_config":{"backends":["UCX"]}}"#;
        let err = KvTransferConfig::parse(other)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("backends"), "{err}");
        let other = r#"{"kv_connector":"TcpConnector","kv_role":"kv_consumer",
                        "kv_connector_extra_config":{"num_threads":2}}"#;
        let err = KvTransferConfig::parse(other)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("num_threads") && err.contains("TcpConnector has no NIXL threads"),
            "{err}"
        );
        if cfg!(feature = "nixl") {
            let many = r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer",
                           "kv_connector_extra_config":{"num_threads":65}}"#;
            let err = KvTransferConfig::parse(many)
                .expect_err("refused")
                .to_string();
            assert!(err.contains("65 threads; at most 64"), "{err}");
        }
    }

    use super::*;

    #[test]
    fn vllm_shape_parses() {
        let c = KvTransferConfig::parse(
            r#"{"kv_connector":"TcpConnector","kv_role":"kv_consumer","kv_buffer_device":"cpu",
                "kv_connector_extra_config":{"side_channel_port":0,"hold_timeout_s":2.5}}"#,
        )
        .unwrap();
        assert_eq!(c.kv_role, KvRole::KvConsumer);
        assert_eq!(c.kv_connector_extra_config.side_channel_port, 0);
        assert_eq!(c.kv_connector_extra_config.side_channel_host, "127.0.0.1");
        assert_eq!(c.hold_timeout(), Duration::from_millis(2500));
        assert_eq!(c.kv_load_failure_policy, LoadFailurePolicy::Fail);
        let c = KvTransferConfig::parse(
            r#"{"kv_connector":"TcpConnector","kv_role":"kv_consumer","kv_load_failure_policy":"recompute"}"#,
        )
        .unwrap();
        assert_eq!(c.kv_load_failure_policy, LoadFailurePolicy::Recompute);
        let e = KvTransferConfig::parse(
            r#"{"kv_connector":"TcpConnector","kv_role":"kv_consumer","kv_load_failure_policy":"retry"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant `retry`"), "{e}");
    }

    #[test]
    fn a_multi_connector_checks_each_of_its_connectors() {
        let c = KvTransferConfig::parse(
            r#"{"kv_connector":"MultiConnector","kv_role":"kv_consumer","kv_connector_extra_config":{"connectors":[
                {"kv_connector":"TcpConnector","kv_connector_extra_config":{"secret_env":"X","hold_timeout_s":7}},
                {"kv_connector":"OffloadingConnector","kv_connector_extra_config":{"cpu_bytes_to_use":1048576}}]}}"#,
        )
        .unwrap();
        assert_eq!(c.children.len(), 2);
        assert_eq!(c.children[1].kv_role, KvRole::KvConsumer, "role inherited");
        assert_eq!(
            c.hold_timeout(),
            Duration::from_secs(7),
            "the side channel's settings"
        );
        for (bad, want) in [
            (r#"[]"#, "1 to 4"),
            (
                r#"[{"kv_connector":"MultiConnector","kv_connector_extra_config":{"connectors":[]}}]"#,
                "inside a MultiConnector",
            ),
            (
                r#"[{"kv_connector":"TcpConnector","kv_role":"kv_producer"}]"#,
                "is kv_producer",
            ),
            (
                r#"[{"kv_connector":"OffloadingConnector"}]"#,
                "cpu_bytes_to_use",
            ),
            (
                r#"[{"kv_connector":"TcpConnector"},{"kv_connector":"TcpConnector"}]"#,
                "at most one",
            ),
        ] {
            let e = KvTransferConfig::parse(&format!(
                r#"{{"kv_connector":"MultiConnector","kv_role":"kv_consumer","kv_connector_extra_config":{{"connectors":{bad}}}}}"#
            ))
            .unwrap_err();
            assert!(e.to_string().contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        // Without the `nixl` feature, NixlConnector is a connector this build lacks.
        let nixl = (
            r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer"}"#,
            "kv_connector",
        );
        let cases = [
            nixl,
            (
                r#"{"kv_connector":"TcpConnector","kv_role":"kv_sender"}"#,
                "kv_role",
            ),
            (
                r#"{"kv_connector":"TcpConnector","kv_role":"kv_producer","kv_buffer_device":"cuda"}"#,
                "kv_buffer_device",
            ),
            (
                r#"{"kv_connector":"TcpConnector","kv_role":"kv_producer","kv_connector_extra_config":{"hold_timeout_s":-1}}"#,
                "hold_timeout_s",
            ),
            (
                r#"{"kv_connector":"TcpConnector","kv_role":"kv_producer","kv_connector_extra_config":{"side_chanel_port":1}}"#,
                "side_chanel_port",
            ),
            (r#"{"kv_role":"kv_producer"}"#, "kv_connector"),
            (
                r#"{"kv_connector":"TcpConnector","kv_role":"kv_producer","kv_connector_extra_config":{"secret_env":"A","secret_file":"/b"}}"#,
                "secret_env",
            ),
            (r#"{"kv_connector":"TcpConnector","#, "EOF"),
        ];
        for (json, field) in cases {
            if cfg!(feature = "nixl") && (json, field) == nixl {
                assert!(KvTransferConfig::parse(json).is_ok());
                continue;
            }
            let e = KvTransferConfig::parse(json).unwrap_err().to_string();
            assert!(e.contains(field), "{json}: {e}");
        }
    }

    #[test]
    fn tls_files_are_checked_by_role_and_read() {
        let parse = |role: &str, x: &str| {
            KvTransferConfig::parse(&format!(
                r#"{{"kv_connector":"TcpConnector","kv_role":"{role}","kv_connector_extra_config":{{{x}}}}}"#
            ))
        };
        let e = parse("kv_producer", r#""tls_cert_file":"c.pem""#).unwrap_err();
        assert!(
            e.to_string()
                .contains("tls_cert_file and tls_key_file together"),
            "{e}"
        );
        let e = parse("kv_consumer", r#""tls_cert_file":"c","tls_key_file":"k""#).unwrap_err();
        assert!(e.to_string().contains("only a producer serves"), "{e}");
        let e = parse("kv_producer", r#""tls_ca_file":"ca.pem""#).unwrap_err();
        assert!(e.to_string().contains("only a consumer pulls"), "{e}");
        let c = parse("kv_consumer", r#""tls_ca_file":"/nonexistent/ca.pem""#).unwrap();
        let e = c.tls().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let plain = parse("kv_both", "").unwrap().tls().unwrap();
        assert!(!plain.serves_tls());
    }

    #[test]
    fn secrets_are_named_not_given() {
        let dir = std::env::temp_dir().join(format!("ss-cfg-{}", std::process::id()));
        let remote = KvTransferConfig::parse(
            r#"{"kv_connector":"TcpConnector","kv_role":"kv_producer","kv_connector_extra_config":{"side_channel_host":"0.0.0.0"}}"#,
        )
        .unwrap();
        let e = remote.secret(&dir).unwrap_err().to_string();
        assert!(
            e.contains("not loopback") && e.contains("secret_file"),
            "{e}"
        );
        let env = KvTransferConfig::parse(
            r#"{"kv_connector":"TcpConnector","kv_role":"kv_producer","kv_connector_extra_config":{"side_channel_host":"0.0.0.0","secret_env":"SPLITSERVE_TEST_UNSET_SECRET"}}"#,
        )
        .unwrap();
        let e = env.secret(&dir).unwrap_err().to_string();
        assert!(e.contains("SPLITSERVE_TEST_UNSET_SECRET"), "{e}");
        let local =
            KvTransferConfig::parse(r#"{"kv_connector":"TcpConnector","kv_role":"kv_producer"}"#)
                .unwrap();
        local.secret(&dir).expect("loopback uses the cookie");
        assert!(dir.join("kv-secret").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
