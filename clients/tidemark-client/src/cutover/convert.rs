//! A plan as the services take it: the CreatePipeline spec and the
//! VerificationSpec of both proofs.

use tidemark_proto::common::v1 as common;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::verifier::v1 as vf;

use crate::cutover::plan::{CheckChoice, CheckPlan, CutoverPlan, FeedChoice, SinkPlan};
use crate::spec::{SpecError, proto_duration};

/// Where the reverse pipeline keeps its versions in the old table.
pub const REVERSE_VERSION_ATTRIBUTE: &str = "_tidemark_version";

impl CutoverPlan {
    /// The pipeline as CreatePipeline takes it.
    ///
    /// # Errors
    /// A field that cannot be sent.
    pub fn pipeline_spec(&self) -> Result<rp::PipelineSpec, SpecError> {
        let p = &self.pipeline;
        let start = p.start_position()? as i32;
        let feed = match p.feed_choice()? {
            FeedChoice::DynamodbStreams => {
                rp::change_feed::Feed::DynamodbStreams(rp::DynamoDbStreamsFeed {
                    start_position: start,
                    readers: 0,
                })
            }
            FeedChoice::EmbeddedChangeLog => {
                rp::change_feed::Feed::EmbeddedChangeLog(rp::EmbeddedChangeLogFeed {
                    start_position: start,
                })
            }
            FeedChoice::Kafka(topic) => {
                let Some(common::data_store::Store::KafkaTopic(t)) = topic.to_proto().store else {
                    unreachable!("kafka: parses as a topic")
                };
                rp::change_feed::Feed::Kafka(rp::KafkaFeed {
                    topic: Some(t),
                    consumer_group: String::new(),
                    start_position: start,
                    consumers: 0,
                })
            }
        };
        let mode = p.backfill_mode()?;
        p.require_sinks()?;
        Ok(rp::PipelineSpec {
            source: Some(p.source.to_proto()),
            feed: Some(rp::ChangeFeed { feed: Some(feed) }),
            sinks: p
                .sinks
                .iter()
                .map(|s| rp::Sink {
                    name: s.name.clone(),
                    store: Some(s.store.to_proto()),
                    transform: s.transform(),
                    version_attribute: s.version_attribute.clone(),
                    tombstone_retention: None,
                    kafka_format: s.kafka_format() as i32,
                    writes_in_flight: s.writes_in_flight,
                })
                .collect(),
            backfill: Some(rp::BackfillOptions {
                mode: mode as i32,
                segments: p.segments,
                ..Default::default()
            }),
            version_attribute: p.version_attribute.clone(),
            dead_letter_store: None,
            // Each pipeline of a pair marks its writes and skips the
            // other's, so neither echoes the other back.
            origin: if self.reverse {
                p.name.clone()
            } else {
                String::new()
            },
            skip_origin: if self.reverse {
                self.reverse_pipeline()
            } else {
                String::new()
            },
        })
    }

    /// The reverse pipeline: the new store's stream into the old store,
    /// from the moment it is created (the old store holds everything up to
    /// the pause), renames undone.
    ///
    /// # Errors
    /// A plan that cannot be sent.
    pub fn reverse_spec(&self) -> Result<rp::PipelineSpec, SpecError> {
        let sink = self.verified_sink()?;
        let renames: std::collections::HashMap<String, String> = sink
            .renames
            .iter()
            .map(|(from, to)| (to.clone(), from.clone()))
            .collect();
        Ok(rp::PipelineSpec {
            source: Some(sink.store.to_proto()),
            feed: Some(rp::ChangeFeed {
                feed: Some(rp::change_feed::Feed::DynamodbStreams(
                    rp::DynamoDbStreamsFeed {
                        start_position: rp::StartPosition::Latest as i32,
                        readers: 0,
                    },
                )),
            }),
            sinks: vec![rp::Sink {
                name: "old".to_owned(),
                store: Some(self.pipeline.source.to_proto()),
                transform: (!renames.is_empty()).then(|| common::Transform {
                    renames,
                    ..Default::default()
                }),
                // Out of the way of the old table's own writers (the
                // stats-aggregator keeps tidemark_version there) and of
                // every read: `_tidemark_` attributes are Tidemark's.
                version_attribute: REVERSE_VERSION_ATTRIBUTE.to_owned(),
                ..Default::default()
            }],
            backfill: Some(rp::BackfillOptions {
                mode: rp::BackfillMode::None as i32,
                ..Default::default()
            }),
            version_attribute: String::new(),
            dead_letter_store: None,
            origin: self.reverse_pipeline(),
            skip_origin: self.pipeline.name.clone(),
        })
    }

    /// The verification of the window and of a rollback: the same proof,
    /// re-checked after the reverse pipeline's lag when there is one (new
    /// is then the store written to).
    ///
    /// # Errors
    /// A check that cannot be sent.
    pub fn window_verification_spec(&self) -> Result<vf::VerificationSpec, SpecError> {
        let mut spec = self.verification_spec()?;
        if self.reverse
            && let Some(r) = spec.recheck.as_mut()
        {
            r.pipeline_name = self.reverse_pipeline();
        }
        Ok(spec)
    }

    /// The verification both proofs run.
    ///
    /// # Errors
    /// A check that cannot be sent.
    pub fn verification_spec(&self) -> Result<vf::VerificationSpec, SpecError> {
        let sink = self.verified_sink()?;
        let mut checks = Vec::new();
        for (i, c) in self.verify.checks.iter().enumerate() {
            checks.push(vf::Check {
                name: c.name.clone(),
                kind: Some(check_kind(c, i)?),
            });
        }
        if checks.is_empty() {
            checks.push(vf::Check {
                name: "content".to_owned(),
                kind: Some(vf::check::Kind::Digest(vf::DigestCheck::default())),
            });
        }
        Ok(vf::VerificationSpec {
            source: Some(self.pipeline.source.to_proto()),
            target: Some(sink.store.to_proto()),
            transform: sink.transform(),
            version_attribute: self.pipeline.version_attribute.clone(),
            checks,
            recheck: Some(vf::RecheckPolicy {
                rounds: self.verify.recheck_rounds,
                min_wait: Some(proto_duration(self.verify.recheck_min_wait)),
                pipeline_name: self.pipeline.name.clone(),
            }),
            repair: false,
            segments: self.verify.segments,
            sample_size: 20,
        })
    }
}

/// One check of a VerificationSpec; `i` is its index in the plan.
fn check_kind(c: &CheckPlan, i: usize) -> Result<vf::check::Kind, SpecError> {
    Ok(match c.choice(&format!("verify.checks[{i}]"))? {
        CheckChoice::Count(n) => vf::check::Kind::Count(vf::CountCheck {
            unit_attribute: n.unit_attribute.clone(),
            unit_keys: n.unit_keys.clone(),
            index_name: n.index_name.clone(),
        }),
        CheckChoice::Digest(d) => vf::check::Kind::Digest(vf::DigestCheck {
            buckets: d.buckets,
            versions_only: d.versions_only,
        }),
        CheckChoice::Predicate {
            plan: p,
            side,
            values,
        } => vf::check::Kind::Predicate(vf::PredicateCheck {
            side: side as i32,
            filter_expression: p.filter.clone(),
            expression_attribute_names: p.names.clone().into_iter().collect(),
            expression_attribute_values: values,
            expected_count: p.expected,
        }),
    })
}

impl SinkPlan {
    fn transform(&self) -> Option<common::Transform> {
        if self.projection.is_empty()
            && self.renames.is_empty()
            && self.document_id_template.is_empty()
            && self.index_name_template.is_empty()
        {
            return None;
        }
        Some(common::Transform {
            projection: self.projection.clone(),
            renames: self.renames.clone().into_iter().collect(),
            document_id_template: self.document_id_template.clone(),
            index_name_template: self.index_name_template.clone(),
            filter: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cutover::plan::Step;
    use crate::spec::StoreSpec;

    const PLAN: &str = include_str!("testdata/plan.toml");

    #[test]
    fn a_plan_reads_from_toml_into_requests() {
        let plan = CutoverPlan::from_toml(PLAN).unwrap();
        assert_eq!(plan.route_job(), "pipeline/counters-v2");
        assert_eq!(plan.deadlines.drain, Duration::from_secs(20));
        assert_eq!(plan.deadlines.pause_writers, Duration::from_secs(10));
        let spec = plan.pipeline_spec().unwrap();
        assert_eq!(spec.sinks.len(), 2);
        assert_eq!(spec.version_attribute, "tidemark_version");
        assert!(matches!(
            spec.feed.unwrap().feed,
            Some(rp::change_feed::Feed::DynamodbStreams(rp::DynamoDbStreamsFeed { start_position, .. }))
                if start_position == rp::StartPosition::TrimHorizon as i32
        ));
        assert_eq!(
            spec.backfill.unwrap().mode,
            rp::BackfillMode::Tombstones as i32
        );
        assert!(spec.sinks[0].transform.is_none());
        assert_eq!(
            spec.sinks[1]
                .transform
                .as_ref()
                .unwrap()
                .document_id_template,
            "{pk}"
        );
        let v = plan.verification_spec().unwrap();
        assert_eq!(v.checks.len(), 3);
        assert_eq!(v.recheck.unwrap().pipeline_name, "counters-v2");
        assert_eq!(
            v.target,
            Some("dynamodb:stats-v2".parse::<StoreSpec>().unwrap().to_proto())
        );
        let steps: Vec<Step> = plan.describe().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, Step::ALL);
        assert_eq!(plan.verification_job(true), "cutover/counters-v2/final");
        // The pause outlives every step after it, so a dead client cannot
        // leave writers paused for ever, nor resume them mid-cut-over.
        assert!(plan.max_pause() > Duration::from_secs(10 + 20 + 60 + 10 + 30));
    }

    #[test]
    fn a_reversible_plan_pairs_two_pipelines_that_skip_each_other() {
        let text = PLAN.replace("actor = \"ops\"", "actor = \"ops\"\nreverse = true");
        let plan = CutoverPlan::from_toml(&text).unwrap();
        let forward = plan.pipeline_spec().unwrap();
        let reverse = plan.reverse_spec().unwrap();
        assert_eq!(forward.origin, "counters-v2");
        assert_eq!(forward.skip_origin, "counters-v2-reverse");
        assert_eq!(reverse.origin, "counters-v2-reverse");
        assert_eq!(reverse.skip_origin, "counters-v2");
        // New into old, from the switch on, nothing backfilled.
        assert_eq!(reverse.source, forward.sinks[0].store);
        assert_eq!(reverse.sinks[0].store, forward.source);
        assert_eq!(
            reverse.backfill.unwrap().mode,
            rp::BackfillMode::None as i32
        );
        // The default window: a week, verified hourly, re-checked after the
        // reverse pipeline's lag.
        let w = plan.window().unwrap();
        assert_eq!(w.length, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(w.cron().unwrap(), "0 0 */1 * * *");
        assert_eq!(
            plan.window_verification_spec()
                .unwrap()
                .recheck
                .unwrap()
                .pipeline_name,
            "counters-v2-reverse"
        );
        // Without reverse, no window and no marks.
        let plain = CutoverPlan::from_toml(PLAN).unwrap();
        assert!(plain.window().is_none());
        assert!(plain.pipeline_spec().unwrap().origin.is_empty());
    }

    #[test]
    fn a_window_period_must_repeat_evenly_and_reverse_needs_dynamodb() {
        let every = |text: &str| {
            let plan = PLAN.replace(
                "[writers]",
                &format!("[window]\nverify_every = \"{text}\"\n\n[writers]"),
            );
            CutoverPlan::from_toml(&plan)
                .map(|p| p.window().unwrap().cron().unwrap())
                .map_err(|e| e.to_string())
        };
        assert_eq!(every("10s").unwrap(), "*/10 * * * * *");
        assert_eq!(every("15m").unwrap(), "0 */15 * * * *");
        assert_eq!(every("6h").unwrap(), "0 0 */6 * * *");
        assert_eq!(every("1d").unwrap(), "0 0 0 * * *");
        for bad in ["7s", "45m", "5h", "2d"] {
            assert!(
                every(bad).unwrap_err().contains("window.verify_every"),
                "{bad}"
            );
        }
        let to_search = PLAN
            .replace("actor = \"ops\"", "actor = \"ops\"\nreverse = true")
            .replace("[verify]", "[verify]\nsink = \"search\"");
        let e = CutoverPlan::from_toml(&to_search).unwrap_err();
        assert_eq!(e.field, "reverse", "{e}");
    }
}
