//! Problem 4: `tidemark backfill-attribute` sets `test = 1` on every item
//! lacking it while the application's writers set `test = 2` on some: no
//! writer's value is overwritten, and `tidemark verify` proves that no item
//! lacks the attribute (`attribute_not_exists(test)` counts 0).
//!
//! The 100k items run on an embedded SQLite table (the DynamoDB
//! stand-in writes about 240 items/s, 100k would take minutes just to seed);
//! a smaller run covers DynamoDB itself.

use std::collections::BTreeSet;
use std::sync::Arc;

use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::testing::dynamodb_clients;
use tidemark_connectors::{
    AttrValue, ConnectorError, Item, Key, KeySchema, ScanRequest, SourceTable,
};
use tidemark_e2e::{PlaneOptions, spawn_plane, tidemark, tidemark_json, unique_name};

fn schema() -> KeySchema {
    KeySchema::new("pk", None)
}

fn key(i: usize) -> Key {
    Key::new([("pk".to_owned(), AttrValue::s(format!("item-{i:06}")))])
}

fn item(i: usize) -> Item {
    let mut item = key(i).0;
    item.insert(
        "v".to_owned(),
        AttrValue::n(i64::try_from(i).expect("small")),
    );
    item
}

fn test_value(item: &Item) -> Option<String> {
    item.get("test").map(|v| format!("{v:?}"))
}

async fn all_items(table: &dyn SourceTable) -> Vec<Item> {
    let mut out = Vec::new();
    let mut start_after = None;
    loop {
        let page = table
            .scan(&ScanRequest {
                start_after,
                consistent: true,
                ..ScanRequest::segment(0, 1)
            })
            .await
            .expect("scan");
        out.extend(page.items);
        match page.last_key {
            Some(k) => start_after = Some(k),
            None => return out,
        }
    }
}

/// Runs the backfill through the CLI while `writer` sets `test = 2` on the
/// keys of `written`, then checks that each of those kept 2, that no item
/// lacks the attribute, that the counters add up, and that the verifier's
/// predicate finds 0.
async fn backfill_against_writers(
    url: &str,
    store: &str,
    table: Arc<dyn SourceTable>,
    total: usize,
    written: Vec<usize>,
) {
    let two = {
        let mut set = Item::new();
        set.insert("test".to_owned(), AttrValue::n(2i64));
        set
    };
    let writer = {
        let table = Arc::clone(&table);
        let written = written.clone();
        let two = two.clone();
        tokio::spawn(async move {
            for i in written {
                // A busy store (SQLite's lock under load, DynamoDB
                // throttling) answers retryable errors: writers retry.
                loop {
                    match table.update(&key(i), &two, None).await {
                        Ok(_) => break,
                        Err(ConnectorError::Retryable { .. }) => {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("writer update: {e:?}"),
                    }
                }
            }
        })
    };
    let job = unique_name("backfill-test");
    let out = tidemark_json(
        url,
        &[
            "backfill-attribute",
            "--table",
            store,
            "--attribute",
            "test",
            "--value",
            "n:1",
            "--segments",
            "8",
            "--job",
            &job,
            "--actor",
            "e2e",
            "--timeout",
            "15m",
        ],
        0,
    )
    .await;
    writer.await.expect("writer task");
    assert_eq!(out["status"], "succeeded", "{out}");
    let counter = |name: &str| out["counters"][name].as_i64().unwrap_or(0);
    assert_eq!(
        usize::try_from(counter("updated") + counter("already_set") + counter("conflicted"))
            .unwrap(),
        total,
        "every item was either set, found set, or left to its writer: {out}"
    );

    let items = all_items(table.as_ref()).await;
    assert_eq!(items.len(), total);
    let written: BTreeSet<Key> = written.into_iter().map(key).collect();
    let two = test_value(&two);
    let one = Some(format!("{:?}", AttrValue::n(1i64)));
    for it in &items {
        let k = schema().key_of(it).unwrap();
        let value = test_value(it);
        if written.contains(&k) {
            assert_eq!(value, two, "the writer's value of {k} was overwritten");
        } else {
            assert_eq!(value, one, "{k}");
        }
    }

    // The proof, by the verifier: no item lacks `test`.
    let report = tidemark_json(
        url,
        &[
            "verify",
            "--source",
            store,
            "--predicate",
            "attribute_not_exists(#a)",
            "--name",
            "#a=test",
            "--expected",
            "0",
            "--timeout",
            "10m",
        ],
        0,
    )
    .await;
    assert_eq!(report["verdict"], "pass", "{report}");
    assert_eq!(report["checks"][0]["source_count"], 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_of_100k_sqlite_items_never_overwrites_a_writer_and_is_proven_complete() {
    const TOTAL: usize = 100_000;
    let plane = spawn_plane(PlaneOptions::default()).await;
    let name = unique_name("items").replace('-', "_");
    let store = EmbeddedStore::open(&plane.tables_dir().join("default.db")).expect("open db");
    let table: Arc<dyn SourceTable> = Arc::new(store.table(&name, schema()));
    for chunk in (0..TOTAL).collect::<Vec<_>>().chunks(2_000) {
        futures::future::try_join_all(chunk.iter().map(|i| {
            let table = Arc::clone(&table);
            async move { table.put(&item(*i), None).await }
        }))
        .await
        .expect("seed the table");
    }
    // Writers touch one item in 50, spread over the whole key range.
    let written: Vec<usize> = (0..TOTAL).step_by(50).collect();
    let spec = format!("sqlite:{name}?key=pk");
    backfill_against_writers(&plane.url(), &spec, table, TOTAL, written).await;

    // Another run finds nothing left to do.
    let again = tidemark(
        &plane.url(),
        &[
            "--output",
            "json",
            "backfill-attribute",
            "--table",
            &spec,
            "--attribute",
            "test",
            "--value",
            "n:1",
            "--actor",
            "e2e",
        ],
    )
    .await;
    assert!(again.status.success(), "{again:?}");
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        again["counters"]["updated"].as_i64().unwrap_or(0),
        0,
        "{again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_on_dynamodb_never_overwrites_a_writer_and_is_proven_complete() {
    const TOTAL: usize = 600;
    let (dynamo, _) = dynamodb_clients().await;
    let name = unique_name("items");
    let table: Arc<dyn SourceTable> = Arc::new(
        DynamoTable::create(dynamo, &name, &schema(), false)
            .await
            .expect("create the table"),
    );
    for chunk in (0..TOTAL).collect::<Vec<_>>().chunks(100) {
        futures::future::try_join_all(chunk.iter().map(|i| {
            let table = Arc::clone(&table);
            async move { table.put(&item(*i), None).await }
        }))
        .await
        .expect("seed the table");
    }
    let plane = spawn_plane(PlaneOptions::default()).await;
    let written: Vec<usize> = (0..TOTAL).step_by(7).collect();
    backfill_against_writers(
        &plane.url(),
        &format!("dynamodb:{name}"),
        table,
        TOTAL,
        written,
    )
    .await;
}
