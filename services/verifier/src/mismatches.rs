//! Where a finished verification's mismatches are kept for StreamMismatches:
//! one item per mismatch in a table keyed by (`run`, `seq`), a DynamoDB table
//! shared by the replicas (`mismatch_table`) or, on the embedded default, a
//! table of the verifier's data directory. The run's result in the
//! job-tracker keeps only the report and its samples: a unit's result is one
//! item there, capped well under DynamoDB's 400 KB, while a check may keep up
//! to `max_mismatches_kept` mismatches.

use std::sync::Arc;

use prost::Message as _;
use tidemark_connectors::{
    AttrValue, ConnectorResult, Item, Key, Predicate, ScanRequest, SourceTable,
};
use tidemark_proto::verifier::v1::Mismatch;

/// Mismatches read per page.
pub const PAGE: usize = 1000;

#[derive(Clone)]
pub struct MismatchStore {
    table: Arc<dyn SourceTable>,
}

fn key(run: &str, seq: usize) -> Key {
    Key::new([
        ("run".to_owned(), AttrValue::s(run)),
        // Zero-padded: the table's sort order is the report's order.
        ("seq".to_owned(), AttrValue::s(format!("{seq:010}"))),
    ])
}

impl MismatchStore {
    pub fn new(table: Arc<dyn SourceTable>) -> Self {
        Self { table }
    }

    /// Keeps `all` as the run's mismatches, in order, replacing what an
    /// earlier attempt at the run's unit may have left.
    pub async fn replace(&self, run: &str, all: &[Mismatch]) -> ConnectorResult<()> {
        self.clear(run).await?;
        for (seq, m) in all.iter().enumerate() {
            let item: Item = [
                ("run".to_owned(), AttrValue::s(run)),
                ("seq".to_owned(), AttrValue::s(format!("{seq:010}"))),
                ("check".to_owned(), AttrValue::s(&m.check_name)),
                ("m".to_owned(), AttrValue::B(m.encode_to_vec())),
            ]
            .into_iter()
            .collect();
            self.table.put(&item, None).await?;
        }
        Ok(())
    }

    async fn clear(&self, run: &str) -> ConnectorResult<()> {
        loop {
            let (page, _) = self.page(run, None, PAGE).await?;
            if page.is_empty() {
                return Ok(());
            }
            for (seq, _) in page {
                self.table.delete(&key(run, seq), None).await?;
            }
        }
    }

    /// Up to `limit` mismatches of `run` after position `after`, in order,
    /// with their positions; and whether more may follow.
    pub async fn page(
        &self,
        run: &str,
        after: Option<usize>,
        limit: usize,
    ) -> ConnectorResult<(Vec<(usize, Mismatch)>, bool)> {
        let mut out = Vec::new();
        let mut start_after = after.map(|seq| key(run, seq));
        loop {
            let page = self
                .table
                .scan(&ScanRequest {
                    start_after,
                    filter: Some(Predicate::Equals("run".to_owned(), AttrValue::s(run))),
                    consistent: true,
                    limit: u32::try_from(limit.clamp(1, PAGE)).unwrap_or(1000),
                    ..ScanRequest::segment(0, 1)
                })
                .await?;
            let mut items = page.items.into_iter();
            for item in items.by_ref() {
                let seq = item
                    .get("seq")
                    .and_then(AttrValue::as_s)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default();
                let m = match item.get("m") {
                    Some(AttrValue::B(bytes)) => Mismatch::decode(bytes.as_slice()).ok(),
                    _ => None,
                };
                if let Some(m) = m {
                    out.push((seq, m));
                }
                if out.len() == limit {
                    break;
                }
            }
            let more = items.next().is_some() || page.last_key.is_some();
            if out.len() == limit {
                return Ok((out, more));
            }
            match page.last_key {
                Some(k) => start_after = Some(k),
                None => return Ok((out, false)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tidemark_connectors::KeySchema;
    use tidemark_connectors::dynamodb::DynamoTable;
    use tidemark_connectors::sqlite::EmbeddedStore;
    use tidemark_connectors::testing::{dynamodb_clients, unique_name};

    use super::*;

    fn mismatch(i: usize) -> Mismatch {
        Mismatch {
            check_name: format!("c{}", i % 2),
            source_version: i as u64,
            ..Mismatch::default()
        }
    }

    async fn kept_in_order_and_replaced(store: MismatchStore) {
        let all: Vec<Mismatch> = (0..2300).map(mismatch).collect();
        store.replace("r1", &all).await.unwrap();
        store.replace("r2", &all[..3]).await.unwrap();
        let mut read = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = store.page("r1", after, PAGE).await.unwrap();
            assert!(page.len() <= PAGE);
            after = page.last().map(|(s, _)| *s);
            read.extend(page.into_iter().map(|(_, m)| m));
            if !more {
                break;
            }
        }
        assert_eq!(read, all);
        // A later attempt with fewer mismatches leaves none of the earlier.
        store.replace("r1", &all[..5]).await.unwrap();
        let (page, _) = store.page("r1", None, PAGE).await.unwrap();
        assert_eq!(page.len(), 5);
        assert_eq!(store.page("r2", None, PAGE).await.unwrap().0.len(), 3);
    }

    #[tokio::test]
    async fn embedded_mismatches_are_kept_in_order_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let db = EmbeddedStore::open(&dir.path().join("m.db")).unwrap();
        let table = db.table("mismatches", KeySchema::new("run", Some("seq")));
        kept_in_order_and_replaced(MismatchStore::new(Arc::new(table))).await;
    }

    #[tokio::test]
    async fn dynamodb_mismatches_are_kept_in_order_and_replaced() {
        let (client, _) = dynamodb_clients().await;
        let name = unique_name("mismatches");
        let table = DynamoTable::create(client, &name, &KeySchema::new("run", Some("seq")), false)
            .await
            .unwrap();
        kept_in_order_and_replaced(MismatchStore::new(Arc::new(table))).await;
    }
}
