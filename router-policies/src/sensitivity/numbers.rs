//! Recognizers that start at a digit: payment cards, US SSNs, phone numbers, IPv4 addresses
//! and the numeric national ids (FR NIR, DE Steuer-ID, NL BSN, ES DNI).
//!
//! A number is read once as groups of digits joined by single separators (`4111 1111 1111
//! 1111`, `078-05-1120`, `192.168.0.1`); each interpretation then checks the group shape, the
//! separator, the check digits and, for numbers that a checksum alone does not set apart
//! (a bare 9- or 11-digit number), a context word before it. The longest prefix of the groups
//! that validates wins, so a card number followed by a year is still found.

use super::scan::{
    Scanner, byte_at, context_before, context_words_before, ends_cleanly, escaped, is_alphanumeric,
    is_digit, next_word, next_word_span, previous_word, run_end, starts_word,
};
use super::{EntityType, personal};

const GROUPS_MAX: usize = 8;
/// The most digits any numeric entity has (a 19-digit card).
const DIGITS_MAX: usize = 19;
/// How far before a number its context word may stand, in bytes.
const CONTEXT_BYTES: usize = 40;
/// How many words before a phone number its context word may stand (`call me on`).
const PHONE_CONTEXT_WORDS: usize = 3;
/// Words right after a number that label it a phone number (`723 813 266 office`).
const PHONE_LABELS: &[&str] = &[
    "phone", "tel", "mobile", "mob", "cell", "fax", "office", "home", "work", "desk", "landline",
];
/// Words right before a number that say it is not a phone number.
const NOT_PHONE_WORDS: &[&str] = &[
    "suite",
    "apt",
    "apartment",
    "unit",
    "room",
    "floor",
    "box",
    "serial",
    "sn",
    "order",
    "invoice",
    "ticket",
    "ref",
    "reference",
    "id",
    "account",
    "acct",
    "model",
    "part",
    "isbn",
    "po",
    "case",
    "tracking",
    "version",
    "build",
    "release",
];

/// Words that, one or two words after a number, make it a building number or a postcode
/// (`819 3441 rue Saint-Antoine`, `05640 1075 Barlow Street`, `40169 14 rue Marie`). Not `st`
/// (`St. Louis`) nor `via` (`via WhatsApp`).
const STREET_WORDS: &[&str] = &[
    "street",
    "avenue",
    "ave",
    "road",
    "rd",
    "boulevard",
    "blvd",
    "lane",
    "ln",
    "drive",
    "highway",
    "hwy",
    "parkway",
    "court",
    "square",
    "terrace",
    "crescent",
    "rue",
    "chemin",
    "calle",
    "avenida",
    "strasse",
    "weg",
];

const SSN_CONTEXT: &[&str] = &["ssn", "social security", "social sec"];
const PHONE_CONTEXT: &[&str] = &[
    "phone",
    "tel",
    "mobile",
    "mob",
    "cell",
    "call",
    "fax",
    "whatsapp",
    "sms",
    "desk",
    "landline",
    "reach",
    "dial",
    "text",
    "ring",
    "answering",
    "message",
    // Other languages' words (`tel` covers Telefon, teléfono, telefone; `phone` the end of
    // téléphone, as words here are runs of ASCII letters and digits).
    "celular",
    "movil",
    "handy",
];
const DE_TAX_CONTEXT: &[&str] = &["steuer", "idnr", "identifikationsnummer", "tax id", "tin"];
const NL_BSN_CONTEXT: &[&str] = &["bsn", "burgerservicenummer", "sofinummer", "sofi"];
const PL_PESEL_CONTEXT: &[&str] = &["pesel"];
const SE_PERSONAL_NUMBER_CONTEXT: &[&str] = &[
    "personnummer",
    "personnr",
    "pnr",
    "samordningsnummer",
    "personal identity number",
    "personal number",
];
const VERSION_WORDS: &[&str] = &["version", "ver", "v", "release", "build", "rev", "revision"];
/// National formats (group lengths, no trunk `0`) that are phone numbers by their shape alone
/// when they stand whole: nothing numeric joined before or after, no currency or sign.
/// Left out on purpose: `12 345 678` and `123 456 789` (thousands), `4 2 2`, `2 2 4` and
/// `2 2 2` (dates, times, lists), `3 2 4` (the SSN shape, so a sample SSN is not a phone).
const SUBSCRIBER_SHAPES: &[&[usize]] = &[
    &[3, 4],       // US and Canada local, Iceland, Estonia: 555 1234
    &[4, 4],       // Uruguay, Denmark, Singapore, Hong Kong: 9124 4004
    &[2, 6],       // Cyprus: 26 943046
    &[3, 2, 3],    // Norway: 958 08 922
    &[2, 2, 2, 2], // Denmark: 40-95-78-17 (dashes only: spaced, it is a list)
    &[2, 3, 2, 2], // Poland: 79 300 85 25
    &[3, 2, 2, 2], // Switzerland, Germany without the trunk 0: 412 34 56 78
    &[2, 3, 3, 4], // Portugal: 21 259 240 8721
];

const CARD_CONFIDENCE: f32 = 0.95;
const SSN_CONFIDENCE: f32 = 0.85;
const SSN_SPACED_CONFIDENCE: f32 = 0.65;
const SSN_CONTEXT_CONFIDENCE: f32 = 0.75;
const IPV4_CONFIDENCE: f32 = 0.85;
const PHONE_INTERNATIONAL_CONFIDENCE: f32 = 0.8;
const PHONE_NANP_CONFIDENCE: f32 = 0.7;
const PHONE_NATIONAL_CONFIDENCE: f32 = 0.6;
const PHONE_SUBSCRIBER_CONFIDENCE: f32 = 0.5;
/// How far around a subscriber number blanks are skipped to find what it stands between.
const SPACES_MAX: usize = 16;
const NATIONAL_ID_CONFIDENCE: f32 = 0.9;
const NATIONAL_ID_CONTEXT_CONFIDENCE: f32 = 0.85;

/// Digit groups read from one start.
struct Groups {
    count: usize,
    /// Byte spans of the groups.
    spans: [(usize, usize); GROUPS_MAX],
    /// `separators[k]`: the byte between group `k - 1` and group `k`.
    separators: [u8; GROUPS_MAX],
}

impl Groups {
    /// Reads digit groups from `start` joined by one of `separators` each.
    fn read(bytes: &[u8], start: usize, separators: &[u8]) -> Groups {
        let mut groups = Groups {
            count: 0,
            spans: [(0, 0); GROUPS_MAX],
            separators: [0; GROUPS_MAX],
        };
        let mut position = start;
        let mut digits = 0;
        while groups.count < GROUPS_MAX {
            let end = run_end(bytes, position, DIGITS_MAX + 1, is_digit);
            if end == position {
                break;
            }
            groups.spans[groups.count] = (position, end);
            groups.count += 1;
            digits += end - position;
            let separator = byte_at(bytes, end);
            if groups.count == GROUPS_MAX
                || digits > DIGITS_MAX
                || !separators.contains(&separator)
                || !is_digit(byte_at(bytes, end + 1))
            {
                break;
            }
            groups.separators[groups.count] = separator;
            position = end + 1;
        }
        groups
    }

    fn length(&self, group: usize) -> usize {
        self.spans[group].1 - self.spans[group].0
    }

    /// The separator used between the first `count` groups, if it is the same throughout
    /// (`Some(0)` for a single group).
    fn uniform_separator(&self, count: usize) -> Option<u8> {
        if count == 1 {
            return Some(0);
        }
        let separator = self.separators[1];
        self.separators[2..count]
            .iter()
            .all(|&other| other == separator)
            .then_some(separator)
    }

    /// The digits of the first `count` groups, concatenated, or `None` when there are more
    /// than [`DIGITS_MAX`].
    fn digits(&self, bytes: &[u8], count: usize) -> Option<Digits> {
        let mut digits = Digits {
            values: [0; DIGITS_MAX],
            length: 0,
        };
        for &(start, end) in &self.spans[..count] {
            for &byte in &bytes[start..end] {
                *digits.values.get_mut(digits.length)? = byte - b'0';
                digits.length += 1;
            }
        }
        Some(digits)
    }
}

/// Up to [`DIGITS_MAX`] decimal digits.
#[derive(Clone, Copy)]
struct Digits {
    values: [u8; DIGITS_MAX],
    length: usize,
}

impl Digits {
    fn as_slice(&self) -> &[u8] {
        &self.values[..self.length]
    }

    /// The number formed by the digits `from..to`.
    fn number(&self, from: usize, to: usize) -> u64 {
        self.values[from..to]
            .iter()
            .fold(0, |number, &digit| number * 10 + u64::from(digit))
    }

    fn all_same(&self) -> bool {
        self.as_slice().iter().all(|&digit| digit == self.values[0])
    }
}

/// Card numbers written into a longer token, where the scan of whole numbers does not look:
/// a path (`/cards/4539148803436467/charge`), a file or key name
/// (`receipt_4539148803436467.pdf`), or a number with more after it (`4539148803436467/0927`,
/// `…467-visa`). Each whole run of 12 to 19 digits in `start..end` that no letter touches, no
/// hyphen joins to what comes before, and that is neither part of a decimal number nor an
/// address's local part is checked as a card (issuer, length and Luhn, as
/// everywhere). Returns the end of the last card found.
pub(super) fn joined_cards(scanner: &mut Scanner<'_>, start: usize, end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let mut found = None;
    let mut position = start;
    while position < end {
        if !bytes[position].is_ascii_digit() {
            position += 1;
            continue;
        }
        let digits_end = run_end(bytes, position, end - position, |byte| {
            byte.is_ascii_digit()
        });
        let length = digits_end - position;
        let before = byte_at(bytes, position.wrapping_sub(1));
        let after = byte_at(bytes, digits_end);
        // `ORD-4111111111111111`, `2024-…`: joined by a hyphen, the digits end an identifier.
        let touches_letter = before.is_ascii_alphabetic()
            || before == b'-'
            || after.is_ascii_alphabetic()
            || after == b'@';
        // `0.4539148803436467`, `4539148803436467.5`: decimals of a measurement.
        let decimal = (matches!(before, b'.' | b',')
            && is_digit(byte_at(bytes, position.wrapping_sub(2))))
            || (matches!(after, b'.' | b',') && is_digit(byte_at(bytes, digits_end + 1)));
        if (12..=19).contains(&length) && !touches_letter && !decimal {
            let mut digits = Digits {
                values: [0; DIGITS_MAX],
                length,
            };
            for (value, &byte) in digits.values.iter_mut().zip(&bytes[position..digits_end]) {
                *value = byte - b'0';
            }
            if card(&digits) {
                scanner.push(
                    EntityType::CreditCard,
                    position,
                    digits_end,
                    CARD_CONFIDENCE,
                );
                found = Some(digits_end);
            }
        }
        position = digits_end;
    }
    found
}

/// Recognizers for a run that starts with a digit at `start` (`word_end`: the run's end).
pub(super) fn scan(scanner: &mut Scanner<'_>, start: usize, word_end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    // `abc.123` continues another token.
    if start >= 2 && bytes[start - 1] == b'.' && is_alphanumeric(bytes[start - 2]) {
        return None;
    }
    if let Some(end) = personal::date_of_birth(scanner, start, word_end) {
        return Some(end);
    }
    if let Some(end) = spanish_dni(scanner, start, word_end) {
        return Some(end);
    }
    if let Some(end) = slashed_phone(scanner, start) {
        return Some(end);
    }
    let groups = Groups::read(bytes, start, b" -.");
    // The shortest entity here is an IPv4 address (four digits); most numbers in prose
    // (`12 services`, `840 ms`) stop at this check.
    let total: usize = (0..groups.count).map(|group| groups.length(group)).sum();
    if total < 4 {
        return None;
    }
    for count in (1..=groups.count).rev() {
        let Some(separator) = groups.uniform_separator(count) else {
            continue;
        };
        let Some(digits) = groups.digits(bytes, count) else {
            continue;
        };
        let end = groups.spans[count - 1].1;
        if separator == b'.' && count == 4 && ipv4(bytes, start, &groups, &digits, end) {
            scanner.push(EntityType::IpAddress, start, end, IPV4_CONFIDENCE);
            return Some(end);
        }
        if !ends_cleanly(bytes, end) {
            // `555-234-5678x123`, `555-234-5678-Fax`: only a phone number goes on.
            if let Some(extended) = phone_end(bytes, end)
                && let Some(confidence) =
                    national_phone(bytes, start, &groups, count, &digits, separator)
            {
                scanner.push(EntityType::Phone, start, extended, confidence);
                return Some(extended);
            }
            continue;
        }
        let found = if separator == b'.' {
            // `4111.1111.1111.1111`: a card in groups of four, else perhaps a phone number.
            (card_grouping(&groups, count, separator)
                && card(&digits)
                && !continues_number(bytes, start))
            .then_some((EntityType::CreditCard, CARD_CONFIDENCE))
            .or_else(|| {
                (!continues_number(bytes, start) && !after_version_word(bytes, start))
                    .then(|| us_ssn(bytes, start, &groups, count, &digits, separator))
                    .flatten()
                    .map(|confidence| (EntityType::UsSsn, confidence))
            })
            .or_else(|| {
                national_phone(bytes, start, &groups, count, &digits, separator)
                    .map(|confidence| (EntityType::Phone, confidence))
            })
        } else {
            interpret(bytes, start, &groups, count, &digits, separator)
        };
        if let Some((entity, confidence)) = found {
            let end = match entity {
                EntityType::Phone => phone_end(bytes, end).unwrap_or(end),
                _ => end,
            };
            scanner.push(entity, start, end, confidence);
            return Some(end);
        }
    }
    None
}

/// What the first `count` groups (joined by `separator`, 0 for none) are, if anything.
fn interpret(
    bytes: &[u8],
    start: usize,
    groups: &Groups,
    count: usize,
    digits: &Digits,
    separator: u8,
) -> Option<(EntityType, f32)> {
    // A number that continues another (`4686 5086 3765 9915` after a Luhn-invalid card
    // number's first group) is a card only with 15 digits or more.
    let continues = continues_number(bytes, start);
    if card_grouping(groups, count, separator)
        && card(digits)
        && (!continues || digits.length >= 15)
    {
        return Some((EntityType::CreditCard, CARD_CONFIDENCE));
    }
    if continues {
        return None;
    }
    if let Some(confidence) = us_ssn(bytes, start, groups, count, digits, separator) {
        return Some((EntityType::UsSsn, confidence));
    }
    if french_nir_grouping(groups, count, separator) && french_nir(digits) {
        return Some((EntityType::FrNir, NATIONAL_ID_CONFIDENCE));
    }
    if let Some(confidence) = national_phone(bytes, start, groups, count, digits, separator) {
        return Some((EntityType::Phone, confidence));
    }
    let contiguous = count == 1;
    let de_spaced = count == 4
        && separator == b' '
        && [2, 3, 3, 3]
            .iter()
            .enumerate()
            .all(|(group, &length)| groups.length(group) == length);
    if (contiguous || de_spaced)
        && german_tax_id(digits)
        && context_before(bytes, start, CONTEXT_BYTES, DE_TAX_CONTEXT)
    {
        return Some((EntityType::DeTaxId, NATIONAL_ID_CONTEXT_CONFIDENCE));
    }
    if contiguous
        && dutch_bsn(digits)
        && context_before(bytes, start, CONTEXT_BYTES, NL_BSN_CONTEXT)
    {
        return Some((EntityType::NlBsn, NATIONAL_ID_CONTEXT_CONFIDENCE));
    }
    if contiguous
        && polish_pesel(digits)
        && context_before(bytes, start, CONTEXT_BYTES, PL_PESEL_CONTEXT)
    {
        return Some((EntityType::PlPesel, NATIONAL_ID_CONTEXT_CONFIDENCE));
    }
    // `811218-9876`, `19811218-9876`, or the digits alone.
    let se_shape = match (count, separator) {
        (1, _) => matches!(digits.length, 10 | 12),
        (2, b'-') => matches!((groups.length(0), groups.length(1)), (6 | 8, 4)),
        _ => false,
    };
    if se_shape
        && swedish_personal_number(digits)
        && context_before(bytes, start, CONTEXT_BYTES, SE_PERSONAL_NUMBER_CONTEXT)
    {
        return Some((EntityType::SePersonalNumber, NATIONAL_ID_CONTEXT_CONFIDENCE));
    }
    None
}

/// Four decimal octets, no leading zeros, not a version (`version 1.2.3.4`) and not part of a
/// longer dotted number. `/` (a prefix length, a path) and `:` (a port) may follow.
fn ipv4(bytes: &[u8], start: usize, groups: &Groups, digits: &Digits, end: usize) -> bool {
    let mut position = 0;
    for group in 0..4 {
        let length = groups.length(group);
        if length > 3 || (length > 1 && digits.values[position] == 0) {
            return false;
        }
        if digits.number(position, position + length) > 255 {
            return false;
        }
        position += length;
    }
    let next = byte_at(bytes, end);
    if is_alphanumeric(next)
        || (matches!(next, b'.' | b'-' | b'_') && is_alphanumeric(byte_at(bytes, end + 1)))
    {
        return false;
    }
    !after_version_word(bytes, start)
}

/// `version 1.2.3.4`, `rev 123.45.6789`: the number is a version.
fn after_version_word(bytes: &[u8], start: usize) -> bool {
    let word = previous_word(bytes, start);
    VERSION_WORDS
        .iter()
        .any(|version| word.eq_ignore_ascii_case(version.as_bytes()))
}

/// Card digits grouped as printed: contiguous, or 4-4-4-4(-1..4), 4-6-5 or 4-6-4, joined by
/// spaces or dashes.
fn card_grouping(groups: &Groups, count: usize, separator: u8) -> bool {
    match separator {
        0 => true,
        b' ' | b'-' | b'.' => {
            let lengths: [usize; GROUPS_MAX] = std::array::from_fn(|group| groups.length(group));
            let lengths = &lengths[..count];
            let fours = lengths[..count - 1].iter().all(|&length| length == 4)
                && (1..=4).contains(&lengths[count - 1]);
            count >= 3 && (fours || lengths == [4, 6, 5] || lengths == [4, 6, 4])
        }
        _ => false,
    }
}

/// Issuer prefixes: digits of the prefix, lowest and highest prefix, and the card lengths.
const ISSUERS: &[(usize, u64, u64, usize, usize)] = &[
    (1, 4, 4, 13, 19),       // Visa (13, 16, 19 checked below)
    (2, 51, 55, 16, 16),     // Mastercard
    (4, 2221, 2720, 16, 16), // Mastercard 2-series
    (2, 34, 34, 15, 15),     // American Express
    (2, 37, 37, 15, 15),     // American Express
    (4, 6011, 6011, 16, 19), // Discover
    (3, 644, 649, 16, 19),   // Discover
    (2, 65, 65, 16, 19),     // Discover, RuPay
    (3, 300, 305, 14, 19),   // Diners Club International
    (2, 36, 36, 14, 19),     // Diners Club International
    (2, 38, 39, 14, 19),     // Diners Club, Carte Blanche
    (2, 35, 35, 16, 19),     // JCB
    (4, 1800, 1800, 15, 15), // JCB (15 digits)
    (4, 2131, 2131, 15, 15), // JCB (15 digits)
    (2, 62, 62, 16, 19),     // UnionPay
    (4, 2200, 2204, 16, 19), // Mir
    (2, 50, 50, 12, 19),     // Maestro
    (2, 56, 58, 12, 19),     // Maestro
    (2, 60, 60, 16, 19),     // RuPay, Maestro
    (2, 63, 63, 12, 19),     // Maestro
    (2, 67, 67, 12, 19),     // Maestro
    (4, 604, 604, 12, 19),   // Maestro (UK, 0604)
];

/// Luhn, a known issuer's prefix and one of its lengths, and not all one digit.
fn card(digits: &Digits) -> bool {
    let length = digits.length;
    if !(12..=19).contains(&length) || digits.all_same() {
        return false;
    }
    let issuer = ISSUERS
        .iter()
        .any(|&(prefix_digits, low, high, shortest, longest)| {
            let prefix = digits.number(0, prefix_digits);
            (low..=high).contains(&prefix) && (shortest..=longest).contains(&length)
        });
    let visa_length = digits.values[0] != 4 || matches!(length, 13 | 16 | 19);
    issuer && visa_length && luhn(digits.as_slice())
}

pub(super) fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(position, &digit)| {
            let digit = u32::from(digit);
            if position % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Numbers that are printed as SSNs but are not ones: samples from advertising and
/// documentation, and the all-too-common test number.
const SSN_SAMPLES: &[u64] = &[78_051_120, 219_099_999, 123_456_789];

/// `AAA-GG-SSSS` (dashes, or spaces at lower confidence), or nine digits after a context word.
fn us_ssn(
    bytes: &[u8],
    start: usize,
    groups: &Groups,
    count: usize,
    digits: &Digits,
    separator: u8,
) -> Option<f32> {
    let confidence = match (count, separator) {
        (3, b'-' | b' ' | b'.')
            if groups.length(0) == 3 && groups.length(1) == 2 && groups.length(2) == 4 =>
        {
            if separator == b'-' {
                SSN_CONFIDENCE
            } else {
                SSN_SPACED_CONFIDENCE
            }
        }
        (1, _)
            if digits.length == 9 && context_before(bytes, start, CONTEXT_BYTES, SSN_CONTEXT) =>
        {
            SSN_CONTEXT_CONFIDENCE
        }
        _ => return None,
    };
    let area = digits.number(0, 3);
    let group = digits.number(3, 5);
    let serial = digits.number(5, 9);
    let valid = area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && !digits.all_same()
        && !SSN_SAMPLES.contains(&digits.number(0, 9));
    valid.then_some(confidence)
}

/// Fifteen digits, contiguous or spaced with a single-digit first group (`1 84 12 76 451 089 46`).
fn french_nir_grouping(groups: &Groups, count: usize, separator: u8) -> bool {
    count == 1 || (separator == b' ' && groups.length(0) == 1)
}

/// Sex digit, month, and the key: 97 minus the first 13 digits modulo 97.
fn french_nir(digits: &Digits) -> bool {
    if digits.length != 15 || !matches!(digits.values[0], 1 | 2 | 3 | 7 | 8) {
        return false;
    }
    let month = digits.number(3, 5);
    let month_valid =
        (1..=12).contains(&month) || (20..=42).contains(&month) || (50..=99).contains(&month);
    month_valid && 97 - digits.number(0, 13) % 97 == digits.number(13, 15)
}

/// A national number: NANP (`555-123-4567`, `1-800-555-0199`), a trunk-prefix `0` number in
/// groups (`020 7946 0958`, `01 23 45 67 89`), bare digits after a phone context word, or a
/// whole number in a national subscriber format ([`SUBSCRIBER_SHAPES`]: `958 08 922`).
fn national_phone(
    bytes: &[u8],
    start: usize,
    groups: &Groups,
    count: usize,
    digits: &Digits,
    separator: u8,
) -> Option<f32> {
    if digits.length < 6 || continues_number(bytes, start) {
        return None;
    }
    let lengths: [usize; GROUPS_MAX] = std::array::from_fn(|group| groups.length(group));
    let lengths = &lengths[..count];
    let end = groups.spans[count - 1].1;
    let whole = count == groups.count;
    let confidence = phone_shape(lengths, digits, separator)
        .or_else(|| {
            // Near a phone word (`Phone:\n439 4166`, `call me on 61 60 34`, `723 813 266
            // office`), 6 to 12 digits in groups of two or more, or contiguous; not a date.
            let date = matches!(lengths, [4, 2, 2] | [2, 2, 4]);
            let shaped = digits.length <= 12 && !date && lengths.iter().all(|&length| length >= 2);
            (shaped && phone_context(bytes, start, end)).then_some(PHONE_NATIONAL_CONFIDENCE)
        })
        .or_else(|| {
            (whole && subscriber_number(bytes, start, end, lengths, digits, separator))
                .then_some(PHONE_SUBSCRIBER_CONFIDENCE)
        })?;
    let previous = previous_word(bytes, start);
    let vetoed = NOT_PHONE_WORDS
        .iter()
        .any(|word| previous.eq_ignore_ascii_case(word.as_bytes()));
    // A NANP number is strong enough to stand before a street name (`314-555-0123 Main St`).
    let address = confidence < PHONE_NANP_CONFIDENCE && street_follows(bytes, end);
    (!vetoed && !address).then_some(confidence)
}

/// Whether one of the two words after `end` is a [`STREET_WORDS`] word.
fn street_follows(bytes: &[u8], end: usize) -> bool {
    let street = |word: &[u8]| {
        STREET_WORDS
            .iter()
            .any(|street| word.eq_ignore_ascii_case(street.as_bytes()))
    };
    let first = next_word_span(bytes, end);
    !first.is_empty() && (street(&bytes[first.clone()]) || street(next_word(bytes, first.end)))
}

/// A phone number by its shape alone: NANP (`555-234-5678`, `1-800-555-0199`,
/// `001-555-234-5678` from abroad; spaced groups also need valid area code and exchange
/// digits) or a trunk-prefix `0` number in groups (`020 7946 0958`, `01 23 45 67 89`).
fn phone_shape(lengths: &[usize], digits: &Digits, separator: u8) -> Option<f32> {
    let nanp_offset = match lengths {
        [3, 3, 4] => Some(0),
        [1, 3, 3, 4] if digits.values[0] == 1 => Some(1),
        [3, 3, 3, 4] if digits.values[..3] == [0, 0, 1] || digits.values[..3] == [0, 1, 1] => {
            Some(3)
        }
        _ => None,
    };
    if let Some(offset) = nanp_offset {
        if separator != b' ' && !digits.all_same() {
            return Some(PHONE_NANP_CONFIDENCE);
        }
        if nanp(digits, offset) {
            return Some(PHONE_NATIONAL_CONFIDENCE);
        }
    }
    // Nine digits and a six-digit area code are German (`030 70 25 13`, `039742 34 87`); the
    // SSN shape (`078-05-1120`), a ZIP+4 code (`05640-1075`) and a leading date (`01 02 2024
    // ...`) are not phones.
    let trunk = digits.values[0] == 0 && digits.values[1] != 0;
    (lengths.len() >= 2
        && trunk
        && (9..=12).contains(&digits.length)
        && (2..=6).contains(&lengths[0])
        && lengths.iter().all(|&length| length >= 2)
        && lengths != [3, 2, 4]
        && lengths != [5, 4]
        && !lengths.starts_with(&[2, 2, 4]))
    .then_some(PHONE_NATIONAL_CONFIDENCE)
}

/// A subscriber number in one of the [`SUBSCRIBER_SHAPES`] (`lengths`, joined by spaces or
/// dashes), standing alone between `start` and `end`. Not a round figure (`500-1000`), a
/// range (`120-1250`), a pair of years (`2019 2020`) or of times (`0900 1700`), not after a
/// currency sign, a sign or a joining character (`$555 1234`, `-555 1234`, `#555 1234`), not
/// among other numbers or in brackets (`[474 5498]`), and not before a capitalized word or `%`.
fn subscriber_number(
    bytes: &[u8],
    start: usize,
    end: usize,
    lengths: &[usize],
    digits: &Digits,
    separator: u8,
) -> bool {
    if !matches!(separator, b' ' | b'-')
        || !SUBSCRIBER_SHAPES.contains(&lengths)
        || (separator == b' ' && lengths == [2, 2, 2, 2])
        || digits.values[0] == 0
        || (lengths == [3, 4] && digits.values[0] == 1)
        || digits.all_same()
    {
        return false;
    }
    let before = start.checked_sub(1).map_or(b' ', |index| bytes[index]);
    let free_before = before.is_ascii_whitespace()
        || matches!(before, b'(' | b'"' | b'\'')
        || escaped(bytes, start);
    // In a table or an array (`[474 5498]`, `x = 474 5498`, `12  474 5498  7`) it is data.
    let blank = |byte: &&u8| matches!(**byte, b' ' | b'\t');
    let previous = bytes[start.saturating_sub(SPACES_MAX)..start]
        .iter()
        .rev()
        .find(|byte| !blank(byte));
    let next = bytes[end..bytes.len().min(end + SPACES_MAX)]
        .iter()
        .find(|byte| !blank(byte));
    let in_data = previous
        .is_some_and(|&byte| is_digit(byte) || matches!(byte, b'[' | b'{' | b'='))
        || next.is_some_and(|&byte| is_digit(byte) || matches!(byte, b']' | b'}'));
    // `9335 2733 Jasper Ave`: a number before a name is a building number or a postcode.
    let named = byte_at(bytes, end) == b' ' && byte_at(bytes, end + 1).is_ascii_uppercase();
    if !free_before || in_data || named || byte_at(bytes, end) == b'%' {
        return false;
    }
    let mut offset = 0;
    let mut round = true;
    let mut values = [0_u64; 4];
    for (index, &length) in lengths.iter().enumerate() {
        round &= digits.values[offset + length - 1] == 0;
        if let Some(value) = values.get_mut(index) {
            *value = digits.number(offset, offset + length);
        }
        offset += length;
    }
    if round {
        return false;
    }
    // A rising pair with the same leading digit or a round end is a range (`3456-3478`,
    // `999-1500`).
    let range = separator == b'-'
        && lengths.len() == 2
        && values[1] > values[0]
        && (digits.values[0] == digits.values[lengths[0]]
            || values[0] % 100 == 0
            || values[1] % 100 == 0);
    let year = |value: u64| (1900..=2099).contains(&value);
    let time = |value: u64| value / 100 <= 23 && value % 100 <= 59;
    let years_or_times = lengths == [4, 4]
        && (year(values[0]) || year(values[1]) || (time(values[0]) && time(values[1])));
    !range && !years_or_times
}

/// `Tel. 030/901820`, `089/12345678`: the German way of writing an area code (trunk `0`
/// and one to four digits), a slash, then the subscriber's three to nine digits; a phone
/// word must be near, since a slash joins other numbers too.
fn slashed_phone(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    if bytes[start] != b'0' {
        return None;
    }
    let area_end = run_end(bytes, start, 6, is_digit);
    if !(2..=5).contains(&(area_end - start)) || byte_at(bytes, area_end) != b'/' {
        return None;
    }
    let end = run_end(bytes, area_end + 1, 10, is_digit);
    if !(3..=9).contains(&(end - area_end - 1))
        || !ends_cleanly(bytes, end)
        || continues_number(bytes, start)
        || !phone_context(bytes, start, end)
    {
        return None;
    }
    scanner.push(EntityType::Phone, start, end, PHONE_NATIONAL_CONFIDENCE);
    Some(end)
}

/// A phone word among the three words before the number, or a phone label right after it.
fn phone_context(bytes: &[u8], start: usize, end: usize) -> bool {
    let next = next_word(bytes, end);
    PHONE_LABELS
        .iter()
        .any(|word| next.eq_ignore_ascii_case(word.as_bytes()))
        || context_words_before(bytes, start, PHONE_CONTEXT_WORDS, PHONE_CONTEXT)
}

/// Where a phone number that ends at `end` really ends: after an extension (`x123`,
/// ` ext. 123`), or at `end` when it ends cleanly or a label is joined to it (`-Fax`).
fn phone_end(bytes: &[u8], end: usize) -> Option<usize> {
    let rest = &bytes[end..];
    let marker = [
        &b"x"[..],
        b" x",
        b" x ",
        b" ext ",
        b" ext. ",
        b" ext.",
        b"ext",
        b"ext.",
    ]
    .into_iter()
    .filter(|marker| rest.len() > marker.len() && rest[..marker.len()].eq_ignore_ascii_case(marker))
    .map(<[u8]>::len)
    .max();
    let clean = |end: usize| {
        ends_cleanly(bytes, end)
            || (byte_at(bytes, end) == b'-' && byte_at(bytes, end + 1).is_ascii_alphabetic())
    };
    if let Some(marker) = marker {
        let digits_start = end + marker;
        let digits_end = run_end(bytes, digits_start, 6, is_digit);
        if (1..=5).contains(&(digits_end - digits_start)) && clean(digits_end) {
            return Some(digits_end);
        }
    }
    clean(end).then_some(end)
}

/// Whether the number at `start` continues a longer one (`DE88 3704 0044 0532 0130 00`):
/// a separator and a digit stand before it. Phone shapes are weak, so they need a start.
fn continues_number(bytes: &[u8], start: usize) -> bool {
    start >= 2 && matches!(bytes[start - 1], b' ' | b'-' | b'.') && is_digit(bytes[start - 2])
}

/// A North American number from `offset`: area code and exchange start with 2-9.
fn nanp(digits: &Digits, offset: usize) -> bool {
    digits.length == offset + 10
        && digits.values[offset] >= 2
        && digits.values[offset + 3] >= 2
        && !digits.all_same()
}

/// ISO 7064 MOD 11,10 check digit, and the Steuer-ID's digit counts: in the first ten
/// digits one digit occurs twice or three times and no other more than once.
fn german_tax_id(digits: &Digits) -> bool {
    if digits.length != 11 || digits.values[0] == 0 {
        return false;
    }
    let mut counts = [0_u8; 10];
    for &digit in &digits.values[..10] {
        counts[usize::from(digit)] += 1;
    }
    let repeated = counts.iter().filter(|&&count| count >= 2).count();
    let most = counts.iter().copied().max().unwrap_or(0);
    if repeated != 1 || most > 3 {
        return false;
    }
    let mut product = 10_u32;
    for &digit in &digits.values[..10] {
        let mut sum = (u32::from(digit) + product) % 10;
        if sum == 0 {
            sum = 10;
        }
        product = (sum * 2) % 11;
    }
    let check = (11 - product) % 10;
    check == u32::from(digits.values[10])
}

/// The BSN 11-test: weights 9..2 and -1.
fn dutch_bsn(digits: &Digits) -> bool {
    if digits.length != 9 || digits.all_same() {
        return false;
    }
    let weighted: i64 = digits.values[..8]
        .iter()
        .zip((2..=9).rev())
        .map(|(&digit, weight)| i64::from(digit) * weight)
        .sum::<i64>()
        - i64::from(digits.values[8]);
    weighted % 11 == 0
}

/// A PESEL: eleven digits whose first six are a birth date (the month carries the century:
/// +80 for the 1800s, +20 for the 2000s, +40, +60) and whose last is the check digit of
/// weights 1, 3, 7, 9 repeated.
fn polish_pesel(digits: &Digits) -> bool {
    if digits.length != 11 || digits.all_same() {
        return false;
    }
    let month = digits.number(2, 4) % 20;
    let day = digits.number(4, 6);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return false;
    }
    let sum: u64 = digits.values[..10]
        .iter()
        .zip([1, 3, 7, 9].iter().cycle())
        .map(|(&digit, &weight)| u64::from(digit) * weight)
        .sum();
    (10 - sum % 10) % 10 == u64::from(digits.values[10])
}

/// A Swedish personal number, `YYMMDD-NNNC` or with the century (`YYYYMMDD…`): a birth
/// date (a coordination number adds 60 to the day) and the Luhn check over the ten digits
/// from the two-digit year on.
fn swedish_personal_number(digits: &Digits) -> bool {
    let values = match digits.length {
        10 => &digits.values[..10],
        12 => &digits.values[2..12],
        _ => return false,
    };
    if values.iter().all(|&digit| digit == values[0]) {
        return false;
    }
    let month = values[2] * 10 + values[3];
    let day = values[4] * 10 + values[5];
    let day = if day > 60 { day - 60 } else { day };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return false;
    }
    let sum: u32 = values
        .iter()
        .enumerate()
        .map(|(index, &digit)| {
            let doubled = if index % 2 == 0 { digit * 2 } else { digit };
            u32::from(doubled / 10 + doubled % 10)
        })
        .sum();
    sum.is_multiple_of(10)
}

pub(super) const DNI_LETTERS: &[u8; 23] = b"TRWAGMYFPDXBNJZSQVHLCKE";

/// A DNI: eight digits and the check letter, `12345678Z` or `12345678-Z`.
fn spanish_dni(scanner: &mut Scanner<'_>, start: usize, word_end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let digits_end = run_end(bytes, start, 9, is_digit);
    if digits_end - start != 8 {
        return None;
    }
    let letter_at = if bytes.get(digits_end) == Some(&b'-') {
        digits_end + 1
    } else {
        digits_end
    };
    let end = letter_at + 1;
    if end != word_end {
        return None;
    }
    let letter = byte_at(bytes, letter_at);
    let number = bytes[start..digits_end]
        .iter()
        .fold(0_usize, |number, &digit| {
            number * 10 + usize::from(digit - b'0')
        });
    if letter != DNI_LETTERS[number % 23] || !ends_cleanly(bytes, end) {
        return None;
    }
    scanner.push(EntityType::EsDni, start, end, NATIONAL_ID_CONFIDENCE);
    Some(end)
}

/// An E.164 number: `+`, a country code, 9 to 15 digits in all, in groups joined by spaces,
/// dashes, dots or a parenthesized group (`+44 (0)20 7946 0958`, `+1-555-123-4567`).
pub(super) fn international_phone(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    if !starts_word(bytes, start) {
        return None;
    }
    let first = byte_at(bytes, start + 1);
    if !is_digit(first) || first == b'0' {
        return None;
    }
    let mut position = start + 1;
    let mut digits = 0;
    let mut end = start + 1;
    let mut groups = 0;
    loop {
        if bytes.get(position) == Some(&b'(') {
            // `(0)` is a trunk prefix that is not dialled from abroad; `(20)` an area code.
            let inner_end = run_end(bytes, position + 1, 5, is_digit);
            if inner_end == position + 1 || byte_at(bytes, inner_end) != b')' {
                break;
            }
            let inner = &bytes[position + 1..inner_end];
            if inner != b"0" {
                digits += inner.len();
            }
            position = inner_end + 1;
            if byte_at(bytes, position) == b' ' {
                position += 1;
            }
            continue;
        }
        let group_end = run_end(bytes, position, 16, is_digit);
        if group_end == position {
            break;
        }
        digits += group_end - position;
        groups += 1;
        end = group_end;
        if digits > 15 || groups > GROUPS_MAX {
            return None;
        }
        let separator = byte_at(bytes, group_end);
        let after = byte_at(bytes, group_end + 1);
        if matches!(separator, b' ' | b'-' | b'.') && (is_digit(after) || after == b'(') {
            position = group_end + 1;
        } else {
            break;
        }
    }
    if !(9..=15).contains(&digits) {
        return None;
    }
    let end = phone_end(bytes, end)?;
    scanner.push(
        EntityType::Phone,
        start,
        end,
        PHONE_INTERNATIONAL_CONFIDENCE,
    );
    Some(end)
}

/// `(555) 123-4567` or `(020) 7946 0958`: an area code in parentheses and the number.
pub(super) fn parenthesized_phone(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    if !starts_word(bytes, start) {
        return None;
    }
    let area_end = run_end(bytes, start + 1, 6, is_digit);
    let area_length = area_end - (start + 1);
    if !(1..=5).contains(&area_length) || byte_at(bytes, area_end) != b')' {
        return None;
    }
    let mut rest = area_end + 1;
    if byte_at(bytes, rest) == b' ' {
        rest += 1;
    }
    if !is_digit(byte_at(bytes, rest)) {
        return None;
    }
    let groups = Groups::read(bytes, rest, b" -.");
    let area = &bytes[start + 1..area_end];
    for count in (1..=groups.count).rev() {
        let end = groups.spans[count - 1].1;
        let Some(digits) = groups.digits(bytes, count) else {
            continue;
        };
        if groups.uniform_separator(count).is_none() {
            continue;
        }
        let Some(end) = phone_end(bytes, end) else {
            continue;
        };
        let lengths: [usize; GROUPS_MAX] = std::array::from_fn(|group| groups.length(group));
        let nanp = area_length == 3
            && area[0] >= b'2'
            && digits.values[0] >= 2
            && (lengths[..count] == [3, 4] || (count == 1 && digits.length == 7));
        let total = area_length + digits.length;
        let trunk = area[0] == b'0'
            && area.get(1).is_some_and(|&digit| digit != b'0')
            && (10..=12).contains(&total);
        // `(73) 4746-3459`, `(1) 995-8140`: an area code and a grouped number.
        let grouped = count >= 2 && (8..=11).contains(&total);
        if nanp || trunk || grouped {
            let confidence = if nanp {
                PHONE_NANP_CONFIDENCE
            } else {
                PHONE_NATIONAL_CONFIDENCE
            };
            scanner.push(EntityType::Phone, start, end, confidence);
            return Some(end);
        }
    }
    None
}
