//! RFC 8785 JSON Canonicalization Scheme (JCS) for `serde_json` values: the exact bytes a record
//! hash is computed over.
//!
//! Object members are sorted by their names' UTF-16 code units, there is no whitespace,
//! strings carry only the escapes JCS requires (`\"`, `\\`, `\b \t \n \f \r`, and `\u00xx` in
//! lower case for the other control characters), and numbers are written as ECMAScript's
//! `Number.prototype.toString` writes the IEEE 754 double they denote. Integers of at most 2^53
//! in magnitude are written exactly; larger integers are, as JCS requires, first rounded to a
//! double.

#[cfg(test)]
mod tests;

use serde_json::Value;

/// Why a value has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// JSON has no NaN or infinity; `serde_json` cannot build one, but a double can be one.
    #[error("number {0} has no JSON form")]
    NonFiniteNumber(String),
}

/// The largest integer magnitude a double holds exactly (2^53).
const EXACT_INTEGER_MAX: u64 = 1 << 53;

/// The canonical form of `value`.
pub fn canonicalize(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut output = Vec::with_capacity(1024);
    write_value(&mut output, value)?;
    Ok(output)
}

/// Appends the canonical form of `value` to `output`.
pub fn write_value(output: &mut Vec<u8>, value: &Value) -> Result<(), CanonicalError> {
    match value {
        Value::Null => output.extend_from_slice(b"null"),
        Value::Bool(true) => output.extend_from_slice(b"true"),
        Value::Bool(false) => output.extend_from_slice(b"false"),
        Value::Number(number) => write_number(output, number)?,
        Value::String(text) => write_string(output, text),
        Value::Array(items) => {
            output.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    output.push(b',');
                }
                write_value(output, item)?;
            }
            output.push(b']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_by(|(left, _), (right, _)| compare_utf16(left, right));
            output.push(b'{');
            for (index, (name, member)) in sorted.into_iter().enumerate() {
                if index > 0 {
                    output.push(b',');
                }
                write_string(output, name);
                output.push(b':');
                write_value(output, member)?;
            }
            output.push(b'}');
        }
    }
    Ok(())
}

/// Orders member names by UTF-16 code units. UTF-8 byte order is code point order, which
/// differs from UTF-16 order only between supplementary characters (surrogate pairs, 0xD800..)
/// and U+E000..U+FFFF, so the common case compares bytes.
fn compare_utf16(left: &str, right: &str) -> std::cmp::Ordering {
    if left.is_ascii() || right.is_ascii() {
        return left.as_bytes().cmp(right.as_bytes());
    }
    left.encode_utf16().cmp(right.encode_utf16())
}

/// Appends `text` as a JSON string with exactly the escapes JCS requires.
pub fn write_string(output: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    output.push(b'"');
    let bytes = text.as_bytes();
    // Most strings need no escape: one check the compiler vectorises, then one copy.
    if !bytes.iter().fold(false, |any, &byte| {
        any | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
    }) {
        output.extend_from_slice(bytes);
        output.push(b'"');
        return;
    }
    let mut start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0x00..=0x1f => {
                output.extend_from_slice(&bytes[start..index]);
                output.extend_from_slice(b"\\u00");
                output.push(HEX[usize::from(byte >> 4)]);
                output.push(HEX[usize::from(byte & 0x0f)]);
                start = index + 1;
                continue;
            }
            _ => continue,
        };
        output.extend_from_slice(&bytes[start..index]);
        output.extend_from_slice(escape);
        start = index + 1;
    }
    output.extend_from_slice(&bytes[start..]);
    output.push(b'"');
}

fn write_number(output: &mut Vec<u8>, number: &serde_json::Number) -> Result<(), CanonicalError> {
    if let Some(unsigned) = number.as_u64()
        && unsigned <= EXACT_INTEGER_MAX
    {
        output.extend_from_slice(unsigned.to_string().as_bytes());
        return Ok(());
    }
    if let Some(signed) = number.as_i64()
        && signed.unsigned_abs() <= EXACT_INTEGER_MAX
    {
        output.extend_from_slice(signed.to_string().as_bytes());
        return Ok(());
    }
    // A float, or an integer too large for a double to hold exactly: JCS rounds it to one.
    let double = number
        .as_f64()
        .ok_or_else(|| CanonicalError::NonFiniteNumber(number.to_string()))?;
    output.extend_from_slice(format_double(double)?.as_bytes());
    Ok(())
}

/// Shortest digits below this many cannot be a tie (the double would need more digits).
const TIE_DIGITS_MIN: usize = 15;
/// Enough fractional digits for the exact decimal expansion of any double.
const EXACT_DIGITS: usize = 800;

/// ECMA-262 asks, when two shortest digit strings are equally close to the value, for the one
/// ending in an even digit; Rust's shortest formatting may pick the other. A tie means the
/// value's exact expansion has one more digit than the shortest form, and that digit is 5.
fn break_tie_to_even(value: f64, digits: String, exponent: i32) -> (String, i32) {
    if digits.len() < TIE_DIGITS_MIN {
        return (digits, exponent);
    }
    let exact = format!("{value:.EXACT_DIGITS$e}");
    let Some((mantissa, exact_exponent)) = exact.split_once('e') else {
        return (digits, exponent);
    };
    if exact_exponent.parse::<i32>().ok() != Some(exponent) {
        return (digits, exponent);
    }
    let exact_digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let exact_digits = exact_digits.trim_end_matches('0');
    if exact_digits.len() != digits.len() + 1 || !exact_digits.ends_with('5') {
        return (digits, exponent);
    }
    let floor = &exact_digits[..digits.len()];
    let floor_is_even = floor
        .bytes()
        .last()
        .is_some_and(|digit| (digit - b'0').is_multiple_of(2));
    if floor_is_even {
        return (floor.trim_end_matches('0').to_owned(), exponent);
    }
    // The ceiling: add one in the last place (an odd last digit never carries).
    let mut ceiling = floor.as_bytes().to_vec();
    if let Some(last) = ceiling.last_mut() {
        *last += 1;
    }
    let ceiling = String::from_utf8(ceiling).unwrap_or(digits);
    (ceiling.trim_end_matches('0').to_owned(), exponent)
}

/// ECMAScript's `Number.prototype.toString(10)` of a finite double (ECMA-262 Number::toString):
/// the shortest digits that round-trip, written plainly for exponents in [-6, 21) and in
/// exponential form (`1e+21`, `1.5e-7`) otherwise; negative zero is `0`.
pub fn format_double(value: f64) -> Result<String, CanonicalError> {
    if !value.is_finite() {
        return Err(CanonicalError::NonFiniteNumber(value.to_string()));
    }
    if value == 0.0 {
        return Ok("0".to_owned());
    }
    // Rust's `{:e}` gives the shortest round-tripping digits, the closest to the value when
    // several are as short: the digits ECMAScript asks for. E.g. "1.2345e-7", "5e-324".
    let scientific = format!("{:e}", value.abs());
    let (mantissa, exponent) = scientific
        .split_once('e')
        .ok_or_else(|| CanonicalError::NonFiniteNumber(scientific.clone()))?;
    let exponent: i32 = exponent
        .parse()
        .map_err(|_| CanonicalError::NonFiniteNumber(scientific.clone()))?;
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let (digits, exponent) = break_tie_to_even(value.abs(), digits, exponent);
    // ECMA-262: the value is 0.digits × 10^n, with k digits.
    let k = i32::try_from(digits.len()).map_err(|_| CanonicalError::NonFiniteNumber(scientific))?;
    let n = exponent + 1;
    let mut text = String::with_capacity(32);
    if value < 0.0 {
        text.push('-');
    }
    if k <= n && n <= 21 {
        text.push_str(&digits);
        text.extend(std::iter::repeat_n('0', (n - k).unsigned_abs() as usize));
    } else if 0 < n && n <= 21 {
        let split = n.unsigned_abs() as usize;
        text.push_str(&digits[..split]);
        text.push('.');
        text.push_str(&digits[split..]);
    } else if -6 < n && n <= 0 {
        text.push_str("0.");
        text.extend(std::iter::repeat_n('0', n.unsigned_abs() as usize));
        text.push_str(&digits);
    } else {
        text.push_str(&digits[..1]);
        if k > 1 {
            text.push('.');
            text.push_str(&digits[1..]);
        }
        text.push('e');
        text.push(if n - 1 < 0 { '-' } else { '+' });
        text.push_str(&(n - 1).unsigned_abs().to_string());
    }
    Ok(text)
}
