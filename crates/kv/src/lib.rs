//! KV transfer between engines: the handshake fingerprint and the wire format.
//!
//! Status: the foundation of the disaggregation issue. The fingerprint check and the frame
//! codec are complete and tested; the connector trait in the engine, the TCP transport
//! that uses them, and the proxy are not built yet.

pub mod fingerprint;
pub mod wire;

pub use fingerprint::{Fingerprint, HandshakeError};
pub use wire::{Frame, WireError};
