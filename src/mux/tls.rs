//! TLS for network consoles (rustls, TLS 1.3, the `ring` provider): the server's and
//! `microvm attach`'s configurations from PEM files, and [`TlsStream`], a non-blocking
//! TCP socket with TLS inside.
//!
//! [`TlsStream`] never waits: a read pulls what the socket has into rustls, processes it
//! (the handshake too) and returns plaintext or `WouldBlock`; a write takes plaintext
//! only while rustls has no ciphertext it could not send, so what it buffers stays
//! bounded (one write's worth, [`MAX_WRITE`] plus TLS framing). The hub polls its fd for
//! writing while [`TlsStream::buffered`] says ciphertext is waiting, and reads again
//! while [`TlsStream::input_buffered`] says decrypted bytes are waiting.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

use super::spec::TlsSpec;

/// The most plaintext one write hands to rustls (one TLS record).
pub const MAX_WRITE: usize = 16 << 10;

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read.
    #[error("cannot read {what} '{}': {source}", .path.display())]
    Read {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{what} '{}' holds no {expected} in PEM form ({why})", .path.display())]
    Pem {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for.
        expected: &'static str,
        /// The parser's word.
        why: String,
    },
    /// rustls refused the configuration (a key that does not match the certificate,
    /// a CA that is not a CA, ...).
    #[error("TLS set-up: {what}: {why}")]
    Config {
        /// Which part.
        what: &'static str,
        /// rustls' message.
        why: String,
    },
    /// `attach tcp://HOST:PORT` with a host TLS cannot name.
    #[error("'{0}' is not a host name or IP address TLS can check a certificate against")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let bad = |why: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        expected: "CERTIFICATE",
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("none found".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        expected: "PRIVATE KEY",
        why: e.to_string(),
    })
}

fn roots(what: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(what, path)? {
        roots.add(c).map_err(|e| TlsError::Config {
            what,
            why: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn config_err(what: &'static str) -> impl Fn(rustls::Error) -> TlsError {
    move |e| TlsError::Config {
        what,
        why: e.to_string(),
    }
}

/// The server side of a tcp console (read at start, before the event loop).
pub fn server_config(spec: &TlsSpec) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs("tls-cert", &spec.cert)?;
    let key = load_key("tls-key", &spec.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err("protocol versions"))?;
    let builder = match &spec.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                roots("tls-client-ca", ca)?,
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Config {
                what: "tls-client-ca",
                why: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(config_err("tls-cert and tls-key"))?;
    // No session resumption: nothing to keep, nothing extra written after a handshake.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// `microvm attach`'s side: trust `ca`; present `identity` (cert, key) if given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err("protocol versions"))?
        .with_root_certificates(roots("--ca", ca)?);
    let cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs("--cert", cert)?, load_key("--key", key)?)
            .map_err(config_err("--cert and --key"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// A non-blocking TCP socket carrying TLS (either side).
pub struct TlsStream {
    conn: Connection,
    sock: TcpStream,
}

impl TlsStream {
    /// The server side of an accepted, non-blocking connection.
    pub fn server(sock: TcpStream, cfg: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(cfg).map_err(io::Error::other)?;
        Ok(TlsStream {
            conn: conn.into(),
            sock,
        })
    }

    /// The client side of a connected, non-blocking socket to `host`.
    pub fn client(
        sock: TcpStream,
        cfg: Arc<ClientConfig>,
        host: &str,
    ) -> Result<TlsStream, TlsError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| TlsError::ServerName(host.to_string()))?;
        let conn = ClientConnection::new(cfg, name).map_err(config_err("connection"))?;
        Ok(TlsStream {
            conn: conn.into(),
            sock,
        })
    }

    /// The TCP socket's fd (what to poll).
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The handshake is not over yet.
    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Ciphertext is waiting for the socket to take it (poll for writing).
    pub fn buffered(&self) -> bool {
        self.conn.wants_write()
    }

    /// Decrypted bytes are waiting to be read (the socket may not say readable).
    pub fn input_buffered(&mut self) -> bool {
        self.conn
            .process_new_packets()
            .is_ok_and(|s| s.plaintext_bytes_to_read() > 0)
    }

    /// Sends buffered ciphertext until done or the socket would block.
    pub fn push(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Processes the records read, then sends what that produced: handshake messages,
    /// or the alert that says why the peer's records were refused (then an error).
    fn process(&mut self) -> io::Result<()> {
        let processed = self.conn.process_new_packets();
        let pushed = self.push();
        if let Err(e) = processed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        pushed
    }

    /// Moves the handshake on with what the socket has, reading no plaintext:
    /// `Ok(true)` once it is over, `Ok(false)` while it waits for the peer. An error
    /// (a bad hello, a refused certificate, the peer gone) ends the connection; the
    /// alert saying why has been sent, best effort.
    pub fn handshake(&mut self) -> io::Result<bool> {
        while self.conn.is_handshaking() {
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.push()?;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.process()?;
        }
        self.push()?;
        Ok(true)
    }

    /// Plaintext, or `WouldBlock`; `Ok(0)` at the end (close_notify, or the socket
    /// closed). Drives the handshake.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: an end like any other for a console.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let eof = match self.conn.read_tls(&mut self.sock) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.process()?;
            if eof {
                return match self.conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(_) => Ok(0),
                };
            }
        }
    }

    /// Takes up to [`MAX_WRITE`] bytes of plaintext, unless earlier ciphertext still
    /// waits for the socket (`WouldBlock`).
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push()?;
        if self.conn.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.conn.writer().write(&buf[..buf.len().min(MAX_WRITE)])?;
        self.push()?;
        Ok(n)
    }

    /// Takes a short line whole (at most one TLS record), whatever waits for the socket
    /// already: what a fresh connection is told first.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<usize> {
        let n = self
            .conn
            .writer()
            .write(&line[..line.len().min(MAX_WRITE)])?;
        self.push()?;
        Ok(n)
    }

    /// Says goodbye (close_notify), best effort.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = self.push();
    }

    /// The peer's certificate chain, once the handshake is over (client auth).
    pub fn peer_verified(&self) -> bool {
        self.conn.peer_certificates().is_some_and(|c| !c.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::test_util::scratch_dir;

    #[test]
    fn bad_files_are_named() {
        let d = scratch_dir("tls");
        let garbage = d.join("garbage.pem");
        std::fs::write(&garbage, b"not a certificate\n").unwrap();
        let missing = d.join("missing.pem");
        let e = load_certs("tls-cert", &missing).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot read tls-cert") && e.contains("missing.pem"),
            "{e}"
        );
        let e = load_certs("tls-cert", &garbage).unwrap_err().to_string();
        assert!(e.contains("holds no CERTIFICATE"), "{e}");
        let e = load_key("tls-key", &garbage).unwrap_err().to_string();
        assert!(e.contains("holds no PRIVATE KEY"), "{e}");

        // A certificate with somebody else's key.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let (c, k) = (d.join("c.pem"), d.join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, other.serialize_pem()).unwrap();
        let spec = TlsSpec {
            cert: c.clone(),
            key: k.clone(),
            client_ca: None,
        };
        let e = server_config(&spec).unwrap_err().to_string();
        assert!(e.contains("tls-cert and tls-key"), "{e}");
        std::fs::write(&k, key.serialize_pem()).unwrap();
        assert!(server_config(&spec).is_ok());
        // A client CA file that holds no certificate.
        let e = server_config(&TlsSpec {
            client_ca: Some(garbage),
            ..spec
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls-client-ca"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }
}
