//! Write capacity: what a piece of work consumed and how often the store
//! throttled it ([`CapacityMeter`]), and the rate that work may write at,
//! adapted to the throttling (AIMD, [`AdaptiveRate`]).
//!
//! A meter is attached to a task with [`metered`]: every DynamoDB write made
//! by that task (its sub-futures included) adds the capacity units DynamoDB
//! reports, and every throttling answer (`ProvisionedThroughputExceeded`,
//! `ThrottlingException`, `RequestLimitExceeded`) counts once per attempt.
//! Tables opened by the connectors leave retries to [`crate::retry`] (full
//! jitter), so each throttled attempt is seen, not hidden by the SDK's own
//! retry loop.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Capacity units are kept in thousandths (DynamoDB reports halves).
const MILLI: f64 = 1000.0;

/// Counts one task's consumed write units and throttled attempts.
#[derive(Debug, Default)]
pub struct CapacityMeter {
    consumed_milli: AtomicU64,
    throttled: AtomicU64,
}

impl CapacityMeter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Capacity units consumed, as DynamoDB reported them.
    pub fn consumed(&self) -> f64 {
        self.consumed_milli.load(Ordering::Relaxed) as f64 / MILLI
    }

    /// Attempts the store answered with throttling.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    pub fn add_consumed(&self, units: f64) {
        if units.is_finite() && units > 0.0 {
            // Rounded to thousandths: far below one write's half unit.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let milli = (units * MILLI).round() as u64;
            self.consumed_milli.fetch_add(milli, Ordering::Relaxed);
        }
    }

    pub fn add_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }
}

tokio::task_local! {
    static METER: Arc<CapacityMeter>;
}

/// Runs `work` with `meter` counting its writes and throttles.
pub async fn metered<F: Future>(meter: Arc<CapacityMeter>, work: F) -> F::Output {
    METER.scope(meter, work).await
}

/// A write consumed `units` (called by the connectors).
pub fn record_consumed(units: f64) {
    let _ = METER.try_with(|m| m.add_consumed(units));
}

/// The store throttled an attempt (called by the connectors).
pub fn record_throttled() {
    let _ = METER.try_with(|m| m.add_throttled());
}

/// Multiplicative decrease on throttling (the AWS SDK's adaptive retry mode
/// uses the same factor).
const BETA: f64 = 0.7;
/// At most one decrease per this long: the throttles answering requests
/// sent at the old rate are one congestion event, not many.
const COOLDOWN: Duration = Duration::from_millis(500);
/// After a decrease the rate climbs back to where it was throttled within
/// about this long, then probes above it slowly ([`PROBE`]).
const RECOVERY: Duration = Duration::from_secs(1);
/// Probing above the last throttled rate: this share of it per second.
const PROBE: f64 = 0.1;
/// The floor of the rate, in writes per second.
const MIN_RATE: f64 = 1.0;
/// The bucket holds this long's worth of tokens: a short burst, so the
/// configured rate is the rate over any tenth of a second, not only on
/// average after an idle spell.
const BURST: Duration = Duration::from_millis(100);
/// Send rates are measured over windows this long.
const WINDOW: Duration = Duration::from_millis(250);

/// The rate a piece of work writes at: a token bucket refilled at the
/// configured rate (0: unlimited) that backs off when its meter sees
/// throttling (multiplicative decrease to 0.7 of what was being sent) and
/// recovers additively: back to the throttled rate within a second, then
/// probing 10% of it per second above. Unlimited work is limited only from
/// its first throttle, and unlimited again once it has probed to twice the
/// rate it was throttled at.
pub struct AdaptiveRate {
    meter: Arc<CapacityMeter>,
    state: std::sync::Mutex<State>,
}

struct State {
    configured: f64,
    /// The rate now, `None` while unlimited.
    limit: Option<f64>,
    tokens: f64,
    refilled: Instant,
    seen_throttles: u64,
    decreased: Option<Instant>,
    /// The rate at the last decrease.
    peak: f64,
    /// Measured sends per second (smoothed), and the current window.
    measured: f64,
    window_start: Instant,
    window_sends: u64,
}

impl AdaptiveRate {
    /// `rate` writes per second at most (0: unlimited), backing off on the
    /// throttles `meter` counts.
    pub fn new(rate: f64, meter: Arc<CapacityMeter>) -> Self {
        let now = Instant::now();
        let rate = rate.max(0.0);
        Self {
            meter,
            state: std::sync::Mutex::new(State {
                configured: rate,
                limit: (rate > 0.0).then_some(rate),
                tokens: rate.min(1.0),
                refilled: now,
                seen_throttles: 0,
                decreased: None,
                peak: rate,
                measured: 0.0,
                window_start: now,
                window_sends: 0,
            }),
        }
    }

    pub fn meter(&self) -> &Arc<CapacityMeter> {
        &self.meter
    }

    /// A new configured rate (0: unlimited), taking effect at once.
    pub fn set_rate(&self, rate: f64) {
        let mut s = self.lock();
        s.configured = rate.max(0.0);
        s.limit = (s.configured > 0.0).then_some(s.configured);
        s.peak = s.configured;
    }

    /// The rate now (`None`: unlimited).
    pub fn current(&self) -> Option<f64> {
        self.lock().limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for the right to send one write.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let throttles = self.meter.throttled();
                let mut s = self.lock();
                s.step(Instant::now(), throttles)
            };
            match wait {
                None => return,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

impl State {
    /// Adapts the rate to `throttles` seen so far and takes a token: `None`
    /// when taken, else how long to wait before trying again.
    fn step(&mut self, now: Instant, throttles: u64) -> Option<Duration> {
        self.measure(now);
        let dt = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        if throttles > self.seen_throttles {
            self.seen_throttles = throttles;
            if self
                .decreased
                .is_none_or(|d| now.duration_since(d) >= COOLDOWN)
            {
                self.decrease(now);
            }
        } else if let Some(limit) = self.limit {
            self.limit = self.increase(limit, dt);
        }
        let Some(rate) = self.limit else {
            self.window_sends += 1;
            return None;
        };
        self.tokens = (self.tokens + dt * rate).min((rate * BURST.as_secs_f64()).max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.window_sends += 1;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    fn measure(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= WINDOW {
            #[allow(clippy::cast_precision_loss)]
            let rate = self.window_sends as f64 / elapsed.as_secs_f64();
            self.measured = if self.measured == 0.0 {
                rate
            } else {
                0.5 * self.measured + 0.5 * rate
            };
            self.window_start = now;
            self.window_sends = 0;
        }
    }

    fn decrease(&mut self, now: Instant) {
        // What was really being sent: a limit above the sending rate says
        // nothing about what the store takes.
        let sending = match self.limit {
            Some(limit) if self.measured > 0.0 => limit.min(self.measured),
            Some(limit) => limit,
            None if self.measured > 0.0 => self.measured,
            None => MIN_RATE * 10.0,
        };
        self.peak = sending;
        self.limit = Some((sending * BETA).max(MIN_RATE));
        self.tokens = self.tokens.min(1.0);
        self.decreased = Some(now);
    }

    fn increase(&self, limit: f64, dt: f64) -> Option<f64> {
        let step = if limit < self.peak {
            dt * self.peak * (1.0 - BETA) / RECOVERY.as_secs_f64()
        } else {
            dt * self.peak * PROBE
        };
        let next = limit + step.max(dt * MIN_RATE);
        if self.configured > 0.0 {
            Some(next.min(self.configured))
        } else if next >= 2.0 * self.peak {
            None
        } else {
            Some(next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends for `secs` at most `rate` acquisitions a second; returns how
    /// many were taken.
    async fn drive(rate: &AdaptiveRate, secs: f64) -> u64 {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut n = 0;
        while Instant::now() < end {
            rate.acquire().await;
            n += 1;
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_rate_is_held() {
        let rate = AdaptiveRate::new(100.0, CapacityMeter::new());
        let n = drive(&rate, 2.0).await;
        assert!((195..=205).contains(&n), "{n} writes in 2 s at 100/s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_cuts_the_rate_once_per_event_and_it_recovers() {
        let meter = CapacityMeter::new();
        let rate = AdaptiveRate::new(100.0, Arc::clone(&meter));
        drive(&rate, 1.0).await;
        // A burst of throttles answering one round of requests.
        for _ in 0..5 {
            meter.add_throttled();
        }
        rate.acquire().await;
        let cut = rate.current().expect("limited");
        assert!((60.0..80.0).contains(&cut), "cut to {cut}");
        meter.add_throttled();
        rate.acquire().await;
        let again = rate.current().expect("limited");
        assert!(
            again >= cut,
            "a second throttle within the cool-down cut again: {again}"
        );
        drive(&rate, 2.0).await;
        let back = rate.current().expect("limited");
        assert!((99.0..=100.0).contains(&back), "recovered to {back}");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_work_is_limited_from_its_first_throttle() {
        let meter = CapacityMeter::new();
        let rate = AdaptiveRate::new(0.0, Arc::clone(&meter));
        assert_eq!(rate.current(), None);
        // Sends at about 400/s, then is throttled.
        let end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            rate.acquire().await;
            tokio::time::sleep(Duration::from_micros(2_500)).await;
        }
        meter.add_throttled();
        rate.acquire().await;
        let cut = rate.current().expect("limited after a throttle");
        assert!((200.0..320.0).contains(&cut), "cut to {cut}");
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_at_a_capacity_keeps_most_of_it() {
        // A store taking 80/s: every second write beyond it is throttled.
        let meter = CapacityMeter::new();
        let rate = AdaptiveRate::new(100.0, Arc::clone(&meter));
        let capacity = 80.0;
        let start = Instant::now();
        let (mut ok, mut tokens, mut last) = (0u64, 0.0f64, start);
        while start.elapsed() < Duration::from_secs(20) {
            rate.acquire().await;
            let now = Instant::now();
            tokens = (tokens + now.duration_since(last).as_secs_f64() * capacity).min(2.0);
            last = now;
            if tokens >= 1.0 {
                tokens -= 1.0;
                ok += 1;
            } else {
                meter.add_throttled();
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let per_second = ok as f64 / 20.0;
        assert!(
            per_second >= 0.85 * capacity,
            "{per_second}/s of {capacity}"
        );
    }

    #[test]
    fn the_meter_adds_halves() {
        let m = CapacityMeter::new();
        m.add_consumed(0.5);
        m.add_consumed(1.0);
        m.add_consumed(f64::NAN);
        assert!((m.consumed() - 1.5).abs() < 1e-9);
    }
}
