//! Document ids: the key texts `#`-joined, or a template over exactly the
//! key attributes.

use std::borrow::Cow;

use super::ElasticsearchSink;
use crate::transform::Template;
use crate::value::{AttrValue, Key, KeySchema};

/// Elasticsearch's limit on `_id`.
const MAX_ID_BYTES: usize = 512;

impl ElasticsearchSink {
    /// The document id of `key`: key texts in schema order, `#`-joined.
    ///
    /// # Errors
    /// When the key does not match the schema.
    pub fn document_id(&self, key: &Key) -> Result<String, String> {
        match &self.ids {
            None => document_id_in(&self.schema, key),
            Some(template) => {
                let id = template.render(&key.0)?;
                if id.is_empty() || id.len() > MAX_ID_BYTES {
                    return Err(format!(
                        "document id {id:.64?} must be 1 to {MAX_ID_BYTES} bytes"
                    ));
                }
                Ok(id)
            }
        }
    }

    /// Names documents by `template` over the key attributes (each must be
    /// named, so two items never share a document) instead of the key texts.
    ///
    /// # Errors
    /// A template naming an attribute that is not part of the key, or
    /// leaving one out.
    pub fn with_document_id(mut self, template: Template) -> Result<Self, String> {
        check_key_template(&template, &self.schema)?;
        self.ids = Some(template);
        Ok(self)
    }
}

/// The document id of `key` under `schema`: key texts in schema order,
/// `#`-joined, `#` and `\` escaped by a backslash.
///
/// # Errors
/// When the key does not match the schema or the id is too long.
pub fn document_id_in(schema: &KeySchema, key: &Key) -> Result<String, String> {
    if key.0.len() != schema.names().count() {
        return Err(format!("key {key} does not match the key schema"));
    }
    let mut id = String::with_capacity(64);
    for (i, name) in schema.names().enumerate() {
        let value = key.get(name);
        let text = match value {
            Some(AttrValue::S(s)) => Cow::Borrowed(s.as_str()),
            Some(AttrValue::N(n)) => Cow::Borrowed(n.as_str()),
            _ => Cow::Owned(
                value
                    .and_then(AttrValue::key_text)
                    .ok_or_else(|| format!("key {key} lacks a scalar {name:?}"))?,
            ),
        };
        if i > 0 {
            id.push('#');
        }
        for part in text.split_inclusive(['#', '\\']) {
            match part.strip_suffix(['#', '\\']) {
                Some(head) => {
                    id.push_str(head);
                    id.push('\\');
                    id.push_str(&part[head.len()..]);
                }
                None => id.push_str(part),
            }
        }
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "document id of {} bytes exceeds Elasticsearch's {MAX_ID_BYTES}",
            id.len()
        ));
    }
    Ok(id)
}

/// Checks that a document-id template names every key attribute of
/// `schema` and nothing else.
///
/// # Errors
/// What is missing or extra.
pub fn check_key_template(template: &Template, schema: &KeySchema) -> Result<(), String> {
    let named: std::collections::BTreeSet<&str> = template.attributes().collect();
    let key: std::collections::BTreeSet<&str> = schema.names().collect();
    if named == key {
        Ok(())
    } else {
        Err(format!(
            "a document id template must name exactly the key attributes {key:?} (it names {named:?}): reads and deletes know only the key, and two items must never share a document"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> ElasticsearchSink {
        ElasticsearchSink::unopened("http://127.0.0.1:9", "i", KeySchema::new("pk", Some("sk")))
            .unwrap()
    }

    #[test]
    fn a_document_id_template_names_exactly_the_key() {
        let t = |text: &str| Template::parse(text).unwrap();
        let s = sink().with_document_id(t("{pk}/{sk}")).unwrap();
        let key = Key::new([
            ("pk".to_owned(), AttrValue::s("a#b")),
            ("sk".to_owned(), AttrValue::n(7i64)),
        ]);
        assert_eq!(s.document_id(&key).unwrap(), "a#b/7");
        assert!(
            sink().with_document_id(t("{pk}")).is_err(),
            "a key attribute left out"
        );
        assert!(
            sink().with_document_id(t("{pk}/{sk}/{title}")).is_err(),
            "an attribute outside the key"
        );
    }

    #[test]
    fn document_ids_escape_the_separator() {
        let key = |p: &str, s: &str| {
            Key::new([
                ("pk".to_owned(), AttrValue::s(p)),
                ("sk".to_owned(), AttrValue::s(s)),
            ])
        };
        let s = sink();
        assert_eq!(s.document_id(&key("doc", "1")).unwrap(), "doc#1");
        assert_eq!(s.document_id(&key("a#b", "c")).unwrap(), r"a\#b#c");
        assert_ne!(
            s.document_id(&key("a#b", "c")).unwrap(),
            s.document_id(&key("a", "b#c")).unwrap()
        );
        assert_eq!(s.document_id(&key(r"a\", "#")).unwrap(), r"a\\#\#");
        assert_eq!(s.document_id(&key(r"#\#", "x##")).unwrap(), r"\#\\\##x\#\#");
        assert!(
            s.document_id(&Key::single("pk", AttrValue::s("x")))
                .is_err()
        );
    }
}
