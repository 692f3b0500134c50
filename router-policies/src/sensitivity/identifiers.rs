//! Recognizers that start at an upper-case letter: IBANs, UK national insurance numbers,
//! Spanish NIEs, Italian fiscal codes and AWS access key ids.

use super::EntityType;
use super::numbers::DNI_LETTERS;
use super::scan::{Scanner, byte_at, ends_cleanly, is_alphanumeric, is_digit, run_end};

const IBAN_CONFIDENCE: f32 = 0.95;
const NINO_CONFIDENCE: f32 = 0.8;
const NIE_CONFIDENCE: f32 = 0.9;
const FISCAL_CODE_CONFIDENCE: f32 = 0.95;
const AWS_ACCESS_KEY_CONFIDENCE: f32 = 0.9;

/// The longest IBAN (Russia), in characters.
const IBAN_LENGTH_MAX: usize = 34;

/// IBAN lengths by country, from the SWIFT IBAN registry.
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BI", 27),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DJ", 27),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FK", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"LY", 25),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MN", 20),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NI", 28),
    (b"NL", 18),
    (b"NO", 15),
    (b"OM", 23),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"RU", 33),
    (b"SA", 24),
    (b"SC", 31),
    (b"SD", 18),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"SO", 23),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
    (b"YE", 30),
];

/// Prefixes of AWS access key ids: long-term users (`AKIA`), temporary credentials
/// (`ASIA`), and the other unique-id prefixes that appear in policies and logs.
const AWS_KEY_PREFIXES: &[&[u8; 4]] = &[
    b"AKIA", b"ASIA", b"ABIA", b"ACCA", b"AGPA", b"AIDA", b"AIPA", b"ANPA", b"ANVA", b"AROA",
];

/// Recognizers for a run that starts with an upper-case letter.
pub(super) fn scan(scanner: &mut Scanner<'_>, start: usize, word_end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let second = byte_at(bytes, start + 1);
    if let Some(end) = any_case_iban(scanner, start) {
        return Some(end);
    }
    if bytes[start] == b'P'
        && let Some(end) = super::secrets::putty_key(scanner, start)
    {
        return Some(end);
    }
    if second.is_ascii_uppercase() {
        if let Some(end) = uk_nino(bytes, start) {
            scanner.push(EntityType::UkNino, start, end, NINO_CONFIDENCE);
            return Some(end);
        }
        if word_end - start == 16 && italian_fiscal_code(&bytes[start..word_end]) {
            scanner.push(
                EntityType::ItFiscalCode,
                start,
                word_end,
                FISCAL_CODE_CONFIDENCE,
            );
            return Some(word_end);
        }
        if word_end - start == 20 && aws_access_key(&bytes[start..word_end]) {
            scanner.push(
                EntityType::AwsAccessKey,
                start,
                word_end,
                AWS_ACCESS_KEY_CONFIDENCE,
            );
            return Some(word_end);
        }
    }
    if matches!(bytes[start], b'X' | b'Y' | b'Z')
        && (is_digit(second) || second == b'-')
        && let Some(end) = spanish_nie(bytes, start, word_end)
    {
        scanner.push(EntityType::EsDni, start, end, NIE_CONFIDENCE);
        return Some(end);
    }
    None
}

/// An IBAN at `start` in any letter case (`de89 3704 …` typed in lower case, `GB82 west …`),
/// for a run that starts with a letter of either case; pushes it and returns its end.
pub(super) fn any_case_iban(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    if !byte_at(bytes, start + 1).is_ascii_alphabetic() || !is_digit(byte_at(bytes, start + 2)) {
        return None;
    }
    let end = iban(bytes, start)?;
    scanner.push(EntityType::Iban, start, end, IBAN_CONFIDENCE);
    Some(end)
}

/// Compact IBANs written into a longer token (`/accounts/DE89370400440532013000/balance`,
/// `acct_GB82WEST12345698765432`): each part of `start..end` between `/ _ - +` that starts
/// with two upper-case letters and two digits, has its country's length and passes mod-97.
/// Returns the end of the last one found.
pub(super) fn joined_ibans(scanner: &mut Scanner<'_>, start: usize, end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let mut found = None;
    let mut position = start;
    while position < end {
        let part_end = run_end(bytes, position, end - position, is_alphanumeric);
        let part = &bytes[position..part_end];
        if part.len() >= 4
            && part[0].is_ascii_uppercase()
            && part[1].is_ascii_uppercase()
            && is_digit(part[2])
            && is_digit(part[3])
            && IBAN_LENGTHS
                .iter()
                .any(|(code, length)| code[..] == part[..2] && *length == part.len())
            && iban_checksum(part)
        {
            scanner.push(EntityType::Iban, position, part_end, IBAN_CONFIDENCE);
            found = Some(part_end);
        }
        position = part_end + 1;
    }
    found
}

/// An IBAN, compact or in groups of four joined by single spaces, hyphens or dots (the same
/// throughout), letters of either case: the country's length and mod-97 of the rearranged
/// number equal to 1. Returns its end.
fn iban(bytes: &[u8], start: usize) -> Option<usize> {
    let country = [
        bytes[start].to_ascii_uppercase(),
        bytes[start + 1].to_ascii_uppercase(),
    ];
    let &(_, length) = IBAN_LENGTHS.iter().find(|(code, _)| **code == country)?;
    let mut characters = [0_u8; IBAN_LENGTH_MAX];
    let mut collected = 0;
    let mut position = start;
    let mut separator = None;
    loop {
        let group_end = run_end(bytes, position, length - collected + 1, is_alphanumeric);
        let group = &bytes[position..group_end];
        if collected + group.len() > length {
            return None;
        }
        for (slot, character) in characters[collected..].iter_mut().zip(group) {
            *slot = character.to_ascii_uppercase();
        }
        collected += group.len();
        if collected == length {
            return (ends_cleanly(bytes, group_end) && iban_checksum(&characters[..length]))
                .then_some(group_end);
        }
        // Every group but the last is four characters.
        let joint = byte_at(bytes, group_end);
        if group.len() != 4
            || !matches!(joint, b' ' | b'-' | b'.')
            || *separator.get_or_insert(joint) != joint
            || !is_alphanumeric(byte_at(bytes, group_end + 1))
        {
            return None;
        }
        position = group_end + 1;
    }
}

/// Check digits 02..98 and mod-97 of BBAN + country + check digits equal to 1.
fn iban_checksum(characters: &[u8]) -> bool {
    if !characters[2].is_ascii_digit() || !characters[3].is_ascii_digit() {
        return false;
    }
    let check = (characters[2] - b'0') * 10 + (characters[3] - b'0');
    if !(2..=98).contains(&check) {
        return false;
    }
    let mut remainder = 0_u32;
    for &character in characters[4..].iter().chain(&characters[..4]) {
        remainder = match character {
            b'0'..=b'9' => (remainder * 10 + u32::from(character - b'0')) % 97,
            b'A'..=b'Z' => (remainder * 100 + u32::from(character - b'A') + 10) % 97,
            _ => return false,
        };
    }
    remainder == 1
}

/// `AB123456C` or `AB 12 34 56 C`: prefix rules and suffix A-D.
fn uk_nino(bytes: &[u8], start: usize) -> Option<usize> {
    let (first, second) = (bytes[start], bytes[start + 1]);
    if matches!(first, b'D' | b'F' | b'I' | b'Q' | b'U' | b'V')
        || matches!(second, b'D' | b'F' | b'I' | b'O' | b'Q' | b'U' | b'V')
        || matches!(
            &[first, second],
            b"BG" | b"GB" | b"KN" | b"NK" | b"NT" | b"TN" | b"ZZ"
        )
    {
        return None;
    }
    let spaced = byte_at(bytes, start + 2) == b' ';
    let mut position = start + 2 + usize::from(spaced);
    if spaced {
        for _ in 0..3 {
            if !is_digit(byte_at(bytes, position))
                || !is_digit(byte_at(bytes, position + 1))
                || byte_at(bytes, position + 2) != b' '
            {
                return None;
            }
            position += 3;
        }
    } else {
        if run_end(bytes, position, 7, is_digit) != position + 6 {
            return None;
        }
        position += 6;
    }
    let suffix = byte_at(bytes, position);
    let end = position + 1;
    (matches!(suffix, b'A'..=b'D') && ends_cleanly(bytes, end)).then_some(end)
}

/// `X1234567L`, `X-1234567-L`: X/Y/Z stand for 0/1/2 and the letter checks the number.
fn spanish_nie(bytes: &[u8], start: usize, word_end: usize) -> Option<usize> {
    let run = &bytes[start..word_end];
    let (digits, letter) = match run {
        [_, b'-', digits @ .., b'-', letter] | [_, digits @ .., letter] => (digits, *letter),
        _ => return None,
    };
    if digits.len() != 7 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let lead = usize::from(run[0] - b'X');
    let number = digits.iter().fold(lead, |number, &digit| {
        number * 10 + usize::from(digit - b'0')
    });
    (letter == DNI_LETTERS[number % 23] && ends_cleanly(bytes, word_end)).then_some(word_end)
}

/// Month letters of the codice fiscale.
const FISCAL_MONTHS: &[u8] = b"ABCDEHLMPRST";
/// Letters that replace digits in a codice fiscale issued to a homonym (omocodia).
const FISCAL_DIGIT_LETTERS: &[u8] = b"LMNPQRSTUV";
/// Values of odd-position characters (1st, 3rd, ...), for digits 0-9 and letters A-Z alike.
const FISCAL_ODD: [u8; 26] = [
    1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23,
];

/// `RSSMRA85T10A562S`: six letters, year, month letter, day, place, and the check letter.
fn italian_fiscal_code(code: &[u8]) -> bool {
    let digit_like = |byte: u8| byte.is_ascii_digit() || FISCAL_DIGIT_LETTERS.contains(&byte);
    let shape = code[..6].iter().all(u8::is_ascii_uppercase)
        && digit_like(code[6])
        && digit_like(code[7])
        && FISCAL_MONTHS.contains(&code[8])
        && digit_like(code[9])
        && digit_like(code[10])
        && code[11].is_ascii_uppercase()
        && code[12..15].iter().all(|&byte| digit_like(byte))
        && code[15].is_ascii_uppercase();
    if !shape {
        return false;
    }
    let sum: u32 = code[..15]
        .iter()
        .enumerate()
        .map(|(position, &byte)| {
            let index = if byte.is_ascii_digit() {
                byte - b'0'
            } else {
                byte - b'A'
            };
            if position % 2 == 0 {
                u32::from(FISCAL_ODD[usize::from(index)])
            } else {
                u32::from(index)
            }
        })
        .sum();
    u32::from(code[15] - b'A') == sum % 26
}

/// A known prefix and 16 upper-case letters or digits; AWS's documentation key
/// (`...EXAMPLE`) is a sample, not a key.
fn aws_access_key(key: &[u8]) -> bool {
    let prefix: &[u8] = &key[..4];
    AWS_KEY_PREFIXES
        .iter()
        .any(|known| known.as_slice() == prefix)
        && key[4..]
            .iter()
            .all(|&byte| byte.is_ascii_uppercase() || byte.is_ascii_digit())
        && !key.ends_with(b"EXAMPLE")
}
