//! Stop sequences: end generation at the first occurrence of any stop string without ever
//! emitting part of it.
//!
//! Text that could still grow into a stop string is held back until the next piece decides
//! it: either the stop string completes (the held text is dropped and generation ends) or it
//! cannot any more (the held text goes out). Matching works on characters, so a stop string
//! split across tokens is still found.
//!
//! What a request asked to know of each token (its log-probabilities) travels with the
//! token's text: [`TokenValues`] releases a token's value once some of its text has gone
//! out, and drops the values of the tokens that made up a stop string, so that the values
//! a client receives are those of the text it receives.

use std::collections::VecDeque;

/// What the caller does after a piece of text was pushed.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text (possibly empty) and keep generating.
    Continue(String),
    /// Emit this text (possibly empty), which precedes the stop string, and stop.
    Stopped(String),
}

/// Finds stop strings in a stream of text.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops`; empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|stop| !stop.is_empty()).collect();
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Appends `text` and says what may be emitted.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_owned());
        }
        self.held.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(start) = earliest {
            let before = self.held[..start].to_owned();
            self.held.clear();
            return StopOutcome::Stopped(before);
        }
        let keep_from = self.partial_match_start();
        let emit = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        StopOutcome::Continue(emit)
    }

    /// Ends the stream: text held back because it might have started a stop string goes out.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The start of the longest suffix of the held text that is a proper prefix of a stop
    /// string (the held text's length when there is none).
    fn partial_match_start(&self) -> usize {
        let held = self.held.as_str();
        held.char_indices()
            .map(|(index, _)| index)
            .find(|&index| {
                let suffix = &held[index..];
                self.stops
                    .iter()
                    .any(|stop| stop.len() > suffix.len() && stop.starts_with(suffix))
            })
            .unwrap_or(held.len())
    }
}

/// Values of tokens, each released with the first byte of its token's text that goes out.
#[derive(Debug)]
pub struct TokenValues<T> {
    /// The values not yet released, with where their token's text starts.
    held: VecDeque<(usize, T)>,
    /// Bytes of text pushed (as given to the [`StopMatcher`]).
    pushed: usize,
    /// Bytes of text that went out.
    released: usize,
}

impl<T> Default for TokenValues<T> {
    fn default() -> Self {
        TokenValues {
            held: VecDeque::new(),
            pushed: 0,
            released: 0,
        }
    }
}

impl<T> TokenValues<T> {
    /// A token made `text_len` bytes of text (none while its bytes end inside a character);
    /// `value` is what goes out with it.
    pub fn push(&mut self, text_len: usize, value: Option<T>) {
        if let Some(value) = value {
            self.held.push_back((self.pushed, value));
        }
        self.pushed += text_len;
    }

    /// `emitted_len` more bytes of text went out: the values of the tokens whose text began
    /// before their end. A token whose bytes completed no character yet waits for the token
    /// that completes it.
    pub fn release(&mut self, emitted_len: usize, out: &mut Vec<T>) {
        self.released += emitted_len;
        while let Some((start, _)) = self.held.front() {
            if *start >= self.released {
                break;
            }
            if let Some((_, value)) = self.held.pop_front() {
                out.push(value);
            }
        }
    }

    /// The text has ended and every held byte went out: every value still held.
    pub fn finish(&mut self, out: &mut Vec<T>) {
        self.released = self.pushed;
        out.extend(self.held.drain(..).map(|(_, value)| value));
    }
}

#[cfg(test)]
mod tests;
