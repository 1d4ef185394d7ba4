//! Optional TLS on the side channel, for links between hosts (rustls, ring provider). The
//! producer presents a certificate (`tls_cert_file`, `tls_key_file`); the consumer trusts the
//! CA in `tls_ca_file` and checks that the certificate names the host in the grant. The
//! pair's secret still authenticates both ends inside the TLS session.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

use crate::tcp::Conn;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: reading {path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS: {0}")]
    Config(String),
}

/// The side channel's TLS settings: the producer's certificate, the consumer's trust roots;
/// either or both may be absent (then that side speaks plain TCP).
#[derive(Clone, Default)]
pub struct Tls {
    server: Option<Arc<ServerConfig>>,
    client: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("serves", &self.server.is_some())
            .field("pulls", &self.client.is_some())
            .finish()
    }
}

// ring rather than aws-lc-rs: no cmake or C toolchain at build time. rustls marks ring's
// provider deprecated because it lacks post-quantum key exchange.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |reason: String| TlsError::File {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(e.to_string()))?;
    if certs.is_empty() {
        return Err(file("no PEM certificate in it".into()));
    }
    Ok(certs)
}

impl Tls {
    /// Producer side: serve TLS with this certificate chain and key (PEM files).
    pub fn server(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Self {
            server: Some(Arc::new(config)),
            client: None,
        })
    }

    /// Consumer side: connect with TLS, trusting only the CA certificates in `ca` (PEM).
    pub fn client(ca: &Path) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            roots
                .add(c)
                .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            server: None,
            client: Some(Arc::new(config)),
        })
    }

    /// Both sides' settings in one (a `kv_both` engine).
    pub fn merge(self, other: Tls) -> Tls {
        Tls {
            server: self.server.or(other.server),
            client: self.client.or(other.client),
        }
    }

    pub fn serves_tls(&self) -> bool {
        self.server.is_some()
    }

    /// The producer's end of an accepted connection.
    pub(crate) fn accept(&self, s: TcpStream) -> Result<Link, String> {
        match &self.server {
            None => Ok(Link::Plain(s)),
            Some(c) => {
                let conn = ServerConnection::new(c.clone()).map_err(|e| e.to_string())?;
                Ok(Link::Server(Box::new(StreamOwned::new(conn, s))))
            }
        }
    }

    /// The consumer's end of a connection to `host`.
    pub(crate) fn connect(&self, s: TcpStream, host: &str) -> Result<Link, String> {
        match &self.client {
            None => Ok(Link::Plain(s)),
            Some(c) => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| format!("{host} is no TLS server name: {e}"))?;
                let conn = ClientConnection::new(c.clone(), name).map_err(|e| e.to_string())?;
                Ok(Link::Client(Box::new(StreamOwned::new(conn, s))))
            }
        }
    }
}

/// A side-channel connection, plain or in TLS.
pub(crate) enum Link {
    Plain(TcpStream),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Link {
    fn tcp(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Server(s) => &s.sock,
            Link::Client(s) => &s.sock,
        }
    }

    pub(crate) fn set_write_wait(&self, d: Duration) {
        let _ = self.tcp().set_write_timeout(Some(d));
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Server(s) => s.read(buf),
            Link::Client(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Server(s) => s.write(buf),
            Link::Client(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Server(s) => s.flush(),
            Link::Client(s) => s.flush(),
        }
    }
}

impl Conn for Link {
    fn set_read_wait(&mut self, d: Duration) {
        let _ = self.tcp().set_read_timeout(Some(d));
    }
}
