//! Incremental UTF-8 assembly of token pieces.
//!
//! A token's bytes need not end on a character boundary (byte-fallback tokenizers split
//! multi-byte characters across tokens), so the text of a stream is assembled here: complete
//! characters go out at once, an incomplete tail waits for the next piece, and bytes that can
//! never form a character become U+FFFD instead of being dropped or breaking the stream.

/// The longest incomplete UTF-8 sequence: a four-byte character missing its last byte.
const INCOMPLETE_BYTES_MAX: usize = 3;

/// Turns a sequence of byte pieces into a sequence of valid UTF-8 strings.
#[derive(Debug, Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// Appends `bytes` and returns every character that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match error.error_len() {
                        // An invalid sequence: replace it and carry on after it.
                        Some(invalid) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[invalid..];
                        }
                        // An incomplete sequence at the end: keep it for the next piece.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        debug_assert!(rest.len() <= INCOMPLETE_BYTES_MAX);
        self.pending = rest.to_vec();
        out
    }

    /// Ends the stream: an incomplete tail that never completed becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            return String::new();
        }
        self.pending.clear();
        char::REPLACEMENT_CHARACTER.to_string()
    }
}

#[cfg(test)]
mod tests;
