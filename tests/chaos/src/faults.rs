//! The fault schedule, drawn from the seed so a failing run can be
//! replayed, and its execution: kill -9 a service, keep it down a while,
//! start it again and time how long it takes to serve; or make a store's
//! proxy slow, hang, or reset its connections for a while.

use std::time::{Duration, Instant};

use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};

use crate::plane::Process;
use crate::proxy::{FaultProxy, Mode};

/// What a store fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StoreFault {
    /// Every chunk held this long, for a while.
    Latency(Duration),
    /// Nothing forwarded for a while; connections hang.
    Blackhole,
    /// Every open connection reset at once.
    Reset,
    /// Every open connection hangs this long, then ends with a FIN.
    SlowClose(Duration),
}

impl StoreFault {
    pub fn kind(self) -> &'static str {
        match self {
            Self::Latency(_) => "latency",
            Self::Blackhole => "blackhole",
            Self::Reset => "reset",
            Self::SlowClose(_) => "slow-close",
        }
    }
}

/// One planned fault.
#[derive(Clone, Debug)]
pub enum Fault {
    /// kill -9 of a process (an index into the processes), restarted after
    /// `down_for`.
    Kill { target: usize, down_for: Duration },
    /// A fault on a proxy (an index into the proxies) for `lasting`.
    Store {
        proxy: usize,
        fault: StoreFault,
        lasting: Duration,
    },
}

/// `kills` kills and as many store faults spread over `duration` (after a
/// warm-up): every process takes its turn before any takes a second one,
/// and every proxy gets every kind of fault in turn (so
/// proxies × 4 store faults cover every kind on every store).
pub fn schedule(
    seed: u64,
    duration: Duration,
    kills: usize,
    processes: usize,
    proxies: usize,
) -> Vec<(Duration, Fault)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut targets: Vec<usize> = Vec::new();
    while targets.len() < kills {
        let mut turn: Vec<usize> = (0..processes).collect();
        turn.shuffle(&mut rng);
        targets.extend(turn);
    }
    let store_faults = if proxies == 0 { 0 } else { kills };
    let mut stores: Vec<(usize, usize)> = Vec::new();
    while stores.len() < store_faults {
        let mut turn: Vec<(usize, usize)> = (0..proxies)
            .flat_map(|p| (0..4).map(move |k| (p, k)))
            .collect();
        turn.shuffle(&mut rng);
        stores.extend(turn);
    }
    let mut faults: Vec<Fault> = targets
        .into_iter()
        .take(kills)
        .map(|target| Fault::Kill {
            target,
            down_for: Duration::from_millis(rng.random_range(200..2_500)),
        })
        .collect();
    faults.extend(
        stores
            .into_iter()
            .take(store_faults)
            .map(|(proxy, kind)| Fault::Store {
                proxy,
                fault: match kind {
                    0 => StoreFault::Latency(Duration::from_millis(rng.random_range(50..400))),
                    1 => StoreFault::Blackhole,
                    2 => StoreFault::Reset,
                    _ => StoreFault::SlowClose(Duration::from_millis(rng.random_range(500..3_000))),
                },
                lasting: Duration::from_millis(rng.random_range(1_000..4_000)),
            }),
    );
    faults.shuffle(&mut rng);
    let warm_up = Duration::from_secs(5).min(duration / 4);
    let slot = duration.saturating_sub(warm_up + Duration::from_secs(3))
        / u32::try_from(faults.len().max(1)).unwrap_or(1);
    faults
        .into_iter()
        .enumerate()
        .map(|(k, fault)| {
            let at = warm_up
                + slot * u32::try_from(k).unwrap_or(0)
                + slot.mul_f64(rng.random_range(0.0..0.3));
            (at, fault)
        })
        .collect()
}

/// What one kill cost.
#[derive(Clone, Debug)]
pub struct Recovery {
    pub target: usize,
    /// From the restart to the first SERVING health answer.
    pub to_serving: Duration,
}

/// What the schedule did.
#[derive(Debug, Default)]
pub struct Done {
    pub recoveries: Vec<Recovery>,
    /// (proxy name, fault kind) of each store fault.
    pub store_faults: Vec<(String, &'static str)>,
}

/// Runs the schedule; fails when a process dies by itself or does not
/// come back.
pub async fn run(
    processes: &mut [Process],
    proxies: &[FaultProxy],
    faults: &[(Duration, Fault)],
) -> anyhow::Result<Done> {
    let start = Instant::now();
    let mut done = Done::default();
    for (at, fault) in faults {
        while start.elapsed() < *at {
            for p in processes.iter_mut() {
                p.check_alive()?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match *fault {
            Fault::Kill { target, down_for } => {
                let p = &mut processes[target];
                p.kill_9().await?;
                tokio::time::sleep(down_for).await;
                p.start()?;
                let to_serving = p.wait_serving(Duration::from_secs(60)).await?;
                done.recoveries.push(Recovery { target, to_serving });
            }
            Fault::Store {
                proxy,
                fault,
                lasting,
            } => {
                let p = &proxies[proxy];
                match fault {
                    StoreFault::Latency(d) => p.set(Mode::Latency(d)),
                    StoreFault::Blackhole => p.set(Mode::Blackhole),
                    StoreFault::Reset => p.reset_all(),
                    StoreFault::SlowClose(d) => p.slow_close_all(d),
                }
                if matches!(fault, StoreFault::Latency(_) | StoreFault::Blackhole) {
                    tokio::time::sleep(lasting).await;
                    p.set(Mode::Pass);
                }
                done.store_faults.push((p.name.clone(), fault.kind()));
            }
        }
    }
    Ok(done)
}
