//! One connection to a Tidemark deployment: an endpoint per service (one
//! for all four in `tidemark dev`, one Service each on Kubernetes), the
//! bearer token, the default deadline, and retries of calls that are safe to
//! repeat.

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
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::error::{ClientError, ClientResult};

/// One of the four services, each reached at its own endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    JobTracker,
    Replicator,
    Verifier,
    StatsAggregator,
}

impl Service {
    pub const ALL: [Self; 4] = [
        Self::JobTracker,
        Self::Replicator,
        Self::Verifier,
        Self::StatsAggregator,
    ];

    /// `job-tracker`, `replicator`, `verifier`, `stats-aggregator`: the
    /// names of the binaries and of the Kubernetes Services.
    pub fn name(self) -> &'static str {
        match self {
            Self::JobTracker => "job-tracker",
            Self::Replicator => "replicator",
            Self::Verifier => "verifier",
            Self::StatsAggregator => "stats-aggregator",
        }
    }

    /// The gRPC service's full name, as `grpc.health.v1` and the
    /// Kubernetes readiness probes ask for it.
    pub fn grpc_name(self) -> &'static str {
        match self {
            Self::JobTracker => "tidemark.job_tracker.v1.JobTrackerService",
            Self::Replicator => "tidemark.replicator.v1.ReplicatorService",
            Self::Verifier => "tidemark.verifier.v1.VerifierService",
            Self::StatsAggregator => "tidemark.stats_aggregator.v1.StatsAggregatorService",
        }
    }
}

/// Per-service endpoints; an unset one is [`Options::endpoint`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub job_tracker: Option<String>,
    pub replicator: Option<String>,
    pub verifier: Option<String>,
    pub stats_aggregator: Option<String>,
}

impl Endpoints {
    pub fn get(&self, service: Service) -> Option<&str> {
        match service {
            Service::JobTracker => self.job_tracker.as_deref(),
            Service::Replicator => self.replicator.as_deref(),
            Service::Verifier => self.verifier.as_deref(),
            Service::StatsAggregator => self.stats_aggregator.as_deref(),
        }
    }

    pub fn set(&mut self, service: Service, url: Option<String>) {
        let slot = match service {
            Service::JobTracker => &mut self.job_tracker,
            Service::Replicator => &mut self.replicator,
            Service::Verifier => &mut self.verifier,
            Service::StatsAggregator => &mut self.stats_aggregator,
        };
        *slot = url;
    }
}

/// Where and how to reach a Tidemark deployment.
#[derive(Clone, Debug)]
pub struct Options {
    /// `http://host:port` or `https://host:port` (TLS with the system roots):
    /// every service not given its own endpoint in `services`.
    pub endpoint: String,
    /// A service's own endpoint, when it is not `endpoint` (each service its
    /// own Kubernetes Service, e.g. `http://replicator:50051`).
    pub services: Endpoints,
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
    /// W3C trace context sent with every call (`traceparent`), so the
    /// services' spans and log lines for this client's calls share its
    /// trace id. Unset: none is sent (each call starts a trace of its own).
    /// [`new_traceparent`] makes one for a command.
    pub traceparent: Option<String>,
}

/// A fresh W3C `traceparent` (version 00, sampled): a random trace id and
/// parent span id, for one client command's calls.
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// Whether `value` is a `traceparent` the services can continue: version
/// 00, a 32-hex trace id and a 16-hex parent id (neither all zeros), and
/// 2-hex flags.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    matches!(parts.as_slice(), [v, t, p, f]
        if *v == "00" && hex(t, 32) && hex(p, 16) && hex(f, 2)
            && t.bytes().any(|b| b != b'0') && p.bytes().any(|b| b != b'0'))
}

impl Default for Options {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:50051".to_owned(),
            services: Endpoints::default(),
            token: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 5,
            tls_ca_pem: None,
            tls_domain: None,
            traceparent: None,
        }
    }
}

/// Adds the bearer token and the trace context to every request, and the
/// default deadline to those that carry none.
#[derive(Clone)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
    timeout: Duration,
    traceparent: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        if let Some(t) = &self.traceparent {
            request.metadata_mut().insert("traceparent", t.clone());
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

impl Options {
    /// The endpoint `service` is reached at: its own, else `endpoint`.
    pub fn endpoint_of(&self, service: Service) -> &str {
        self.services.get(service).unwrap_or(&self.endpoint)
    }
}

/// A connection to a Tidemark deployment; cheap to clone.
#[derive(Clone)]
pub struct Tidemark {
    /// One channel per service, in [`Service::ALL`] order; services at the
    /// same endpoint share one channel.
    channels: [Channel; 4],
    auth: Auth,
    options: Options,
}

impl Tidemark {
    /// Connects (lazily: the first call dials) each service to its endpoint
    /// ([`Options::endpoint_of`]).
    ///
    /// # Errors
    /// When an endpoint or the token is malformed.
    pub fn connect(options: Options) -> ClientResult<Self> {
        let header = options
            .token
            .as_deref()
            .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>())
            .transpose()
            .map_err(|_| ClientError::Endpoint {
                endpoint: options.endpoint.clone(),
                reason: "the token has characters that cannot be sent in a header".to_owned(),
            })?;
        let mut opened: Vec<(&str, Channel)> = Vec::with_capacity(4);
        for service in Service::ALL {
            let url = options.endpoint_of(service);
            if !opened.iter().any(|(u, _)| *u == url) {
                opened.push((url, channel(&options, url)?));
            }
        }
        let channels = Service::ALL.map(|service| {
            let url = options.endpoint_of(service);
            opened
                .iter()
                .find(|(u, _)| *u == url)
                .map(|(_, c)| c.clone())
                .expect("every endpoint was opened above")
        });
        Ok(Self {
            channels,
            auth: Auth {
                header,
                timeout: options.timeout,
                traceparent: options
                    .traceparent
                    .as_deref()
                    .filter(|t| is_traceparent(t))
                    .and_then(|t| t.parse().ok()),
            },
            options,
        })
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    fn channel(&self, service: Service) -> Channel {
        let i = Service::ALL
            .iter()
            .position(|s| *s == service)
            .expect("ALL lists every service");
        self.channels[i].clone()
    }

    pub fn jobs(&self) -> JobTrackerServiceClient<Svc> {
        JobTrackerServiceClient::with_interceptor(
            self.channel(Service::JobTracker),
            self.auth.clone(),
        )
    }

    pub fn replicator(&self) -> ReplicatorServiceClient<Svc> {
        ReplicatorServiceClient::with_interceptor(
            self.channel(Service::Replicator),
            self.auth.clone(),
        )
    }

    pub fn stats(&self) -> StatsAggregatorServiceClient<Svc> {
        StatsAggregatorServiceClient::with_interceptor(
            self.channel(Service::StatsAggregator),
            self.auth.clone(),
        )
    }

    pub fn verifier(&self) -> VerifierServiceClient<Svc> {
        VerifierServiceClient::with_interceptor(self.channel(Service::Verifier), self.auth.clone())
    }

    /// `service`'s `grpc.health.v1` status at its endpoint, as the
    /// readiness probes ask: `SERVING` when it can do its work (its
    /// backends reachable), `NOT_SERVING` when not or while shutting down.
    ///
    /// # Errors
    /// When the endpoint cannot be reached or does not serve the health
    /// service.
    pub async fn health(&self, service: Service) -> ClientResult<ServingStatus> {
        let mut client = HealthClient::with_interceptor(self.channel(service), self.auth.clone());
        let reply = client
            .check(HealthCheckRequest {
                service: service.grpc_name().to_owned(),
            })
            .await?
            .into_inner();
        Ok(ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown))
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

/// A lazily connected channel to `url`, with the TLS settings of `options`.
fn channel(options: &Options, url: &str) -> ClientResult<Channel> {
    let bad = |reason: String| ClientError::Endpoint {
        endpoint: url.to_owned(),
        reason,
    };
    let mut endpoint = Endpoint::from_str(url)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if url.starts_with("https://") {
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
    } else if options.tls_ca_pem.is_some()
        && !Service::ALL
            .iter()
            .any(|s| options.endpoint_of(*s).starts_with("https://"))
    {
        return Err(bad(
            "a TLS certificate authority was given for a plaintext endpoint: use https://"
                .to_owned(),
        ));
    }
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_defaults_to_the_endpoint_and_takes_its_own() {
        let mut options = Options {
            endpoint: "http://all:50051".to_owned(),
            ..Options::default()
        };
        options.services.replicator = Some("http://replicator:50051".to_owned());
        assert_eq!(options.endpoint_of(Service::JobTracker), "http://all:50051");
        assert_eq!(
            options.endpoint_of(Service::Replicator),
            "http://replicator:50051"
        );
        assert_eq!(options.endpoint_of(Service::Verifier), "http://all:50051");
    }

    #[tokio::test]
    async fn a_malformed_service_endpoint_is_named_in_the_error() {
        let mut options = Options::default();
        options.services.verifier = Some("not a url".to_owned());
        match Tidemark::connect(options) {
            Err(ClientError::Endpoint { endpoint, .. }) => assert_eq!(endpoint, "not a url"),
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("a malformed endpoint was accepted"),
        }
    }
}
