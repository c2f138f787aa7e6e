//! The precedence of the target settings: flag > env > context > default.

use std::collections::HashMap;
use std::path::PathBuf;

use tidemark_client::Service;

use super::*;

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

const FILE: &str = r#"
current = "k8s"

[contexts.k8s]
job_tracker = "http://job-tracker:50051"
replicator = "http://replicator:50051"
verifier = "http://verifier:50051"
stats_aggregator = "http://stats-aggregator:50051"
token = "from-context"
tls_ca = "ca.pem"

[contexts.local]
endpoint = "http://127.0.0.1:7000"
"#;

#[test]
fn nothing_given_is_the_dev_default_for_every_service() {
    let t = load(&TargetArgs::default(), &env_of(&[])).unwrap();
    assert_eq!(t.endpoint, DEFAULT_ENDPOINT);
    for s in Service::ALL {
        assert_eq!(t.endpoint_of(s), DEFAULT_ENDPOINT);
    }
    assert_eq!(t.context, None);
}

#[test]
fn each_service_defaults_to_the_endpoint_and_its_own_url_wins() {
    let args = TargetArgs {
        endpoint: Some("http://all:1".into()),
        replicator: Some("http://rep:2".into()),
        ..TargetArgs::default()
    };
    let t = load(&args, &env_of(&[])).unwrap();
    assert_eq!(t.endpoint_of(Service::Replicator), "http://rep:2");
    assert_eq!(t.endpoint_of(Service::JobTracker), "http://all:1");
    assert_eq!(t.endpoint_of(Service::Verifier), "http://all:1");
    assert_eq!(t.endpoint_of(Service::StatsAggregator), "http://all:1");
}

#[test]
fn a_flag_beats_the_environment_which_beats_the_default() {
    let env = env_of(&[
        ("TIDEMARK_ENDPOINT", "http://env-all:1"),
        ("TIDEMARK_JOB_TRACKER_URL", "http://env-jt:1"),
        ("TIDEMARK_TOKEN", "env-token"),
    ]);
    let t = load(&TargetArgs::default(), &env).unwrap();
    assert_eq!(t.endpoint_of(Service::JobTracker), "http://env-jt:1");
    assert_eq!(t.endpoint_of(Service::Replicator), "http://env-all:1");
    assert_eq!(t.token.as_deref(), Some("env-token"));

    // --endpoint on the command line beats even a service's own variable:
    // the command line points everything at one place.
    let args = TargetArgs {
        endpoint: Some("http://flag:1".into()),
        token: Some("flag-token".into()),
        ..TargetArgs::default()
    };
    let t = load(&args, &env).unwrap();
    for s in Service::ALL {
        assert_eq!(t.endpoint_of(s), "http://flag:1");
    }
    assert_eq!(t.token.as_deref(), Some("flag-token"));
}

#[test]
fn the_current_context_is_used_below_flags_and_environment() {
    let (_dir, path) = config_file(FILE);
    let args = TargetArgs {
        config: Some(path.clone()),
        ..TargetArgs::default()
    };
    let t = load(&args, &env_of(&[])).unwrap();
    assert_eq!(t.context.as_deref(), Some("k8s"));
    assert_eq!(
        t.endpoint_of(Service::JobTracker),
        "http://job-tracker:50051"
    );
    assert_eq!(
        t.endpoint_of(Service::StatsAggregator),
        "http://stats-aggregator:50051"
    );
    assert_eq!(t.token.as_deref(), Some("from-context"));
    // Relative to the file.
    assert_eq!(t.tls_ca, Some(path.parent().unwrap().join("ca.pem")));

    let env = env_of(&[
        ("TIDEMARK_VERIFIER_URL", "http://env-verifier:1"),
        ("TIDEMARK_TOKEN", "env-token"),
    ]);
    let args = TargetArgs {
        replicator: Some("http://flag-rep:1".into()),
        ..args
    };
    let t = load(&args, &env).unwrap();
    assert_eq!(t.endpoint_of(Service::Replicator), "http://flag-rep:1");
    assert_eq!(t.endpoint_of(Service::Verifier), "http://env-verifier:1");
    assert_eq!(
        t.endpoint_of(Service::JobTracker),
        "http://job-tracker:50051"
    );
    assert_eq!(t.token.as_deref(), Some("env-token"));
}

#[test]
fn a_context_is_chosen_by_flag_then_environment_then_current() {
    let (_dir, path) = config_file(FILE);
    let path = path.to_str().unwrap().to_owned();
    let env = env_of(&[
        ("TIDEMARK_CONFIG", path.as_str()),
        ("TIDEMARK_CONTEXT", "local"),
    ]);
    let t = load(&TargetArgs::default(), &env).unwrap();
    assert_eq!(t.context.as_deref(), Some("local"));
    for s in Service::ALL {
        assert_eq!(t.endpoint_of(s), "http://127.0.0.1:7000");
    }
    let args = TargetArgs {
        context: Some("k8s".into()),
        ..TargetArgs::default()
    };
    let t = load(&args, &env).unwrap();
    assert_eq!(t.context.as_deref(), Some("k8s"));
    assert_eq!(
        t.endpoint_of(Service::Replicator),
        "http://replicator:50051"
    );
}

#[test]
fn an_unknown_context_is_an_error_naming_the_known_ones() {
    let (_dir, path) = config_file(FILE);
    let args = TargetArgs {
        config: Some(path),
        context: Some("prod".into()),
        ..TargetArgs::default()
    };
    let err = load(&args, &env_of(&[])).unwrap_err().to_string();
    assert!(err.contains("prod") && err.contains("k8s, local"), "{err}");
}

#[test]
fn a_missing_file_has_no_contexts_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let args = TargetArgs {
        config: Some(dir.path().join("absent.toml")),
        ..TargetArgs::default()
    };
    assert_eq!(
        load(&args, &env_of(&[])).unwrap().endpoint,
        DEFAULT_ENDPOINT
    );

    let (_dir, path) = config_file("[contexts.x]\njob_traker = \"http://typo:1\"\n");
    let args = TargetArgs {
        config: Some(path),
        ..TargetArgs::default()
    };
    let err = load(&args, &env_of(&[])).unwrap_err().to_string();
    assert!(err.contains("job_traker"), "{err}");
}

#[test]
fn the_default_file_is_under_xdg_config_home_then_home() {
    let env = env_of(&[("HOME", "/home/u")]);
    assert_eq!(
        config_path(None, &env),
        Some(PathBuf::from("/home/u/.config/tidemark/config.toml"))
    );
    let env = env_of(&[("HOME", "/home/u"), ("XDG_CONFIG_HOME", "/xdg")]);
    assert_eq!(
        config_path(None, &env),
        Some(PathBuf::from("/xdg/tidemark/config.toml"))
    );
}

#[test]
fn options_give_each_service_its_own_endpoint_only_when_it_differs() {
    let args = TargetArgs {
        endpoint: Some("http://all:1".into()),
        verifier: Some("http://ver:2".into()),
        ..TargetArgs::default()
    };
    let t = load(&args, &env_of(&[])).unwrap();
    let o = t.options(&Options::default()).unwrap();
    assert_eq!(o.endpoint, "http://all:1");
    assert_eq!(o.services.verifier.as_deref(), Some("http://ver:2"));
    assert_eq!(o.services.job_tracker, None);
    assert_eq!(
        t.describe(),
        "job-tracker http://all:1, replicator http://all:1, verifier http://ver:2, stats-aggregator http://all:1"
    );
}
