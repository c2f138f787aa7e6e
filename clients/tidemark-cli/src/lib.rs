//! The `tidemark` command line, as a library so tests can drive the same
//! code paths (for example the `dev` host) in process.

pub mod dev;
pub mod jobs;
pub mod output;
