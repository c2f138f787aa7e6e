//! Exact arithmetic on DynamoDB numbers as decimal text: a stored or
//! replaced value plus an integer sum of increments. Never floating point:
//! DynamoDB numbers carry up to 38 significant digits, more than an f64.

use tidemark_connectors::Number;

/// `value + delta` as normalised decimal text (no exponent, no redundant
/// zeros).
///
/// # Errors
/// When `value` is not a decimal number.
pub fn add(value: &str, delta: i128) -> Result<String, String> {
    let n = Number::parse(value)?;
    let text = n.as_str();
    let (negative, magnitude) = match text.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, text),
    };
    let (int, frac) = magnitude.split_once('.').unwrap_or((magnitude, ""));
    let scale = frac.len();
    let a: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    let b: Vec<u8> = delta
        .unsigned_abs()
        .to_string()
        .bytes()
        .map(|b| b - b'0')
        .chain(std::iter::repeat_n(0, scale))
        .collect();
    let (digits, result_negative) = if negative == (delta < 0) {
        (add_magnitudes(&a, &b), negative)
    } else if compare(&a, &b) == std::cmp::Ordering::Less {
        (sub_magnitudes(&b, &a), delta < 0)
    } else {
        (sub_magnitudes(&a, &b), negative)
    };
    Ok(render(&digits, scale, result_negative))
}

fn trim(d: &[u8]) -> &[u8] {
    let first = d.iter().position(|&x| x != 0).unwrap_or(d.len());
    &d[first..]
}

fn compare(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let (a, b) = (trim(a), trim(b));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn add_magnitudes(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len().max(b.len()) + 1);
    let (mut i, mut j, mut carry) = (a.len(), b.len(), 0u8);
    while i > 0 || j > 0 || carry > 0 {
        let mut sum = carry;
        if i > 0 {
            i -= 1;
            sum += a[i];
        }
        if j > 0 {
            j -= 1;
            sum += b[j];
        }
        out.push(sum % 10);
        carry = sum / 10;
    }
    out.reverse();
    out
}

/// `a - b` for `a >= b`.
fn sub_magnitudes(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len());
    let (mut i, mut j, mut borrow) = (a.len(), b.len(), 0i8);
    while i > 0 {
        i -= 1;
        let mut d = i8::try_from(a[i]).unwrap_or(0) - borrow;
        if j > 0 {
            j -= 1;
            d -= i8::try_from(b[j]).unwrap_or(0);
        }
        borrow = i8::from(d < 0);
        out.push(u8::try_from(d + 10 * borrow).unwrap_or(0));
    }
    out.reverse();
    out
}

fn render(digits: &[u8], scale: usize, negative: bool) -> String {
    let mut digits = digits.to_vec();
    while digits.len() <= scale {
        digits.insert(0, 0);
    }
    let split = digits.len() - scale;
    let int: String = trim(&digits[..split])
        .iter()
        .map(|d| char::from(b'0' + d))
        .collect();
    let mut frac: String = digits[split..]
        .iter()
        .map(|d| char::from(b'0' + d))
        .collect();
    while frac.ends_with('0') {
        frac.pop();
    }
    let int = if int.is_empty() { "0".to_owned() } else { int };
    if int == "0" && frac.is_empty() {
        return "0".to_owned();
    }
    let sign = if negative { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// Whether a normalised number is within DynamoDB's range: magnitude below
/// 1E+126 and, unless zero, at least 1E-130.
pub fn in_dynamodb_range(n: &Number) -> bool {
    let text = n.as_str().trim_start_matches('-');
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int != "0" {
        return int.len() <= 126;
    }
    if frac.is_empty() {
        return true;
    }
    frac.len() - frac.trim_start_matches('0').len() < 130
}

/// Whether decimal text can be stored as a DynamoDB number: at most 38
/// significant digits and within [`in_dynamodb_range`].
///
/// # Errors
/// What is wrong with it.
pub fn storable(value: &str) -> Result<(), String> {
    let n = Number::parse(value)?;
    if in_dynamodb_range(&n) {
        Ok(())
    } else {
        Err(format!(
            "{value} is beyond DynamoDB's number range (magnitude 1E-130 to below 1E+126)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_exactly() {
        for (value, delta, want) in [
            ("0", 5, "5"),
            ("4.5", 1, "5.5"),
            ("4.5", -5, "-0.5"),
            ("-0.5", 1, "0.5"),
            ("-3", 3, "0"),
            ("1.25", -1, "0.25"),
            ("100", -250, "-150"),
            ("1E+3", 1, "1001"),
            (
                "12345678901234567890123456789012345678",
                1,
                "12345678901234567890123456789012345679",
            ),
            ("0.000000000000000000001", 0, "0.000000000000000000001"),
            ("9.99", 1, "10.99"),
            ("-10.5", 10, "-0.5"),
        ] {
            assert_eq!(add(value, delta).unwrap(), want, "{value} + {delta}");
        }
        assert_eq!(
            add("0", i128::from(i64::MIN) * 2).unwrap(),
            "-18446744073709551616"
        );
        assert!(add("NaN", 1).is_err());
    }

    #[test]
    fn range_is_dynamodb_s() {
        let ok = |s: &str| in_dynamodb_range(&Number::parse(s).unwrap());
        assert!(ok("0"));
        assert!(ok("9.9999999999999999999999999999999999999E+125"));
        assert!(!ok("1E+126"));
        assert!(ok("1E-130"));
        assert!(!ok("1E-131"));
        assert!(ok("-4.5"));
        assert!(storable("12345678901234567890123456789012345678").is_ok());
        assert!(storable("123456789012345678901234567890123456789").is_err());
        assert!(storable("1E+126").is_err());
    }
}
