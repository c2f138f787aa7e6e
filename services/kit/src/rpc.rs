//! Small helpers shared by every service's RPC implementations.

use std::pin::Pin;

use futures::Stream;
use tonic::Status;

/// The response stream type of server-streaming RPCs.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// `UNIMPLEMENTED` for an RPC of the published API that this release does
/// not serve yet, naming it so a caller knows it is not their mistake.
pub fn not_built(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not implemented in this release of Tidemark"
    ))
}
