//! Property-based fuzzing of every RPC of the four services through the real
//! gRPC stack (the dev host: every service on one address, embedded stores).
//!
//! Each RPC gets a bounded number of requests drawn from strategies that mix
//! plausible values with boundary ones: empty and ~1 MiB strings, negative
//! and extreme numbers, unknown enum values, page sizes 0, -1 and 2^31-1,
//! invalid durations and timestamps, attribute values nested far deeper than
//! any item, malformed templates, predicates and cron expressions, random
//! bytes. Names of things that exist (a job, a run, a claimed unit, a
//! pipeline, a verification) are mixed in so requests get past NOT_FOUND.
//!
//! What must hold for every request:
//! - no panic anywhere in the host (a panic hook counts them on the host's
//!   threads) and the host still serving at the end;
//! - an answer within a few seconds;
//! - a rejection has one of the codes the RPC documents for bad input
//!   (never INTERNAL or UNKNOWN), a message, and when it is
//!   INVALID_ARGUMENT a `google.rpc.BadRequest` naming a field of the
//!   request (or the message naming one);
//! - a rejected call that could create something created nothing: the jobs,
//!   the runs not started by the scheduler and the pipelines are the same
//!   before and after.
//!
//! Every breach is collected (request shown shortened) and the test fails
//! listing them all. The suite runs a fixed seed; `TIDEMARK_FUZZ_SEED`
//! (64 hex digits) replays another run, `TIDEMARK_FUZZ_SEED=random` explores
//! a new one, and `TIDEMARK_FUZZ_CASES` changes the cases per RPC.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proptest::collection::{btree_map, hash_map, vec};
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost_types::{Any, FieldMask, Timestamp};
use tidemark_e2e::spawn_dev;
use tidemark_proto::common::v1 as common;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::stats_aggregator::v1 as st;
use tidemark_proto::verifier::v1 as vf;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use jt::job_tracker_service_client::JobTrackerServiceClient;
use rp::replicator_service_client::ReplicatorServiceClient;
use st::stats_aggregator_service_client::StatsAggregatorServiceClient;
use vf::verifier_service_client::VerifierServiceClient;

/// Requests per RPC: enough to hit each boundary value a few times, few
/// enough that the whole test stays well under two minutes on two cores.
const DEFAULT_CASES: u32 = 24;
/// The longest any single call may take before it counts as a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a streaming RPC may take to send its first message.
const FIRST_MESSAGE: Duration = Duration::from_secs(3);
/// About 1 MiB: large enough to find echoes into headers and unchecked
/// copies, small enough that four of them fit the 4 MiB message limit.
const HUGE: usize = 1 << 20;
/// Threads of the fuzzed host's runtime, named so the panic hook can tell
/// the host's panics from those of tests running beside this one.
const THREAD_NAME: &str = "rpc-fuzz-host";

static HOST_PANICS: AtomicUsize = AtomicUsize::new(0);

const IA: Code = Code::InvalidArgument;
const FP: Code = Code::FailedPrecondition;
const NF: Code = Code::NotFound;
const AE: Code = Code::AlreadyExists;

/// What is fuzzed and what a rejection of it may be.
#[derive(Clone, Copy)]
struct Rpc {
    name: &'static str,
    /// The request's top-level fields: an INVALID_ARGUMENT must name one.
    fields: &'static [&'static str],
    /// The codes the RPC documents for bad input, for this input.
    allowed: &'static [Code],
    /// Could create a job, a run or a pipeline: a rejection must not.
    creates: bool,
}

const fn rpc(
    name: &'static str,
    fields: &'static [&'static str],
    allowed: &'static [Code],
    creates: bool,
) -> Rpc {
    Rpc {
        name,
        fields,
        allowed,
        creates,
    }
}

/// What exists, so requests can name it.
#[derive(Debug, Clone, Default)]
struct Seeds {
    jobs: Vec<String>,
    runs: Vec<String>,
    units: Vec<String>,
    tokens: Vec<u64>,
    pipelines: Vec<String>,
    verifications: Vec<String>,
    sinks: Vec<String>,
}

/// What a rejected call must leave unchanged.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    jobs: BTreeSet<String>,
    runs: BTreeSet<String>,
    pipelines: BTreeSet<String>,
}

struct Fuzzer {
    runner: TestRunner,
    channel: Channel,
    cases: u32,
    findings: Vec<String>,
    calls: usize,
    per_rpc: Vec<(&'static str, Duration)>,
}

fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// The first segment of a field path: `job.schedule.cron` → `job`,
/// `units[3].unit_key` → `units`.
fn root_of(path: &str) -> &str {
    path.split(['.', '[']).next().unwrap_or(path)
}

impl Fuzzer {
    fn jt(&self) -> JobTrackerServiceClient<Channel> {
        JobTrackerServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn rp(&self) -> ReplicatorServiceClient<Channel> {
        ReplicatorServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn st(&self) -> StatsAggregatorServiceClient<Channel> {
        StatsAggregatorServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn vf(&self) -> VerifierServiceClient<Channel> {
        VerifierServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    async fn snapshot(&self) -> Snapshot {
        let mut jobs = BTreeSet::new();
        let mut token = String::new();
        loop {
            let page = self
                .jt()
                .list_jobs(jt::ListJobsRequest {
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .expect("ListJobs for the snapshot")
                .into_inner();
            jobs.extend(page.jobs.into_iter().map(|j| j.name));
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        let mut runs = BTreeSet::new();
        let mut token = String::new();
        loop {
            let page = self
                .jt()
                .list_runs(jt::ListRunsRequest {
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .expect("ListRuns for the snapshot")
                .into_inner();
            // The scheduler starts runs by itself (a fuzzed job may have a
            // schedule): only runs started by a call count.
            runs.extend(
                page.runs
                    .into_iter()
                    .filter(|r| r.trigger != jt::RunTrigger::Schedule as i32)
                    .map(|r| r.run_id),
            );
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        let mut pipelines = BTreeSet::new();
        let mut token = String::new();
        loop {
            let page = self
                .rp()
                .list_pipelines(rp::ListPipelinesRequest {
                    page_size: 1000,
                    page_token: token,
                })
                .await
                .expect("ListPipelines for the snapshot")
                .into_inner();
            pipelines.extend(page.pipelines.into_iter().map(|p| p.name));
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        Snapshot {
            jobs,
            runs,
            pipelines,
        }
    }

    /// Calls `call` with `cases` requests drawn from `strategy` and records
    /// every breach of the rules in the module comment.
    async fn fuzz<T, S, F, Fut>(&mut self, rpc: Rpc, strategy: S, call: F)
    where
        T: Debug,
        S: Strategy<Value = T>,
        F: Fn(T) -> Fut,
        Fut: Future<Output = Result<(), Status>>,
    {
        let started = Instant::now();
        // Progress, so a crash of the whole process still says where it was.
        eprintln!("rpc_fuzz: {}", rpc.name);
        for _ in 0..self.cases {
            let request = strategy
                .new_tree(&mut self.runner)
                .expect("strategies always produce a value")
                .current();
            let shown = shorten(&format!("{request:?}"), 400);
            let before = if rpc.creates {
                Some(self.snapshot().await)
            } else {
                None
            };
            let panics = HOST_PANICS.load(Ordering::SeqCst);
            self.calls += 1;
            let outcome = tokio::time::timeout(CALL_TIMEOUT, call(request)).await;
            if HOST_PANICS.load(Ordering::SeqCst) != panics {
                self.findings
                    .push(format!("{}: the host panicked on {shown}", rpc.name));
            }
            let status = match outcome {
                Err(_) => {
                    self.findings.push(format!(
                        "{}: no answer within {CALL_TIMEOUT:?} to {shown}",
                        rpc.name
                    ));
                    continue;
                }
                Ok(Ok(())) => continue,
                Ok(Err(status)) => status,
            };
            if let Some(problem) = judge(rpc, &status) {
                self.findings.push(format!(
                    "{}: {problem}: {:?} {:?} for {shown}",
                    rpc.name,
                    status.code(),
                    shorten(status.message(), 300)
                ));
            }
            if let Some(before) = before {
                let after = self.snapshot().await;
                if after != before {
                    self.findings.push(format!(
                        "{}: rejected with {:?} ({}) yet created jobs {:?}, runs {:?}, pipelines {:?} for {shown}",
                        rpc.name,
                        status.code(),
                        shorten(status.message(), 200),
                        after.jobs.difference(&before.jobs).collect::<Vec<_>>(),
                        after.runs.difference(&before.runs).collect::<Vec<_>>(),
                        after
                            .pipelines
                            .difference(&before.pipelines)
                            .collect::<Vec<_>>(),
                    ));
                }
            }
        }
        self.per_rpc.push((rpc.name, started.elapsed()));
    }
}

/// What is wrong with rejection `status` of `rpc`, if anything.
fn judge(rpc: Rpc, status: &Status) -> Option<String> {
    // The transport's documented limit (deploy/README.md): a request over
    // 4 MiB is refused before any service sees it.
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        return None;
    }
    if !rpc.allowed.contains(&status.code()) {
        return Some(format!("code not among {:?}", rpc.allowed));
    }
    if status.message().trim().is_empty() {
        return Some("empty message".into());
    }
    if status.code() != Code::InvalidArgument {
        return None;
    }
    let names_a_field = |text: &str| rpc.fields.contains(&root_of(text));
    let violations = status
        .get_details_bad_request()
        .map(|b| b.field_violations)
        .unwrap_or_default();
    if violations.iter().any(|v| names_a_field(&v.field)) {
        return None;
    }
    let message = status.message();
    // Bytes that do not decode (nesting past protobuf's limit) have no field.
    if message.starts_with("the request could not be decoded") {
        return None;
    }
    if rpc.fields.iter().any(|f| message.contains(f)) {
        return None;
    }
    Some(format!(
        "INVALID_ARGUMENT naming no request field (violations {:?})",
        violations
            .iter()
            .map(|v| v.field.as_str())
            .collect::<Vec<_>>()
    ))
}

// ---------------------------------------------------------------- strategies

fn pick<T: Clone + Debug + 'static>(options: Vec<T>) -> BoxedStrategy<T> {
    prop::sample::select(options).boxed()
}

/// Strings for names and free text: plausible, empty, odd, huge and, from
/// `known`, names of things that exist.
fn text(known: &[String]) -> BoxedStrategy<String> {
    let mut known = known.to_vec();
    known.push("fuzz-seed".into());
    prop_oneof![
        2 => Just(String::new()),
        3 => "[a-z][a-z0-9_-]{0,15}",
        1 => any::<String>(),
        1 => Just("x".repeat(HUGE)),
        1 => Just("é".repeat(HUGE / 2)),
        2 => pick(vec![
            " ".to_owned(),
            "a/b".to_owned(),
            "../../etc/passwd".to_owned(),
            "a\0b".to_owned(),
            "🦀".to_owned(),
            "-leading".to_owned(),
            "{".to_owned(),
            "x".repeat(129),
            "x".repeat(1025),
            "pipeline/".to_owned(),
        ]),
        3 => pick(known),
    ]
    .boxed()
}

/// Strings without the huge ones, for repeated fields (a list of huge
/// strings would exceed the message limit rather than test the RPC).
fn small_text(known: &[String]) -> BoxedStrategy<String> {
    let mut known = known.to_vec();
    known.push("fuzz-seed".into());
    prop_oneof![
        1 => Just(String::new()),
        3 => "[a-z][a-z0-9_]{0,10}",
        1 => any::<String>(),
        1 => Just("x".repeat(1025)),
        2 => pick(known),
    ]
    .boxed()
}

fn texts(known: &[String]) -> BoxedStrategy<Vec<String>> {
    prop_oneof![
        4 => vec(small_text(known), 0..5),
        1 => vec(Just("u".to_owned()), 2..4),
    ]
    .boxed()
}

fn enum_value(max: i32) -> BoxedStrategy<i32> {
    prop_oneof![
        6 => 0..=max,
        1 => Just(999),
        1 => Just(-1),
        1 => Just(i32::MAX),
        1 => Just(i32::MIN),
    ]
    .boxed()
}

fn enums(max: i32) -> BoxedStrategy<Vec<i32>> {
    vec(enum_value(max), 0..4).boxed()
}

fn page_size() -> BoxedStrategy<i32> {
    prop_oneof![
        Just(0),
        Just(-1),
        Just(i32::MAX),
        Just(i32::MIN),
        1..5_i32,
        any::<i32>(),
    ]
    .boxed()
}

/// Page tokens: opaque to callers, so anything may come back, including
/// numbers at the edge of what a server could parse.
fn page_token() -> BoxedStrategy<String> {
    prop_oneof![
        2 => text(&[]),
        1 => pick(
            [
                "1", "-1", "0", "18446744073709551615", "18446744073709551616",
                "9223372036854775807", "99999999999999999999999", "1e3", "fuzz-seed",
            ]
            .map(str::to_owned)
            .to_vec()
        ),
    ]
    .boxed()
}

fn i64s() -> BoxedStrategy<i64> {
    prop_oneof![
        Just(0),
        Just(-1),
        Just(i64::MAX),
        Just(i64::MIN),
        0..1000_i64,
        any::<i64>(),
    ]
    .boxed()
}

fn u64s(known: &[u64]) -> BoxedStrategy<u64> {
    let mut known = known.to_vec();
    known.push(1);
    prop_oneof![
        Just(0),
        Just(u64::MAX),
        Just(1 << 63),
        any::<u64>(),
        pick(known),
    ]
    .boxed()
}

fn u32s() -> BoxedStrategy<u32> {
    prop_oneof![Just(0), Just(1), Just(u32::MAX), 2..100_u32, any::<u32>()].boxed()
}

/// Durations: unset, zero, short valid ones, negative, mixed signs, nanos
/// out of range, extremes. No valid long ones: a valid 60 s `wait` would
/// only make the test slow.
fn duration() -> BoxedStrategy<Option<prost_types::Duration>> {
    let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    prop_oneof![
        2 => Just(None),
        1 => Just(d(0, 0)),
        2 => (0..2_i64, 0..1_000_000_000_i32).prop_map(move |(s, n)| d(s, n)),
        1 => Just(d(-1, 0)),
        1 => Just(d(1, -5)),
        1 => Just(d(0, 2_000_000_000)),
        1 => Just(d(i64::MAX, 999_999_999)),
        1 => Just(d(i64::MIN, -999_999_999)),
        1 => any::<(i64, i32)>().prop_map(move |(s, n)| d(s, n)),
    ]
    .boxed()
}

fn timestamp() -> BoxedStrategy<Option<Timestamp>> {
    let t = |seconds, nanos| Some(Timestamp { seconds, nanos });
    prop_oneof![
        2 => Just(None),
        1 => Just(t(0, 0)),
        1 => Just(t(1_767_225_600, 0)),
        1 => Just(t(-62_135_596_801, 0)),
        1 => Just(t(253_402_300_800, 0)),
        1 => Just(t(i64::MAX, 0)),
        1 => Just(t(i64::MIN, 0)),
        1 => Just(t(0, -1)),
        1 => any::<(i64, i32)>().prop_map(move |(s, n)| t(s, n)),
    ]
    .boxed()
}

fn bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..64),
        1 => Just(vec![0xa5; 64 * 1024 + 1]),
        1 => Just(vec![0xff; HUGE + 1]),
    ]
    .boxed()
}

fn any_message() -> BoxedStrategy<Option<Any>> {
    prop_oneof![
        2 => Just(None),
        2 => (small_text(&[]), vec(any::<u8>(), 0..32))
            .prop_map(|(type_url, value)| Some(Any { type_url, value })),
        1 => vec(any::<u8>(), 0..32).prop_map(|value| Some(Any {
            type_url: "type.googleapis.com/tidemark.replicator.v1.BackfillAttributeSpec".into(),
            value,
        })),
        1 => Just(Some(Any {
            type_url: "type.googleapis.com/x".into(),
            value: vec![0; HUGE + 1],
        })),
    ]
    .boxed()
}

fn counters() -> BoxedStrategy<HashMap<String, i64>> {
    prop_oneof![
        3 => hash_map(small_text(&[]), i64s(), 0..4),
        1 => hash_map("[a-z]{1,8}", Just(1_i64), 65..70),
    ]
    .boxed()
}

fn value(v: common::attribute_value::Value) -> common::AttributeValue {
    common::AttributeValue { value: Some(v) }
}

/// An attribute value nested `depth` levels, lists and maps alternating.
fn nested(depth: usize) -> common::AttributeValue {
    use common::attribute_value::Value;
    let mut v = value(Value::S("bottom".into()));
    for level in 0..depth {
        v = if level % 2 == 0 {
            value(Value::L(common::ListValue { values: vec![v] }))
        } else {
            value(Value::M(common::MapValue {
                attributes: BTreeMap::from([("k".to_owned(), v)]),
            }))
        };
    }
    v
}

fn number_text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => pick(
            [
                "42", "-0.5", "1.5E+10", "NaN", "Infinity", "", "1e999", "-1E-131",
                "0x10", "1.2.3", " 1", "99999999999999999999999999999999999999999",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        1 => "-?[0-9]{1,40}(\\.[0-9]{1,5})?([eE][-+]?[0-9]{1,4})?",
    ]
    .boxed()
}

fn attribute_value() -> BoxedStrategy<common::AttributeValue> {
    use common::attribute_value::Value;
    let leaf = prop_oneof![
        small_text(&[]).prop_map(|s| value(Value::S(s))),
        number_text().prop_map(|n| value(Value::N(n))),
        vec(any::<u8>(), 0..16).prop_map(|b| value(Value::B(b))),
        any::<bool>().prop_map(|b| value(Value::BoolValue(b))),
        enum_value(0).prop_map(|n| value(Value::NullValue(n))),
        vec(small_text(&[]), 0..3)
            .prop_map(|values| value(Value::Ss(common::StringSet { values }))),
        vec(number_text(), 0..3).prop_map(|values| value(Value::Ns(common::NumberSet { values }))),
        vec(vec(any::<u8>(), 0..2), 0..3)
            .prop_map(|values| value(Value::Bs(common::BinarySet { values }))),
        Just(common::AttributeValue { value: None }),
    ];
    let tree = leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4)
                .prop_map(|values| value(Value::L(common::ListValue { values }))),
            btree_map(small_text(&[]), inner, 0..4)
                .prop_map(|attributes| value(Value::M(common::MapValue { attributes }))),
        ]
    });
    prop_oneof![
        8 => tree,
        1 => (100_usize..=160).prop_map(nested),
        1 => (30_usize..=60).prop_map(nested),
    ]
    .boxed()
}

fn optional<T: Debug + Clone + 'static>(s: BoxedStrategy<T>) -> BoxedStrategy<Option<T>> {
    prop_oneof![1 => Just(None), 4 => s.prop_map(Some)].boxed()
}

fn key() -> BoxedStrategy<common::Key> {
    btree_map(
        small_text(&["id".into(), "pk".into()]),
        attribute_value(),
        0..3,
    )
    .prop_map(|attributes| common::Key { attributes })
    .boxed()
}

fn data_store() -> BoxedStrategy<Option<common::DataStore>> {
    use common::data_store::Store;
    let tables = ["fuzz_src".to_owned(), "fuzz_dst".to_owned()];
    let endpoint = prop_oneof![
        3 => Just(String::new()),
        1 => pick(
            ["http://127.0.0.1:1", "not a url", "ftp://x", "http://", "https://[::1"]
                .map(str::to_owned)
                .to_vec()
        ),
        1 => small_text(&[]),
    ];
    let store = prop_oneof![
        4 => (text(&tables), small_text(&[]), vec(small_text(&["id".into()]), 0..3)).prop_map(
            |(table_name, database, key_attribute_names)| {
                Store::SqliteTable(common::SqliteTableRef {
                    table_name,
                    database,
                    key_attribute_names,
                })
            }
        ),
        1 => (text(&tables), endpoint.clone(), small_text(&[])).prop_map(
            |(table_name, endpoint, region)| Store::DynamodbTable(common::DynamoDbTableRef {
                table_name,
                endpoint,
                region,
            })
        ),
        1 => (text(&[]), endpoint.clone()).prop_map(|(index, endpoint)| {
            Store::ElasticsearchIndex(common::ElasticsearchIndexRef { index, endpoint })
        }),
        1 => (text(&[]), small_text(&[]), endpoint).prop_map(|(bucket, prefix, endpoint)| {
            Store::S3Prefix(common::S3PrefixRef {
                bucket,
                prefix,
                endpoint,
                region: String::new(),
            })
        }),
        1 => (text(&[]), small_text(&[])).prop_map(|(topic, bootstrap_servers)| {
            Store::KafkaTopic(common::KafkaTopicRef {
                topic,
                bootstrap_servers,
            })
        }),
    ];
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(common::DataStore { store: None })),
        6 => store.prop_map(|s| Some(common::DataStore { store: Some(s) })),
    ]
    .boxed()
}

fn template() -> BoxedStrategy<String> {
    prop_oneof![
        3 => pick(
            [
                "", "{id}", "{", "}", "{{", "}}", "{unclosed", "{}", "{a}{b}", "x{{y}}z",
                "{a.b}", "{{{", "{ id }", "{\0}",
            ]
            .map(str::to_owned)
            .to_vec()
        ),
        1 => "[{}a-z#]{0,12}",
        1 => Just("{".repeat(HUGE)),
    ]
    .boxed()
}

fn transform() -> BoxedStrategy<Option<common::Transform>> {
    let filter = (small_text(&[]), enum_value(3), duration()).prop_map(
        |(attribute_name, encoding, max_age)| common::RecencyFilter {
            attribute_name,
            encoding,
            max_age,
        },
    );
    optional(
        (
            vec(small_text(&["id".into()]), 0..4),
            hash_map(small_text(&["id".into()]), small_text(&["id".into()]), 0..3),
            template(),
            template(),
            optional(filter.boxed()),
        )
            .prop_map(
                |(projection, renames, document_id_template, index_name_template, filter)| {
                    common::Transform {
                        projection,
                        renames,
                        document_id_template,
                        index_name_template,
                        filter,
                    }
                },
            )
            .boxed(),
    )
}

fn cron() -> BoxedStrategy<String> {
    prop_oneof![
        3 => pick(
            [
                "", "* * * * *", "0 0 * * *", "61 * * * *", "not a cron", "* * * * * * * *",
                "0 0 31 2 *", "*/0 * * * *", "@hourly", "0 0 * * 8",
            ]
            .map(str::to_owned)
            .to_vec()
        ),
        1 => "[0-9*/, -]{0,20}",
        1 => Just("*".repeat(HUGE)),
    ]
    .boxed()
}

fn schedule() -> BoxedStrategy<Option<jt::Schedule>> {
    let zone = pick(
        [
            "",
            "UTC",
            "Europe/Paris",
            "Mars/Olympus",
            "../../etc/passwd",
            "+25:00",
        ]
        .map(str::to_owned)
        .to_vec(),
    );
    optional(
        (cron(), zone, duration(), timestamp(), timestamp())
            .prop_map(
                |(cron, time_zone, max_wait, start_time, end_time)| jt::Schedule {
                    cron,
                    time_zone,
                    max_wait,
                    start_time,
                    end_time,
                },
            )
            .boxed(),
    )
}

/// Unit lists; `over_limit` adds one over AddUnits' documented 10000 (not
/// for StartRun, which has no limit: 10001 units would only be slow).
fn unit_specs(seeds: &Seeds, over_limit: bool) -> BoxedStrategy<Vec<jt::UnitSpec>> {
    let units = seeds.units.clone();
    let plain = prop_oneof![
        4 => vec(
            (small_text(&units), vec(small_text(&units), 0..3)).prop_map(
                |(unit_key, after_unit_keys)| jt::UnitSpec {
                    unit_key,
                    after_unit_keys,
                    ..Default::default()
                }
            ),
            0..5
        ),
        // A cycle and a dependency on itself.
        1 => Just(vec![
            jt::UnitSpec { unit_key: "a".into(), after_unit_keys: vec!["b".into()], ..Default::default() },
            jt::UnitSpec { unit_key: "b".into(), after_unit_keys: vec!["a".into()], ..Default::default() },
        ]),
        1 => Just(vec![jt::UnitSpec { unit_key: "a".into(), after_unit_keys: vec!["a".into()], ..Default::default() }]),
    ]
    .boxed();
    if !over_limit {
        return plain;
    }
    let over: Vec<_> = (0..10_001)
        .map(|i| jt::UnitSpec {
            unit_key: format!("u{i}"),
            after_unit_keys: vec![],
            ..Default::default()
        })
        .collect();
    prop_oneof![6 => plain, 1 => Just(over)].boxed()
}

fn job(seeds: &Seeds) -> BoxedStrategy<Option<jt::Job>> {
    optional(
        (
            text(&seeds.jobs),
            enum_value(5),
            text(&[]),
            any_message(),
            schedule(),
            texts(&seeds.units),
            any::<bool>(),
            u32s(),
            u32s(),
        )
            .prop_map(
                |(
                    name,
                    kind,
                    description,
                    spec,
                    schedule,
                    default_unit_keys,
                    explicit_completion,
                    max_attempts,
                    max_concurrent_units,
                )| jt::Job {
                    name,
                    kind,
                    description,
                    spec,
                    schedule,
                    default_unit_keys,
                    explicit_completion,
                    max_attempts,
                    max_concurrent_units,
                    ..Default::default()
                },
            )
            .boxed(),
    )
}

fn sinks(seeds: &Seeds) -> BoxedStrategy<Vec<rp::Sink>> {
    vec(
        (
            small_text(&seeds.sinks),
            data_store(),
            transform(),
            small_text(&[]),
            duration(),
            0..4i32,
            u32s(),
        )
            .prop_map(
                |(
                    name,
                    store,
                    transform,
                    version_attribute,
                    tombstone_retention,
                    kafka_format,
                    writes_in_flight,
                )| {
                    rp::Sink {
                        name,
                        store,
                        transform,
                        version_attribute,
                        tombstone_retention,
                        kafka_format,
                        writes_in_flight,
                    }
                },
            ),
        0..3,
    )
    .boxed()
}

fn change_feed() -> BoxedStrategy<Option<rp::ChangeFeed>> {
    use rp::change_feed::Feed;
    let feed = prop_oneof![
        3 => enum_value(2).prop_map(|start_position| Feed::EmbeddedChangeLog(
            rp::EmbeddedChangeLogFeed { start_position }
        )),
        1 => (enum_value(2), u32s()).prop_map(|(start_position, readers)| Feed::DynamodbStreams(
            rp::DynamoDbStreamsFeed { start_position, readers }
        )),
        1 => (small_text(&[]), small_text(&[]), enum_value(2), u32s()).prop_map(
            |(topic, consumer_group, start_position, consumers)| Feed::Kafka(rp::KafkaFeed {
                topic: Some(common::KafkaTopicRef { topic, bootstrap_servers: String::new() }),
                consumer_group,
                start_position,
                consumers,
            })
        ),
    ];
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(rp::ChangeFeed { feed: None })),
        4 => feed.prop_map(|f| Some(rp::ChangeFeed { feed: Some(f) })),
    ]
    .boxed()
}

fn pipeline_spec(seeds: &Seeds) -> BoxedStrategy<Option<rp::PipelineSpec>> {
    let backfill = (
        enum_value(4),
        u32s(),
        u32s(),
        small_text(&[]),
        small_text(&[]),
        u32s(),
    )
        .prop_map(
            |(mode, segments, chunk_size, watermark_key_prefix, touch_attribute, rate)| {
                rp::BackfillOptions {
                    mode,
                    segments,
                    chunk_size,
                    watermark_key_prefix,
                    touch_attribute,
                    read_units_per_second: rate,
                }
            },
        );
    optional(
        (
            data_store(),
            change_feed(),
            sinks(seeds),
            optional(backfill.boxed()),
            small_text(&[]),
            data_store(),
            small_text(&[]),
            small_text(&[]),
        )
            .prop_map(
                |(
                    source,
                    feed,
                    sinks,
                    backfill,
                    version_attribute,
                    dead_letter_store,
                    origin,
                    skip_origin,
                )| {
                    rp::PipelineSpec {
                        source,
                        feed,
                        sinks,
                        backfill,
                        version_attribute,
                        dead_letter_store,
                        origin,
                        skip_origin,
                    }
                },
            )
            .boxed(),
    )
}

fn check() -> BoxedStrategy<vf::Check> {
    use vf::check::Kind;
    let predicate = prop_oneof![
        3 => pick(
            [
                "", "attribute_exists(a)", "#a = :v", "((((", ":v", "a = :missing", "a BETWEEN",
                "size(a) > :v", "NOT", "a = :v AND OR b", "begins_with(a, :v)", "#missing = :v",
            ]
            .map(str::to_owned)
            .to_vec()
        ),
        1 => any::<String>(),
        1 => Just("(".repeat(HUGE / 2)),
    ];
    let kind = prop_oneof![
        (small_text(&[]), vec(small_text(&[]), 0..3), small_text(&[])).prop_map(
            |(unit_attribute, unit_keys, index_name)| Kind::Count(vf::CountCheck {
                unit_attribute,
                unit_keys,
                index_name,
            })
        ),
        (
            enum_value(2),
            predicate,
            hash_map(small_text(&["#a".into()]), small_text(&["a".into()]), 0..2),
            hash_map(small_text(&[":v".into()]), attribute_value(), 0..2),
            i64s(),
        )
            .prop_map(|(side, filter_expression, names, values, expected_count)| {
                Kind::Predicate(vf::PredicateCheck {
                    side,
                    filter_expression,
                    expression_attribute_names: names,
                    expression_attribute_values: values,
                    expected_count,
                })
            }),
        (u32s(), any::<bool>()).prop_map(|(buckets, versions_only)| Kind::Digest(
            vf::DigestCheck {
                buckets,
                versions_only
            }
        )),
    ];
    (small_text(&["c".into()]), optional(kind.boxed()))
        .prop_map(|(name, kind)| vf::Check { name, kind })
        .boxed()
}

fn verification_spec(seeds: &Seeds) -> BoxedStrategy<Option<vf::VerificationSpec>> {
    let recheck = (u32s(), duration(), small_text(&seeds.pipelines)).prop_map(
        |(rounds, min_wait, pipeline_name)| vf::RecheckPolicy {
            rounds,
            min_wait,
            pipeline_name,
        },
    );
    optional(
        (
            data_store(),
            data_store(),
            transform(),
            small_text(&[]),
            vec(check(), 0..3),
            optional(recheck.boxed()),
            any::<bool>(),
            u32s(),
            u32s(),
        )
            .prop_map(
                |(
                    source,
                    target,
                    transform,
                    version_attribute,
                    checks,
                    recheck,
                    repair,
                    segments,
                    sample_size,
                )| {
                    vf::VerificationSpec {
                        source,
                        target,
                        transform,
                        version_attribute,
                        checks,
                        recheck,
                        repair,
                        segments,
                        sample_size,
                    }
                },
            )
            .boxed(),
    )
}

fn events() -> BoxedStrategy<Vec<st::Event>> {
    use st::event::Op;
    let op = prop_oneof![
        1 => Just(None),
        3 => i64s().prop_map(|delta| Some(Op::Increment(st::Increment { delta }))),
        2 => number_text().prop_map(|value| Some(Op::Replace(st::Replace { value }))),
    ];
    let event = (
        small_text(&[]),
        small_text(&[]),
        small_text(&[]),
        op,
        timestamp(),
    )
        .prop_map(|(event_id, entity_key, metric, op, event_time)| st::Event {
            event_id,
            entity_key,
            metric,
            op,
            event_time,
        });
    prop_oneof![
        6 => vec(event, 0..6),
        1 => Just(vec![
            st::Event {
                event_id: "x".repeat(HUGE),
                entity_key: "e".into(),
                metric: "m".into(),
                op: Some(Op::Increment(st::Increment { delta: 1 })),
                event_time: None,
            }
        ]),
        1 => Just(
            (0..10_001)
                .map(|i| st::Event {
                    event_id: format!("bulk-{i}"),
                    entity_key: "e".into(),
                    metric: "m".into(),
                    op: Some(Op::Increment(st::Increment { delta: 1 })),
                    event_time: None,
                })
                .collect()
        ),
    ]
    .boxed()
}

// ---------------------------------------------------------------- the test

/// Counts panics on the fuzzed host's threads (and keeps the usual report).
fn count_host_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(THREAD_NAME) {
            HOST_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
}

/// The seed of the suite's run (every RPC passes with it).
const DEFAULT_SEED: &str = "38146b8178ed1f241cbd7f167ca091278d500e5df4f6e59dd675caffc932fdbd";

fn runner() -> (TestRunner, String) {
    // A fixed seed by default, so the test suite is deterministic; a new
    // exploration is `TIDEMARK_FUZZ_SEED=random` (its seed is printed with
    // any finding, to replay it).
    let chosen = std::env::var("TIDEMARK_FUZZ_SEED").unwrap_or_else(|_| DEFAULT_SEED.to_owned());
    let seed: [u8; 32] = match (chosen != "random").then_some(chosen) {
        Some(hex) => (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex seed"))
            .collect::<Vec<_>>()
            .try_into()
            .expect("a 64-digit hex seed"),
        None => rand_seed(),
    };
    let shown = seed.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
    (TestRunner::new_with_rng(Config::default(), rng), shown)
}

fn rand_seed() -> [u8; 32] {
    let mut runner = TestRunner::default();
    let mut seed = [0; 32];
    for b in &mut seed {
        *b = any::<u8>().new_tree(&mut runner).expect("a byte").current();
    }
    seed
}

#[test]
fn every_rpc_rejects_bad_input_with_a_field_and_the_right_code() {
    count_host_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(THREAD_NAME)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(fuzz_every_rpc());
}

async fn fuzz_every_rpc() {
    let started = Instant::now();
    let dev = spawn_dev().await;
    let (runner, seed) = runner();
    let cases = std::env::var("TIDEMARK_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut f = Fuzzer {
        runner,
        channel: dev.channel().await,
        cases,
        findings: Vec::new(),
        calls: 0,
        per_rpc: Vec::new(),
    };
    let seeds = plant_seeds(&f).await;
    println!("fuzz seed {seed}, {cases} cases per RPC, seeds {seeds:?}");

    fuzz_job_tracker(&mut f, &seeds).await;
    fuzz_replicator(&mut f, &seeds).await;
    fuzz_stats_aggregator(&mut f).await;
    fuzz_verifier(&mut f, &seeds).await;

    // The host still serves after all that.
    let alive = f.jt().list_jobs(jt::ListJobsRequest::default()).await;
    assert!(alive.is_ok(), "the host stopped serving: {alive:?}");
    assert!(
        dev.task.as_ref().is_some_and(|t| !t.is_finished()),
        "the host task ended"
    );
    let mut slowest = f.per_rpc.clone();
    slowest.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    println!(
        "{} calls over {} RPCs in {:?}; slowest {:?}",
        f.calls,
        f.per_rpc.len(),
        started.elapsed(),
        &slowest[..slowest.len().min(5)]
    );
    assert_eq!(
        f.per_rpc.len(),
        46,
        "every RPC of the four services is fuzzed"
    );
    assert!(
        f.findings.is_empty(),
        "{} findings (seed {seed}):\n{}",
        f.findings.len(),
        f.findings.join("\n")
    );
    assert_eq!(HOST_PANICS.load(Ordering::SeqCst), 0, "the host panicked");
}

/// A job with a run and a claimed unit, a pipeline and a verification, so
/// fuzzed requests can name things that exist.
async fn plant_seeds(f: &Fuzzer) -> Seeds {
    let mut seeds = Seeds {
        jobs: vec!["fuzz-seed".into()],
        units: vec!["u1".into(), "u2".into()],
        sinks: vec!["copy".into()],
        ..Seeds::default()
    };
    f.jt()
        .create_job(jt::CreateJobRequest {
            job: Some(jt::Job {
                name: "fuzz-seed".into(),
                kind: jt::JobKind::UnitMigration as i32,
                explicit_completion: true,
                max_concurrent_units: 1,
                ..Default::default()
            }),
        })
        .await
        .expect("create the seed job");
    let run = f
        .jt()
        .start_run(jt::StartRunRequest {
            job_name: "fuzz-seed".into(),
            units: vec![
                jt::UnitSpec {
                    unit_key: "u1".into(),
                    after_unit_keys: vec![],
                    ..Default::default()
                },
                jt::UnitSpec {
                    unit_key: "u2".into(),
                    after_unit_keys: vec!["u1".into()],
                    ..Default::default()
                },
            ],
            actor: "fuzz".into(),
            ..Default::default()
        })
        .await
        .expect("start the seed run")
        .into_inner()
        .run
        .expect("a run");
    seeds.runs.push(run.run_id.clone());
    // A worker of the host may claim it first; the seed is then still a
    // unit that exists.
    let claimed = f
        .jt()
        .claim_unit(jt::ClaimUnitRequest {
            worker_id: "fuzz".into(),
            run_id: run.run_id.clone(),
            unit_key: "u1".into(),
            lease_duration: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await;
    match claimed.map(|c| c.into_inner().unit.and_then(|u| u.lease)) {
        Ok(Some(lease)) => seeds.tokens.push(lease.fencing_token),
        other => println!("the seed unit was not claimed: {other:?}"),
    }
    let sqlite = |table: &str| {
        Some(common::DataStore {
            store: Some(common::data_store::Store::SqliteTable(
                common::SqliteTableRef {
                    table_name: table.into(),
                    key_attribute_names: vec!["id".into()],
                    ..Default::default()
                },
            )),
        })
    };
    match f
        .rp()
        .create_pipeline(rp::CreatePipelineRequest {
            name: "fuzz-pipe".into(),
            spec: Some(rp::PipelineSpec {
                source: sqlite("fuzz_src"),
                feed: Some(rp::ChangeFeed {
                    feed: Some(rp::change_feed::Feed::EmbeddedChangeLog(
                        rp::EmbeddedChangeLogFeed::default(),
                    )),
                }),
                sinks: vec![rp::Sink {
                    name: "copy".into(),
                    store: sqlite("fuzz_dst"),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            actor: "fuzz".into(),
            validate_only: false,
        })
        .await
    {
        Ok(_) => seeds.pipelines.push("fuzz-pipe".into()),
        Err(e) => println!("no seed pipeline: {e:?}"),
    }
    match f
        .vf()
        .start_verification(vf::StartVerificationRequest {
            job_name: "fuzz-verify".into(),
            spec: Some(vf::VerificationSpec {
                source: sqlite("fuzz_src"),
                target: sqlite("fuzz_dst"),
                checks: vec![vf::Check {
                    name: "c".into(),
                    kind: Some(vf::check::Kind::Digest(vf::DigestCheck::default())),
                }],
                ..Default::default()
            }),
            actor: "fuzz".into(),
            ..Default::default()
        })
        .await
    {
        Ok(started) => {
            let started = started.into_inner();
            seeds.verifications.push(started.verification_id);
            seeds.jobs.push(started.job_name);
        }
        Err(e) => println!("no seed verification: {e:?}"),
    }
    seeds
}

/// Reads the first message of a server stream (or its error) and drops it.
async fn first_message<T>(
    opened: Result<tonic::Response<tonic::Streaming<T>>, Status>,
) -> Result<(), Status> {
    let mut stream = opened?.into_inner();
    match tokio::time::timeout(FIRST_MESSAGE, stream.message()).await {
        Ok(Err(status)) => Err(status),
        // A message, the end, or nothing yet: all fine for a stream.
        Ok(Ok(_)) | Err(_) => Ok(()),
    }
}

async fn fuzz_job_tracker(f: &mut Fuzzer, s: &Seeds) {
    let client = f.jt();
    let jobs = &s.jobs;
    let runs = &s.runs;
    let units = &s.units;
    f.fuzz(
        rpc("CreateJob", &["job"], &[IA, AE], true),
        job(s).prop_map(|job| jt::CreateJobRequest { job }),
        |r| {
            let mut c = client.clone();
            async move { c.create_job(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("GetJob", &["name"], &[IA, NF], false),
        text(jobs).prop_map(|name| jt::GetJobRequest { name }),
        |r| {
            let mut c = client.clone();
            async move { c.get_job(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "ListJobs",
            &["kind", "page_size", "page_token"],
            &[IA],
            false,
        ),
        (enum_value(5), page_size(), page_token()).prop_map(|(kind, page_size, page_token)| {
            jt::ListJobsRequest {
                kind,
                page_size,
                page_token,
            }
        }),
        |r| {
            let mut c = client.clone();
            async move { c.list_jobs(r).await.map(drop) }
        },
    )
    .await;
    let mask = prop_oneof![
        1 => Just(None),
        4 => vec(
            small_text(&[]).prop_union(pick(
                [
                    "description", "spec", "schedule", "default_unit_keys", "explicit_completion",
                    "max_attempts", "max_concurrent_units", "name", "kind", "revision", "*",
                ]
                .map(str::to_owned)
                .to_vec()
            ).boxed()),
            0..4
        )
        .prop_map(|paths| Some(FieldMask { paths })),
    ];
    f.fuzz(
        rpc(
            "UpdateJob",
            &["job", "update_mask", "expected_revision", "actor"],
            &[IA, NF, FP],
            true,
        ),
        (job(s), mask, u64s(&[]), text(&[])).prop_map(
            |(job, update_mask, expected_revision, actor)| jt::UpdateJobRequest {
                job,
                update_mask,
                expected_revision,
                actor,
            },
        ),
        |r| {
            let mut c = client.clone();
            async move { c.update_job(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "StartRun",
            &[
                "job_name",
                "units",
                "trigger",
                "correlation_id",
                "actor",
                "reason",
                "force_remigrate",
                "window_start",
            ],
            &[IA, NF, FP],
            true,
        ),
        (
            text(jobs),
            unit_specs(s, false),
            enum_value(3),
            text(&[]),
            text(&[]),
            text(&[]),
            any::<bool>(),
            timestamp(),
        )
            .prop_map(
                |(job_name, units, trigger, correlation_id, actor, reason, force, window_start)| {
                    jt::StartRunRequest {
                        job_name,
                        units,
                        trigger,
                        correlation_id,
                        actor,
                        reason,
                        force_remigrate: force,
                        window_start,
                    }
                },
            ),
        |r| {
            let mut c = client.clone();
            async move { c.start_run(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("GetRun", &["run_id"], &[IA, NF], false),
        text(runs).prop_map(|run_id| jt::GetRunRequest { run_id }),
        |r| {
            let mut c = client.clone();
            async move { c.get_run(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "ListRuns",
            &["job_name", "statuses", "page_size", "page_token"],
            &[IA, NF],
            false,
        ),
        (text(jobs), enums(6), page_size(), page_token()).prop_map(
            |(job_name, statuses, page_size, page_token)| jt::ListRunsRequest {
                job_name,
                statuses,
                page_size,
                page_token,
            },
        ),
        |r| {
            let mut c = client.clone();
            async move { c.list_runs(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "AddUnits",
            &["run_id", "units", "actor"],
            &[IA, NF, FP],
            true,
        ),
        (text(runs), unit_specs(s, true), text(&[])).prop_map(|(run_id, units, actor)| {
            jt::AddUnitsRequest {
                run_id,
                units,
                actor,
            }
        }),
        |r| {
            let mut c = client.clone();
            async move { c.add_units(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "ListUnits",
            &["run_id", "statuses", "unit_keys", "page_size", "page_token"],
            &[IA, NF],
            false,
        ),
        (
            text(runs),
            enums(5),
            texts(units),
            page_size(),
            page_token(),
        )
            .prop_map(|(run_id, statuses, unit_keys, page_size, page_token)| {
                jt::ListUnitsRequest {
                    run_id,
                    statuses,
                    unit_keys,
                    page_size,
                    page_token,
                }
            }),
        |r| {
            let mut c = client.clone();
            async move { c.list_units(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "ClaimUnit",
            &[
                "worker_id",
                "kinds",
                "job_name",
                "run_id",
                "unit_key",
                "lease_duration",
                "wait",
            ],
            &[IA, NF, FP],
            false,
        ),
        (
            text(&[]),
            // Only kinds no worker of the host executes would be safe; a
            // claim of a real kind just takes a unit, which is fine.
            enums(5),
            text(jobs),
            text(runs),
            text(units),
            duration(),
            duration(),
        )
            .prop_map(
                |(worker_id, kinds, job_name, run_id, unit_key, lease_duration, wait)| {
                    jt::ClaimUnitRequest {
                        worker_id,
                        kinds,
                        job_name,
                        run_id,
                        unit_key,
                        lease_duration,
                        wait,
                    }
                },
            ),
        |r| {
            let mut c = client.clone();
            async move { c.claim_unit(r).await.map(drop) }
        },
    )
    .await;
    let unit_fields: &[&str] = &["run_id", "unit_key", "fencing_token", "lease_duration"];
    f.fuzz(
        rpc("Heartbeat", unit_fields, &[IA, NF, FP], false),
        (text(runs), text(units), u64s(&s.tokens), duration()).prop_map(
            |(run_id, unit_key, fencing_token, lease_duration)| jt::HeartbeatRequest {
                run_id,
                unit_key,
                fencing_token,
                lease_duration,
            },
        ),
        |r| {
            let mut c = client.clone();
            async move { c.heartbeat(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "Checkpoint",
            &[
                "run_id",
                "unit_key",
                "fencing_token",
                "checkpoint",
                "items_processed",
                "items_failed",
                "items_estimated",
                "counters",
                "lease_duration",
            ],
            &[IA, NF, FP],
            false,
        ),
        (
            text(runs),
            text(units),
            u64s(&s.tokens),
            bytes(),
            i64s(),
            i64s(),
            i64s(),
            counters(),
            duration(),
        )
            .prop_map(
                |(
                    run_id,
                    unit_key,
                    fencing_token,
                    checkpoint,
                    items_processed,
                    items_failed,
                    items_estimated,
                    counters,
                    lease_duration,
                )| jt::CheckpointRequest {
                    run_id,
                    unit_key,
                    fencing_token,
                    checkpoint,
                    items_processed,
                    items_failed,
                    items_estimated,
                    counters,
                    lease_duration,
                },
            ),
        |r| {
            let mut c = client.clone();
            async move { c.checkpoint(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "CompleteUnit",
            &[
                "run_id",
                "unit_key",
                "fencing_token",
                "items_processed",
                "items_failed",
                "counters",
                "result",
                "end_run.error",
            ],
            &[IA, NF, FP],
            false,
        ),
        (
            text(runs),
            text(units),
            u64s(&s.tokens),
            i64s(),
            i64s(),
            counters(),
            any_message(),
        )
            .prop_map(
                |(
                    run_id,
                    unit_key,
                    fencing_token,
                    items_processed,
                    items_failed,
                    counters,
                    result,
                )| {
                    jt::CompleteUnitRequest {
                        run_id,
                        unit_key,
                        fencing_token,
                        items_processed,
                        items_failed,
                        counters,
                        result,
                        route_to_target: fencing_token % 2 == 0,
                        // Failed with an empty error (refused) or one.
                        end_run: (fencing_token % 3 != 0).then(|| jt::RunEnd {
                            failed: fencing_token % 3 == 1,
                            error: if items_failed % 2 == 0 {
                                String::new()
                            } else {
                                format!("{items_failed} mismatches")
                            },
                            // Any time, valid or not (nanos out of range).
                            last_processed: (fencing_token % 5 == 0).then(|| jt::Watermark {
                                time: Some(Timestamp {
                                    seconds: items_processed,
                                    nanos: i32::try_from(items_failed % 2_000_000_000).unwrap_or(0),
                                }),
                                position: String::new(),
                            }),
                        }),
                    }
                },
            ),
        |r| {
            let mut c = client.clone();
            async move { c.complete_unit(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "FailUnit",
            &[
                "run_id",
                "unit_key",
                "fencing_token",
                "error",
                "retryable",
                "rolled_back",
                "items_processed",
                "items_failed",
                "counters",
            ],
            &[IA, NF, FP],
            false,
        ),
        (
            text(runs),
            text(units),
            u64s(&s.tokens),
            text(&[]),
            any::<(bool, bool)>(),
            i64s(),
            i64s(),
            counters(),
        )
            .prop_map(
                |(
                    run_id,
                    unit_key,
                    fencing_token,
                    error,
                    (retryable, rolled_back),
                    items_processed,
                    items_failed,
                    counters,
                )| jt::FailUnitRequest {
                    run_id,
                    unit_key,
                    fencing_token,
                    error,
                    retryable,
                    rolled_back,
                    items_processed,
                    items_failed,
                    counters,
                },
            ),
        |r| {
            let mut c = client.clone();
            async move { c.fail_unit(r).await.map(drop) }
        },
    )
    .await;
    let watermark = optional(
        (timestamp(), text(&[]))
            .prop_map(|(time, position)| jt::Watermark { time, position })
            .boxed(),
    );
    f.fuzz(
        rpc(
            "CompleteRun",
            &["run_id", "last_processed", "result", "actor"],
            &[IA, NF, FP],
            false,
        ),
        (text(runs), watermark, any_message(), text(&[])).prop_map(
            |(run_id, last_processed, result, actor)| jt::CompleteRunRequest {
                run_id,
                last_processed,
                result,
                actor,
            },
        ),
        |r| {
            let mut c = client.clone();
            async move { c.complete_run(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "FailRun",
            &["run_id", "error", "result", "actor"],
            &[IA, NF, FP],
            false,
        ),
        (text(runs), text(&[]), any_message(), text(&[])).prop_map(
            |(run_id, error, result, actor)| jt::FailRunRequest {
                run_id,
                error,
                result,
                actor,
            },
        ),
        |r| {
            let mut c = client.clone();
            async move { c.fail_run(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "AcknowledgeFailure",
            &["job_name", "run_id", "actor", "reason"],
            &[IA, NF, FP],
            false,
        ),
        (text(jobs), text(runs), text(&[]), text(&[])).prop_map(
            |(job_name, run_id, actor, reason)| jt::AcknowledgeFailureRequest {
                job_name,
                run_id,
                actor,
                reason,
            },
        ),
        |r| {
            let mut c = client.clone();
            async move { c.acknowledge_failure(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("WatchRun", &["run_id", "min_interval"], &[IA, NF], false),
        (text(runs), duration()).prop_map(|(run_id, min_interval)| jt::WatchRunRequest {
            run_id,
            min_interval,
        }),
        |r| {
            let mut c = client.clone();
            async move { first_message(c.watch_run(r).await).await }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "ListTransitions",
            &["job_name", "run_id", "unit_key", "page_size", "page_token"],
            &[IA, NF],
            false,
        ),
        (
            text(jobs),
            text(runs),
            text(units),
            page_size(),
            page_token(),
        )
            .prop_map(|(job_name, run_id, unit_key, page_size, page_token)| {
                jt::ListTransitionsRequest {
                    job_name,
                    run_id,
                    unit_key,
                    page_size,
                    page_token,
                }
            }),
        |r| {
            let mut c = client.clone();
            async move { c.list_transitions(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "SetRoute",
            &[
                "job_name",
                "unit_key",
                "target",
                "actor",
                "reason",
                "expected_revision",
            ],
            &[IA, NF, FP],
            false,
        ),
        (
            text(jobs),
            text(units),
            enum_value(2),
            text(&[]),
            text(&[]),
            u64s(&[]),
        )
            .prop_map(
                |(job_name, unit_key, target, actor, reason, expected_revision)| {
                    jt::SetRouteRequest {
                        job_name,
                        unit_key,
                        target,
                        actor,
                        reason,
                        expected_revision,
                    }
                },
            ),
        |r| {
            let mut c = client.clone();
            async move { c.set_route(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("GetRoute", &["job_name", "unit_key"], &[IA, NF], false),
        (text(jobs), text(units))
            .prop_map(|(job_name, unit_key)| jt::GetRouteRequest { job_name, unit_key }),
        |r| {
            let mut c = client.clone();
            async move { c.get_route(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("WatchRoutes", &["job_name"], &[IA, NF], false),
        text(jobs).prop_map(|job_name| jt::WatchRoutesRequest { job_name }),
        |r| {
            let mut c = client.clone();
            async move { first_message(c.watch_routes(r).await).await }
        },
    )
    .await;
}

async fn fuzz_replicator(f: &mut Fuzzer, s: &Seeds) {
    let client = f.rp();
    let pipes = &s.pipelines;
    f.fuzz(
        rpc(
            "CreatePipeline",
            &["name", "spec", "actor", "validate_only"],
            &[IA, NF, FP, AE],
            true,
        ),
        (text(pipes), pipeline_spec(s), text(&[]), any::<bool>()).prop_map(
            |(name, spec, actor, validate_only)| rp::CreatePipelineRequest {
                name,
                spec,
                actor,
                validate_only,
            },
        ),
        |r| {
            let mut c = client.clone();
            async move { c.create_pipeline(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("GetPipeline", &["name"], &[IA, NF], false),
        text(pipes).prop_map(|name| rp::GetPipelineRequest { name }),
        |r| {
            let mut c = client.clone();
            async move { c.get_pipeline(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("ListPipelines", &["page_size", "page_token"], &[IA], false),
        (page_size(), page_token()).prop_map(|(page_size, page_token)| rp::ListPipelinesRequest {
            page_size,
            page_token,
        }),
        |r| {
            let mut c = client.clone();
            async move { c.list_pipelines(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "PausePipeline",
            &["name", "actor", "reason"],
            &[IA, NF, FP],
            false,
        ),
        (text(pipes), text(&[]), text(&[])).prop_map(|(name, actor, reason)| {
            rp::PausePipelineRequest {
                name,
                actor,
                reason,
            }
        }),
        |r| {
            let mut c = client.clone();
            async move { c.pause_pipeline(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("ResumePipeline", &["name", "actor"], &[IA, NF], false),
        (text(pipes), text(&[]))
            .prop_map(|(name, actor)| rp::ResumePipelineRequest { name, actor }),
        |r| {
            let mut c = client.clone();
            async move { c.resume_pipeline(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        // DEADLINE_EXCEEDED is Drain's documented answer to lag that stays.
        rpc(
            "Drain",
            &["name", "timeout"],
            &[IA, NF, FP, Code::DeadlineExceeded],
            false,
        ),
        (text(pipes), duration()).prop_map(|(name, timeout)| rp::DrainRequest { name, timeout }),
        |r| {
            let mut c = client.clone();
            async move { c.drain(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("WatchLag", &["name", "interval"], &[IA, NF], false),
        (text(pipes), duration())
            .prop_map(|(name, interval)| rp::WatchLagRequest { name, interval }),
        |r| {
            let mut c = client.clone();
            async move { first_message(c.watch_lag(r).await).await }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "Repair",
            &["name", "keys", "sink_names"],
            &[IA, NF, FP],
            false,
        ),
        (
            text(pipes),
            prop_oneof![4 => vec(key(), 0..4), 1 => vec(Just(common::Key::default()), 1001..1002)],
            vec(small_text(&s.sinks), 0..3),
        )
            .prop_map(|(name, keys, sink_names)| rp::RepairRequest {
                name,
                keys,
                sink_names,
            }),
        |r| {
            let mut c = client.clone();
            async move { c.repair(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "ListDeadLetters",
            &["name", "sink_name", "page_size", "page_token"],
            &[IA, NF],
            false,
        ),
        (text(pipes), text(&s.sinks), page_size(), page_token()).prop_map(
            |(name, sink_name, page_size, page_token)| rp::ListDeadLettersRequest {
                name,
                sink_name,
                page_size,
                page_token,
            },
        ),
        |r| {
            let mut c = client.clone();
            async move { c.list_dead_letters(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "ReplayDeadLetters",
            &["name", "ids", "sink_name"],
            &[IA, NF],
            false,
        ),
        (text(pipes), texts(&[]), text(&s.sinks)).prop_map(|(name, ids, sink_name)| {
            rp::ReplayDeadLettersRequest {
                name,
                ids,
                sink_name,
            }
        }),
        |r| {
            let mut c = client.clone();
            async move { c.replay_dead_letters(r).await.map(drop) }
        },
    )
    .await;
    let backfill_spec = optional(
        (
            data_store(),
            text(&["id".into()]),
            optional(attribute_value()),
            u32s(),
            u32s(),
            u32s(),
        )
            .prop_map(
                |(
                    table,
                    attribute_name,
                    value,
                    segments,
                    write_units_per_second,
                    writes_in_flight,
                )| {
                    rp::BackfillAttributeSpec {
                        table,
                        attribute_name,
                        value,
                        segments,
                        write_units_per_second,
                        writes_in_flight,
                    }
                },
            )
            .boxed(),
    );
    f.fuzz(
        rpc(
            "BackfillAttribute",
            &["job_name", "spec", "actor", "correlation_id"],
            &[IA, NF, FP, AE],
            true,
        ),
        (text(&s.jobs), backfill_spec, text(&[]), text(&[])).prop_map(
            |(job_name, spec, actor, correlation_id)| rp::BackfillAttributeRequest {
                job_name,
                spec,
                actor,
                correlation_id,
            },
        ),
        |r| {
            let mut c = client.clone();
            async move { c.backfill_attribute(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "SetBackfillRate",
            &["job_name", "write_units_per_second", "actor"],
            &[IA, NF, FP],
            false,
        ),
        (text(&s.jobs), u32s(), text(&[])).prop_map(|(job_name, rate, actor)| {
            rp::SetBackfillRateRequest {
                job_name,
                write_units_per_second: rate,
                actor,
            }
        }),
        |r| {
            let mut c = client.clone();
            async move { c.set_backfill_rate(r).await.map(drop) }
        },
    )
    .await;
    let migrate_spec = optional(
        (
            data_store(),
            text(&["id".into()]),
            enum_value(2),
            small_text(&[]),
            data_store(),
            transform(),
            small_text(&[]),
        )
            .prop_map(
                |(
                    source,
                    unit_attribute,
                    unit_key_type,
                    index_name,
                    target,
                    transform,
                    version,
                )| {
                    rp::MigrateUnitSpec {
                        source,
                        unit_attribute,
                        unit_key_type,
                        index_name,
                        target,
                        transform,
                        version_attribute: version,
                    }
                },
            )
            .boxed(),
    );
    f.fuzz(
        rpc(
            "MigrateUnit",
            &[
                "job_name",
                "spec",
                "unit_keys",
                "concurrency",
                "force_remigrate",
                "actor",
                "correlation_id",
            ],
            &[IA, NF, FP],
            true,
        ),
        (
            text(&s.jobs),
            migrate_spec,
            prop_oneof![4 => texts(&s.units), 1 => Just((0..10_001).map(|i| format!("u{i}")).collect())],
            u32s(),
            any::<bool>(),
            text(&[]),
            text(&[]),
        )
            .prop_map(
                |(job_name, spec, unit_keys, concurrency, force_remigrate, actor, correlation_id)| {
                    rp::MigrateUnitRequest {
                        job_name,
                        spec,
                        unit_keys,
                        concurrency,
                        force_remigrate,
                        actor,
                        correlation_id,
                    }
                },
            ),
        |r| {
            let mut c = client.clone();
            async move { c.migrate_unit(r).await.map(drop) }
        },
    )
    .await;
    let index = optional(
        (
            small_text(&[]),
            small_text(&[]),
            vec(attribute_value(), 0..3),
        )
            .prop_map(
                |(index_name, partition_attribute, partition_values)| rp::ChangedItemsIndex {
                    index_name,
                    partition_attribute,
                    partition_values,
                },
            )
            .boxed(),
    );
    let extract_spec = optional(
        (
            data_store(),
            text(&[]),
            enum_value(3),
            index,
            u32s(),
            data_store(),
            transform(),
            small_text(&[]),
            duration(),
        )
            .prop_map(
                |(
                    source,
                    changed_at_attribute,
                    changed_at_encoding,
                    index,
                    segments,
                    target,
                    transform,
                    version_attribute,
                    settle_lag,
                )| rp::IncrementalExtractSpec {
                    source,
                    changed_at_attribute,
                    changed_at_encoding,
                    index,
                    segments,
                    target,
                    transform,
                    version_attribute,
                    settle_lag,
                },
            )
            .boxed(),
    );
    f.fuzz(
        rpc(
            "CreateIncrementalExtract",
            &["job_name", "spec", "schedule", "run_now", "actor"],
            &[IA, NF, AE],
            true,
        ),
        (
            text(&s.jobs),
            extract_spec,
            schedule(),
            any::<bool>(),
            text(&[]),
        )
            .prop_map(|(job_name, spec, schedule, run_now, actor)| {
                rp::CreateIncrementalExtractRequest {
                    job_name,
                    spec,
                    schedule,
                    run_now,
                    actor,
                }
            }),
        |r| {
            let mut c = client.clone();
            async move { c.create_incremental_extract(r).await.map(drop) }
        },
    )
    .await;
}

async fn fuzz_stats_aggregator(f: &mut Fuzzer) {
    let client = f.st();
    f.fuzz(
        rpc("Ingest", &["events"], &[IA], false),
        vec(events(), 0..3),
        |batches| {
            let mut c = client.clone();
            let messages = batches
                .into_iter()
                .map(|events| st::IngestRequest { events });
            async move { c.ingest(tokio_stream::iter(messages)).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("IngestBatch", &["events"], &[IA], false),
        events().prop_map(|events| st::IngestBatchRequest { events }),
        |r| {
            let mut c = client.clone();
            async move { c.ingest_batch(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("GetStats", &["entity_key", "metrics"], &[IA, NF], false),
        (text(&["e".into()]), texts(&["m".into()])).prop_map(|(entity_key, metrics)| {
            st::GetStatsRequest {
                entity_key,
                metrics,
            }
        }),
        |r| {
            let mut c = client.clone();
            async move { c.get_stats(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("Flush", &[], &[FP], false),
        Just(st::FlushRequest {}),
        |r| {
            let mut c = client.clone();
            async move { c.flush(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("GetBufferState", &[], &[], false),
        Just(st::GetBufferStateRequest {}),
        |r| {
            let mut c = client.clone();
            async move { c.get_buffer_state(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "PauseWriters",
            &["mode", "reason", "max_pause"],
            &[IA],
            false,
        ),
        (enum_value(2), text(&[]), duration()).prop_map(|(mode, reason, max_pause)| {
            st::PauseWritersRequest {
                mode,
                reason,
                max_pause,
            }
        }),
        |r| {
            let mut c = client.clone();
            async move { c.pause_writers(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("ResumeWriters", &["flush_now"], &[], false),
        any::<bool>().prop_map(|flush_now| st::ResumeWritersRequest { flush_now }),
        |r| {
            let mut c = client.clone();
            async move { c.resume_writers(r).await.map(drop) }
        },
    )
    .await;
}

async fn fuzz_verifier(f: &mut Fuzzer, s: &Seeds) {
    let client = f.vf();
    f.fuzz(
        rpc(
            "StartVerification",
            &["job_name", "spec", "schedule", "actor", "correlation_id"],
            &[IA, NF, FP, AE],
            true,
        ),
        (
            text(&s.jobs),
            verification_spec(s),
            schedule(),
            text(&[]),
            text(&[]),
        )
            .prop_map(|(job_name, spec, schedule, actor, correlation_id)| {
                vf::StartVerificationRequest {
                    job_name,
                    spec,
                    schedule,
                    actor,
                    correlation_id,
                }
            }),
        |r| {
            let mut c = client.clone();
            async move { c.start_verification(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc("GetReport", &["verification_id"], &[IA, NF], false),
        text(&s.verifications).prop_map(|verification_id| vf::GetReportRequest { verification_id }),
        |r| {
            let mut c = client.clone();
            async move { c.get_report(r).await.map(drop) }
        },
    )
    .await;
    f.fuzz(
        rpc(
            "StreamMismatches",
            &["verification_id", "check_name", "kinds", "follow"],
            &[IA, NF, FP],
            false,
        ),
        (
            text(&s.verifications),
            text(&["c".into()]),
            enums(4),
            any::<bool>(),
        )
            .prop_map(|(verification_id, check_name, kinds, follow)| {
                vf::StreamMismatchesRequest {
                    verification_id,
                    check_name,
                    kinds,
                    follow,
                }
            }),
        |r| {
            let mut c = client.clone();
            async move { first_message(c.stream_mismatches(r).await).await }
        },
    )
    .await;
}
