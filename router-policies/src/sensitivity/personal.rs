//! Personal data that its label makes sensitive: dates of birth, passport numbers and
//! medical record numbers. A date or a short code means nothing alone (a deadline, an order,
//! a part); next to the words that name it (`DOB`, `born on`, `passport no.`, `MRN`,
//! `patient ID`) it identifies a person, and in health data it is an identifier that must
//! not leave the premises.
//!
//! Both recognizers start at a run the scan already stopped at, check the run's shape first
//! (cheap, turns away nearly every run) and only then look back for the label.

use super::EntityType;
use super::scan::{Scanner, byte_at, ends_cleanly, is_alphanumeric, is_digit, run_end};

/// How a labelled value's confidence compares: as sure as a checksum-less national id next
/// to its name.
const LABELLED_CONFIDENCE: f32 = 0.85;
/// How far before a date its label may end, in bytes.
const DATE_CONTEXT_BYTES: usize = 48;
/// The longest month name with its `. ` (a month-first date starts before its day).
const MONTH_BYTES_MAX: usize = 12;
/// How far before a passport or record number its label may end, in bytes
/// (`passport number is: `, `medical record no. `).
const ID_LABEL_BYTES: usize = 24;

/// Where the last labels of each kind ended in the text being scanned; `usize::MAX` for
/// none yet. The scan notes them as it passes their words ([`note_label`]), so a date or a
/// number after them is checked in constant time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Labels {
    birth_end: usize,
    id_end: usize,
}

impl Default for Labels {
    fn default() -> Self {
        Labels {
            birth_end: usize::MAX,
            id_end: usize::MAX,
        }
    }
}

/// Words (runs of the scan: letters, digits, `_`, `-`) that label a date of birth, any
/// case. A label of several words is found by its telling one (`date of birth`, `date de
/// naissance`, `fecha de nacimiento`, `data di nascita`, `data urodzenia`); a word that
/// letters outside ASCII cut (`födelsedatum`, `né`) by the run the scan sees (`delsedatum`,
/// `n`, checked against its neighbours); `d.o.b.` by its last letter.
const BIRTH_LABELS: &[&str] = &[
    "dob",
    "birth",
    "born",
    "birthday",
    "birthdate",
    "birth_date",
    "birth-date",
    "dateofbirth",
    "date_of_birth",
    "date-of-birth",
    "geburtsdatum",
    "geb",
    "geboren",
    "naissance",
    "nacimiento",
    "nacido",
    "nacida",
    "nascita",
    "nato",
    "nata",
    "geboortedatum",
    "delsedatum",
    "urodzenia",
    "n",
    "b",
];
/// Words that label a passport or medical record number (with the words before and after
/// them checked by [`label_before`]).
const ID_LABELS: &[&str] = &[
    "passport",
    "passport_number",
    "passport_no",
    "passportnumber",
    "passportno",
    "reisepass",
    "reisepassnummer",
    "passnummer",
    "passeport",
    "pasaporte",
    "passaporto",
    "paspoort",
    "paszport",
    "mrn",
    "record",
    "records",
    "patient",
    "patient_id",
    "patientid",
    "patient_number",
    "chart",
    "hospital",
    "nhs",
];
const LABEL_LENGTH_MAX: usize = 16;
/// By length, the first letters of [`BIRTH_LABELS`] and [`ID_LABELS`] (bit 0 `a`): turns
/// away nearly every other word with one lookup.
static LABEL_SHAPES: [u32; LABEL_LENGTH_MAX] = label_shapes();

const fn label_shapes() -> [u32; LABEL_LENGTH_MAX] {
    let mut shapes = [0_u32; LABEL_LENGTH_MAX];
    let lists: [&[&str]; 2] = [BIRTH_LABELS, ID_LABELS];
    let mut list = 0;
    while list < lists.len() {
        let words = lists[list];
        let mut index = 0;
        while index < words.len() {
            let word = words[index].as_bytes();
            shapes[word.len()] |= 1 << (word[0] - b'a');
            index += 1;
        }
        list += 1;
    }
    shapes
}

/// Notes where a label ends if the word `start..end` (starting with an ASCII letter) is one.
#[inline]
pub(super) fn note_label(scanner: &mut Scanner<'_>, start: usize, end: usize) {
    let length = end - start;
    let letter = (scanner.bytes[start] | 0x20).wrapping_sub(b'a');
    if length < LABEL_LENGTH_MAX && letter < 26 && LABEL_SHAPES[length] & (1 << letter) != 0 {
        note_label_word(scanner, start, end);
    }
}

#[cold]
#[inline(never)]
fn note_label_word(scanner: &mut Scanner<'_>, start: usize, end: usize) {
    let bytes = scanner.bytes;
    let word = &bytes[start..end];
    let mut lower = [0_u8; LABEL_LENGTH_MAX];
    for (slot, &byte) in lower.iter_mut().zip(word) {
        *slot = byte.to_ascii_lowercase();
    }
    let birth = match &lower[..word.len()] {
        // `né le`, `née le`.
        b"n" => bytes.get(end..end + 2) == Some("é".as_bytes()),
        // `d.o.b.`
        b"b" => start >= 4 && bytes[start - 4..start].eq_ignore_ascii_case(b"d.o."),
        // `födelsedatum`.
        b"delsedatum" => start >= 2 && &bytes[start - 2..start] == "ö".as_bytes(),
        b"dob" | b"birth" | b"born" | b"birthday" | b"birthdate" | b"birth_date"
        | b"birth-date" | b"dateofbirth" | b"date_of_birth" | b"date-of-birth"
        | b"geburtsdatum" | b"geb" | b"geboren" | b"naissance" | b"nacimiento" | b"nacido"
        | b"nacida" | b"nascita" | b"nato" | b"nata" | b"geboortedatum" | b"urodzenia" => true,
        _ => false,
    };
    if birth {
        scanner.labels.birth_end = end;
        return;
    }
    if matches!(
        &lower[..word.len()],
        b"passport"
            | b"passport_number"
            | b"passport_no"
            | b"passportnumber"
            | b"passportno"
            | b"reisepass"
            | b"reisepassnummer"
            | b"passnummer"
            | b"passeport"
            | b"pasaporte"
            | b"passaporto"
            | b"paspoort"
            | b"paszport"
            | b"mrn"
            | b"record"
            | b"records"
            | b"patient"
            | b"patient_id"
            | b"patientid"
            | b"patient_number"
            | b"chart"
            | b"hospital"
            | b"nhs"
    ) {
        scanner.labels.id_end = end;
    }
}

/// Words between a day and its month (`12th of March`, `12 de marzo de 1984`).
const DATE_FILLERS: &[&str] = &["of", "de", "di"];

/// A date of birth: a date (`1984-03-12`, `12.03.1984`, `03/12/84`, `12 March 1984`,
/// `March 12, 1984`, `12 de marzo de 1984`) of a valid day and month, with a four-digit year
/// from 1900 to 2099 or a two-digit one, after a birth label on its line or ending the line
/// above. `start` is a
/// run of digits the scan stopped at (`word_end` its end); returns the end of the date.
#[inline]
pub(super) fn date_of_birth(
    scanner: &mut Scanner<'_>,
    start: usize,
    word_end: usize,
) -> Option<usize> {
    let bytes = scanner.bytes;
    let birth_end = scanner.labels.birth_end;
    // Most numbers stop here: no birth label before them.
    if birth_end > start || start - birth_end > DATE_CONTEXT_BYTES + MONTH_BYTES_MAX {
        return None;
    }
    let leading = run_end(bytes, start, 5, is_digit) - start;
    // And most numbers after one: no date separator follows, and they are no day of a
    // written-out date (`12 services`, `840 ms`).
    let candidate = match byte_at(bytes, start + leading) {
        b'/' | b'.' | b'-' => leading <= 4 && is_digit(byte_at(bytes, start + leading + 1)),
        _ => {
            leading <= 2
                && byte_at(bytes, word_end) != b'\n'
                // `12 March`, `12 de marzo`; `March 12, 1984`.
                && (begins_month(bytes, word_end + 1) || year_follows(bytes, word_end))
        }
    };
    if !candidate {
        return None;
    }
    dated_birth(scanner, start, leading, word_end)
}

/// Whether the three bytes at `at` (any case) begin a month's name or a filler before one
/// (`of `, `de `, `di `).
fn begins_month(bytes: &[u8], at: usize) -> bool {
    let Some(head) = bytes.get(at..at + 3) else {
        return false;
    };
    let head = [
        head[0].to_ascii_lowercase(),
        head[1].to_ascii_lowercase(),
        head[2].to_ascii_lowercase(),
    ];
    // `ä`, `é`, `û` start with 0xc3.
    matches!(
        &head,
        b"jan"
            | b"feb"
            | b"mar"
            | b"apr"
            | b"may"
            | b"jun"
            | b"jul"
            | b"aug"
            | b"sep"
            | b"oct"
            | b"nov"
            | b"dec"
            | b"m\xc3\xa4"
            | b"mai"
            | b"okt"
            | b"dez"
            | b"f\xc3\xa9"
            | b"avr"
            | b"jui"
            | b"ao\xc3"
            | b"d\xc3\xa9"
            | b"ene"
            | b"abr"
            | b"ago"
            | b"dic"
            | b"gen"
            | b"mag"
            | b"giu"
            | b"lug"
            | b"set"
            | b"ott"
            | b"of "
            | b"de "
            | b"di "
    )
}

/// Whether a year follows a day at `at`: `, 1984` or ` 1984` (`March 12, 1984`).
fn year_follows(bytes: &[u8], at: usize) -> bool {
    let at = if byte_at(bytes, at) == b',' {
        at + 1
    } else {
        at
    };
    byte_at(bytes, at) == b' ' && (1..=4).all(|offset| is_digit(byte_at(bytes, at + offset)))
}

/// The rest of [`date_of_birth`], for numbers that may start or continue a date.
#[cold]
#[inline(never)]
fn dated_birth(
    scanner: &mut Scanner<'_>,
    start: usize,
    leading: usize,
    word_end: usize,
) -> Option<usize> {
    let bytes = scanner.bytes;
    let (date_start, end) = match byte_at(bytes, start + leading) {
        b'/' | b'.' | b'-' => (start, numeric_date(bytes, start)?),
        _ => spelled_date(bytes, start, leading, word_end)?,
    };
    // Before the date (a month-first one starts before `start`), on the same line or
    // ending the line above (a form: `Date of birth:` then the date).
    let birth_end = scanner.labels.birth_end;
    if birth_end > date_start
        || date_start - birth_end > DATE_CONTEXT_BYTES
        || !label_reaches(&bytes[birth_end..date_start])
    {
        return None;
    }
    scanner.push(
        EntityType::DateOfBirth,
        date_start,
        end,
        LABELLED_CONFIDENCE,
    );
    Some(end)
}

/// Whether a label reaches across `between` (from its end to the date): no line break, or
/// one that only blanks and `:` `-` `=` `|` precede and blanks follow.
fn label_reaches(between: &[u8]) -> bool {
    let Some(newline) = between.iter().position(|&byte| byte == b'\n') else {
        return true;
    };
    let (before, after) = (&between[..newline], &between[newline + 1..]);
    before
        .iter()
        .all(|byte| matches!(byte, b' ' | b'\t' | b'\r' | b':' | b'-' | b'=' | b'|'))
        && after.iter().all(|byte| matches!(byte, b' ' | b'\t'))
}

/// `Y-M-D`, `D.M.Y`, `M/D/Y` or `D/M/Y` (one separator throughout) at `start`; its end.
fn numeric_date(bytes: &[u8], start: usize) -> Option<usize> {
    let mut fields = [(0_u32, 0_usize); 3];
    let mut at = start;
    let separator = byte_at(bytes, run_end(bytes, start, 5, is_digit));
    for (index, field) in fields.iter_mut().enumerate() {
        let end = run_end(bytes, at, 5, is_digit);
        let length = end - at;
        if !(1..=4).contains(&length) {
            return None;
        }
        *field = (number(&bytes[at..end]), length);
        at = end;
        if index < 2 {
            if byte_at(bytes, at) != separator {
                return None;
            }
            at += 1;
        }
    }
    if !ends_cleanly(bytes, at) {
        return None;
    }
    let [
        (first, first_length),
        (second, second_length),
        (third, third_length),
    ] = fields;
    let valid = if first_length == 4 {
        second_length <= 2 && third_length <= 2 && year(first, 4) && day_month(third, second)
    } else {
        first_length <= 2
            && second_length <= 2
            && year(third, third_length)
            && (day_month(first, second) || day_month(second, first))
    };
    valid.then_some(at)
}

/// `12 March 1984`, `12th of March, 1984` (from the day's run) or `March 12, 1984` (a month
/// word just before the day): where the date starts and ends.
fn spelled_date(
    bytes: &[u8],
    start: usize,
    leading: usize,
    word_end: usize,
) -> Option<(usize, usize)> {
    if leading > 2 {
        return None;
    }
    let day = number(&bytes[start..start + leading]);
    // The run is the day, perhaps with its ordinal suffix.
    let suffix = &bytes[start + leading..word_end];
    if !(suffix.is_empty() || is_ordinal_suffix(suffix)) || !(1..=31).contains(&day) {
        return None;
    }
    if byte_at(bytes, word_end) == b' ' && is_letter_start(byte_at(bytes, word_end + 1)) {
        // Day first: the month, perhaps after a filler word, then the year.
        let mut at = word_end + 1;
        let mut word = word_at(bytes, at);
        if DATE_FILLERS.iter().any(|filler| eq_lower(word, filler)) {
            at += word.len() + 1;
            word = word_at(bytes, at);
        }
        let month = month(word)?;
        at += word.len();
        at = after_filler(bytes, at);
        let end = year_after(bytes, at)?;
        return (day_month(day, month)).then_some((start, end));
    }
    // Month first: `March 12, 1984`, `Mar. 12, 1984`.
    if start < 2 || bytes[start - 1] != b' ' {
        return None;
    }
    let mut month_end = start - 1;
    if bytes[month_end - 1] == b'.' {
        month_end -= 1;
    }
    let month_start = (0..month_end)
        .rev()
        .take(10)
        .take_while(|&index| is_word_byte(bytes[index]))
        .last()?;
    if month_start > 0 && is_word_byte(bytes[month_start - 1]) {
        return None;
    }
    let month = month(&bytes[month_start..month_end])?;
    let at = if byte_at(bytes, word_end) == b',' {
        word_end + 1
    } else {
        word_end
    };
    let end = year_after(bytes, at)?;
    day_month(day, month).then_some((month_start, end))
}

/// A passport number (6 to 10 upper-case letters and digits, at least two digits) or a
/// medical record number (5 to 12 upper-case letters, digits and hyphens, at least five
/// digits), each after the words that name it: `passport no. X1234567`, `Reisepass
/// C01X00T47`, `MRN: 00482913`, `medical record number 4471-2209`, `patient ID 99812345`,
/// `hospital number 7712034`. `start..end` is a run the scan stopped at; returns its end.
#[inline]
pub(super) fn labelled_id(scanner: &mut Scanner<'_>, start: usize, end: usize) -> Option<usize> {
    let id_end = scanner.labels.id_end;
    if id_end > start || start - id_end > ID_LABEL_BYTES {
        return None;
    }
    let length = end - start;
    if !(5..=12).contains(&length) {
        return None;
    }
    labelled_id_after_label(scanner, start, end)
}

/// The rest of [`labelled_id`], for runs of its lengths.
#[cold]
#[inline(never)]
fn labelled_id_after_label(scanner: &mut Scanner<'_>, start: usize, end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let mut digits = 0;
    for &byte in &bytes[start..end] {
        match byte {
            b'0'..=b'9' => digits += 1,
            b'A'..=b'Z' | b'-' => {}
            _ => return None,
        }
    }
    if digits < 2 || !ends_cleanly(bytes, end) || !is_alphanumeric(bytes[end - 1]) {
        return None;
    }
    let length = end - start;
    let hyphens = bytes[start..end]
        .iter()
        .filter(|&&byte| byte == b'-')
        .count();
    let entity = match label_before(bytes, start)? {
        Label::Passport if hyphens == 0 && (6..=10).contains(&length) => EntityType::PassportNumber,
        Label::MedicalRecord if digits >= 5 => EntityType::MedicalRecordNumber,
        _ => return None,
    };
    scanner.push(entity, start, end, LABELLED_CONFIDENCE);
    Some(end)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Passport,
    MedicalRecord,
}

/// What a word before a value says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    /// `is`, `was`: may stand between a label and its value.
    Verb,
    /// `number`, `no`, `nr`, `num`, `nummer`, `numéro`: may stand there too, and makes
    /// `patient`, `chart`, `hospital` and `NHS` labels (`hospital number`).
    Number,
    /// `passport`, `Reisepass`, `passeport`, `pasaporte`...
    Passport,
    /// `MRN`, `patientId`: a record number's whole label.
    Mrn,
    /// `record`, `records` (a label after `medical`).
    Record,
    Medical,
    /// `ID`, `identifier` (a label after `passport` or `patient`).
    Id,
    Patient,
    /// `chart`, `hospital`, `NHS`: a label before `number`.
    Numbered,
    Other,
}

fn word_kind(word: &[u8]) -> Word {
    const LONGEST: usize = 15;
    if word.len() > LONGEST {
        return Word::Other;
    }
    let mut lower = [0_u8; LONGEST];
    for (slot, &byte) in lower.iter_mut().zip(word) {
        *slot = byte.to_ascii_lowercase();
    }
    match &lower[..word.len()] {
        b"is" | b"was" => Word::Verb,
        b"number" | b"no" | b"nr" | b"num" | b"nummer" | b"num\xc3\xa9ro" => Word::Number,
        b"passport" | b"passportnumber" | b"passportno" | b"reisepass" | b"reisepassnummer"
        | b"passnummer" | b"passeport" | b"pasaporte" | b"passaporto" | b"paspoort"
        | b"paszport" => Word::Passport,
        b"mrn" | b"patientid" => Word::Mrn,
        b"record" | b"records" => Word::Record,
        b"medical" => Word::Medical,
        b"id" | b"identifier" => Word::Id,
        b"patient" => Word::Patient,
        b"chart" | b"hospital" | b"nhs" => Word::Numbered,
        _ => Word::Other,
    }
}

/// The word that ends at `end` (after up to four separators such as `: `, `# `, `'s `,
/// `": "`, on the same line), and where it starts; `None` when there is none.
fn word_before(bytes: &[u8], mut end: usize) -> Option<(usize, &[u8])> {
    let mut skipped = 0;
    while end > 0 && !is_word_byte(bytes[end - 1]) {
        if bytes[end - 1] == b'\n' || skipped == 4 {
            return None;
        }
        end -= 1;
        skipped += 1;
    }
    let start = end
        - bytes[..end]
            .iter()
            .rev()
            .take(20)
            .take_while(|&&byte| is_word_byte(byte))
            .count();
    (start < end).then(|| (start, &bytes[start..end]))
}

/// Which label the words just before `start` are, if any: `passport number is`, `MRN:`,
/// `medical record no.`, `patient ID`, `hospital number`.
fn label_before(bytes: &[u8], start: usize) -> Option<Label> {
    let (mut at, mut word) = word_before(bytes, start)?;
    let mut kind = word_kind(word);
    let mut numbered = false;
    // Nearest first: skip up to two of `is`, `number`, `no`.
    for _ in 0..2 {
        match kind {
            Word::Verb => {}
            Word::Number => numbered = true,
            _ => break,
        }
        (at, word) = word_before(bytes, at)?;
        kind = word_kind(word);
    }
    let before = || word_before(bytes, at).map_or(Word::Other, |(_, word)| word_kind(word));
    match kind {
        Word::Passport => Some(Label::Passport),
        Word::Mrn => Some(Label::MedicalRecord),
        Word::Record => (before() == Word::Medical).then_some(Label::MedicalRecord),
        Word::Id => match before() {
            Word::Passport => Some(Label::Passport),
            Word::Patient => Some(Label::MedicalRecord),
            _ => None,
        },
        Word::Patient | Word::Numbered if numbered => Some(Label::MedicalRecord),
        _ => None,
    }
}

/// A byte of a word: an ASCII letter or digit, or any byte of a UTF-8 sequence (`März`,
/// `février`).
fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte >= 0x80
}

fn is_letter_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte >= 0x80
}

/// The word (letters, digits, UTF-8 bytes) starting at `at`.
fn word_at(bytes: &[u8], at: usize) -> &[u8] {
    let end = run_end(bytes, at, 16, is_word_byte);
    &bytes[at..end]
}

fn eq_lower(word: &[u8], lower: &str) -> bool {
    word.eq_ignore_ascii_case(lower.as_bytes())
}

/// The month a word names: English, German, French, Spanish and Italian names, and the
/// three- or four-letter abbreviations (whose `.` the caller skips).
fn month(word: &[u8]) -> Option<u32> {
    const LONGEST: usize = 10;
    if !(3..=LONGEST).contains(&word.len()) {
        return None;
    }
    let mut lower = [0_u8; LONGEST];
    for (slot, &byte) in lower.iter_mut().zip(word) {
        *slot = byte.to_ascii_lowercase();
    }
    // `ä`, `é`, `û` as their UTF-8 bytes.
    let number = match &lower[..word.len()] {
        b"january" | b"jan" | b"januar" | b"janvier" | b"enero" | b"gennaio" => 1,
        b"february" | b"feb" | b"februar" | b"f\xc3\xa9vrier" | b"febrero" | b"febbraio" => 2,
        b"march" | b"mar" | b"m\xc3\xa4rz" | b"mars" | b"marzo" => 3,
        b"april" | b"apr" | b"avril" | b"abril" | b"aprile" => 4,
        b"may" | b"mai" | b"mayo" | b"maggio" => 5,
        b"june" | b"jun" | b"juni" | b"juin" | b"junio" | b"giugno" => 6,
        b"july" | b"jul" | b"juli" | b"juillet" | b"julio" | b"luglio" => 7,
        b"august" | b"aug" | b"ao\xc3\xbbt" | b"agosto" => 8,
        b"september" | b"sep" | b"sept" | b"septembre" | b"septiembre" | b"settembre" => 9,
        b"october" | b"oct" | b"oktober" | b"octobre" | b"octubre" | b"ottobre" => 10,
        b"november" | b"nov" | b"novembre" | b"noviembre" => 11,
        b"december" | b"dec" | b"dezember" | b"d\xc3\xa9cembre" | b"diciembre" | b"dicembre" => 12,
        _ => return None,
    };
    Some(number)
}

/// After a month word: an abbreviation's `.`, a `,`, and one filler word (`de`), then one
/// space; where the year should start.
fn after_filler(bytes: &[u8], mut at: usize) -> usize {
    if matches!(byte_at(bytes, at), b'.' | b',') {
        at += 1;
    }
    if byte_at(bytes, at) == b' ' {
        let word = word_at(bytes, at + 1);
        if DATE_FILLERS.iter().any(|filler| eq_lower(word, filler))
            && byte_at(bytes, at + 1 + word.len()) == b' '
        {
            at += 1 + word.len();
        }
    }
    at
}

/// A space and a four-digit year from 1900 to 2099 at `at`; the year's end.
fn year_after(bytes: &[u8], at: usize) -> Option<usize> {
    if byte_at(bytes, at) != b' ' {
        return None;
    }
    let end = run_end(bytes, at + 1, 5, is_digit);
    (end - at - 1 == 4 && year(number(&bytes[at + 1..end]), 4) && ends_cleanly(bytes, end))
        .then_some(end)
}

fn is_ordinal_suffix(suffix: &[u8]) -> bool {
    ["st", "nd", "rd", "th"]
        .iter()
        .any(|ordinal| eq_lower(suffix, ordinal))
}

fn number(digits: &[u8]) -> u32 {
    digits
        .iter()
        .fold(0, |value, &digit| value * 10 + u32::from(digit - b'0'))
}

/// A year of a living person's birth: 1900 to 2099 written in full, or any two digits.
fn year(value: u32, length: usize) -> bool {
    match length {
        4 => (1900..=2099).contains(&value),
        2 => true,
        _ => false,
    }
}

/// Whether `day` exists in `month` (the 29th of February in any year).
fn day_month(day: u32, month: u32) -> bool {
    let days = match month {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return false,
    };
    (1..=days).contains(&day)
}

#[cfg(test)]
mod tests {
    use super::{BIRTH_LABELS, ID_LABELS, Labels, Word, note_label, word_kind};
    use crate::sensitivity::scan::Scanner;

    /// Where `text`'s last word (at `start`) leaves the labels once noted.
    fn noted(text: &str, start: usize) -> Labels {
        let mut scanner = Scanner {
            bytes: text.as_bytes(),
            found: Vec::new(),
            labels: Labels::default(),
        };
        note_label(&mut scanner, start, start + text[start..].len());
        scanner.labels
    }

    #[test]
    fn every_listed_label_is_noted_in_any_case() {
        for label in BIRTH_LABELS {
            let (text, start) = match *label {
                "n" => ("né".to_owned(), 0),
                "b" => ("D.O.B".to_owned(), 4),
                "delsedatum" => ("födelsedatum".to_owned(), 3),
                _ => (label.to_uppercase(), 0),
            };
            let end = start + text[start..].trim_end_matches('é').len();
            let mut scanner = Scanner {
                bytes: text.as_bytes(),
                found: Vec::new(),
                labels: Labels::default(),
            };
            note_label(&mut scanner, start, end);
            assert_eq!(scanner.labels.birth_end, end, "{label}");
        }
        for label in ID_LABELS {
            // The words a value's label is read from afterwards know every noted one.
            for word in label.split('_') {
                assert_ne!(word_kind(word.as_bytes()), Word::Other, "{label}: {word}");
            }
            let labels = noted(&label.to_uppercase(), 0);
            assert_eq!(labels.id_end, label.len(), "{label}");
            assert_eq!(labels.birth_end, usize::MAX, "{label}");
        }
        for word in ["n", "b", "delsedatum", "reborn", "births", "patients", "id"] {
            let labels = noted(word, 0);
            assert_eq!(
                (labels.birth_end, labels.id_end),
                (usize::MAX, usize::MAX),
                "{word}"
            );
        }
    }
}
