//! `--kv-transfer-config`: the role of a server in a disaggregated pair, in vLLM's JSON shape.
//!
//! ```json
//! {"kv_connector": "TcpConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu",
//!  "kv_connector_extra_config": {"side_channel_host": "127.0.0.1", "side_channel_port": 5600,
//!                                "hold_timeout_s": 30}}
//! ```

use std::time::Duration;

use serde::Deserialize;

/// Connectors this build has.
pub const CONNECTORS: &[&str] = &["TcpConnector"];

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
}

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
}

fn default_device() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--kv-transfer-config: {0}")]
    Json(String),
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
        let c: Self = serde_json::from_value(v).map_err(|e| ConfigError::Json(e.to_string()))?;
        if !CONNECTORS.contains(&c.kv_connector.as_str()) {
            return Err(ConfigError::Field {
                field: "kv_connector",
                reason: format!(
                    "unknown connector {:?}; this build has {}",
                    c.kv_connector,
                    CONNECTORS.join(", ")
                ),
            });
        }
        if c.kv_buffer_device != "cpu" {
            return Err(ConfigError::Field {
                field: "kv_buffer_device",
                reason: format!("{:?} is not supported; use \"cpu\"", c.kv_buffer_device),
            });
        }
        let h = c.kv_connector_extra_config.hold_timeout_s;
        if !(h.is_finite() && h > 0.0 && h <= 86_400.0) {
            return Err(ConfigError::Field {
                field: "kv_connector_extra_config.hold_timeout_s",
                reason: format!("{h} is not a number of seconds in (0, 86400]"),
            });
        }
        Ok(c)
    }

    pub fn hold_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.kv_connector_extra_config.hold_timeout_s)
    }
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            (
                r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer"}"#,
                "kv_connector",
            ),
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
            (r#"{"kv_connector":"TcpConnector","#, "EOF"),
        ];
        for (json, field) in cases {
            let e = KvTransferConfig::parse(json).unwrap_err().to_string();
            assert!(e.contains(field), "{json}: {e}");
        }
    }
}
