//! `JobTrackerService` RPCs. Those not built yet answer `UNIMPLEMENTED` naming the RPC.

use tidemark_kit::rpc::{BoxStream, not_built};
use tidemark_proto::job_tracker::v1::job_tracker_service_server::JobTrackerService;
use tidemark_proto::job_tracker::v1::*;
use tonic::{Request, Response, Status};

use crate::JobTracker;

#[tonic::async_trait]
impl JobTrackerService for JobTracker {
    async fn create_job(
        &self,
        _request: Request<CreateJobRequest>,
    ) -> Result<Response<CreateJobResponse>, Status> {
        Err(not_built("JobTrackerService.CreateJob"))
    }

    async fn get_job(
        &self,
        _request: Request<GetJobRequest>,
    ) -> Result<Response<GetJobResponse>, Status> {
        Err(not_built("JobTrackerService.GetJob"))
    }

    async fn list_jobs(
        &self,
        _request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Err(not_built("JobTrackerService.ListJobs"))
    }

    async fn update_job(
        &self,
        _request: Request<UpdateJobRequest>,
    ) -> Result<Response<UpdateJobResponse>, Status> {
        Err(not_built("JobTrackerService.UpdateJob"))
    }

    async fn start_run(
        &self,
        _request: Request<StartRunRequest>,
    ) -> Result<Response<StartRunResponse>, Status> {
        Err(not_built("JobTrackerService.StartRun"))
    }

    async fn get_run(
        &self,
        _request: Request<GetRunRequest>,
    ) -> Result<Response<GetRunResponse>, Status> {
        Err(not_built("JobTrackerService.GetRun"))
    }

    async fn list_runs(
        &self,
        _request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        Err(not_built("JobTrackerService.ListRuns"))
    }

    async fn add_units(
        &self,
        _request: Request<AddUnitsRequest>,
    ) -> Result<Response<AddUnitsResponse>, Status> {
        Err(not_built("JobTrackerService.AddUnits"))
    }

    async fn list_units(
        &self,
        _request: Request<ListUnitsRequest>,
    ) -> Result<Response<ListUnitsResponse>, Status> {
        Err(not_built("JobTrackerService.ListUnits"))
    }

    async fn claim_unit(
        &self,
        _request: Request<ClaimUnitRequest>,
    ) -> Result<Response<ClaimUnitResponse>, Status> {
        Err(not_built("JobTrackerService.ClaimUnit"))
    }

    async fn heartbeat(
        &self,
        _request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Err(not_built("JobTrackerService.Heartbeat"))
    }

    async fn checkpoint(
        &self,
        _request: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointResponse>, Status> {
        Err(not_built("JobTrackerService.Checkpoint"))
    }

    async fn complete_unit(
        &self,
        _request: Request<CompleteUnitRequest>,
    ) -> Result<Response<CompleteUnitResponse>, Status> {
        Err(not_built("JobTrackerService.CompleteUnit"))
    }

    async fn fail_unit(
        &self,
        _request: Request<FailUnitRequest>,
    ) -> Result<Response<FailUnitResponse>, Status> {
        Err(not_built("JobTrackerService.FailUnit"))
    }

    async fn complete_run(
        &self,
        _request: Request<CompleteRunRequest>,
    ) -> Result<Response<CompleteRunResponse>, Status> {
        Err(not_built("JobTrackerService.CompleteRun"))
    }

    async fn fail_run(
        &self,
        _request: Request<FailRunRequest>,
    ) -> Result<Response<FailRunResponse>, Status> {
        Err(not_built("JobTrackerService.FailRun"))
    }

    async fn acknowledge_failure(
        &self,
        _request: Request<AcknowledgeFailureRequest>,
    ) -> Result<Response<AcknowledgeFailureResponse>, Status> {
        Err(not_built("JobTrackerService.AcknowledgeFailure"))
    }

    type WatchRunStream = BoxStream<WatchRunResponse>;

    async fn watch_run(
        &self,
        _request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        Err(not_built("JobTrackerService.WatchRun"))
    }

    async fn list_transitions(
        &self,
        _request: Request<ListTransitionsRequest>,
    ) -> Result<Response<ListTransitionsResponse>, Status> {
        Err(not_built("JobTrackerService.ListTransitions"))
    }

    async fn set_route(
        &self,
        _request: Request<SetRouteRequest>,
    ) -> Result<Response<SetRouteResponse>, Status> {
        Err(not_built("JobTrackerService.SetRoute"))
    }

    async fn get_route(
        &self,
        _request: Request<GetRouteRequest>,
    ) -> Result<Response<GetRouteResponse>, Status> {
        Err(not_built("JobTrackerService.GetRoute"))
    }

    type WatchRoutesStream = BoxStream<WatchRoutesResponse>;

    async fn watch_routes(
        &self,
        _request: Request<WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        Err(not_built("JobTrackerService.WatchRoutes"))
    }
}
