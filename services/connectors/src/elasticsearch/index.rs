//! Index management: the reserved fields' mapping, the composable index
//! template that carries it to every backing index, and the index-name
//! template that spreads documents over indexes. The alias layout itself
//! (a backing index behind each name) is in `alias`.

use serde_json::{Map, Value, json};

use super::client::status_error;
use super::{
    DELETED_AT_FIELD, DELETED_FIELD, ElasticsearchSink, ITEM_FIELD, KEY_FIELD, VERSION_FIELD,
};
use crate::error::ConnectorResult;
use crate::retry::retry;
use crate::transform::Template;
use crate::value::Key;

/// Priority of the sink's index templates, plus the literal characters of
/// their pattern: above Elasticsearch's built-in templates (100), and the
/// more specific of two overlapping patterns wins.
const TEMPLATE_PRIORITY: usize = 1000;

impl ElasticsearchSink {
    /// Whether the name exists, as an index, an alias or a data stream.
    pub(super) async fn index_exists(&self) -> ConnectorResult<bool> {
        self.name_exists(&self.index).await
    }

    pub(super) async fn name_exists(&self, name: &str) -> ConnectorResult<bool> {
        let url = self.url(&[name])?;
        retry(&self.retry, "head index", || async {
            let response = self.send(self.http.head(url.clone())).await?;
            match response.status() {
                s if s.is_success() => Ok(true),
                reqwest::StatusCode::NOT_FOUND => Ok(false),
                s => Err(status_error(s, "")),
            }
        })
        .await
    }

    /// Makes sure the sink's name is an alias over a backing index with the
    /// reserved fields' mapping plus the sink's `properties` (created when
    /// missing; an existing alias and its mapping are left alone).
    ///
    /// # Errors
    /// `Precondition` when the name is a plain index; Elasticsearch
    /// refusing the index or unreachable.
    #[tracing::instrument(skip_all, fields(index = %self.index))]
    pub async fn ensure_index(&self, properties: Map<String, Value>) -> ConnectorResult<()> {
        *self.properties.lock().expect("properties lock") = properties;
        self.ensure_alias(&self.index, &self.index).await
    }

    /// The mappings of a backing index: the sink's properties and the
    /// reserved fields.
    pub(super) fn mappings(&self) -> Value {
        let mut properties = self.properties.lock().expect("properties lock").clone();
        properties.insert(
            ITEM_FIELD.to_owned(),
            json!({"type": "keyword", "index": false, "doc_values": false}),
        );
        properties.insert(VERSION_FIELD.to_owned(), json!({"type": "long"}));
        properties.insert(DELETED_FIELD.to_owned(), json!({"type": "boolean"}));
        properties.insert(
            DELETED_AT_FIELD.to_owned(),
            json!({"type": "date", "format": "epoch_millis"}),
        );
        properties.insert(KEY_FIELD.to_owned(), json!({"type": "keyword"}));
        json!({"properties": properties})
    }

    /// Installs (or replaces) the composable index template giving every
    /// backing index of the names `pattern` matches (`<pattern>-tm-*`) the
    /// sink's mapping, so a backing index made by anyone else (a reindex
    /// into `-tm-2`) gets it too. The sink also sends the mapping when it
    /// creates a backing index itself, so a template refused for
    /// overlapping another at the same priority is only a warning.
    ///
    /// # Errors
    /// Elasticsearch unreachable, or refusing for another reason.
    pub(super) async fn install_template(&self, pattern: &str) -> ConnectorResult<()> {
        let backing = format!("{pattern}-tm-*");
        let name = format!("tidemark-{}", pattern.replace('*', "_"));
        let priority = TEMPLATE_PRIORITY + backing.chars().filter(|c| *c != '*').count();
        let body = json!({
            "index_patterns": [backing],
            "priority": priority,
            "template": {"mappings": self.mappings()},
        });
        let (status, text) = self
            .call(
                "put index template",
                reqwest::Method::PUT,
                self.url(&["_index_template", &name])?,
                Some(&body),
            )
            .await?;
        if status.is_success() {
            return Ok(());
        }
        if status == reqwest::StatusCode::BAD_REQUEST && text.contains("priority") {
            tracing::warn!(template = %name, error = %format!("{text:.300}"), "index template not installed; backing indexes this sink creates still get the mapping");
            return Ok(());
        }
        Err(status_error(status, &text))
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
    /// the templated ones (aliases, so tombstones are filtered out of
    /// searches; the sink's own queries filter them anyway).
    pub(super) fn search_target(&self) -> String {
        match &self.indexes {
            None => self.index.clone(),
            Some(t) => format!("{},{}", t.pattern(), self.index),
        }
    }

    /// Sets up a templated name (alias and backing index) the first time
    /// this sink writes to it.
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
        let pattern = self
            .indexes
            .as_ref()
            .map_or_else(|| name.to_owned(), Template::pattern);
        self.ensure_alias(name, &pattern).await?;
        self.ensured
            .lock()
            .expect("ensured indexes lock")
            .insert(name.to_owned());
        Ok(())
    }
}
