//! Look-alike characters folded to ASCII before the sensitivity scan and the firewall's
//! phrase rules read a text.
//!
//! The recognizers read ASCII: digits, letters, `@`, `-`, spaces. Text pasted from a word
//! processor or a web page carries the same values in other characters — a no-break space
//! between the groups of a card number, an en dash in a social security number — and a
//! caller who wants a value past the scan can write it in full-width digits, split it with
//! zero-width spaces or hide it in Unicode tag characters, all of which a model still reads.
//! [`Folded::of`] writes such text with those characters as the ASCII they stand for (or
//! without them, where they are invisible) and keeps, for every byte it writes, where the
//! character it came from lies in the original, so that findings are reported, redacted and
//! restored on the text as sent.

use std::ops::Range;

/// A text with look-alike characters folded, and the way back to the original's offsets.
pub(crate) struct Folded {
    pub(crate) text: String,
    /// For each byte of `text`: the start and end, in the original, of the character it
    /// was written for.
    origins: Vec<(u32, u32)>,
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

impl Folded {
    /// `text` with look-alike characters folded, or `None` when it has none (every ASCII
    /// text) or is too long for 32-bit offsets.
    pub(crate) fn of(text: &str) -> Option<Folded> {
        if text.is_ascii() || u32::try_from(text.len()).is_err() {
            return None;
        }
        let first = non_ascii(text, 0)
            .find(|&(_, character)| !matches!(fold(character), Fold::Keep))?
            .0;
        let mut folded = Folded {
            text: String::with_capacity(text.len()),
            origins: Vec::with_capacity(text.len()),
        };
        let mut copied = 0;
        for (at, character) in non_ascii(text, first) {
            let kind = fold(character);
            if matches!(kind, Fold::Keep) {
                continue;
            }
            folded.copy(text, copied, at);
            copied = at + character.len_utf8();
            if let Fold::Ascii(byte) = kind {
                folded.text.push(char::from(byte));
                folded.origins.push(offsets(at, copied));
            }
        }
        folded.copy(text, copied, text.len());
        Some(folded)
    }

    /// Copies `text[start..end]` unchanged, byte for byte.
    fn copy(&mut self, text: &str, start: usize, end: usize) {
        self.text.push_str(&text[start..end]);
        self.origins
            .extend((start..end).map(|byte| offsets(byte, byte + 1)));
    }

    /// The span of the original text that `span` of the folded text was written for: from
    /// the first character's start to the last one's end (characters dropped in between are
    /// inside it).
    pub(crate) fn original(&self, span: &Range<usize>) -> Range<usize> {
        let start = self.origins[span.start].0 as usize;
        let end = self.origins[span.end - 1].1 as usize;
        start..end
    }
}

/// The characters of `text` outside ASCII from byte `from` on, with their offsets: ASCII
/// bytes are skipped without decoding.
fn non_ascii(text: &str, from: usize) -> impl Iterator<Item = (usize, char)> + '_ {
    let bytes = text.as_bytes();
    let mut at = from;
    std::iter::from_fn(move || {
        at += bytes.get(at..)?.iter().position(|byte| !byte.is_ascii())?;
        let character = text.get(at..)?.chars().next()?;
        let found = (at, character);
        at += character.len_utf8();
        Some(found)
    })
}

fn offsets(start: usize, end: usize) -> (u32, u32) {
    // `of` refuses texts longer than `u32::MAX` bytes.
    (
        u32::try_from(start).unwrap_or(u32::MAX),
        u32::try_from(end).unwrap_or(u32::MAX),
    )
}
