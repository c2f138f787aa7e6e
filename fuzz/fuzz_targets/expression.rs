//! Condition and filter expressions (the verifier's predicate checks, scan
//! filters): any expression parses or is refused, never panics; what parses
//! renders to a DynamoDB expression that parses back to a predicate that
//! evaluates the same on every item tried.
//!
//! Input: the expression on the first line, then placeholders, one a line:
//! `#name=attribute` or `:value=S:text`, `:value=N:1.5`, `:value=B:bytes`,
//! `:value=BOOL:true`.
#![no_main]

use std::collections::{BTreeSet, HashMap};

use libfuzzer_sys::fuzz_target;
use tidemark_connectors::predicate::{ExprNames, ExprValues, parse_expression};
use tidemark_connectors::{AttrValue, Item, Number, Predicate};

fn value(text: &str) -> Option<AttrValue> {
    let (kind, rest) = text.split_once(':')?;
    Some(match kind {
        "S" => AttrValue::S(rest.to_owned()),
        "N" => AttrValue::N(Number::parse(rest).ok()?),
        "B" => AttrValue::B(rest.as_bytes().to_vec()),
        "BOOL" => AttrValue::Bool(rest == "true"),
        _ => return None,
    })
}

fn attributes(p: &Predicate, out: &mut BTreeSet<String>) {
    match p {
        Predicate::ItemExists | Predicate::ItemNotExists => {}
        Predicate::AttributeExists(a) | Predicate::AttributeNotExists(a) => {
            out.insert(a.clone());
        }
        Predicate::Equals(a, _)
        | Predicate::LessThan(a, _)
        | Predicate::GreaterOrEqual(a, _)
        | Predicate::BeginsWith(a, _)
        | Predicate::Contains(a, _) => {
            out.insert(a.clone());
        }
        Predicate::And(ps) | Predicate::Or(ps) => ps.iter().for_each(|p| attributes(p, out)),
        Predicate::Not(p) => attributes(p, out),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let expression = lines.next().unwrap_or_default();
    let mut names = HashMap::new();
    let mut values = HashMap::new();
    for line in lines {
        let Some((placeholder, rest)) = line.split_once('=') else {
            continue;
        };
        if placeholder.starts_with('#') {
            names.insert(placeholder.to_owned(), rest.to_owned());
        } else if placeholder.starts_with(':')
            && let Some(v) = value(rest)
        {
            values.insert(placeholder.to_owned(), v);
        }
    }
    let Ok(predicate) = parse_expression(expression, &names, &values) else {
        return;
    };
    let (mut rendered_names, mut rendered_values) = (ExprNames::default(), ExprValues::default());
    let rendered = predicate.render("pk", &mut rendered_names, &mut rendered_values);

    // The items tried: none, an empty one, and one per value with every
    // attribute the predicate names set to it.
    let mut named = BTreeSet::new();
    attributes(&predicate, &mut named);
    let mut items: Vec<Option<Item>> = vec![None, Some(Item::new())];
    for v in values.values() {
        items.push(Some(named.iter().map(|a| (a.clone(), v.clone())).collect()));
    }
    let verdicts: Vec<bool> = items
        .iter()
        .map(|i| predicate.matches(i.as_ref()))
        .collect();

    // Rendering nests deeper (a NOT gains parentheses) and grows the text,
    // so the limits may refuse it; what parses back must agree.
    if let Ok(back) = parse_expression(&rendered, &rendered_names.0, &rendered_values.0) {
        for (item, verdict) in items.iter().zip(&verdicts) {
            assert_eq!(
                back.matches(item.as_ref()),
                *verdict,
                "{expression:?} rendered as {rendered:?} disagrees on {item:?}"
            );
        }
    }
});
