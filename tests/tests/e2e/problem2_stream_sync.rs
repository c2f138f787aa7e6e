//! Problem 2: per-item change sync from DynamoDB Streams into
//! Elasticsearch on a composite-key table (`documentType`, `documentId`),
//! deletes included (a delete stands in for a TTL expiry), driven by
//! `tidemark replicate create|drain|lag|pause|resume|ls` and proven by
//! `tidemark verify`. A user's own `GET <index>/_count`, with no filter,
//! counts what the table holds: tombstones stay behind the index's alias
//! (#18).

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::testing::dynamodb_clients;
use tidemark_connectors::{AttrValue, Item, Key, KeySchema, Sink as _, SourceTable as _};
use tidemark_e2e::{PlaneOptions, local_env, spawn_plane, tidemark_json, unique_name};

fn schema() -> KeySchema {
    KeySchema::new("documentType", Some("documentId"))
}

fn key(t: &str, id: &str) -> Key {
    Key::new([
        ("documentType".to_owned(), AttrValue::s(t)),
        ("documentId".to_owned(), AttrValue::s(id)),
    ])
}

fn doc(t: &str, id: &str, n: i64) -> Item {
    let mut item = key(t, id).0;
    item.insert("n".to_owned(), AttrValue::n(n));
    item.insert("title".to_owned(), AttrValue::s(format!("{t} {id} v{n}")));
    item
}

/// One plain HTTP/1.1 request on a fresh connection; the response body.
async fn http(base_url: &str, method: &str, path: &str) -> String {
    let host = base_url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .expect("connect to elasticsearch");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    // Read the head, then exactly Content-Length bytes of body.
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        response.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&response).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())
                    .flatten()
            });
            if n == 0 || length.is_some_and(|len| body.len() >= len) {
                assert!(head.starts_with("HTTP/1.1 200"), "{method} {path}: {text}");
                return body.to_owned();
            }
        }
        assert!(n > 0, "{method} {path}: connection closed early");
    }
}

/// What a user's own `GET <index>/_count` says: no query, no filter (after
/// a refresh, which Elasticsearch would otherwise do within a second).
async fn plain_count(index: &str) -> u64 {
    let url = local_env("TIDEMARK_TEST_ELASTICSEARCH_URL");
    http(&url, "POST", &format!("/{index}/_refresh")).await;
    let body = http(&url, "GET", &format!("/{index}/_count")).await;
    let parsed: serde_json::Value = serde_json::from_str(&body).expect("a _count answer");
    parsed["count"].as_u64().expect("a count")
}

async fn table_count(table: &DynamoTable) -> u64 {
    let names = HashMap::from([("#t".to_owned(), "documentType".to_owned())]);
    table
        .count_where("attribute_exists(#t)", &names, &HashMap::new(), 0, 1)
        .await
        .expect("count the source table")
}

fn kind(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "post" } else { "page" }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_upserts_and_deletes_of_a_composite_key_table_into_elasticsearch() {
    let (dynamo, _) = dynamodb_clients().await;
    let table_name = unique_name("documents");
    let table = DynamoTable::create(dynamo, &table_name, &schema(), true)
        .await
        .expect("create the source table with its stream");
    // Existing items: the pipeline's backfill copies these.
    futures::future::try_join_all((0..40).map(|i| {
        let table = &table;
        async move {
            table
                .put(
                    &doc(kind(i), &format!("d{i:03}"), i64::try_from(i).unwrap()),
                    None,
                )
                .await
        }
    }))
    .await
    .expect("seed the table");
    let index = unique_name("documents");
    let reader = ElasticsearchSink::connect(
        &local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"),
        &index,
        schema(),
    )
    .await
    .expect("connect to the index");

    let plane = spawn_plane(PlaneOptions::default()).await;
    let url = plane.url();
    let name = unique_name("docs-sync");
    let source = format!("dynamodb:{table_name}");
    let sink = format!("search=es:{index}");
    let created = tidemark_json(
        &url,
        &[
            "replicate",
            "create",
            &name,
            "--source",
            &source,
            "--sink",
            &sink,
            "--document-id",
            "{documentType}#{documentId}",
            "--backfill",
            "tombstones",
            "--segments",
            "2",
            "--wait",
            "--timeout",
            "3m",
            "--actor",
            "e2e",
        ],
        0,
    )
    .await;
    assert_eq!(created["state"], "streaming", "{created}");
    assert_eq!(created["job"], format!("pipeline/{name}"));

    // Live changes: updates, deletes (TTL expiries stand in), inserts.
    for i in 0..10 {
        table
            .put(
                &doc(
                    kind(i),
                    &format!("d{i:03}"),
                    1000 + i64::try_from(i).unwrap(),
                ),
                None,
            )
            .await
            .unwrap();
        table
            .delete(&key(kind(i + 20), &format!("d{:03}", i + 20)), None)
            .await
            .unwrap();
        table
            .put(
                &doc("post", &format!("n{i:03}"), i64::try_from(i).unwrap()),
                None,
            )
            .await
            .unwrap();
    }
    let drained = tidemark_json(&url, &["replicate", "drain", &name, "--timeout", "90s"], 0).await;
    assert_eq!(drained["caught_up"], true, "{drained}");

    let expect_index_equals_table = || async {
        for i in 0..40 {
            let k = key(kind(i), &format!("d{i:03}"));
            let got = reader.read(&k).await.expect("read the index");
            if (20..30).contains(&i) {
                assert!(
                    got.is_none(),
                    "deleted {k} is still (or again) in the index"
                );
            } else {
                let want = table.get(&k).await.unwrap().expect("source item");
                assert_eq!(got.map(|(_, item)| item), Some(want), "{k}");
            }
        }
        for i in 0..10 {
            let k = key("post", &format!("n{i:03}"));
            assert!(
                reader.read(&k).await.unwrap().is_some(),
                "inserted {k} missing"
            );
        }
    };
    expect_index_equals_table().await;
    // Live, with ten deletes behind it: the user's plain count is the
    // table's, not the table's plus the tombstones.
    assert_eq!(plain_count(&index).await, table_count(&table).await);
    assert_eq!(plain_count(&index).await, 40);

    let lag = tidemark_json(&url, &["replicate", "lag", &name], 0).await;
    assert_eq!(lag["caught_up"], true, "{lag}");
    let listed = tidemark_json(&url, &["replicate", "ls"], 0).await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == name.as_str() && p["state"] == "streaming"),
        "{listed}"
    );

    // The verifier agrees: same count, same content, by digests.
    let target = format!("es:{index}");
    let report = tidemark_json(
        &url,
        &[
            "verify",
            "--source",
            &source,
            "--target",
            &target,
            "--count",
            "--digest",
            "--pipeline",
            &name,
            "--timeout",
            "3m",
        ],
        0,
    )
    .await;
    assert_eq!(report["verdict"], "pass", "{report}");

    // Paused, the pipeline writes nothing; resumed, it catches up.
    let paused = tidemark_json(&url, &["replicate", "pause", &name, "--actor", "e2e"], 0).await;
    assert_eq!(paused["state"], "paused", "{paused}");
    let late = key("page", "late");
    table.put(&doc("page", "late", 7), None).await.unwrap();
    table.delete(&key(kind(0), "d000"), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        reader.read(&late).await.unwrap().is_none(),
        "a paused pipeline wrote"
    );
    let resumed = tidemark_json(&url, &["replicate", "resume", &name, "--actor", "e2e"], 0).await;
    assert_ne!(resumed["state"], "paused", "{resumed}");
    for _ in 0..600 {
        let p = tidemark_json(&url, &["replicate", "ls"], 0).await;
        if p.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == name.as_str() && p["state"] == "streaming")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tidemark_json(&url, &["replicate", "drain", &name, "--timeout", "90s"], 0).await;
    assert!(
        reader.read(&late).await.unwrap().is_some(),
        "resumed, it caught up"
    );
    assert!(
        reader.read(&key(kind(0), "d000")).await.unwrap().is_none(),
        "the delete made while paused reached the index"
    );
    // Done (#18): the user's own GET <index>/_count, no filter in it,
    // equals the source table's item count.
    assert_eq!(plain_count(&index).await, table_count(&table).await);
}

/// Seed 000's cold-store feed: DynamoDB Streams into a compacted Kafka
/// topic (JSON, keyed by item key, version in a header), proven by the
/// verifier reading the topic as its consumers do (latest record per key);
/// a record in the topic that the source does not hold fails the proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_feed_a_compacted_kafka_topic_that_the_verifier_proves() {
    use tidemark_connectors::kafka::{KafkaFormat, KafkaSink};
    use tidemark_connectors::{SinkOp, SinkRecord};
    let (dynamo, _) = dynamodb_clients().await;
    let table_name = unique_name("cold");
    let table = DynamoTable::create(dynamo, &table_name, &schema(), true)
        .await
        .expect("create the source table with its stream");
    for i in 0..30 {
        table
            .put(&doc(kind(i), &format!("d{i:03}"), 1), None)
            .await
            .unwrap();
    }
    let brokers = local_env("TIDEMARK_TEST_KAFKA_BROKERS");
    let topic = unique_name("cold");
    tidemark_connectors::testing::create_topic(&brokers, &topic, 3, true).await;

    let plane = spawn_plane(PlaneOptions::default()).await;
    let url = plane.url();
    let name = unique_name("cold-sync");
    let source = format!("dynamodb:{table_name}");
    let created = tidemark_json(
        &url,
        &[
            "replicate",
            "create",
            &name,
            "--source",
            &source,
            "--sink",
            &format!("cold=kafka:{topic}"),
            "--wait",
            "--timeout",
            "3m",
        ],
        0,
    )
    .await;
    assert_eq!(created["state"], "streaming", "{created}");
    for i in 0..10 {
        table
            .put(&doc(kind(i), &format!("d{i:03}"), 2), None)
            .await
            .unwrap();
        table
            .delete(&key(kind(i + 10), &format!("d{:03}", i + 10)), None)
            .await
            .unwrap();
    }
    let drained = tidemark_json(&url, &["replicate", "drain", &name, "--timeout", "90s"], 0).await;
    assert_eq!(drained["caught_up"], true, "{drained}");

    let target = format!("kafka:{topic}");
    let verify = |url: String, source: String, target: String, code: i32| async move {
        tidemark_json(
            &url,
            &[
                "verify",
                "--source",
                &source,
                "--target",
                &target,
                "--count",
                "--digest",
                "--timeout",
                "3m",
            ],
            code,
        )
        .await
    };
    let report = verify(url.clone(), source.clone(), target.clone(), 0).await;
    assert_eq!(report["verdict"], "pass", "{report}");
    let compared = report["items_compared"].as_u64().unwrap_or_default();
    assert!(compared >= 20, "{report}");

    // A record the source never held, newer than anything the pipeline
    // sent: consumers would take it, and so does the verifier.
    let rogue = KafkaSink::connect(&brokers, &topic, schema(), KafkaFormat::Json).unwrap();
    let k = key(kind(0), "d000");
    rogue
        .apply(&[SinkRecord {
            key: k.clone(),
            version: u64::MAX / 2,
            op: SinkOp::Upsert(doc(kind(0), "d000", -1)),
        }])
        .await
        .unwrap();
    let report = verify(url, source, target, 6).await;
    assert_eq!(report["verdict"], "fail", "{report}");
}
