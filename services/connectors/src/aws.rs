//! What the AWS backends (DynamoDB, DynamoDB Streams, S3) share: one way to
//! build an SDK configuration and one classification of SDK errors.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

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
