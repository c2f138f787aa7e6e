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

/// The job-tracker meets store faults through its KV store, where a failed
/// condition is its compare-and-set conflict (retried inside the engine, not
/// a caller's precondition); every other fault keeps the table's code.
#[test]
fn the_job_trackers_store_faults_keep_the_tables_codes() {
    for (fault, code) in faults() {
        if matches!(fault(), ConnectorError::Precondition(_)) {
            continue;
        }
        let kv = job_tracker::kv::KvError::from(fault());
        let status = Status::from(job_tracker::error::TrackerError::from(kv));
        assert_eq!(status.code(), code, "{status:?} for {:?}", fault());
        assert!(!status.message().contains("secret detail"), "{status:?}");
    }
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
