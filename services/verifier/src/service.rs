//! `VerifierService` RPCs. Those not built yet answer `UNIMPLEMENTED` naming the RPC.

use tidemark_kit::rpc::{BoxStream, not_built};
use tidemark_proto::verifier::v1::verifier_service_server::VerifierService;
use tidemark_proto::verifier::v1::*;
use tonic::{Request, Response, Status};

use crate::Verifier;

#[tonic::async_trait]
impl VerifierService for Verifier {
    async fn start_verification(
        &self,
        _request: Request<StartVerificationRequest>,
    ) -> Result<Response<StartVerificationResponse>, Status> {
        Err(not_built("VerifierService.StartVerification"))
    }

    async fn get_report(
        &self,
        _request: Request<GetReportRequest>,
    ) -> Result<Response<GetReportResponse>, Status> {
        Err(not_built("VerifierService.GetReport"))
    }

    type StreamMismatchesStream = BoxStream<StreamMismatchesResponse>;

    async fn stream_mismatches(
        &self,
        _request: Request<StreamMismatchesRequest>,
    ) -> Result<Response<Self::StreamMismatchesStream>, Status> {
        Err(not_built("VerifierService.StreamMismatches"))
    }
}
