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
    /// A string (or binary) attribute starting with the value.
    BeginsWith(String, AttrValue),
    /// A string containing the value, or a set or list holding it.
    Contains(String, AttrValue),
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
            Self::BeginsWith(a, v) => match (item.and_then(|i| i.get(a)), v) {
                (Some(AttrValue::S(x)), AttrValue::S(p)) => x.starts_with(p.as_str()),
                (Some(AttrValue::B(x)), AttrValue::B(p)) => x.starts_with(p),
                _ => false,
            },
            Self::Contains(a, v) => match (item.and_then(|i| i.get(a)), v) {
                (Some(AttrValue::S(x)), AttrValue::S(p)) => x.contains(p.as_str()),
                (Some(AttrValue::Ss(set)), AttrValue::S(p)) => set.contains(p),
                (Some(AttrValue::Ns(set)), AttrValue::N(p)) => set.contains(p),
                (Some(AttrValue::Bs(set)), AttrValue::B(p)) => set.contains(p),
                (Some(AttrValue::L(list)), v) => list.contains(v),
                _ => false,
            },
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
            Self::BeginsWith(a, v) => {
                format!("begins_with({}, {})", names.name(a), values.value(v))
            }
            Self::Contains(a, v) => format!("contains({}, {})", names.name(a), values.value(v)),
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

/// Parses a DynamoDB condition or filter expression into a [`Predicate`],
/// resolving `#name` and `:value` placeholders, so a store without
/// DynamoDB's expression engine (the embedded one) evaluates it the same way.
///
/// Supported: `attribute_exists`, `attribute_not_exists`, `begins_with`,
/// `contains`, the comparisons `= <> < <= > >=` between a top-level
/// attribute and a value, `BETWEEN`, `IN`, `AND`, `OR`, `NOT` and
/// parentheses. Nested paths, `size` and `attribute_type` are refused.
///
/// # Errors
/// A syntax error, an unknown placeholder or an unsupported construct, with
/// the reason.
pub fn parse_expression(
    expression: &str,
    names: &HashMap<String, String>,
    values: &HashMap<String, AttrValue>,
) -> Result<Predicate, String> {
    // DynamoDB's own limit on an expression; also bounds the work below.
    if expression.len() > MAX_EXPRESSION_BYTES {
        return Err(format!(
            "longer than {MAX_EXPRESSION_BYTES} bytes (DynamoDB's limit)"
        ));
    }
    let tokens = tokenize(expression)?;
    let mut parser = Parser {
        tokens,
        at: 0,
        depth: 0,
        names,
        values,
    };
    let predicate = parser.or()?;
    match parser.tokens.get(parser.at) {
        None => Ok(predicate),
        Some(t) => Err(format!("unexpected {t:?} after a complete condition")),
    }
}

/// The longest filter expression accepted, as DynamoDB has it.
pub const MAX_EXPRESSION_BYTES: usize = 4096;
/// Parentheses and NOTs nested deeper are refused: the parser (and every
/// walk of the predicate) recurses once per level.
pub const MAX_NESTING: usize = 32;

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Name(String),
    Value(String),
    Word(String),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let word = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_') {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Token::Open);
                i += 1;
            }
            ')' => {
                out.push(Token::Close);
                i += 1;
            }
            ',' => {
                out.push(Token::Comma);
                i += 1;
            }
            '#' | ':' => {
                i += 1;
                let w = word(&mut i);
                if w.is_empty() {
                    return Err(format!("{c} must be followed by a placeholder name"));
                }
                out.push(if c == '#' {
                    Token::Name(format!("#{w}"))
                } else {
                    Token::Value(format!(":{w}"))
                });
            }
            '=' => {
                out.push(Token::Op("="));
                i += 1;
            }
            '<' | '>' => {
                let next = chars.get(i + 1).copied();
                let op = match (c, next) {
                    ('<', Some('>')) => "<>",
                    ('<', Some('=')) => "<=",
                    ('>', Some('=')) => ">=",
                    ('<', _) => "<",
                    _ => ">",
                };
                i += op.len();
                out.push(Token::Op(op));
            }
            '.' | '[' => return Err("nested attribute paths are not supported".to_owned()),
            c if c.is_alphabetic() || c == '_' => out.push(Token::Word(word(&mut i))),
            c => return Err(format!("unexpected character {c:?}")),
        }
    }
    Ok(out)
}

struct Parser<'a> {
    tokens: Vec<Token>,
    at: usize,
    /// Parentheses and NOTs open around the current position.
    depth: usize,
    names: &'a HashMap<String, String>,
    values: &'a HashMap<String, AttrValue>,
}

/// One side of a comparison.
enum Operand {
    Attribute(String),
    Value(AttrValue),
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(word))
    }

    fn expect(&mut self, token: &Token) -> Result<(), String> {
        match self.next() {
            Some(t) if &t == token => Ok(()),
            Some(t) => Err(format!("expected {token:?}, found {t:?}")),
            None => Err(format!("expected {token:?}, found the end")),
        }
    }

    fn or(&mut self) -> Result<Predicate, String> {
        let mut parts = vec![self.and()?];
        while self.keyword("OR") {
            self.at += 1;
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Predicate::Or(parts)
        })
    }

    fn and(&mut self) -> Result<Predicate, String> {
        let mut parts = vec![self.not()?];
        while self.keyword("AND") {
            self.at += 1;
            parts.push(self.not()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Predicate::And(parts)
        })
    }

    /// Runs `parse` one nesting level deeper, refusing past [`MAX_NESTING`]
    /// (a deep expression overflowed the stack: found by the e2e RPC fuzzer).
    fn nested<T>(
        &mut self,
        parse: impl FnOnce(&mut Self) -> Result<T, String>,
    ) -> Result<T, String> {
        if self.depth >= MAX_NESTING {
            return Err(format!(
                "parentheses and NOTs nested deeper than {MAX_NESTING}"
            ));
        }
        self.depth += 1;
        let parsed = parse(self);
        self.depth -= 1;
        parsed
    }

    fn not(&mut self) -> Result<Predicate, String> {
        if self.keyword("NOT") {
            self.at += 1;
            return self.nested(|p| Ok(Predicate::Not(Box::new(p.not()?))));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Predicate, String> {
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let inner = self.nested(Self::or)?;
            self.expect(&Token::Close)?;
            return Ok(inner);
        }
        if let Some(Token::Word(w)) = self.peek()
            && self.tokens.get(self.at + 1) == Some(&Token::Open)
        {
            let function = w.clone();
            self.at += 2;
            return self.function(&function);
        }
        let left = self.operand()?;
        if self.keyword("BETWEEN") {
            self.at += 1;
            let low = self.operand()?;
            if !self.keyword("AND") {
                return Err("BETWEEN needs AND".to_owned());
            }
            self.at += 1;
            let high = self.operand()?;
            return Ok(Predicate::And(vec![
                comparison(&left, ">=", low)?,
                comparison(&left, "<=", high)?,
            ]));
        }
        if self.keyword("IN") {
            self.at += 1;
            self.expect(&Token::Open)?;
            let mut options = vec![comparison(&left, "=", self.operand()?)?];
            while self.peek() == Some(&Token::Comma) {
                self.at += 1;
                options.push(comparison(&left, "=", self.operand()?)?);
            }
            self.expect(&Token::Close)?;
            return Ok(Predicate::Or(options));
        }
        match self.next() {
            Some(Token::Op(op)) => {
                let right = self.operand()?;
                comparison(&left, op, right)
            }
            Some(t) => Err(format!("expected a comparison, found {t:?}")),
            None => Err("expected a comparison, found the end".to_owned()),
        }
    }

    fn function(&mut self, name: &str) -> Result<Predicate, String> {
        let attribute = match self.operand()? {
            Operand::Attribute(a) => a,
            Operand::Value(_) => return Err(format!("{name} needs an attribute first")),
        };
        let predicate = match name.to_ascii_lowercase().as_str() {
            "attribute_exists" => Predicate::AttributeExists(attribute),
            "attribute_not_exists" => Predicate::AttributeNotExists(attribute),
            "begins_with" | "contains" => {
                self.expect(&Token::Comma)?;
                let Operand::Value(v) = self.operand()? else {
                    return Err(format!("{name} needs a value second"));
                };
                if name.eq_ignore_ascii_case("begins_with") {
                    Predicate::BeginsWith(attribute, v)
                } else {
                    Predicate::Contains(attribute, v)
                }
            }
            other => return Err(format!("function {other} is not supported")),
        };
        self.expect(&Token::Close)?;
        Ok(predicate)
    }

    fn operand(&mut self) -> Result<Operand, String> {
        match self.next() {
            Some(Token::Name(n)) => self
                .names
                .get(&n)
                .map(|a| Operand::Attribute(a.clone()))
                .ok_or_else(|| format!("{n} is not in the expression attribute names")),
            Some(Token::Value(v)) => self
                .values
                .get(&v)
                .map(|x| Operand::Value(x.clone()))
                .ok_or_else(|| format!("{v} is not in the expression attribute values")),
            Some(Token::Word(w))
                if !["AND", "OR", "NOT", "BETWEEN", "IN"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k)) =>
            {
                Ok(Operand::Attribute(w))
            }
            Some(t) => Err(format!("expected an attribute or a value, found {t:?}")),
            None => Err("expected an attribute or a value, found the end".to_owned()),
        }
    }
}

/// `left op right` with one attribute and one value, in either order.
fn comparison(left: &Operand, op: &str, right: Operand) -> Result<Predicate, String> {
    let (attribute, value, op) = match (left, right) {
        (Operand::Attribute(a), Operand::Value(v)) => (a.clone(), v, op),
        (Operand::Value(v), Operand::Attribute(a)) => {
            let flipped = match op {
                "<" => ">",
                ">" => "<",
                "<=" => ">=",
                ">=" => "<=",
                same => same,
            };
            (a, v.clone(), flipped)
        }
        _ => return Err("a comparison needs one attribute and one value".to_owned()),
    };
    let eq = || Predicate::Equals(attribute.clone(), value.clone());
    let lt = || Predicate::LessThan(attribute.clone(), value.clone());
    let ge = || Predicate::GreaterOrEqual(attribute.clone(), value.clone());
    Ok(match op {
        "=" => eq(),
        "<>" => Predicate::Not(Box::new(eq())),
        "<" => lt(),
        ">=" => ge(),
        "<=" => Predicate::Or(vec![lt(), eq()]),
        ">" => Predicate::And(vec![ge(), Predicate::Not(Box::new(eq()))]),
        other => return Err(format!("unknown comparison {other}")),
    })
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
    #[test]
    fn deep_or_long_expressions_are_refused_not_a_stack_overflow() {
        let none = HashMap::new();
        let values: HashMap<String, AttrValue> = [(":v".to_owned(), AttrValue::n(1i64))].into();
        let nested = |depth: usize| format!("{}a = :v{}", "(".repeat(depth), ")".repeat(depth));
        assert!(parse_expression(&nested(MAX_NESTING), &none, &values).is_ok());
        let err = parse_expression(&nested(MAX_NESTING + 1), &none, &values).unwrap_err();
        assert!(err.contains("nested"), "{err}");
        let nots = format!("{}a = :v", "NOT ".repeat(1000));
        assert!(parse_expression(&nots, &none, &values).is_err());
        let long = "(".repeat(MAX_EXPRESSION_BYTES + 1);
        assert!(
            parse_expression(&long, &none, &values)
                .unwrap_err()
                .contains("4096")
        );
    }

    #[test]
    fn parses_dynamodb_expressions() {
        let names: HashMap<String, String> = [("#a".to_owned(), "test".to_owned())].into();
        let values: HashMap<String, AttrValue> = [
            (":one".to_owned(), AttrValue::n(1i64)),
            (":p".to_owned(), AttrValue::s("co")),
        ]
        .into();
        let parse = |e: &str| parse_expression(e, &names, &values);
        assert_eq!(
            parse("attribute_not_exists(#a)").unwrap(),
            Predicate::AttributeNotExists("test".into())
        );
        let p = parse("NOT (#a = :one) AND begins_with(kind, :p) OR size = :one").unwrap();
        let with =
            |t: i64, kind: &str| item(&[("test", AttrValue::n(t)), ("kind", AttrValue::s(kind))]);
        assert!(p.matches(Some(&with(2, "course"))));
        assert!(!p.matches(Some(&with(1, "course"))));
        assert!(!p.matches(Some(&with(2, "unit"))));
        let between = parse(":one <= #a AND #a BETWEEN :one AND :one").unwrap();
        assert!(between.matches(Some(&with(1, ""))));
        assert!(!between.matches(Some(&with(2, ""))));
        assert!(
            parse("#a IN (:one, :p)")
                .unwrap()
                .matches(Some(&with(1, "")))
        );
        assert!(parse("#a > :one").unwrap().matches(Some(&with(2, ""))));
        assert!(!parse("#a > :one").unwrap().matches(Some(&with(1, ""))));
        for bad in [
            "",
            "attribute_not_exists(#b)",
            "#a = :nope",
            "#a =",
            "size(#a) > :one",
            "a.b = :one",
            "(#a = :one",
            "#a = :one :one",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
