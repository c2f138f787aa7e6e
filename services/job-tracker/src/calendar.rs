//! When a schedule fires: cron expressions with a seconds field, IANA time
//! zones and the schedule's window. Pure calendar arithmetic, kept apart from
//! the scheduler loop so the engine can compute a job's next fire time
//! without depending on the scheduler that drives it.

use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::model::Schedule;

/// Parses a cron expression: 6 or 7 fields (seconds first, optional year),
/// or the classic 5 fields (minute first; seconds taken as 0).
///
/// # Errors
/// Says what is wrong with the expression.
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, String> {
    let fields = expr.split_whitespace().count();
    let full = match fields {
        5 => format!("0 {expr}"),
        6 | 7 => expr.to_owned(),
        n => {
            return Err(format!(
                "{expr:?} has {n} fields; use 6 (sec min hour day month weekday) or 5"
            ));
        }
    };
    cron::Schedule::from_str(&full)
        .map_err(|e| format!("{expr:?} is not a valid cron expression: {e}"))
}

/// Parses an IANA time zone name; empty means UTC.
///
/// # Errors
/// When the name is unknown.
pub fn parse_zone(name: &str) -> Result<chrono_tz::Tz, String> {
    if name.is_empty() {
        return Ok(chrono_tz::UTC);
    }
    name.parse()
        .map_err(|_| format!("{name:?} is not an IANA time zone such as Europe/Berlin"))
}

/// The first fire time strictly after `after` within the schedule's window.
///
/// # Errors
/// When the expression or time zone is invalid.
pub fn next_fire(
    schedule: &Schedule,
    after: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, String> {
    let cron = parse_cron(&schedule.cron)?;
    let zone = parse_zone(&schedule.time_zone)?;
    let from = schedule
        .start_time
        .filter(|s| *s > after)
        .map_or(after, |s| s - chrono::Duration::microseconds(1));
    let next = cron
        .after(&from.with_timezone(&zone))
        .next()
        .map(|t| t.with_timezone(&Utc));
    Ok(next.filter(|t| schedule.end_time.is_none_or(|end| *t <= end)))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn schedule(cron: &str, zone: &str) -> Schedule {
        Schedule {
            cron: cron.into(),
            time_zone: zone.into(),
            max_wait_ms: 0,
            start_time: None,
            end_time: None,
        }
    }

    #[test]
    fn hourly_on_working_days() {
        // Friday 2026-11-20 17:30 UTC → Monday 09:00.
        let s = schedule("0 0 9-17 * * Mon-Fri", "");
        let after = Utc.with_ymd_and_hms(2026, 11, 20, 17, 30, 0).unwrap();
        assert_eq!(
            next_fire(&s, after).unwrap(),
            Some(Utc.with_ymd_and_hms(2026, 11, 23, 9, 0, 0).unwrap())
        );
    }

    #[test]
    fn five_fields_and_zones() {
        let s = schedule("30 2 * * *", "Europe/Berlin");
        let after = Utc.with_ymd_and_hms(2026, 7, 1, 0, 0, 0).unwrap();
        // 02:30 in Berlin summer time is 00:30 UTC.
        assert_eq!(
            next_fire(&s, after).unwrap(),
            Some(Utc.with_ymd_and_hms(2026, 7, 1, 0, 30, 0).unwrap())
        );
    }

    #[test]
    fn bad_expressions_say_why() {
        assert!(parse_cron("every hour").unwrap_err().contains("fields"));
        assert!(parse_cron("0 0 25 * * *").is_err());
        assert!(parse_zone("Mars/Olympus").unwrap_err().contains("IANA"));
    }

    #[test]
    fn window_bounds() {
        let start = Utc.with_ymd_and_hms(2026, 1, 10, 0, 0, 0).unwrap();
        let s = Schedule {
            start_time: Some(start),
            end_time: Some(start + chrono::Duration::hours(2)),
            ..schedule("0 0 * * * *", "")
        };
        let before = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(next_fire(&s, before).unwrap(), Some(start));
        assert_eq!(
            next_fire(&s, start + chrono::Duration::hours(2)).unwrap(),
            None
        );
    }
}
