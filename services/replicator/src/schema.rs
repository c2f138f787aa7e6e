//! How a target names a source's key: the key schema after a transform's
//! renames, shared by unit migration, incremental extract and pipelines.

use tidemark_connectors::transform::Transform;
use tidemark_connectors::{AttrValue, Key, KeySchema};

/// The key schema as the target names it (renamed key attributes).
pub fn target_schema(schema: &KeySchema, transform: &Transform) -> KeySchema {
    let renamed = transform.shape_key(&Key(schema
        .names()
        .map(|n| (n.to_owned(), AttrValue::Null(true)))
        .collect()));
    let rename = |name: &str| -> String {
        if renamed.get(name).is_some() {
            name.to_owned()
        } else {
            // The one attribute of the renamed key not among the originals.
            renamed
                .0
                .keys()
                .find(|k| !schema.names().any(|n| n == k.as_str()))
                .cloned()
                .unwrap_or_else(|| name.to_owned())
        }
    };
    KeySchema {
        partition: rename(&schema.partition),
        sort: schema.sort.as_deref().map(rename),
    }
}
