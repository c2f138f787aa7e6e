//! Index management: creating an index with the reserved fields' mapping,
//! and the index-name template that spreads documents over indexes.

use serde_json::{Map, Value, json};

use super::client::{request_error, status_error};
use super::{DELETED_FIELD, ElasticsearchSink, ITEM_FIELD, KEY_FIELD, VERSION_FIELD};
use crate::error::ConnectorResult;
use crate::retry::retry;
use crate::transform::Template;
use crate::value::Key;

impl ElasticsearchSink {
    pub(super) async fn index_exists(&self) -> ConnectorResult<bool> {
        let url = self.url(&[&self.index]);
        retry(&self.retry, "head index", || async {
            let response = self
                .http
                .head(url.clone())
                .send()
                .await
                .map_err(|e| request_error(&e))?;
            match response.status() {
                s if s.is_success() => Ok(true),
                reqwest::StatusCode::NOT_FOUND => Ok(false),
                s => Err(status_error(s, "")),
            }
        })
        .await
    }

    /// Creates the index with the reserved fields' mapping plus
    /// `properties`, unless it exists already (its mapping is left alone).
    ///
    /// # Errors
    /// When Elasticsearch refuses the index or cannot be reached.
    #[tracing::instrument(skip_all, fields(index = %self.index))]
    pub async fn ensure_index(&self, properties: Map<String, Value>) -> ConnectorResult<()> {
        self.create_index(&self.index, properties).await
    }

    async fn create_index(
        &self,
        name: &str,
        mut properties: Map<String, Value>,
    ) -> ConnectorResult<()> {
        properties.insert(
            ITEM_FIELD.to_owned(),
            json!({"type": "keyword", "index": false, "doc_values": false}),
        );
        properties.insert(VERSION_FIELD.to_owned(), json!({"type": "long"}));
        properties.insert(DELETED_FIELD.to_owned(), json!({"type": "boolean"}));
        properties.insert(KEY_FIELD.to_owned(), json!({"type": "keyword"}));
        let body = json!({"mappings": {"properties": properties}});
        let url = self.url(&[name]);
        retry(&self.retry, "create index", || async {
            let response = self
                .http
                .put(url.clone())
                .json(&body)
                .send()
                .await
                .map_err(|e| request_error(&e))?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let text = response.text().await.unwrap_or_default();
            if text.contains("resource_already_exists_exception") {
                return Ok(());
            }
            Err(status_error(status, &text))
        })
        .await
    }

    /// Puts each document in the index `template` names from its key
    /// attributes (only those: a delete or read knows only the key). The
    /// sink's own index stays the fallback and is searched with the rest.
    ///
    /// # Errors
    /// A template naming an attribute that is not part of the key.
    pub fn with_index_name(mut self, template: Template) -> Result<Self, String> {
        let key: std::collections::BTreeSet<&str> = self.schema.names().collect();
        if let Some(a) = template.attributes().find(|a| !key.contains(a)) {
            return Err(format!(
                "an index name template may name only key attributes {key:?}, not {a:?}: a delete knows only the key"
            ));
        }
        self.indexes = Some(template);
        Ok(self)
    }

    /// The index of the document with this key.
    ///
    /// # Errors
    /// A rendered name Elasticsearch would refuse.
    pub fn index_of(&self, key: &Key) -> Result<std::borrow::Cow<'_, str>, String> {
        let Some(t) = &self.indexes else {
            return Ok(std::borrow::Cow::Borrowed(&self.index));
        };
        let name = t.render(&key.0)?;
        let bad = name.is_empty()
            || name.len() > 255
            || name.starts_with(['-', '_', '+', '.'])
            || name.chars().any(|c| {
                c.is_uppercase()
                    || matches!(
                        c,
                        '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
                    )
            });
        if bad {
            return Err(format!(
                "index name {name:?} is not valid in Elasticsearch (lowercase, no spaces or \\/*?\"<>|,#:)"
            ));
        }
        Ok(std::borrow::Cow::Owned(name))
    }

    /// What searches of the whole sink name: its index, and the pattern of
    /// the templated ones.
    pub(super) fn search_target(&self) -> String {
        match &self.indexes {
            None => self.index.clone(),
            Some(t) => format!("{},{}", t.pattern(), self.index),
        }
    }

    /// Creates a templated index the first time this sink writes to it.
    pub(super) async fn ensure_named(&self, name: &str) -> ConnectorResult<()> {
        if name == self.index
            || self
                .ensured
                .lock()
                .expect("ensured indexes lock")
                .contains(name)
        {
            return Ok(());
        }
        self.create_index(name, Map::new()).await?;
        self.ensured
            .lock()
            .expect("ensured indexes lock")
            .insert(name.to_owned());
        Ok(())
    }
}
