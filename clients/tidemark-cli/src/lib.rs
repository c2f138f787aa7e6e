//! The `tidemark` command line, as a library so tests can drive the same
//! code paths (for example the `dev` host) in process.

/// An idempotent call retried on UNAVAILABLE: each attempt moves its own
/// clone of the client and request into the future.
macro_rules! retried {
    ($client:expr, $svc:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $client
            .idempotent(|| {
                let mut svc = $svc.clone();
                let req = req.clone();
                async move { svc.$method(req).await }
            })
            .await
    }};
}

pub mod cli;
pub mod cutover;
pub mod dev;
pub mod docs;
pub mod error;
pub mod health;
pub mod jobs;
pub mod output;
pub mod progress;
pub mod replicate;
pub mod seed;
pub mod stats;
pub mod target;
pub mod verify;
pub mod work;
