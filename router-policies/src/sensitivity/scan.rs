//! The single pass over a text's bytes that hands each candidate position to its recognizer.
//!
//! The text is cut into runs of token bytes (ASCII letters, digits and `+` to start, then
//! also `- _ /`, and up to two trailing `=` of base64 padding). The first byte of a run picks the recognizers that can
//! start there, the byte after it says whether the run is a key (`password=`, `AccountKey=`,
//! `"token":`), and only runs of 20 bytes or more are looked at as possible keys or tokens.
//! A few bytes outside runs are triggers of their own: `@` (e-mail), `(` (a phone area code),
//! `::` (a compressed IPv6 address) and `-----BEGIN ` (a PEM block). Everything else is skipped with one table lookup.
//! Every recognizer matches ASCII only, so every span is on character boundaries.

use std::ops::Range;

use super::{EntityType, Finding, identifiers, network, numbers, personal, secrets};

/// Byte class bits.
const DIGIT: u8 = 1;
const UPPER: u8 = 2;
const LOWER: u8 = 4;
/// `+ - _ /`: inside tokens (phone numbers, base64, identifiers), not inside words.
const TOKEN_PUNCTUATION: u8 = 8;
const HEX_LETTER: u8 = 16;

const ALPHANUMERIC: u8 = DIGIT | UPPER | LOWER;
const TOKEN: u8 = ALPHANUMERIC | TOKEN_PUNCTUATION;

static CLASSES: [u8; 256] = classes();

const fn classes() -> [u8; 256] {
    let mut table = [0_u8; 256];
    let mut byte = 0;
    while byte < 256 {
        let value = byte as u8;
        table[byte] = match value {
            b'0'..=b'9' => DIGIT,
            b'A'..=b'F' => UPPER | HEX_LETTER,
            b'a'..=b'f' => LOWER | HEX_LETTER,
            b'G'..=b'Z' => UPPER,
            b'g'..=b'z' => LOWER,
            b'+' | b'-' | b'_' | b'/' => TOKEN_PUNCTUATION,
            _ => 0,
        };
        byte += 1;
    }
    table
}

pub(super) fn is_digit(byte: u8) -> bool {
    byte.is_ascii_digit()
}

pub(super) fn is_alphanumeric(byte: u8) -> bool {
    CLASSES[usize::from(byte)] & ALPHANUMERIC != 0
}

pub(super) fn is_token(byte: u8) -> bool {
    CLASSES[usize::from(byte)] & TOKEN != 0
}

pub(super) fn is_hex(byte: u8) -> bool {
    CLASSES[usize::from(byte)] & (DIGIT | HEX_LETTER) != 0
}

/// The byte at `index`, or 0 past the end (0 is in no class).
pub(super) fn byte_at(bytes: &[u8], index: usize) -> u8 {
    bytes.get(index).copied().unwrap_or(0)
}

/// The end of the run of bytes from `start` that satisfy `accept`, at most `max` bytes long.
pub(super) fn run_end(
    bytes: &[u8],
    start: usize,
    max: usize,
    accept: impl Fn(u8) -> bool,
) -> usize {
    let limit = bytes.len().min(start.saturating_add(max));
    let mut end = start;
    while end < limit && accept(bytes[end]) {
        end += 1;
    }
    end
}

/// Whether one of `words` (lower case ASCII) begins a word, in any case, on the same line
/// within `window` bytes before `start`.
pub(super) fn context_before(bytes: &[u8], start: usize, window: usize, words: &[&str]) -> bool {
    let from = start.saturating_sub(window);
    let line_start = bytes[from..start]
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(from, |newline| from + newline + 1);
    context_in(bytes, line_start, start, words)
}

/// [`context_before`], each word matched whole: `token` is not found in `tokenizer` or
/// `tokens`, words an LLM's users write about models all day.
pub(super) fn whole_word_context_before(
    bytes: &[u8],
    start: usize,
    window: usize,
    words: &[&str],
) -> bool {
    let from = start.saturating_sub(window);
    let line_start = bytes[from..start]
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(from, |newline| from + newline + 1);
    context_matches(bytes, line_start, start, words, true)
}

fn context_in(bytes: &[u8], from: usize, to: usize, words: &[&str]) -> bool {
    context_matches(bytes, from, to, words, false)
}

fn context_matches(bytes: &[u8], from: usize, to: usize, words: &[&str], whole: bool) -> bool {
    let haystack = &bytes[from..to];
    words.iter().any(|word| {
        let word = word.as_bytes();
        haystack.len() >= word.len()
            && haystack
                .windows(word.len())
                .enumerate()
                .any(|(offset, candidate)| {
                    let at = from + offset;
                    candidate.eq_ignore_ascii_case(word)
                        && (at == 0 || !bytes[at - 1].is_ascii_alphabetic() || escaped(bytes, at))
                        && (!whole || !byte_at(bytes, at + word.len()).is_ascii_alphabetic())
                })
    })
}

/// Whether one of the `count` words before `start` (across line breaks) begins with one of
/// `words` (lower case ASCII), in any case: `call me on`, `Phone:\n`.
pub(super) fn context_words_before(
    bytes: &[u8],
    start: usize,
    count: usize,
    words: &[&str],
) -> bool {
    let mut end = start;
    for _ in 0..count {
        let mut skipped = 0;
        while end > 0 && (!is_alphanumeric(bytes[end - 1]) || escaped(bytes, end)) && skipped < 4 {
            end -= if escaped(bytes, end) { 2 } else { 1 };
            skipped += 1;
        }
        let mut word_start = end
            - (bytes[..end]
                .iter()
                .rev()
                .take(32)
                .take_while(|&&byte| is_alphanumeric(byte))
                .count());
        // `\nPhone`: the escape's letter is not part of the word.
        if word_start < end && escaped(bytes, word_start + 1) {
            word_start += 1;
        }
        if word_start == end {
            return false;
        }
        let word = &bytes[word_start..end];
        if words.iter().any(|known| {
            word.len() >= known.len() && word[..known.len()].eq_ignore_ascii_case(known.as_bytes())
        }) {
            return true;
        }
        end = word_start;
    }
    false
}

/// Whether the byte before `at` ends a written-out escape (`\n`, `\t`, `\r`).
pub(super) fn escaped(bytes: &[u8], at: usize) -> bool {
    at >= 2 && matches!(bytes[at - 1], b'n' | b't' | b'r') && bytes[at - 2] == b'\\'
}

/// Whether `at` starts a word: no letter or digit before it, or only an escape's letter.
pub(super) fn starts_word(bytes: &[u8], at: usize) -> bool {
    at == 0 || !is_alphanumeric(bytes[at - 1]) || escaped(bytes, at)
}

/// The alphanumeric word that starts just after `end` (skipping up to three separator
/// bytes such as ` - `), or an empty slice.
pub(super) fn next_word(bytes: &[u8], end: usize) -> &[u8] {
    &bytes[next_word_span(bytes, end)]
}

/// Where [`next_word`] lies in `bytes` (empty when there is none).
pub(super) fn next_word_span(bytes: &[u8], end: usize) -> Range<usize> {
    let mut start = end;
    while start < bytes.len() && !is_alphanumeric(bytes[start]) && start - end < 3 {
        if bytes[start] == b'\n' {
            return end..end;
        }
        start += 1;
    }
    start..run_end(bytes, start, 32, is_alphanumeric)
}

/// The alphanumeric word that ends just before `start` (skipping up to three separator
/// bytes such as `: `), or an empty slice.
pub(super) fn previous_word(bytes: &[u8], start: usize) -> &[u8] {
    let mut end = start;
    let mut skipped = 0;
    while end > 0 && !is_alphanumeric(bytes[end - 1]) && skipped < 3 {
        if bytes[end - 1] == b'\n' {
            return &[];
        }
        end -= 1;
        skipped += 1;
    }
    let mut word_start = end;
    while word_start > 0 && is_alphanumeric(bytes[word_start - 1]) && end - word_start < 32 {
        word_start -= 1;
    }
    &bytes[word_start..end]
}

/// Whether a match ending at `end` ends cleanly: no letter, digit or `@` follows, nor one
/// of `. - _ /` that joins it to more letters or digits (`1.2.3.4.5`, `2024-000123-7`).
pub(super) fn ends_cleanly(bytes: &[u8], end: usize) -> bool {
    let next = byte_at(bytes, end);
    if is_alphanumeric(next) || next == b'@' {
        return false;
    }
    !(matches!(next, b'.' | b'-' | b'_' | b'/') && is_alphanumeric(byte_at(bytes, end + 1)))
}

/// Findings of one scan, built up by the recognizers.
pub(super) struct Scanner<'t> {
    pub(super) bytes: &'t [u8],
    pub(super) found: Vec<Finding>,
    /// Where the last labels of personal data ended (`DOB`, `passport`, `MRN`).
    pub(super) labels: personal::Labels,
}

impl Scanner<'_> {
    pub(super) fn push(&mut self, entity: EntityType, start: usize, end: usize, confidence: f32) {
        debug_assert!(start < end && end <= self.bytes.len());
        self.found.push(Finding {
            entity,
            span: start..end,
            confidence,
        });
    }
}

/// Runs of this many bytes or more may be base64 of a text (18 bytes or more of it).
const ENCODED_BYTES_MIN: usize = 24;

/// Runs every built-in recognizer over `text`; findings may overlap and are unsorted. Runs
/// long enough to be base64 of a text are added to `encoded` for the caller to decode.
pub(super) fn scan_builtin(text: &str, encoded: &mut Vec<Range<usize>>) -> Vec<Finding> {
    let bytes = text.as_bytes();
    let mut scanner = Scanner {
        bytes,
        found: Vec::new(),
        labels: personal::Labels::default(),
    };
    let length = bytes.len();
    let mut index = 0;
    while index < length {
        let byte = bytes[index];
        // `\n`, `\t`, `\r` written out (code, escaped JSON) separate words.
        if byte == b'\\' && matches!(byte_at(bytes, index + 1), b'n' | b't' | b'r') {
            index += 2;
            continue;
        }
        // Runs start at a letter, a digit or `+`; `- _ /` only join a run.
        if !is_token(byte) || matches!(byte, b'-' | b'_' | b'/') {
            let resume = match byte {
                b'@' => network::email(&mut scanner, index),
                b'(' => numbers::parenthesized_phone(&mut scanner, index),
                b':' if byte_at(bytes, index + 1) == b':'
                    && !is_hex(byte_at(bytes, index.wrapping_sub(1))) =>
                {
                    network::ipv6(&mut scanner, index)
                }
                b'-' => secrets::pem_block(&mut scanner, index),
                _ => None,
            };
            index = resume.map_or(index + 1, |end| end.max(index + 1));
            continue;
        }
        let start = index;
        let word_end = run_end(bytes, start, usize::MAX, is_token);
        // Up to two `=` of base64 padding belong to the run when nothing follows them.
        let padded = run_end(bytes, word_end, 2, |byte| byte == b'=');
        let end = if padded > word_end
            && !is_token(byte_at(bytes, padded))
            && byte_at(bytes, padded) != b'='
        {
            padded
        } else {
            word_end
        };
        if end - start >= ENCODED_BYTES_MIN {
            encoded.push(start..end);
        }
        let mut resume = dispatch(&mut scanner, start, word_end, end);
        // The shortest card number or IBAN and one byte joining it to more.
        if resume.is_none() && word_end - start > 12 {
            resume = joined_values(&mut scanner, start, word_end);
        }
        index = resume.map_or(end, |resume| resume.max(end));
    }
    scanner.found
}

/// Card numbers and IBANs written into the longer token `start..end` (a path, a file
/// name), which the recognizers above read only where a token starts and ends cleanly. Both
/// hold at least ten digits (a Dutch IBAN twelve, a card twelve or more): a token with
/// fewer is not looked at further. Returns the end of the last value found.
#[cold]
#[inline(never)]
fn joined_values(scanner: &mut Scanner<'_>, start: usize, end: usize) -> Option<usize> {
    let digits = scanner.bytes[start..end]
        .iter()
        .filter(|byte| byte.is_ascii_digit())
        .count();
    if digits < 10 {
        return None;
    }
    let cards = numbers::joined_cards(scanner, start, end);
    let ibans = identifiers::joined_ibans(scanner, start, end);
    cards.max(ibans)
}

/// Tries the recognizers that can start at a run `start..end` (`word_end` without padding).
/// Returns where scanning resumes when a recognizer matched past the run.
fn dispatch(scanner: &mut Scanner<'_>, start: usize, word_end: usize, end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let first = bytes[start];
    let class = CLASSES[usize::from(first)];
    let next = byte_at(bytes, word_end);
    if next == b':'
        && class & (DIGIT | HEX_LETTER) != 0
        && word_end - start <= 4
        && let Some(resume) = network::ipv6(scanner, start)
    {
        return Some(resume);
    }
    // A passport or medical record number may look like any of the below (a bare number,
    // a letter and digits): its label decides first.
    if class & (DIGIT | UPPER) != 0
        && let Some(resume) = personal::labelled_id(scanner, start, word_end)
    {
        return Some(resume);
    }
    let matched = if class & DIGIT != 0 {
        numbers::scan(scanner, start, word_end)
    } else if class & UPPER != 0 {
        identifiers::scan(scanner, start, word_end)
    } else if first == b'+' {
        numbers::international_phone(scanner, start)
    } else if class & LOWER != 0
        // An IBAN typed in lower case: two letters, then its two check digits.
        && is_digit(byte_at(bytes, start + 2))
        && is_digit(byte_at(bytes, start + 3))
    {
        identifiers::any_case_iban(scanner, start)
    } else {
        None
    };
    if matched.is_some() {
        return matched;
    }
    if class & (UPPER | LOWER) != 0 {
        personal::note_label(scanner, start, word_end);
        // `jane.doe at contoso dot com`.
        if word_end - start == 2
            && first | 0x20 == b'a'
            && bytes[start + 1] | 0x20 == b't'
            && byte_at(bytes, start.wrapping_sub(1)) == b' '
            && byte_at(bytes, word_end) == b' '
            && let Some(resume) = network::spelled_email(scanner, start - 1)
        {
            return Some(resume);
        }
        if let Some(resume) = secrets::keyed(scanner, start, word_end) {
            return Some(resume);
        }
        if first == b'e'
            && let Some(resume) = secrets::jwt(scanner, start)
        {
            return Some(resume);
        }
    }
    if end - start >= secrets::TOKEN_BYTES_MIN {
        return secrets::token(scanner, start, end);
    }
    None
}

/// The text `run` is base64 of (standard or URL-safe alphabet, padding optional), when it
/// decodes to UTF-8 with no control characters but line breaks and tabs: a document a tool
/// returned encoded, a value tucked into a data string. Anything else (keys, hashes, long
/// identifiers) decodes to bytes that are not such text and gives `None`.
pub(super) fn decoded_text(run: &str) -> Option<String> {
    let symbols = run.trim_end_matches('=').as_bytes();
    if symbols.len() % 4 == 1 {
        return None;
    }
    // The first six bytes tell most keys and hashes from text without decoding them all.
    let mut buffer = [0_u8; 6];
    let decoded = decode_into(&symbols[..symbols.len().min(8)], &mut buffer)?;
    let head = &buffer[..decoded];
    match std::str::from_utf8(head) {
        Ok(text) if text_like(text) => {}
        Err(error) if error.error_len().is_none() && text_like(text_prefix(head, &error)) => {}
        _ => return None,
    }
    let mut bytes = vec![0_u8; symbols.len() * 3 / 4];
    let written = decode_into(symbols, &mut bytes)?;
    bytes.truncate(written);
    let text = String::from_utf8(bytes).ok()?;
    text_like(&text).then_some(text)
}

/// The valid UTF-8 before a sequence that `head` cuts off.
fn text_prefix<'b>(head: &'b [u8], error: &std::str::Utf8Error) -> &'b str {
    std::str::from_utf8(&head[..error.valid_up_to()]).unwrap_or_default()
}

/// No control characters but line breaks and tabs.
fn text_like(text: &str) -> bool {
    text.chars()
        .all(|character| !character.is_control() || matches!(character, '\n' | '\r' | '\t'))
}

/// Writes the bytes base64 `symbols` (no padding) stand for into `out` (at least
/// `symbols.len() * 3 / 4` long) and returns how many; `None` for a symbol outside both
/// alphabets.
pub(super) fn decode_into(symbols: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut written = 0;
    let mut buffer = 0_u32;
    let mut bits = 0;
    for &symbol in symbols {
        let value = match symbol {
            b'A'..=b'Z' => symbol - b'A',
            b'a'..=b'z' => symbol - b'a' + 26,
            b'0'..=b'9' => symbol - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            *out.get_mut(written)? = u8::try_from((buffer >> bits) & 0xFF).unwrap_or(0);
            written += 1;
        }
    }
    Some(written)
}
