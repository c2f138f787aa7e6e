//! Layered configuration: compiled-in defaults, then a TOML file, then
//! `TIDEMARK_…` environment variables, then command-line flags; the result is
//! validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Environment variables that configure a service start with this prefix:
/// `TIDEMARK_LISTEN`, `TIDEMARK_AUTH_TOKEN`, `TIDEMARK_DYNAMODB_ENDPOINT`…
pub const ENV_PREFIX: &str = "TIDEMARK_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ConfigError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (the default: what log pipelines ingest).
    #[default]
    Json,
    /// Human-readable lines for a terminal.
    Text,
}

/// Settings every service host shares. Its `Debug` (and so every service
/// `Config`'s) shows whether a token is set, never the token.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Where Prometheus scrapes `/metrics`; no metrics endpoint when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Upper bound for any unary RPC (clients may ask for less with
    /// `grpc-timeout`). Streaming RPCs are bounded by their own deadlines.
    pub request_timeout_ms: u64,
    /// Requests served at once across all connections; more are shed with
    /// `RESOURCE_EXHAUSTED` instead of queueing without bound.
    pub concurrency_limit: usize,
    /// How long shutdown waits for in-flight requests and background tasks.
    pub shutdown_grace_ms: u64,
    /// After health turns NOT_SERVING and before the listener closes, so load
    /// balancers and meshes stop sending new requests first.
    pub drain_delay_ms: u64,
    /// When set, every RPC except health must carry `authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// PEM certificate chain; TLS is on when both cert and key are set.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
    /// Serve on a non-loopback address with neither `auth_token` nor TLS
    /// (for example behind a mesh whose sidecar does mTLS and authorisation).
    /// Off: such a configuration is refused, so a pod never listens on
    /// 0.0.0.0 open to anyone by accident.
    pub insecure: bool,
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `info,replicator=debug`.
    pub log_level: String,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("concurrency_limit", &self.concurrency_limit)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("drain_delay_ms", &self.drain_delay_ms)
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("insecure", &self.insecure)
            .field("log_format", &self.log_format)
            .field("log_level", &self.log_level)
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            request_timeout_ms: 30_000,
            concurrency_limit: 1024,
            shutdown_grace_ms: 20_000,
            drain_delay_ms: 0,
            auth_token: None,
            tls_cert: None,
            tls_key: None,
            insecure: false,
            log_format: LogFormat::Json,
            log_level: "info".to_owned(),
        }
    }
}

impl ServerConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }

    /// Checks the settings that would otherwise fail late or silently.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "request_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.concurrency_limit == 0 {
            return Err(ConfigError::invalid(
                "concurrency_limit",
                "must be greater than 0",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::invalid(
                "tls_cert",
                "tls_cert and tls_key must be set together",
            ));
        }
        for (field, path) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
            if let Some(p) = path
                && !p.is_file()
            {
                return Err(ConfigError::invalid(
                    field,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        if self
            .auth_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(ConfigError::invalid(
                "auth_token",
                "must not be empty when set",
            ));
        }
        if !self.listen.ip().is_loopback()
            && self.auth_token.is_none()
            && self.tls_cert.is_none()
            && !self.insecure
        {
            return Err(ConfigError::invalid(
                "listen",
                format!(
                    "{} is reachable from other hosts, and neither auth_token nor TLS (tls_cert, tls_key) is set: set one, or set insecure = true (TIDEMARK_INSECURE=true, --insecure) when something in front (a mesh) authenticates callers",
                    self.listen
                ),
            ));
        }
        if self.metrics_listen == Some(self.listen) {
            return Err(ConfigError::invalid(
                "metrics_listen",
                "must differ from listen",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| ConfigError::invalid("log_level", e.to_string()))?;
        Ok(())
    }
}

/// A service's whole configuration: the shared server settings plus its own.
pub trait ServiceConfig: Serialize + DeserializeOwned + Default {
    fn server(&self) -> &ServerConfig;
    /// Checks the service's own settings; the server part is checked too.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Flags every service binary accepts; they override file and environment.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServerFlags {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// gRPC listen address, e.g. 0.0.0.0:50051.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Prometheus metrics listen address, e.g. 0.0.0.0:9090.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve on a non-loopback address without auth_token or TLS.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Log format.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `debug`.
    #[arg(long, value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

/// Loads `C` from defaults → `file` → `TIDEMARK_…` env → `flags`, then
/// validates it.
///
/// `flags` is any serializable struct whose `None` fields are skipped, so
/// only flags the user gave override anything.
pub fn load<C: ServiceConfig>(
    file: Option<&Path>,
    flags: &impl Serialize,
) -> Result<C, ConfigError> {
    load_from(file, Env::prefixed(ENV_PREFIX), flags)
}

/// As [`load`], with the environment given explicitly (tests use
/// [`figment::providers::Env`] over a fixed map rather than the process env).
pub fn load_from<C: ServiceConfig>(
    file: Option<&Path>,
    env: Env,
    flags: &impl Serialize,
) -> Result<C, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(C::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile(path.to_owned()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let config: C = figment
        .merge(env)
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(|e| ConfigError::Parse(e.to_string()))?;
    config.server().validate()?;
    config.validate()?;
    Ok(config)
}

/// Checks that `value` is an absolute `http://` or `https://` URL.
///
/// # Errors
/// Names `field` and says what is wrong.
pub fn check_url(field: &'static str, value: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = value
        .parse()
        .map_err(|e| ConfigError::invalid(field, format!("{value:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(()),
        _ => Err(ConfigError::invalid(
            field,
            format!("{value:?} must be an http:// or https:// URL with a host"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct TestConfig {
        #[serde(flatten)]
        server: ServerConfig,
        table_name: String,
        batch_size: u32,
    }

    impl ServiceConfig for TestConfig {
        fn server(&self) -> &ServerConfig {
            &self.server
        }
        fn validate(&self) -> Result<(), ConfigError> {
            if self.batch_size > 25 {
                return Err(ConfigError::invalid("batch_size", "must be at most 25"));
            }
            Ok(())
        }
    }

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        table_name: Option<String>,
    }

    /// An environment provider that matches nothing, so these tests do not
    /// depend on the variables of the process running them.
    fn no_env() -> Env {
        Env::prefixed("TIDEMARK_CONFIG_TEST_NOTHING_")
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "table_name = \"from-file\"\nbatch_size = 10\nlisten = \"127.0.0.1:6000\"\n",
        )
        .unwrap();
        let cfg: TestConfig =
            load_from(Some(&file), no_env(), &Flags { table_name: None }).unwrap();
        assert_eq!(cfg.table_name, "from-file");
        assert_eq!(cfg.batch_size, 10);
        assert_eq!(cfg.server.listen.port(), 6000);
        let cfg: TestConfig = load_from(
            Some(&file),
            no_env(),
            &Flags {
                table_name: Some("from-flag".into()),
            },
        )
        .unwrap();
        assert_eq!(cfg.table_name, "from-flag");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "table_name = \"from-file\"\nbatch_size = 3\n")?;
            jail.set_env("TIDEMARK_TABLE_NAME", "from-env");
            jail.set_env("TIDEMARK_CONCURRENCY_LIMIT", "7");
            let cfg: TestConfig = load(Some(Path::new("c.toml")), &Flags { table_name: None })
                .map_err(|e| e.to_string())?;
            assert_eq!(cfg.table_name, "from-env");
            assert_eq!(cfg.batch_size, 3);
            assert_eq!(cfg.server.concurrency_limit, 7);
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "batch_size = 100\n").unwrap();
        let err = load_from::<TestConfig>(Some(&file), no_env(), &Flags { table_name: None })
            .unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
        std::fs::write(&file, "request_timeout_ms = 0\n").unwrap();
        let err = load_from::<TestConfig>(Some(&file), no_env(), &Flags { table_name: None })
            .unwrap_err();
        assert!(err.to_string().contains("request_timeout_ms"), "{err}");
        let err = load_from::<TestConfig>(
            Some(&dir.path().join("missing.toml")),
            no_env(),
            &Flags { table_name: None },
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let config = ServerConfig {
            auth_token: Some("s3cret-value".into()),
            ..ServerConfig::default()
        };
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains("s3cret-value"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn an_open_non_loopback_listener_needs_a_token_tls_or_insecure() {
        let open = ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            ..ServerConfig::default()
        };
        let err = open.validate().unwrap_err();
        assert!(err.to_string().starts_with("listen:"), "{err}");
        assert!(err.to_string().contains("insecure"), "{err}");
        let with_token = ServerConfig {
            auth_token: Some("s3cret".into()),
            ..open.clone()
        };
        with_token.validate().unwrap();
        let declared = ServerConfig {
            insecure: true,
            ..open
        };
        declared.validate().unwrap();
        ServerConfig::default().validate().unwrap();
        ServerConfig {
            listen: "[::1]:50051".parse().unwrap(),
            ..ServerConfig::default()
        }
        .validate()
        .unwrap();
    }
}
