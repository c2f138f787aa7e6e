//! Per-unit routing flags that switch readers from source to target.

use chrono::Utc;

use super::{Tracker, job_pk, parse, put};
use crate::error::{TrackerError, TrackerResult};
use crate::kv::{Expect, Op, query_all};
use crate::model::{Change, Route, RouteTarget, Transition};

impl Tracker {
    pub async fn set_route(
        &self,
        job_name: &str,
        unit_key: &str,
        target: RouteTarget,
        expected: u64,
        actor: &str,
        reason: &str,
    ) -> TrackerResult<Route> {
        self.retrying("set route", || async {
            self.load_job(job_name).await?;
            let (route, ops) = self
                .route_write(job_name, unit_key, target, expected, actor, reason)
                .await?;
            Ok(self.apply(ops).await?.map(|()| route.clone()))
        })
        .await
    }

    /// The writes that set a unit's route (conditional on the route read,
    /// with its transition), for [`Self::set_route`] or to go in another
    /// transaction; `expected` 0 takes any revision.
    pub(super) async fn route_write(
        &self,
        job_name: &str,
        unit_key: &str,
        target: RouteTarget,
        expected: u64,
        actor: &str,
        reason: &str,
    ) -> TrackerResult<(Route, Vec<Op>)> {
        let sk = format!("route#{unit_key}");
        let existing = self.kv.get(&job_pk(job_name), &sk).await?;
        let (previous, rev) = match &existing {
            Some(e) => (Some(parse::<Route>(e)?), Expect::Rev(e.rev)),
            None => (None, Expect::Absent),
        };
        let current_revision = previous.as_ref().map_or(0, |r| r.revision);
        if expected != 0 && expected != current_revision {
            return Err(TrackerError::Precondition(format!(
                "route of {unit_key:?} is at revision {current_revision}, not {expected}"
            )));
        }
        let route = Route {
            job_name: job_name.to_owned(),
            unit_key: unit_key.to_owned(),
            target,
            revision: current_revision + 1,
            update_time: Some(Utc::now()),
            actor: actor.to_owned(),
            reason: reason.to_owned(),
        };
        let ops = vec![
            put(&job_pk(job_name), &sk, &route, rev)?,
            self.transition(
                &job_pk(job_name),
                Transition {
                    sequence: 0,
                    job_name: job_name.to_owned(),
                    run_id: String::new(),
                    unit_key: unit_key.to_owned(),
                    time: Utc::now(),
                    actor: actor.to_owned(),
                    reason: reason.to_owned(),
                    fencing_token: 0,
                    change: Change::Route {
                        from: previous.map(|p| p.target),
                        to: target,
                        revision: route.revision,
                    },
                },
            )?,
        ];
        Ok((route, ops))
    }

    /// The unit's route, else the job-wide route, else SOURCE at revision 0.
    pub async fn get_route(&self, job_name: &str, unit_key: &str) -> TrackerResult<Route> {
        self.load_job(job_name).await?;
        for sk in [format!("route#{unit_key}"), "route#".to_owned()] {
            if let Some(e) = self.kv.get(&job_pk(job_name), &sk).await? {
                return parse(&e);
            }
        }
        Ok(Route {
            job_name: job_name.to_owned(),
            unit_key: unit_key.to_owned(),
            target: RouteTarget::Source,
            revision: 0,
            update_time: None,
            actor: String::new(),
            reason: String::new(),
        })
    }

    pub async fn list_routes(&self, job_name: &str) -> TrackerResult<Vec<Route>> {
        self.load_job(job_name).await?;
        query_all(self.kv.as_ref(), &job_pk(job_name), "route#")
            .await?
            .iter()
            .map(parse)
            .collect()
    }
}
