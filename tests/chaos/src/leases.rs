//! No lease held by two workers at once, read from the job-tracker's
//! history of every job of the run (its table is the run's own): per
//! unit, every fencing token the job-tracker hands out is larger than the
//! last, and a worker's transition of a unit (complete, fail) carries the
//! token of the latest claim. A transition accepted from a worker whose
//! lease was taken over would show an older token.

use std::collections::HashMap;
use std::time::Duration;

use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tonic::transport::Channel;

use crate::plane::through_restarts;

/// What the history showed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub units: usize,
    pub claims: u64,
    /// Tokens handed out that were not larger than the unit's last one.
    pub token_regressions: u64,
    /// Worker transitions under a token that was not the unit's latest.
    pub stale_finishes: u64,
}

impl Outcome {
    pub fn clean(&self) -> bool {
        self.claims > 0 && self.token_regressions == 0 && self.stale_finishes == 0
    }
}

/// Reads every job's transitions and checks them.
pub async fn check(jobs_url: String) -> anyhow::Result<Outcome> {
    let jobs = JobTrackerServiceClient::new(Channel::from_shared(jobs_url)?.connect_lazy());
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = through_restarts("ListJobs", Duration::from_secs(60), || {
            let mut c = jobs.clone();
            let r = jt::ListJobsRequest {
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            };
            async move { c.list_jobs(r).await }
        })
        .await?;
        names.extend(page.jobs.into_iter().map(|j| j.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut outcome = Outcome::default();
    for name in names {
        let mut transitions = Vec::new();
        let mut page_token = String::new();
        loop {
            // Small pages, retried for long: after a long run a job's
            // history is large, and the local DynamoDB reads it slowly.
            let page = through_restarts("ListTransitions", Duration::from_secs(300), || {
                let mut c = jobs.clone();
                let r = jt::ListTransitionsRequest {
                    job_name: name.clone(),
                    page_size: 100,
                    page_token: page_token.clone(),
                    ..Default::default()
                };
                async move { c.list_transitions(r).await }
            })
            .await?;
            transitions.extend(page.transitions);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        judge(&name, &transitions, &mut outcome);
    }
    Ok(outcome)
}

/// Checks one job's transitions (oldest first) into `outcome`.
fn judge(job: &str, transitions: &[jt::Transition], outcome: &mut Outcome) {
    // (run, unit) → (holder, token) of the latest token handed out.
    let mut latest: HashMap<(&str, &str), (&str, u64)> = HashMap::new();
    for t in transitions {
        let Some(jt::transition::Change::UnitStatus(change)) = &t.change else {
            continue;
        };
        if t.fencing_token == 0 {
            continue;
        }
        let unit = (t.run_id.as_str(), t.unit_key.as_str());
        let claim = change.to_status == jt::UnitStatus::InProgress as i32;
        outcome.claims += u64::from(claim);
        let last = latest.get(&unit).copied();
        match last {
            // A new token: a claim, or a claim that found the unit out of
            // attempts.
            None => {
                latest.insert(unit, (t.actor.as_str(), t.fencing_token));
            }
            Some((_, token)) if t.fencing_token > token => {
                latest.insert(unit, (t.actor.as_str(), t.fencing_token));
            }
            // The holder's own transition under its token.
            Some((_, token)) if t.fencing_token == token && !claim => {}
            Some((holder, token)) if claim => {
                eprintln!(
                    "chaos: job {job} unit {:?}: {} claimed it with token {} after {holder} got {token}",
                    t.unit_key, t.actor, t.fencing_token
                );
                outcome.token_regressions += 1;
            }
            Some((holder, token)) => {
                eprintln!(
                    "chaos: job {job} unit {:?}: {} moved it to {:?} under token {} after {holder} got {token}",
                    t.unit_key, t.actor, change.to_status, t.fencing_token
                );
                outcome.stale_finishes += 1;
            }
        }
    }
    outcome.units += latest.len();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(
        unit: &str,
        actor: &str,
        token: u64,
        from: jt::UnitStatus,
        to: jt::UnitStatus,
    ) -> jt::Transition {
        jt::Transition {
            run_id: "r".to_owned(),
            unit_key: unit.to_owned(),
            actor: actor.to_owned(),
            fencing_token: token,
            change: Some(jt::transition::Change::UnitStatus(jt::UnitStatusChange {
                from_status: from as i32,
                to_status: to as i32,
            })),
            ..Default::default()
        }
    }

    use jt::UnitStatus::{InProgress, Migrated, NotMigrated};

    #[test]
    fn a_takeover_then_the_new_holder_finishing_is_clean() {
        let mut o = Outcome::default();
        judge(
            "j",
            &[
                t("u", "a", 1, NotMigrated, InProgress),
                t("u", "b", 2, InProgress, InProgress),
                t("u", "b", 2, InProgress, Migrated),
            ],
            &mut o,
        );
        assert!(o.clean(), "{o:?}");
        assert_eq!((o.units, o.claims), (1, 2));
    }

    #[test]
    fn the_old_holder_finishing_after_a_takeover_is_counted() {
        let mut o = Outcome::default();
        judge(
            "j",
            &[
                t("u", "a", 1, NotMigrated, InProgress),
                t("u", "b", 2, InProgress, InProgress),
                t("u", "a", 1, InProgress, Migrated),
            ],
            &mut o,
        );
        assert_eq!(o.stale_finishes, 1, "{o:?}");
    }

    #[test]
    fn a_token_handed_out_twice_is_counted() {
        let mut o = Outcome::default();
        judge(
            "j",
            &[
                t("u", "a", 2, NotMigrated, InProgress),
                t("u", "b", 2, InProgress, InProgress),
            ],
            &mut o,
        );
        assert_eq!(o.token_regressions, 1, "{o:?}");
    }
}
