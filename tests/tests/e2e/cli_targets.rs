//! One CLI, four Services (#20.4): the four services each on its own port,
//! as on the Kubernetes base (a Service each), and `tidemark` reaching each
//! at its own endpoint — by flags, by environment variables and by a
//! context of the config file — while `--endpoint` points at nothing.

use std::path::Path;
use std::sync::Arc;

use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::{AttrValue, Item, KeySchema, SourceTable};
use tidemark_e2e::{
    CancellationToken, ServeResult, ServerHandle, cargo_bin, free_addr, spawn_job_tracker,
    test_server_config, unique_name,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A service served by its own `run` on a fresh loopback port.
struct Served {
    url: String,
    shutdown: CancellationToken,
    task: JoinHandle<ServeResult>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

async fn serve<F, Fut>(run: F) -> Served
where
    F: FnOnce(TcpListener, std::net::SocketAddr, CancellationToken) -> Fut,
    Fut: Future<Output = ServeResult> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(listener, addr, shutdown.clone()));
    Served {
        url: format!("http://{addr}"),
        shutdown,
        task,
    }
}

/// The job-tracker, the replicator, the verifier and the stats-aggregator,
/// each on its own port, the workers pointed at their peers' URLs; the
/// replicator and the verifier share `tables` for embedded SQLite tables.
async fn four_services(tables: &Path, stats_dir: &Path) -> (ServerHandle, [Served; 3]) {
    let jobs = spawn_job_tracker(|_| {}).await;
    let jobs_url = jobs.url();
    let (tables_r, tables_v, stats_dir) =
        (tables.to_owned(), tables.to_owned(), stats_dir.to_owned());
    let url = jobs_url.clone();
    let replicator = serve(move |listener, addr, token| async move {
        let config = replicator::Config {
            server: test_server_config(addr),
            job_tracker_url: url,
            data_dir: tables_r,
            lease_secs: 5,
            ..replicator::Config::default()
        };
        replicator::run(config, listener, token)
            .await
            .map_err(Into::into)
    })
    .await;
    let replicator_url = replicator.url.clone();
    let verifier = serve(move |listener, addr, token| async move {
        let config = verifier::Config {
            server: test_server_config(addr),
            job_tracker_url: jobs_url,
            replicator_url,
            data_dir: tables_v,
            ..verifier::Config::default()
        };
        verifier::run(config, listener, token)
            .await
            .map_err(Into::into)
    })
    .await;
    let stats = serve(move |listener, addr, token| async move {
        let config = stats_aggregator::Config {
            server: test_server_config(addr),
            buffer: stats_aggregator::BufferKind::Embedded,
            store: stats_aggregator::StoreKind::Embedded,
            data_dir: stats_dir,
            ..stats_aggregator::Config::default()
        };
        stats_aggregator::run(config, listener, token)
            .await
            .map_err(Into::into)
    })
    .await;
    (jobs, [replicator, verifier, stats])
}

/// Runs `tidemark --output json ARGS` with exactly the environment `env`
/// among the TIDEMARK_* target variables, asserting exit code 0.
async fn tidemark_ok(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let bin = cargo_bin("tidemark-cli", "tidemark").await;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--output").arg("json").args(args);
    for var in [
        "TIDEMARK_ENDPOINT",
        "TIDEMARK_JOB_TRACKER_URL",
        "TIDEMARK_REPLICATOR_URL",
        "TIDEMARK_VERIFIER_URL",
        "TIDEMARK_STATS_AGGREGATOR_URL",
        "TIDEMARK_TOKEN",
        "TIDEMARK_CONTEXT",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("TIDEMARK_CONFIG", "/nonexistent/tidemark/config.toml");
    cmd.envs(env.iter().copied());
    let out = cmd.output().await.expect("run tidemark");
    assert_eq!(
        out.status.code(),
        Some(0),
        "tidemark {args:?}: stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_four_services_on_four_ports_by_flags_env_and_context() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tables = dir.path().join("tables");
    let stats_dir = dir.path().join("stats");
    std::fs::create_dir_all(&tables).unwrap();
    std::fs::create_dir_all(&stats_dir).unwrap();
    let (jobs, [replicator, verifier, stats]) = four_services(&tables, &stats_dir).await;
    // Nothing answers here: a call routed to --endpoint would fail.
    let nowhere = format!("http://{}", free_addr());

    let name = unique_name("targets").replace('-', "_");
    let store = EmbeddedStore::open(&tables.join("default.db")).expect("open db");
    let table: Arc<dyn SourceTable> = Arc::new(store.table(&name, KeySchema::new("pk", None)));
    for i in 0..200 {
        let mut item = Item::new();
        item.insert("pk".to_owned(), AttrValue::s(format!("item-{i:04}")));
        table.put(&item, None).await.expect("seed");
    }
    let spec = format!("sqlite:{name}?key=pk");

    // By flags: the backfill goes to the replicator, its run is followed
    // on the job-tracker.
    let job = unique_name("targets-backfill");
    let run = tidemark_ok(
        &[
            "--endpoint",
            &nowhere,
            "--job-tracker",
            &jobs.url(),
            "--replicator",
            &replicator.url,
            "backfill-attribute",
            "--table",
            &spec,
            "--attribute",
            "test",
            "--value",
            "n:1",
            "--job",
            &job,
            "--timeout",
            "5m",
        ],
        &[],
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["counters"]["updated"], 200, "{run}");

    // By a context of the config file: the verifier proves it.
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "current = \"split\"\n\n[contexts.split]\nendpoint = \"{nowhere}\"\n\
             job_tracker = \"{}\"\nreplicator = \"{}\"\nverifier = \"{}\"\n\
             stats_aggregator = \"{}\"\n",
            jobs.url(),
            replicator.url,
            verifier.url,
            stats.url
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let report = tidemark_ok(
        &[
            "--config",
            config,
            "verify",
            "--source",
            &spec,
            "--predicate",
            "attribute_not_exists(#a)",
            "--name",
            "#a=test",
            "--expected",
            "0",
            "--timeout",
            "5m",
        ],
        &[],
    )
    .await;
    assert_eq!(report["verdict"], "pass", "{report}");

    // By environment variables, over the context's endpoint: the
    // stats-aggregator answers its state, the job-tracker lists the job.
    let state = tidemark_ok(
        &["stats", "state"],
        &[
            ("TIDEMARK_CONFIG", config),
            ("TIDEMARK_ENDPOINT", &nowhere),
            ("TIDEMARK_STATS_AGGREGATOR_URL", &stats.url),
        ],
    )
    .await;
    assert_eq!(state["paused"], false, "{state}");
    let listed = tidemark_ok(
        &["jobs", "ls"],
        &[
            ("TIDEMARK_ENDPOINT", &nowhere),
            ("TIDEMARK_JOB_TRACKER_URL", &jobs.url()),
        ],
    )
    .await;
    assert!(
        listed
            .as_array()
            .is_some_and(|all| all.iter().any(|j| j["name"] == job.as_str())),
        "{listed}"
    );
}
