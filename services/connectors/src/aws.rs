//! What the AWS backends (DynamoDB, DynamoDB Streams, S3) share: one way to
//! build an SDK configuration and one classification of SDK errors.

use std::time::Duration;

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use aws_smithy_types::timeout::TimeoutConfig;

use crate::error::ConnectorError;

/// Builds an SDK configuration from the standard AWS environment
/// (`AWS_REGION`, credentials chain, `AWS_ENDPOINT_URL`), with an explicit
/// endpoint override when one is configured.
pub async fn sdk_config(endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(url) = endpoint.filter(|u| !u.is_empty()) {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// The longest one attempt of a DynamoDB or DynamoDB Streams call may
/// take. The SDK sets none, so a request whose answer never comes (a
/// connection half-open after a network fault, a hung endpoint) would hold
/// its unit forever while the unit's heartbeat keeps the lease alive and no
/// other worker may take it over. Bounded, the attempt fails as a timeout,
/// which is retried. Real calls take milliseconds; a Scan page of 1 MB well
/// under a second.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

/// `timeouts` with `attempt` as its attempt timeout when it sets none; an
/// attempt timeout set (or disabled) in the SDK configuration is kept.
pub fn bounded_attempts(timeouts: Option<&TimeoutConfig>, attempt: Duration) -> TimeoutConfig {
    let mut out = timeouts
        .cloned()
        .unwrap_or_else(|| TimeoutConfig::builder().build());
    out.take_defaults_from(
        &TimeoutConfig::builder()
            .operation_attempt_timeout(attempt)
            .build(),
    );
    out
}

/// Maps an SDK error to a [`ConnectorError`] by its error code and status.
pub fn classify<E>(backend: &'static str, err: &SdkError<E, HttpResponse>) -> ConnectorError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let retryable = |message: String| ConnectorError::Retryable {
        backend,
        message,
        retry_after: None,
    };
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            retryable(format!("{err:?}"))
        }
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or_default();
            let message = format!("{code}: {}", e.message().unwrap_or_default());
            match code {
                "ConditionalCheckFailedException" => ConnectorError::Precondition(message),
                "TransactionCanceledException" if message.contains("ConditionalCheckFailed") => {
                    ConnectorError::Precondition(message)
                }
                "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded" => {
                    crate::capacity::record_throttled();
                    retryable(message)
                }
                "LimitExceededException"
                | "InternalServerError"
                | "InternalFailure"
                | "ServiceUnavailable"
                | "TransactionConflictException"
                | "TransactionInProgressException"
                | "TransactionCanceledException" => retryable(message),
                "ResourceNotFoundException" => ConnectorError::NotFound { backend, message },
                "ValidationException" | "SerializationException" => {
                    ConnectorError::InvalidInput { backend, message }
                }
                "ExpiredIteratorException" | "TrimmedDataAccessException" => {
                    ConnectorError::IteratorExpired { backend }
                }
                _ if service.raw().status().is_server_error() => retryable(message),
                _ => ConnectorError::Terminal { backend, message },
            }
        }
        _ => ConnectorError::Terminal {
            backend,
            message: err.to_string(),
        },
    }
}
