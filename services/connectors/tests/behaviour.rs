//! The behaviour suites run against every implementation: the embedded
//! SQLite store and the real DynamoDB (+ Streams) endpoint of deploy/local.

use tidemark_connectors::dynamodb::{DynamoSink, DynamoTable};
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::streams::{DynamoStreamSource, ShardedFeed, StartPosition};
use tidemark_connectors::suite::{self, PK, SK};
use tidemark_connectors::testing::{dynamodb_clients, unique_name};
use tidemark_connectors::{ChangeFeed, KeySchema};

fn schema() -> KeySchema {
    KeySchema::new(PK, Some(SK))
}

#[tokio::test]
async fn embedded_source_table() {
    let store = EmbeddedStore::in_memory().unwrap();
    suite::source_table(&store.table("t", schema())).await;
}

#[tokio::test]
async fn embedded_sink() {
    let store = EmbeddedStore::in_memory().unwrap();
    suite::sink(&store.sink("a"), &store.sink("b")).await;
}

#[tokio::test]
async fn embedded_change_feed() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("feed.db")).unwrap();
    let table = store.table("t", schema());
    suite::change_feed(&table, |checkpoint| {
        Box::new(store.feed("t", &checkpoint)) as Box<dyn ChangeFeed>
    })
    .await;
}

#[tokio::test]
async fn dynamodb_source_table() {
    let (client, _) = dynamodb_clients().await;
    let table = DynamoTable::create(client, &unique_name("suite-source"), &schema(), false)
        .await
        .unwrap();
    suite::source_table(&table).await;
}

#[tokio::test]
async fn dynamodb_sink() {
    let (client, _) = dynamodb_clients().await;
    let a = DynamoTable::create(
        client.clone(),
        &unique_name("suite-sink-a"),
        &schema(),
        false,
    )
    .await
    .unwrap();
    let b = DynamoTable::create(client, &unique_name("suite-sink-b"), &schema(), false)
        .await
        .unwrap();
    suite::sink(&DynamoSink::new(a), &DynamoSink::new(b)).await;
}

#[tokio::test]
async fn dynamodb_streams_change_feed() {
    let (client, streams) = dynamodb_clients().await;
    let name = unique_name("suite-feed");
    let table = DynamoTable::create(client.clone(), &name, &schema(), true)
        .await
        .unwrap();
    let source = DynamoStreamSource::for_table(&client, streams, &name)
        .await
        .unwrap();
    suite::change_feed(&table, |checkpoint| {
        Box::new(ShardedFeed::new(
            source.clone(),
            StartPosition::TrimHorizon,
            &checkpoint,
        )) as Box<dyn ChangeFeed>
    })
    .await;
}

#[tokio::test]
async fn dynamodb_errors_are_classified() {
    let (client, _) = dynamodb_clients().await;
    let err = DynamoTable::open(client, &unique_name("no-such-table"))
        .await
        .err()
        .expect("missing table");
    assert!(
        matches!(err, tidemark_connectors::ConnectorError::NotFound { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn embedded_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("buffer.db")).unwrap();
    suite::buffer(&store.buffer("stats")).await;
}
