//! Reading the strings of a request body in one pass, without building a JSON tree: only the
//! strings that are collected are allocated.
//!
//! Two collections come out. The prompt texts (message content and parts, tool-call and
//! function-call arguments, legacy prompts, tool definitions) feed the complexity score and
//! the scan. Every other string of the body, and the keys of objects the reader does not
//! know (`user`, `stop`, `metadata`, `suffix`, `prediction`, `response_format`, a message's
//! `name`, ...), goes to `elsewhere`, which only the scan reads: the cloud leg forwards the
//! body as received, so nothing in it may leave unscanned.
//!
//! Numbers are read too, as their decimal text: a card number can be a JSON number as well
//! as a string. Only the numbers of the sampling parameters the reader knows (`seed`,
//! `temperature`, `max_tokens`, ...) are not: a random 16-digit seed passes a card check
//! one time in ten.
//!
//! A key that occurs twice in an object is read both times: parsers disagree on which
//! duplicate wins (most keep the last, some the first), so a value hidden in the copy this
//! parser would drop still reaches the scan. Counts (turns, tools, `max_tokens`) come from
//! the last occurrence, as a JSON tree keeps it.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::PromptTexts;

/// Collects the strings of `body`. A body this reader cannot read to its end is an error,
/// never an empty collection: besides what no JSON parser reads (not one object, trailing
/// bytes), it may be JSON that other parsers take, and would forward, while this one stops
/// (nesting deeper than 128 levels, a number beyond `f64`, a lone UTF-16 surrogate
/// escape) — and what the scan cannot read must not leave unread.
pub fn prompt_texts(body: &[u8]) -> Result<PromptTexts, String> {
    let mut body_facts = BodyFacts::default();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    Shaped(&mut body_facts)
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end())
        .map_err(|error| error.to_string())?;
    if !body_facts.object {
        return Err("the body is not a JSON object".to_owned());
    }
    // Legacy completions: each string of a `prompt` array is a prompt of its own.
    let prompt_strings = body_facts.prompt.len();
    let mut texts = body_facts.messages;
    texts.append(&mut body_facts.prompt);
    texts.append(&mut body_facts.tools);
    let mut turns = body_facts.turns;
    if body_facts.prompt_present {
        turns = turns.max(1);
    }
    let max_tokens = match body_facts.max_completion_tokens {
        Some(value) => value,
        None => body_facts.max_tokens.flatten(),
    };
    Ok(PromptTexts {
        texts,
        elsewhere: body_facts.elsewhere,
        joined: body_facts.joined,
        turns,
        tools: body_facts.tool_count,
        max_tokens: max_tokens.and_then(|tokens| u32::try_from(tokens).ok()),
        choices: body_facts
            .choices
            .map_or(1, |choices| u32::try_from(choices).unwrap_or(u32::MAX)),
        prompts: if body_facts.prompt_present {
            u32::try_from(prompt_strings).unwrap_or(u32::MAX).max(1)
        } else {
            1
        },
    })
}

/// Appends one string to `elsewhere`, a line of its own.
fn push_elsewhere(elsewhere: &mut String, text: &str) {
    if text.is_empty() {
        return;
    }
    if !elsewhere.is_empty() {
        elsewhere.push('\n');
    }
    elsewhere.push_str(text);
}

/// Appends the decimal text of a number to `elsewhere`, a line of its own.
fn push_number(elsewhere: &mut String, number: Number) {
    use std::fmt::Write;
    if !elsewhere.is_empty() {
        elsewhere.push('\n');
    }
    // Writing to a `String` cannot fail.
    let _ = match number {
        Number::Unsigned(value) => write!(elsewhere, "{value}"),
        Number::Negative(value) => write!(elsewhere, "{value}"),
    };
}

/// A JSON number worth scanning: an integer, or a float with an integral value that has
/// at most 19 digits (the longest numeric entity, a card); other floats hold no identifier.
#[derive(Clone, Copy)]
enum Number {
    Unsigned(u64),
    Negative(i64),
}

impl Number {
    /// The integral value of `value` as a [`Number`], if it has one of at most 19 digits.
    fn integral(value: f64) -> Option<Number> {
        const DIGITS_19: f64 = 1e19;
        if !value.is_finite() || value.fract() != 0.0 || value.abs() >= DIGITS_19 {
            return None;
        }
        // In range and integral: the casts are exact up to f64's own precision.
        if value >= 0.0 {
            Some(Number::Unsigned(value as u64))
        } else {
            Some(Number::Negative(value as i64))
        }
    }
}

/// What a value of each JSON shape contributes. By default its strings, the keys of its
/// objects and its numbers go to `elsewhere`.
trait Shapes<'de>: Sized {
    /// Where strings in shapes this reader does not expect go.
    fn elsewhere(&mut self) -> &mut String;

    fn string(mut self, text: &str) {
        push_elsewhere(self.elsewhere(), text);
    }

    fn seq<A: SeqAccess<'de>>(mut self, seq: A) -> Result<(), A::Error> {
        Elsewhere(self.elsewhere()).seq(seq)
    }

    fn map<A: MapAccess<'de>>(mut self, map: A) -> Result<(), A::Error> {
        Elsewhere(self.elsewhere()).map(map)
    }

    fn number(mut self, number: Number) {
        push_number(self.elsewhere(), number);
    }

    fn unsigned(self, value: u64) {
        self.number(Number::Unsigned(value));
    }
}

/// Drives a [`Shapes`] over whatever value comes next.
struct Shaped<S>(S);

impl<'de, S: Shapes<'de>> DeserializeSeed<'de> for Shaped<S> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, S: Shapes<'de>> Visitor<'de> for Shaped<S> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _value: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, value: i64) -> Result<(), E> {
        match u64::try_from(value) {
            Ok(value) => self.0.unsigned(value),
            Err(_) => self.0.number(Number::Negative(value)),
        }
        Ok(())
    }

    fn visit_u64<E>(self, value: u64) -> Result<(), E> {
        self.0.unsigned(value);
        Ok(())
    }

    fn visit_f64<E>(self, value: f64) -> Result<(), E> {
        if let Some(number) = Number::integral(value) {
            self.0.number(number);
        }
        Ok(())
    }

    fn visit_str<E>(self, text: &str) -> Result<(), E> {
        self.0.string(text);
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        self.0.seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.0.map(map)
    }
}

/// An object key, unescaped, without allocating when it has no escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(key)))
            }

            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(key.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A value this reader does not know: its strings and keys, all to `elsewhere`.
struct Elsewhere<'a>(&'a mut String);

impl<'de> Shapes<'de> for Elsewhere<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.0
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Shaped(Elsewhere(&mut *self.0)))?
            .is_some()
        {}
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            push_elsewhere(self.0, &key);
            map.next_value_seed(Shaped(Elsewhere(&mut *self.0)))?;
        }
        Ok(())
    }
}

/// The body's top level, gathered per field; assembled in a fixed order at the end.
#[derive(Default)]
struct BodyFacts {
    object: bool,
    messages: Vec<String>,
    turns: u32,
    prompt: Vec<String>,
    prompt_present: bool,
    tools: Vec<String>,
    tool_count: u32,
    /// `Some(None)`: present but not a non-negative integer.
    max_completion_tokens: Option<Option<u64>>,
    max_tokens: Option<Option<u64>>,
    /// `n`: the choices asked for.
    choices: Option<u64>,
    elsewhere: String,
    /// Runs of consecutive text parts, joined.
    joined: Vec<String>,
}

impl<'de> Shapes<'de> for &mut BodyFacts {
    fn elsewhere(&mut self) -> &mut String {
        &mut self.elsewhere
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.object = true;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let elsewhere = &mut self.elsewhere;
            match key.as_ref() {
                "messages" => {
                    let mut messages = Counted {
                        texts: &mut self.messages,
                        elsewhere,
                        joined: &mut self.joined,
                        elements: Elements::Messages,
                        count: None,
                    };
                    map.next_value_seed(Shaped(&mut messages))?;
                    self.turns = messages.count.unwrap_or(0);
                }
                "prompt" => {
                    let mut prompt = Prompt {
                        texts: &mut self.prompt,
                        elsewhere,
                        present: false,
                    };
                    map.next_value_seed(Shaped(&mut prompt))?;
                    self.prompt_present = prompt.present;
                }
                "tools" => {
                    let mut tools = Counted {
                        texts: &mut self.tools,
                        elsewhere,
                        joined: &mut self.joined,
                        elements: Elements::ToolDefinitions,
                        count: None,
                    };
                    map.next_value_seed(Shaped(&mut tools))?;
                    self.tool_count = tools.count.unwrap_or(0);
                }
                "max_completion_tokens" => {
                    let mut value = None;
                    map.next_value_seed(Shaped(Unsigned(&mut value, elsewhere)))?;
                    self.max_completion_tokens = Some(value);
                }
                "max_tokens" => {
                    let mut value = None;
                    map.next_value_seed(Shaped(Unsigned(&mut value, elsewhere)))?;
                    self.max_tokens = Some(value);
                }
                "n" => {
                    let mut value = None;
                    map.next_value_seed(Shaped(Unsigned(&mut value, elsewhere)))?;
                    self.choices = value;
                }
                "model" | "stream" | "temperature" | "top_p" | "seed" | "logprobs"
                | "top_logprobs" | "presence_penalty" | "frequency_penalty" | "ignore_eos" => {
                    map.next_value_seed(Shaped(Parameter(elsewhere)))?;
                }
                _ => {
                    push_elsewhere(elsewhere, &key);
                    map.next_value_seed(Shaped(Elsewhere(elsewhere)))?;
                }
            }
        }
        Ok(())
    }
}

/// A sampling parameter's value: a number is the parameter, not scanned; strings (and
/// anything inside an array or object) go to `elsewhere`.
struct Parameter<'a>(&'a mut String);

impl<'de> Shapes<'de> for Parameter<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.0
    }

    fn number(self, _number: Number) {}
}

/// A non-negative integer, else nothing; a number is the parameter, not scanned (and any
/// strings go to `elsewhere`).
struct Unsigned<'a>(&'a mut Option<u64>, &'a mut String);

impl<'de> Shapes<'de> for Unsigned<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.1
    }

    fn number(self, _number: Number) {}

    fn unsigned(self, value: u64) {
        *self.0 = Some(value);
    }
}

/// Every string inside a value, at any depth (tool arguments may be JSON text or structured);
/// keys are structure and go to `elsewhere`.
struct AnyStrings<'a>(&'a mut Vec<String>, &'a mut String);

impl<'de> Shapes<'de> for AnyStrings<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.1
    }

    fn string(self, text: &str) {
        self.0.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Shaped(AnyStrings(&mut *self.0, &mut *self.1)))?
            .is_some()
        {}
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            push_elsewhere(self.1, &key);
            map.next_value_seed(Shaped(AnyStrings(&mut *self.0, &mut *self.1)))?;
        }
        Ok(())
    }
}

/// `messages` or `tools`: an array of messages or tool definitions, counted (anything else
/// counts for nothing).
struct Counted<'a> {
    texts: &'a mut Vec<String>,
    elsewhere: &'a mut String,
    joined: &'a mut Vec<String>,
    elements: Elements,
    count: Option<u32>,
}

#[derive(Clone, Copy)]
enum Elements {
    /// Read as messages.
    Messages,
    /// Every string in them is prompt text.
    ToolDefinitions,
}

impl<'de> Shapes<'de> for &mut Counted<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.elsewhere
    }

    /// A model reads a conversation's messages one after another, so a value split across
    /// two of them (`"my card is 4111 1111"`, `"1111 1111"`) reaches it whole: each seam
    /// between adjacent messages' texts (the end of one and the start of the next, joined
    /// directly and with a blank) is also kept joined, like a run of text parts. A message
    /// with no text ends the chain.
    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut count = 0u32;
        // The index in `texts` of the last text of the message before, if it had text.
        let mut previous: Option<usize> = None;
        loop {
            let (texts, elsewhere) = (&mut *self.texts, &mut *self.elsewhere);
            let before = texts.len();
            let mut ends = Ends::default();
            let element = match self.elements {
                Elements::Messages => seq.next_element_seed(Shaped(Message(
                    texts,
                    elsewhere,
                    &mut *self.joined,
                    &mut ends,
                )))?,
                Elements::ToolDefinitions => {
                    seq.next_element_seed(Shaped(AnyStrings(texts, elsewhere)))?
                }
            };
            if element.is_none() {
                break;
            }
            count = count.saturating_add(1);
            // A message's content comes first among its texts.
            let (Some(first), Some(last)) = (ends.first, ends.last) else {
                previous = None;
                continue;
            };
            if let Some(previous) = previous {
                let tail = message_tail(&texts[previous]);
                let head = message_head(&texts[before + first]);
                self.joined
                    .extend([format!("{tail}{head}"), format!("{tail} {head}")]);
            }
            previous = Some(before + last);
        }
        self.count = Some(count);
        Ok(())
    }
}

/// Bytes of each message's end and start read across a seam between messages: enough for
/// a grouped card number, an IBAN or an e-mail address split there.
pub(crate) const SEAM_BYTES: usize = 64;

/// Where a message's first and last texts are among the texts its content added: its
/// content string, or its first and last text parts. Both `None` when its content has no
/// text (an image, an object), which ends a chain of seams.
#[derive(Debug, Default)]
struct Ends {
    first: Option<usize>,
    last: Option<usize>,
}

impl Ends {
    /// Notes the content's text at `index`, in order.
    fn text(&mut self, index: usize) {
        self.first.get_or_insert(index);
        self.last = Some(index);
    }
}

/// The first [`SEAM_BYTES`] of a message's text, or less, cut at a character boundary.
pub(crate) fn message_head(text: &str) -> &str {
    let mut end = text.len().min(SEAM_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The last [`SEAM_BYTES`] of a message's text, or less, cut at a character boundary.
pub(crate) fn message_tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(SEAM_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// One message: its content, then its tool-call and function-call arguments; its other
/// fields (`role`, `name`, ids) to `elsewhere`.
struct Message<'a>(
    &'a mut Vec<String>,
    &'a mut String,
    &'a mut Vec<String>,
    &'a mut Ends,
);

impl<'de> Shapes<'de> for Message<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.1
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Message(texts, elsewhere, joined, ends) = self;
        let mut content = Vec::new();
        let mut tool_calls = Vec::new();
        let mut function_call = Vec::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "content" => {
                    // The last copy of a repeated key is the content a JSON tree keeps.
                    *ends = Ends::default();
                    map.next_value_seed(Shaped(Content(&mut content, elsewhere, joined, ends)))?;
                }
                "tool_calls" => {
                    map.next_value_seed(Shaped(ToolCalls(&mut tool_calls, elsewhere)))?;
                }
                "function_call" => {
                    map.next_value_seed(Shaped(Field("arguments", &mut function_call, elsewhere)))?
                }
                "role" | "name" | "tool_call_id" => {
                    map.next_value_seed(Shaped(Elsewhere(elsewhere)))?;
                }
                _ => {
                    push_elsewhere(elsewhere, &key);
                    map.next_value_seed(Shaped(Elsewhere(elsewhere)))?;
                }
            }
        }
        texts.append(&mut content);
        texts.append(&mut tool_calls);
        texts.append(&mut function_call);
        Ok(())
    }
}

/// A message's content: a string, or parts whose `text` is taken (or, for a part without
/// a text string, every string in it), or any other value's strings.
struct Content<'a>(
    &'a mut Vec<String>,
    &'a mut String,
    &'a mut Vec<String>,
    &'a mut Ends,
);

impl<'de> Shapes<'de> for Content<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.1
    }

    fn string(self, text: &str) {
        self.3.text(self.0.len());
        self.0.push(text.to_owned());
    }

    /// Consecutive text parts reach a model as one text, so a value split between them
    /// (`"card 4111 1111"`, `" 1111 1111"`) is a value, and a control token split between
    /// them a control token: each run of two or more is also kept joined, for the scan (in
    /// `elsewhere`) and the firewall. A part of another kind (an image) ends a run.
    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Content(texts, elsewhere, runs, ends) = self;
        let mut joined = String::new();
        let mut run = 0u32;
        loop {
            let mut is_text = false;
            let read =
                seq.next_element_seed(Shaped(Part(&mut *texts, &mut *elsewhere, &mut is_text)))?;
            match (read.is_some() && is_text, texts.last()) {
                (true, Some(text)) => {
                    ends.text(texts.len() - 1);
                    joined.push_str(text);
                    run += 1;
                }
                _ => {
                    if run >= 2 {
                        runs.push(joined.clone());
                    }
                    joined.clear();
                    run = 0;
                }
            }
            if read.is_none() {
                return Ok(());
            }
        }
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        AnyStrings(self.0, self.1).map(map)
    }
}

/// One content part; the flag says whether it was a text part (its one `text` a string,
/// which is then the last of the texts).
struct Part<'a>(&'a mut Vec<String>, &'a mut String, &'a mut bool);

impl<'de> Shapes<'de> for Part<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.1
    }

    fn string(self, text: &str) {
        *self.2 = true;
        self.0.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        AnyStrings(self.0, self.1).seq(seq)
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // A part whose one `text` is a string contributes that string to the texts and its
        // other strings to `elsewhere`; any other part (and one with several `text` keys)
        // every string in it to the texts.
        let Part(texts, elsewhere, is_text) = self;
        let mut text_keys = 0u32;
        let mut text = TextValue {
            strings: Vec::new(),
            is_string: false,
            keys: String::new(),
        };
        let mut others = Vec::new();
        let mut keys = String::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            push_elsewhere(&mut keys, &key);
            if key == "text" {
                text_keys += 1;
                text.is_string = false;
                map.next_value_seed(Shaped(&mut text))?;
            } else {
                map.next_value_seed(Shaped(AnyStrings(&mut others, &mut keys)))?;
            }
        }
        if text_keys == 1 && text.is_string {
            *is_text = true;
            texts.append(&mut text.strings);
            for other in &others {
                push_elsewhere(elsewhere, other);
            }
        } else {
            texts.append(&mut text.strings);
            texts.append(&mut others);
        }
        push_elsewhere(elsewhere, &keys);
        push_elsewhere(elsewhere, &text.keys);
        Ok(())
    }
}

/// The value of a part's `text` key: its strings, whether it is one string, and the keys of
/// any objects in it.
struct TextValue {
    strings: Vec<String>,
    is_string: bool,
    keys: String,
}

impl<'de> Shapes<'de> for &mut TextValue {
    fn elsewhere(&mut self) -> &mut String {
        &mut self.keys
    }

    fn string(self, text: &str) {
        self.is_string = true;
        self.strings.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        AnyStrings(&mut self.strings, &mut self.keys).seq(seq)
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        AnyStrings(&mut self.strings, &mut self.keys).map(map)
    }
}

/// `tool_calls`: each call's `function.arguments`.
struct ToolCalls<'a>(&'a mut Vec<String>, &'a mut String);

impl<'de> Shapes<'de> for ToolCalls<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.1
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Shaped(Field("function", &mut *self.0, &mut *self.1)))?
            .is_some()
        {}
        Ok(())
    }
}

/// An object's field `name`: for `function`, its `arguments`; for `arguments`, every string.
/// The object's other fields go to `elsewhere`.
struct Field<'a>(&'static str, &'a mut Vec<String>, &'a mut String);

impl<'de> Shapes<'de> for Field<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.2
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Field(name, texts, elsewhere) = self;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key != name {
                push_elsewhere(elsewhere, &key);
                map.next_value_seed(Shaped(Elsewhere(&mut *elsewhere)))?;
            } else if name == "function" {
                map.next_value_seed(Shaped(Field("arguments", &mut *texts, &mut *elsewhere)))?;
            } else {
                map.next_value_seed(Shaped(Arguments(&mut *texts, &mut *elsewhere)))?;
            }
        }
        Ok(())
    }
}

/// A call's `arguments`: JSON text in a string (or, from some clients, structured). The text
/// is prompt text as written; where it escapes characters (`\u00a0`, `\"`), the strings it
/// decodes to go to `elsewhere` as well, so that a value written with escapes is scanned as
/// the value it is.
struct Arguments<'a>(&'a mut Vec<String>, &'a mut String);

impl<'de> Shapes<'de> for Arguments<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.1
    }

    fn string(self, text: &str) {
        if text.contains('\\')
            && let Ok(decoded) = serde_json::from_str::<serde_json::Value>(text)
        {
            push_decoded_strings(self.1, &decoded);
        }
        self.0.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        AnyStrings(self.0, self.1).seq(seq)
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        AnyStrings(self.0, self.1).map(map)
    }
}

/// Every key and string of `value`, each a line of `elsewhere`.
fn push_decoded_strings(elsewhere: &mut String, value: &serde_json::Value) {
    match value {
        serde_json::Value::String(text) => push_elsewhere(elsewhere, text),
        serde_json::Value::Array(items) => items
            .iter()
            .for_each(|item| push_decoded_strings(elsewhere, item)),
        serde_json::Value::Object(fields) => {
            for (key, item) in fields {
                push_elsewhere(elsewhere, key);
                push_decoded_strings(elsewhere, item);
            }
        }
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {}
    }
}

/// Legacy `prompt`: a string or an array (of strings or token arrays).
struct Prompt<'a> {
    texts: &'a mut Vec<String>,
    elsewhere: &'a mut String,
    present: bool,
}

impl<'de> Shapes<'de> for &mut Prompt<'_> {
    fn elsewhere(&mut self) -> &mut String {
        self.elsewhere
    }

    fn string(self, text: &str) {
        self.present = true;
        self.texts.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        self.present = true;
        AnyStrings(&mut *self.texts, &mut *self.elsewhere).seq(seq)
    }
}
