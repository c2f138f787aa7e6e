//! Where the four services are and how to reach them: the per-service
//! endpoints, the token and the TLS settings, taken from flags, environment
//! variables and a named context of the config file.
//!
//! Precedence, for every setting: flag > environment variable > context >
//! default. Within one of those layers a service's own URL
//! (`--job-tracker`, `TIDEMARK_JOB_TRACKER_URL`, `job_tracker = ...`) beats
//! the layer's `endpoint`; a service given nothing anywhere is reached at
//! the resolved `endpoint` (default `http://127.0.0.1:50051`, where
//! `tidemark dev` serves all four).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tidemark_client::{Endpoints, Options, Service};

/// Where `tidemark dev` serves all four services.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

/// The flags that say where the services are (global: they go before or
/// after the command).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TargetArgs {
    /// Endpoint of every service not given its own [env: TIDEMARK_ENDPOINT]
    /// [default: http://127.0.0.1:50051].
    #[arg(long, global = true)]
    pub endpoint: Option<String>,
    /// The job-tracker's endpoint, e.g. http://job-tracker:50051 [env:
    /// TIDEMARK_JOB_TRACKER_URL] [default: --endpoint].
    #[arg(long, global = true, value_name = "URL")]
    pub job_tracker: Option<String>,
    /// The replicator's endpoint [env: TIDEMARK_REPLICATOR_URL] [default:
    /// --endpoint].
    #[arg(long, global = true, value_name = "URL")]
    pub replicator: Option<String>,
    /// The verifier's endpoint [env: TIDEMARK_VERIFIER_URL] [default:
    /// --endpoint].
    #[arg(long, global = true, value_name = "URL")]
    pub verifier: Option<String>,
    /// The stats-aggregator's endpoint [env: TIDEMARK_STATS_AGGREGATOR_URL]
    /// [default: --endpoint].
    #[arg(long, global = true, value_name = "URL")]
    pub stats_aggregator: Option<String>,
    /// Bearer token, when the services require one [env: TIDEMARK_TOKEN].
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the servers' certificates (https://
    /// endpoints with a private CA) [env: TIDEMARK_TLS_CA].
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Name to check the servers' certificates against, when it differs
    /// from the endpoint's host [env: TIDEMARK_TLS_DOMAIN].
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
    /// The context of the config file to use [env: TIDEMARK_CONTEXT]
    /// [default: the file's `current`].
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The config file with the contexts [env: TIDEMARK_CONFIG] [default:
    /// $XDG_CONFIG_HOME/tidemark/config.toml, else
    /// ~/.config/tidemark/config.toml].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// One layer of settings: the flags, the environment, or a context.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub endpoint: Option<String>,
    pub job_tracker: Option<String>,
    pub replicator: Option<String>,
    pub verifier: Option<String>,
    pub stats_aggregator: Option<String>,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_domain: Option<String>,
}

impl Layer {
    fn service(&self, service: Service) -> Option<&String> {
        match service {
            Service::JobTracker => self.job_tracker.as_ref(),
            Service::Replicator => self.replicator.as_ref(),
            Service::Verifier => self.verifier.as_ref(),
            Service::StatsAggregator => self.stats_aggregator.as_ref(),
        }
    }

    /// The environment layer, read through `env` (unset and empty
    /// variables count as absent).
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| env(name).filter(|v| !v.is_empty());
        Self {
            endpoint: var("TIDEMARK_ENDPOINT"),
            // The names the services use for their peers (deploy/README.md).
            job_tracker: var("TIDEMARK_JOB_TRACKER_URL"),
            replicator: var("TIDEMARK_REPLICATOR_URL"),
            verifier: var("TIDEMARK_VERIFIER_URL"),
            stats_aggregator: var("TIDEMARK_STATS_AGGREGATOR_URL"),
            token: var("TIDEMARK_TOKEN"),
            tls_ca: var("TIDEMARK_TLS_CA").map(PathBuf::from),
            tls_domain: var("TIDEMARK_TLS_DOMAIN"),
        }
    }
}

impl From<&TargetArgs> for Layer {
    fn from(a: &TargetArgs) -> Self {
        Self {
            endpoint: a.endpoint.clone(),
            job_tracker: a.job_tracker.clone(),
            replicator: a.replicator.clone(),
            verifier: a.verifier.clone(),
            stats_aggregator: a.stats_aggregator.clone(),
            token: a.token.clone(),
            tls_ca: a.tls_ca.clone(),
            tls_domain: a.tls_domain.clone(),
        }
    }
}

/// The config file: named contexts and the one used when none is named.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Layer>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("no context {name:?} in {path} (it has: {known})")]
    NoSuchContext {
        name: String,
        path: PathBuf,
        known: String,
    },
    #[error("cannot read the TLS CA {path}: {source}")]
    TlsCa {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ConfigFile {
    /// Reads `path`; a missing file has no contexts.
    ///
    /// # Errors
    /// When the file cannot be read or is not a valid config.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        Self::parse(&text).map_err(|reason| ConfigError::Read {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the TOML text of a config file.
    ///
    /// # Errors
    /// The reason, naming the offending key.
    pub fn parse(text: &str) -> Result<Self, String> {
        use figment::providers::{Format as _, Toml};
        figment::Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| e.to_string())
    }
}

/// The config file's path: `explicit` (flag, else TIDEMARK_CONFIG), else
/// `$XDG_CONFIG_HOME/tidemark/config.toml`, else
/// `$HOME/.config/tidemark/config.toml`.
pub fn config_path(
    explicit: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<PathBuf> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(p) = explicit {
        return Some(p.to_owned());
    }
    if let Some(p) = var("TIDEMARK_CONFIG") {
        return Some(PathBuf::from(p));
    }
    var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| Path::new(&h).join(".config")))
        .map(|dir| dir.join("tidemark").join("config.toml"))
}

/// Where the services are, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The context used, if any.
    pub context: Option<String>,
    pub endpoint: String,
    /// Every service's endpoint, in [`Service::ALL`] order.
    pub services: [String; 4],
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_domain: Option<String>,
}

/// Resolves `layers`, highest precedence first (flags, environment,
/// context): the first layer that names a service (its own URL, else its
/// `endpoint`) decides where it is.
pub fn resolve(layers: &[&Layer], context: Option<String>) -> Target {
    let first = |f: &dyn Fn(&Layer) -> Option<String>| layers.iter().find_map(|l| f(l));
    let endpoint = first(&|l| l.endpoint.clone()).unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
    let services = Service::ALL.map(|s| {
        first(&|l| l.service(s).or(l.endpoint.as_ref()).cloned())
            .unwrap_or_else(|| endpoint.clone())
    });
    Target {
        context,
        services,
        token: first(&|l| l.token.clone()),
        tls_ca: layers.iter().find_map(|l| l.tls_ca.clone()),
        tls_domain: first(&|l| l.tls_domain.clone()),
        endpoint,
    }
}

/// Resolves the flags `args` against the environment `env` and the config
/// file: flag > environment > context > default.
///
/// # Errors
/// When the config file cannot be read or the named context is not in it.
pub fn load(
    args: &TargetArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Target, ConfigError> {
    let flags = Layer::from(args);
    let environment = Layer::from_env(env);
    let path = config_path(args.config.as_deref(), env);
    let file = match &path {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    let name = args
        .context
        .clone()
        .or_else(|| env("TIDEMARK_CONTEXT").filter(|v| !v.is_empty()))
        .or_else(|| file.current.clone());
    let Some(name) = name else {
        return Ok(resolve(&[&flags, &environment], None));
    };
    let path = path.unwrap_or_default();
    let mut context =
        file.contexts
            .get(&name)
            .cloned()
            .ok_or_else(|| ConfigError::NoSuchContext {
                name: name.clone(),
                path: path.clone(),
                known: if file.contexts.is_empty() {
                    "none".to_owned()
                } else {
                    file.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })?;
    // A relative CA path in the file is relative to the file.
    if let (Some(ca), Some(dir)) = (&context.tls_ca, path.parent()) {
        context.tls_ca = Some(dir.join(ca));
    }
    Ok(resolve(&[&flags, &environment, &context], Some(name)))
}

impl Target {
    pub fn endpoint_of(&self, service: Service) -> &str {
        let i = Service::ALL
            .iter()
            .position(|s| *s == service)
            .expect("ALL lists every service");
        &self.services[i]
    }

    /// The client's options (the CA file read).
    ///
    /// # Errors
    /// When the CA file cannot be read.
    pub fn options(&self, base: &Options) -> Result<Options, ConfigError> {
        let tls_ca_pem = self
            .tls_ca
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path).map_err(|source| ConfigError::TlsCa {
                    path: path.clone(),
                    source,
                })
            })
            .transpose()?;
        let mut services = Endpoints::default();
        for s in Service::ALL {
            let url = self.endpoint_of(s);
            if url != self.endpoint {
                services.set(s, Some(url.to_owned()));
            }
        }
        Ok(Options {
            endpoint: self.endpoint.clone(),
            services,
            token: self.token.clone(),
            tls_ca_pem,
            tls_domain: self.tls_domain.clone(),
            ..base.clone()
        })
    }

    /// Where the services are, for error messages: the one endpoint, or
    /// each service's.
    pub fn describe(&self) -> String {
        let all_one = self.services.iter().all(|u| *u == self.endpoint);
        let at = if all_one {
            self.endpoint.clone()
        } else {
            Service::ALL
                .iter()
                .map(|s| format!("{} {}", s.name(), self.endpoint_of(*s)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &self.context {
            Some(c) => format!("{at} (context {c})"),
            None => at,
        }
    }
}

#[cfg(test)]
#[path = "target_tests.rs"]
mod tests;
