//! KV transfer between engines: the role configuration, the handshake fingerprint, the wire
//! format and the TCP transport.

pub mod config;
pub mod connector;
pub mod fingerprint;
pub mod migration;
pub mod tcp;
pub mod wire;

pub use config::{ConfigError, KvRole, KvTransferConfig};
pub use connector::{LoadReport, RemoteAddr, TcpConnector};
pub use fingerprint::{Fingerprint, HandshakeError};
pub use wire::{Frame, WireError};
