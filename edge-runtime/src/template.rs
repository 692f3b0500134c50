//! Chat templates as the model ships them: the Jinja text in the GGUF's
//! `tokenizer.chat_template`, rendered the way Hugging Face's `apply_chat_template` renders
//! it (`trim_blocks`, `lstrip_blocks`, loop controls, Python's string and dict methods), so
//! the model sees the prompt it was trained on, default system message included.
//!
//! A template that does not compile, or cannot render a plain user turn, is not used: the
//! caller falls back to llama.cpp's built-in formats and says so at load. A template that
//! drops system messages or refuses them gets them joined to the next user message instead,
//! so an OpenAI client's system message always reaches the model.

use minijinja::{Environment, Error, ErrorKind, Value, syntax::SyntaxConfig};

use crate::{ChatMessage, Role};

/// Jinja instructions one rendering may execute: a real template spends tens per message
/// (50 turns render in about 40 µs, `benches/template.rs`), so this bounds a template that
/// loops without end to a fraction of a second, not a conversation.
const RENDER_FUEL: u64 = 10_000_000;
/// Written as a system message to learn whether the template keeps it.
const SYSTEM_PROBE: &str = "isthmus-system-probe";
const TEMPLATE_NAME: &str = "chat_template";

/// The special tokens a template may write, as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
    /// The tokenizer puts the start token in front of the text itself.
    pub tokenizer_adds_bos: bool,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: SpecialTokens,
    /// The template keeps system messages; else they join the next user message.
    keeps_system: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ChatTemplate")
            .field("tokens", &self.tokens)
            .field("keeps_system", &self.keeps_system)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` and checks that it renders a user turn.
    pub fn compile(source: &str, tokens: SpecialTokens) -> Result<Self, String> {
        Self::compile_with_fuel(source, tokens, RENDER_FUEL)
    }

    fn compile_with_fuel(source: &str, tokens: SpecialTokens, fuel: u64) -> Result<Self, String> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|error| error.to_string())?;
        env.set_syntax(syntax);
        env.set_fuel(Some(fuel));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|error| describe(&error))?;
        let mut template = ChatTemplate {
            env,
            tokens,
            keeps_system: true,
        };
        template
            .render_raw(
                &[ChatMessage {
                    role: Role::User,
                    content: "Hello".to_owned(),
                }],
                true,
            )
            .map_err(|reason| format!("it cannot render a user message: {reason}"))?;
        let probe = [
            ChatMessage {
                role: Role::System,
                content: SYSTEM_PROBE.to_owned(),
            },
            ChatMessage {
                role: Role::User,
                content: "Hello".to_owned(),
            },
        ];
        template.keeps_system = template
            .render_raw(&probe, true)
            .is_ok_and(|text| text.contains(SYSTEM_PROBE));
        Ok(template)
    }

    /// Whether system messages reach the template as such (else they join a user message).
    pub fn keeps_system(&self) -> bool {
        self.keeps_system
    }

    /// The prompt text for `messages`, ending where the assistant's answer begins: after the
    /// generation prompt, or, when the messages end with an assistant's text, inside that
    /// message, which the answer continues (as llama-server prefills it).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        render_continuing(messages, |messages, add_generation_prompt| {
            let text = if self.keeps_system {
                self.render_raw(messages, add_generation_prompt)?
            } else {
                self.render_raw(&join_system(messages), add_generation_prompt)?
            };
            // The tokenizer adds the start token itself; the template may have written it.
            Ok(match text.strip_prefix(self.tokens.bos.as_str()) {
                Some(rest) if self.tokens.tokenizer_adds_bos && !self.tokens.bos.is_empty() => {
                    rest.to_owned()
                }
                _ => text,
            })
        })
    }

    fn render_raw(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Value = messages
            .iter()
            .map(|message| {
                Value::from_pairs([
                    ("role", Value::from(message.role.as_str())),
                    ("content", Value::from(message.content.as_str())),
                ])
            })
            .collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|error| describe(&error))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.tokens.bos.as_str(),
                eos_token => self.tokens.eos.as_str(),
            })
            .map_err(|error| describe(&error))
    }
}

/// Stands in for a final assistant message's text while the template renders, so that
/// where the text goes is found exactly (the text itself may also occur in what the template
/// writes around it). Searched from the end: an earlier message that holds the same
/// characters comes before it.
const PREFILL_MARK: &str = "\u{F8FF}isthmus-prefill\u{F8FF}";

/// Renders `messages` with `render(messages, add_generation_prompt)`. When they end with an
/// assistant message that has text (a client prefilling the answer's start, as llama-server
/// takes it), the prompt ends inside that message, right after its text, without what closes
/// the turn, so that the answer continues it.
pub fn render_continuing(
    messages: &[ChatMessage],
    render: impl Fn(&[ChatMessage], bool) -> Result<String, String>,
) -> Result<String, String> {
    let Some(last) = messages
        .last()
        .filter(|message| message.role == Role::Assistant && !message.content.is_empty())
    else {
        return render(messages, true);
    };
    let mut marked = messages.to_vec();
    if let Some(final_message) = marked.last_mut() {
        final_message.content = PREFILL_MARK.to_owned();
    }
    let mut text = render(&marked, false)?;
    let Some(at) = text.rfind(PREFILL_MARK) else {
        return Err(
            "the chat template does not write the final assistant message's text, so the \
             answer cannot continue it; end the messages with a user message"
                .to_owned(),
        );
    };
    text.truncate(at);
    text.push_str(&last.content);
    Ok(text)
}

/// Each system message's text put in front of the next user message (or made a user message
/// when none follows), for templates that refuse or drop the system role.
fn join_system(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut joined = Vec::with_capacity(messages.len());
    let mut system = String::new();
    for message in messages {
        match message.role {
            Role::System => {
                if !system.is_empty() {
                    system.push_str("\n\n");
                }
                system.push_str(&message.content);
            }
            Role::User if !system.is_empty() => {
                joined.push(ChatMessage {
                    role: Role::User,
                    content: format!("{system}\n\n{}", message.content),
                });
                system.clear();
            }
            _ => joined.push(message.clone()),
        }
    }
    if !system.is_empty() {
        joined.push(ChatMessage {
            role: Role::User,
            content: system,
        });
    }
    joined
}

/// What went wrong, with the template's own words when it raised an exception.
fn describe(error: &Error) -> String {
    match (error.kind(), error.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_owned(),
        (ErrorKind::OutOfFuel, _) => {
            "the template ran past its instruction budget for these messages".to_owned()
        }
        _ => error.to_string(),
    }
}

/// Templates call `raise_exception("...")` to refuse a conversation they cannot render.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Today's date (UTC) in a `strftime` format: Llama 3's templates write it into the system
/// message. `%d %m %Y %y %e %j %b %B %a %A %H %M %S %%`; other specifiers are kept as written.
fn strftime_now(format: String) -> String {
    strftime(time::OffsetDateTime::now_utc(), &format)
}

fn strftime(now: time::OffsetDateTime, format: &str) -> String {
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let month = now.month();
        let weekday = now.weekday();
        let piece = match spec {
            'd' => format!("{:02}", now.day()),
            'e' => format!("{:2}", now.day()),
            'm' => format!("{:02}", u8::from(month)),
            'Y' => now.year().to_string(),
            'y' => format!("{:02}", now.year().rem_euclid(100)),
            'j' => format!("{:03}", now.ordinal()),
            'B' => month.to_string(),
            'b' => month.to_string().chars().take(3).collect(),
            'A' => weekday.to_string(),
            'a' => weekday.to_string().chars().take(3).collect(),
            'H' => format!("{:02}", now.hour()),
            'M' => format!("{:02}", now.minute()),
            'S' => format!("{:02}", now.second()),
            '%' => "%".to_owned(),
            other => format!("%{other}"),
        };
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests;
