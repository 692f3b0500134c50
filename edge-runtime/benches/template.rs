//! What rendering a chat template costs per request: the demo model's template (SmolLM2,
//! ChatML with a default system message) and a Llama 3-shaped one with block tags, Python
//! string methods and the date, over a short chat (~400 bytes), a 4 KB prompt and a
//! 50-turn conversation.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use edge_runtime::template::{ChatTemplate, SpecialTokens};
use edge_runtime::{ChatMessage, Role};

const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const LLAMA3_SHAPED: &str = "{{- bos_token }}
{%- set date = strftime_now('%d %b %Y') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set rest = messages %}
{%- endif %}
<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: {{ date }}

{{ system }}<|eot_id|>
{%- for m in rest %}
    {%- if m['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('unknown role ' + m['role']) }}
    {%- endif %}
<|start_header_id|>{{ m['role'] }}<|end_header_id|>

{{ m['content'].strip() }}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}";

const SENTENCE: &str = "Please summarise the quarterly review of the billing migration in five \
bullet points, one sentence each, and name the follow-ups we still owe the platform team. ";

fn message(role: Role, content: String) -> ChatMessage {
    ChatMessage { role, content }
}

fn conversations() -> [(&'static str, Vec<ChatMessage>); 3] {
    let short = vec![
        message(Role::System, "You answer briefly.".to_owned()),
        message(Role::User, SENTENCE.repeat(2)),
    ];
    let long = vec![
        message(Role::System, "You answer briefly.".to_owned()),
        message(Role::User, SENTENCE.repeat(4096 / SENTENCE.len())),
    ];
    let turns = (0..50)
        .map(|turn| {
            let role = if turn % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            message(role, SENTENCE.to_owned())
        })
        .collect();
    [("short", short), ("4KB", long), ("50_turns", turns)]
}

fn render(c: &mut Criterion) {
    let tokens = SpecialTokens {
        bos: "<|begin_of_text|>".to_owned(),
        eos: "<|eot_id|>".to_owned(),
        tokenizer_adds_bos: true,
    };
    for (name, source) in [("smollm2", SMOLLM2), ("llama3_shaped", LLAMA3_SHAPED)] {
        let template = match ChatTemplate::compile(source, tokens.clone()) {
            Ok(template) => template,
            Err(reason) => panic!("the {name} template does not compile: {reason}"),
        };
        let mut group = c.benchmark_group(format!("template_{name}"));
        for (size, messages) in conversations() {
            let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
            if let Err(reason) = template.render(&messages) {
                panic!("the {name} template cannot render {size}: {reason}");
            }
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(size, |b| {
                b.iter(|| template.render(std::hint::black_box(&messages)).is_ok());
            });
        }
        group.finish();
    }
}

criterion_group!(benches, render);
criterion_main!(benches);
