//! `{attribute}` templates: a sink's document id and Elasticsearch index
//! name (`document_id_template`, `index_name_template`). Any text parses or
//! is refused, never panics; what parses renders against any item holding
//! its attributes, its index pattern is its rendering with `*` for every
//! value, and its escaped rendering parses back to a literal of itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_connectors::transform::Template;
use tidemark_connectors::{AttrValue, Item, Number};

fn escape(text: &str) -> String {
    text.replace('{', "{{").replace('}', "}}")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(template) = Template::parse(text) else {
        return;
    };
    let named: Vec<String> = template.attributes().map(str::to_owned).collect();
    assert!(named.iter().all(|a| !a.is_empty()), "no empty placeholder");

    let with = |v: &AttrValue| -> Item { named.iter().map(|a| (a.clone(), v.clone())).collect() };
    let star = template
        .render(&with(&AttrValue::s("*")))
        .expect("renders with every attribute a string");
    assert_eq!(
        star,
        template.pattern(),
        "the pattern matches every rendering"
    );
    template
        .render(&with(&AttrValue::N(
            Number::parse("-1.5").expect("a number"),
        )))
        .expect("renders with every attribute a number");
    if !named.is_empty() {
        assert!(
            template.render(&Item::new()).is_err(),
            "a missing attribute is refused"
        );
        assert!(
            template.render(&with(&AttrValue::Bool(true))).is_err(),
            "a boolean attribute is refused"
        );
    }

    // Rendered text with braces in the values, escaped, is a literal.
    let rendered = template
        .render(&with(&AttrValue::s("{x}")))
        .expect("renders with braces in a value");
    let literal = Template::parse(&escape(&rendered)).expect("an escaped rendering parses");
    assert_eq!(literal.attributes().count(), 0);
    assert_eq!(
        literal.render(&Item::new()).as_deref(),
        Ok(rendered.as_str())
    );
});
