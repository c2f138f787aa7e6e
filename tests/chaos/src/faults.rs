//! The kill schedule, drawn from the seed so a failing run can be replayed,
//! and its execution: kill -9 a service, keep it down a while, start it
//! again and time how long it takes to serve.

use std::time::{Duration, Instant};

use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};

use crate::plane::Process;

/// One planned kill.
#[derive(Clone, Debug)]
pub struct Kill {
    /// From the start of the fault phase.
    pub at: Duration,
    /// Index into the processes.
    pub target: usize,
    pub down_for: Duration,
}

/// `kills` kills spread over `duration` (after a warm-up), every process
/// taking its turn before any takes a second one.
pub fn schedule(seed: u64, duration: Duration, kills: usize, processes: usize) -> Vec<Kill> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let warm_up = Duration::from_secs(5).min(duration / 4);
    let slot = (duration.saturating_sub(warm_up + Duration::from_secs(3)))
        / u32::try_from(kills.max(1)).unwrap_or(1);
    let mut order: Vec<usize> = Vec::new();
    while order.len() < kills {
        let mut turn: Vec<usize> = (0..processes).collect();
        turn.shuffle(&mut rng);
        order.extend(turn);
    }
    order
        .into_iter()
        .take(kills)
        .enumerate()
        .map(|(k, target)| Kill {
            at: warm_up
                + slot * u32::try_from(k).unwrap_or(0)
                + slot.mul_f64(rng.random_range(0.0..0.4)),
            target,
            down_for: Duration::from_millis(rng.random_range(200..2_500)),
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

/// Runs the schedule against `processes`; fails when a process dies by
/// itself or does not come back.
pub async fn run(processes: &mut [Process], kills: &[Kill]) -> anyhow::Result<Vec<Recovery>> {
    let start = Instant::now();
    let mut out = Vec::new();
    for kill in kills {
        while start.elapsed() < kill.at {
            for p in processes.iter_mut() {
                p.check_alive()?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let p = &mut processes[kill.target];
        p.kill_9().await?;
        tokio::time::sleep(kill.down_for).await;
        p.start()?;
        let to_serving = p.wait_serving(Duration::from_secs(60)).await?;
        out.push(Recovery {
            target: kill.target,
            to_serving,
        });
    }
    Ok(out)
}
