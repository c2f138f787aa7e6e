//! Typed async client over the four Tidemark services: one connection, a
//! bearer token on every call, deadlines, and retries with backoff on
//! `UNAVAILABLE` for calls that are safe to repeat.
//!
//! On top of the raw service clients it drives multi-step operations from a
//! distance: [`Tidemark::backfill_attribute`], [`Tidemark::migrate_units`],
//! [`Tidemark::watch_run`], [`Tidemark::watch_lag`], [`Tidemark::verify`] and
//! the bounded cut-over of a [`CutoverPlan`] ([`Tidemark::cutover`]).

mod connect;
pub mod cutover;
mod error;
mod ops;
pub mod spec;

pub use connect::{Auth, Endpoints, Options, Service, Tidemark, is_traceparent, new_traceparent};
pub use cutover::{
    CutoverError, CutoverEvent, CutoverPlan, CutoverReport, LastVerification, Precondition, Step,
    StepOutcome, StepRecord, WindowStatus, verdict_name,
};
pub use error::{ClientError, ClientResult};
pub use ops::{RunOutcome, is_terminal, state_name};
pub use spec::{SpecError, StoreSpec};
pub use tonic_health::pb::health_check_response::ServingStatus;
