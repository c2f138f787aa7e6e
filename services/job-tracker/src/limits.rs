//! Size caps on what a request can make the job-tracker store.
//!
//! A unit is one record — one DynamoDB item, at most 400 KB with its keys —
//! rewritten on every claim, checkpoint and finish. Every part of it a
//! request can grow is capped here, and the caps are chosen so that all
//! parts at their caps at once, in their stored (JSON) form, still fit (the
//! `a_unit_at_every_cap_fits_one_item` test adds them up). So no request the
//! job-tracker accepts can make a later write of the unit fail on DynamoDB.
//!
//! | part            | cap                               | stored at most |
//! |-----------------|-----------------------------------|----------------|
//! | checkpoint      | 64 KiB of bytes                   | 85.4 KiB (base64) |
//! | result          | 64 KiB serialized                 | 64 KiB         |
//! | counters        | 16 KiB serialized                 | 16 KiB         |
//! | error text      | 8 KiB serialized, longer is cut   | 8 KiB          |
//! | after_unit_keys | 16 KiB serialized                 | 16 KiB         |
//! | worker id       | 1 KiB                             | 6 KiB (escapes) |
//! | unit key        | 1000 bytes                        | 2000 bytes (escapes) |
//!
//! "Serialized" is the JSON the record stores: a result's value is an array
//! of numbers (up to 4 bytes a byte, so a value of 16 KiB always fits), a
//! quote or a control character in text takes 2 to 6 bytes.
//!
//! The unit key is also part of sort keys (`unit#`, `route#`…), which
//! DynamoDB limits to 1024 bytes. The job name (200 characters) is checked
//! in [`crate::model`]. A run's result and a FailRun error, kept in the
//! run's record, take the same caps.

use std::collections::BTreeMap;

use tidemark_kit::FieldError;

use crate::model::Spec;

/// Largest checkpoint accepted (a LastEvaluatedKey or a shard position is
/// far smaller; anything bigger is a bug in the worker).
pub const MAX_CHECKPOINT_BYTES: usize = 64 * 1024;

/// Largest result of a unit or a run, serialized as stored.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// Largest job spec, serialized as stored (its bytes as a JSON array, up to
/// 4 bytes a byte: about 32 KiB of protobuf, far more than any spec of the
/// services needs); with the job's other fields it stays within one
/// DynamoDB item.
pub const MAX_SPEC_BYTES: usize = 128 * 1024;

/// Largest set of counters of a unit, serialized as stored (a JSON object of
/// names and numbers): a few hundred counters with ordinary names.
pub const MAX_COUNTERS_BYTES: usize = 16 * 1024;

/// Error text kept of a FailUnit or FailRun, serialized as stored; longer
/// text keeps what fits and ends with [`TRUNCATED`].
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// Marks error text that was cut at [`MAX_ERROR_BYTES`].
pub const TRUNCATED: &str = " [truncated]";

/// Largest list of dependencies of one unit, serialized as stored (a JSON
/// array of unit keys): about a thousand short keys.
pub const MAX_DEPENDENCY_BYTES: usize = 16 * 1024;

/// Longest unit key: with the longest prefix a record adds (`route#`) it
/// stays within DynamoDB's 1024-byte sort key.
pub const MAX_UNIT_KEY_BYTES: usize = 1000;

/// Units one StartRun or AddUnits may register.
pub const MAX_UNITS_PER_CALL: usize = 10_000;

/// Longest worker id: it is stored with the unit as its lease's holder.
pub const MAX_WORKER_ID_BYTES: usize = 1024;

fn too_big(field: &str, what: &str, size: usize, limit: usize) -> FieldError {
    FieldError::new(
        field,
        format!("{what} {size} bytes; the limit is {limit} bytes"),
    )
}

/// # Errors
/// When `checkpoint` is over [`MAX_CHECKPOINT_BYTES`].
pub fn check_checkpoint(checkpoint: &[u8]) -> Result<(), FieldError> {
    if checkpoint.len() > MAX_CHECKPOINT_BYTES {
        return Err(too_big(
            "checkpoint",
            "is",
            checkpoint.len(),
            MAX_CHECKPOINT_BYTES,
        ));
    }
    Ok(())
}

/// # Errors
/// When `result` serializes to more than [`MAX_RESULT_BYTES`].
pub fn check_result(result: Option<&Spec>, field: &str) -> Result<(), FieldError> {
    check_packed(result, field, MAX_RESULT_BYTES)
}

/// # Errors
/// When the job's `spec` serializes to more than [`MAX_SPEC_BYTES`].
pub fn check_spec(spec: Option<&Spec>) -> Result<(), FieldError> {
    check_packed(spec, "job.spec", MAX_SPEC_BYTES)
}

fn check_packed(value: Option<&Spec>, field: &str, limit: usize) -> Result<(), FieldError> {
    let size = value.map_or(0, serialized_len);
    if size > limit {
        return Err(FieldError::new(
            field,
            format!(
                "serializes to {size} bytes as stored (its value as a JSON array, up to \
                 4 bytes a byte); the limit is {limit} bytes"
            ),
        ));
    }
    Ok(())
}

/// # Errors
/// When `counters` serialize to more than [`MAX_COUNTERS_BYTES`].
pub fn check_counters(counters: &BTreeMap<String, i64>) -> Result<(), FieldError> {
    let size = serialized_len(counters);
    if size > MAX_COUNTERS_BYTES {
        return Err(too_big(
            "counters",
            "serialize to",
            size,
            MAX_COUNTERS_BYTES,
        ));
    }
    Ok(())
}

/// # Errors
/// When the dependency list `keys` serializes to more than
/// [`MAX_DEPENDENCY_BYTES`].
pub fn check_dependencies(keys: &[String], field: &str) -> Result<(), FieldError> {
    let size = serialized_len(keys);
    if size > MAX_DEPENDENCY_BYTES {
        return Err(too_big(field, "serialize to", size, MAX_DEPENDENCY_BYTES));
    }
    Ok(())
}

/// # Errors
/// When `worker_id` is over [`MAX_WORKER_ID_BYTES`].
pub fn check_worker_id(worker_id: &str) -> Result<(), FieldError> {
    if worker_id.len() > MAX_WORKER_ID_BYTES {
        return Err(too_big(
            "worker_id",
            "is",
            worker_id.len(),
            MAX_WORKER_ID_BYTES,
        ));
    }
    Ok(())
}

/// `error` cut where its stored form reaches [`MAX_ERROR_BYTES`] (at a
/// character boundary) and marked with [`TRUNCATED`]: an error is kept,
/// never refused, so a worker can always report a failure.
pub fn truncate_error(error: &str) -> String {
    let mut size = 0;
    for (at, c) in error.char_indices() {
        size += stored_len(c);
        if size > MAX_ERROR_BYTES {
            return format!("{}{TRUNCATED}", &error[..at]);
        }
    }
    error.to_owned()
}

/// Bytes `c` takes inside a JSON string (serde_json's escapes).
fn stored_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\t' | '\n' | '\u{c}' | '\r' => 2,
        c if c < ' ' => 6,
        c => c.len_utf8(),
    }
}

fn serialized_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    // Maps with string keys and lists of strings always serialize.
    serde_json::to_string(value).map_or(usize::MAX, |s| s.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Lease, Progress, Unit, UnitStatus};
    use chrono::Utc;

    /// DynamoDB's item limit, names and values of every attribute included.
    const ITEM_LIMIT: usize = 400 * 1024;

    /// Counters that serialize to exactly `size` bytes.
    fn counters_of(size: usize) -> BTreeMap<String, i64> {
        // {"<name>":-9223372036854775808} is the name plus 25 bytes.
        BTreeMap::from([("c".repeat(size - 25), i64::MIN)])
    }

    /// A result that serializes to at most `size` bytes, within 4.
    fn result_of(size: usize) -> Spec {
        // {"type_url":"t","value":[255,...,255]} is 27 bytes and 4 a byte.
        Spec {
            type_url: "t".into(),
            value: vec![0xff; (size - 27) / 4],
        }
    }

    /// Dependencies that escape the most (`"` doubles) within the cap.
    fn dependencies_at_cap() -> Vec<String> {
        let mut keys = Vec::new();
        loop {
            keys.push(format!(
                "{:03}{}",
                keys.len(),
                "\"".repeat(MAX_UNIT_KEY_BYTES - 3)
            ));
            if serialized_len(&keys) > MAX_DEPENDENCY_BYTES {
                keys.pop();
                return keys;
            }
        }
    }

    #[test]
    fn a_unit_at_every_cap_fits_one_item() {
        let now = Utc::now();
        let control = "\u{1}"; // six bytes once escaped, the worst case
        let key = "\"".repeat(MAX_UNIT_KEY_BYTES);
        let unit = Unit {
            run_id: uuid::Uuid::now_v7().to_string(),
            job_name: "j".repeat(200),
            unit_key: key.clone(),
            status: UnitStatus::InProgress,
            checkpoint: vec![0xff; MAX_CHECKPOINT_BYTES],
            progress: Progress {
                items_processed: i64::MIN,
                items_failed: i64::MIN,
                items_estimated: i64::MIN,
                counters: counters_of(MAX_COUNTERS_BYTES),
            },
            last_error: truncate_error(&control.repeat(MAX_ERROR_BYTES * 2)),
            attempts: u32::MAX,
            fencing_token: u64::MAX,
            lease: Some(Lease {
                owner: control.repeat(MAX_WORKER_ID_BYTES),
                fencing_token: u64::MAX,
                acquire_time: now,
                expire_time: now,
            }),
            after_unit_keys: dependencies_at_cap(),
            result: Some(result_of(MAX_RESULT_BYTES)),
            create_time: now,
            update_time: now,
            retry_time: Some(now),
        };
        check_counters(&unit.progress.counters).unwrap();
        check_dependencies(&unit.after_unit_keys, "after_unit_keys").unwrap();
        check_result(unit.result.as_ref(), "result").unwrap();
        let body = serde_json::to_string(&unit).unwrap();
        // pk, sk, rev and body: names, keys and the largest revision.
        let item = "pkskrevbody".len()
            + format!("run#{}", unit.run_id).len()
            + format!("unit#{key}").len()
            + u64::MAX.to_string().len()
            + body.len();
        // Ample room: the local DynamoDB stand-in counts an item's old and
        // new body together when one replaces the other.
        assert!(
            item < ITEM_LIMIT * 5 / 8,
            "{item} bytes leave too little room under {ITEM_LIMIT}"
        );
        assert!(serialized_len(&unit.last_error) - 2 <= MAX_ERROR_BYTES + TRUNCATED.len());
    }

    #[test]
    fn caps_name_the_field_and_the_limit() {
        let e = check_counters(&counters_of(MAX_COUNTERS_BYTES + 1)).unwrap_err();
        assert_eq!(e.field, "counters");
        assert!(e.description.contains("16384"), "{}", e.description);
        check_result(Some(&result_of(MAX_RESULT_BYTES)), "result").unwrap();
        let e = check_result(Some(&result_of(MAX_RESULT_BYTES + 4)), "result").unwrap_err();
        assert_eq!(e.field, "result");
        assert!(e.description.contains("65536"), "{}", e.description);
        check_spec(Some(&result_of(MAX_SPEC_BYTES))).unwrap();
        let e = check_spec(Some(&result_of(MAX_SPEC_BYTES + 4))).unwrap_err();
        assert_eq!(e.field, "job.spec");
        assert!(e.description.contains("131072"), "{}", e.description);
        let e = check_worker_id(&"w".repeat(MAX_WORKER_ID_BYTES + 1)).unwrap_err();
        assert_eq!(e.field, "worker_id");
        let mut deps = dependencies_at_cap();
        deps.push("d".repeat(MAX_UNIT_KEY_BYTES));
        let e = check_dependencies(&deps, "units[3].after_unit_keys").unwrap_err();
        assert_eq!(e.field, "units[3].after_unit_keys");
        assert!(e.description.contains("16384"), "{}", e.description);
    }

    #[test]
    fn long_errors_are_cut_at_a_character_boundary_and_marked() {
        assert_eq!(truncate_error("short"), "short");
        let plain = "e".repeat(MAX_ERROR_BYTES);
        assert_eq!(truncate_error(&plain), plain, "at the cap: kept whole");
        for unit in ["é", "\u{1}", "\"", "\n", "x\u{1f}é\\"] {
            let cut = truncate_error(&unit.repeat(MAX_ERROR_BYTES));
            assert!(cut.ends_with(TRUNCATED), "{unit:?}");
            let stored = serialized_len(cut.as_str()) - 2;
            assert!(
                stored <= MAX_ERROR_BYTES + TRUNCATED.len(),
                "{unit:?}: {stored}"
            );
            assert!(
                stored > MAX_ERROR_BYTES - 6,
                "{unit:?}: keeps what fits: {stored}"
            );
        }
    }
}
