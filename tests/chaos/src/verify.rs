//! Verifications under faults: the two verifier replicas, killed like the
//! rest, verify a pair of tables one verification after another, every
//! other pair with differences planted by the harness. Each verification
//! must end, whichever replica finishes it, with the true verdict: PASS
//! for the identical pair, and exactly the planted mismatches for the
//! other.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::{AttrValue, Item, Key, KeySchema, SourceTable as _};
use tidemark_proto::common::v1 as common_pb;
use tidemark_proto::verifier::v1 as pb;
use tidemark_proto::verifier::v1::verifier_service_client::VerifierServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use crate::plane::through_restarts;

const ITEMS: u32 = 400;
/// Differences planted in the target of every other verification.
pub const PLANTED: i64 = 7;
const PLANTED_COUNTS: pb::MismatchCounts = pb::MismatchCounts {
    missing_in_target: 2,
    extra_in_target: 2,
    stale_version: 0,
    different_content: 3,
};

pub fn schema() -> KeySchema {
    KeySchema::new("id", None)
}

fn item(id: &str, v: i64, body: &str) -> Item {
    let mut item: Item = Key::single("id", AttrValue::s(id)).0;
    item.insert("v".to_owned(), AttrValue::n(v));
    item.insert("body".to_owned(), AttrValue::s(body));
    item
}

fn items() -> Vec<Item> {
    (0..ITEMS)
        .map(|i| item(&format!("k{i:04}"), 3, &format!("body {i}")))
        .collect()
}

async fn put_all(table: &DynamoTable, items: Vec<Item>) -> anyhow::Result<()> {
    futures::stream::iter(
        items
            .into_iter()
            .map(|item| async move { table.put(&item, None).await }),
    )
    .buffer_unordered(32)
    .try_collect::<Vec<_>>()
    .await?;
    Ok(())
}

/// The three tables: the source, an identical copy, and a copy with
/// [`PLANTED_COUNTS`] differences.
pub async fn seed(
    source: &DynamoTable,
    same: &DynamoTable,
    diff: &DynamoTable,
) -> anyhow::Result<()> {
    put_all(source, items())
        .await
        .context("seed the verified source")?;
    put_all(same, items())
        .await
        .context("seed the identical copy")?;
    let mut differing: Vec<Item> = items()
        .into_iter()
        .filter(|i| !matches!(&i["id"], AttrValue::S(s) if s == "k0000" || s == "k0001"))
        .collect();
    differing.push(item("x0000", 3, "extra"));
    differing.push(item("x0001", 3, "extra"));
    // Written after the originals, so these images win.
    differing.push(item("k0002", 2, "body 2"));
    differing.push(item("k0003", 3, "changed"));
    differing.push(item("k0004", 3, "changed"));
    put_all(diff, differing[..differing.len() - 3].to_vec())
        .await
        .context("seed the differing copy")?;
    put_all(diff, differing[differing.len() - 3..].to_vec())
        .await
        .context("plant the changed items")?;
    Ok(())
}

/// What the verifications found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub runs: u32,
    /// Verifications that did not end within the deadline.
    pub unfinished: u32,
    /// Verifications that ended with another verdict than the truth.
    pub wrong: u32,
}

impl Outcome {
    pub fn clean(&self) -> bool {
        self.runs > 0 && self.unfinished == 0 && self.wrong == 0
    }
}

fn dynamo(table: &str) -> common_pb::DataStore {
    common_pb::DataStore {
        store: Some(common_pb::data_store::Store::DynamodbTable(
            common_pb::DynamoDbTableRef {
                table_name: table.to_owned(),
                ..Default::default()
            },
        )),
    }
}

fn spec(source: &str, target: &str) -> pb::VerificationSpec {
    pb::VerificationSpec {
        source: Some(dynamo(source)),
        target: Some(dynamo(target)),
        // Compared by content: the tables are plain copies, not a sink's
        // (which keeps its own version attribute).
        version_attribute: String::new(),
        checks: vec![
            pb::Check {
                name: "count".to_owned(),
                kind: Some(pb::check::Kind::Count(pb::CountCheck::default())),
            },
            pb::Check {
                name: "digest".to_owned(),
                kind: Some(pb::check::Kind::Digest(pb::DigestCheck {
                    buckets: 16,
                    versions_only: false,
                })),
            },
        ],
        recheck: Some(pb::RecheckPolicy {
            rounds: 1,
            min_wait: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
            pipeline_name: String::new(),
        }),
        segments: 2,
        sample_size: 2,
        ..Default::default()
    }
}

/// Whether `report` is the true verdict for the pair.
fn truthful(report: &pb::Report, planted: bool) -> bool {
    let check = |name: &str| report.checks.iter().find(|c| c.name == name);
    if report.status != pb::VerificationStatus::Completed as i32 {
        return false;
    }
    let count_ok = check("count").is_some_and(|c| {
        c.verdict == pb::Verdict::Pass as i32
            && c.source_count == i64::from(ITEMS)
            && c.target_count == i64::from(ITEMS)
    });
    let digest_ok = check("digest").is_some_and(|c| {
        if planted {
            c.verdict == pb::Verdict::Fail as i32 && c.mismatches == Some(PLANTED_COUNTS)
        } else {
            c.verdict == pb::Verdict::Pass as i32
                && c.mismatches.unwrap_or_default() == pb::MismatchCounts::default()
        }
    });
    count_ok && digest_ok
}

/// Verifications, one after another, alternately on the two replicas and
/// alternately of the identical and the differing pair, until `stop`.
pub async fn rounds(
    verifiers: [String; 2],
    tables: [String; 3],
    deadline: Duration,
    stop: CancellationToken,
) -> anyhow::Result<Outcome> {
    let clients = verifiers
        .iter()
        .map(|url| {
            Ok(VerifierServiceClient::new(
                Channel::from_shared(url.clone())?.connect_lazy(),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let [source, same, diff] = tables;
    let mut outcome = Outcome::default();
    while !stop.is_cancelled() {
        let k = outcome.runs;
        let planted = k % 2 == 1;
        let client = clients[usize::try_from(k % 2).unwrap_or(0)].clone();
        let target = if planted { &diff } else { &same };
        let request = pb::StartVerificationRequest {
            job_name: format!("chaos-verify-{k}"),
            spec: Some(spec(&source, target)),
            actor: "chaos".to_owned(),
            correlation_id: format!("chaos-verify-{k}"),
            ..Default::default()
        };
        let id = start(&client, &request).await?;
        outcome.runs += 1;
        let started = Instant::now();
        let report = loop {
            let c = clients[usize::try_from(outcome.runs % 2).unwrap_or(0)].clone();
            let report = through_restarts("GetReport", Duration::from_secs(60), || {
                let mut c = c.clone();
                let r = pb::GetReportRequest {
                    verification_id: id.clone(),
                };
                async move { c.get_report(r).await }
            })
            .await?
            .report
            .unwrap_or_default();
            let done = report.status == pb::VerificationStatus::Completed as i32
                || report.status == pb::VerificationStatus::Failed as i32;
            if done || started.elapsed() > deadline {
                break (done, report);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        match report {
            (false, r) => {
                eprintln!("chaos: verification {id} did not end in {deadline:?}: {r:?}");
                outcome.unfinished += 1;
            }
            (true, r) if !truthful(&r, planted) => {
                eprintln!(
                    "chaos: verification {id} ({}) has a wrong verdict: {r:?}",
                    if planted {
                        "planted differences"
                    } else {
                        "identical"
                    }
                );
                outcome.wrong += 1;
            }
            (true, _) => {}
        }
    }
    Ok(outcome)
}

/// Starts the verification once: the request carries a correlation id, so
/// a retry after a lost answer (a kill, a reset) gets the run the first
/// attempt started, and finishes that start if it was interrupted.
async fn start(
    client: &VerifierServiceClient<Channel>,
    request: &pb::StartVerificationRequest,
) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        match client.clone().start_verification(request.clone()).await {
            Ok(r) => return Ok(r.into_inner().verification_id),
            Err(s) if transient(s.code()) && started.elapsed() < Duration::from_secs(120) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => bail!("StartVerification of {}: {s:?}", request.job_name),
        }
    }
}

fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}
