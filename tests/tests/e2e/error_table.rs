//! One error table (services/kit/src/error.rs): every kind of store fault
//! reaches a client with the same code from every service, and no backend
//! detail rides along in the message.

use tidemark_connectors::ConnectorError;
use tidemark_kit::ServiceError;
use tonic::{Code, Status};

/// Every kind of connector fault, with the code the table gives it. The
/// backend's own words ("secret detail") must never reach the caller.
fn faults() -> Vec<(fn() -> ConnectorError, Code)> {
    vec![
        (
            || ConnectorError::Retryable {
                backend: "dynamodb",
                message: "ThrottlingException: secret detail".into(),
                retry_after: None,
            },
            Code::Unavailable,
        ),
        (
            || ConnectorError::IteratorExpired {
                backend: "dynamodb-streams",
            },
            Code::Unavailable,
        ),
        (
            || ConnectorError::Precondition("the target holds a newer version".into()),
            Code::FailedPrecondition,
        ),
        (
            || ConnectorError::NotFound {
                backend: "dynamodb",
                message: "table orders does not exist".into(),
            },
            Code::NotFound,
        ),
        (
            || ConnectorError::invalid("dynamodb", "key attribute id is missing"),
            Code::InvalidArgument,
        ),
        (
            || ConnectorError::terminal("s3", "AccessDenied: secret detail"),
            Code::Internal,
        ),
    ]
}

/// The status each service answers for `fault`, as its RPCs build it.
fn per_service(fault: fn() -> ConnectorError) -> Vec<(&'static str, Status)> {
    vec![
        ("kit", Status::from(ServiceError::from(fault()))),
        (
            "stats-aggregator",
            Status::from(stats_aggregator::StatsError::Backend(fault())),
        ),
        (
            "verifier",
            Status::from(verifier::VerifierError::from(fault())),
        ),
        (
            "replicator",
            Status::from(replicator::ReplicatorError::from(fault())),
        ),
        (
            "job-tracker",
            Status::from(job_tracker::error::TrackerError::from(fault())),
        ),
    ]
}

#[test]
fn the_same_store_fault_gives_the_same_code_from_every_service() {
    for (fault, code) in faults() {
        for (service, status) in per_service(fault) {
            assert_eq!(
                status.code(),
                code,
                "{service} answered {status:?} for {:?}",
                fault()
            );
            assert!(
                !status.message().contains("secret detail"),
                "{service} leaked backend detail: {status:?}"
            );
        }
    }
}
