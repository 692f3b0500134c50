//! Recognizers for addresses: e-mail (found from its `@`), URLs with a password in them
//! (`postgres://user:password@host`), and IPv6 in its full and compressed forms.

use super::EntityType;
use super::scan::{Scanner, byte_at, escaped, is_alphanumeric, is_hex, run_end};

const EMAIL_CONFIDENCE: f32 = 0.9;
const URL_CREDENTIALS_CONFIDENCE: f32 = 0.9;
const IPV6_CONFIDENCE: f32 = 0.85;

/// The longest local part of an address, in bytes (RFC 5321).
const LOCAL_PART_BYTES_MAX: usize = 64;
/// The longest domain, in bytes (RFC 1035).
const DOMAIN_BYTES_MAX: usize = 253;
const LABEL_BYTES_MAX: usize = 63;
/// The longest user name and scheme looked back over for URL credentials, in bytes.
const USERINFO_BYTES_MAX: usize = 128;

fn is_local_part(byte: u8) -> bool {
    is_alphanumeric(byte) || matches!(byte, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_label(byte: u8) -> bool {
    is_alphanumeric(byte) || byte == b'-'
}

/// The length of the letter outside ASCII that starts at `at` (`ü`, `и`, `中`), else 0:
/// addresses may hold them in the local part and the domain (RFC 6531, IDNA).
fn letter_bytes(bytes: &[u8], at: usize) -> usize {
    let length = match byte_at(bytes, at) {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return 0,
    };
    bytes
        .get(at..at + length)
        .and_then(|encoded| std::str::from_utf8(encoded).ok())
        .and_then(|text| text.chars().next())
        .filter(|character| character.is_alphabetic())
        .map_or(0, |_| length)
}

/// Where the letter outside ASCII that ends at `end` starts, if one does.
fn letter_before(bytes: &[u8], end: usize) -> Option<usize> {
    let start = (end.saturating_sub(4)..end)
        .rev()
        .find(|&at| bytes[at] & 0xC0 != 0x80)?;
    (letter_bytes(bytes, start) == end - start && end > start).then_some(start)
}

/// Where the local part of an address that ends at `end` starts (`end` when there is none).
fn local_part_start(bytes: &[u8], end: usize) -> usize {
    let mut start = end;
    while start > 0 && end - start < LOCAL_PART_BYTES_MAX {
        if is_local_part(bytes[start - 1]) {
            start -= 1;
        } else if let Some(letter) = letter_before(bytes, start) {
            start = letter;
        } else {
            break;
        }
    }
    start
}

/// An e-mail address around the `@` at `at`, or URL credentials when the part before the
/// `@` follows `scheme://user:`. Returns the end of the domain.
pub(super) fn email(scanner: &mut Scanner<'_>, at: usize) -> Option<usize> {
    if let Some(end) = url_credentials(scanner, at) {
        return Some(end);
    }
    let bytes = scanner.bytes;
    let mut local_start = local_part_start(bytes, at);
    if local_start < at && escaped(bytes, local_start + 1) {
        local_start += 1;
    }
    while local_start < at && bytes[local_start] == b'.' {
        local_start += 1;
    }
    let local = &bytes[local_start..at];
    if local.is_empty() || local.ends_with(b".") || local.windows(2).any(|pair| pair == b"..") {
        return None;
    }
    let domain_end = domain(bytes, at + 1)?;
    scanner.push(EntityType::Email, local_start, domain_end, EMAIL_CONFIDENCE);
    Some(domain_end)
}

/// `jane.doe at contoso dot com`: an address spelled with words, ` at ` (its space before
/// at `space`) and at least one ` dot ` (either case), the labels otherwise as in an address
/// (`mail.contoso dot co dot uk`). Without a ` dot ` it is prose (`I work at contoso.com`).
/// Returns the end of the domain.
#[cold]
#[inline(never)]
pub(super) fn spelled_email(scanner: &mut Scanner<'_>, space: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let local_start = local_part_start(bytes, space);
    let local = &bytes[local_start..space];
    if local.is_empty() || local.starts_with(b".") || local.ends_with(b".") {
        return None;
    }
    let mut position = space + 4;
    let mut spelled_dots = 0;
    loop {
        let label_end = label_end(bytes, position)?;
        let label = &bytes[position..label_end];
        // `look at this dot com`, `aim at the dot org page`: prose about a site.
        if position == space + 4
            && SPELLED_DETERMINERS
                .iter()
                .any(|word| label.eq_ignore_ascii_case(word))
        {
            return None;
        }
        if bytes
            .get(label_end..label_end + 5)
            .is_some_and(|joint| joint.eq_ignore_ascii_case(b" dot "))
            && is_label(byte_at(bytes, label_end + 5))
        {
            spelled_dots += 1;
            position = label_end + 5;
        } else if byte_at(bytes, label_end) == b'.' && is_label(byte_at(bytes, label_end + 1)) {
            position = label_end + 1;
        } else {
            if spelled_dots == 0 || !spelled_top_level(label) {
                return None;
            }
            scanner.push(EntityType::Email, local_start, label_end, EMAIL_CONFIDENCE);
            return Some(label_end);
        }
        if position - space > DOMAIN_BYTES_MAX {
            return None;
        }
    }
}

/// Top-level domains of more than two letters taken after a spelled ` dot `.
const SPELLED_GENERIC_DOMAINS: &[&[u8]] = &[
    b"com", b"org", b"net", b"edu", b"gov", b"mil", b"int", b"info", b"biz", b"app", b"dev",
    b"xyz", b"online", b"site", b"tech", b"cloud", b"email",
];
/// Words that open a noun phrase, not a domain: `look at this dot com` is prose.
const SPELLED_DETERMINERS: &[&[u8]] = &[
    b"a", b"an", b"the", b"this", b"that", b"these", b"those", b"my", b"your", b"our", b"their",
    b"his", b"her", b"its", b"some", b"any", b"every", b"each",
];
/// English words that are also country codes: `we met at the dot in town` is prose.
const SPELLED_WORDS: &[&[u8]] = &[
    b"am", b"an", b"as", b"at", b"be", b"by", b"do", b"go", b"he", b"if", b"in", b"is", b"it",
    b"me", b"my", b"no", b"of", b"on", b"or", b"so", b"to", b"up", b"us", b"we",
];

/// The last label of a spelled address: a known generic domain, or two letters that are
/// not an English word.
fn spelled_top_level(label: &[u8]) -> bool {
    let known = |list: &[&[u8]]| list.iter().any(|known| label.eq_ignore_ascii_case(known));
    if label.len() == 2 {
        label.iter().all(u8::is_ascii_alphabetic) && !known(SPELLED_WORDS)
    } else {
        known(SPELLED_GENERIC_DOMAINS)
    }
}

/// Whether a domain label may start at `at`.
fn starts_label(bytes: &[u8], at: usize) -> bool {
    is_label(byte_at(bytes, at)) || letter_bytes(bytes, at) > 0
}

/// The end of a domain label starting at `start`: 1 to 63 bytes of letters (any script),
/// digits and inner hyphens.
fn label_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut end = start;
    while end - start <= LABEL_BYTES_MAX {
        if is_label(byte_at(bytes, end)) {
            end += 1;
        } else {
            match letter_bytes(bytes, end) {
                0 => break,
                length => end += length,
            }
        }
    }
    let label = &bytes[start..end];
    (!label.is_empty()
        && label.len() <= LABEL_BYTES_MAX
        && !label.starts_with(b"-")
        && !label.ends_with(b"-"))
    .then_some(end)
}

/// Letters only, of any script (a top-level domain: `com`, `рф`).
fn alphabetic(label: &[u8]) -> bool {
    label.iter().all(u8::is_ascii_alphabetic)
        || std::str::from_utf8(label).is_ok_and(|text| text.chars().all(char::is_alphabetic))
}

/// The end of a domain of two or more labels whose last is alphabetic, starting at `start`.
fn domain(bytes: &[u8], start: usize) -> Option<usize> {
    let mut position = start;
    let mut labels = 0;
    let mut valid_end = None;
    while position - start < DOMAIN_BYTES_MAX {
        let Some(label_end) = label_end(bytes, position) else {
            break;
        };
        let label = &bytes[position..label_end];
        labels += 1;
        if labels >= 2 && label.len() >= 2 && alphabetic(label) {
            valid_end = Some(label_end);
        }
        if byte_at(bytes, label_end) != b'.' || !starts_label(bytes, label_end + 1) {
            break;
        }
        position = label_end + 1;
    }
    valid_end
}

/// Bytes a URL's user name and password may hold as people write them: anything printable
/// but `/`, `@`, quotes, angle brackets and `\` (a password's `!`, `#`, `$`, `&` and `*` are
/// often left unescaped).
fn is_userinfo(byte: u8) -> bool {
    (byte > b' '
        && !matches!(
            byte,
            b'/' | b'@' | b'"' | b'\'' | b'`' | b'<' | b'>' | b'\\'
        ))
        && byte != 0x7f
}

/// A URL with a password, `scheme://user:password@host[:port]`, around the `@` at `at`: the
/// user may be empty (`redis://:password@cache`), the host any name or address
/// (`localhost`, `10.0.0.5`, `[::1]`), and a password may hold a raw `@` (the host starts
/// after the last one). A password that stands for one (`{password}`, `$DB_PASSWORD`,
/// `***`) is not reported. Returns the end of the host and port.
fn url_credentials(scanner: &mut Scanner<'_>, at: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let floor = at.saturating_sub(USERINFO_BYTES_MAX);
    let mut user_start = at;
    while user_start > floor && is_userinfo(bytes[user_start - 1]) {
        user_start -= 1;
    }
    if user_start < 3 || &bytes[user_start - 3..user_start] != b"://" {
        return None;
    }
    let scheme_end = user_start - 3;
    let mut scheme_start = scheme_end;
    while scheme_start > floor
        && (is_alphanumeric(bytes[scheme_start - 1])
            || matches!(bytes[scheme_start - 1], b'+' | b'.' | b'-'))
    {
        scheme_start -= 1;
    }
    if scheme_start == scheme_end || !bytes[scheme_start].is_ascii_alphabetic() {
        return None;
    }
    let colon = user_start
        + bytes[user_start..at]
            .iter()
            .position(|&byte| byte == b':')?;
    let mut host_start = at + 1;
    let mut host_end = url_host_end(bytes, host_start)?;
    while byte_at(bytes, host_end) == b'@' {
        host_start = host_end + 1;
        host_end = url_host_end(bytes, host_start)?;
    }
    let password = &bytes[colon + 1..host_start - 1];
    let escape = password.first() == Some(&b'%')
        && password.len() >= 3
        && is_hex(password[1])
        && is_hex(password[2]);
    if password.is_empty() || (!escape && super::secrets::placeholder(password)) {
        return None;
    }
    let end = port_end(bytes, host_end);
    scanner.push(
        EntityType::ConnectionString,
        scheme_start,
        end,
        URL_CREDENTIALS_CONFIDENCE,
    );
    Some(end)
}

/// The end of a URL's host from `start`: a name or IPv4 address (labels and dots, not
/// ending in a dot) or a bracketed IPv6 address; `None` when there is none.
fn url_host_end(bytes: &[u8], start: usize) -> Option<usize> {
    if byte_at(bytes, start) == b'[' {
        let close = run_end(bytes, start + 1, 46, |byte| {
            is_hex(byte) || matches!(byte, b':' | b'.')
        });
        return (byte_at(bytes, close) == b']' && close > start + 1).then_some(close + 1);
    }
    let mut end = run_end(bytes, start, DOMAIN_BYTES_MAX, |byte| {
        is_label(byte) || byte == b'.'
    });
    while end > start && bytes[end - 1] == b'.' {
        end -= 1;
    }
    (end > start && is_label(bytes[start])).then_some(end)
}

/// Past a `:port` after a host, if there is one.
fn port_end(bytes: &[u8], host_end: usize) -> usize {
    if byte_at(bytes, host_end) != b':' {
        return host_end;
    }
    let end = run_end(bytes, host_end + 1, 5, |byte| byte.is_ascii_digit());
    if end > host_end + 1 { end } else { host_end }
}

/// An IPv6 address from `start`: eight groups of one to four hex digits, or fewer with one
/// `::`, optionally ending in an IPv4 address. A compressed address needs two groups and a
/// decimal digit somewhere, so that `::1` and code such as `ab::cd` are not reported.
pub(super) fn ipv6(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    if start > 0
        && ((is_alphanumeric(bytes[start - 1]) && !escaped(bytes, start))
            || bytes[start - 1] == b':')
    {
        return None;
    }
    let mut position = start;
    let mut groups = 0;
    let mut compressed = false;
    let mut has_decimal = false;
    let mut end = start;
    if bytes[position..].starts_with(b"::") {
        compressed = true;
        position += 2;
        end = position;
    }
    while groups < 8 {
        let group_end = run_end(bytes, position, 5, is_hex);
        let length = group_end - position;
        if length == 0 || length > 4 {
            break;
        }
        // An embedded IPv4 address ends the address and stands for two groups.
        if byte_at(bytes, group_end) == b'.'
            && groups <= 6
            && let Some(ipv4_end) = embedded_ipv4(bytes, position)
        {
            groups += 2;
            has_decimal = true;
            end = ipv4_end;
            break;
        }
        has_decimal |= bytes[position..group_end].iter().any(u8::is_ascii_digit);
        groups += 1;
        end = group_end;
        if byte_at(bytes, group_end) != b':' {
            break;
        }
        if byte_at(bytes, group_end + 1) == b':' {
            if compressed {
                return None;
            }
            compressed = true;
            end = group_end + 2;
            position = group_end + 2;
            if !is_hex(byte_at(bytes, position)) {
                break;
            }
        } else {
            position = group_end + 1;
        }
    }
    let next = byte_at(bytes, end);
    if is_alphanumeric(next) || (next == b':' && is_hex(byte_at(bytes, end + 1))) {
        return None;
    }
    let complete = if compressed {
        (2..8).contains(&groups) && has_decimal
    } else {
        groups == 8
    };
    if !complete {
        return None;
    }
    scanner.push(EntityType::IpAddress, start, end, IPV6_CONFIDENCE);
    Some(end)
}

/// The end of a dotted-quad IPv4 address at `start`.
fn embedded_ipv4(bytes: &[u8], start: usize) -> Option<usize> {
    let mut position = start;
    for octet in 0..4 {
        let end = run_end(bytes, position, 4, |byte| byte.is_ascii_digit());
        let digits = &bytes[position..end];
        if digits.is_empty() || digits.len() > 3 || (digits.len() > 1 && digits[0] == b'0') {
            return None;
        }
        let value = digits
            .iter()
            .fold(0_u32, |value, &digit| value * 10 + u32::from(digit - b'0'));
        if value > 255 {
            return None;
        }
        if octet < 3 {
            if byte_at(bytes, end) != b'.' {
                return None;
            }
            position = end + 1;
        } else {
            position = end;
        }
    }
    Some(position)
}
