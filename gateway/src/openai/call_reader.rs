//! Reads an answer to a request that offered functions while its text arrives, so that a
//! stream carries it as OpenAI streams one: a call's name as soon as it is written, then its
//! arguments piece by piece, and an `auto` answer without a call (`{"response": <text>}`) as
//! plain text piece by piece instead of in one chunk at the end.
//!
//! The grammar the model follows (`{"name": ..., "arguments": ...}`, several calls as
//! `{"tool_calls": [{"name": ..., "arguments": ...}, ...]}`, or `{"response": ...}`, with the
//! whitespace JSON allows) guarantees the shape; anything else makes the reader give up, and
//! the whole answer is then read at its end. With a `response_format` beside the tools, the
//! `response` is a JSON value of that format instead of a string: its JSON text is the
//! answer's text, given out as it is written.

/// What newly arrived answer text contributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text of an answer without a call, decoded from its JSON string.
    Text(String),
    /// Call `at` (0 for the first) begins: the called function's name.
    Call { at: usize, name: String },
    /// More of call `at`'s arguments, as compact JSON text (see [`compact_json`]).
    Arguments { at: usize, text: String },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the answer's `{`.
    #[default]
    Open,
    /// Before a key, or the closing `}`.
    Key,
    /// Between a key and its value.
    Colon(Field),
    /// Before a value.
    Value(Field),
    /// Inside the `response` string.
    Response,
    /// Inside a `response` that is a JSON value (a `response_format`'s), not a string.
    StructuredResponse,
    /// Inside the `arguments` value.
    Arguments,
    /// After a value: `,` or `}`.
    AfterValue,
    /// Before a call of `tool_calls`, or the list's `]`.
    CallsItem,
    /// After a call of `tool_calls`: `,` or `]`.
    CallsNext,
    /// The answer's object is complete.
    Done,
    /// Not the expected shape: nothing more is read.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Arguments,
    Response,
    Calls,
}

/// Reads one choice's answer as it arrives.
#[derive(Debug, Default)]
pub struct CallReader {
    text: String,
    /// Next byte of `text` to read.
    at: usize,
    phase: Phase,
    /// Inside `tool_calls` (several calls).
    in_calls: bool,
    /// Calls begun so far; the current one is the last.
    calls: usize,
    /// The current call's name has been given out.
    named: bool,
    /// A call's name has been given out.
    called: bool,
    /// Arguments read before the name (a grammar that put them first), held until it.
    early_arguments: String,
    arguments: Compactor,
    /// Nesting of the arguments value read so far, and whether it has begun.
    depth: usize,
    begun: bool,
    /// Some answer text has been given out.
    texted: bool,
}

impl CallReader {
    /// Appends `text` and returns what it completed.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.text.push_str(text);
        let mut pieces = Vec::new();
        while self.step(&mut pieces) {}
        pieces
    }

    /// Whether a call's name has been given out (the calls are being streamed).
    pub fn called(&self) -> bool {
        self.called
    }

    /// The current call's position.
    fn call_index(&self) -> usize {
        self.calls.saturating_sub(1)
    }

    /// A call's object begins: at the top (one call) or in `tool_calls`.
    fn begin_call(&mut self) {
        self.calls += 1;
        self.named = false;
        self.early_arguments.clear();
        self.arguments = Compactor::default();
        self.depth = 0;
        self.begun = false;
    }

    /// The object that just closed: a call of `tool_calls`, or the answer.
    fn close_object(&mut self) -> bool {
        self.enter(if self.in_calls {
            Phase::CallsNext
        } else {
            Phase::Done
        })
    }

    /// Whether answer text has been given out.
    pub fn texted(&self) -> bool {
        self.texted
    }

    /// Whether the answer so far is not of the expected shape (nothing more is read).
    pub fn failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    /// Skips JSON whitespace; false when the text ends first.
    fn skip_space(&mut self) -> bool {
        let rest = &self.text[self.at..];
        let trimmed = rest.trim_start_matches([' ', '\t', '\n', '\r']);
        self.at += rest.len() - trimmed.len();
        !trimmed.is_empty()
    }

    /// Takes the expected byte `want`; false (and fails the reader) on another.
    fn expect(&mut self, want: u8) -> bool {
        if self.rest().as_bytes().first() == Some(&want) {
            self.at += 1;
            true
        } else {
            self.phase = Phase::Failed;
            false
        }
    }

    /// A whole JSON string at the read position, decoded; `None` while it is incomplete.
    fn whole_string(&mut self) -> Option<Result<String, ()>> {
        let rest = &self.text[self.at..];
        if !rest.starts_with('"') {
            return Some(Err(()));
        }
        let mut escaped = false;
        for (offset, byte) in rest.bytes().enumerate().skip(1) {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => {
                    let literal = &rest[..=offset];
                    let decoded = serde_json::from_str::<String>(literal).map_err(|_| ());
                    self.at += offset + 1;
                    return Some(decoded);
                }
                _ => {}
            }
        }
        None
    }

    /// Advances one phase as far as the text allows; false when it must wait for more.
    fn step(&mut self, pieces: &mut Vec<Piece>) -> bool {
        match self.phase {
            Phase::Done | Phase::Failed => false,
            Phase::Open => {
                if !(self.skip_space() && self.expect(b'{')) {
                    return false;
                }
                self.begin_call();
                self.enter(Phase::Key)
            }
            Phase::Key => {
                if !self.skip_space() {
                    return false;
                }
                if self.rest().starts_with('}') {
                    self.at += 1;
                    return self.close_object();
                }
                let top = !self.in_calls;
                match self.whole_string() {
                    None => false,
                    Some(Ok(key)) => match key.as_str() {
                        "name" => self.enter(Phase::Colon(Field::Name)),
                        "arguments" => self.enter(Phase::Colon(Field::Arguments)),
                        "response" if top => self.enter(Phase::Colon(Field::Response)),
                        "tool_calls" if top => self.enter(Phase::Colon(Field::Calls)),
                        _ => self.enter(Phase::Failed),
                    },
                    Some(Err(())) => self.enter(Phase::Failed),
                }
            }
            Phase::Colon(field) => {
                self.skip_space() && self.expect(b':') && self.enter(Phase::Value(field))
            }
            Phase::Value(field) => {
                if !self.skip_space() {
                    return false;
                }
                match field {
                    Field::Name => match self.whole_string() {
                        None => false,
                        Some(Ok(name)) => {
                            let at = self.call_index();
                            pieces.push(Piece::Call { at, name });
                            self.named = true;
                            self.called = true;
                            if !self.early_arguments.is_empty() {
                                let text = std::mem::take(&mut self.early_arguments);
                                pieces.push(Piece::Arguments { at, text });
                            }
                            self.enter(Phase::AfterValue)
                        }
                        Some(Err(())) => self.enter(Phase::Failed),
                    },
                    Field::Response => {
                        if self.rest().starts_with('"') {
                            self.at += 1;
                            self.enter(Phase::Response)
                        } else {
                            self.enter(Phase::StructuredResponse)
                        }
                    }
                    Field::Arguments => self.enter(Phase::Arguments),
                    Field::Calls => {
                        // The list replaces the top object's single call.
                        self.calls = 0;
                        self.in_calls = true;
                        self.expect(b'[') && self.enter(Phase::CallsItem)
                    }
                }
            }
            Phase::Response => self.read_response(pieces),
            Phase::StructuredResponse => {
                let (out, ended) = self.copy_value();
                if !out.is_empty() {
                    self.texted = true;
                    pieces.push(Piece::Text(out));
                }
                ended
            }
            Phase::Arguments => {
                let (out, ended) = self.copy_value();
                if !out.is_empty() {
                    if self.named {
                        pieces.push(Piece::Arguments {
                            at: self.call_index(),
                            text: out,
                        });
                    } else {
                        self.early_arguments.push_str(&out);
                    }
                }
                ended
            }
            Phase::AfterValue => match self.next_byte() {
                None => false,
                Some(b',') => self.enter(Phase::Key),
                Some(b'}') => self.close_object(),
                Some(_) => self.enter(Phase::Failed),
            },
            Phase::CallsItem => match self.next_byte() {
                None => false,
                Some(b'{') => {
                    self.begin_call();
                    self.enter(Phase::Key)
                }
                Some(b']') => self.end_calls(),
                Some(_) => self.enter(Phase::Failed),
            },
            Phase::CallsNext => match self.next_byte() {
                None => false,
                Some(b',') => self.enter(Phase::CallsItem),
                Some(b']') => self.end_calls(),
                Some(_) => self.enter(Phase::Failed),
            },
        }
    }

    /// Skips whitespace and takes the next byte; `None` while the text ends first.
    fn next_byte(&mut self) -> Option<u8> {
        if !self.skip_space() {
            return None;
        }
        let byte = self.text.as_bytes()[self.at];
        self.at += 1;
        Some(byte)
    }

    /// `tool_calls` ended: the top object goes on.
    fn end_calls(&mut self) -> bool {
        self.in_calls = false;
        self.enter(Phase::AfterValue)
    }

    fn enter(&mut self, phase: Phase) -> bool {
        self.phase = phase;
        true
    }

    /// Decodes the `response` string up to its end or to the last character that is whole
    /// (an escape is decoded once all of it, a surrogate pair included, has arrived).
    fn read_response(&mut self, pieces: &mut Vec<Piece>) -> bool {
        let mut out = String::new();
        let mut ended = false;
        loop {
            let rest = &self.text[self.at..];
            let plain = rest.find(['"', '\\']).unwrap_or(rest.len());
            out.push_str(&rest[..plain]);
            self.at += plain;
            let rest = &self.text[self.at..];
            if rest.is_empty() {
                break;
            }
            if rest.starts_with('"') {
                self.at += 1;
                ended = true;
                break;
            }
            match decode_escape(rest) {
                Escape::Whole(character, length) => {
                    out.push(character);
                    self.at += length;
                }
                Escape::Partial => break,
                Escape::Invalid => {
                    self.phase = Phase::Failed;
                    break;
                }
            }
        }
        if !out.is_empty() {
            self.texted = true;
            pieces.push(Piece::Text(out));
        }
        if ended {
            self.phase = Phase::AfterValue;
        }
        ended
    }

    /// Copies the JSON value at the read position (a call's arguments, a structured
    /// response), compacted, up to its end or the end of the text: what was copied, and
    /// whether the value ended.
    fn copy_value(&mut self) -> (String, bool) {
        let mut out = String::new();
        let mut ended = false;
        let mut used = 0;
        for character in self.text[self.at..].chars() {
            let outside = !self.arguments.in_string;
            if outside && self.depth == 0 && self.begun && matches!(character, ',' | '}') {
                // The end of a scalar value: the `,` or `}` is the object's.
                ended = true;
                break;
            }
            used += character.len_utf8();
            if outside {
                match character {
                    '{' | '[' => self.depth += 1,
                    '}' | ']' => self.depth = self.depth.saturating_sub(1),
                    ' ' | '\t' | '\n' | '\r' => {
                        if self.depth == 0 && self.begun {
                            ended = true;
                            break;
                        }
                        continue;
                    }
                    _ => {}
                }
            }
            self.begun = true;
            self.arguments.push(character, &mut out);
            if self.depth == 0 && !self.arguments.in_string && matches!(character, '}' | ']' | '"')
            {
                ended = true;
                break;
            }
        }
        self.at += used;
        if ended {
            self.phase = Phase::AfterValue;
        }
        (out, ended)
    }
}

enum Escape {
    /// The character and the escape's length in bytes.
    Whole(char, usize),
    /// More text must arrive first.
    Partial,
    Invalid,
}

/// Decodes the escape at the start of `text` (which starts with `\`).
fn decode_escape(text: &str) -> Escape {
    let bytes = text.as_bytes();
    let Some(&kind) = bytes.get(1) else {
        return Escape::Partial;
    };
    let simple = match kind {
        b'"' => Some('"'),
        b'\\' => Some('\\'),
        b'/' => Some('/'),
        b'b' => Some('\u{8}'),
        b'f' => Some('\u{c}'),
        b'n' => Some('\n'),
        b'r' => Some('\r'),
        b't' => Some('\t'),
        b'u' => None,
        _ => return Escape::Invalid,
    };
    if let Some(character) = simple {
        return Escape::Whole(character, 2);
    }
    let unit = |at: usize| -> Option<Option<u32>> {
        let hex = text.get(at..at + 4)?;
        Some(u32::from_str_radix(hex, 16).ok())
    };
    let Some(first) = unit(2) else {
        return if text.len() < 6 {
            Escape::Partial
        } else {
            Escape::Invalid
        };
    };
    let Some(first) = first else {
        return Escape::Invalid;
    };
    if !(0xD800..0xDC00).contains(&first) {
        return char::from_u32(first)
            .map_or(Escape::Invalid, |character| Escape::Whole(character, 6));
    }
    // A high surrogate: its low half follows as another `\uXXXX`.
    if text.len() < 12 {
        return if text.as_bytes().get(6..8).is_none_or(|next| next == b"\\u") {
            Escape::Partial
        } else {
            Escape::Invalid
        };
    }
    // Bytes, not a `str` slice: byte 8 may fall inside a character that follows the escape.
    if text.as_bytes().get(6..8) != Some(b"\\u".as_slice()) {
        return Escape::Invalid;
    }
    match unit(8) {
        Some(Some(second)) if (0xDC00..0xE000).contains(&second) => {
            let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
            char::from_u32(code).map_or(Escape::Invalid, |character| Escape::Whole(character, 12))
        }
        _ => Escape::Invalid,
    }
}

/// Drops JSON whitespace outside strings, character by character.
#[derive(Debug, Default, Clone, Copy)]
struct Compactor {
    in_string: bool,
    escaped: bool,
}

impl Compactor {
    fn push(&mut self, character: char, out: &mut String) {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if character == '\\' {
                self.escaped = true;
            } else if character == '"' {
                self.in_string = false;
            }
            out.push(character);
            return;
        }
        match character {
            ' ' | '\t' | '\n' | '\r' => {}
            '"' => {
                self.in_string = true;
                out.push(character);
            }
            _ => out.push(character),
        }
    }
}

/// `raw` JSON text without the whitespace between its tokens, members in the order written:
/// a call's `arguments` as the model wrote them, the same whole or streamed.
pub fn compact_json(raw: &str) -> String {
    let mut compactor = Compactor::default();
    let mut out = String::with_capacity(raw.len());
    for character in raw.chars() {
        compactor.push(character, &mut out);
    }
    out
}

#[cfg(test)]
mod tests;
