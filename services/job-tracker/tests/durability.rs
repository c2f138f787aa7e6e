//! `kill -9` of the job-tracker in the middle of a run of claims and
//! checkpoints loses no acknowledged transition, on both stores: every
//! response the client got before the kill is still true after restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidemark_connectors::testing::{local_env, unique_name};
use tidemark_proto::job_tracker::v1 as pb;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tonic::transport::Channel;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Kills the child on drop, so a failing test leaves no server behind.
struct Server(Child);

impl Server {
    fn kill_9(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reap");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(addr: SocketAddr, env: &[(&str, String)]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_job-tracker"));
    cmd.env("TIDEMARK_LISTEN", addr.to_string())
        .env("TIDEMARK_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Server(cmd.spawn().expect("start job-tracker"))
}

async fn connect(addr: SocketAddr) -> JobTrackerServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let mut c = JobTrackerServiceClient::new(ch);
            if c.list_jobs(pb::ListJobsRequest::default()).await.is_ok() {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "job-tracker did not come up on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the client was told, per unit.
#[derive(Debug, Default, Clone)]
struct Acked {
    token: u64,
    checkpoint: Vec<u8>,
    completed: bool,
}

async fn kill_mid_run(env: Vec<(&'static str, String)>) {
    let addr = free_port();
    let mut child = start(addr, &env);
    let mut client = connect(addr).await;
    let run = start_durable_run(&mut client).await;
    let acked = work_until_killed(&mut client, &mut child, &run).await;

    // Restart on the same store: every acknowledged transition is there.
    let child = start(addr, &env);
    let mut client = connect(addr).await;
    assert_acknowledged_state(&mut client, &run, &acked).await;
    drop(child);
}

/// Creates a unit-migration job and starts a run of [`UNITS`] units.
async fn start_durable_run(client: &mut JobTrackerServiceClient<Channel>) -> pb::Run {
    let job = unique_name("durable");
    client
        .create_job(pb::CreateJobRequest {
            job: Some(pb::Job {
                name: job.clone(),
                kind: pb::JobKind::UnitMigration as i32,
                max_attempts: 10,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let units = (0..UNITS)
        .map(|i| pb::UnitSpec {
            unit_key: format!("course-{i:02}"),
            after_unit_keys: vec![],
            ..Default::default()
        })
        .collect();
    client
        .start_run(pb::StartRunRequest {
            job_name: job.clone(),
            units,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
}

/// Claims, checkpoints and completes units until `child` is killed after a
/// random number of calls; returns what the client was told per unit.
async fn work_until_killed(
    client: &mut JobTrackerServiceClient<Channel>,
    child: &mut Server,
    run: &pb::Run,
) -> HashMap<String, Acked> {
    // Claim, checkpoint and complete until the process is killed under us.
    let mut acked: HashMap<String, Acked> = HashMap::new();
    // Killed after a random number of acknowledged calls, well before the
    // run could end (each unit takes up to five calls).
    let kill_after = 20 + usize::from(rand_u8() % 60);
    let mut calls = 0usize;
    let mut killed = false;
    'work: loop {
        if calls >= kill_after {
            child.kill_9();
            killed = true;
            break 'work;
        }
        calls += 1;
        let Ok(resp) = client
            .claim_unit(pb::ClaimUnitRequest {
                worker_id: "w".into(),
                run_id: run.run_id.clone(),
                lease_duration: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
        else {
            break;
        };
        let Some(unit) = resp.into_inner().unit else {
            break;
        };
        let token = unit.lease.unwrap().fencing_token;
        acked.insert(
            unit.unit_key.clone(),
            Acked {
                token,
                ..Acked::default()
            },
        );
        for step in 0..3u8 {
            let checkpoint = format!("{}:{step}", unit.unit_key).into_bytes();
            let ok = client
                .checkpoint(pb::CheckpointRequest {
                    run_id: run.run_id.clone(),
                    unit_key: unit.unit_key.clone(),
                    fencing_token: token,
                    checkpoint: checkpoint.clone(),
                    items_processed: i64::from(step),
                    ..Default::default()
                })
                .await
                .is_ok();
            if !ok {
                break 'work;
            }
            calls += 1;
            acked.get_mut(&unit.unit_key).unwrap().checkpoint = checkpoint;
        }
        if !rand_u8().is_multiple_of(4)
            && client
                .complete_unit(pb::CompleteUnitRequest {
                    run_id: run.run_id.clone(),
                    unit_key: unit.unit_key.clone(),
                    fencing_token: token,
                    ..Default::default()
                })
                .await
                .is_ok()
        {
            acked.get_mut(&unit.unit_key).unwrap().completed = true;
        }
    }
    assert!(killed, "the run finished before the kill; make it longer");
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the kill"
    );
    acked
}

/// Every acknowledged claim, checkpoint and completion survived the kill.
async fn assert_acknowledged_state(
    client: &mut JobTrackerServiceClient<Channel>,
    run: &pb::Run,
    acked: &HashMap<String, Acked>,
) {
    let units = client
        .list_units(pb::ListUnitsRequest {
            run_id: run.run_id.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .units;
    assert_eq!(units.len(), UNITS);
    for unit in &units {
        let Some(a) = acked.get(&unit.unit_key) else {
            continue;
        };
        if a.completed {
            assert_eq!(
                unit.status,
                pb::UnitStatus::Migrated as i32,
                "{} was acknowledged complete",
                unit.unit_key
            );
        } else {
            assert_eq!(
                unit.status,
                pb::UnitStatus::InProgress as i32,
                "{} was claimed",
                unit.unit_key
            );
            assert!(unit.lease.as_ref().unwrap().fencing_token >= a.token);
            if !a.checkpoint.is_empty() {
                assert_eq!(
                    unit.checkpoint, a.checkpoint,
                    "{} keeps its last acknowledged checkpoint",
                    unit.unit_key
                );
            }
        }
    }
}

const UNITS: usize = 60;

fn rand_u8() -> u8 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u8::try_from(nanos % 251).unwrap()
}

#[tokio::test]
async fn kill_9_loses_nothing_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    kill_mid_run(vec![(
        "TIDEMARK_DATA_DIR",
        dir.path().display().to_string(),
    )])
    .await;
}

#[tokio::test]
async fn kill_9_loses_nothing_on_dynamodb() {
    let endpoint = local_env("TIDEMARK_TEST_DYNAMODB_ENDPOINT");
    kill_mid_run(vec![
        ("TIDEMARK_STORE", "dynamodb".to_owned()),
        ("TIDEMARK_DYNAMODB_TABLE", unique_name("jobs-durable")),
        ("TIDEMARK_AWS_ENDPOINT", endpoint),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ])
    .await;
}
