//! Proto ↔ domain: events are checked one by one (a bad event is a
//! rejection naming its field; the others go on), and the buffer state is
//! rendered for the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidemark_connectors::{BufferEvent, BufferOp, Number};
use tidemark_kit::FieldError;
use tidemark_proto::stats_aggregator::v1 as pb;

use crate::decimal::in_dynamodb_range;
use crate::store::RESERVED_PREFIX;

/// Events per message, at most.
pub const MAX_EVENTS: usize = 10_000;
/// Rejections listed in a response, at most.
pub const MAX_REJECTIONS: usize = 1000;
const MAX_ID_BYTES: usize = 128;
const MAX_ENTITY_BYTES: usize = 1024;
const MAX_METRIC_CHARS: usize = 255;
const MAX_FUTURE_MICROS: i64 = 3_600_000_000;

/// What the checks need besides the event.
pub struct Checks<'a> {
    pub key_attribute: &'a str,
    pub now_micros: i64,
}

/// Checks one event and turns it into a buffer event; the error names the
/// field relative to the event (`replace.value`) and gives back the id.
///
/// # Errors
/// The first invalid field.
pub fn event(e: pb::Event, checks: &Checks<'_>) -> Result<BufferEvent, (FieldError, String)> {
    let (time_micros, normalized) = match check(&e, checks) {
        Ok(v) => v,
        Err(f) => return Err((f, e.event_id)),
    };
    let op = match (e.op, normalized) {
        (Some(pb::event::Op::Increment(i)), _) => BufferOp::Increment {
            entity: e.entity_key,
            metric: e.metric,
            delta: i.delta,
        },
        (Some(pb::event::Op::Replace(_)), Some(value)) => BufferOp::Replace {
            entity: e.entity_key,
            metric: e.metric,
            value,
        },
        _ => unreachable!("check accepts only an increment or a parsed replace"),
    };
    Ok(BufferEvent {
        id: e.event_id,
        op,
        time_micros,
    })
}

/// The event time and, for a replace, the normalised value.
fn check(e: &pb::Event, checks: &Checks<'_>) -> Result<(i64, Option<String>), FieldError> {
    if e.event_id.is_empty() {
        return Err(FieldError::required("event_id"));
    }
    if e.event_id.len() > MAX_ID_BYTES {
        return Err(FieldError::new("event_id", "must be at most 128 bytes"));
    }
    if e.entity_key.is_empty() {
        return Err(FieldError::required("entity_key"));
    }
    if e.entity_key.len() > MAX_ENTITY_BYTES {
        return Err(FieldError::new("entity_key", "must be at most 1024 bytes"));
    }
    check_metric(&e.metric, checks.key_attribute)?;
    let time_micros = match e.event_time {
        None => checks.now_micros,
        Some(t) => {
            if !(0..1_000_000_000).contains(&t.nanos) {
                return Err(FieldError::new("event_time", "nanos must be in 0..1e9"));
            }
            let micros = t
                .seconds
                .checked_mul(1_000_000)
                .and_then(|s| s.checked_add(i64::from(t.nanos / 1000)))
                .ok_or_else(|| FieldError::new("event_time", "is out of range"))?;
            if micros > checks.now_micros.saturating_add(MAX_FUTURE_MICROS) {
                return Err(FieldError::new(
                    "event_time",
                    "is more than 1 h in the future",
                ));
            }
            micros
        }
    };
    match &e.op {
        None => Err(FieldError::new(
            "op",
            "exactly one of increment or replace is required",
        )),
        Some(pb::event::Op::Increment(_)) => Ok((time_micros, None)),
        Some(pb::event::Op::Replace(r)) => {
            let n = Number::parse(&r.value).map_err(|m| FieldError::new("replace.value", m))?;
            if !in_dynamodb_range(&n) {
                return Err(FieldError::new(
                    "replace.value",
                    "is beyond DynamoDB's number range",
                ));
            }
            Ok((time_micros, Some(n.into())))
        }
    }
}

fn check_metric(metric: &str, key_attribute: &str) -> Result<(), FieldError> {
    if metric.is_empty() {
        return Err(FieldError::required("metric"));
    }
    if metric.len() > MAX_METRIC_CHARS {
        return Err(FieldError::new("metric", "must be at most 255 characters"));
    }
    if !metric
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(FieldError::new(
            "metric",
            "must be ASCII letters, digits, '_', '.' and '-'",
        ));
    }
    if metric.starts_with(RESERVED_PREFIX) || metric == key_attribute {
        return Err(FieldError::new(
            "metric",
            format!(
                "{metric:?} is reserved (the key attribute {key_attribute:?} and names starting with {RESERVED_PREFIX:?})"
            ),
        ));
    }
    Ok(())
}

/// A whole message's events checked: the valid ones (with their position in
/// the message) and a rejection per invalid one.
pub struct Checked {
    pub events: Vec<BufferEvent>,
    pub rejections: Vec<pb::Rejection>,
    pub rejected: u64,
}

/// Checks every event of a message whose first event is the call's event
/// number `base`.
pub fn events(events: Vec<pb::Event>, base: u64, checks: &Checks<'_>) -> Checked {
    let mut out = Checked {
        events: Vec::with_capacity(events.len()),
        rejections: Vec::new(),
        rejected: 0,
    };
    for (i, e) in events.into_iter().enumerate() {
        match event(e, checks) {
            Ok(ev) => out.events.push(ev),
            Err((f, id)) => {
                out.rejected += 1;
                let f = f.within(&format!("events[{i}]"));
                out.rejections.push(pb::Rejection {
                    event_index: base + u64::try_from(i).unwrap_or(u64::MAX),
                    event_id: id,
                    field: f.field,
                    description: f.description,
                });
            }
        }
    }
    out
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub fn timestamp_micros(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// `max_pause` of PauseWriters: positive, at most 1 h.
///
/// # Errors
/// Names `max_pause`.
pub fn max_pause(d: Option<prost_types::Duration>) -> Result<Option<Duration>, FieldError> {
    let Some(d) = d else { return Ok(None) };
    let bad = || FieldError::new("max_pause", "must be positive and at most 1 h");
    if d.seconds < 0
        || d.nanos < 0
        || (d.seconds == 0 && d.nanos == 0)
        || !(0..1_000_000_000).contains(&d.nanos)
    {
        return Err(bad());
    }
    let total = Duration::new(
        u64::try_from(d.seconds).map_err(|_| bad())?,
        u32::try_from(d.nanos).map_err(|_| bad())?,
    );
    if total > Duration::from_secs(3600) {
        return Err(bad());
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks() -> Checks<'static> {
        Checks {
            key_attribute: "pk",
            now_micros: 1_000_000_000_000_000,
        }
    }

    fn ok_event() -> pb::Event {
        pb::Event {
            event_id: "e1".into(),
            entity_key: "content-1".into(),
            metric: "views".into(),
            op: Some(pb::event::Op::Increment(pb::Increment { delta: 1 })),
            event_time: None,
        }
    }

    fn field_of(e: pb::Event) -> String {
        event(e, &checks()).expect_err("invalid").0.field
    }

    #[test]
    fn each_bad_field_is_named() {
        let replace = |v: &str| pb::Event {
            op: Some(pb::event::Op::Replace(pb::Replace { value: v.into() })),
            ..ok_event()
        };
        assert_eq!(
            field_of(pb::Event {
                event_id: String::new(),
                ..ok_event()
            }),
            "event_id"
        );
        assert_eq!(
            field_of(pb::Event {
                event_id: "x".repeat(129),
                ..ok_event()
            }),
            "event_id"
        );
        assert_eq!(
            field_of(pb::Event {
                entity_key: String::new(),
                ..ok_event()
            }),
            "entity_key"
        );
        assert_eq!(
            field_of(pb::Event {
                entity_key: "x".repeat(1025),
                ..ok_event()
            }),
            "entity_key"
        );
        assert_eq!(
            field_of(pb::Event {
                metric: "a b".into(),
                ..ok_event()
            }),
            "metric"
        );
        assert_eq!(
            field_of(pb::Event {
                metric: "tidemark_version".into(),
                ..ok_event()
            }),
            "metric"
        );
        assert_eq!(
            field_of(pb::Event {
                metric: "pk".into(),
                ..ok_event()
            }),
            "metric"
        );
        assert_eq!(
            field_of(pb::Event {
                op: None,
                ..ok_event()
            }),
            "op"
        );
        for bad in [
            "NaN",
            "Infinity",
            "-inf",
            "",
            "1x",
            // Beyond DynamoDB's numbers: magnitude 1E-130 to below 1E+126,
            // 38 significant digits.
            "1E+126",
            "-1E+126",
            "1E+300",
            "1E-131",
            "-9.9E-131",
            "123456789012345678901234567890123456789",
            "0.123456789012345678901234567890123456789",
        ] {
            assert_eq!(field_of(replace(bad)), "replace.value", "{bad}");
        }
        for good in [
            "9.9999999999999999999999999999999999999E+125",
            "-9.9999999999999999999999999999999999999E+125",
            "1E-130",
            "12345678901234567890123456789012345678",
        ] {
            assert!(event(replace(good), &checks()).is_ok(), "{good}");
        }
        let future = prost_types::Timestamp {
            seconds: 1_000_000_000 + 3601,
            nanos: 0,
        };
        assert_eq!(
            field_of(pb::Event {
                event_time: Some(future),
                ..ok_event()
            }),
            "event_time"
        );
        let ok = event(replace("4.50"), &checks()).unwrap();
        assert!(matches!(ok.op, BufferOp::Replace { ref value, .. } if value == "4.5"));
    }

    #[test]
    fn rejections_carry_the_call_index_and_message_path() {
        let batch = vec![
            ok_event(),
            pb::Event {
                metric: String::new(),
                ..ok_event()
            },
            ok_event(),
        ];
        let checked = events(batch, 100, &checks());
        assert_eq!(checked.events.len(), 2);
        assert_eq!(checked.rejected, 1);
        let r = &checked.rejections[0];
        assert_eq!(
            (r.event_index, r.field.as_str(), r.event_id.as_str()),
            (101, "events[1].metric", "e1")
        );
    }

    #[test]
    fn max_pause_is_bounded() {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(max_pause(None).unwrap(), None);
        assert_eq!(max_pause(d(60, 0)).unwrap(), Some(Duration::from_secs(60)));
        assert!(max_pause(d(0, 0)).is_err());
        assert!(max_pause(d(-1, 0)).is_err());
        assert!(max_pause(d(3601, 0)).is_err());
    }
}
