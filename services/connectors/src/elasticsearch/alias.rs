//! The alias layout: the name users query is an alias over one backing
//! index `<name>-tm-<n>`, the alias is the backing index's write index and
//! filters tombstones out, so `GET <name>/_search` and `_count` see live
//! documents only. Writes through the alias land in the backing index, where
//! the tombstones keep refusing older versions.

use serde_json::{Value, json};

use super::client::status_error;
use super::{BACKEND, ElasticsearchSink};
use crate::error::{ConnectorError, ConnectorResult};
use crate::value::KeySchema;

/// How long a reindex into the backing index may take.
const REINDEX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The backing index behind the user-facing `name`.
pub fn backing_index(name: &str, n: u32) -> String {
    format!("{name}-tm-{n}")
}

/// Whether `index` is a backing index of `alias` (`<alias>-tm-<digits>`).
pub(super) fn is_backing_of(index: &str, alias: &str) -> bool {
    index
        .strip_prefix(alias)
        .and_then(|rest| rest.strip_prefix("-tm-"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What a name is in the cluster.
#[derive(Debug, PartialEq, Eq)]
enum Layout {
    /// An alias: the sink's layout (or one the user set up the same way).
    Alias,
    /// A concrete index or data stream under the name itself.
    Plain,
    Missing,
}

/// The alias's own definition: the write index, tombstones filtered out.
fn alias_definition() -> Value {
    json!({"is_write_index": true, "filter": ElasticsearchSink::live_filter()})
}

fn plain_index(name: &str) -> ConnectorError {
    let backing = backing_index(name, 1);
    ConnectorError::Precondition(format!(
        "Elasticsearch index {name:?} exists as a plain index, and Tidemark writes to a backing index {backing:?} behind an alias {name:?} that hides its tombstones: use another index name, delete {name:?}, or, with its writers stopped, POST _reindex it into {backing:?} (dest.version_type external) and replace it by the alias in one POST _aliases (remove_index {name:?}; add alias {name:?} on {backing:?} with is_write_index true and the filter {})",
        ElasticsearchSink::live_filter()
    ))
}

impl ElasticsearchSink {
    async fn layout(&self, name: &str) -> ConnectorResult<Layout> {
        let (status, _) = self
            .call(
                "get alias",
                reqwest::Method::GET,
                self.url(&["_alias", name])?,
                None,
            )
            .await?;
        if status.is_success() {
            return Ok(Layout::Alias);
        }
        if status != reqwest::StatusCode::NOT_FOUND {
            return Err(status_error(status, "get alias"));
        }
        Ok(if self.name_exists(name).await? {
            Layout::Plain
        } else {
            Layout::Missing
        })
    }

    /// Whether the sink's name is an alias already (`false`: missing).
    ///
    /// # Errors
    /// `Precondition` when it is a plain index.
    pub(super) async fn probe_alias(&self) -> ConnectorResult<bool> {
        match self.layout(&self.index).await? {
            Layout::Alias => Ok(true),
            Layout::Missing => Ok(false),
            Layout::Plain => Err(plain_index(&self.index)),
        }
    }

    /// Makes `name` an alias over a new backing index unless it is one
    /// already; `pattern` names the index template covering it.
    ///
    /// # Errors
    /// `Precondition` when `name` is a plain index.
    pub(super) async fn ensure_alias(&self, name: &str, pattern: &str) -> ConnectorResult<()> {
        match self.layout(name).await? {
            Layout::Alias => Ok(()),
            Layout::Plain => Err(plain_index(name)),
            Layout::Missing => {
                self.install_template(pattern).await?;
                self.create_backing(name, true).await
            }
        }
    }

    /// Creates `<name>-tm-1` with the mapping (and the alias, unless the
    /// caller adds it later). A backing index left without its alias (an
    /// interrupted set-up) gets the alias added.
    async fn create_backing(&self, name: &str, with_alias: bool) -> ConnectorResult<()> {
        let backing = backing_index(name, 1);
        let mut body = json!({"mappings": self.mappings()});
        if with_alias {
            body["aliases"] = json!({ name: alias_definition() });
        }
        let (status, text) = self
            .call(
                "create index",
                reqwest::Method::PUT,
                self.url(&[&backing])?,
                Some(&body),
            )
            .await?;
        if status.is_success() {
            tracing::info!(alias = name, index = %backing, "created backing index");
            return Ok(());
        }
        if !text.contains("resource_already_exists_exception") {
            return Err(refused(status, &text, name));
        }
        if with_alias {
            self.swap_aliases(&[json!({"add": add_action(&backing, name)})], name)
                .await?;
        }
        Ok(())
    }

    async fn swap_aliases(&self, actions: &[Value], name: &str) -> ConnectorResult<()> {
        let (status, text) = self
            .call(
                "update aliases",
                reqwest::Method::POST,
                self.url(&["_aliases"])?,
                Some(&json!({"actions": actions})),
            )
            .await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(refused(status, &text, name))
        }
    }

    /// The backing indexes behind the names the sink covers (its own, and
    /// the templated ones that exist): where the tombstones are.
    ///
    /// # Errors
    /// Elasticsearch unreachable or answering something else.
    pub(super) async fn backing_indices(&self) -> ConnectorResult<Vec<String>> {
        let (status, text) = self
            .call(
                "get aliases",
                reqwest::Method::GET,
                self.url(&["_alias", &self.search_target()])?,
                None,
            )
            .await?;
        // A name without an alias is a 404 that still lists the others.
        if !status.is_success() && status != reqwest::StatusCode::NOT_FOUND {
            return Err(status_error(status, &text));
        }
        let parsed: Value = serde_json::from_str(&text).map_err(|e| {
            ConnectorError::terminal(BACKEND, format!("bad _alias response: {e}: {text:.200}"))
        })?;
        let mut out: Vec<String> = parsed
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(index, entry)| {
                entry
                    .get("aliases")
                    .and_then(Value::as_object)
                    .is_some_and(|a| a.keys().any(|alias| is_backing_of(index, alias)))
            })
            .map(|(index, _)| index.clone())
            .collect();
        out.sort();
        Ok(out)
    }

    /// A sink over `index` like [`Self::connect`] that, when `index` is a
    /// plain index (one a Tidemark release before the alias layout wrote),
    /// first moves it behind the alias: reindexed into `<index>-tm-1` with
    /// its versions (tombstones included), then replaced by the alias in
    /// one atomic alias update. Its writers must be stopped meanwhile: a
    /// write to the plain index during the reindex would be lost.
    ///
    /// # Errors
    /// The reindex failing for some documents (the plain index is then
    /// left in place), or what [`Self::connect`] fails with.
    pub async fn adopt(base_url: &str, index: &str, schema: KeySchema) -> ConnectorResult<Self> {
        let sink = Self::unopened(base_url, index, schema)?;
        if sink.layout(index).await? == Layout::Plain {
            sink.install_template(index).await?;
            sink.create_backing(index, false).await?;
            sink.reindex_into_backing(index).await?;
            let backing = backing_index(index, 1);
            sink.swap_aliases(
                &[
                    json!({"remove_index": {"index": index}}),
                    json!({"add": add_action(&backing, index)}),
                ],
                index,
            )
            .await?;
            tracing::info!(alias = index, index = %backing, "moved a plain index behind its alias");
        }
        sink.ensure_index(serde_json::Map::new()).await?;
        Ok(sink)
    }

    async fn reindex_into_backing(&self, name: &str) -> ConnectorResult<()> {
        let body = json!({
            "conflicts": "proceed",
            "source": {"index": name},
            "dest": {"index": backing_index(name, 1), "version_type": "external"},
        });
        let mut url = self.url(&["_reindex"])?;
        url.set_query(Some("refresh=true&wait_for_completion=true"));
        let response = self
            .send(self.http.post(url).timeout(REINDEX_TIMEOUT).json(&body))
            .await?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let answer: Value = serde_json::from_str(&text).unwrap_or_default();
        let failures = answer
            .get("failures")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if !status.is_success() || failures > 0 {
            return Err(ConnectorError::terminal(
                BACKEND,
                format!(
                    "reindexing {name:?} into its backing index failed ({status}, {failures} failures): {text:.500}"
                ),
            ));
        }
        Ok(())
    }
}

fn add_action(backing: &str, alias: &str) -> Value {
    let mut add = alias_definition();
    add["index"] = json!(backing);
    add["alias"] = json!(alias);
    add
}

/// Elasticsearch refusing to set up `name`: a name taken by an index that
/// appeared meanwhile is the plain-index precondition.
fn refused(status: reqwest::StatusCode, text: &str, name: &str) -> ConnectorError {
    if text.contains("invalid_alias_name_exception") {
        plain_index(name)
    } else {
        status_error(status, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_indexes_are_the_alias_with_a_numbered_suffix() {
        assert_eq!(backing_index("docs", 1), "docs-tm-1");
        assert!(is_backing_of("docs-tm-1", "docs"));
        assert!(is_backing_of("docs-tm-12", "docs"));
        assert!(!is_backing_of("docs-tm-", "docs"));
        assert!(!is_backing_of("docs-tm-x", "docs"));
        assert!(!is_backing_of("docs", "docs"));
        assert!(!is_backing_of("docs-b-tm-1", "docs"), "another alias's");
        assert!(!is_backing_of("docsb-tm-1", "docs"));
    }

    #[test]
    fn the_alias_is_the_write_index_and_hides_tombstones() {
        let add = add_action("docs-tm-1", "docs");
        assert_eq!(add["index"], "docs-tm-1");
        assert_eq!(add["alias"], "docs");
        assert_eq!(add["is_write_index"], true);
        assert_eq!(add["filter"], ElasticsearchSink::live_filter());
        let ConnectorError::Precondition(message) = plain_index("docs") else {
            panic!("a precondition");
        };
        assert!(
            message.contains("docs-tm-1") && message.contains("_aliases"),
            "{message}"
        );
    }
}
