//! Look-alike characters folded to ASCII before the sensitivity scan and the firewall's
//! phrase rules read a text.
//!
//! The recognizers read ASCII: digits, letters, `@`, `-`, spaces. Text pasted from a word
//! processor or a web page carries the same values in other characters — a no-break space
//! between the groups of a card number, an en dash in a social security number — and a
//! caller who wants a value past the scan can write it in full-width digits, split it with
//! zero-width spaces or hide it in Unicode tag characters, all of which a model still reads;
//! a URL pasted into a prompt carries its query's values percent-escaped
//! (`?email=jane.doe%40contoso.com`), text copied from a page's source its HTML character
//! references (`jane&#64;contoso.com`), and a JSON document held in a string (a tool's
//! result as Python's `json.dumps` writes it) its characters outside ASCII, and what some
//! encoders escape besides, as `\uXXXX` (`4111\u00a01111`, `jane\u0040contoso.com`); people
//! write addresses as `jane [at] contoso [dot] com` to keep them from harvesters.
//! [`Folded::of`] writes such text with those characters as the ASCII they stand for (or
//! without them, where they are invisible) and keeps, for every byte it writes, where the
//! character it came from lies in the original, so that findings are reported, redacted and
//! restored on the text as sent.

use std::ops::Range;

/// A text with look-alike characters folded, and the way back to the original's offsets.
pub(crate) struct Folded {
    pub(crate) text: String,
    /// Every character folded or dropped, in order: between two of them the folded text is
    /// the original shifted by a constant.
    edits: Vec<Edit>,
}

/// One folded or dropped character.
#[derive(Debug, Clone, Copy)]
struct Edit {
    /// Where its ASCII byte is in the folded text (where the next byte is, when dropped).
    folded_at: u32,
    /// Its start in the original.
    original_at: u32,
    /// Its length in the original: a character's UTF-8 length, or an escape's length.
    original_bytes: u8,
    /// Bytes it became: 1 when folded, 0 when dropped.
    written: u8,
}

/// What one character becomes.
enum Fold {
    Keep,
    Drop,
    Ascii(u8),
}

/// Where each script's digits zero to nine lie, contiguous from these code points.
const DIGIT_ZEROS: [u32; 24] = [
    0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66,
    0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x17E0, 0x1810, 0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC,
    0x1D7F6,
];

fn fold(character: char) -> Fold {
    let point = u32::from(character);
    match point {
        0..=0x9F => Fold::Keep,
        0x00A0 | 0x1680 | 0x2000..=0x200A | 0x202F | 0x205F | 0x3000 => Fold::Ascii(b' '),
        0x2028 | 0x2029 => Fold::Ascii(b'\n'),
        0x2010..=0x2015 | 0x2212 | 0xFE58 | 0xFE63 => Fold::Ascii(b'-'),
        0xFE6B => Fold::Ascii(b'@'),
        0xFE52 | 0x3002 | 0xFF61 => Fold::Ascii(b'.'),
        // Soft hyphen, zero-width and direction marks, word joiners, variation selectors,
        // the byte order mark, and tag characters outside ASCII's printable range.
        0x00AD
        | 0x034F
        | 0x061C
        | 0x180E
        | 0x200B..=0x200F
        | 0x202A..=0x202E
        | 0x2060..=0x2064
        | 0x2066..=0x2069
        | 0xFE00..=0xFE0F
        | 0xFEFF
        | 0xE0000..=0xE001F
        | 0xE007F => Fold::Drop,
        // Full-width forms of `!` to `~`.
        0xFF01..=0xFF5E => ascii(point - 0xFF01 + 0x21),
        // Tag characters, which spell ASCII invisibly.
        0xE0020..=0xE007E => ascii(point - 0xE0000),
        // Mathematical bold, italic, script... letters: 13 alphabets of 52.
        0x1D400..=0x1D6A3 => {
            let letter = (point - 0x1D400) % 52;
            if letter < 26 {
                ascii(u32::from(b'A') + letter)
            } else {
                ascii(u32::from(b'a') + letter - 26)
            }
        }
        0x0660..=0x1819 | 0x1D7CE..=0x1D7FF => DIGIT_ZEROS
            .iter()
            .find(|&&zero| (zero..zero + 10).contains(&point))
            .map_or(Fold::Keep, |zero| ascii(u32::from(b'0') + point - zero)),
        _ => Fold::Keep,
    }
}

fn ascii(point: u32) -> Fold {
    u8::try_from(point).map_or(Fold::Keep, Fold::Ascii)
}

/// The Latin letter a Cyrillic or Greek one is drawn like, if any. Folded only where words
/// are read ([`Folded::of_words`]): in Russian or Greek prose they are letters of their
/// own, but inside an English phrase they are a disguise.
fn confusable(character: char) -> Option<u8> {
    Some(match character {
        'А' | 'Α' => b'A',
        'В' | 'Β' => b'B',
        'С' => b'C',
        'Е' | 'Ε' => b'E',
        'Н' | 'Η' => b'H',
        'І' | 'Ӏ' | 'Ι' => b'I',
        'Ј' => b'J',
        'К' | 'Κ' => b'K',
        'М' | 'Μ' => b'M',
        'Ν' => b'N',
        'О' | 'Ο' => b'O',
        'Р' | 'Ρ' => b'P',
        'Ѕ' => b'S',
        'Т' | 'Τ' => b'T',
        'Х' | 'Χ' => b'X',
        'У' | 'Υ' => b'Y',
        'Ζ' => b'Z',
        'а' => b'a',
        'с' => b'c',
        'ԁ' => b'd',
        'е' => b'e',
        'ɡ' => b'g',
        'һ' => b'h',
        'і' | 'ι' | 'ı' => b'i',
        'ј' => b'j',
        'κ' => b'k',
        'ǀ' => b'l',
        'о' | 'ο' => b'o',
        'р' | 'ρ' => b'p',
        'ԛ' => b'q',
        'ѕ' => b's',
        'ν' => b'v',
        'ԝ' => b'w',
        'х' => b'x',
        'у' => b'y',
        _ => return None,
    })
}

/// [`fold`], and with `letters` the confusable letters too.
fn fold_with(character: char, letters: bool) -> Fold {
    if letters && let Some(ascii) = confusable(character) {
        return Fold::Ascii(ascii);
    }
    fold(character)
}

impl Folded {
    /// `text` with look-alike characters folded, or `None` when it has none (every ASCII
    /// text) or is too long for 32-bit offsets.
    pub(crate) fn of(text: &str) -> Option<Folded> {
        Folded::build(text, false)
    }

    /// Like [`Folded::of`], with Cyrillic and Greek letters that pass for Latin ones read as
    /// those: for rules that look for English words.
    pub(crate) fn of_words(text: &str) -> Option<Folded> {
        Folded::build(text, true)
    }

    fn build(text: &str, letters: bool) -> Option<Folded> {
        // In ASCII text only escapes can fold: look at each byte that may start one alone
        // (most texts have none).
        if u32::try_from(text.len()).is_err()
            || (text.is_ascii() && !has_escape(text.as_bytes(), letters))
        {
            return None;
        }
        let first = candidates(text, 0, letters)
            .find(|(_, _, kind)| !matches!(kind, Fold::Keep))?
            .0;
        let mut folded = Folded {
            text: String::with_capacity(text.len()),
            edits: Vec::new(),
        };
        let mut copied = 0;
        for (at, length, kind) in candidates(text, first, letters) {
            if matches!(kind, Fold::Keep) {
                continue;
            }
            folded.text.push_str(&text[copied..at]);
            copied = at + length;
            let mut edit = Edit {
                folded_at: offset(folded.text.len()),
                original_at: offset(at),
                original_bytes: u8::try_from(length).unwrap_or(4),
                written: 0,
            };
            if let Fold::Ascii(byte) = kind {
                folded.text.push(char::from(byte));
                edit.written = 1;
            }
            folded.edits.push(edit);
        }
        folded.text.push_str(&text[copied..]);
        Some(folded)
    }

    /// The span of the original text that `span` of the folded text was written for: from
    /// the first character's start to the last one's end (characters dropped in between are
    /// inside it).
    pub(crate) fn original(&self, span: &Range<usize>) -> Range<usize> {
        let start = self.original_at(span.start).0;
        let end = self.original_at(span.end - 1).1;
        start..end
    }

    /// The start and end in the original of the character that wrote folded byte `at`.
    fn original_at(&self, at: usize) -> (usize, usize) {
        let last = self
            .edits
            .partition_point(|edit| edit.folded_at as usize <= at)
            .checked_sub(1)
            .map(|index| self.edits[index]);
        match last {
            None => (at, at + 1),
            Some(edit) if edit.written == 1 && edit.folded_at as usize == at => {
                let start = edit.original_at as usize;
                (start, start + usize::from(edit.original_bytes))
            }
            Some(edit) => {
                // Copied: as far past the edit's end in the original as in the folded text.
                let past = at - edit.folded_at as usize - usize::from(edit.written);
                let start = edit.original_at as usize + usize::from(edit.original_bytes) + past;
                (start, start + 1)
            }
        }
    }
}

/// What may fold in `text` from byte `from` on, with offsets and original lengths: each
/// character outside ASCII, and each ASCII escape ([`escape`]) read as the character it
/// stands for. Other ASCII bytes are skipped without decoding.
fn candidates(
    text: &str,
    from: usize,
    letters: bool,
) -> impl Iterator<Item = (usize, usize, Fold)> + '_ {
    let bytes = text.as_bytes();
    let mut at = from;
    std::iter::from_fn(move || {
        let searched = at;
        at += bytes
            .get(at..)?
            .iter()
            .position(|&byte| !byte.is_ascii() || ESCAPE_STARTS.contains(&byte))?;
        if bytes[at].is_ascii() {
            let found = match escape(bytes, at, letters) {
                // A bracketed `[at]` takes the space before it along (`jane [at] contoso`).
                Some((length, kind)) if matches!(bytes[at], b'[' | b'(') => {
                    let start = if at > searched && bytes[at - 1] == b' ' {
                        at - 1
                    } else {
                        at
                    };
                    (start, at + length - start, kind)
                }
                Some((length, kind)) => (at, length, kind),
                None => (at, 1, Fold::Keep),
            };
            at = found.0 + found.1;
            return Some(found);
        }
        let character = text.get(at..)?.chars().next()?;
        let found = (at, character.len_utf8(), fold_with(character, letters));
        at += found.1;
        Some(found)
    })
}

/// Bytes that may start an ASCII escape.
const ESCAPE_STARTS: [u8; 5] = [b'%', b'&', b'[', b'(', b'\\'];

/// Whether ASCII `bytes` hold an escape anywhere.
fn has_escape(bytes: &[u8], letters: bool) -> bool {
    memchr::memchr3_iter(b'%', b'&', b'[', bytes)
        .chain(memchr::memchr2_iter(b'(', b'\\', bytes))
        .any(|at| escape(bytes, at, letters).is_some())
}

/// Named character references worth reading: what hides an address or a number.
const ENTITIES: [(&[u8], u8); 8] = [
    (b"&commat;", b'@'),
    (b"&period;", b'.'),
    (b"&amp;", b'&'),
    (b"&nbsp;", b' '),
    (b"&hyphen;", b'-'),
    (b"&dash;", b'-'),
    (b"&lowbar;", b'_'),
    (b"&plus;", b'+'),
];

/// An ASCII escape at `at`, its length and what it folds to: a printable ASCII character
/// for a URL's `%40`, an HTML character reference (`&#64;`, `&#x40;`, `&commat;`) as text
/// copied from a page's source carries it, or the bracketed `[at]`, `(at)`, `[dot]`,
/// `(dot)` with which people write addresses to keep them from harvesters (with the one
/// space after it; [`candidates`] takes the one before); or a JSON `\uXXXX`
/// ([`unicode_escape`]).
fn escape(bytes: &[u8], at: usize, letters: bool) -> Option<(usize, Fold)> {
    match bytes[at] {
        b'%' => {
            let hex = |index: usize| char::from(*bytes.get(index)?).to_digit(16);
            Some((3, Fold::Ascii(printable(hex(at + 1)? * 16 + hex(at + 2)?)?)))
        }
        b'&' if bytes.get(at + 1) == Some(&b'#') => {
            let (radix, digits_at) = match bytes.get(at + 2) {
                Some(b'x' | b'X') => (16, at + 3),
                _ => (10, at + 2),
            };
            let digits = bytes
                .get(digits_at..)?
                .iter()
                .take(5)
                .take_while(|byte| char::from(**byte).is_digit(radix))
                .count();
            if digits == 0 || bytes.get(digits_at + digits) != Some(&b';') {
                return None;
            }
            let text = std::str::from_utf8(&bytes[digits_at..digits_at + digits]).ok()?;
            let value = u32::from_str_radix(text, radix).ok()?;
            Some((digits_at + digits + 1 - at, Fold::Ascii(printable(value)?)))
        }
        b'&' => ENTITIES
            .iter()
            .find(|(name, _)| bytes[at..].starts_with(name))
            .map(|(name, byte)| (name.len(), Fold::Ascii(*byte))),
        open @ (b'[' | b'(') => {
            let close = if open == b'[' { b']' } else { b')' };
            // The bracketed word's length with its brackets, if `word` is there.
            let word = |word: &[u8]| -> Option<usize> {
                let inside = bytes.get(at + 1..at + 1 + word.len())?;
                (inside.eq_ignore_ascii_case(word)
                    && bytes.get(at + 1 + word.len()) == Some(&close))
                .then_some(word.len() + 2)
            };
            let (length, byte) = if let Some(length) = word(b"at") {
                (length, b'@')
            } else {
                (word(b"dot")?, b'.')
            };
            let space = usize::from(bytes.get(at + length) == Some(&b' '));
            Some((length + space, Fold::Ascii(byte)))
        }
        b'\\' => unicode_escape(bytes, at, letters),
        _ => None,
    }
}

/// A JSON `\uXXXX` at `at`, or a surrogate pair of two (`\udb40\udc40`), its length and
/// what the character it stands for folds to: printable ASCII as itself, any other
/// character as [`fold_with`] folds it (`\u00a0` a space, `\u200b` nothing). `None` where
/// that character stays as it is (`\u00e9`, a control character) and for what is not a
/// character: fewer than four hexadecimal digits, a lone surrogate.
fn unicode_escape(bytes: &[u8], at: usize, letters: bool) -> Option<(usize, Fold)> {
    let unit = |from: usize| -> Option<u32> {
        let digits = bytes.get(from..from + 6)?.strip_prefix(b"\\u")?;
        digits.iter().try_fold(0, |value, &digit| {
            Some(value * 16 + char::from(digit).to_digit(16)?)
        })
    };
    let (length, point) = match unit(at)? {
        high @ 0xD800..=0xDBFF => {
            let low = unit(at + 6).filter(|low| (0xDC00..=0xDFFF).contains(low))?;
            (12, 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
        }
        point => (6, point),
    };
    let kind = match printable(point) {
        Some(byte) => Fold::Ascii(byte),
        None => fold_with(char::from_u32(point)?, letters),
    };
    (!matches!(kind, Fold::Keep)).then_some((length, kind))
}

/// The printable ASCII character `value` is, if it is one.
fn printable(value: u32) -> Option<u8> {
    u8::try_from(value)
        .ok()
        .filter(|byte| (0x20..0x7F).contains(byte))
}

fn offset(at: usize) -> u32 {
    // `of` refuses texts longer than `u32::MAX` bytes.
    u32::try_from(at).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
