//! One small predicate language for scan filters and write conditions,
//! rendered to DynamoDB expressions and evaluated in process for the
//! embedded store, so both behave the same.

use std::collections::HashMap;

use crate::value::{AttrValue, Item};

#[derive(Clone, Debug, PartialEq)]
pub enum Predicate {
    /// The item exists (a write condition) — always true for scanned items.
    ItemExists,
    /// The item does not exist.
    ItemNotExists,
    AttributeExists(String),
    AttributeNotExists(String),
    Equals(String, AttrValue),
    /// The attribute is a number (or string) below the value.
    LessThan(String, AttrValue),
    GreaterOrEqual(String, AttrValue),
    And(Vec<Predicate>),
    Or(Vec<Predicate>),
    Not(Box<Predicate>),
}

impl Predicate {
    /// The condition of a versioned write: the target has no item yet, or an
    /// older version of it.
    pub fn version_below(attribute: &str, version: u64) -> Self {
        Self::Or(vec![
            Self::AttributeNotExists(attribute.to_owned()),
            Self::LessThan(attribute.to_owned(), AttrValue::n(version)),
        ])
    }

    /// Evaluates against `item` (`None`: the item does not exist).
    pub fn matches(&self, item: Option<&Item>) -> bool {
        match self {
            Self::ItemExists => item.is_some(),
            Self::ItemNotExists => item.is_none(),
            Self::AttributeExists(a) => item.is_some_and(|i| i.contains_key(a)),
            Self::AttributeNotExists(a) => !item.is_some_and(|i| i.contains_key(a)),
            Self::Equals(a, v) => item.and_then(|i| i.get(a)) == Some(v),
            Self::LessThan(a, v) => item
                .and_then(|i| i.get(a))
                .is_some_and(|x| compare(x, v) == Some(std::cmp::Ordering::Less)),
            Self::GreaterOrEqual(a, v) => item.and_then(|i| i.get(a)).is_some_and(|x| {
                matches!(
                    compare(x, v),
                    Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
                )
            }),
            Self::And(ps) => ps.iter().all(|p| p.matches(item)),
            Self::Or(ps) => ps.iter().any(|p| p.matches(item)),
            Self::Not(p) => !p.matches(item),
        }
    }

    /// Renders as a DynamoDB condition/filter expression. `pk` names the
    /// partition key, which `ItemExists`/`ItemNotExists` test.
    pub fn render(&self, pk: &str, names: &mut ExprNames, values: &mut ExprValues) -> String {
        match self {
            Self::ItemExists => format!("attribute_exists({})", names.name(pk)),
            Self::ItemNotExists => format!("attribute_not_exists({})", names.name(pk)),
            Self::AttributeExists(a) => format!("attribute_exists({})", names.name(a)),
            Self::AttributeNotExists(a) => format!("attribute_not_exists({})", names.name(a)),
            Self::Equals(a, v) => format!("{} = {}", names.name(a), values.value(v)),
            Self::LessThan(a, v) => format!("{} < {}", names.name(a), values.value(v)),
            Self::GreaterOrEqual(a, v) => format!("{} >= {}", names.name(a), values.value(v)),
            Self::And(ps) => join(ps, " AND ", pk, names, values),
            Self::Or(ps) => join(ps, " OR ", pk, names, values),
            Self::Not(p) => format!("NOT ({})", p.render(pk, names, values)),
        }
    }
}

fn join(
    ps: &[Predicate],
    sep: &str,
    pk: &str,
    names: &mut ExprNames,
    values: &mut ExprValues,
) -> String {
    if ps.is_empty() {
        // An empty AND is true, an empty OR false; keep expressions valid.
        return if sep.contains("AND") {
            format!(
                "attribute_exists({0}) OR attribute_not_exists({0})",
                names.name(pk)
            )
        } else {
            format!(
                "attribute_exists({0}) AND attribute_not_exists({0})",
                names.name(pk)
            )
        };
    }
    let parts: Vec<String> = ps
        .iter()
        .map(|p| format!("({})", p.render(pk, names, values)))
        .collect();
    parts.join(sep)
}

fn compare(a: &AttrValue, b: &AttrValue) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (AttrValue::N(x), AttrValue::N(y)) => decimal_cmp(x.as_str(), y.as_str()),
        (AttrValue::S(x), AttrValue::S(y)) => Some(x.cmp(y)),
        (AttrValue::B(x), AttrValue::B(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Compares two normalised decimal strings exactly.
fn decimal_cmp(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering;
    let (na, a) = a.strip_prefix('-').map_or((false, a), |r| (true, r));
    let (nb, b) = b.strip_prefix('-').map_or((false, b), |r| (true, r));
    let magnitude = |x: &str, y: &str| {
        let (xi, xf) = x.split_once('.').unwrap_or((x, ""));
        let (yi, yf) = y.split_once('.').unwrap_or((y, ""));
        xi.len()
            .cmp(&yi.len())
            .then_with(|| xi.cmp(yi))
            .then_with(|| {
                let width = xf.len().max(yf.len());
                format!("{xf:0<width$}").cmp(&format!("{yf:0<width$}"))
            })
    };
    Some(match (na, nb) {
        (false, false) => magnitude(a, b),
        (true, true) => magnitude(b, a),
        (true, false) => {
            if a == "0" && b == "0" {
                Ordering::Equal
            } else {
                Ordering::Less
            }
        }
        (false, true) => {
            if a == "0" && b == "0" {
                Ordering::Equal
            } else {
                Ordering::Greater
            }
        }
    })
}

/// `#n0`, `#n1`… placeholders for attribute names (reserved words are many).
#[derive(Default, Debug)]
pub struct ExprNames(pub HashMap<String, String>);

impl ExprNames {
    pub fn name(&mut self, attribute: &str) -> String {
        if let Some((k, _)) = self.0.iter().find(|(_, v)| *v == attribute) {
            return k.clone();
        }
        let k = format!("#n{}", self.0.len());
        self.0.insert(k.clone(), attribute.to_owned());
        k
    }
}

/// `:v0`, `:v1`… placeholders for values.
#[derive(Default, Debug)]
pub struct ExprValues(pub HashMap<String, AttrValue>);

impl ExprValues {
    pub fn value(&mut self, value: &AttrValue) -> String {
        let k = format!(":v{}", self.0.len());
        self.0.insert(k.clone(), value.clone());
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Number;

    fn item(pairs: &[(&str, AttrValue)]) -> Item {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn version_below_matches_absent_and_older() {
        let p = Predicate::version_below("v", 10);
        assert!(p.matches(None));
        assert!(p.matches(Some(&item(&[("v", AttrValue::n(9u64))]))));
        assert!(!p.matches(Some(&item(&[("v", AttrValue::n(10u64))]))));
        assert!(!p.matches(Some(&item(&[("v", AttrValue::n(11u64))]))));
    }

    #[test]
    fn decimals_compare_exactly() {
        use std::cmp::Ordering::*;
        let n = |s: &str| Number::parse(s).unwrap();
        for (a, b, want) in [
            ("9", "10", Less),
            ("-1", "0.5", Less),
            ("1.05", "1.5", Less),
            ("-2", "-10", Greater),
            ("0", "0", Equal),
        ] {
            assert_eq!(
                decimal_cmp(n(a).as_str(), n(b).as_str()),
                Some(want),
                "{a} vs {b}"
            );
        }
    }

    #[test]
    fn renders_dynamodb_expression() {
        let mut names = ExprNames::default();
        let mut values = ExprValues::default();
        let expr = Predicate::version_below("version", 3).render("id", &mut names, &mut values);
        assert_eq!(expr, "(attribute_not_exists(#n0)) OR (#n0 < :v0)");
        assert_eq!(names.0["#n0"], "version");
    }
}
