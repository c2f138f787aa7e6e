//! The client's one error type.

use std::time::Duration;

use tonic::Status;

use crate::cutover::report::CutoverError;
use crate::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Rpc(#[from] Status),
    /// A wait (for a run, a report, a pipeline state) ran past its deadline.
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    /// A stream ended before it reached what it was followed for.
    #[error("{0}")]
    StreamEnded(String),
    /// A cut-over aborted; writers were resumed and the route left alone.
    #[error(transparent)]
    Cutover(Box<CutoverError>),
    /// A plan or spec that cannot be sent as it is.
    #[error(transparent)]
    Spec(#[from] SpecError),
}

pub type ClientResult<T> = Result<T, ClientError>;
