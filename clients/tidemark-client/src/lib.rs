//! Typed async client over the four Tidemark services: one connection, a
//! bearer token on every call, deadlines, and retries with backoff on
//! `UNAVAILABLE` for calls that are safe to repeat.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_client::StatsAggregatorServiceClient;
use tidemark_proto::verifier::v1::verifier_service_client::VerifierServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Rpc(#[from] Status),
}

pub type ClientResult<T> = Result<T, ClientError>;

/// Where and how to reach a Tidemark deployment.
#[derive(Clone, Debug)]
pub struct Options {
    /// `http://host:port` or `https://host:port` (TLS with the system roots).
    pub endpoint: String,
    /// Sent as `authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// Deadline of each unary call.
    pub timeout: Duration,
    /// Attempts of an idempotent call that answers `UNAVAILABLE`.
    pub max_attempts: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:50051".to_owned(),
            token: None,
            timeout: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

type Svc = InterceptedService<Channel, Auth>;

/// A connection to a Tidemark deployment; cheap to clone.
#[derive(Clone)]
pub struct Tidemark {
    channel: Channel,
    auth: Auth,
    options: Options,
}

impl Tidemark {
    /// Connects (lazily: the first call dials) to `options.endpoint`.
    ///
    /// # Errors
    /// When the endpoint or token is malformed.
    pub fn connect(options: Options) -> ClientResult<Self> {
        let bad = |reason: String| ClientError::Endpoint {
            endpoint: options.endpoint.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_str(&options.endpoint)
            .map_err(|e| bad(e.to_string()))?
            .timeout(options.timeout)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if options.endpoint.starts_with("https://") {
            // Binaries that also link the AWS SDK carry two rustls crypto
            // providers; rustls then needs to be told which one to use.
            let _ = rustls::crypto::ring::default_provider().install_default();
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_enabled_roots())
                .map_err(|e| bad(e.to_string()))?;
        }
        let header = options
            .token
            .as_deref()
            .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>())
            .transpose()
            .map_err(|_| {
                bad("the token has characters that cannot be sent in a header".to_owned())
            })?;
        Ok(Self {
            channel: endpoint.connect_lazy(),
            auth: Auth { header },
            options,
        })
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    pub fn jobs(&self) -> JobTrackerServiceClient<Svc> {
        JobTrackerServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn replicator(&self) -> ReplicatorServiceClient<Svc> {
        ReplicatorServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn stats(&self) -> StatsAggregatorServiceClient<Svc> {
        StatsAggregatorServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn verifier(&self) -> VerifierServiceClient<Svc> {
        VerifierServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// Runs an idempotent call, retrying `UNAVAILABLE` with jittered
    /// exponential backoff (the server is restarting or shedding load).
    ///
    /// # Errors
    /// The call's status when it is not `UNAVAILABLE` or attempts ran out.
    pub async fn idempotent<T, F, Fut>(&self, mut call: F) -> ClientResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut attempt = 0u32;
        loop {
            match call().await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s)
                    if s.code() == Code::Unavailable
                        && attempt + 1 < self.options.max_attempts.max(1) =>
                {
                    let cap = 50u64.saturating_mul(1 << attempt.min(6));
                    let delay = Duration::from_millis(rand::random::<u64>() % (cap + 1));
                    tracing::debug!(attempt, delay_ms = delay.as_millis(), status = %s.message(), "retrying unavailable call");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(s) => return Err(s.into()),
            }
        }
    }
}
