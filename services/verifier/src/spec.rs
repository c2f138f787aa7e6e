//! The validated form of a `VerificationSpec`: every default applied, every
//! bad field a violation naming its path, so the worker never meets a spec
//! it cannot run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tidemark_connectors::predicate::{Predicate, parse_expression};
use tidemark_connectors::proto::value_from_proto;
use tidemark_connectors::transform::Transform;
use tidemark_connectors::value::AttrValue;
use tidemark_kit::FieldError;
use tidemark_proto::common::v1 as common;
use tidemark_proto::common::v1::data_store::Store as PbStore;
use tidemark_proto::verifier::v1 as pb;

/// Digest buckets when the spec says 0.
pub const DEFAULT_BUCKETS: u32 = 1024;
const MAX_BUCKETS: u32 = 1_048_576;

/// One store of a verification, as the spec names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Store {
    Dynamo {
        table: String,
        endpoint: Option<String>,
        region: Option<String>,
    },
    Elasticsearch {
        index: String,
        endpoint: Option<String>,
    },
    S3 {
        bucket: String,
        prefix: String,
        endpoint: Option<String>,
        region: Option<String>,
    },
    Sqlite {
        table: String,
        database: Option<String>,
        key_names: Vec<String>,
    },
    /// A topic read as its latest record per key (a pipeline's Kafka sink).
    Kafka {
        topic: String,
        brokers: Option<String>,
    },
}

impl Store {
    /// Whether a predicate (a DynamoDB filter expression) can be evaluated
    /// on this store: natively by DynamoDB, in process for the embedded one.
    pub fn evaluates_predicates(&self) -> bool {
        matches!(self, Self::Dynamo { .. } | Self::Sqlite { .. })
    }
}

/// Which side of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideKind {
    Source,
    Target,
}

#[derive(Clone, Debug, PartialEq)]
pub enum CheckKind {
    Count {
        /// Counts per unit of this attribute, over `unit_keys`.
        unit_attribute: Option<String>,
        unit_keys: Vec<String>,
    },
    Predicate {
        side: SideKind,
        expression: String,
        names: HashMap<String, String>,
        values: HashMap<String, AttrValue>,
        /// The expression as the embedded store evaluates it.
        parsed: Predicate,
        expected: i64,
    },
    Digest {
        buckets: u32,
        versions_only: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub name: String,
    pub kind: CheckKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recheck {
    pub rounds: u32,
    pub min_wait: Duration,
    pub pipeline: Option<String>,
}

/// A runnable verification.
#[derive(Clone, Debug)]
pub struct Spec {
    pub source: Store,
    pub target: Option<Store>,
    pub transform: Transform,
    /// The transform's renames, to map a target key back to its source key.
    pub renames: BTreeMap<String, String>,
    pub version_attribute: Option<String>,
    pub checks: Vec<Check>,
    pub recheck: Recheck,
    pub repair: bool,
    pub segments: u32,
    pub sample_size: usize,
}

fn opt(s: &str) -> Option<String> {
    (!s.trim().is_empty()).then(|| s.to_owned())
}

fn store(value: Option<&common::DataStore>, field: &str) -> Result<Store, FieldError> {
    let store = value
        .and_then(|s| s.store.as_ref())
        .ok_or_else(|| FieldError::required(field))?;
    let required = |v: &str, name: &str| {
        if v.trim().is_empty() {
            Err(FieldError::required(format!("{field}.{name}")))
        } else {
            Ok(v.to_owned())
        }
    };
    Ok(match store {
        PbStore::DynamodbTable(t) => Store::Dynamo {
            table: required(&t.table_name, "dynamodb_table.table_name")?,
            endpoint: opt(&t.endpoint),
            region: opt(&t.region),
        },
        PbStore::ElasticsearchIndex(i) => Store::Elasticsearch {
            index: required(&i.index, "elasticsearch_index.index")?,
            endpoint: opt(&i.endpoint),
        },
        PbStore::S3Prefix(p) => Store::S3 {
            bucket: required(&p.bucket, "s3_prefix.bucket")?,
            prefix: p.prefix.clone(),
            endpoint: opt(&p.endpoint),
            region: opt(&p.region),
        },
        PbStore::SqliteTable(t) => {
            if t.database.contains(['/', '\\']) || t.database == ".." {
                return Err(FieldError::new(
                    format!("{field}.sqlite_table.database"),
                    "must be a plain name, not a path",
                ));
            }
            if t.key_attribute_names.len() > 2
                || t.key_attribute_names.iter().any(|n| n.trim().is_empty())
            {
                return Err(FieldError::new(
                    format!("{field}.sqlite_table.key_attribute_names"),
                    "must name the partition key and at most a sort key",
                ));
            }
            Store::Sqlite {
                table: required(&t.table_name, "sqlite_table.table_name")?,
                database: opt(&t.database),
                key_names: t.key_attribute_names.clone(),
            }
        }
        PbStore::KafkaTopic(t) => Store::Kafka {
            topic: required(&t.topic, "kafka_topic.topic")?,
            brokers: opt(&t.bootstrap_servers),
        },
    })
}

fn duration(d: &prost_types::Duration, field: &str) -> Result<Duration, FieldError> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(FieldError::new(field, "must not be negative"));
    }
    Ok(Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    ))
}

fn check(c: &pb::Check, field: &str) -> Result<CheckKind, FieldError> {
    use pb::check::Kind;
    Ok(match &c.kind {
        None => {
            return Err(FieldError::new(
                field,
                "exactly one of count, predicate or digest is required",
            ));
        }
        Some(Kind::Count(count)) => {
            let unit_attribute = opt(&count.unit_attribute);
            if unit_attribute.is_some() && count.unit_keys.is_empty() {
                return Err(FieldError::new(
                    format!("{field}.count.unit_keys"),
                    "is required when unit_attribute is set",
                ));
            }
            if unit_attribute.is_none() && !count.unit_keys.is_empty() {
                return Err(FieldError::new(
                    format!("{field}.count.unit_attribute"),
                    "is required when unit_keys are given",
                ));
            }
            // The GSI is an optimisation of the source's count; a filtered
            // scan gives the same counts, so `index_name` is accepted and
            // the scan used.
            CheckKind::Count {
                unit_attribute,
                unit_keys: count.unit_keys.clone(),
            }
        }
        Some(Kind::Predicate(p)) => {
            let side = match pb::Side::try_from(p.side) {
                Ok(pb::Side::Unspecified | pb::Side::Source) => SideKind::Source,
                Ok(pb::Side::Target) => SideKind::Target,
                Err(_) => {
                    return Err(FieldError::new(
                        format!("{field}.predicate.side"),
                        "unknown side",
                    ));
                }
            };
            if p.filter_expression.trim().is_empty() {
                return Err(FieldError::required(format!(
                    "{field}.predicate.filter_expression"
                )));
            }
            let mut values = HashMap::new();
            for (name, value) in &p.expression_attribute_values {
                let v = value_from_proto(value).map_err(|e| {
                    FieldError::new(
                        format!("{field}.predicate.expression_attribute_values[{name:?}]"),
                        e.to_string(),
                    )
                })?;
                values.insert(name.clone(), v);
            }
            let names: HashMap<String, String> = p.expression_attribute_names.clone();
            let parsed = parse_expression(&p.filter_expression, &names, &values)
                .map_err(|e| FieldError::new(format!("{field}.predicate.filter_expression"), e))?;
            if p.expected_count < 0 {
                return Err(FieldError::new(
                    format!("{field}.predicate.expected_count"),
                    "must not be negative",
                ));
            }
            CheckKind::Predicate {
                side,
                expression: p.filter_expression.clone(),
                names,
                values,
                parsed,
                expected: p.expected_count,
            }
        }
        Some(Kind::Digest(d)) => {
            if d.buckets > MAX_BUCKETS {
                return Err(FieldError::new(
                    format!("{field}.digest.buckets"),
                    format!("must be between 1 and {MAX_BUCKETS} (0 means {DEFAULT_BUCKETS})"),
                ));
            }
            CheckKind::Digest {
                buckets: if d.buckets == 0 {
                    DEFAULT_BUCKETS
                } else {
                    d.buckets
                },
                versions_only: d.versions_only,
            }
        }
    })
}

impl Spec {
    /// Validates `spec`; field paths start with `prefix` (e.g. `spec`).
    ///
    /// # Errors
    /// Every violation found, each naming its field.
    pub fn from_proto(spec: &pb::VerificationSpec, prefix: &str) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let f = |name: &str| format!("{prefix}.{name}");
        let source = store(spec.source.as_ref(), &f("source")).map_err(|e| errors.push(e));
        let target = if spec.target.is_some() {
            store(spec.target.as_ref(), &f("target"))
                .map(Some)
                .map_err(|e| errors.push(e))
        } else {
            Ok(None)
        };
        if spec.checks.is_empty() {
            errors.push(FieldError::new(
                f("checks"),
                "at least one check is required",
            ));
        }
        let checks = checks_of(spec, prefix, &mut errors);
        let transform = spec
            .transform
            .as_ref()
            .map(|t| {
                Transform::from_proto(t).map_err(|e| {
                    FieldError::new(format!("{prefix}.transform.{}", e.field), e.reason)
                })
            })
            .transpose()
            .map_err(|e| errors.push(e));
        let recheck = spec.recheck.clone().unwrap_or_default();
        if recheck.rounds > 100 {
            errors.push(FieldError::new(
                f("recheck.rounds"),
                "must be between 0 and 100 (0 means 3)",
            ));
        }
        let min_wait = recheck
            .min_wait
            .as_ref()
            .map(|d| duration(d, &f("recheck.min_wait")))
            .transpose()
            .map_err(|e| errors.push(e));
        let pipeline = opt(&recheck.pipeline_name);
        if spec.repair && pipeline.is_none() {
            errors.push(FieldError::new(
                f("repair"),
                "needs recheck.pipeline_name (the replicator repairs through a pipeline)",
            ));
        }
        if spec.segments > 1000 {
            errors.push(FieldError::new(
                f("segments"),
                "must be between 1 and 1000 (0 means 8)",
            ));
        }
        if spec.sample_size > 1000 {
            errors.push(FieldError::new(
                f("sample_size"),
                "must be between 0 and 1000 (0 means 100)",
            ));
        }
        let (Ok(source), Ok(target), Ok(transform), Ok(min_wait)) =
            (source, target, transform, min_wait)
        else {
            return Err(errors);
        };
        check_sides(&source, target.as_ref(), &checks, prefix, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            source,
            target,
            transform: transform.unwrap_or_default(),
            renames: spec
                .transform
                .as_ref()
                .map(|t| t.renames.clone().into_iter().collect())
                .unwrap_or_default(),
            version_attribute: opt(&spec.version_attribute),
            checks,
            recheck: Recheck {
                rounds: if recheck.rounds == 0 {
                    3
                } else {
                    recheck.rounds
                },
                min_wait: min_wait.unwrap_or(Duration::from_secs(5)),
                pipeline,
            },
            repair: spec.repair,
            segments: if spec.segments == 0 { 8 } else { spec.segments },
            sample_size: if spec.sample_size == 0 {
                100
            } else {
                spec.sample_size as usize
            },
        })
    }
}

/// The checks of `spec`, each validated; names must be unique.
fn checks_of(
    spec: &pb::VerificationSpec,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<Check> {
    let mut names = BTreeSet::new();
    let mut checks = Vec::new();
    for (i, c) in spec.checks.iter().enumerate() {
        let field = format!("{prefix}.checks[{i}]");
        if c.name.trim().is_empty() {
            errors.push(FieldError::required(format!("{field}.name")));
        } else if !names.insert(c.name.clone()) {
            errors.push(FieldError::new(
                format!("{field}.name"),
                format!("duplicate check name {:?}", c.name),
            ));
        }
        match check(c, &field) {
            Ok(kind) => checks.push(Check {
                name: c.name.clone(),
                kind,
            }),
            Err(e) => errors.push(e),
        }
    }
    checks
}

/// What the checks need of the two sides: a target unless every check is a
/// source predicate, predicates only where the store evaluates them, and a
/// side that knows the key schema.
fn check_sides(
    source: &Store,
    target: Option<&Store>,
    checks: &[Check],
    prefix: &str,
    errors: &mut Vec<FieldError>,
) {
    let f = |name: &str| format!("{prefix}.{name}");
    let needs_target = checks.iter().any(|c| {
        !matches!(
            c.kind,
            CheckKind::Predicate {
                side: SideKind::Source,
                ..
            }
        )
    });
    if needs_target && target.is_none() {
        errors.push(FieldError::new(
            f("target"),
            "is required unless every check is a SOURCE predicate",
        ));
    }
    for (i, c) in checks.iter().enumerate() {
        if let CheckKind::Predicate { side, .. } = c.kind {
            let store = match side {
                SideKind::Source => Some(source),
                SideKind::Target => target,
            };
            if store.is_some_and(|s| !s.evaluates_predicates()) {
                errors.push(FieldError::new(
                    format!("{prefix}.checks[{i}].predicate.side"),
                    "only a DynamoDB table or a SQLite table can evaluate a predicate",
                ));
            }
        }
    }
    let knows_key = |s: &Store| match s {
        Store::Dynamo { .. } => true,
        Store::Sqlite { key_names, .. } => !key_names.is_empty(),
        _ => false,
    };
    if !knows_key(source) && !target.is_some_and(knows_key) {
        errors.push(FieldError::new(
        f("source"),
        "one side must be a DynamoDB table or a SQLite table with key_attribute_names (the key schema comes from it)",
        ));
    }
    if matches!(source, Store::Sqlite { key_names, .. } if key_names.is_empty()) {
        errors.push(FieldError::required(f(
            "source.sqlite_table.key_attribute_names",
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(table: &str) -> common::DataStore {
        common::DataStore {
            store: Some(PbStore::SqliteTable(common::SqliteTableRef {
                table_name: table.to_owned(),
                database: String::new(),
                key_attribute_names: vec!["id".to_owned()],
            })),
        }
    }

    #[test]
    fn defaults_apply() {
        let spec = Spec::from_proto(
            &pb::VerificationSpec {
                source: Some(sqlite("a")),
                target: Some(sqlite("b")),
                checks: vec![pb::Check {
                    name: "d".to_owned(),
                    kind: Some(pb::check::Kind::Digest(pb::DigestCheck::default())),
                }],
                ..Default::default()
            },
            "spec",
        )
        .unwrap();
        assert_eq!(spec.segments, 8);
        assert_eq!(spec.sample_size, 100);
        assert_eq!(spec.recheck.rounds, 3);
        assert_eq!(spec.recheck.min_wait, Duration::from_secs(5));
        assert_eq!(
            spec.checks[0].kind,
            CheckKind::Digest {
                buckets: DEFAULT_BUCKETS,
                versions_only: false
            }
        );
    }

    #[test]
    fn a_source_predicate_needs_no_target_and_every_violation_is_named() {
        let predicate = pb::Check {
            name: "p".to_owned(),
            kind: Some(pb::check::Kind::Predicate(pb::PredicateCheck {
                filter_expression: "attribute_not_exists(test)".to_owned(),
                ..Default::default()
            })),
        };
        assert!(
            Spec::from_proto(
                &pb::VerificationSpec {
                    source: Some(sqlite("a")),
                    checks: vec![predicate.clone()],
                    ..Default::default()
                },
                "spec",
            )
            .is_ok()
        );
        let errors = Spec::from_proto(
            &pb::VerificationSpec {
                source: Some(sqlite("a")),
                checks: vec![predicate.clone(), predicate],
                sample_size: 5000,
                recheck: Some(pb::RecheckPolicy {
                    rounds: 101,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "spec",
        )
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.checks[1].name",
                "spec.recheck.rounds",
                "spec.sample_size"
            ]
        );
    }
}
