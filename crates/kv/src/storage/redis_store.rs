//! The Redis tier (LMCache's role): a block's file is the value of
//! `splitserve:kv:<fingerprint digest>:<block hash>` on a server that instances share.
//!
//! Writes and lookups go through the `redis` crate. A load reads its value with GETRANGE on
//! a connection of its own, parsing the one bulk reply straight into the engine's blocks:
//! the crate would land it in a buffer first, and that copy cost a third of a load.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use splitserve_engine::prefix_cache::{hex, BlockHash};

use super::Tier;

/// Where the password for `remote_url` comes from: never the URL, which sits on a command
/// line.
pub(crate) const PASSWORD_ENV: &str = "SPLITSERVE_REDIS_PASSWORD";
/// Connect, read and write limit of one Redis call.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How long Redis is left alone after a failure.
const BACKOFF: Duration = Duration::from_secs(5);
/// Idle connections kept, of each kind.
const IDLE: usize = 8;

/// Redis down is a miss, never a wait: after a failure it is left alone for a few seconds,
/// and every call is bounded in time.
pub(crate) struct Redis {
    client: redis::Client,
    prefix: String,
    idle: Mutex<Vec<redis::Connection>>,
    readers: Mutex<Vec<Reader>>,
    down_until: Mutex<Option<Instant>>,
}

impl Redis {
    /// `url` (`redis://host:port[/db]`); the password, if any, from [`PASSWORD_ENV`].
    pub(crate) fn new(url: &str, digest: &[u8; 32]) -> Result<Self, String> {
        use redis::IntoConnectionInfo;
        // The config refused credentials in the URL already.
        let info = url.into_connection_info().map_err(|e| e.to_string())?;
        let info = match std::env::var(PASSWORD_ENV) {
            Ok(pw) if !pw.is_empty() => {
                let settings = info.redis_settings().clone().set_password(pw);
                info.set_redis_settings(settings)
            }
            _ => info,
        };
        let client = redis::Client::open(info).map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            prefix: format!("splitserve:kv:{}:", hex(digest)),
            idle: Mutex::new(Vec::new()),
            readers: Mutex::new(Vec::new()),
            down_until: Mutex::new(None),
        })
    }

    fn key(&self, hash: &BlockHash) -> String {
        format!("{}{}", self.prefix, hex(hash))
    }

    /// Marks Redis down for [`BACKOFF`], drops its pooled connections, and says why.
    fn down(&self, e: impl std::fmt::Display) -> std::io::Error {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + BACKOFF);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        tracing::warn!(redis = %self.describe(), error = %e, "Redis unavailable; stored KV skipped for {BACKOFF:?}");
        std::io::Error::other(e.to_string())
    }

    fn is_down(&self) -> bool {
        matches!(*self.down_until.lock().unwrap_or_else(|p| p.into_inner()), Some(t) if Instant::now() < t)
    }

    /// Runs `f` on a connection; an error (or Redis marked down) is an `io::Error`. A
    /// pooled connection that fails (gone stale: a restart, the server's idle timeout) gets
    /// one more try on a fresh one before Redis is called down.
    pub(crate) fn with<T>(
        &self,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> std::io::Result<T> {
        if self.is_down() {
            return Err(std::io::Error::other("Redis marked down"));
        }
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(mut c) = pooled {
            if let Ok(r) = f(&mut c) {
                self.keep(c);
                return Ok(r);
            }
        }
        let mut c = self
            .client
            .get_connection_with_timeout(TIMEOUT)
            .map_err(|e| self.down(e))?;
        c.set_read_timeout(Some(TIMEOUT))
            .and_then(|()| c.set_write_timeout(Some(TIMEOUT)))
            .map_err(|e| self.down(e))?;
        let r = f(&mut c).map_err(|e| self.down(e))?;
        self.keep(c);
        Ok(r)
    }

    fn keep(&self, c: redis::Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE {
            idle.push(c);
        }
    }

    /// A new reader connection (TCP only; `None` for TLS or a socket path, which load
    /// through the crate).
    fn new_reader(&self) -> std::io::Result<Option<Reader>> {
        let info = self.client.get_connection_info();
        let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Ok(None);
        };
        Reader::connect(host, *port, info.redis_settings()).map(Some)
    }
}

/// What a load's GETRANGE found.
enum Got {
    /// The value, read into the blocks; the connection is in step.
    Value,
    /// No value; the connection is in step.
    Missing,
    /// A value of another length, unread; the connection is not in step.
    WrongLength,
}

/// A plain connection that speaks the two or three commands a load needs.
struct Reader(BufReader<TcpStream>);

impl Reader {
    fn connect(host: &str, port: u16, s: &redis::RedisConnectionInfo) -> std::io::Result<Self> {
        use std::net::ToSocketAddrs;
        let addr = (host, port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{host} does not resolve")))?;
        let tcp = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        tcp.set_read_timeout(Some(TIMEOUT))?;
        tcp.set_write_timeout(Some(TIMEOUT))?;
        tcp.set_nodelay(true)?;
        let mut r = Self(BufReader::with_capacity(16 << 10, tcp));
        if let Some(pw) = s.password() {
            let mut args = vec![&b"AUTH"[..]];
            args.extend(s.username().map(str::as_bytes));
            args.push(pw.as_bytes());
            r.ok(&args)?;
        }
        if s.db() != 0 {
            r.ok(&[b"SELECT", s.db().to_string().as_bytes()])?;
        }
        Ok(r)
    }

    fn send(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            cmd.extend_from_slice(a);
            cmd.extend_from_slice(b"\r\n");
        }
        self.0.get_mut().write_all(&cmd)
    }

    /// A reply's first line, without its CRLF (bounded: a reply line is short).
    fn line(&mut self) -> std::io::Result<Vec<u8>> {
        let mut line = Vec::new();
        (&mut self.0).take(256).read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(std::io::Error::other("a malformed reply"));
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }

    /// Sends a command whose answer is `+OK`.
    fn ok(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        self.send(args)?;
        match self.line()? {
            l if l == b"+OK" => Ok(()),
            l => Err(std::io::Error::other(
                String::from_utf8_lossy(&l).into_owned(),
            )),
        }
    }

    /// GETRANGE of `key`'s first `len + 1` bytes into `head` then `parts` (`len` bytes
    /// together).
    fn get_into(
        &mut self,
        key: &str,
        head: &mut [u8],
        parts: &mut [&mut [u8]],
    ) -> std::io::Result<Got> {
        let len = super::file_len(head, parts);
        self.send(&[
            b"GETRANGE",
            key.as_bytes(),
            b"0",
            len.to_string().as_bytes(),
        ])?;
        let line = self.line()?;
        let n: usize = match line.strip_prefix(b"$") {
            Some(n) => std::str::from_utf8(n)
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| std::io::Error::other("a malformed reply"))?,
            None => {
                return Err(std::io::Error::other(
                    String::from_utf8_lossy(&line).into_owned(),
                ))
            }
        };
        if n == 0 {
            self.line()?;
            return Ok(Got::Missing);
        }
        if n != len {
            // Its bytes are left unread: the connection is out of step.
            return Ok(Got::WrongLength);
        }
        super::read_vectored_exact(&mut self.0, head, parts)?;
        if self.line()?.is_empty() {
            Ok(Got::Value)
        } else {
            Err(std::io::Error::other("a malformed reply"))
        }
    }
}

impl Redis {
    /// A load through the crate's connection (TLS, a socket path): its buffer, then a copy.
    fn read_through_crate(
        &self,
        key: &str,
        head: &mut [u8],
        parts: &mut [&mut [u8]],
    ) -> Result<bool, &'static str> {
        let len = super::file_len(head, parts);
        // Never more than a block file's size and a byte, whatever the value holds.
        let v: Vec<u8> = self
            .with(|c| redis::cmd("GETRANGE").arg(key).arg(0).arg(len).query(c))
            .map_err(|_| "missing")?;
        if v.is_empty() {
            return Err("missing");
        }
        super::fill_from(&mut &v[..], head, parts).map(|()| true)
    }
}

impl Tier for Redis {
    fn put(&self, hash: &BlockHash, bytes: Vec<u8>) -> std::io::Result<()> {
        let key = self.key(hash);
        self.with(|c| redis::cmd("SET").arg(&key).arg(&bytes[..]).query::<()>(c))
    }

    fn has(&self, hash: &BlockHash) -> bool {
        self.run_of(std::slice::from_ref(hash)) == 1
    }

    fn run_of(&self, hashes: &[BlockHash]) -> usize {
        if hashes.is_empty() {
            return 0;
        }
        // One round trip for the whole prompt.
        let mut p = redis::pipe();
        for h in hashes {
            p.cmd("EXISTS").arg(self.key(h));
        }
        match self.with(|c| p.query::<Vec<i64>>(c)) {
            Ok(found) => found.iter().take_while(|&&n| n == 1).count(),
            Err(_) => 0,
        }
    }

    fn read_into(
        &self,
        hash: &BlockHash,
        head: &mut [u8],
        parts: &mut [&mut [u8]],
    ) -> Result<bool, &'static str> {
        if self.is_down() {
            return Err("missing");
        }
        let key = self.key(hash);
        // A pooled reader first; if it fails (stale), one fresh one before calling Redis
        // down. What a failed try left in the blocks is overwritten or not used.
        let mut pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        loop {
            let (mut r, fresh) = match pooled.take() {
                Some(r) => (r, false),
                None => match self.new_reader() {
                    Ok(Some(r)) => (r, true),
                    Ok(None) => return self.read_through_crate(&key, head, parts),
                    Err(e) => {
                        self.down(e);
                        return Err("missing");
                    }
                },
            };
            let got = r.get_into(&key, head, parts);
            if matches!(got, Ok(Got::Value | Got::Missing)) {
                let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < IDLE {
                    idle.push(r);
                }
            }
            return match got {
                Ok(Got::Value) => Ok(true),
                Ok(Got::Missing) => Err("missing"),
                // A value of another length is a bad block, not an outage.
                Ok(Got::WrongLength) => Err("truncated"),
                Err(_) if !fresh => continue,
                Err(e) => {
                    self.down(e);
                    Err("missing")
                }
            };
        }
    }

    fn discard(&self, hash: &BlockHash) {
        let key = self.key(hash);
        let _ = self.with(|c| redis::cmd("DEL").arg(&key).query::<()>(c));
    }

    fn describe(&self) -> String {
        // The address only: the password never goes into a log.
        format!("redis {}", self.client.get_connection_info().addr())
    }
}
