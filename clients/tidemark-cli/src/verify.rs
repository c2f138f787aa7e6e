//! `tidemark verify`: prove that a target agrees with its source (counts,
//! a predicate, content digests) and print the verifier's report.

use std::time::Duration;

use tidemark_client::spec::{parse_duration, parse_value, proto_duration};
use tidemark_client::{StoreSpec, Tidemark, verdict_name};
use tidemark_proto::verifier::v1 as pb;

use crate::error::{CliError, CliResult};
use crate::output::{self, Output};
use crate::progress;

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The source store, e.g. dynamodb:items.
    #[arg(long)]
    source: StoreSpec,
    /// The target store (not needed when every check is a source predicate).
    #[arg(long)]
    target: Option<StoreSpec>,
    /// Compare item counts.
    #[arg(long)]
    count: bool,
    /// Compare content digests (buckets drilled down to keys).
    #[arg(long)]
    digest: bool,
    /// Digest buckets (0: the verifier's 1024).
    #[arg(long, default_value_t = 0)]
    buckets: u32,
    /// A filter expression whose count on the source must equal --expected,
    /// e.g. 'attribute_not_exists(#a)'.
    #[arg(long)]
    predicate: Option<String>,
    /// Expression attribute names of --predicate, as '#a=test' (repeat).
    #[arg(long = "name", value_parser = parse_pair)]
    names: Vec<(String, String)>,
    /// Expression attribute values of --predicate, as ':v=n:1' (repeat).
    #[arg(long = "value", value_parser = parse_pair)]
    values: Vec<(String, String)>,
    /// The count the predicate must find.
    #[arg(long, default_value_t = 0)]
    expected: i64,
    /// Evaluate the predicate on the target instead of the source.
    #[arg(long)]
    on_target: bool,
    /// The pipeline replicating source to target: mismatches are re-checked
    /// after its lag has passed, before they count.
    #[arg(long, default_value = "")]
    pipeline: String,
    /// Re-check rounds (0: the verifier's 3).
    #[arg(long, default_value_t = 0)]
    rounds: u32,
    /// The VERIFICATION job's name (empty: generated).
    #[arg(long, default_value = "")]
    job: String,
    #[arg(long, env = "USER", default_value = "operator")]
    actor: String,
    /// How long to wait for the report.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    timeout: Duration,
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?}: expected NAME=VALUE, e.g. '#a=test' or ':v=n:1'"))
}

fn spec(a: &VerifyArgs) -> Result<pb::VerificationSpec, CliError> {
    let mut checks = Vec::new();
    if a.count {
        checks.push(pb::Check {
            name: "count".to_owned(),
            kind: Some(pb::check::Kind::Count(pb::CountCheck::default())),
        });
    }
    if a.digest {
        checks.push(pb::Check {
            name: "digest".to_owned(),
            kind: Some(pb::check::Kind::Digest(pb::DigestCheck {
                buckets: a.buckets,
                versions_only: false,
            })),
        });
    }
    if let Some(filter) = &a.predicate {
        let mut values = std::collections::HashMap::new();
        for (k, v) in &a.values {
            values.insert(k.clone(), parse_value(v)?);
        }
        checks.push(pb::Check {
            name: "predicate".to_owned(),
            kind: Some(pb::check::Kind::Predicate(pb::PredicateCheck {
                side: if a.on_target {
                    pb::Side::Target
                } else {
                    pb::Side::Source
                } as i32,
                filter_expression: filter.clone(),
                expression_attribute_names: a.names.iter().cloned().collect(),
                expression_attribute_values: values,
                expected_count: a.expected,
            })),
        });
    }
    if checks.is_empty() {
        return Err(CliError::invalid(
            "no check given",
            "add --count, --digest and/or --predicate EXPR",
        ));
    }
    Ok(pb::VerificationSpec {
        source: Some(a.source.to_proto()),
        target: a.target.as_ref().map(StoreSpec::to_proto),
        checks,
        recheck: Some(pb::RecheckPolicy {
            rounds: a.rounds,
            min_wait: Some(proto_duration(Duration::from_secs(1))),
            pipeline_name: a.pipeline.clone(),
        }),
        ..Default::default()
    })
}

pub async fn run(client: &Tidemark, a: VerifyArgs, out: Output) -> CliResult {
    let request = pb::StartVerificationRequest {
        job_name: a.job.clone(),
        spec: Some(spec(&a)?),
        schedule: None,
        actor: a.actor.clone(),
        correlation_id: String::new(),
    };
    let pb = progress::spinner(out, "verifying");
    let report = client
        .verify(request, a.timeout, |r| {
            pb.set_message(output::verify_progress(r));
        })
        .await;
    pb.finish_and_clear();
    let report = report?;
    output::verification(out, &report);
    if report.verdict == pb::Verdict::Pass as i32 {
        Ok(())
    } else {
        Err(CliError::failed(
            format!(
                "verification {} did not pass ({})",
                report.verification_id,
                verdict_name(report.verdict)
            ),
            format!(
                "`tidemark verify` with --pipeline re-checks mismatches after the lag; a failed verification blocks job {} until `tidemark jobs ack {} --reason ...`",
                report.job_name, report.job_name
            ),
        ))
    }
}
