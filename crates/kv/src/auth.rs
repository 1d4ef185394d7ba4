//! The pair's shared secret and what it proves: a side-channel peer's identity (a
//! challenge-response in both directions) and the producer's signature on the
//! `kv_transfer_params` it hands out.
//!
//! The secret comes from `kv_connector_extra_config`: `secret_env` (the name of an
//! environment variable) or `secret_file` (a path), never the secret itself on a command
//! line. With neither, every process of this user on this host shares a random secret in
//! `<cache dir>/kv-secret` (created 0600, like a cookie file), and the side channel must bind
//! loopback: processes of other users or hosts cannot read it.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of secret at least (128 bits).
pub const MIN_SECRET_BYTES: usize = 16;

/// The pair's shared secret. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the KV secret from {from} has {len} bytes; at least {MIN_SECRET_BYTES} are needed")]
    TooShort { from: String, len: usize },
    #[error("kv_connector_extra_config.secret_env names {0}, which is not set")]
    EnvUnset(String),
    #[error("reading the KV secret file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the KV secret file {0} can be read by other users; chmod 600 it")]
    FileOpen(PathBuf),
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// `n` random bytes from the OS.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, SecretError> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| SecretError::Random(e.to_string()))?;
    Ok(b)
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Secret {
    pub fn from_bytes(b: &[u8], from: &str) -> Result<Self, SecretError> {
        if b.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                from: from.to_string(),
                len: b.len(),
            });
        }
        Ok(Self(b.to_vec()))
    }

    /// A fresh random secret (tests, and the cookie file).
    pub fn random() -> Result<Self, SecretError> {
        Ok(Self(random_bytes(32)?))
    }

    /// The secret in the environment variable `name` (surrounding whitespace dropped).
    pub fn from_env(name: &str) -> Result<Self, SecretError> {
        let v = std::env::var(name).map_err(|_| SecretError::EnvUnset(name.to_string()))?;
        Self::from_bytes(v.trim().as_bytes(), &format!("${name}"))
    }

    /// The secret in file `path`, which only its owner may read.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let file = |source| SecretError::File {
            path: path.to_path_buf(),
            source,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(file)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(SecretError::FileOpen(path.to_path_buf()));
            }
        }
        let v = std::fs::read(path).map_err(file)?;
        let text = String::from_utf8_lossy(&v);
        Self::from_bytes(text.trim().as_bytes(), &path.display().to_string())
    }

    /// This user's cookie file in `dir`, created with a random secret if it is missing.
    pub fn cookie(dir: &Path) -> Result<Self, SecretError> {
        let path = dir.join("kv-secret");
        if !path.exists() {
            let file = |source| SecretError::File {
                path: path.clone(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(file)?;
            let tmp = dir.join(format!("kv-secret.{}.tmp", std::process::id()));
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            let mut f = o.open(&tmp).map_err(file)?;
            std::io::Write::write_all(&mut f, hex(&random_bytes(32)?).as_bytes()).map_err(file)?;
            drop(f);
            // Two processes starting at once: the first rename wins and both read its file.
            if std::fs::hard_link(&tmp, &path).is_err() && !path.exists() {
                std::fs::rename(&tmp, &path).map_err(file)?;
            }
            let _ = std::fs::remove_file(&tmp);
        }
        Self::from_file(&path)
    }

    fn hmac(&self, parts: &[&[u8]]) -> HmacSha256 {
        // Any key length is accepted by HMAC; this cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for p in parts {
            // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m
    }

    /// HMAC-SHA256 of `parts` under the secret.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.hmac(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.hmac(parts).verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_every_part_and_its_boundaries() {
        let s = Secret::from_bytes(b"0123456789abcdef", "test").unwrap();
        let t = s.mac(&[b"ab", b"c"]);
        assert!(s.verify(&[b"ab", b"c"], &t));
        assert!(!s.verify(&[b"a", b"bc"], &t));
        assert!(!s.verify(&[b"ab", b"d"], &t));
        let other = Secret::from_bytes(b"0123456789abcdeF", "test").unwrap();
        assert!(!other.verify(&[b"ab", b"c"], &t));
        assert!(!s.verify(&[b"ab", b"c"], &t[..31]));
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(matches!(
            Secret::from_bytes(b"short", "x"),
            Err(SecretError::TooShort { len: 5, .. })
        ));
        assert_eq!(unhex(&hex(&[0, 255, 16])), Some(vec![0, 255, 16]));
        assert_eq!(unhex("0g"), None);
    }

    #[test]
    fn cookie_is_created_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("ss-cookie-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Secret::cookie(&dir).unwrap();
        let b = Secret::cookie(&dir).unwrap();
        assert_eq!(a.0, b.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("kv-secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(
                dir.join("kv-secret"),
                std::fs::Permissions::from_mode(0o644),
            )
            .unwrap();
            assert!(matches!(
                Secret::cookie(&dir),
                Err(SecretError::FileOpen(_))
            ));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
