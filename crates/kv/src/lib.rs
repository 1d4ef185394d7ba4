//! KV transfer between engines: the handshake fingerprint and the wire format.
//!
//! Status: fingerprint check, frame codec and a TCP pull transport, tested against the
//! engine's hold/export/import. Not yet: the server roles (`--kv-transfer-config`), the
//! proxy, per-layer streaming straight into blocks.

pub mod fingerprint;
pub mod tcp;
pub mod wire;

pub use fingerprint::{Fingerprint, HandshakeError};
pub use wire::{Frame, WireError};
