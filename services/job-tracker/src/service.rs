//! `JobTrackerService`: validates each request into domain terms, calls the
//! engine, converts the answer back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tidemark_kit::FieldError;
use tidemark_kit::rpc::BoxStream;
use tidemark_proto::job_tracker::v1 as pb;
use tidemark_proto::job_tracker::v1::job_tracker_service_server::JobTrackerService;
use tonic::{Request, Response, Status};

use crate::JobTracker;
use crate::convert::{self, Order, name, required_id, unit_key};
use crate::engine::{ClaimRequest, Fence, StartRun, UnitOutcome};
use crate::model::{Job, Route};

const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The longest `ClaimUnit.wait`; the server lets the RPC run this long
/// past its request timeout.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

fn fence(run_id: &str, key: &str, token: u64) -> Result<Fence, FieldError> {
    if token == 0 {
        return Err(FieldError::new(
            "fencing_token",
            "is required: use the token ClaimUnit returned",
        ));
    }
    Ok(Fence {
        run_id: required_id(run_id, "run_id")?,
        unit_key: unit_key(key, "unit_key")?,
        fencing_token: token,
    })
}

fn actor(actor: &str) -> String {
    if actor.is_empty() {
        "api".to_owned()
    } else {
        actor.to_owned()
    }
}

impl JobTracker {
    async fn job_with_last_run(&self, job: &Job) -> Result<pb::Job, Status> {
        let mut out = pb::Job::from(job);
        if let Some(run_id) = &job.last_run_id {
            let view = self.tracker.get_run(run_id).await?;
            out.last_run = Some(pb::Run::from(&view));
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl JobTrackerService for JobTracker {
    #[tracing::instrument(skip_all, fields(job))]
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        let new = convert::new_job(request.get_ref().job.as_ref())?;
        tracing::Span::current().record("job", new.name.as_str());
        let job = self.tracker.create_job(new, "api").await?;
        Ok(Response::new(pb::CreateJobResponse {
            job: Some(self.job_with_last_run(&job).await?),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let job = self
            .tracker
            .get_job(&name(&request.get_ref().name, "name")?)
            .await?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(self.job_with_last_run(&job).await?),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = request.get_ref();
        let kind = (req.kind != 0)
            .then(|| convert::kind_from(req.kind, "kind"))
            .transpose()?;
        let size = convert::page_size(req.page_size, "page_size")?;
        let after = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
        let (jobs, next) = self.tracker.list_jobs(kind, after, size).await?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in &jobs {
            out.push(self.job_with_last_run(job).await?);
        }
        Ok(Response::new(pb::ListJobsResponse {
            jobs: out,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_job(
        &self,
        request: Request<pb::UpdateJobRequest>,
    ) -> Result<Response<pb::UpdateJobResponse>, Status> {
        let req = request.get_ref();
        let patch = convert::new_job(req.job.as_ref())?;
        let fields = req
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        if fields.is_empty() {
            return Err(FieldError::new(
                "update_mask",
                "list the fields to change, e.g. [\"description\"]",
            )
            .into());
        }
        let job = self
            .tracker
            .update_job(patch, &fields, req.expected_revision, &actor(&req.actor))
            .await?;
        Ok(Response::new(pb::UpdateJobResponse {
            job: Some(self.job_with_last_run(&job).await?),
        }))
    }

    #[tracing::instrument(skip_all, fields(job = %request.get_ref().job_name))]
    async fn start_run(
        &self,
        request: Request<pb::StartRunRequest>,
    ) -> Result<Response<pb::StartRunResponse>, Status> {
        let req = request.into_inner();
        let start = StartRun {
            job_name: name(&req.job_name, "job_name")?,
            units: convert::unit_specs(&req.units, "units")?,
            trigger: convert::trigger_from(req.trigger),
            correlation_id: req.correlation_id.clone(),
            actor: actor(&req.actor),
            reason: req.reason.clone(),
            force_remigrate: req.force_remigrate,
            window_start: req
                .window_start
                .as_ref()
                .map(|t| convert::from_timestamp(t, "window_start"))
                .transpose()?,
            scheduled_time: None,
        };
        let view = self.tracker.start_run(start).await?;
        Ok(Response::new(pb::StartRunResponse {
            run: Some(pb::Run::from(&view)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::GetRunResponse>, Status> {
        let view = self
            .tracker
            .get_run(&required_id(&request.get_ref().run_id, "run_id")?)
            .await?;
        Ok(Response::new(pb::GetRunResponse {
            run: Some(pb::Run::from(&view)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let req = request.get_ref();
        let statuses = req
            .statuses
            .iter()
            .enumerate()
            .map(|(i, s)| convert::run_status_from(*s, &format!("statuses[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let after = convert::page(&req.page_token, "page_token")?;
        let size = convert::page_size(req.page_size, "page_size")?;
        // Newest first: by run id (time-ordered) within a job, by creation
        // time across jobs.
        let (page, next) = if req.job_name.is_empty() {
            let runs = self.tracker.list_all_runs(&statuses).await?;
            convert::paginate(&runs, after.as_deref(), size, Order::Descending, |r| {
                format!(
                    "{:020}/{}",
                    r.create_time.timestamp_micros().max(0),
                    r.run_id
                )
            })
        } else {
            let runs = self
                .tracker
                .list_runs(&name(&req.job_name, "job_name")?, &statuses)
                .await?;
            convert::paginate(&runs, after.as_deref(), size, Order::Descending, |r| {
                r.run_id.clone()
            })
        };
        let mut out = Vec::with_capacity(page.len());
        for run in page {
            out.push(pb::Run::from(&self.tracker.get_run(&run.run_id).await?));
        }
        Ok(Response::new(pb::ListRunsResponse {
            runs: out,
            next_page_token: next,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn add_units(
        &self,
        request: Request<pb::AddUnitsRequest>,
    ) -> Result<Response<pb::AddUnitsResponse>, Status> {
        let req = request.get_ref();
        let units = convert::unit_specs(&req.units, "units")?;
        if units.is_empty() {
            return Err(FieldError::new("units", "must list at least one unit").into());
        }
        let added = self
            .tracker
            .add_units(
                &required_id(&req.run_id, "run_id")?,
                &units,
                &actor(&req.actor),
            )
            .await?;
        Ok(Response::new(pb::AddUnitsResponse {
            units: added.iter().map(pb::Unit::from).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_units(
        &self,
        request: Request<pb::ListUnitsRequest>,
    ) -> Result<Response<pb::ListUnitsResponse>, Status> {
        let req = request.get_ref();
        let statuses = req
            .statuses
            .iter()
            .enumerate()
            .map(|(i, s)| convert::unit_status_from(*s, &format!("statuses[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let units = self
            .tracker
            .list_units_filtered(
                &required_id(&req.run_id, "run_id")?,
                &statuses,
                &req.unit_keys,
            )
            .await?;
        let (page, next) = convert::paginate(
            &units,
            convert::page(&req.page_token, "page_token")?.as_deref(),
            convert::page_size(req.page_size, "page_size")?,
            Order::Ascending,
            |u| u.unit_key.clone(),
        );
        Ok(Response::new(pb::ListUnitsResponse {
            units: page.iter().map(pb::Unit::from).collect(),
            next_page_token: next,
        }))
    }

    #[tracing::instrument(skip_all, fields(worker = %request.get_ref().worker_id))]
    async fn claim_unit(
        &self,
        request: Request<pb::ClaimUnitRequest>,
    ) -> Result<Response<pb::ClaimUnitResponse>, Status> {
        let req = request.get_ref();
        let claim = ClaimRequest {
            worker_id: required_id(&req.worker_id, "worker_id")?,
            kinds: req
                .kinds
                .iter()
                .enumerate()
                .map(|(i, k)| convert::kind_from(*k, &format!("kinds[{i}]")))
                .collect::<Result<_, _>>()?,
            job_name: req.job_name.clone(),
            run_id: req.run_id.clone(),
            unit_key: req.unit_key.clone(),
            lease: convert::lease_duration(req.lease_duration.as_ref(), DEFAULT_LEASE)?,
            wait: convert::from_duration(req.wait.as_ref(), "wait", Duration::ZERO)?,
        };
        if claim.wait > MAX_WAIT {
            return Err(FieldError::new("wait", "must be at most 60s").into());
        }
        if !claim.unit_key.is_empty() && claim.run_id.is_empty() {
            return Err(FieldError::new("run_id", "is required when unit_key is given").into());
        }
        let claimed = self.tracker.claim_unit(&claim).await?;
        Ok(Response::new(match claimed {
            Some(c) => pb::ClaimUnitResponse {
                unit: Some(pb::Unit::from(&c.unit)),
                run: Some(convert::run_to(&c.run, None, None)),
                job: Some(pb::Job::from(&c.job)),
            },
            None => pb::ClaimUnitResponse::default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.get_ref();
        let fence = fence(&req.run_id, &req.unit_key, req.fencing_token)?;
        let lease = convert::lease_duration(req.lease_duration.as_ref(), DEFAULT_LEASE)?;
        let (lease, job_revision) = self.tracker.heartbeat(&fence, lease).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            lease: Some(convert::lease_to(&lease)),
            job_revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let req = request.get_ref();
        let fence = fence(&req.run_id, &req.unit_key, req.fencing_token)?;
        let checkpoint = convert::checkpoint_bytes(&req.checkpoint)?;
        let progress = convert::progress(
            req.items_processed,
            req.items_failed,
            req.items_estimated,
            &req.counters,
        );
        let lease = req
            .lease_duration
            .as_ref()
            .map(|d| convert::lease_duration(Some(d), DEFAULT_LEASE))
            .transpose()?;
        let (lease, job_revision) = self
            .tracker
            .checkpoint(&fence, checkpoint, progress, lease)
            .await?;
        Ok(Response::new(pb::CheckpointResponse {
            lease: Some(convert::lease_to(&lease)),
            job_revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn complete_unit(
        &self,
        request: Request<pb::CompleteUnitRequest>,
    ) -> Result<Response<pb::CompleteUnitResponse>, Status> {
        let req = request.get_ref();
        let fence = fence(&req.run_id, &req.unit_key, req.fencing_token)?;
        let progress = convert::progress(req.items_processed, req.items_failed, 0, &req.counters);
        let outcome = UnitOutcome::Completed {
            result: req.result.as_ref().map(|a| crate::model::Spec {
                type_url: a.type_url.clone(),
                value: a.value.clone(),
            }),
            route_to_target: req.route_to_target,
            end_run: req.end_run.as_ref().map(convert::run_end).transpose()?,
        };
        let (unit, view) = self
            .tracker
            .finish_unit(&fence, outcome, Some(progress), "worker")
            .await?;
        Ok(Response::new(pb::CompleteUnitResponse {
            unit: Some(pb::Unit::from(&unit)),
            progress: Some(convert::progress_to(&view, 0.0)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn fail_unit(
        &self,
        request: Request<pb::FailUnitRequest>,
    ) -> Result<Response<pb::FailUnitResponse>, Status> {
        let req = request.get_ref();
        let fence = fence(&req.run_id, &req.unit_key, req.fencing_token)?;
        if req.error.trim().is_empty() {
            return Err(FieldError::new("error", "say why the unit failed").into());
        }
        let progress = convert::progress(req.items_processed, req.items_failed, 0, &req.counters);
        let outcome = UnitOutcome::Failed {
            error: req.error.clone(),
            retryable: req.retryable,
            rolled_back: req.rolled_back,
        };
        let (unit, view) = self
            .tracker
            .finish_unit(&fence, outcome, Some(progress), "worker")
            .await?;
        Ok(Response::new(pb::FailUnitResponse {
            unit: Some(pb::Unit::from(&unit)),
            progress: Some(convert::progress_to(&view, 0.0)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn complete_run(
        &self,
        request: Request<pb::CompleteRunRequest>,
    ) -> Result<Response<pb::CompleteRunResponse>, Status> {
        let req = request.get_ref();
        let watermark = convert::watermark_from(req.last_processed.as_ref())?;
        let result = req.result.as_ref().map(|a| crate::model::Spec {
            type_url: a.type_url.clone(),
            value: a.value.clone(),
        });
        let run = self
            .tracker
            .complete_run(
                &required_id(&req.run_id, "run_id")?,
                watermark,
                result,
                &actor(&req.actor),
            )
            .await?;
        Ok(Response::new(pb::CompleteRunResponse {
            run: Some(pb::Run::from(&self.tracker.get_run(&run.run_id).await?)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn fail_run(
        &self,
        request: Request<pb::FailRunRequest>,
    ) -> Result<Response<pb::FailRunResponse>, Status> {
        let req = request.get_ref();
        if req.error.trim().is_empty() {
            return Err(FieldError::new("error", "say why the run failed").into());
        }
        let result = req.result.as_ref().map(|a| crate::model::Spec {
            type_url: a.type_url.clone(),
            value: a.value.clone(),
        });
        let run = self
            .tracker
            .fail_run(
                &required_id(&req.run_id, "run_id")?,
                &req.error,
                result,
                &actor(&req.actor),
            )
            .await?;
        Ok(Response::new(pb::FailRunResponse {
            run: Some(pb::Run::from(&self.tracker.get_run(&run.run_id).await?)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn acknowledge_failure(
        &self,
        request: Request<pb::AcknowledgeFailureRequest>,
    ) -> Result<Response<pb::AcknowledgeFailureResponse>, Status> {
        let req = request.get_ref();
        let who = required_id(&req.actor, "actor")?;
        let why = required_id(&req.reason, "reason")?;
        let run = self
            .tracker
            .acknowledge_failure(&name(&req.job_name, "job_name")?, &req.run_id, &who, &why)
            .await?;
        Ok(Response::new(pb::AcknowledgeFailureResponse {
            run: Some(pb::Run::from(&self.tracker.get_run(&run.run_id).await?)),
        }))
    }

    type WatchRunStream = BoxStream<pb::WatchRunResponse>;

    #[tracing::instrument(skip_all)]
    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let req = request.get_ref();
        let run_id = required_id(&req.run_id, "run_id")?;
        let interval = convert::from_duration(
            req.min_interval.as_ref(),
            "min_interval",
            Duration::from_secs(1),
        )?
        .max(Duration::from_millis(100));
        self.tracker.get_run(&run_id).await?;
        let tracker = self.tracker.clone();
        let stream = async_stream(move |tx| async move {
            let mut last: Option<(Instant, i64)> = None;
            loop {
                let view = match tracker.get_run(&run_id).await {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let now = Instant::now();
                #[allow(clippy::cast_precision_loss)]
                let rate = last.map_or(0.0, |(t, n)| {
                    let secs = now.duration_since(t).as_secs_f64();
                    if secs > 0.0 {
                        (view.totals.items_processed - n) as f64 / secs
                    } else {
                        0.0
                    }
                });
                last = Some((now, view.totals.items_processed));
                let done = view.run.status.is_terminal();
                if tx
                    .send(Ok(pb::WatchRunResponse {
                        progress: Some(convert::progress_to(&view, rate)),
                    }))
                    .await
                    .is_err()
                    || done
                {
                    return;
                }
                tracker.wait_for_change(interval).await;
                tokio::time::sleep(interval / 4).await;
            }
        });
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all)]
    async fn list_transitions(
        &self,
        request: Request<pb::ListTransitionsRequest>,
    ) -> Result<Response<pb::ListTransitionsResponse>, Status> {
        let req = request.get_ref();
        if req.job_name.is_empty() && req.run_id.is_empty() {
            return Err(FieldError::new("job_name", "give a job name or a run id").into());
        }
        let after = match convert::page(&req.page_token, "page_token")? {
            None => None,
            Some(key) => Some(key.parse::<u64>().map_err(|_| {
                FieldError::new(
                    "page_token",
                    "is not a token returned by this API; list again without one",
                )
            })?),
        };
        let size = convert::page_size(req.page_size, "page_size")?;
        // Read from the store from the token on, not the whole history for
        // every page; one more than the page says whether another follows.
        let transitions = self
            .tracker
            .transitions_after(&req.job_name, &req.run_id, &req.unit_key, after, size + 1)
            .await?;
        let (page, next) = convert::paginate(&transitions, None, size, Order::Ascending, |t| {
            format!("{:020}", t.sequence)
        });
        Ok(Response::new(pb::ListTransitionsResponse {
            transitions: page.iter().map(pb::Transition::from).collect(),
            next_page_token: next,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn set_route(
        &self,
        request: Request<pb::SetRouteRequest>,
    ) -> Result<Response<pb::SetRouteResponse>, Status> {
        let req = request.get_ref();
        let job = name(&req.job_name, "job_name")?;
        if !req.unit_key.is_empty() {
            unit_key(&req.unit_key, "unit_key")?;
        }
        let target = convert::route_target_from(req.target, "target")?;
        let route = self
            .tracker
            .set_route(
                &job,
                &req.unit_key,
                target,
                req.expected_revision,
                &actor(&req.actor),
                &req.reason,
            )
            .await?;
        Ok(Response::new(pb::SetRouteResponse {
            route: Some(pb::Route::from(&route)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_route(
        &self,
        request: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::GetRouteResponse>, Status> {
        let req = request.get_ref();
        let route = self
            .tracker
            .get_route(&name(&req.job_name, "job_name")?, &req.unit_key)
            .await?;
        Ok(Response::new(pb::GetRouteResponse {
            route: Some(pb::Route::from(&route)),
        }))
    }

    type WatchRoutesStream = BoxStream<pb::WatchRoutesResponse>;

    #[tracing::instrument(skip_all)]
    async fn watch_routes(
        &self,
        request: Request<pb::WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        let job = name(&request.get_ref().job_name, "job_name")?;
        let first = self.tracker.list_routes(&job).await?;
        let tracker = self.tracker.clone();
        let stream = async_stream(move |tx| async move {
            let mut known: HashMap<String, u64> = first
                .iter()
                .map(|r| (r.unit_key.clone(), r.revision))
                .collect();
            let snapshot = pb::WatchRoutesResponse {
                routes: first.iter().map(pb::Route::from).collect(),
                caught_up: true,
            };
            if tx.send(Ok(snapshot)).await.is_err() {
                return;
            }
            loop {
                tracker.wait_for_change(Duration::from_millis(500)).await;
                if tx.is_closed() || tracker.shutting_down() {
                    return;
                }
                let routes = match tracker.list_routes(&job).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let changed: Vec<&Route> = routes
                    .iter()
                    .filter(|r| known.get(&r.unit_key) != Some(&r.revision))
                    .collect();
                if changed.is_empty() {
                    continue;
                }
                for r in &changed {
                    known.insert(r.unit_key.clone(), r.revision);
                }
                let update = pb::WatchRoutesResponse {
                    routes: changed.into_iter().map(pb::Route::from).collect(),
                    caught_up: true,
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A server stream fed by a task through a small channel; the task stops
/// when the client goes away.
fn async_stream<T, F, Fut>(body: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
