//! The README's walkthrough on embedded stores, run as written: its block
//! of commands, unchanged, by bash in a directory whose `./.tidemark` is the
//! data directory of a `tidemark dev` process, with `tidemark` on the PATH.
//! A command that fails (a verification that does not pass exits 6), or an
//! outcome that is not there, fails the test,
//! so the README cannot drift from what the binary does.

use tidemark_connectors::testing::workspace_root;
use tidemark_e2e::start_dev_process;

const MARKER: &str = "<!-- walkthrough: tests/tests/e2e/walkthrough.rs runs the next block -->";

/// The first ```sh block after the marker.
fn walkthrough_block(readme: &str) -> String {
    let after = readme
        .split_once(MARKER)
        .unwrap_or_else(|| panic!("README.md has no {MARKER:?}"))
        .1;
    let body = after
        .split_once("```sh\n")
        .expect("a ```sh block after the marker")
        .1;
    body.split_once("\n```")
        .expect("the block ends")
        .0
        .to_owned()
}

#[tokio::test]
async fn the_readme_walkthrough_runs_as_written_on_embedded_stores() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let block = walkthrough_block(&readme);
    assert!(block.contains("tidemark seed"), "{block}");
    let dir = tempfile::tempdir().unwrap();
    let mut dev = start_dev_process(
        &dir.path().join(".tidemark"),
        &[],
        &dir.path().join("dev.log"),
    )
    .await;
    let script = dir.path().join("walkthrough.sh");
    std::fs::write(&script, format!("set -euo pipefail\n{block}\n")).unwrap();
    let bin_dir = dev.bin.parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("TIDEMARK_ENDPOINT", &dev.url)
        .env_remove("TIDEMARK_TOKEN")
        .env_remove("TIDEMARK_CONTEXT")
        .env("TIDEMARK_CONFIG", dir.path().join("no-config.toml"))
        .output()
        .await
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the walkthrough failed ({}):\n{stdout}\n{stderr}\n--- dev log ---\n{}",
        out.status,
        std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default()
    );
    for want in [
        "seeded 5000 items in 4 groups into sqlite:items?key=id",
        "updated 5000",
        "0 items match, expected 0",
        "g3    migrated  1250",
        "pipeline copy streaming",
        // The pipeline followed the second seed: 6,000 on both sides.
        "source 6000, target 6000",
        "views   3      3",
        "groups",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    let _ = dev.child.kill().await;
}
