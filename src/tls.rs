//! TLS with rustls (the `ring` provider): the client listener's
//! certificate and, optionally, client certificate verification; and how
//! the upstream's certificate is verified. Everything is read from PEM
//! files and checked once, by `Config::resolve`,
//! so a missing file, bad PEM or a key that does not match its certificate
//! stops the proxy at start (and fails `--check`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Every certificate in a PEM file (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "no PEM certificate (BEGIN CERTIFICATE) in {}",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("no PEM private key (BEGIN PRIVATE KEY) in {}", path.display())
        }
        e => format!("bad PEM in {}: {e}", path.display()),
    })
}

/// A CA bundle as trust anchors.
fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Which setting an error is about, so that it can be named.
#[derive(Debug)]
pub struct KeyError {
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for KeyError {}

fn at(key: &'static str) -> impl Fn(String) -> KeyError {
    move |message| KeyError { key, message }
}

/// TLS on the client listener: the proxy's certificate and key, and the CA
/// client certificates must chain to (if any). Compared and printed by
/// its file names.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_cert_file: Option<PathBuf>,
    acceptor: TlsAcceptor,
}

impl ServerTls {
    /// Reads and checks the files (the key must match the certificate).
    pub fn load(
        cert_file: PathBuf,
        key_file: PathBuf,
        ca_cert_file: Option<PathBuf>,
    ) -> Result<ServerTls, KeyError> {
        let chain = certificates(&cert_file).map_err(at("tls_cert_file"))?;
        let key = private_key(&key_file).map_err(at("tls_key_file"))?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| at("tls_cert_file")(e.to_string()))?;
        let builder = match &ca_cert_file {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = roots(ca).map_err(at("tls_ca_cert_file"))?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| at("tls_ca_cert_file")(format!("{}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            at("tls_key_file")(format!(
                "{} cannot be used with the certificate in {}: {e}",
                key_file.display(),
                cert_file.display()
            ))
        })?;
        Ok(ServerTls {
            cert_file,
            key_file,
            ca_cert_file,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        (&self.cert_file, &self.key_file, &self.ca_cert_file)
            == (&other.cert_file, &other.key_file, &other.ca_cert_file)
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("ca_cert_file", &self.ca_cert_file)
            .finish()
    }
}

/// TLS to the upstream (`rediss://` or `upstream_tls`): which CA Redis'
/// certificate must chain to and which name it must carry. Compared and
/// printed by those two settings.
#[derive(Clone, Default)]
pub struct UpstreamTls {
    /// PEM CA bundle; `None`: the Mozilla roots of `webpki-roots`.
    pub ca_cert_file: Option<PathBuf>,
    /// `None`: the upstream host.
    pub server_name: Option<String>,
    /// Built by [`prepare`](Self::prepare).
    client: Option<(TlsConnector, ServerName<'static>)>,
}

impl UpstreamTls {
    /// Reads the CA file and checks the name, for connections to `host`.
    pub fn prepare(&mut self, host: &str) -> Result<(), KeyError> {
        let roots = match &self.ca_cert_file {
            Some(path) => roots(path).map_err(at("upstream_tls_ca_cert_file"))?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let (key, name) = match &self.server_name {
            Some(name) => ("upstream_tls_server_name", name.as_str()),
            None => ("upstream", host),
        };
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| at(key)(format!("`{name}` cannot be checked against a certificate: {e}")))?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| at("upstream_tls")(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        self.client = Some((TlsConnector::from(Arc::new(config)), name));
        Ok(())
    }

    /// The connector and the name to verify; built now if
    /// [`prepare`](Self::prepare) was not called.
    pub fn client(&self, host: &str) -> Result<(TlsConnector, ServerName<'static>), KeyError> {
        match &self.client {
            Some(client) => Ok(client.clone()),
            None => {
                let mut tls = self.clone();
                tls.prepare(host)?;
                Ok(tls.client.expect("prepared"))
            }
        }
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        (&self.ca_cert_file, &self.server_name) == (&other.ca_cert_file, &other.server_name)
    }
}

impl Eq for UpstreamTls {}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca_cert_file", &self.ca_cert_file)
            .field("server_name", &self.server_name)
            .finish()
    }
}
