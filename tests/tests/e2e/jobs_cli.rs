//! `tidemark jobs ls|show|ack|history` against `tidemark dev`: the failure
//! gate seen, explained and opened from the command line.

use std::process::Output;

use tidemark_e2e::{cargo_bin, spawn_job_tracker};
use tidemark_proto::job_tracker::v1 as pb;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;

async fn tidemark(endpoint: &str, args: &[&str]) -> Output {
    let bin = cargo_bin("tidemark-cli", "tidemark").await;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .env_remove("TIDEMARK_TOKEN");
    cmd.output().await.expect("run tidemark")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn jobs_commands_show_and_open_the_failure_gate() {
    // The job-tracker alone: in a whole dev host the replicator's worker
    // would claim the units this test claims by hand.
    let dev = spawn_job_tracker(|_| {}).await;
    let url = dev.url();
    let mut jobs = JobTrackerServiceClient::new(dev.channel().await);
    jobs.create_job(pb::CreateJobRequest {
        job: Some(pb::Job {
            name: "courses".into(),
            kind: pb::JobKind::UnitMigration as i32,
            description: "course media".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let units = ["c1", "c2"]
        .iter()
        .map(|k| pb::UnitSpec {
            unit_key: (*k).into(),
            after_unit_keys: vec![],
            ..Default::default()
        })
        .collect();
    let run = jobs
        .start_run(pb::StartRunRequest {
            job_name: "courses".into(),
            units,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    for _ in 0..2 {
        let unit = jobs
            .claim_unit(pb::ClaimUnitRequest {
                worker_id: "w".into(),
                run_id: run.run_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .unit
            .unwrap();
        let token = unit.lease.unwrap().fencing_token;
        if unit.unit_key == "c1" {
            jobs.complete_unit(pb::CompleteUnitRequest {
                run_id: run.run_id.clone(),
                unit_key: unit.unit_key,
                fencing_token: token,
                ..Default::default()
            })
            .await
            .unwrap();
        } else {
            jobs.fail_unit(pb::FailUnitRequest {
                run_id: run.run_id.clone(),
                unit_key: unit.unit_key,
                fencing_token: token,
                error: "injected fault".into(),
                rolled_back: true,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }

    let ls = tidemark(&url, &["jobs", "ls"]).await;
    assert!(ls.status.success(), "{ls:?}");
    assert!(
        text(&ls).contains("courses") && text(&ls).contains(&format!("blocked by {}", run.run_id)),
        "{}",
        text(&ls)
    );

    let show = tidemark(&url, &["jobs", "show", "courses"]).await;
    let shown = text(&show);
    assert!(
        shown.contains("BLOCKED") && shown.contains("tidemark jobs ack courses"),
        "{shown}"
    );
    assert!(
        shown.contains("unit c2 rolled-back: injected fault"),
        "{shown}"
    );

    let json = tidemark(&url, &["--output", "json", "jobs", "show", "courses"]).await;
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("valid JSON");
    assert_eq!(value["blocking_run_id"], run.run_id.as_str());
    assert_eq!(value["runs"][0]["units"]["migrated"], 1);

    let ack = tidemark(
        &url,
        &[
            "jobs",
            "ack",
            "courses",
            "--reason",
            "fault injected on purpose",
            "--actor",
            "ops",
        ],
    )
    .await;
    assert!(ack.status.success(), "{ack:?}");
    let again = jobs
        .start_run(pb::StartRunRequest {
            job_name: "courses".into(),
            ..Default::default()
        })
        .await;
    assert!(again.is_ok(), "the gate is open after ack: {again:?}");

    let history = tidemark(&url, &["jobs", "history", "courses", "--run", &run.run_id]).await;
    let h = text(&history);
    assert!(
        h.contains("run failed → failed-acknowledged")
            && h.contains("ops")
            && h.contains("fault injected on purpose"),
        "{h}"
    );
    assert!(h.contains("unit in-progress → rolled-back"), "{h}");

    let missing = tidemark(&url, &["jobs", "show", "nope"]).await;
    assert_eq!(missing.status.code(), Some(3), "not found exits 3");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("tidemark jobs ls"),
        "says what to do next"
    );
    let gate = tidemark(&url, &["jobs", "ack", "courses", "--reason", "twice"]).await;
    assert_eq!(
        gate.status.code(),
        Some(4),
        "nothing to acknowledge exits 4"
    );
}
