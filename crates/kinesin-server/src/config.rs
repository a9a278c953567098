//! Node configuration: defaults, then a TOML file, then KINESIN_* environment
//! variables and command-line flags (clap reads both; flags win).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kinesin_proto::tls::InternalTls;
use serde::{Deserialize, Serialize};

/// Everything a node needs to run. Field docs are the reference; see
/// docs/configuration.md for the same with examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unique, non-zero id of this node within the cluster.
    pub node_id: u64,
    /// Where RocksDB and the node identity live.
    pub data_dir: PathBuf,
    /// The AWS-compatible HTTP API (all services).
    pub listen_api: SocketAddr,
    /// Internal gRPC: Raft traffic between nodes and the native API.
    pub listen_grpc: SocketAddr,
    /// Admin HTTP: /metrics, /health/live, /health/ready, /admin/cluster.
    pub listen_admin: SocketAddr,
    /// Address other nodes use to reach `listen_grpc` (default: the listen
    /// address, with 127.0.0.1 for an unspecified IP).
    pub advertise_grpc: Option<String>,
    /// Address clients use to reach `listen_api`.
    pub advertise_api: Option<String>,
    /// gRPC addresses of existing nodes to join through. Empty: bootstrap a
    /// new cluster.
    pub seeds: Vec<String>,
    /// Failure domain of this node; replicas of a shard prefer distinct zones.
    pub zone: String,
    /// Replicas per shard for new streams (1–5).
    pub replication_factor: usize,
    /// `always` (fsync before acknowledging) or `never-unsafe`.
    pub fsync: FsyncSetting,
    /// Seconds a node may be unreachable before its replicas are re-placed.
    pub repair_after_secs: u64,
    /// Retention of new streams, in hours (24–8760).
    pub retention_hours: u32,
    /// Shard-group Raft timers.
    pub shard_heartbeat_ms: u64,
    pub shard_election_min_ms: u64,
    pub shard_election_max_ms: u64,
    /// Log entries between two snapshots of a shard group (after which the
    /// log below the snapshot may be purged).
    pub shard_snapshot_every: u64,
    /// PEM certificate chain and private key of the AWS API: with both set
    /// the API port speaks HTTPS (HTTP/2 by ALPN, and HTTP/1.1).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Region named in ARNs of the AWS API.
    pub region: String,
    /// Mutual TLS on the internal gRPC port (Raft, the native API, the
    /// CLI's admin calls): PEM files of the cluster CA, and of this node's
    /// certificate and key. The certificate must be signed by that CA, name
    /// the DNS name `kinesin-node`, and allow both server and client use;
    /// every node may share one. All three, or `insecure_internal`.
    pub internal_tls_ca_file: Option<PathBuf>,
    pub internal_tls_cert_file: Option<PathBuf>,
    pub internal_tls_key_file: Option<PathBuf>,
    /// Plaintext internal gRPC without authentication: anyone who reaches
    /// `listen_grpc` can change the cluster. `kinesin dev` sets it on
    /// loopback; anything else must say so explicitly.
    pub insecure_internal: bool,
    /// Access keys the AWS API accepts (SigV4). None: development mode, any
    /// credentials are accepted, and the node says so at start-up. A node
    /// without credentials starts only when its API listens on loopback or
    /// `auth` is `none`.
    pub credentials: Vec<kinesin_gateway::Credential>,
    /// `sigv4` (the default: requests are checked against `credentials`) or
    /// `none` (`--insecure-dev`): any request is accepted, on any address.
    pub auth: AuthSetting,
    /// The account whose streams are named without an account in the
    /// cluster map: those made before names were per account, and by the
    /// CLI and native API. Default: the credentials' account when they all
    /// name one; required when they name several. Must be the same on every
    /// node.
    pub home_account: Option<String>,
    /// Where Firehose delivery streams write their objects: an S3 endpoint
    /// (`http://127.0.0.1:9000`; path-style requests, credentials and region
    /// from the standard AWS variables), or `file:///dir` for a directory
    /// with one subdirectory per bucket. None: AWS S3 itself.
    pub s3_endpoint: Option<String>,
    /// Glue table definitions for Firehose record format conversion (JSON
    /// → Parquet): a JSON array of what `aws glue create-table` takes,
    /// `{"DatabaseName": …, "TableInput": {"Name": …, "StorageDescriptor":
    /// {"Columns": [{"Name": …, "Type": …}]}}}`. A delivery stream's
    /// SchemaConfiguration names one; its columns are kept with the stream
    /// when it is created or updated. Give every node the same file.
    pub glue_tables_file: Option<PathBuf>,
    /// Most connections the AWS API port keeps open; more are closed as
    /// they arrive (`kinesin_api_connections_refused_total`).
    pub api_max_connections: usize,
    /// How long a client may take to send a request's headers, and its
    /// body, on the AWS API port (milliseconds).
    pub api_header_timeout_ms: u64,
    pub api_body_timeout_ms: u64,
    /// How long an AWS API connection may stay without a request in flight
    /// before it is closed (milliseconds).
    pub api_idle_timeout_ms: u64,
    /// How long one SubscribeToShard stream lasts (milliseconds; AWS and
    /// the default: five minutes, the most allowed).
    pub api_subscription_lifetime_ms: u64,
    /// Most open shards the cluster allows (CreateStream, DescribeLimits).
    pub shard_limit: u32,
    /// How long shard iterators and paging tokens stay valid (AWS: 300).
    pub iterator_validity_secs: u64,
    /// Per-shard throughput limits; 0 = unlimited (the default). AWS:
    /// 1048576, 1000, 5, 2097152.
    pub shard_write_bytes_per_sec: u64,
    pub shard_write_records_per_sec: u64,
    pub shard_read_calls_per_sec: u64,
    pub shard_read_bytes_per_sec: u64,
    /// Export per-shard series (`kinesin_shard_*`) as well as per-stream
    /// ones: one series per shard, so off by default.
    pub per_shard_metrics: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthSetting {
    #[default]
    Sigv4,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncSetting {
    Always,
    NeverUnsafe,
}

impl std::str::FromStr for FsyncSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncSetting::Always),
            "never-unsafe" => Ok(FsyncSetting::NeverUnsafe),
            other => Err(format!(
                "fsync must be `always` or `never-unsafe`, not `{other}`"
            )),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            listen_api: "0.0.0.0:7450".parse().expect("literal"),
            listen_grpc: "0.0.0.0:7451".parse().expect("literal"),
            listen_admin: "0.0.0.0:7452".parse().expect("literal"),
            advertise_grpc: None,
            advertise_api: None,
            seeds: Vec::new(),
            zone: "default".into(),
            replication_factor: 3,
            fsync: FsyncSetting::Always,
            repair_after_secs: 300,
            retention_hours: 24,
            shard_heartbeat_ms: 500,
            shard_election_min_ms: 2500,
            shard_election_max_ms: 5000,
            shard_snapshot_every: 20_000,
            tls_cert_file: None,
            tls_key_file: None,
            region: "us-east-1".into(),
            credentials: Vec::new(),
            internal_tls_ca_file: None,
            internal_tls_cert_file: None,
            internal_tls_key_file: None,
            insecure_internal: false,
            auth: AuthSetting::Sigv4,
            home_account: None,
            s3_endpoint: None,
            glue_tables_file: None,
            api_max_connections: 10_000,
            api_header_timeout_ms: 30_000,
            api_body_timeout_ms: 60_000,
            api_idle_timeout_ms: 300_000,
            api_subscription_lifetime_ms: 300_000,
            shard_limit: 10_000,
            iterator_validity_secs: 300,
            shard_write_bytes_per_sec: 0,
            shard_write_records_per_sec: 0,
            shard_read_calls_per_sec: 0,
            shard_read_bytes_per_sec: 0,
            per_shard_metrics: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn advertise(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
    }

    pub fn grpc_address(&self) -> String {
        self.advertise_grpc
            .clone()
            .unwrap_or_else(|| advertise(self.listen_grpc))
    }

    pub fn api_address(&self) -> String {
        self.advertise_api
            .clone()
            .unwrap_or_else(|| advertise(self.listen_api))
    }

    pub fn admin_address(&self) -> String {
        advertise(self.listen_admin)
    }

    /// The internal port's certificates, read and checked; None when it is
    /// plaintext (`insecure_internal`).
    pub fn internal_tls(&self) -> Result<Option<InternalTls>, ConfigError> {
        match (
            &self.internal_tls_ca_file,
            &self.internal_tls_cert_file,
            &self.internal_tls_key_file,
        ) {
            (Some(ca), Some(cert), Some(key)) => InternalTls::load(ca, cert, key)
                .map(Some)
                .map_err(ConfigError::Invalid),
            _ => Ok(None),
        }
    }

    /// The Glue tables of `glue_tables_file`, read and checked (none when
    /// it is unset).
    pub fn glue_tables(&self) -> Result<kinesin_firehose::GlueTables, ConfigError> {
        let Some(path) = &self.glue_tables_file else {
            return Ok(Default::default());
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Invalid(format!(
                "cannot read glue_tables_file {}: {e}",
                path.display()
            ))
        })?;
        kinesin_firehose::glue_tables(&text)
            .map_err(|e| ConfigError::Invalid(format!("glue_tables_file {}: {e}", path.display())))
    }

    /// The account that owns the streams named without an account
    /// ([`Config::home_account`]'s field doc).
    pub fn home_account(&self) -> String {
        self.home_account
            .clone()
            .or_else(|| self.credentials.first().map(|c| c.account_id.clone()))
            .unwrap_or_else(|| kinesin_gateway::DEV_ACCOUNT_ID.to_string())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.node_id == 0 {
            return bad("node_id must be a positive integer".into());
        }
        if !(1..=5).contains(&self.replication_factor) {
            return bad(format!(
                "replication_factor must be 1 to 5, not {}",
                self.replication_factor
            ));
        }
        if !(24..=8760).contains(&self.retention_hours) {
            return bad(format!(
                "retention_hours must be 24 to 8760, not {}",
                self.retention_hours
            ));
        }
        if self.shard_heartbeat_ms == 0 || self.shard_election_min_ms <= 2 * self.shard_heartbeat_ms
        {
            return bad("shard_election_min_ms must exceed twice shard_heartbeat_ms".into());
        }
        if self.shard_election_max_ms <= self.shard_election_min_ms {
            return bad("shard_election_max_ms must exceed shard_election_min_ms".into());
        }
        if self.shard_snapshot_every < 100 {
            return bad(format!(
                "shard_snapshot_every must be at least 100, not {}",
                self.shard_snapshot_every
            ));
        }
        for c in &self.credentials {
            if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
                return bad("every credential needs access_key_id and secret_access_key".into());
            }
            if c.account_id.len() != 12 || !c.account_id.bytes().all(|b| b.is_ascii_digit()) {
                return bad(format!(
                    "credential {}: account_id must be 12 digits, not {:?}",
                    c.access_key_id, c.account_id
                ));
            }
        }
        if let Some(home) = &self.home_account {
            if home.len() != 12 || !home.bytes().all(|b| b.is_ascii_digit()) {
                return bad(format!("home_account must be 12 digits, not {home:?}"));
            }
        } else {
            let mut accounts: Vec<&str> = self
                .credentials
                .iter()
                .map(|c| c.account_id.as_str())
                .collect();
            accounts.sort_unstable();
            accounts.dedup();
            if accounts.len() > 1 {
                return bad(format!(
                    "the credentials name {} accounts ({}): set home_account to the one that owns the streams the CLI and native API name (and that existed before names were per account)",
                    accounts.len(),
                    accounts.join(", ")
                ));
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return bad("tls_cert_file and tls_key_file must be set together".into());
        }
        if self.iterator_validity_secs == 0 {
            return bad("iterator_validity_secs must be positive".into());
        }
        if let Some(endpoint) = &self.s3_endpoint {
            let scheme = ["http://", "https://", "file:///"]
                .iter()
                .find(|s| endpoint.starts_with(**s));
            if scheme.is_none_or(|s| endpoint.len() == s.len()) {
                return bad(format!(
                    "s3_endpoint must be an http:// or https:// URL or a file:/// directory, not {endpoint:?}"
                ));
            }
        }
        if self.api_max_connections == 0 {
            return bad("api_max_connections must be positive".into());
        }
        if self.api_header_timeout_ms == 0
            || self.api_body_timeout_ms == 0
            || self.api_idle_timeout_ms == 0
        {
            return bad(
                "api_header_timeout_ms, api_body_timeout_ms and api_idle_timeout_ms must be positive"
                    .into(),
            );
        }
        let most = kinesin_gateway::MAX_SUBSCRIPTION_LIFETIME.as_millis() as u64;
        if !(1..=most).contains(&self.api_subscription_lifetime_ms) {
            return bad(format!(
                "api_subscription_lifetime_ms must be between 1 and {most} (five minutes), not {}",
                self.api_subscription_lifetime_ms
            ));
        }
        self.glue_tables()?;
        // Unset, they are the listen addresses (port 0 until bound).
        if let Some(addr) = &self.advertise_grpc {
            if let Err(e) = kinesin_types::validate_node_address(addr) {
                return bad(format!("advertise_grpc: {e}"));
            }
        }
        if let Some(addr) = &self.advertise_api {
            if let Err(e) = kinesin_types::validate_api_address(addr) {
                return bad(format!("advertise_api: {e}"));
            }
        }
        if self.zone.len() > 64 {
            return bad("zone must be at most 64 characters".into());
        }
        for seed in &self.seeds {
            if let Err(e) = kinesin_types::validate_node_address(seed) {
                return bad(format!("seeds: {e}"));
            }
        }
        if self.region.is_empty() || self.shard_limit == 0 {
            return bad("region must not be empty and shard_limit must be positive".into());
        }
        let ports = [self.listen_api, self.listen_grpc, self.listen_admin];
        let clash = |a: std::net::SocketAddr, b: std::net::SocketAddr| a == b && a.port() != 0;
        if clash(ports[0], ports[1]) || clash(ports[1], ports[2]) || clash(ports[0], ports[2]) {
            return bad("listen_api, listen_grpc and listen_admin must differ".into());
        }
        let tls_files = [
            &self.internal_tls_ca_file,
            &self.internal_tls_cert_file,
            &self.internal_tls_key_file,
        ];
        match (tls_files.iter().filter(|f| f.is_some()).count(), self.insecure_internal) {
            (0, false) => {
                return bad(
                    "the internal gRPC port needs internal_tls_ca_file, internal_tls_cert_file and \
                     internal_tls_key_file (mutual TLS), or insecure_internal = true \
                     (--insecure-internal) to accept anyone who reaches it"
                        .into(),
                )
            }
            (0, true) | (3, false) => {}
            (3, true) => {
                return bad("insecure_internal = true and internal TLS files: pick one".into())
            }
            _ => {
                return bad(
                    "internal_tls_ca_file, internal_tls_cert_file and internal_tls_key_file must be set together".into(),
                )
            }
        }
        match self.auth {
            AuthSetting::None if !self.credentials.is_empty() => {
                return bad(
                    "auth = \"none\" accepts any request: remove it or the [[credentials]]".into(),
                );
            }
            AuthSetting::Sigv4
                if self.credentials.is_empty() && !self.listen_api.ip().is_loopback() =>
            {
                return bad(format!(
                    "no [[credentials]] while listen_api ({}) is reachable from other hosts: add \
                     credentials, listen on loopback, or accept any request explicitly with \
                     auth = \"none\" (--insecure-dev)",
                    self.listen_api
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_override_defaults_and_unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "node_id = 3\nseeds = [\"a:7451\"]\nfsync = \"never-unsafe\"\n",
        )
        .unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(c.node_id, 3);
        assert_eq!(c.seeds, vec!["a:7451".to_string()]);
        assert_eq!(c.fsync, FsyncSetting::NeverUnsafe);
        assert_eq!(c.listen_grpc, Config::default().listen_grpc);
        std::fs::write(&path, "nodeid = 3\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn invalid_values_are_explained() {
        let cases = [
            (
                Config {
                    node_id: 0,
                    ..Config::default()
                },
                "node_id",
            ),
            (
                Config {
                    s3_endpoint: Some("minio:9000".into()),
                    ..Config::default()
                },
                "s3_endpoint",
            ),
            (
                Config {
                    replication_factor: 7,
                    ..Config::default()
                },
                "replication_factor",
            ),
            (
                Config {
                    shard_snapshot_every: 10,
                    ..Config::default()
                },
                "shard_snapshot_every must be at least 100",
            ),
            (
                Config {
                    api_subscription_lifetime_ms: 300_001,
                    ..Config::default()
                },
                "api_subscription_lifetime_ms must be between 1 and 300000",
            ),
            (
                Config {
                    glue_tables_file: Some("/nonexistent/glue-tables.json".into()),
                    ..Config::default()
                },
                "cannot read glue_tables_file",
            ),
        ];
        let credential = |key: &str, account: &str| kinesin_gateway::Credential {
            access_key_id: key.into(),
            secret_access_key: "s".into(),
            account_id: account.into(),
        };
        let two_accounts = Config {
            credentials: vec![
                credential("A", "111111111111"),
                credential("B", "222222222222"),
            ],
            insecure_internal: true,
            ..Config::default()
        };
        let cases = cases.into_iter().chain([
            (two_accounts.clone(), "set home_account"),
            (
                Config {
                    home_account: Some("12".into()),
                    ..Config::default()
                },
                "home_account must be 12 digits",
            ),
        ]);
        assert!(Config {
            home_account: Some("222222222222".into()),
            ..two_accounts
        }
        .validate()
        .is_ok());
        for (config, explained) in cases {
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(explained), "{error}");
        }
        assert_eq!(Config::default().grpc_address(), "127.0.0.1:7451");
    }

    /// Without credentials a node serves only loopback unless told to
    /// accept anyone explicitly.
    #[test]
    fn no_credentials_on_an_open_address_needs_auth_none() {
        let open = Config {
            insecure_internal: true,
            ..Config::default()
        };
        let error = open.validate().unwrap_err().to_string();
        assert!(error.contains("--insecure-dev"), "{error}");
        let insecure = Config {
            auth: AuthSetting::None,
            ..open.clone()
        };
        assert!(insecure.validate().is_ok());
        let loopback = Config {
            listen_api: "127.0.0.1:7450".parse().unwrap(),
            ..open.clone()
        };
        assert!(loopback.validate().is_ok());
        let both = Config {
            auth: AuthSetting::None,
            credentials: vec![kinesin_gateway::Credential {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "secret".into(),
                account_id: "123456789012".into(),
            }],
            ..open.clone()
        };
        let error = both.validate().unwrap_err().to_string();
        assert!(
            error.contains("remove it or the [[credentials]]"),
            "{error}"
        );
    }
}
