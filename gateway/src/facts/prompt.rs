//! Reading the prompt-bearing strings of a request body in one pass, without building a JSON
//! tree: only the strings that are collected are allocated.
//!
//! A key that occurs twice in an object is read both times, and the strings of both values
//! are collected: parsers disagree on which duplicate wins (most keep the last, some the
//! first), so a value hidden in the copy this parser would drop still reaches the scan.
//! Counts (turns, tools, `max_tokens`) come from the last occurrence, as a JSON tree keeps it.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::PromptTexts;

/// Collects every prompt-bearing string of `body`; a body that is not one JSON object gives
/// nothing (the envelope parse has refused it already).
pub fn prompt_texts(body: &[u8]) -> PromptTexts {
    let mut body_facts = BodyFacts::default();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let read = Shaped(&mut body_facts).deserialize(&mut deserializer);
    if read.is_err() || deserializer.end().is_err() || !body_facts.object {
        return PromptTexts::default();
    }
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
    PromptTexts {
        texts,
        turns,
        tools: body_facts.tool_count,
        max_tokens: max_tokens.and_then(|tokens| u32::try_from(tokens).ok()),
    }
}

/// What a value of each JSON shape contributes; by default nothing (the value is skipped).
trait Shapes<'de>: Sized {
    fn string(self, _text: &str) {}

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn unsigned(self, _value: u64) {}
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
        if let Ok(value) = u64::try_from(value) {
            self.0.unsigned(value);
        }
        Ok(())
    }

    fn visit_u64<E>(self, value: u64) -> Result<(), E> {
        self.0.unsigned(value);
        Ok(())
    }

    fn visit_f64<E>(self, _value: f64) -> Result<(), E> {
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
}

impl<'de> Shapes<'de> for &mut BodyFacts {
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.object = true;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "messages" => {
                    let mut messages = Messages {
                        texts: &mut self.messages,
                        count: None,
                    };
                    map.next_value_seed(Shaped(&mut messages))?;
                    self.turns = messages.count.unwrap_or(0);
                }
                "prompt" => {
                    let mut prompt = Prompt {
                        texts: &mut self.prompt,
                        present: false,
                    };
                    map.next_value_seed(Shaped(&mut prompt))?;
                    self.prompt_present = prompt.present;
                }
                "tools" => {
                    let mut tools = Tools {
                        texts: &mut self.tools,
                        count: None,
                    };
                    map.next_value_seed(Shaped(&mut tools))?;
                    self.tool_count = tools.count.unwrap_or(0);
                }
                "max_completion_tokens" => {
                    let mut value = None;
                    map.next_value_seed(Shaped(Unsigned(&mut value)))?;
                    self.max_completion_tokens = Some(value);
                }
                "max_tokens" => {
                    let mut value = None;
                    map.next_value_seed(Shaped(Unsigned(&mut value)))?;
                    self.max_tokens = Some(value);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A non-negative integer, else nothing.
struct Unsigned<'a>(&'a mut Option<u64>);

impl<'de> Shapes<'de> for Unsigned<'_> {
    fn unsigned(self, value: u64) {
        *self.0 = Some(value);
    }
}

/// Every string inside a value, at any depth (tool arguments may be JSON text or structured).
struct AnyStrings<'a>(&'a mut Vec<String>);

impl<'de> Shapes<'de> for AnyStrings<'_> {
    fn string(self, text: &str) {
        self.0.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Shaped(AnyStrings(&mut *self.0)))?
            .is_some()
        {}
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Shaped(AnyStrings(&mut *self.0)))?;
        }
        Ok(())
    }
}

/// `messages`: an array of messages (anything else counts for nothing).
struct Messages<'a> {
    texts: &'a mut Vec<String>,
    count: Option<u32>,
}

impl<'de> Shapes<'de> for &mut Messages<'_> {
    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut count = 0u32;
        while seq
            .next_element_seed(Shaped(Message(&mut *self.texts)))?
            .is_some()
        {
            count = count.saturating_add(1);
        }
        self.count = Some(count);
        Ok(())
    }
}

/// One message: its content, then its tool-call and function-call arguments.
struct Message<'a>(&'a mut Vec<String>);

impl<'de> Shapes<'de> for Message<'_> {
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut content = Vec::new();
        let mut tool_calls = Vec::new();
        let mut function_call = Vec::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "content" => map.next_value_seed(Shaped(Content(&mut content)))?,
                "tool_calls" => map.next_value_seed(Shaped(ToolCalls(&mut tool_calls)))?,
                "function_call" => {
                    map.next_value_seed(Shaped(Field("arguments", &mut function_call)))?
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        self.0.append(&mut content);
        self.0.append(&mut tool_calls);
        self.0.append(&mut function_call);
        Ok(())
    }
}

/// A message's content: a string, or parts whose `text` is taken (or, for a part without
/// a text string, every string in it), or any other value's strings.
struct Content<'a>(&'a mut Vec<String>);

impl<'de> Shapes<'de> for Content<'_> {
    fn string(self, text: &str) {
        self.0.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Shaped(Part(&mut *self.0)))?.is_some() {}
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        AnyStrings(self.0).map(map)
    }
}

/// One content part.
struct Part<'a>(&'a mut Vec<String>);

impl<'de> Shapes<'de> for Part<'_> {
    fn string(self, text: &str) {
        self.0.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        AnyStrings(self.0).seq(seq)
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // A part whose one `text` is a string contributes that string; any other part (and
        // one with several `text` keys) every string in it.
        let mut text_keys = 0u32;
        let mut text = TextValue {
            strings: Vec::new(),
            is_string: false,
        };
        let mut all = Vec::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key == "text" {
                text_keys += 1;
                text.is_string = false;
                let start = text.strings.len();
                map.next_value_seed(Shaped(&mut text))?;
                all.extend(text.strings[start..].iter().cloned());
            } else {
                map.next_value_seed(Shaped(AnyStrings(&mut all)))?;
            }
        }
        if text_keys == 1 && text.is_string {
            self.0.append(&mut text.strings);
        } else {
            self.0.append(&mut all);
        }
        Ok(())
    }
}

/// The value of a part's `text` key: its strings, and whether it is one string.
struct TextValue {
    strings: Vec<String>,
    is_string: bool,
}

impl<'de> Shapes<'de> for &mut TextValue {
    fn string(self, text: &str) {
        self.is_string = true;
        self.strings.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        AnyStrings(&mut self.strings).seq(seq)
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        AnyStrings(&mut self.strings).map(map)
    }
}

/// `tool_calls`: each call's `function.arguments`.
struct ToolCalls<'a>(&'a mut Vec<String>);

impl<'de> Shapes<'de> for ToolCalls<'_> {
    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Shaped(Field("function", &mut *self.0)))?
            .is_some()
        {}
        Ok(())
    }
}

/// An object's field `name`: for `function`, its `arguments`; for `arguments`, every string.
struct Field<'a>(&'static str, &'a mut Vec<String>);

impl<'de> Shapes<'de> for Field<'_> {
    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Field(name, texts) = self;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key != name {
                map.next_value::<IgnoredAny>()?;
            } else if name == "function" {
                map.next_value_seed(Shaped(Field("arguments", &mut *texts)))?;
            } else {
                map.next_value_seed(Shaped(AnyStrings(&mut *texts)))?;
            }
        }
        Ok(())
    }
}

/// Legacy `prompt`: a string or an array (of strings or token arrays).
struct Prompt<'a> {
    texts: &'a mut Vec<String>,
    present: bool,
}

impl<'de> Shapes<'de> for &mut Prompt<'_> {
    fn string(self, text: &str) {
        self.present = true;
        self.texts.push(text.to_owned());
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        self.present = true;
        AnyStrings(&mut *self.texts).seq(seq)
    }
}

/// `tools`: the definitions, every string in them.
struct Tools<'a> {
    texts: &'a mut Vec<String>,
    count: Option<u32>,
}

impl<'de> Shapes<'de> for &mut Tools<'_> {
    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut count = 0u32;
        while seq
            .next_element_seed(Shaped(AnyStrings(&mut *self.texts)))?
            .is_some()
        {
            count = count.saturating_add(1);
        }
        self.count = Some(count);
        Ok(())
    }
}
