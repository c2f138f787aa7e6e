//! `ReplicatorService` RPCs: thin wrappers over the handlers of each
//! operation (`pipeline`, `backfill`, `migrate`, `extract`).

use tidemark_kit::rpc::BoxStream;
use tidemark_proto::replicator::v1::replicator_service_server::ReplicatorService;
use tidemark_proto::replicator::v1::*;
use tonic::{Request, Response, Status};

use crate::context::Replicator;
use crate::pipeline::{lag, repair, rpc as pipelines};
use crate::{backfill, extract, migrate};

#[tonic::async_trait]
impl ReplicatorService for Replicator {
    async fn create_pipeline(
        &self,
        request: Request<CreatePipelineRequest>,
    ) -> Result<Response<CreatePipelineResponse>, Status> {
        pipelines::create(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn get_pipeline(
        &self,
        request: Request<GetPipelineRequest>,
    ) -> Result<Response<GetPipelineResponse>, Status> {
        pipelines::get(self, &request.into_inner().name)
            .await
            .map(|p| Response::new(GetPipelineResponse { pipeline: Some(p) }))
            .map_err(Into::into)
    }

    async fn list_pipelines(
        &self,
        request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        pipelines::list(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn pause_pipeline(
        &self,
        request: Request<PausePipelineRequest>,
    ) -> Result<Response<PausePipelineResponse>, Status> {
        pipelines::pause(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn resume_pipeline(
        &self,
        request: Request<ResumePipelineRequest>,
    ) -> Result<Response<ResumePipelineResponse>, Status> {
        pipelines::resume(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        lag::drain(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    type WatchLagStream = BoxStream<WatchLagResponse>;

    async fn watch_lag(
        &self,
        request: Request<WatchLagRequest>,
    ) -> Result<Response<Self::WatchLagStream>, Status> {
        lag::watch_lag(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn repair(
        &self,
        request: Request<RepairRequest>,
    ) -> Result<Response<RepairResponse>, Status> {
        repair::repair(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        repair::list_dead_letters(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn replay_dead_letters(
        &self,
        request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        repair::replay_dead_letters(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn backfill_attribute(
        &self,
        request: Request<BackfillAttributeRequest>,
    ) -> Result<Response<BackfillAttributeResponse>, Status> {
        backfill::rpc::backfill_attribute(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn set_backfill_rate(
        &self,
        request: Request<SetBackfillRateRequest>,
    ) -> Result<Response<SetBackfillRateResponse>, Status> {
        backfill::rpc::set_backfill_rate(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn migrate_unit(
        &self,
        request: Request<MigrateUnitRequest>,
    ) -> Result<Response<MigrateUnitResponse>, Status> {
        migrate::rpc::migrate_unit(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn create_incremental_extract(
        &self,
        request: Request<CreateIncrementalExtractRequest>,
    ) -> Result<Response<CreateIncrementalExtractResponse>, Status> {
        extract::rpc::create_incremental_extract(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Into::into)
    }
}
