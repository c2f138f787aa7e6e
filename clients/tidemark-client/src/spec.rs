//! Short text forms of stores, attribute values and durations, shared by
//! cut-over plans (TOML) and the command line, so an operator writes
//! `dynamodb:orders` rather than a nested message.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tidemark_proto::common::v1 as common;
use tidemark_proto::common::v1::data_store::Store;

/// A plan or argument that cannot be turned into a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// Where in the plan or which argument, e.g. `pipeline.sinks[0].store`.
    pub field: String,
    /// What is wrong and what is expected.
    pub reason: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error located under `parent`.
    #[must_use]
    pub fn under(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_owned()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

const STORE_FORMS: &str = "expected dynamodb:TABLE, es:INDEX, s3://BUCKET/PREFIX, \
sqlite:TABLE?key=PK[,SK][&db=NAME] or kafka:TOPIC, optionally followed by \
?endpoint=URL (and &region=R for AWS stores)";

/// A data store in its short text form:
///
/// | form | store |
/// |---|---|
/// | `dynamodb:orders` | DynamoDB table `orders` |
/// | `es:orders-v2` (or `elasticsearch:`) | Elasticsearch index |
/// | `s3://bucket/some/prefix/` | objects under a prefix of a bucket |
/// | `sqlite:orders?key=pk,sk&db=main` | embedded SQLite table with its key |
/// | `kafka:topic` | Kafka topic |
///
/// Any form takes `?endpoint=URL` (and AWS ones `region=R`), query style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSpec {
    text: String,
    store: common::DataStore,
}

impl StoreSpec {
    /// The request form.
    pub fn to_proto(&self) -> common::DataStore {
        self.store.clone()
    }

    /// The key attribute names given (SQLite tables only).
    pub fn key_attributes(&self) -> Vec<String> {
        match &self.store.store {
            Some(Store::SqliteTable(t)) => t.key_attribute_names.clone(),
            _ => Vec::new(),
        }
    }

    /// A short name of the store kind, for messages.
    pub fn kind(&self) -> &'static str {
        match &self.store.store {
            Some(Store::DynamodbTable(_)) => "dynamodb",
            Some(Store::ElasticsearchIndex(_)) => "elasticsearch",
            Some(Store::S3Prefix(_)) => "s3",
            Some(Store::SqliteTable(_)) => "sqlite",
            Some(Store::KafkaTopic(_)) => "kafka",
            None => "none",
        }
    }
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for StoreSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let bad = |reason: String| SpecError::new("", format!("{text:?}: {reason}"));
        let (body, query) = text.split_once('?').unwrap_or((text, ""));
        let mut params = std::collections::BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("parameter {pair:?} is not NAME=VALUE")))?;
            if params.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(bad(format!("parameter {k:?} given twice")));
            }
        }
        let mut take = |name: &str| params.remove(name).unwrap_or_default();
        let endpoint = take("endpoint");
        let (kind, rest) = if let Some(rest) = body.strip_prefix("s3://") {
            ("s3", rest)
        } else {
            body.split_once(':')
                .ok_or_else(|| bad(STORE_FORMS.to_owned()))?
        };
        if rest.is_empty() {
            return Err(bad(format!("no name after {kind:?}; {STORE_FORMS}")));
        }
        let store = match kind {
            "dynamodb" | "ddb" => Store::DynamodbTable(common::DynamoDbTableRef {
                table_name: rest.to_owned(),
                endpoint,
                region: take("region"),
            }),
            "es" | "elasticsearch" => Store::ElasticsearchIndex(common::ElasticsearchIndexRef {
                index: rest.to_owned(),
                endpoint,
            }),
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                Store::S3Prefix(common::S3PrefixRef {
                    bucket: bucket.to_owned(),
                    prefix: prefix.to_owned(),
                    endpoint,
                    region: take("region"),
                })
            }
            "sqlite" => {
                let keys: Vec<String> = take("key")
                    .split(',')
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned)
                    .collect();
                Store::SqliteTable(common::SqliteTableRef {
                    table_name: rest.to_owned(),
                    database: take("db"),
                    key_attribute_names: keys,
                })
            }
            "kafka" => Store::KafkaTopic(common::KafkaTopicRef {
                topic: rest.to_owned(),
                bootstrap_servers: endpoint,
            }),
            other => return Err(bad(format!("unknown store kind {other:?}; {STORE_FORMS}"))),
        };
        if let Some(extra) = params.keys().next() {
            return Err(bad(format!(
                "parameter {extra:?} does not apply to a {kind} store"
            )));
        }
        Ok(Self {
            text: text.to_owned(),
            store: common::DataStore { store: Some(store) },
        })
    }
}

impl<'de> Deserialize<'de> for StoreSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e: SpecError| serde::de::Error::custom(e.reason))
    }
}

impl serde::Serialize for StoreSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// An attribute value in text form: `n:1`, `s:text`, `bool:true`, `null`.
///
/// # Errors
/// Any other form.
pub fn parse_value(text: &str) -> Result<common::AttributeValue, SpecError> {
    use common::attribute_value::Value;
    let value = match text.split_once(':') {
        Some(("n", n)) if !n.is_empty() => Value::N(n.to_owned()),
        Some(("s", s)) => Value::S(s.to_owned()),
        Some(("bool", b)) => Value::BoolValue(
            b.parse()
                .map_err(|_| SpecError::new("", format!("{text:?}: bool:true or bool:false")))?,
        ),
        None if text == "null" => Value::NullValue(0),
        _ => {
            return Err(SpecError::new(
                "",
                format!("{text:?}: expected n:NUMBER, s:TEXT, bool:true|false or null"),
            ));
        }
    };
    Ok(common::AttributeValue { value: Some(value) })
}

/// A duration in text form: `250ms`, `30s`, `5m`, `1h`, `1m30s`.
///
/// # Errors
/// Any other form.
pub fn parse_duration(text: &str) -> Result<Duration, SpecError> {
    let bad = || {
        SpecError::new(
            "",
            format!("{text:?}: expected a duration such as 500ms, 30s, 5m, 1h, 7d or 1m30s"),
        )
    };
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ms" => number / 1000.0,
            "s" => number,
            "m" => number * 60.0,
            "h" => number * 3600.0,
            "d" => number * 86_400.0,
            _ => return Err(bad()),
        };
        // Parts that each fit may not fit together (a panic before).
        total = Duration::try_from_secs_f64(secs)
            .ok()
            .and_then(|d| total.checked_add(d))
            .ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Serde adapter for durations written as text (`deserialize_with`).
pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(|e| serde::de::Error::custom(e.reason))
}

/// A `google.protobuf.Duration`.
pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A `google.protobuf.Duration` as a std duration (negative: zero).
pub fn std_duration(d: Option<&prost_types::Duration>) -> Duration {
    d.map_or(Duration::ZERO, |d| {
        Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_whose_parts_overflow_together_are_refused() {
        // Each part fits a Duration, their sum does not: the addition
        // panicked (fuzz/corpus/cutover_plan/duration_sum.toml).
        let err = parse_duration("10000000000000000000s10000000000000000000s").unwrap_err();
        assert!(err.reason.contains("expected a duration"), "{err:?}");
        assert_eq!(
            parse_duration("1m30s").unwrap(),
            Duration::from_secs(90),
            "sums that fit still add up"
        );
    }

    #[test]
    fn stores_parse_in_every_short_form() {
        let s: StoreSpec = "dynamodb:orders?region=eu-west-1".parse().unwrap();
        assert_eq!(
            s.to_proto().store,
            Some(Store::DynamodbTable(common::DynamoDbTableRef {
                table_name: "orders".into(),
                endpoint: String::new(),
                region: "eu-west-1".into(),
            }))
        );
        let s: StoreSpec = "s3://media/courses/2024/?endpoint=http://127.0.0.1:5000"
            .parse()
            .unwrap();
        assert_eq!(
            s.to_proto().store,
            Some(Store::S3Prefix(common::S3PrefixRef {
                bucket: "media".into(),
                prefix: "courses/2024/".into(),
                endpoint: "http://127.0.0.1:5000".into(),
                region: String::new(),
            }))
        );
        let s: StoreSpec = "sqlite:items?key=pk,sk&db=main".parse().unwrap();
        assert_eq!(s.key_attributes(), vec!["pk", "sk"]);
        assert_eq!(s.kind(), "sqlite");
        let s: StoreSpec = "es:docs".parse().unwrap();
        assert_eq!(s.kind(), "elasticsearch");
        assert_eq!(s.to_string(), "es:docs");
    }

    #[test]
    fn bad_stores_say_what_is_expected() {
        for bad in [
            "orders",
            "mysql:orders",
            "dynamodb:",
            "es:docs?region=x",
            "dynamodb:t?x",
        ] {
            let e = bad.parse::<StoreSpec>().unwrap_err();
            assert!(e.reason.contains(bad), "{e}");
        }
        let e = "mysql:orders".parse::<StoreSpec>().unwrap_err();
        assert!(e.reason.contains("dynamodb:TABLE"), "{e}");
    }

    #[test]
    fn values_and_durations_parse() {
        use common::attribute_value::Value;
        assert_eq!(
            parse_value("n:1").unwrap().value,
            Some(Value::N("1".into()))
        );
        assert_eq!(
            parse_value("s:").unwrap().value,
            Some(Value::S(String::new()))
        );
        assert_eq!(
            parse_value("bool:true").unwrap().value,
            Some(Value::BoolValue(true))
        );
        assert!(parse_value("1").is_err());
        assert!(parse_value("n:").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        for bad in ["", "5", "5 s", "s", "5w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
