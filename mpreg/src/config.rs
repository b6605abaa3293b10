//! Node settings, and reading them from a TOML or YAML file and from
//! environment variables.
//!
//! See `mpreg.example.toml` at the repository root for a commented example.
//!
//! # YAML, and the original project's files
//!
//! [`Config::from_file`] reads `.yaml` and `.yml` files as YAML, anything
//! else as TOML. YAML takes every setting TOML takes, under the same names,
//! and also the keys of the original (Python) project's config files, so
//! those are read unchanged:
//!
//! - `host` and `port` make `listen = "host:port"` (`port` without `host`
//!   listens on `127.0.0.1`; `host` without `port`, or either with `listen`,
//!   is an error);
//! - `resources` (a list) is added to `datasets`;
//! - `peers` may be `null` (no peers) or a list of URLs;
//! - `connect` (a URL, or `null`) is one more peer;
//! - `funs` must be `null` (or absent): mpreg serves the functions compiled
//!   into the binary, never functions named in a config file.
//!
//! A numeric host made only of digits and dots (in `host`, `connect` or
//! `peers`) that is not a plain four-part address, such as the original's
//! `ws://127.0.01:7773/`, is read as the C library's `inet_aton` (and so
//! `getaddrinfo`, and the original Python project) reads it: the last part
//! fills the bytes that remain and a part with a leading `0` is octal, so
//! `127.0.01` is `127.0.0.1`, and the URL is rewritten with the plain form.
//! A numeric host that `inet_aton` rejects (`1.2.3.4.5`, `256.0.0.1`) is a
//! [`ConfigError::Invalid`] naming the key and the value. Other keys are an
//! error naming them, as in TOML.
//!
//! # Environment variables
//!
//! [`Config::apply_env`] overrides each setting from the variable named
//! `MPREG_` and the setting in capitals (`MPREG_LISTEN`,
//! `MPREG_REQUEST_TIMEOUT_MS`, `MPREG_TLS_CERT`, ...; the table is at
//! [`Config::apply_vars`]). Lists are comma-separated and replace the file's
//! list. `mpreg server` applies the file, then the environment, then its
//! flags.

use std::net::Ipv4Addr;
use std::num::{IntErrorKind, ParseIntError};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use yaml_serde::{Mapping, Value};

/// Default maximum size of one WebSocket message (64 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;
/// Default deadline of a request that names none.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Default maximum number of requests in flight on one client connection.
pub const DEFAULT_MAX_INFLIGHT: usize = 4096;
/// Default maximum number of commands in one request.
pub const DEFAULT_MAX_COMMANDS: usize = 100_000;
/// Default budget of bytes held for all requests of a node together
/// (1 GiB).
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 1 << 30;
/// Default cap on connections that have not yet authenticated, in total.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 4096;
/// Default cap on connections that have not yet authenticated, per source
/// address.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS: usize = 256;
/// Default budget of bytes queued for one connection to write.
pub const DEFAULT_MAX_OUTGOING_BYTES: usize = 16 << 20;
/// Bytes a connection may send before it has authenticated (a client
/// token, a peer's proof): the pre-authentication messages are small.
pub const PRE_AUTH_BYTES: usize = 16 << 10;

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
    /// On shutdown, how long requests in flight may take to finish, in
    /// milliseconds; their last replies are then written briefly, and a
    /// connection still open 2 s past the grace is dropped, whatever its
    /// client does.
    pub shutdown_grace_ms: u64,
    /// Most bytes of results one request may hold, and so the largest
    /// reply: checked as results are produced, so a request past it fails
    /// with `too_large` naming the command that crossed it. `None`: the
    /// message limit ([`max_message_size`](Self::max_message_size)).
    pub max_reply_bytes: Option<usize>,
    /// Most bytes held for all requests of the node together (their frames
    /// and results); past it new requests, and requests whose results would
    /// cross it, get `overloaded`.
    pub max_inflight_bytes: usize,
    /// Most connections that have not yet authenticated (open, upgrading,
    /// or without their first message yet), in total; more are refused
    /// before the upgrade with HTTP 503.
    pub max_unauthenticated_connections: usize,
    /// Like [`max_unauthenticated_connections`](Self::max_unauthenticated_connections),
    /// per source address. A client with a valid token in its upgrade
    /// request and a peer with a valid proof are never refused for it.
    pub max_unauthenticated_per_address: usize,
    /// How long a new connection has for its upgrade (TLS and request head
    /// included), authentication and first message, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// A client connection with no request in flight for this long is
    /// closed (the Rust client reconnects when next used), in milliseconds;
    /// 0: never.
    pub idle_timeout_ms: u64,
    /// Most bytes queued for one connection to write; producers (replies,
    /// progress) wait beyond it. One message larger than the budget still
    /// goes when the queue is empty.
    pub max_outgoing_bytes: usize,
    /// A connection whose outgoing queue stays full for this long (its
    /// reader stopped reading) is closed and its requests cancelled, in
    /// milliseconds.
    pub slow_reader_timeout_ms: u64,
    /// Peer links: how often to ping the peer, in milliseconds.
    pub keepalive_interval_ms: u64,
    /// Peer links: how long a link may stay silent (no message, no pong)
    /// before it is treated as lost, in milliseconds.
    pub keepalive_timeout_ms: u64,
    /// Peer links: a link this node dialed that carried no job for this
    /// long is closed (by agreement with the peer, so no job is lost), in
    /// milliseconds; 0 keeps links open. Links open again when a command
    /// must go to that node: the links a node holds follow its traffic.
    pub link_idle_timeout_ms: u64,
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
            .field("max_reply_bytes", &self.max_reply_bytes)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field(
                "max_unauthenticated_connections",
                &self.max_unauthenticated_connections,
            )
            .field(
                "max_unauthenticated_per_address",
                &self.max_unauthenticated_per_address,
            )
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("max_outgoing_bytes", &self.max_outgoing_bytes)
            .field("slow_reader_timeout_ms", &self.slow_reader_timeout_ms)
            .field("keepalive_interval_ms", &self.keepalive_interval_ms)
            .field("keepalive_timeout_ms", &self.keepalive_timeout_ms)
            .field("link_idle_timeout_ms", &self.link_idle_timeout_ms)
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
            max_reply_bytes: None,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            max_unauthenticated_connections: DEFAULT_MAX_UNAUTHENTICATED,
            max_unauthenticated_per_address: DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            max_outgoing_bytes: DEFAULT_MAX_OUTGOING_BYTES,
            slow_reader_timeout_ms: 30_000,
            keepalive_interval_ms: 5_000,
            keepalive_timeout_ms: 20_000,
            link_idle_timeout_ms: 60_000,
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
    /// Reads a config file: YAML when its name ends in `.yaml` or `.yml`
    /// (see [the module documentation](self) for the original project's
    /// keys), TOML otherwise.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        if yaml {
            return Self::parse_yaml(&text, Some(path));
        }
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

    /// Parses YAML text: every setting TOML takes, and the original
    /// project's keys (see [the module documentation](self)).
    ///
    /// ```
    /// let config = mpreg::Config::from_yaml_str(
    ///     "host: 127.0.0.1\nport: 6676\nresources: [model-a]\nconnect: ws://127.0.01:7773/\n",
    /// ).unwrap();
    /// assert_eq!(config.listen, "127.0.0.1:6676");
    /// assert_eq!(config.datasets, ["model-a"]);
    /// assert_eq!(config.peers, ["ws://127.0.0.1:7773/"]);
    /// ```
    pub fn from_yaml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse_yaml(text, None)
    }

    fn parse_yaml(text: &str, path: Option<&Path>) -> Result<Self, ConfigError> {
        let yaml_error = |source| ConfigError::Yaml {
            path: path.map(Path::to_owned),
            source: Box::new(source),
        };
        let mut map = match yaml_serde::from_str::<Value>(text).map_err(yaml_error)? {
            Value::Mapping(map) => map,
            // An empty file: every setting at its default.
            Value::Null => Mapping::new(),
            other => return yaml_serde::from_value(other).map_err(yaml_error),
        };
        let original = Original::take(&mut map)?;
        let has_listen = map.contains_key("listen");
        let mut config: Self = yaml_serde::from_value(Value::Mapping(map)).map_err(yaml_error)?;
        if let Some(listen) = original.listen()? {
            if has_listen {
                return Err(ConfigError::Invalid {
                    setting: "host",
                    reason: "give either `listen` or `host` and `port`, not both".to_owned(),
                });
            }
            config.listen = listen;
        }
        for dataset in original.resources {
            if !config.datasets.contains(&dataset) {
                config.datasets.push(dataset);
            }
        }
        let mut peers = Vec::with_capacity(config.peers.len() + 1);
        for url in &config.peers {
            peers.push(normalize_url("peers", url)?);
        }
        if let Some(url) = original.connect {
            let url = normalize_url("connect", &url)?;
            if !peers.contains(&url) {
                peers.push(url);
            }
        }
        config.peers = peers;
        Ok(config)
    }

    /// Overrides settings from the `MPREG_*` environment variables (see
    /// [`apply_vars`](Self::apply_vars)). A variable whose value is not
    /// UTF-8 is an error naming it.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            let Some(setting) = key.to_str().and_then(env_setting) else {
                continue;
            };
            let value = value.into_string().map_err(|_| ConfigError::Invalid {
                setting,
                reason: "not valid UTF-8".to_owned(),
            })?;
            vars.push((setting.to_owned(), value));
        }
        self.apply_vars(vars)
    }

    /// Overrides settings from variables given as `(NAME, VALUE)` pairs.
    /// Every setting has one, named `MPREG_` and the setting in capitals:
    ///
    /// | variable | setting and value |
    /// | --- | --- |
    /// | `MPREG_NAME` | `name` |
    /// | `MPREG_LISTEN` | `listen` (empty: dial out only) |
    /// | `MPREG_PEERS` | `peers`: comma-separated URLs, replacing the list |
    /// | `MPREG_DATASETS` | `datasets`: comma-separated, replacing the list |
    /// | `MPREG_DIAGNOSTICS` | `diagnostics`: `1`, `true`, `0` or `false` |
    /// | `MPREG_MAX_MESSAGE_SIZE` | `max_message_size`, in bytes |
    /// | `MPREG_REQUEST_TIMEOUT_MS` | `request_timeout_ms` |
    /// | `MPREG_MAX_INFLIGHT_PER_CONNECTION` | `max_inflight_per_connection` |
    /// | `MPREG_MAX_COMMANDS_PER_REQUEST` | `max_commands_per_request` |
    /// | `MPREG_SHUTDOWN_GRACE_MS` | `shutdown_grace_ms` |
    /// | `MPREG_MAX_REPLY_BYTES` | `max_reply_bytes`, in bytes |
    /// | `MPREG_MAX_INFLIGHT_BYTES` | `max_inflight_bytes`, in bytes |
    /// | `MPREG_MAX_UNAUTHENTICATED_CONNECTIONS` | `max_unauthenticated_connections` |
    /// | `MPREG_MAX_UNAUTHENTICATED_PER_ADDRESS` | `max_unauthenticated_per_address` |
    /// | `MPREG_HANDSHAKE_TIMEOUT_MS` | `handshake_timeout_ms` |
    /// | `MPREG_IDLE_TIMEOUT_MS` | `idle_timeout_ms` (0: never) |
    /// | `MPREG_MAX_OUTGOING_BYTES` | `max_outgoing_bytes`, in bytes |
    /// | `MPREG_SLOW_READER_TIMEOUT_MS` | `slow_reader_timeout_ms` |
    /// | `MPREG_KEEPALIVE_INTERVAL_MS` | `keepalive_interval_ms` |
    /// | `MPREG_KEEPALIVE_TIMEOUT_MS` | `keepalive_timeout_ms` |
    /// | `MPREG_LINK_IDLE_TIMEOUT_MS` | `link_idle_timeout_ms` |
    /// | `MPREG_PROBE_INTERVAL_MS` | `probe_interval_ms` |
    /// | `MPREG_SUSPECT_TIMEOUT_MS` | `suspect_timeout_ms` |
    /// | `MPREG_CLUSTER_SECRET` | `cluster_secret` |
    /// | `MPREG_CLIENT_TOKENS` | `client_tokens`: comma-separated, replacing the list |
    /// | `MPREG_TLS_CERT` | `tls_cert`: a path |
    /// | `MPREG_TLS_KEY` | `tls_key`: a path |
    /// | `MPREG_TLS_CA` | `tls_ca`: a path |
    ///
    /// Numbers are whole and written in decimal (`_` may group digits);
    /// paths are used as given (relative ones from the working directory).
    /// Other names are ignored (so the whole environment can be passed). A
    /// value that cannot be used (not a number, a number too large, an empty
    /// name, secret or path) is a [`ConfigError::Invalid`] naming the
    /// variable; limits on the values are checked when the node starts, as
    /// for a file.
    ///
    /// ```
    /// let mut config = mpreg::Config::default();
    /// config
    ///     .apply_vars([
    ///         ("MPREG_PEERS".to_owned(), "ws://10.0.0.1:7773, ws://10.0.0.2:7773".to_owned()),
    ///         ("MPREG_REQUEST_TIMEOUT_MS".to_owned(), "30_000".to_owned()),
    ///     ])
    ///     .unwrap();
    /// assert_eq!(config.peers, ["ws://10.0.0.1:7773", "ws://10.0.0.2:7773"]);
    /// assert_eq!(config.request_timeout_ms, 30_000);
    ///
    /// let e = config
    ///     .apply_vars([("MPREG_MAX_MESSAGE_SIZE".to_owned(), "64MiB".to_owned())])
    ///     .unwrap_err();
    /// assert!(e.to_string().contains("MPREG_MAX_MESSAGE_SIZE"));
    /// ```
    pub fn apply_vars(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (key, value) in vars {
            let Some(setting) = env_setting(&key) else {
                continue;
            };
            let not_empty = |value: String| {
                if value.trim().is_empty() {
                    Err(ConfigError::Invalid {
                        setting,
                        reason: "is empty (unset the variable instead)".to_owned(),
                    })
                } else {
                    Ok(value)
                }
            };
            let path = |value: String| not_empty(value).map(PathBuf::from);
            match setting {
                "MPREG_NAME" => self.name = Some(not_empty(value)?),
                "MPREG_LISTEN" => self.listen = value,
                "MPREG_PEERS" => self.peers = comma_list(&value),
                "MPREG_DATASETS" => self.datasets = comma_list(&value),
                "MPREG_DIAGNOSTICS" => {
                    self.diagnostics = match value.trim().to_ascii_lowercase().as_str() {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => {
                            return Err(ConfigError::Invalid {
                                setting,
                                reason: format!("`{value}` is not 1, true, 0 or false"),
                            });
                        }
                    }
                }
                "MPREG_MAX_MESSAGE_SIZE" => self.max_message_size = number(setting, &value)?,
                "MPREG_REQUEST_TIMEOUT_MS" => self.request_timeout_ms = number(setting, &value)?,
                "MPREG_MAX_INFLIGHT_PER_CONNECTION" => {
                    self.max_inflight_per_connection = number(setting, &value)?;
                }
                "MPREG_MAX_COMMANDS_PER_REQUEST" => {
                    self.max_commands_per_request = number(setting, &value)?;
                }
                "MPREG_SHUTDOWN_GRACE_MS" => self.shutdown_grace_ms = number(setting, &value)?,
                "MPREG_MAX_REPLY_BYTES" => self.max_reply_bytes = Some(number(setting, &value)?),
                "MPREG_MAX_INFLIGHT_BYTES" => self.max_inflight_bytes = number(setting, &value)?,
                "MPREG_MAX_UNAUTHENTICATED_CONNECTIONS" => {
                    self.max_unauthenticated_connections = number(setting, &value)?;
                }
                "MPREG_MAX_UNAUTHENTICATED_PER_ADDRESS" => {
                    self.max_unauthenticated_per_address = number(setting, &value)?;
                }
                "MPREG_HANDSHAKE_TIMEOUT_MS" => {
                    self.handshake_timeout_ms = number(setting, &value)?;
                }
                "MPREG_IDLE_TIMEOUT_MS" => self.idle_timeout_ms = number(setting, &value)?,
                "MPREG_MAX_OUTGOING_BYTES" => self.max_outgoing_bytes = number(setting, &value)?,
                "MPREG_SLOW_READER_TIMEOUT_MS" => {
                    self.slow_reader_timeout_ms = number(setting, &value)?;
                }
                "MPREG_KEEPALIVE_INTERVAL_MS" => {
                    self.keepalive_interval_ms = number(setting, &value)?;
                }
                "MPREG_LINK_IDLE_TIMEOUT_MS" => {
                    self.link_idle_timeout_ms = number(setting, &value)?;
                }
                "MPREG_KEEPALIVE_TIMEOUT_MS" => {
                    self.keepalive_timeout_ms = number(setting, &value)?;
                }
                "MPREG_PROBE_INTERVAL_MS" => self.probe_interval_ms = number(setting, &value)?,
                "MPREG_SUSPECT_TIMEOUT_MS" => self.suspect_timeout_ms = number(setting, &value)?,
                "MPREG_CLUSTER_SECRET" => self.cluster_secret = Some(not_empty(value)?),
                "MPREG_CLIENT_TOKENS" => self.client_tokens = comma_list(&value),
                "MPREG_TLS_CERT" => self.tls_cert = Some(path(value)?),
                "MPREG_TLS_KEY" => self.tls_key = Some(path(value)?),
                "MPREG_TLS_CA" => self.tls_ca = Some(path(value)?),
                // `env_setting` only returns names of `ENV_VARS`, all matched
                // above (a unit test checks each one is applied).
                _ => {}
            }
        }
        Ok(())
    }

    pub(crate) fn keepalive(&self) -> crate::link::Keepalive {
        crate::link::Keepalive {
            interval: Duration::from_millis(self.keepalive_interval_ms.max(1)),
            timeout: Duration::from_millis(self.keepalive_timeout_ms.max(1)),
            idle: (self.link_idle_timeout_ms > 0)
                .then(|| Duration::from_millis(self.link_idle_timeout_ms)),
        }
    }

    /// The failure-detection time of a cluster of `members` nodes: a
    /// probe period plus the suspicion time, which grows with the cluster
    /// (`suspect_timeout_ms` times log10 of the size, at least once). A node
    /// that dies leaves every view about this long after it died (the news
    /// then takes a few gossip rounds to spread).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = mpreg::Config::default();
    /// assert_eq!(config.failure_detection_time(8), Duration::from_secs(4));
    /// assert_eq!(config.failure_detection_time(1000), Duration::from_secs(10));
    /// ```
    pub fn failure_detection_time(&self, members: usize) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
            + crate::membership::suspect_to_down(
                Duration::from_millis(self.suspect_timeout_ms),
                members,
            )
    }

    /// The shutdown grace period as a [`Duration`].
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The default request deadline as a [`Duration`].
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The reply budget in bytes: [`max_reply_bytes`](Self::max_reply_bytes),
    /// or the message limit when it is not set.
    pub fn reply_budget(&self) -> usize {
        self.max_reply_bytes.unwrap_or(self.max_message_size)
    }

    /// [`handshake_timeout_ms`](Self::handshake_timeout_ms) as a [`Duration`].
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.max(1))
    }

    /// [`idle_timeout_ms`](Self::idle_timeout_ms) as a [`Duration`];
    /// `None` when connections never time out for idleness.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms))
    }

    /// [`slow_reader_timeout_ms`](Self::slow_reader_timeout_ms) as a [`Duration`].
    pub fn slow_reader_timeout(&self) -> Duration {
        Duration::from_millis(self.slow_reader_timeout_ms.max(1))
    }
}

/// The environment variables [`Config::apply_vars`] reads, as `&'static`
/// names for [`ConfigError::Invalid`]: `MPREG_` and each setting in
/// capitals, in the order of the fields of [`Config`].
const ENV_VARS: [&str; 28] = [
    "MPREG_NAME",
    "MPREG_LISTEN",
    "MPREG_PEERS",
    "MPREG_DATASETS",
    "MPREG_DIAGNOSTICS",
    "MPREG_MAX_MESSAGE_SIZE",
    "MPREG_REQUEST_TIMEOUT_MS",
    "MPREG_MAX_INFLIGHT_PER_CONNECTION",
    "MPREG_MAX_COMMANDS_PER_REQUEST",
    "MPREG_SHUTDOWN_GRACE_MS",
    "MPREG_MAX_REPLY_BYTES",
    "MPREG_MAX_INFLIGHT_BYTES",
    "MPREG_MAX_UNAUTHENTICATED_CONNECTIONS",
    "MPREG_MAX_UNAUTHENTICATED_PER_ADDRESS",
    "MPREG_HANDSHAKE_TIMEOUT_MS",
    "MPREG_IDLE_TIMEOUT_MS",
    "MPREG_MAX_OUTGOING_BYTES",
    "MPREG_SLOW_READER_TIMEOUT_MS",
    "MPREG_KEEPALIVE_INTERVAL_MS",
    "MPREG_KEEPALIVE_TIMEOUT_MS",
    "MPREG_LINK_IDLE_TIMEOUT_MS",
    "MPREG_PROBE_INTERVAL_MS",
    "MPREG_SUSPECT_TIMEOUT_MS",
    "MPREG_CLUSTER_SECRET",
    "MPREG_CLIENT_TOKENS",
    "MPREG_TLS_CERT",
    "MPREG_TLS_KEY",
    "MPREG_TLS_CA",
];

fn env_setting(key: &str) -> Option<&'static str> {
    ENV_VARS.into_iter().find(|&name| name == key)
}

/// A whole number in decimal (surrounding spaces and `_` between digits
/// allowed), or an error naming the variable `setting`.
fn number<T: FromStr<Err = ParseIntError>>(
    setting: &'static str,
    value: &str,
) -> Result<T, ConfigError> {
    let digits: String = value.trim().chars().filter(|&c| c != '_').collect();
    let well_formed = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !value.trim().starts_with('_')
        && !value.trim().ends_with('_');
    let invalid = |reason: String| ConfigError::Invalid { setting, reason };
    if !well_formed {
        return Err(invalid(format!("`{value}` is not a whole number")));
    }
    digits.parse().map_err(|e: ParseIntError| match e.kind() {
        IntErrorKind::PosOverflow => invalid(format!("`{value}` is too large")),
        _ => invalid(format!("`{value}` is not a whole number")),
    })
}

/// `a, b,,c` → `["a", "b", "c"]`: items trimmed, empty ones dropped.
fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The original (Python) project's keys, taken out of a YAML mapping before
/// the rest is read as mpreg settings.
#[derive(Debug, Default)]
struct Original {
    host: Option<String>,
    port: Option<u16>,
    resources: Vec<String>,
    connect: Option<String>,
}

impl Original {
    fn take(map: &mut Mapping) -> Result<Self, ConfigError> {
        let mut original = Self::default();
        if let Some(host) = map.remove("host") {
            original.host = match host {
                Value::Null => None,
                Value::String(s) => Some(s),
                other => return Err(wrong_type("host", "a host name or address", &other)),
            };
        }
        if let Some(port) = map.remove("port") {
            let number = match &port {
                Value::Null => None,
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            };
            original.port = match (&port, number.map(u16::try_from)) {
                (Value::Null, _) => None,
                (_, Some(Ok(p))) => Some(p),
                _ => return Err(wrong_type("port", "a port number (0 to 65535)", &port)),
            };
        }
        if let Some(resources) = map.remove("resources") {
            original.resources = match resources {
                Value::Null => Vec::new(),
                other => yaml_serde::from_value(other.clone())
                    .map_err(|_| wrong_type("resources", "a list of dataset names", &other))?,
            };
        }
        if let Some(funs) = map.remove("funs")
            && !funs.is_null()
        {
            return Err(ConfigError::Invalid {
                setting: "funs",
                reason: "mpreg serves the functions compiled into the binary, not functions \
                         named in a config file: `funs` can only be null"
                    .to_owned(),
            });
        }
        if let Some(connect) = map.remove("connect") {
            original.connect = match connect {
                Value::Null => None,
                Value::String(s) => Some(s),
                other => return Err(wrong_type("connect", "a peer URL", &other)),
            };
        }
        // `peers: null` in the original files means no peers.
        if map.get("peers").is_some_and(Value::is_null) {
            map.remove("peers");
        }
        Ok(original)
    }

    /// `host` and `port` as a `listen` address, when given.
    fn listen(&self) -> Result<Option<String>, ConfigError> {
        match (&self.host, self.port) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::Invalid {
                setting: "port",
                reason: "`host` is given without `port`".to_owned(),
            }),
            (host, Some(port)) => {
                let host = match host {
                    Some(h) => normalize_host("host", h)?,
                    None => "127.0.0.1".to_owned(),
                };
                Ok(Some(if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }))
            }
        }
    }
}

fn wrong_type(setting: &'static str, expected: &str, got: &Value) -> ConfigError {
    let got = yaml_serde::to_string(got).unwrap_or_default();
    ConfigError::Invalid {
        setting,
        reason: format!("expected {expected}, found `{}`", got.trim_end()),
    }
}

/// A URL with a shortened numeric host (`ws://127.0.01:7773/`) rewritten in
/// the plain form (`ws://127.0.0.1:7773/`); other URLs unchanged.
fn normalize_url(setting: &'static str, url: &str) -> Result<String, ConfigError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(url.to_owned());
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains(['@', '[']) {
        return Ok(url.to_owned());
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let host = normalize_host(setting, host).map_err(|_| ConfigError::Invalid {
        setting,
        reason: format!("`{url}`: `{host}` is not an IPv4 address"),
    })?;
    Ok(match port {
        Some(port) => format!("{scheme}://{host}:{port}{tail}"),
        None => format!("{scheme}://{host}{tail}"),
    })
}

/// A host made only of digits and dots, read as `inet_aton` reads it (see
/// the module documentation); any other host unchanged.
fn normalize_host(setting: &'static str, host: &str) -> Result<String, ConfigError> {
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Ok(host.to_owned());
    }
    inet_aton(host)
        .map(|ip| ip.to_string())
        .ok_or_else(|| ConfigError::Invalid {
            setting,
            reason: format!("`{host}` is not an IPv4 address"),
        })
}

/// The C library's `inet_aton` for digits and dots: one to four parts, a
/// part with a leading `0` is octal, and the last part fills the bytes that
/// remain (`127.1` and `127.0.01` are `127.0.0.1`).
fn inet_aton(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let value = match part.strip_prefix('0') {
            Some("") => 0,
            Some(octal) => u32::from_str_radix(octal, 8).ok()?,
            None => part.parse::<u32>().ok()?,
        };
        values.push(value);
    }
    let (last, leading) = values.split_last()?;
    if leading.iter().any(|&v| v > 0xff) {
        return None;
    }
    let last_bits = 8 * (4 - leading.len() as u32);
    if last_bits < 32 && *last >> last_bits != 0 {
        return None;
    }
    let mut address = 0u32;
    for (i, &v) in leading.iter().enumerate() {
        address |= v << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from(address | last))
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
    /// The YAML file is not valid YAML or has unknown or mistyped settings.
    #[error("invalid YAML config{}: {source}", path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Yaml {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        #[source]
        source: Box<yaml_serde::Error>,
    },
    /// A setting (or environment variable, or key of the original YAML
    /// files) has a value that cannot work (named by `setting`).
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

    fn data(file: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data")
            .join(file)
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn original_dev_1_yaml_is_read_unchanged() {
        let c = Config::from_file(data("dev-1.config.yaml")).expect("dev-1 is accepted");
        assert_eq!(c.name.as_deref(), Some("PRIMARY SERVER"));
        assert_eq!(c.listen, "127.0.0.1:7773");
        assert_eq!(c.datasets, ["model-a", "model-b", "model-c"]);
        assert!(c.peers.is_empty(), "{:?}", c.peers);
    }

    #[test]
    fn original_dev_2_yaml_connects_with_the_short_address_normalized() {
        let c = Config::from_file(data("dev-2.config.yaml")).expect("dev-2 is accepted");
        assert_eq!(c.name.as_deref(), Some("ATTACHED SERVER"));
        assert_eq!(c.listen, "127.0.0.1:6676");
        assert_eq!(c.datasets, ["model-a", "model-b", "model-c"]);
        assert_eq!(c.peers, ["ws://127.0.0.1:7773/"]);
    }

    #[test]
    fn short_numeric_hosts_read_as_the_system_resolver_reads_them() {
        use std::net::ToSocketAddrs;
        for (host, plain) in [
            ("127.0.01", "127.0.0.1"),
            ("127.1", "127.0.0.1"),
            ("127.0.0.1", "127.0.0.1"),
            ("010.0.0.1", "8.0.0.1"),
            ("2130706433", "127.0.0.1"),
        ] {
            assert_eq!(
                inet_aton(host).map(|ip| ip.to_string()).as_deref(),
                Some(plain),
                "{host}"
            );
        }
        for host in [
            "1.2.3.4.5",
            "256.0.0.1",
            "1.2.3.256",
            "1.2.65536",
            "08.0.0.1",
            "1..2",
            "",
        ] {
            assert_eq!(inet_aton(host), None, "{host}");
        }
        // The C library (getaddrinfo, here through std) agrees on the
        // original file's address; numeric, so no DNS query is made.
        let resolved: Vec<_> = ("127.0.01", 7773)
            .to_socket_addrs()
            .expect("the system resolver reads 127.0.01")
            .collect();
        assert!(
            resolved.iter().all(|a| a.to_string() == "127.0.0.1:7773"),
            "{resolved:?}"
        );
    }

    #[test]
    fn bad_numeric_host_is_an_error_naming_the_key_and_value() {
        let e = Config::from_yaml_str("connect: ws://1.2.3.4.5:7773/").expect_err("bad host");
        assert!(
            matches!(e, ConfigError::Invalid { setting: "connect", ref reason } if reason.contains("1.2.3.4.5")),
            "{e:?}"
        );
        let e = Config::from_yaml_str("host: 300.1\nport: 1").expect_err("bad host");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    setting: "host",
                    ..
                }
            ),
            "{e:?}"
        );
        // Host names are left to the resolver at dial time.
        let c = Config::from_yaml_str("peers: [ws://node-b.example:7773]").expect("valid");
        assert_eq!(c.peers, ["ws://node-b.example:7773"]);
    }

    #[test]
    fn yaml_takes_every_mpreg_setting() {
        let c = Config::from_yaml_str(
            "name: n\nlisten: 0.0.0.0:1\npeers: [ws://10.0.0.1:7773]\ndatasets: [d]\n\
             diagnostics: true\nrequest_timeout_ms: 5\ncluster_secret: s\nclient_tokens: [t]\n",
        )
        .expect("valid");
        assert_eq!(c.name.as_deref(), Some("n"));
        assert_eq!(c.listen, "0.0.0.0:1");
        assert_eq!(c.peers, ["ws://10.0.0.1:7773"]);
        assert_eq!(c.datasets, ["d"]);
        assert!(c.diagnostics);
        assert_eq!(c.request_timeout_ms, 5);
        assert_eq!(c.cluster_secret.as_deref(), Some("s"));
        assert_eq!(c.client_tokens, ["t"]);
        assert_eq!(
            Config::from_yaml_str("").expect("empty is valid"),
            Config::default()
        );
    }

    #[test]
    fn yaml_errors_name_the_key() {
        let e = Config::from_yaml_str("nmae: n").expect_err("typo");
        assert!(
            matches!(e, ConfigError::Yaml { .. }) && e.to_string().contains("nmae"),
            "{e}"
        );
        let e = Config::from_yaml_str("funs: [echo]").expect_err("funs");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    setting: "funs",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = Config::from_yaml_str("host: 127.0.0.1").expect_err("no port");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    setting: "port",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = Config::from_yaml_str("port: 70000").expect_err("big port");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    setting: "port",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = Config::from_yaml_str("port: 1\nlisten: 127.0.0.1:2").expect_err("both");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    setting: "host",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = Config::from_yaml_str("resources: model-a").expect_err("not a list");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    setting: "resources",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = Config::from_yaml_str("diagnostics: maybe").expect_err("mistyped");
        assert!(
            e.to_string().contains("diagnostics") || e.to_string().contains("bool"),
            "{e}"
        );
        // `port` alone listens on the loopback address.
        let c = Config::from_yaml_str("port: 7000").expect("port alone");
        assert_eq!(c.listen, "127.0.0.1:7000");
    }

    #[test]
    fn env_vars_override_settings() {
        let mut c = Config::from_file(data("dev-2.config.yaml")).expect("valid");
        c.apply_vars(vars(&[
            ("MPREG_NAME", "from-env"),
            ("MPREG_LISTEN", "0.0.0.0:9000"),
            ("MPREG_PEERS", "ws://10.0.0.1:1, ,ws://10.0.0.2:2"),
            ("MPREG_DATASETS", "x,y"),
            ("MPREG_DIAGNOSTICS", "TRUE"),
            ("MPREG_CLUSTER_SECRET", "s3"),
            ("MPREG_CLIENT_TOKENS", "a,b"),
            ("MPREG_TOKEN", "client-side, ignored"),
            ("PATH", "/bin"),
        ]))
        .expect("valid values");
        assert_eq!(c.name.as_deref(), Some("from-env"));
        assert_eq!(c.listen, "0.0.0.0:9000");
        assert_eq!(c.peers, ["ws://10.0.0.1:1", "ws://10.0.0.2:2"]);
        assert_eq!(c.datasets, ["x", "y"]);
        assert!(c.diagnostics);
        assert_eq!(c.cluster_secret.as_deref(), Some("s3"));
        assert_eq!(c.client_tokens, ["a", "b"]);
        c.apply_vars(vars(&[("MPREG_DIAGNOSTICS", "0"), ("MPREG_PEERS", "")]))
            .expect("valid values");
        assert!(!c.diagnostics);
        assert!(c.peers.is_empty());
    }

    /// Every setting of [`Config`] (as serde lists them) has its variable,
    /// `MPREG_` and the setting in capitals, in the table of `apply_vars`,
    /// and setting the variable changes the setting.
    #[test]
    fn every_setting_has_an_env_var() {
        let e = Config::from_toml_str("no_such_setting = 1").expect_err("unknown");
        let message = e.to_string();
        let (_, expected) = message
            .split_once("expected one of")
            .unwrap_or_else(|| panic!("serde lists the settings: {message}"));
        let settings: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        assert!(settings.len() >= 19, "{message}");
        let source = include_str!("config.rs");
        for setting in settings {
            let var = format!("MPREG_{}", setting.to_ascii_uppercase());
            assert!(ENV_VARS.contains(&var.as_str()), "no {var} for `{setting}`");
            assert!(
                source.contains(&format!("/// | `{var}` | `{setting}`")),
                "{var} is missing from the table of apply_vars"
            );
            let mut c = Config::default();
            if c.apply_vars(vars(&[(&var, "7")])).is_err() {
                c.apply_vars(vars(&[(&var, "true")]))
                    .unwrap_or_else(|e| panic!("{var}: {e}"));
            }
            assert_ne!(c, Config::default(), "{var} changes nothing");
        }
    }

    #[test]
    fn numeric_env_vars_override_the_file() {
        let mut c = Config::from_toml_str(
            "request_timeout_ms = 1000
max_message_size = 2048",
        )
        .expect("valid");
        c.apply_vars(vars(&[
            ("MPREG_REQUEST_TIMEOUT_MS", "2500"),
            ("MPREG_MAX_MESSAGE_SIZE", " 1048576 "),
            ("MPREG_MAX_INFLIGHT_PER_CONNECTION", "8"),
            ("MPREG_SUSPECT_TIMEOUT_MS", "1_500"),
            ("MPREG_KEEPALIVE_TIMEOUT_MS", "0"),
        ]))
        .expect("valid numbers");
        assert_eq!(c.request_timeout(), Duration::from_millis(2500));
        assert_eq!(c.max_message_size, 1 << 20);
        assert_eq!(c.max_inflight_per_connection, 8);
        assert_eq!(c.suspect_timeout_ms, 1500);
        assert_eq!(c.keepalive_timeout_ms, 0);
        // Untouched settings keep the file's or the default value.
        assert_eq!(c.max_commands_per_request, DEFAULT_MAX_COMMANDS);
    }

    #[test]
    fn bad_numbers_name_the_variable_and_the_value() {
        for (var, value) in [
            ("MPREG_REQUEST_TIMEOUT_MS", "5s"),
            ("MPREG_MAX_MESSAGE_SIZE", "64MiB"),
            ("MPREG_SHUTDOWN_GRACE_MS", "-1"),
            ("MPREG_PROBE_INTERVAL_MS", "1.5"),
            ("MPREG_KEEPALIVE_INTERVAL_MS", ""),
            ("MPREG_MAX_COMMANDS_PER_REQUEST", "_1"),
            ("MPREG_MAX_INFLIGHT_PER_CONNECTION", "1e3"),
        ] {
            let mut c = Config::default();
            let e = c
                .apply_vars(vars(&[(var, value)]))
                .expect_err("not a number");
            assert!(
                matches!(e, ConfigError::Invalid { setting, ref reason }
                    if setting == var && reason.contains(&format!("`{value}` is not a whole number"))),
                "{var}={value}: {e:?}"
            );
            assert!(e.to_string().contains(var), "{e}");
            assert_eq!(c, Config::default(), "a bad value changes nothing");
        }
        let e = Config::default()
            .apply_vars(vars(&[(
                "MPREG_SUSPECT_TIMEOUT_MS",
                "99999999999999999999",
            )]))
            .expect_err("too large");
        assert!(
            matches!(e, ConfigError::Invalid { setting: "MPREG_SUSPECT_TIMEOUT_MS", ref reason } if reason.contains("too large")),
            "{e:?}"
        );
    }

    #[test]
    fn tls_paths_from_env_vars() {
        let mut c = Config::from_toml_str("tls_ca = \"/etc/file-ca.pem\"").expect("valid");
        c.apply_vars(vars(&[
            ("MPREG_TLS_CERT", "/etc/mpreg/node.pem"),
            ("MPREG_TLS_KEY", "certs/node key.pem"),
            ("MPREG_TLS_CA", "/etc/mpreg/ca.pem"),
        ]))
        .expect("valid paths");
        assert_eq!(c.tls_cert, Some(PathBuf::from("/etc/mpreg/node.pem")));
        // Spaces are part of a path; relative paths stay relative.
        assert_eq!(c.tls_key, Some(PathBuf::from("certs/node key.pem")));
        assert_eq!(c.tls_ca, Some(PathBuf::from("/etc/mpreg/ca.pem")));
        let e = c
            .apply_vars(vars(&[("MPREG_TLS_KEY", " ")]))
            .expect_err("empty path");
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    setting: "MPREG_TLS_KEY",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let mut c = Config::default();
        let e = c
            .apply_vars(vars(&[("MPREG_DIAGNOSTICS", "maybe")]))
            .expect_err("not a boolean");
        assert!(
            matches!(e, ConfigError::Invalid { setting: "MPREG_DIAGNOSTICS", ref reason } if reason.contains("maybe")),
            "{e:?}"
        );
        assert!(e.to_string().contains("MPREG_DIAGNOSTICS"), "{e}");
        for name in ["MPREG_NAME", "MPREG_CLUSTER_SECRET"] {
            let e = c.apply_vars(vars(&[(name, " ")])).expect_err("empty");
            assert!(
                matches!(e, ConfigError::Invalid { setting, .. } if setting == name),
                "{e:?}"
            );
        }
    }
}
