//! Load generators: a closed loop (N workers, each sends its next request
//! when the previous one answered: measures capacity) and an open loop (a
//! fixed schedule of sends, whatever the answers do: measures latency at a
//! given rate without coordinated omission).
//!
//! Both take the operation as `Fn(u64) -> impl Future<Output = Result<(), E>>`;
//! the argument is the worker index (closed loop) or the request's sequence
//! number (open loop), so the caller can pick a client with `i % clients.len()`.
//! Latencies are recorded in nanoseconds in HDR histograms.

use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;

/// Highest latency a histogram holds; longer ones are clamped to it.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("static histogram bounds are valid")
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// CPU time used so far by this process, all threads (live and exited),
/// user and system, at microsecond resolution; `None` if `getrusage` fails.
pub fn process_cpu_time() -> Option<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    use nix::sys::time::TimeValLike as _;
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
    u64::try_from(micros).ok().map(Duration::from_micros)
}

/// Process CPU time between two instants (sampled from a task, so up to a
/// timer tick late at each end).
async fn cpu_over(from: Instant, to: Instant) -> Option<Duration> {
    tokio::time::sleep_until(from.into()).await;
    let start = process_cpu_time()?;
    tokio::time::sleep_until(to.into()).await;
    Some(process_cpu_time()?.saturating_sub(start))
}

/// What one load run (or several merged) measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Requests that succeeded inside the measurement window.
    pub ok: u64,
    /// Requests that failed inside the measurement window.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Length of the measurement window(s), warm-up excluded.
    pub measured: Duration,
    /// Closed loop: from send to answer. Open loop: from the *scheduled* send
    /// time to the answer, so a stall counts against every request it delayed.
    pub latency: Histogram<u64>,
    /// Open loop only: from the actual send to the answer (what a naive
    /// client would report); equal to `latency` in a closed loop.
    pub service_time: Histogram<u64>,
    /// Open loop only: how late the generator itself sent, against its
    /// schedule. Large values mean the load generator, not the server, fell
    /// behind.
    pub send_lag: Histogram<u64>,
    /// CPU time the whole process (client and servers alike) used during
    /// the measurement window; `None` if it could not be read.
    /// Unlike throughput it does not drop when another process takes the
    /// cores, so CPU per request is the steadier cost figure on a shared VM.
    pub cpu: Option<Duration>,
}

impl Default for LoadResult {
    fn default() -> Self {
        Self {
            ok: 0,
            errors: 0,
            first_error: None,
            measured: Duration::ZERO,
            latency: histogram(),
            service_time: histogram(),
            send_lag: histogram(),
            cpu: Some(Duration::ZERO),
        }
    }
}

impl LoadResult {
    /// Successful requests per second of measurement window.
    pub fn throughput(&self) -> f64 {
        if self.measured.is_zero() {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let ok = self.ok as f64;
        ok / self.measured.as_secs_f64()
    }

    /// Latency at `q` (0.0..=1.0) in microseconds.
    pub fn latency_us(&self, q: f64) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let ns = self.latency.value_at_quantile(q) as f64;
        ns / 1_000.0
    }

    /// Process CPU time per successful request in microseconds (NaN when
    /// unknown or without requests).
    pub fn cpu_per_request_us(&self) -> f64 {
        match self.cpu {
            #[allow(clippy::cast_precision_loss)]
            Some(cpu) if self.ok > 0 => cpu.as_secs_f64() * 1e6 / self.ok as f64,
            _ => f64::NAN,
        }
    }

    /// Cores the process kept busy on average over the window (CPU time ÷
    /// wall time; NaN when unknown).
    pub fn cores_busy(&self) -> f64 {
        match self.cpu {
            Some(cpu) if !self.measured.is_zero() => {
                cpu.as_secs_f64() / self.measured.as_secs_f64()
            }
            _ => f64::NAN,
        }
    }

    /// Service time at `q` in microseconds (see [`LoadResult::service_time`]).
    pub fn service_time_us(&self, q: f64) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let ns = self.service_time.value_at_quantile(q) as f64;
        ns / 1_000.0
    }

    /// Adds another window's counts and latencies (rounds of one side).
    pub fn merge(&mut self, other: &Self) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.measured += other.measured;
        // Same bounds on both sides: adding cannot fail.
        self.latency.add(&other.latency).expect("same bounds");
        self.service_time
            .add(&other.service_time)
            .expect("same bounds");
        self.send_lag.add(&other.send_lag).expect("same bounds");
        self.cpu = self.cpu.zip(other.cpu).map(|(a, b)| a + b);
    }

    /// One line for the terminal.
    pub fn summary(&self) -> String {
        format!(
            "{:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, {} ok, {} errors",
            self.throughput(),
            self.latency_us(0.5),
            self.latency_us(0.99),
            self.ok,
            self.errors,
        )
    }

    fn record(&mut self, outcome: Result<(), String>, latency: Duration, service: Duration) {
        match outcome {
            Ok(()) => {
                self.ok += 1;
                self.latency.saturating_record(nanos(latency));
                self.service_time.saturating_record(nanos(service));
            }
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(e);
                }
            }
        }
    }
}

/// `concurrency` workers, each sending its next request as soon as the
/// previous one answered, for `warmup` (discarded) then `duration`.
#[derive(Debug, Clone, Copy)]
pub struct ClosedLoop {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

impl ClosedLoop {
    /// Runs the loop; `op(worker)` is one request.
    ///
    /// # Errors
    /// When a worker task panics.
    pub async fn run<F, Fut, E>(&self, op: F) -> anyhow::Result<LoadResult>
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let op = Arc::new(op);
        let measure_from = Instant::now() + self.warmup;
        let end = measure_from + self.duration;
        let cpu = tokio::spawn(cpu_over(measure_from, end));
        let mut workers = Vec::with_capacity(self.concurrency);
        for worker in 0..self.concurrency as u64 {
            let op = Arc::clone(&op);
            workers.push(tokio::spawn(async move {
                let mut result = LoadResult::default();
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let outcome = op(worker).await.map_err(|e| e.to_string());
                    let done = Instant::now();
                    // Counted by completion time, so the window's throughput
                    // is what completed inside it.
                    if done >= measure_from && done <= end {
                        result.record(outcome, done - sent, done - sent);
                    }
                }
                result
            }));
        }
        let mut total = LoadResult {
            measured: self.duration,
            ..LoadResult::default()
        };
        for worker in workers {
            let mut r = worker.await.context("load worker panicked")?;
            r.measured = Duration::ZERO;
            total.merge(&r);
        }
        total.cpu = cpu.await.context("cpu sampler panicked")?;
        Ok(total)
    }
}

/// Sends at a fixed `rate` (requests per second) for `warmup` (discarded)
/// then `duration`, whatever the answers do, with at most `max_in_flight`
/// requests outstanding (a stalled server then delays sends, and that delay
/// is counted in the latency).
#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    pub max_in_flight: usize,
}

impl OpenLoop {
    /// Runs the schedule; `op(i)` is the `i`-th request.
    ///
    /// The schedule is kept by a dedicated thread with `std::thread::sleep`
    /// (tens of microseconds of precision) rather than a tokio timer
    /// (millisecond wheel), which would add up to a millisecond of jitter
    /// to latencies of a tenth of that. Each request's latency is taken from
    /// its scheduled send time, so a generator or server stall is never
    /// hidden (no coordinated omission).
    ///
    /// # Errors
    /// When the rate is not positive or the scheduler thread panics.
    pub async fn run<F, Fut, E>(&self, op: F) -> anyhow::Result<LoadResult>
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        anyhow::ensure!(
            self.rate.is_finite() && self.rate > 0.0,
            "rate must be positive"
        );
        anyhow::ensure!(self.max_in_flight > 0, "max_in_flight must be positive");
        let op = Arc::new(op);
        let recorder = Arc::new(Mutex::new(LoadResult {
            measured: self.duration,
            ..LoadResult::default()
        }));
        let permits = u32::try_from(self.max_in_flight).context("max_in_flight too large")?;
        let in_flight = Arc::new(Semaphore::new(self.max_in_flight));
        let runtime = tokio::runtime::Handle::current();
        let start = Instant::now() + Duration::from_millis(1);
        let measure_from = start + self.warmup;
        let end = measure_from + self.duration;
        let cpu = tokio::spawn(cpu_over(measure_from, end));
        let rate = self.rate;

        let scheduler = {
            let recorder = Arc::clone(&recorder);
            let in_flight = Arc::clone(&in_flight);
            tokio::task::spawn_blocking(move || {
                let mut send_lag = histogram();
                for i in 0_u64.. {
                    #[allow(clippy::cast_precision_loss)]
                    let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
                    if scheduled >= end {
                        break;
                    }
                    let now = Instant::now();
                    if scheduled > now {
                        std::thread::sleep(scheduled - now);
                    }
                    let permit = runtime
                        .block_on(Arc::clone(&in_flight).acquire_owned())
                        .expect("the semaphore is never closed");
                    let sent = Instant::now();
                    let measured = scheduled >= measure_from;
                    if measured {
                        send_lag
                            .saturating_record(nanos(sent.saturating_duration_since(scheduled)));
                    }
                    let op = Arc::clone(&op);
                    let recorder = Arc::clone(&recorder);
                    runtime.spawn(async move {
                        let outcome = op(i).await.map_err(|e| e.to_string());
                        let done = Instant::now();
                        drop(permit);
                        if measured {
                            recorder.lock().expect("recorder lock").record(
                                outcome,
                                done - scheduled,
                                done - sent,
                            );
                        }
                    });
                }
                send_lag
            })
        };
        let send_lag = scheduler.await.context("open-loop scheduler panicked")?;
        // Every request has answered once all permits are back.
        let _all = in_flight
            .acquire_many(permits)
            .await
            .expect("the semaphore is never closed");
        let mut result = recorder.lock().expect("recorder lock").clone();
        result.send_lag = send_lag;
        result.cpu = cpu.await.context("cpu sampler panicked")?;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sleep_op(_: u64) -> Result<(), String> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(())
    }

    #[tokio::test]
    async fn closed_loop_counts_completions_of_every_worker() {
        let r = ClosedLoop {
            concurrency: 4,
            warmup: Duration::from_millis(20),
            duration: Duration::from_millis(300),
        }
        .run(sleep_op)
        .await
        .unwrap();
        // At most 4 workers × 300 ms / 2 ms (+ one straddling the warm-up
        // edge per worker); far fewer when timers round up or CI keeps the
        // cores busy, so only the upper bound is tight.
        assert!(r.ok >= 20 && r.ok <= 604, "{}", r.summary());
        assert_eq!(r.errors, 0);
        assert!(r.latency_us(0.5) >= 2_000.0, "{}", r.summary());
        assert_eq!(r.measured, Duration::from_millis(300));
    }

    #[test]
    fn reads_this_process_cpu_time() {
        let before = process_cpu_time().expect("getrusage");
        let spin = Instant::now();
        let mut x = 0_u64;
        while spin.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = process_cpu_time().unwrap() - before;
        assert!(used >= Duration::from_millis(50), "{used:?}");
    }

    #[tokio::test]
    async fn closed_loop_counts_errors_apart() {
        let r = ClosedLoop {
            concurrency: 2,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(50),
        }
        .run(|w| async move {
            tokio::task::yield_now().await;
            if w == 0 { Ok(()) } else { Err("boom") }
        })
        .await
        .unwrap();
        assert!(r.ok > 0 && r.errors > 0);
        assert_eq!(r.first_error.as_deref(), Some("boom"));
        assert_eq!(r.latency.len(), r.ok);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_keeps_the_rate_and_counts_from_the_schedule() {
        let r = OpenLoop {
            rate: 1_000.0,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(400),
            max_in_flight: 100,
        }
        .run(sleep_op)
        .await
        .unwrap();
        // 400 sends scheduled inside the window, whatever the latency.
        assert!((395..=401).contains(&r.ok), "{}", r.summary());
        assert!(r.latency_us(0.5) >= 2_000.0);
        assert!(r.latency.value_at_quantile(0.5) >= r.service_time.value_at_quantile(0.5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_charges_a_stall_to_the_requests_it_delayed() {
        // One request in flight at a time and 20 ms per request at 1000/s:
        // the schedule falls behind, and latency from the scheduled time
        // grows far beyond the 20 ms service time.
        let r = OpenLoop {
            rate: 1_000.0,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(50),
            max_in_flight: 1,
        }
        .run(|_| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, String>(())
        })
        .await
        .unwrap();
        // Generous bound: other tests share the two cores.
        assert!(r.service_time_us(0.5) < 100_000.0, "{}", r.summary());
        assert!(r.latency_us(0.99) > 500_000.0, "{}", r.summary());
    }
}
