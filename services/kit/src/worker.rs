//! Work by pull (DESIGN.md §2, "How work flows"): a worker process claims
//! units of the job kinds it executes from the job-tracker, holds each one
//! with a lease it keeps alive, and checkpoints, completes or fails it with
//! the unit's fencing token. The replicator and the verifier both run this
//! loop; what a unit means is up to their executor.
//!
//! A unit whose lease is lost (the heartbeat is refused because another
//! worker took it over after an expiry, or its run was failed) has its
//! [`UnitLease::lost`] token cancelled: the executor stops writing, since
//! every further write of its would be refused anyway.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::job_tracker::v1::{
    CheckpointRequest, ClaimUnitRequest, CompleteUnitRequest, FailUnitRequest, HeartbeatRequest,
    Job, JobKind, Run, RunEnd, RunProgress, Unit,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tower::util::MapErr;

/// The job-tracker as seen by a worker: a lazily connected channel with the
/// bearer token on every call.
pub type JobTrackerClient =
    JobTrackerServiceClient<InterceptedService<MapErr<Channel, NameTimeout>, BearerToken>>;

type NameTimeout = fn(tonic::transport::Error) -> Status;

/// A call that its deadline ended on this side is `DEADLINE_EXCEEDED`, as
/// the job-tracker itself would have answered, not the `CANCELLED` tonic
/// reports it as (which no caller would retry or recognise).
fn name_timeout(error: tonic::transport::Error) -> Status {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return Status::deadline_exceeded(
                "the job-tracker did not answer within the call's deadline",
            );
        }
        source = e.source();
    }
    Status::from_error(Box::new(error))
}

/// The deadline of a call to the job-tracker made outside any RPC (a
/// worker's heartbeat, checkpoint or claim) that sets none of its own: the
/// job-tracker's own request timeout, past which it gives up anyway.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Adds `authorization: Bearer <token>` to outgoing calls when configured,
/// the caller's trace, and the call's deadline as `grpc-timeout` (which
/// tonic's channel also enforces on this side): what is left of the RPC
/// being served ([`tidemark_connectors::deadline`]), else the request's
/// own, else [`DEFAULT_CALL_TIMEOUT`].
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.0 {
            request.metadata_mut().insert("authorization", h.clone());
        }
        crate::trace_context::inject(request.metadata_mut());
        if !propagate_deadline(&mut request)? && !request.metadata().contains_key("grpc-timeout") {
            request.set_timeout(DEFAULT_CALL_TIMEOUT);
        }
        Ok(request)
    }
}

/// Gives an outgoing call what is left of the deadline of the RPC being
/// served ([`tidemark_connectors::deadline`]) as its `grpc-timeout`;
/// `false` outside any RPC (the call keeps its own deadline, if any).
///
/// # Errors
/// `DEADLINE_EXCEEDED` when that deadline has passed: nothing is sent.
pub fn propagate_deadline(request: &mut Request<()>) -> Result<bool, Status> {
    match tidemark_connectors::deadline::remaining() {
        Some(left) if left.is_zero() => Err(Status::deadline_exceeded(
            "the deadline of the RPC being served passed before the downstream call was made",
        )),
        Some(left) => {
            request.set_timeout(left);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Connects lazily to the job-tracker at `url` (the first call dials).
///
/// # Errors
/// A malformed URL or token.
pub fn job_tracker_client(url: &str, token: Option<&str>) -> Result<JobTrackerClient, String> {
    let endpoint = Endpoint::from_str(url)
        .map_err(|e| format!("bad job-tracker URL {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        // No channel-wide timeout: each call carries its own deadline
        // (`BearerToken`).
        // A connection that stops answering (a node gone from the network,
        // a hung proxy) is found out by its pings within 4 s and replaced,
        // rather than holding every call, heartbeats included, until TCP
        // gives up.
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let header = token
        .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>())
        .transpose()
        .map_err(|_| "the auth token cannot be sent in a header".to_owned())?;
    Ok(JobTrackerServiceClient::with_interceptor(
        MapErr::new(endpoint.connect_lazy(), name_timeout as NameTimeout),
        BearerToken(header),
    ))
}

/// Packs `message` as a `google.protobuf.Any` with the type URL
/// `type.googleapis.com/<full_name>`.
pub fn pack_any<M: Message>(full_name: &str, message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{full_name}"),
        value: message.encode_to_vec(),
    }
}

/// Unpacks an `Any` that must hold `full_name`.
///
/// # Errors
/// A missing spec, another type, or bytes that do not decode.
pub fn unpack_any<M: Message + Default>(
    any: Option<&prost_types::Any>,
    full_name: &str,
) -> Result<M, String> {
    let any = any.ok_or_else(|| format!("the job has no spec (expected a {full_name})"))?;
    let found = any.type_url.rsplit('/').next().unwrap_or_default();
    if found != full_name {
        return Err(format!(
            "the job's spec is a {found:?}, expected a {full_name}"
        ));
    }
    M::decode(any.value.as_slice())
        .map_err(|e| format!("the job's {full_name} does not decode: {e}"))
}

/// Progress totals reported with checkpoints and at the end of a unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub items_processed: i64,
    pub items_failed: i64,
    pub items_estimated: i64,
    pub counters: std::collections::HashMap<String, i64>,
}

impl Progress {
    /// Adds `n` to counter `name`.
    pub fn add(&mut self, name: &str, n: i64) {
        *self.counters.entry(name.to_owned()).or_default() += n;
    }

    pub fn counter(&self, name: &str) -> i64 {
        self.counters.get(name).copied().unwrap_or_default()
    }
}

/// Why a unit's write to the job-tracker was refused.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The fencing token is stale, the unit left IN_PROGRESS or its run ended:
    /// this worker must stop working on the unit.
    #[error("lease lost: {0}")]
    Lost(String),
    /// The job-tracker could not be reached or failed; retrying may help.
    #[error("job-tracker call failed: {0}")]
    Rpc(Status),
}

impl From<Status> for LeaseError {
    fn from(s: Status) -> Self {
        if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) {
            Self::Lost(s.message().to_owned())
        } else {
            Self::Rpc(s)
        }
    }
}

/// A claimed unit: what to do (job spec, run window, checkpoint) and the
/// lease to do it under.
pub struct Claim {
    pub unit: Unit,
    pub run: Run,
    pub job: Job,
    pub lease: UnitLease,
    /// The unit's place among the worker's `concurrency`.
    pub slot: Slot,
}

impl Claim {
    /// Attempts the job allows a unit before the job-tracker sets it FAILED
    /// (its `max_attempts`; 0 means 3).
    pub fn max_attempts(&self) -> u32 {
        match self.job.max_attempts {
            0 => 3,
            n => n,
        }
    }

    /// Whether a failure of this attempt ends the unit FAILED: the
    /// job-tracker puts a unit back in the queue only after a retryable
    /// failure with attempts left.
    pub fn failure_is_final(&self, retryable: bool) -> bool {
        !retryable || self.unit.attempts >= self.max_attempts()
    }
}

/// A claimed unit's place among the units a worker runs at once. A unit
/// that runs for as long as its job does (a pipeline's change-feed
/// follower) gives it back with [`Slot::release`]: otherwise a worker
/// holding as many followers as its concurrency would never claim the
/// finite units (backfill segments) those same jobs wait for.
#[derive(Clone)]
pub struct Slot(Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>);

impl Slot {
    /// Frees the place: the worker claims another unit beside this one.
    pub fn release(&self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// The held lease of one unit. Cheap to clone; a background task extends it
/// until the unit is completed or failed, or the lease is lost.
#[derive(Clone)]
pub struct UnitLease {
    client: JobTrackerClient,
    run_id: String,
    unit_key: String,
    fencing_token: u64,
    lease_duration: Duration,
    job_revision: Arc<AtomicU64>,
    /// When the job-tracker last confirmed the lease (claim, heartbeat or
    /// checkpoint), on this process's monotonic clock.
    confirmed: Arc<std::sync::Mutex<tokio::time::Instant>>,
    lost: CancellationToken,
    done: CancellationToken,
}

impl UnitLease {
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn unit_key(&self) -> &str {
        &self.unit_key
    }

    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Cancelled once the lease is lost or the worker shuts down.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// The job's latest revision seen by a heartbeat or checkpoint; higher
    /// than the claimed job's when the spec changed (re-read it).
    pub fn job_revision(&self) -> u64 {
        self.job_revision.load(Ordering::Relaxed)
    }

    fn duration(&self) -> prost_types::Duration {
        prost_types::Duration {
            seconds: i64::try_from(self.lease_duration.as_secs()).unwrap_or(600),
            nanos: 0,
        }
    }

    /// Stores the unit's checkpoint and totals; durable when it returns.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when the lease was taken over.
    pub async fn checkpoint(
        &self,
        checkpoint: Vec<u8>,
        progress: &Progress,
    ) -> Result<(), LeaseError> {
        let request = CheckpointRequest {
            run_id: self.run_id.clone(),
            unit_key: self.unit_key.clone(),
            fencing_token: self.fencing_token,
            checkpoint,
            items_processed: progress.items_processed,
            items_failed: progress.items_failed,
            items_estimated: progress.items_estimated,
            counters: progress.counters.clone(),
            lease_duration: Some(self.duration()),
        };
        // The same checkpoint under the same token: safe to send again.
        let response = self
            .tracker()
            .retried("checkpoint", request, |mut c, r| async move {
                c.checkpoint(r).await
            })
            .await
            .inspect_err(|s| self.on_error(s))?;
        self.job_revision
            .fetch_max(response.job_revision, Ordering::Relaxed);
        self.confirm();
        Ok(())
    }

    /// The job-tracker with its retries of unreachable answers.
    fn tracker(&self) -> crate::jobs::JobTracker {
        crate::jobs::JobTracker::new(self.client.clone())
    }

    /// Records that the job-tracker extended the lease just now.
    fn confirm(&self) {
        *self.confirmed.lock().expect("lease clock lock") = tokio::time::Instant::now();
    }

    /// How long the lease may still be ours for sure: its length minus the
    /// time since the job-tracker last confirmed it, minus a margin for clock
    /// drift and the call that confirmed it. At zero another worker may hold
    /// the unit, so this one must stop writing.
    pub fn time_left(&self) -> Duration {
        let since = self.confirmed.lock().expect("lease clock lock").elapsed();
        (self.lease_duration - self.lease_duration / 5).saturating_sub(since)
    }

    /// Proves the lease is still this worker's before a destructive step
    /// (removing a copy, switching a route): a heartbeat under the fencing
    /// token, sent now rather than trusted from the last beat (a paused
    /// process does not know its lease lapsed and another worker took the
    /// unit over). Returns how long the step may take: the lease's certain
    /// time left after the confirmation.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] (and `lost()` cancelled) when another worker
    /// holds the unit, the run ended, or the lease cannot be confirmed with
    /// time left; [`LeaseError::Rpc`] when the job-tracker did not answer.
    pub async fn fence(&self) -> Result<Duration, LeaseError> {
        if self.lost.is_cancelled() || self.done.is_cancelled() {
            return Err(LeaseError::Lost(
                "the unit's lease is no longer held".to_owned(),
            ));
        }
        let request = HeartbeatRequest {
            run_id: self.run_id.clone(),
            unit_key: self.unit_key.clone(),
            fencing_token: self.fencing_token,
            lease_duration: Some(self.duration()),
        };
        let sent = tokio::time::Instant::now();
        let mut client = self.client.clone();
        let response = client.heartbeat(request).await.map_err(|s| {
            self.on_error(&s);
            LeaseError::from(s)
        })?;
        self.job_revision
            .fetch_max(response.into_inner().job_revision, Ordering::Relaxed);
        // The extension counts from before the call was sent.
        *self.confirmed.lock().expect("lease clock lock") = sent;
        let left = self.time_left();
        if left.is_zero() {
            self.lost.cancel();
            return Err(LeaseError::Lost(
                "the heartbeat confirming the unit's lease came back too late to act on it"
                    .to_owned(),
            ));
        }
        Ok(left)
    }

    /// Before each destructive write: goes on while at least half the lease
    /// is certainly left, and otherwise confirms the lease with
    /// [`Self::fence`] first. A process that was paused past its lease finds
    /// its time left at zero here and is refused by the job-tracker if
    /// another worker took the unit over.
    ///
    /// # Errors
    /// As [`Self::fence`].
    pub async fn hold(&self) -> Result<(), LeaseError> {
        if !self.lost.is_cancelled() && self.time_left() >= self.lease_duration / 2 {
            return Ok(());
        }
        self.fence().await.map(drop)
    }

    /// Marks the unit done.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when the lease was taken over.
    pub async fn complete(
        &self,
        progress: &Progress,
        result: Option<prost_types::Any>,
    ) -> Result<Option<RunProgress>, LeaseError> {
        self.complete_with(progress, result, false, None).await
    }

    /// Completes the unit of an explicit-completion run and says, in the
    /// same write, how the run ends once no unit is left open: the
    /// job-tracker then ends it with this unit's `result`, even if this
    /// worker dies before it could call CompleteRun.
    ///
    /// # Errors
    /// As [`Self::complete`].
    pub async fn complete_and_end_run(
        &self,
        progress: &Progress,
        result: Option<prost_types::Any>,
        end_run: RunEnd,
    ) -> Result<Option<RunProgress>, LeaseError> {
        self.complete_with(progress, result, false, Some(end_run))
            .await
    }

    /// Completes the unit and, in the same write, switches its route to
    /// TARGET (a migrated unit's readers move exactly when it is committed).
    ///
    /// # Errors
    /// As [`Self::complete`].
    pub async fn complete_and_route(
        &self,
        progress: &Progress,
    ) -> Result<Option<RunProgress>, LeaseError> {
        self.complete_with(progress, None, true, None).await
    }

    async fn complete_with(
        &self,
        progress: &Progress,
        result: Option<prost_types::Any>,
        route_to_target: bool,
        end_run: Option<RunEnd>,
    ) -> Result<Option<RunProgress>, LeaseError> {
        let request = CompleteUnitRequest {
            run_id: self.run_id.clone(),
            unit_key: self.unit_key.clone(),
            fencing_token: self.fencing_token,
            items_processed: progress.items_processed,
            items_failed: progress.items_failed,
            counters: progress.counters.clone(),
            result,
            route_to_target,
            end_run,
        };
        // Sent again only when the answer did not arrive; had the first one
        // been applied, the repeat is answered with the unit unchanged.
        let response = self
            .tracker()
            .retried("complete_unit", request, |mut c, r| async move {
                c.complete_unit(r).await
            })
            .await
            .inspect_err(|s| self.on_error(s))?;
        self.done.cancel();
        Ok(response.progress)
    }

    /// Reports the unit failed. `retryable`: back to NOT_MIGRATED while
    /// attempts remain; `rolled_back`: its partial output was removed.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when the lease was taken over.
    pub async fn fail(
        &self,
        error: &str,
        retryable: bool,
        rolled_back: bool,
        progress: &Progress,
    ) -> Result<Unit, LeaseError> {
        let request = FailUnitRequest {
            run_id: self.run_id.clone(),
            unit_key: self.unit_key.clone(),
            fencing_token: self.fencing_token,
            error: error.to_owned(),
            retryable,
            rolled_back,
            items_processed: progress.items_processed,
            items_failed: progress.items_failed,
            counters: progress.counters.clone(),
        };
        let response = self
            .tracker()
            .retried("fail_unit", request, |mut c, r| async move {
                c.fail_unit(r).await
            })
            .await
            .inspect_err(|s| self.on_error(s))?;
        self.done.cancel();
        Ok(response.unit.unwrap_or_default())
    }

    fn on_error(&self, status: &Status) {
        if matches!(status.code(), Code::FailedPrecondition | Code::NotFound) {
            self.lost.cancel();
        }
    }

    /// Extends the lease every third of its length until the unit is done or
    /// the lease is lost. When heartbeats keep failing, the lease is given up
    /// locally before it can expire at the job-tracker (see
    /// [`Self::time_left`]): past that point another worker may have claimed
    /// the unit, and two writers must never work on one unit.
    async fn keep_alive(self) {
        let period = self.lease_duration / 3;
        loop {
            // Beat early enough that one failed beat still leaves time for
            // another before the lease can lapse.
            let wait = period.min(self.time_left() / 2);
            tokio::select! {
                () = self.done.cancelled() => return,
                () = self.lost.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            if self.time_left().is_zero() {
                tracing::warn!(run_id = %self.run_id, unit = %self.unit_key, "unit lease not confirmed in time; giving it up");
                self.lost.cancel();
                return;
            }
            let request = HeartbeatRequest {
                run_id: self.run_id.clone(),
                unit_key: self.unit_key.clone(),
                fencing_token: self.fencing_token,
                lease_duration: Some(self.duration()),
            };
            let mut client = self.client.clone();
            // One beat waits at most a period: a beat stuck on a dead
            // connection must leave time for the next one.
            let bound = period.min(self.time_left());
            match tokio::time::timeout(bound, client.heartbeat(request)).await {
                Ok(Ok(r)) => {
                    self.job_revision
                        .fetch_max(r.into_inner().job_revision, Ordering::Relaxed);
                    self.confirm();
                }
                Ok(Err(s)) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
                    tracing::warn!(run_id = %self.run_id, unit = %self.unit_key, reason = %s.message(), "unit lease lost");
                    self.lost.cancel();
                    return;
                }
                // The next beat may get through before the lease runs out.
                Ok(Err(s)) => {
                    tracing::debug!(run_id = %self.run_id, unit = %self.unit_key, error = %s, "heartbeat failed");
                }
                Err(_) => {
                    tracing::debug!(run_id = %self.run_id, unit = %self.unit_key, "heartbeat timed out");
                }
            }
        }
    }
}

/// How a worker claims.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Unique per process; shown as the lease owner.
    pub worker_id: String,
    /// The job kinds this worker executes.
    pub kinds: Vec<JobKind>,
    /// Units worked on at once by this process.
    pub concurrency: usize,
    /// Lease length; heartbeats every third of it.
    pub lease: Duration,
    /// How long one ClaimUnit call waits for work.
    pub poll_wait: Duration,
}

impl WorkerOptions {
    pub fn new(worker_id: impl Into<String>, kinds: Vec<JobKind>) -> Self {
        Self {
            worker_id: worker_id.into(),
            kinds,
            concurrency: 4,
            lease: Duration::from_secs(15),
            poll_wait: Duration::from_secs(2),
        }
    }
}

/// What a worker does with a claimed unit. It must finish the unit itself
/// (complete or fail) or return once `claim.lease.lost()` is cancelled.
pub type Executor = Arc<dyn Fn(Claim) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Claims units until `shutdown`, running each with `executor`, at most
/// `options.concurrency` at once. Unreachable job-trackers are retried with
/// backoff (the worker may start before it).
pub async fn run_worker(
    client: JobTrackerClient,
    options: WorkerOptions,
    executor: Executor,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let request = ClaimUnitRequest {
            worker_id: options.worker_id.clone(),
            kinds: options.kinds.iter().map(|k| *k as i32).collect(),
            lease_duration: Some(prost_types::Duration {
                seconds: i64::try_from(options.lease.as_secs().max(1)).unwrap_or(30),
                nanos: 0,
            }),
            wait: Some(prost_types::Duration {
                seconds: i64::try_from(options.poll_wait.as_secs()).unwrap_or(2),
                nanos: i32::try_from(options.poll_wait.subsec_nanos()).unwrap_or(0),
            }),
            ..ClaimUnitRequest::default()
        };
        let mut claimer = client.clone();
        // The lease runs from before the claim was sent: the job-tracker may
        // have started it any time after.
        let claimed_at = tokio::time::Instant::now();
        // The claim may wait `poll_wait` for work before it answers.
        let mut request = Request::new(request);
        request.set_timeout(options.poll_wait + DEFAULT_CALL_TIMEOUT);
        let claimed = tokio::select! {
            () = shutdown.cancelled() => break,
            r = claimer.claim_unit(request) => r,
        };
        let response = match claimed {
            Ok(r) => {
                backoff = Duration::from_millis(100);
                r.into_inner()
            }
            Err(status) => {
                tracing::debug!(error = %status, "claim failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (Some(unit), Some(run), Some(job)) = (response.unit, response.run, response.job) else {
            continue;
        };
        let lease = UnitLease {
            client: client.clone(),
            run_id: unit.run_id.clone(),
            unit_key: unit.unit_key.clone(),
            fencing_token: unit.lease.as_ref().map_or(0, |l| l.fencing_token),
            lease_duration: options.lease.max(Duration::from_secs(1)),
            job_revision: Arc::new(AtomicU64::new(job.revision)),
            confirmed: Arc::new(std::sync::Mutex::new(claimed_at)),
            lost: shutdown.child_token(),
            done: CancellationToken::new(),
        };
        tracing::info!(job = %job.name, run_id = %unit.run_id, unit = %unit.unit_key, attempt = unit.attempts, "claimed unit");
        tasks.spawn(lease.clone().keep_alive());
        let done = lease.done.clone();
        let slot = Slot(Arc::new(std::sync::Mutex::new(Some(permit))));
        let work = tokio::spawn(executor(Claim {
            unit,
            run,
            job,
            lease,
            slot: slot.clone(),
        }));
        tasks.spawn(async move {
            // However the executor ended (finished the unit, failed to report
            // it, or panicked), the unit is no longer worked on here: stop
            // its heartbeats so its lease lapses and another worker resumes
            // it from the checkpoint.
            if let Err(e) = work.await {
                tracing::error!(error = %e, "unit executor panicked");
            }
            done.cancel();
            slot.release();
        });
        // Reap finished tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
    }
    // Executors see their `lost` token cancelled and return; their units'
    // leases lapse and another replica resumes them from the checkpoints.
    while tasks.join_next().await.is_some() {}
}
