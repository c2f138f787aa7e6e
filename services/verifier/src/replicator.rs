//! The replicator as the verifier uses it: does a pipeline exist, has its
//! lag passed a moment, and rewrite these keys.

use std::str::FromStr as _;
use std::time::Duration;

use futures::StreamExt as _;
use tidemark_proto::common::v1 as common;
use tidemark_proto::replicator::v1 as rpb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Adds the bearer token, when configured, the trace context and what is
/// left of the deadline of the RPC being served to every call (none outside
/// an RPC: a verification's lag stream runs as long as it needs).
#[derive(Clone, Debug, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(h) = &self.0 {
            request.metadata_mut().insert("authorization", h.clone());
        }
        tidemark_kit::trace_context::inject(request.metadata_mut());
        tidemark_kit::worker::propagate_deadline(&mut request)?;
        Ok(request)
    }
}

/// A lazily connected replicator client.
#[derive(Clone)]
pub struct Replicator {
    client: ReplicatorServiceClient<InterceptedService<Channel, Auth>>,
}

impl Replicator {
    /// # Errors
    /// A malformed URL or token.
    pub fn connect(url: &str, token: Option<&str>) -> Result<Self, String> {
        let endpoint = Endpoint::from_str(url)
            .map_err(|e| format!("bad replicator URL {url:?}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let header = token
            .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>())
            .transpose()
            .map_err(|_| "the auth token cannot be sent in a header".to_owned())?;
        Ok(Self {
            client: ReplicatorServiceClient::with_interceptor(
                endpoint.connect_lazy(),
                Auth(header),
            ),
        })
    }

    /// # Errors
    /// NOT_FOUND for an unknown pipeline; what the call fails with.
    pub async fn get_pipeline(&self, name: &str) -> Result<rpb::Pipeline, Status> {
        let response = self
            .client
            .clone()
            .get_pipeline(rpb::GetPipelineRequest {
                name: name.to_owned(),
            })
            .await?;
        response
            .into_inner()
            .pipeline
            .ok_or_else(|| Status::internal("GetPipeline answered without a pipeline"))
    }

    /// Follows the pipeline's lag until `passed` holds for a reading.
    ///
    /// # Errors
    /// The stream cannot be opened or ends early.
    pub async fn wait_for_lag(
        &self,
        pipeline: &str,
        passed: impl Fn(&rpb::PipelineLag) -> bool,
    ) -> Result<(), Status> {
        let mut stream = self
            .client
            .clone()
            .watch_lag(rpb::WatchLagRequest {
                name: pipeline.to_owned(),
                interval: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 250_000_000,
                }),
            })
            .await?
            .into_inner();
        while let Some(message) = stream.next().await {
            if message?.lag.as_ref().is_some_and(&passed) {
                return Ok(());
            }
        }
        Err(Status::unavailable("the lag stream ended"))
    }

    /// Rewrites `keys` (at most 1000) from the source to every sink.
    ///
    /// # Errors
    /// What the call fails with.
    pub async fn repair(
        &self,
        pipeline: &str,
        keys: Vec<common::Key>,
    ) -> Result<rpb::RepairResponse, Status> {
        Ok(self
            .client
            .clone()
            .repair(rpb::RepairRequest {
                name: pipeline.to_owned(),
                keys,
                sink_names: Vec::new(),
            })
            .await?
            .into_inner())
    }
}
