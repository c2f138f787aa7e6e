//! `StatsAggregatorService` RPCs. Those not built yet answer `UNIMPLEMENTED` naming the RPC.

use tidemark_kit::rpc::not_built;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_server::StatsAggregatorService;
use tidemark_proto::stats_aggregator::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::StatsAggregator;

#[tonic::async_trait]
impl StatsAggregatorService for StatsAggregator {
    async fn ingest(
        &self,
        _request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<IngestResponse>, Status> {
        Err(not_built("StatsAggregatorService.Ingest"))
    }

    async fn ingest_batch(
        &self,
        _request: Request<IngestBatchRequest>,
    ) -> Result<Response<IngestBatchResponse>, Status> {
        Err(not_built("StatsAggregatorService.IngestBatch"))
    }

    async fn flush(
        &self,
        _request: Request<FlushRequest>,
    ) -> Result<Response<FlushResponse>, Status> {
        Err(not_built("StatsAggregatorService.Flush"))
    }

    async fn get_stats(
        &self,
        _request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        Err(not_built("StatsAggregatorService.GetStats"))
    }

    async fn pause_writers(
        &self,
        _request: Request<PauseWritersRequest>,
    ) -> Result<Response<PauseWritersResponse>, Status> {
        Err(not_built("StatsAggregatorService.PauseWriters"))
    }

    async fn resume_writers(
        &self,
        _request: Request<ResumeWritersRequest>,
    ) -> Result<Response<ResumeWritersResponse>, Status> {
        Err(not_built("StatsAggregatorService.ResumeWriters"))
    }

    async fn get_buffer_state(
        &self,
        _request: Request<GetBufferStateRequest>,
    ) -> Result<Response<GetBufferStateResponse>, Status> {
        Err(not_built("StatsAggregatorService.GetBufferState"))
    }
}
