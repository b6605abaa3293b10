//! Node settings, and reading them from a TOML file.
//!
//! See `mpreg.example.toml` at the repository root for a commented example.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default maximum size of one WebSocket message (64 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;
/// Default deadline of a request that names none.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Default maximum number of requests in flight on one client connection.
pub const DEFAULT_MAX_INFLIGHT: usize = 4096;
/// Default maximum number of commands in one request.
pub const DEFAULT_MAX_COMMANDS: usize = 100_000;

/// Everything that configures a node. Built by [`NodeBuilder`](crate::NodeBuilder)
/// or read from a file with [`Config::from_file`].
///
/// ```
/// let config: mpreg::Config = mpreg::Config::from_toml_str(r#"
///     name = "worker-1"
///     listen = "127.0.0.1:0"
///     datasets = ["model-a"]
/// "#).unwrap();
/// assert_eq!(config.datasets, ["model-a"]);
/// ```
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Config {
    /// The node's name, shown to operators and in cluster views.
    pub name: Option<String>,
    /// Address to listen on, `HOST:PORT` (port 0 picks a free port).
    pub listen: String,
    /// URLs of peers to join (`ws://host:port`).
    pub peers: Vec<String>,
    /// Datasets this node has; added to every function it serves.
    pub datasets: Vec<String>,
    /// Serve the operator functions `debug.sleep`, `debug.fail` and
    /// `debug.panic`.
    pub diagnostics: bool,
    /// Largest WebSocket message accepted, in bytes.
    pub max_message_size: usize,
    /// Deadline for requests that carry no `timeout_ms`, in milliseconds.
    pub request_timeout_ms: u64,
    /// Most requests in flight on one connection; more get `overloaded`.
    pub max_inflight_per_connection: usize,
    /// Most commands in one request; more get `bad_request`.
    pub max_commands_per_request: usize,
    /// On shutdown, how long requests in flight may take to finish, and
    /// then how long replies may take to be written, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Peer links: how often to ping the peer, in milliseconds.
    pub keepalive_interval_ms: u64,
    /// Peer links: how long a link may stay silent (no message, no pong)
    /// before it is treated as lost, in milliseconds.
    pub keepalive_timeout_ms: u64,
    /// Failure detection: how often a random member is probed, in
    /// milliseconds.
    pub probe_interval_ms: u64,
    /// Failure detection: how long a member that stopped answering probes
    /// has to prove it is alive before it is declared down, in milliseconds.
    pub suspect_timeout_ms: u64,
    /// When set, peers must prove they know this secret to link (a
    /// challenge and HMAC, never the secret in clear), and gossip packets
    /// are authenticated with it.
    pub cluster_secret: Option<String>,
    /// When not empty, clients must present one of these tokens (in the
    /// WebSocket upgrade request, `Authorization: Bearer TOKEN`, or in a
    /// first message `{"role":"auth","token":"TOKEN"}`).
    pub client_tokens: Vec<String>,
    /// TLS: this node's certificate chain (PEM file, leaf first). With
    /// [`tls_key`](Self::tls_key), the node listens with TLS (`wss://`) and
    /// presents this certificate to the peers it dials. Peers dial members
    /// by IP address, so the certificate must name the address peers reach
    /// the node at (an IP subject alternative name).
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key of [`tls_cert`](Self::tls_cert) (PEM file:
    /// PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA certificates (PEM file) that peers' certificates must be
    /// issued by, both when this node dials them over `wss://` and when they
    /// dial it. Required with `tls_cert`, and to dial `wss://` peer URLs.
    pub tls_ca: Option<PathBuf>,
}

impl std::fmt::Debug for Config {
    /// Like a derived `Debug`, but never shows the secret or the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("datasets", &self.datasets)
            .field("diagnostics", &self.diagnostics)
            .field("max_message_size", &self.max_message_size)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field(
                "max_inflight_per_connection",
                &self.max_inflight_per_connection,
            )
            .field("max_commands_per_request", &self.max_commands_per_request)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("keepalive_interval_ms", &self.keepalive_interval_ms)
            .field("keepalive_timeout_ms", &self.keepalive_timeout_ms)
            .field("probe_interval_ms", &self.probe_interval_ms)
            .field("suspect_timeout_ms", &self.suspect_timeout_ms)
            .field(
                "cluster_secret",
                &self.cluster_secret.as_ref().map(|_| "(set)"),
            )
            .field(
                "client_tokens",
                &format_args!("({} set)", self.client_tokens.len()),
            )
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: None,
            listen: "127.0.0.1:0".to_owned(),
            peers: Vec::new(),
            datasets: Vec::new(),
            diagnostics: false,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT.as_millis() as u64,
            max_inflight_per_connection: DEFAULT_MAX_INFLIGHT,
            max_commands_per_request: DEFAULT_MAX_COMMANDS,
            shutdown_grace_ms: 10_000,
            keepalive_interval_ms: 5_000,
            keepalive_timeout_ms: 20_000,
            probe_interval_ms: 1_000,
            suspect_timeout_ms: 3_000,
            cluster_secret: None,
            client_tokens: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        }
    }
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: Some(path.to_owned()),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text).map_err(|source| ConfigError::Parse {
            path: None,
            source: Box::new(source),
        })
    }

    fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub(crate) fn keepalive(&self) -> crate::link::Keepalive {
        crate::link::Keepalive {
            interval: Duration::from_millis(self.keepalive_interval_ms.max(1)),
            timeout: Duration::from_millis(self.keepalive_timeout_ms.max(1)),
        }
    }

    /// The shutdown grace period as a [`Duration`].
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The default request deadline as a [`Duration`].
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped settings.
    #[error("invalid config{}: {source}", path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Parse {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        /// What is wrong, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A setting has a value that cannot work (named by `setting`).
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        /// The setting's name.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A TLS certificate or key file (named by `setting`) could not be read.
    #[error("cannot read `{setting}` file {}: {source}", path.display())]
    TlsFile {
        /// The setting: `tls_cert`, `tls_key` or `tls_ca`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS certificates or a key that cannot be used: not PEM, none in the
    /// file, or rejected (a key that does not match its certificate, a CA
    /// certificate that does not parse).
    #[error("unusable `{setting}`{}: {reason}", path.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
    Tls {
        /// The setting: `tls_cert`, `tls_key` or `tls_ca`.
        setting: &'static str,
        /// The file, when the PEM came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_settings() {
        let c = Config::from_toml_str("name = \"n\"").expect("valid");
        assert_eq!(c.name.as_deref(), Some("n"));
        assert_eq!(c.max_message_size, DEFAULT_MAX_MESSAGE_SIZE);
        assert_eq!(c.request_timeout(), DEFAULT_REQUEST_TIMEOUT);
    }

    #[test]
    fn unknown_setting_is_an_error_naming_it() {
        let e = Config::from_toml_str("nmae = \"n\"").expect_err("typo");
        assert!(e.to_string().contains("nmae"), "{e}");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = Config::from_toml_str("cluster_secret = \"hunter2\"\nclient_tokens = [\"tok-1\"]")
            .expect("valid");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-1"),
            "{shown}"
        );
        assert!(shown.contains("cluster_secret: Some(\"(set)\")"), "{shown}");
    }

    #[test]
    fn example_file_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../mpreg.example.toml");
        let c = Config::from_file(path).expect("example config is valid");
        assert_eq!(c.datasets, ["model-a", "model-b"]);
    }
}
