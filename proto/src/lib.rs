//! The Tidemark v1 API. Generated from `proto/` at build time.
#![allow(clippy::all, clippy::pedantic, unused_qualifications, missing_docs)]

/// Encoded `FileDescriptorSet` of every Tidemark proto, for server reflection
/// and for clients that build requests dynamically.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tidemark_descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("tidemark.common.v1");
    }
}
pub mod job_tracker {
    pub mod v1 {
        tonic::include_proto!("tidemark.job_tracker.v1");
    }
}
pub mod replicator {
    pub mod v1 {
        tonic::include_proto!("tidemark.replicator.v1");
    }
}
pub mod stats_aggregator {
    pub mod v1 {
        tonic::include_proto!("tidemark.stats_aggregator.v1");
    }
}
pub mod verifier {
    pub mod v1 {
        tonic::include_proto!("tidemark.verifier.v1");
    }
}
