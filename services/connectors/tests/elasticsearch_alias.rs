//! The Elasticsearch sink's alias layout (issue #18) against the local
//! Elasticsearch: what a user's plain query of the index name sees, what
//! tombstones still refuse underneath, the purge of old tombstones, plain
//! indexes refused or adopted, and index-name templates.

use std::time::Duration;

use serde_json::{Value, json};
use tidemark_connectors::elasticsearch::{ElasticsearchSink, backing_index, bulk_lines};
use tidemark_connectors::testing::{local_env, unique_name};
use tidemark_connectors::transform::Template;
use tidemark_connectors::{
    AttrValue, ConnectorError, Item, Key, KeySchema, RecordOutcome, Sink as _, SinkOp, SinkRecord,
};

fn es() -> String {
    local_env("TIDEMARK_TEST_ELASTICSEARCH_URL")
}

fn schema() -> KeySchema {
    KeySchema::new("pk", Some("sk"))
}

fn key(pk: &str, sk: &str) -> Key {
    Key::new([
        ("pk".to_owned(), AttrValue::s(pk)),
        ("sk".to_owned(), AttrValue::s(sk)),
    ])
}

fn upsert(pk: &str, sk: &str, version: u64) -> SinkRecord {
    let mut item: Item = key(pk, sk).0;
    item.insert(
        "title".to_owned(),
        AttrValue::s(format!("{pk} {sk} v{version}")),
    );
    SinkRecord {
        key: key(pk, sk),
        version,
        op: SinkOp::Upsert(item),
    }
}

fn delete(pk: &str, sk: &str, version: u64) -> SinkRecord {
    SinkRecord {
        key: key(pk, sk),
        version,
        op: SinkOp::Delete,
    }
}

/// A user's request: plain REST, no filter in the query.
async fn rest(method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{}/{path}", es().trim_end_matches('/'));
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("elasticsearch answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn plain_count(target: &str) -> u64 {
    rest(reqwest::Method::POST, &format!("{target}/_refresh"), None).await;
    let (status, body) = rest(reqwest::Method::GET, &format!("{target}/_count"), None).await;
    assert_eq!(status, 200, "{body}");
    body["count"].as_u64().expect("a count")
}

async fn plain_search_ids(target: &str) -> Vec<String> {
    let (status, body) = rest(
        reqwest::Method::GET,
        &format!("{target}/_search?size=100"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<String> = body["hits"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

fn applied(outcomes: &[RecordOutcome]) -> bool {
    outcomes.iter().all(|o| *o == RecordOutcome::Applied)
}

#[tokio::test]
async fn a_plain_count_and_search_of_the_index_name_see_live_documents_only() {
    let index = unique_name("alias-live");
    let sink = ElasticsearchSink::connect(&es(), &index, schema())
        .await
        .unwrap();
    let mut batch: Vec<SinkRecord> = (0..10)
        .map(|i| upsert("doc", &format!("{i}"), 10))
        .collect();
    batch.extend((0..4).map(|i| delete("doc", &format!("{i}"), 20)));
    batch.push(delete("doc", "never-existed", 20));
    assert!(applied(&sink.apply(&batch).await.unwrap()));

    assert_eq!(plain_count(&index).await, 6, "tombstones are not counted");
    let want: Vec<String> = (4..10).map(|i| format!("doc#{i}")).collect();
    assert_eq!(plain_search_ids(&index).await, want);
    assert_eq!(sink.count().await.unwrap(), 6);
    // Underneath, the backing index holds the tombstones.
    assert_eq!(plain_count(&backing_index(&index, 1)).await, 11);
    let (_, aliases) = rest(reqwest::Method::GET, &format!("_alias/{index}"), None).await;
    let alias = &aliases[backing_index(&index, 1)]["aliases"][&index];
    assert_eq!(alias["is_write_index"], true, "{aliases}");
    assert_eq!(
        alias["filter"],
        ElasticsearchSink::live_filter(),
        "{aliases}"
    );

    // A second sink on the same name (another replica) uses the alias.
    let again = ElasticsearchSink::connect(&es(), &index, schema())
        .await
        .unwrap();
    assert!(applied(
        &again.apply(&[upsert("doc", "0", 30)]).await.unwrap()
    ));
    assert_eq!(
        plain_count(&index).await,
        7,
        "a delete undone by a newer upsert"
    );
    assert!(ElasticsearchSink::probe(&es(), &index).await.unwrap());
}

#[tokio::test]
async fn a_delete_replayed_older_than_its_tombstone_is_still_refused() {
    let index = unique_name("alias-replay");
    let sink = ElasticsearchSink::connect(&es(), &index, schema())
        .await
        .unwrap();
    sink.apply(&[upsert("doc", "a", 5)]).await.unwrap();
    sink.apply(&[delete("doc", "a", 7)]).await.unwrap();
    let replayed = sink
        .apply(&[
            upsert("doc", "a", 6),
            upsert("doc", "a", 5),
            delete("doc", "a", 7),
        ])
        .await
        .unwrap();
    assert_eq!(replayed, vec![RecordOutcome::Stale; 3]);
    assert!(sink.read(&key("doc", "a")).await.unwrap().is_none());
    assert_eq!(plain_count(&index).await, 0);
    assert!(applied(
        &sink.apply(&[upsert("doc", "a", 8)]).await.unwrap()
    ));
    assert_eq!(sink.read(&key("doc", "a")).await.unwrap().unwrap().0, 8);
    assert_eq!(plain_count(&index).await, 1);
}

#[tokio::test]
async fn the_purge_removes_only_tombstones_past_retention() {
    let index = unique_name("alias-purge");
    let sink = ElasticsearchSink::connect(&es(), &index, schema())
        .await
        .unwrap();
    let other = ElasticsearchSink::connect(&es(), &unique_name("alias-purge-other"), schema())
        .await
        .unwrap();
    let old = [upsert("doc", "live", 1), delete("doc", "old", 2)];
    sink.apply(&old).await.unwrap();
    other.apply(&[delete("doc", "old", 2)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sink.apply(&[delete("doc", "new", 2)]).await.unwrap();

    assert_eq!(
        sink.purge_tombstones(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        sink.purge_tombstones(Duration::from_secs(1)).await.unwrap(),
        1
    );
    // The live document and the young tombstone stay; another sink's
    // tombstones are not this sink's to purge.
    assert_eq!(plain_count(&backing_index(&index, 1)).await, 2);
    assert_eq!(plain_count(&index).await, 1);
    assert!(sink.read(&key("doc", "live")).await.unwrap().is_some());
    let young = sink.apply(&[upsert("doc", "new", 1)]).await.unwrap();
    assert_eq!(
        young,
        vec![RecordOutcome::Stale],
        "the young tombstone refuses"
    );
    let other_backing = backing_index(other.index(), 1);
    assert_eq!(plain_count(&other_backing).await, 1);
    assert_eq!(
        sink.purge_tombstones(Duration::from_secs(1)).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn a_plain_index_of_that_name_is_refused_with_the_fix_or_adopted() {
    let index = unique_name("alias-plain");
    // An index a release before the alias layout wrote: documents and a
    // tombstone, in the plain index itself.
    let mut body = Vec::new();
    for record in [
        upsert("doc", "a", 3),
        upsert("doc", "b", 3),
        delete("doc", "b", 4),
    ] {
        bulk_lines(&index, &schema(), &record, &mut body).unwrap();
    }
    let response = reqwest::Client::new()
        .post(format!("{}/_bulk?refresh=true", es().trim_end_matches('/')))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());

    for refused in [
        ElasticsearchSink::connect(&es(), &index, schema())
            .await
            .err(),
        ElasticsearchSink::probe(&es(), &index).await.err(),
    ] {
        match refused {
            Some(ConnectorError::Precondition(message)) => {
                assert!(message.contains("plain index"), "{message}");
                assert!(message.contains(&backing_index(&index, 1)), "{message}");
            }
            other => panic!("expected a precondition, got {other:?}"),
        }
    }
    // Refused, nothing was set up beside it.
    let (status, _) = rest(reqwest::Method::GET, &backing_index(&index, 1), None).await;
    assert_eq!(status, 404);

    let sink = ElasticsearchSink::adopt(&es(), &index, schema())
        .await
        .unwrap();
    assert_eq!(plain_count(&index).await, 1, "the tombstone is hidden");
    assert_eq!(sink.read(&key("doc", "a")).await.unwrap().unwrap().0, 3);
    let stale = sink.apply(&[upsert("doc", "b", 3)]).await.unwrap();
    assert_eq!(stale, vec![RecordOutcome::Stale], "versions moved with it");
    ElasticsearchSink::connect(&es(), &index, schema())
        .await
        .expect("an adopted name is an alias");
}

#[tokio::test]
async fn an_index_name_template_gets_an_alias_per_index_and_a_composable_template() {
    let prefix = unique_name("alias-tpl");
    let sink = ElasticsearchSink::connect(&es(), &prefix, schema())
        .await
        .unwrap()
        .with_index_name(Template::parse(&format!("{prefix}-{{pk}}")).unwrap())
        .unwrap();
    let batch = [
        upsert("post", "1", 1),
        upsert("post", "2", 1),
        delete("post", "2", 2),
        upsert("page", "1", 1),
    ];
    assert!(applied(&sink.apply(&batch).await.unwrap()));
    assert_eq!(plain_count(&format!("{prefix}-post")).await, 1);
    assert_eq!(plain_count(&format!("{prefix}-page")).await, 1);
    assert_eq!(sink.count().await.unwrap(), 2);
    let (_, aliases) = rest(reqwest::Method::GET, &format!("_alias/{prefix}-*"), None).await;
    for t in ["post", "page"] {
        let name = format!("{prefix}-{t}");
        assert_eq!(
            aliases[backing_index(&name, 1)]["aliases"][&name]["is_write_index"],
            true,
            "{aliases}"
        );
    }
    // The mapping is an index template: a backing index made by anyone
    // else (a reindex into -tm-2) gets it too.
    let (status, _) = rest(
        reqwest::Method::GET,
        &format!("_index_template/tidemark-{prefix}-_"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let later = backing_index(&format!("{prefix}-video"), 2);
    let (status, body) = rest(reqwest::Method::PUT, &later, Some(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let (_, mapping) = rest(reqwest::Method::GET, &format!("{later}/_mapping"), None).await;
    let item = &mapping[&later]["mappings"]["properties"]["_tidemark_item"];
    assert_eq!(item["index"], false, "{mapping}");

    // The purge covers every templated index.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        sink.purge_tombstones(Duration::from_secs(1)).await.unwrap(),
        1
    );
}

#[tokio::test]
async fn a_vanished_alias_fails_the_write_instead_of_becoming_a_plain_index() {
    let index = unique_name("alias-gone");
    let sink = ElasticsearchSink::connect(&es(), &index, schema())
        .await
        .unwrap();
    sink.apply(&[upsert("doc", "a", 1)]).await.unwrap();
    let (status, _) = rest(reqwest::Method::DELETE, &backing_index(&index, 1), None).await;
    assert_eq!(status, 200);
    let err = sink.apply(&[upsert("doc", "b", 1)]).await.unwrap_err();
    assert!(matches!(err, ConnectorError::NotFound { .. }), "{err:?}");
    let (status, _) = rest(reqwest::Method::GET, &index, None).await;
    assert_eq!(status, 404, "no plain index was created");
}
