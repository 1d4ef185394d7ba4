//! KV transfer between engines: the role configuration, the pair's secret and the grants it
//! signs, the handshake fingerprint, the wire format and the TCP transport.

pub mod auth;
pub mod config;
pub mod connector;
pub mod fingerprint;
#[doc(hidden)]
pub mod fuzz;
pub mod grant;
pub mod migration;
mod multi;
#[cfg(feature = "nixl")]
pub mod nixl;
pub mod params;
pub mod role;
pub mod storage;
pub mod tcp;
pub mod tls;
pub mod wire;

pub use auth::{Secret, SecretError};
pub use config::{ConfigError, KvRole, KvTransferConfig};
pub use connector::{LoadReport, TcpConnector};
pub use fingerprint::{Fingerprint, HandshakeError};
pub use grant::{GrantError, Grants, RemoteAddr};
pub use params::{Ask, KvTransferParams, ParamsError};
pub use role::{KvRoleConnector, Plan, PlanError};
pub use wire::{Frame, WireError};
