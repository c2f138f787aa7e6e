//! One connection to a Tidemark deployment: the bearer token, the default
//! deadline, and retries of calls that are safe to repeat.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_client::StatsAggregatorServiceClient;
use tidemark_proto::verifier::v1::verifier_service_client::VerifierServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use crate::error::{ClientError, ClientResult};

/// Where and how to reach a Tidemark deployment.
#[derive(Clone, Debug)]
pub struct Options {
    /// `http://host:port` or `https://host:port` (TLS with the system roots).
    pub endpoint: String,
    /// Sent as `authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// Deadline of each unary call that does not ask for another (sent as
    /// `grpc-timeout`, so the server stops working on it too).
    pub timeout: Duration,
    /// How long dialing may take.
    pub connect_timeout: Duration,
    /// Attempts of an idempotent call that answers `UNAVAILABLE`.
    pub max_attempts: u32,
    /// PEM of the certificate authority that signed the server's
    /// certificate, for `https://` endpoints with a private CA. Unset: the
    /// system roots.
    pub tls_ca_pem: Option<String>,
    /// The name the server's certificate is checked against, when it differs
    /// from the endpoint's host (e.g. connecting by IP address).
    pub tls_domain: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:50051".to_owned(),
            token: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 5,
            tls_ca_pem: None,
            tls_domain: None,
        }
    }
}

/// Adds the bearer token to every request, and the default deadline to
/// those that carry none.
#[derive(Clone)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
    timeout: Duration,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        // A deadline per request rather than on the channel: streams and
        // drains ask for longer ones, and a channel-wide timeout would cap
        // them.
        if !request.metadata().contains_key("grpc-timeout") {
            request.set_timeout(self.timeout);
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
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true);
        if options.endpoint.starts_with("https://") {
            // Binaries that also link the AWS SDK carry two rustls crypto
            // providers; rustls then needs to be told which one to use.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut tls = match &options.tls_ca_pem {
                Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                None => ClientTlsConfig::new().with_enabled_roots(),
            };
            if let Some(domain) = &options.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        } else if options.tls_ca_pem.is_some() {
            return Err(bad(
                "a TLS certificate authority was given for a plaintext endpoint: use https://"
                    .to_owned(),
            ));
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
            auth: Auth {
                header,
                timeout: options.timeout,
            },
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
