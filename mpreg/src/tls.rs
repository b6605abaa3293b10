//! TLS (`wss://`): loading certificates, the node's acceptor and
//! connector, and the one stream type that is either plain TCP or TLS.
//!
//! rustls with the `ring` provider, installed explicitly into every config
//! (no process-wide default). No root store is bundled: the CA to trust
//! always comes from the configuration.
//!
//! With TLS, a node serves its certificate to clients and peers, and asks
//! for a client certificate without requiring one: clients may present
//! none, but a peer link is served only when the dialer presented a
//! certificate issued by the node's `tls_ca` (the server checks that in
//! [`crate::server`]). So a node whose certificate comes from another CA
//! cannot link, whichever side dials.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, error::UrlError};

use crate::config::{Config, ConfigError};
use crate::transport::{Conn, Transport};

/// PEM text, from a file or given in memory.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Pem {
    File(PathBuf),
    Memory(Vec<u8>),
}

impl std::fmt::Debug for Pem {
    /// Never shows the contents (one of them is a private key).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Memory(bytes) => write!(f, "Memory({} bytes)", bytes.len()),
        }
    }
}

impl Pem {
    fn path(&self) -> Option<PathBuf> {
        match self {
            Self::File(path) => Some(path.clone()),
            Self::Memory(_) => None,
        }
    }

    fn read(&self, setting: &'static str) -> Result<Vec<u8>, ConfigError> {
        match self {
            Self::File(path) => std::fs::read(path).map_err(|source| ConfigError::TlsFile {
                setting,
                path: path.clone(),
                source,
            }),
            Self::Memory(bytes) => Ok(bytes.clone()),
        }
    }

    fn error(&self, setting: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Tls {
            setting,
            path: self.path(),
            reason: reason.into(),
        }
    }

    /// Every certificate in the PEM text; at least one.
    fn certificates(
        &self,
        setting: &'static str,
    ) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let text = self.read(setting)?;
        let certs = CertificateDer::pem_slice_iter(&text)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(setting, e.to_string()))?;
        if certs.is_empty() {
            return Err(self.error(setting, "no PEM `CERTIFICATE` found"));
        }
        Ok(certs)
    }

    /// The first private key in the PEM text (PKCS#8, PKCS#1 or SEC1).
    fn private_key(&self, setting: &'static str) -> Result<PrivateKeyDer<'static>, ConfigError> {
        let text = self.read(setting)?;
        PrivateKeyDer::from_pem_slice(&text).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                self.error(setting, "no PEM private key found")
            }
            e => self.error(setting, e.to_string()),
        })
    }
}

/// Where a node's TLS material comes from: the config's paths, or PEM given
/// to the builder (which takes precedence).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Sources {
    pub(crate) cert: Option<Pem>,
    pub(crate) key: Option<Pem>,
    pub(crate) ca: Option<Pem>,
}

impl Sources {
    /// The config's paths, each replaced by PEM given in memory.
    pub(crate) fn resolve(&self, config: &Config) -> Self {
        let file = |path: &Option<PathBuf>| path.clone().map(Pem::File);
        Self {
            cert: self.cert.clone().or_else(|| file(&config.tls_cert)),
            key: self.key.clone().or_else(|| file(&config.tls_key)),
            ca: self.ca.clone().or_else(|| file(&config.tls_ca)),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Pem) -> Result<Arc<RootCertStore>, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in ca.certificates("tls_ca")? {
        roots
            .add(cert)
            .map_err(|e| ca.error("tls_ca", format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// A client-side TLS config that trusts `roots` and presents `identity` (a
/// certificate chain and its key), if any.
fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, ConfigError> {
    let invalid = |e: rustls::Error| ConfigError::Invalid {
        setting: "tls_key",
        reason: e.to_string(),
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_root_certificates(roots);
    match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(invalid),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A connector for clients: trusts the CA certificates in `ca_pem`.
pub(crate) fn client_connector(ca_pem: &[u8]) -> Result<TlsConnector, ConfigError> {
    let roots = roots(&Pem::Memory(ca_pem.to_vec()))?;
    Ok(TlsConnector::from(Arc::new(client_config(roots, None)?)))
}

/// A node's TLS: how it accepts connections (when it has a certificate)
/// and how it dials peers (when it has a CA to trust).
#[derive(Clone, Default)]
pub(crate) struct NodeTls {
    pub(crate) acceptor: Option<TlsAcceptor>,
    pub(crate) connector: Option<TlsConnector>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("listens_with_tls", &self.acceptor.is_some())
            .field("dials_with_tls", &self.connector.is_some())
            .finish()
    }
}

impl NodeTls {
    /// Loads the certificates and key, and checks the settings fit together:
    /// a certificate needs its key and a CA to verify peers against, and
    /// `wss://` peer URLs need a CA.
    pub(crate) fn load(config: &Config, sources: &Sources) -> Result<Self, ConfigError> {
        let Sources { cert, key, ca } = sources.resolve(config);
        let identity = match (&cert, &key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    setting: "tls_key",
                    reason: "`tls_cert` is set but `tls_key` is not".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    setting: "tls_cert",
                    reason: "`tls_key` is set but `tls_cert` is not".into(),
                });
            }
            (Some(cert), Some(key)) => {
                Some((cert.certificates("tls_cert")?, key.private_key("tls_key")?))
            }
        };
        let roots = ca.as_ref().map(roots).transpose()?;
        if identity.is_some() && roots.is_none() {
            return Err(ConfigError::Invalid {
                setting: "tls_ca",
                reason: "required with `tls_cert`: peers are dialed over wss:// and their \
                         certificates verified against it"
                    .into(),
            });
        }
        if roots.is_none()
            && let Some(url) = config.peers.iter().find(|u| u.starts_with("wss://"))
        {
            return Err(ConfigError::Invalid {
                setting: "tls_ca",
                reason: format!("required to dial the wss:// peer {url}"),
            });
        }
        let acceptor = match (&identity, &roots) {
            (Some((chain, private_key)), Some(roots)) => {
                // Clients may present no certificate; peers must (checked
                // when a peer hello arrives).
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| ConfigError::Invalid {
                            setting: "tls_ca",
                            reason: e.to_string(),
                        })?;
                let server = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .and_then(|b| {
                        b.with_client_cert_verifier(verifier)
                            .with_single_cert(chain.clone(), private_key.clone_key())
                    })
                    .map_err(|e| ConfigError::Tls {
                        setting: "tls_key",
                        path: key.as_ref().and_then(Pem::path),
                        reason: e.to_string(),
                    })?;
                Some(TlsAcceptor::from(Arc::new(server)))
            }
            _ => None,
        };
        let connector = roots
            .map(|roots| client_config(roots, identity))
            .transpose()?
            .map(|c| TlsConnector::from(Arc::new(c)));
        Ok(Self {
            acceptor,
            connector,
        })
    }

    /// The URL scheme of this node's links: `wss` when it listens with TLS
    /// (a cluster is all TLS or none).
    pub(crate) fn scheme(&self) -> &'static str {
        if self.acceptor.is_some() { "wss" } else { "ws" }
    }
}

/// A connection's byte stream: plain TCP, TLS over TCP, or a stream of
/// the in-memory network (the simulation's, without TLS).
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    Memory(crate::transport::memory::Stream),
}

impl Stream {
    /// Whether the other side presented a certificate that verified (only
    /// a server asks for one).
    pub(crate) fn has_peer_certificate(&self) -> bool {
        match self {
            Self::Plain(_) | Self::Memory(_) => false,
            Self::Tls(tls) => tls.get_ref().1.peer_certificates().is_some(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Self::Memory(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
            Self::Memory(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Accepts a TLS connection when `acceptor` is set; else passes `conn` on.
pub(crate) async fn accept(conn: Conn, acceptor: Option<&TlsAcceptor>) -> io::Result<Stream> {
    match (conn, acceptor) {
        (Conn::Tcp(tcp), None) => Ok(Stream::Plain(tcp)),
        (Conn::Tcp(tcp), Some(acceptor)) => {
            let tls = acceptor.accept(tcp).await?;
            Ok(Stream::Tls(Box::new(tls.into())))
        }
        (Conn::Memory(stream), None) => Ok(Stream::Memory(stream)),
        (Conn::Memory(_), Some(_)) => Err(no_tls_in_memory()),
    }
}

fn no_tls_in_memory() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "TLS is not simulated on the in-memory network",
    )
}

/// Opens a WebSocket connection to `request`'s URL over `transport`: `ws://`, or
/// `wss://` over TLS with `connector` (which must be given for `wss://`),
/// the server's name being the URL's host (an IP address or a DNS name).
pub(crate) async fn connect(
    transport: &Transport,
    request: impl IntoClientRequest,
    connector: Option<&TlsConnector>,
    config: WebSocketConfig,
) -> Result<(WebSocketStream<Stream>, Response), WsError> {
    let request = request.into_client_request()?;
    let uri = request.uri();
    let secure = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(WsError::Url(UrlError::UnsupportedUrlScheme)),
    };
    let host = uri
        .host()
        .ok_or(WsError::Url(UrlError::NoHostName))?
        // An IPv6 address is written in brackets in a URL.
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = match transport.dial(&host, port).await? {
        Conn::Tcp(tcp) => tcp,
        Conn::Memory(_) if secure => return Err(WsError::Io(no_tls_in_memory())),
        Conn::Memory(stream) => {
            let stream = Stream::Memory(stream);
            return tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await;
        }
    };
    let stream = if secure {
        let connector = connector.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a wss:// URL needs a CA certificate to trust (no root store is bundled)",
            )
        })?;
        let name = ServerName::try_from(host)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = connector.connect(name, tcp).await?;
        Stream::Tls(Box::new(tls.into()))
    } else {
        Stream::Plain(tcp)
    };
    tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await
}

fn tls_error(error: &WsError) -> Option<&rustls::Error> {
    let WsError::Io(e) = error else { return None };
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Whether a handshake failed because this side rejected the other side's
/// certificate (not issued by a trusted CA, wrong name, expired).
pub(crate) fn rejected_certificate(error: &WsError) -> bool {
    matches!(tls_error(error), Some(rustls::Error::InvalidCertificate(_)))
}

/// Whether a handshake failed because the other side rejected this side's
/// certificate (or its lack of one), as its alert says.
pub(crate) fn certificate_refused(error: &WsError) -> bool {
    use rustls::AlertDescription as Alert;
    matches!(
        tls_error(error),
        Some(rustls::Error::AlertReceived(
            Alert::BadCertificate
                | Alert::UnknownCA
                | Alert::CertificateRequired
                | Alert::CertificateUnknown
                | Alert::UnsupportedCertificate
                | Alert::CertificateExpired
                | Alert::CertificateRevoked
                | Alert::AccessDenied
        ))
    )
}
