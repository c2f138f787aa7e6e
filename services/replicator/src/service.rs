//! `ReplicatorService` RPCs. Those not built yet answer `UNIMPLEMENTED` naming the RPC.

use tidemark_kit::rpc::{BoxStream, not_built};
use tidemark_proto::replicator::v1::replicator_service_server::ReplicatorService;
use tidemark_proto::replicator::v1::*;
use tonic::{Request, Response, Status};

use crate::Replicator;
use crate::jobs;

#[tonic::async_trait]
impl ReplicatorService for Replicator {
    async fn create_pipeline(
        &self,
        _request: Request<CreatePipelineRequest>,
    ) -> Result<Response<CreatePipelineResponse>, Status> {
        Err(not_built("ReplicatorService.CreatePipeline"))
    }

    async fn get_pipeline(
        &self,
        _request: Request<GetPipelineRequest>,
    ) -> Result<Response<GetPipelineResponse>, Status> {
        Err(not_built("ReplicatorService.GetPipeline"))
    }

    async fn list_pipelines(
        &self,
        _request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        Err(not_built("ReplicatorService.ListPipelines"))
    }

    async fn pause_pipeline(
        &self,
        _request: Request<PausePipelineRequest>,
    ) -> Result<Response<PausePipelineResponse>, Status> {
        Err(not_built("ReplicatorService.PausePipeline"))
    }

    async fn resume_pipeline(
        &self,
        _request: Request<ResumePipelineRequest>,
    ) -> Result<Response<ResumePipelineResponse>, Status> {
        Err(not_built("ReplicatorService.ResumePipeline"))
    }

    async fn drain(
        &self,
        _request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        Err(not_built("ReplicatorService.Drain"))
    }

    type WatchLagStream = BoxStream<WatchLagResponse>;

    async fn watch_lag(
        &self,
        _request: Request<WatchLagRequest>,
    ) -> Result<Response<Self::WatchLagStream>, Status> {
        Err(not_built("ReplicatorService.WatchLag"))
    }

    async fn repair(
        &self,
        _request: Request<RepairRequest>,
    ) -> Result<Response<RepairResponse>, Status> {
        Err(not_built("ReplicatorService.Repair"))
    }

    async fn list_dead_letters(
        &self,
        _request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        Err(not_built("ReplicatorService.ListDeadLetters"))
    }

    async fn replay_dead_letters(
        &self,
        _request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        Err(not_built("ReplicatorService.ReplayDeadLetters"))
    }

    async fn backfill_attribute(
        &self,
        request: Request<BackfillAttributeRequest>,
    ) -> Result<Response<BackfillAttributeResponse>, Status> {
        jobs::backfill_attribute(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn set_backfill_rate(
        &self,
        request: Request<SetBackfillRateRequest>,
    ) -> Result<Response<SetBackfillRateResponse>, Status> {
        jobs::set_backfill_rate(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn migrate_unit(
        &self,
        request: Request<MigrateUnitRequest>,
    ) -> Result<Response<MigrateUnitResponse>, Status> {
        jobs::migrate_unit(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_incremental_extract(
        &self,
        _request: Request<CreateIncrementalExtractRequest>,
    ) -> Result<Response<CreateIncrementalExtractResponse>, Status> {
        Err(not_built("ReplicatorService.CreateIncrementalExtract"))
    }
}
