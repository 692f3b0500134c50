use super::{ChatTemplate, SpecialTokens, strftime};
use crate::{ChatMessage, Role};

/// The template in the demo model's GGUF (SmolLM2-135M-Instruct): a default system message
/// when the conversation has none.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn message(role: Role, content: &str) -> ChatMessage {
    ChatMessage {
        role,
        content: content.to_owned(),
    }
}

fn chatml_tokens() -> SpecialTokens {
    SpecialTokens {
        bos: "<|im_start|>".to_owned(),
        eos: "<|im_end|>".to_owned(),
        tokenizer_adds_bos: false,
    }
}

#[test]
fn the_models_default_system_message_is_written_when_the_request_has_none() {
    let template = ChatTemplate::compile(SMOLLM2, chatml_tokens()).unwrap();
    assert!(template.keeps_system());
    assert_eq!(
        template.render(&[message(Role::User, "hi")]).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        template
            .render(&[
                message(Role::System, "Answer in French."),
                message(Role::User, "hi"),
                message(Role::Assistant, "Bonjour."),
                message(Role::User, "Capital of Italy?"),
            ])
            .unwrap(),
        "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
         <|im_start|>assistant\nBonjour.<|im_end|>\n<|im_start|>user\nCapital of Italy?\
         <|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn a_final_assistant_message_is_continued_not_closed() {
    let template = ChatTemplate::compile(SMOLLM2, chatml_tokens()).unwrap();
    // As llama-server prefills it: the prompt ends right after the assistant's text. The text
    // "e" also occurs in what closes a turn (`<|im_end|>`): it is found where it was written.
    assert_eq!(
        template
            .render(&[
                message(Role::User, "Spell 'the'."),
                message(Role::Assistant, "e"),
            ])
            .unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nSpell 'the'.<|im_end|>\n<|im_start|>assistant\ne"
    );
    // An empty final assistant message is an ordinary generation prompt.
    assert!(
        template
            .render(&[message(Role::User, "hi"), message(Role::Assistant, "")])
            .unwrap()
            .ends_with("<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n")
    );
    // A template that drops the assistant's text cannot be continued: said so.
    let dropping = ChatTemplate::compile(
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
        chatml_tokens(),
    )
    .unwrap();
    let error = dropping
        .render(&[message(Role::User, "hi"), message(Role::Assistant, "Hel")])
        .unwrap_err();
    assert!(error.contains("cannot continue"), "{error}");
}

/// Block tags on lines of their own, Python string methods, the date and the start token,
/// as Llama 3's templates have them.
const DATED: &str = "{{- bos_token }}
{%- set date = strftime_now('%d %b %Y') %}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'].strip() %}
    {% set rest = messages[1:] %}
{% else %}
    {% set system = '' %}
    {% set rest = messages %}
{% endif %}
<|header|>system
Today: {{ date }}
{{ system }}<|eot|>
{% for m in rest %}
    {% if m.content.startswith('!') %}{% continue %}{% endif %}
<|header|>{{ m['role'] }}
{{ m['content'] | trim }}<|eot|>
{% endfor %}
{% if add_generation_prompt %}
<|header|>assistant
{% endif %}";

#[test]
fn block_tags_python_methods_and_a_start_token_the_tokenizer_adds_itself() {
    let tokens = SpecialTokens {
        bos: "<|begin|>".to_owned(),
        eos: "<|end|>".to_owned(),
        tokenizer_adds_bos: true,
    };
    let template = ChatTemplate::compile(DATED, tokens.clone()).unwrap();
    let today = strftime(time::OffsetDateTime::now_utc(), "%d %b %Y");
    let expected = format!(
        "<|header|>system\nToday: {today}\nBe brief.<|eot|>\n<|header|>user\nhi<|eot|>\n\
         <|header|>assistant\n"
    );
    let messages = [
        message(Role::System, "  Be brief.  "),
        message(Role::User, "!skipped"),
        message(Role::User, " hi "),
    ];
    // The start token is the tokenizer's to add: written once, not twice.
    assert_eq!(template.render(&messages).unwrap(), expected);
    let written = ChatTemplate::compile(
        DATED,
        SpecialTokens {
            tokenizer_adds_bos: false,
            ..tokens
        },
    )
    .unwrap();
    assert_eq!(
        written.render(&messages).unwrap(),
        format!("<|begin|>{expected}")
    );
}

/// Refuses the system role, as Gemma's templates do.
const NO_SYSTEM: &str = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}<turn>{{ m.role }}: {{ m.content }}</turn>{% endfor %}<turn>assistant: ";

/// Drops it without a word.
const DROPS_SYSTEM: &str = "{% for m in messages %}{% if m.role != 'system' %}[{{ m.role }}] {{ m.content }}\n{% endif %}{% endfor %}[assistant]";

#[test]
fn a_template_without_a_system_role_gets_the_system_message_in_the_next_user_turn() {
    for source in [NO_SYSTEM, DROPS_SYSTEM] {
        let template = ChatTemplate::compile(source, chatml_tokens()).unwrap();
        assert!(!template.keeps_system(), "{source}");
        let text = template
            .render(&[
                message(Role::System, "Answer in French."),
                message(Role::User, "hi"),
                message(Role::Assistant, "Bonjour."),
                message(Role::System, "Be brief."),
            ])
            .unwrap();
        assert!(text.contains("Answer in French.\n\nhi"), "{text}");
        // A system message with no user turn after it becomes one.
        assert!(
            text.contains("user") && text.contains("Be brief."),
            "{text}"
        );
        assert!(!text.contains("system"), "{text}");
    }
}

#[test]
fn a_conversation_the_template_refuses_is_an_error_in_the_templates_words() {
    let alternating = "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}";
    let template = ChatTemplate::compile(alternating, chatml_tokens()).unwrap();
    assert_eq!(
        template
            .render(&[message(Role::User, "a"), message(Role::User, "b")])
            .unwrap_err(),
        "Conversation roles must alternate user/assistant/user/assistant/..."
    );
}

#[test]
fn a_template_that_cannot_compile_or_render_a_user_turn_is_refused_with_the_reason() {
    let syntax = ChatTemplate::compile("{% for m in messages %}", chatml_tokens()).unwrap_err();
    assert!(syntax.starts_with("syntax error"), "{syntax}");
    let unknown = ChatTemplate::compile(
        "{{ messages[0].content.no_such_method() }}",
        chatml_tokens(),
    )
    .unwrap_err();
    assert!(
        unknown.starts_with("it cannot render a user message"),
        "{unknown}"
    );
}

#[test]
fn a_template_that_loops_without_end_runs_out_of_fuel() {
    let endless = "{% for m in messages %}{{ m.content }}{% endfor %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let error = ChatTemplate::compile_with_fuel(endless, chatml_tokens(), 100_000).unwrap_err();
    assert!(error.contains("instruction budget"), "{error}");
}

#[test]
fn dates_in_the_strftime_specifiers_templates_use() {
    // 2026-03-05 07:08:09 UTC, a Thursday.
    let date = time::OffsetDateTime::from_unix_timestamp(1_772_694_489).unwrap();
    assert_eq!(strftime(date, "%d %b %Y"), "05 Mar 2026");
    assert_eq!(
        strftime(date, "%A %e %B %y, %j, %H:%M:%S %% %Q"),
        "Thursday  5 March 26, 064, 07:08:09 % %Q"
    );
    assert_eq!(strftime(date, "%a %m/%d %"), "Thu 03/05 %");
}

#[test]
fn message_text_that_looks_like_jinja_is_written_as_it_is() {
    let template = ChatTemplate::compile(SMOLLM2, chatml_tokens()).unwrap();
    let text = "{{ bos_token }} {% for x in messages %}{{ x }}{% endfor %} {{ 7 * 7 }}";
    let rendered = template
        .render(&[message(Role::System, "s"), message(Role::User, text)])
        .unwrap();
    assert_eq!(
        rendered,
        format!(
            "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n\
             <|im_start|>assistant\n"
        )
    );
}
