//! Carrying out `Decision::Local`: hand the prompt to the model's worker and turn its events
//! into an OpenAI response, streamed as server-sent events or collected into one body.
//!
//! While it waits for tokens the handler also watches the client: if the connection closes,
//! the generation stream is dropped, which frees the sequence before the worker's next step.

use std::time::Duration;

use bytes::Bytes;
use pingora_proxy::Session;

use crate::data_plane::{Failure, RequestContext, respond_json, stream_header, unix_now_s};
use crate::error::GatewayError;
use crate::openai::{self, Endpoint, ResponseMeta};

/// How long to wait for a free place in the queue is not a client's choice; when the queue is
/// full the client is told to retry after this long.
const QUEUE_FULL_RETRY_AFTER_S: u64 = 1;

/// A local generation to run.
#[derive(Debug)]
pub struct LocalRequest<'a> {
    pub endpoint: Endpoint,
    /// One prompt, or several (legacy completions), each answered with `n` choices.
    pub prompts: Vec<edge_runtime::Prompt>,
    pub generation: &'a openai::Generation,
    pub first_token_timeout: Duration,
}

/// How a local generation ended once it was answered.
#[derive(Debug)]
pub enum Answered {
    Complete,
    ClientGone(String),
}

/// Runs the generation and writes the response.
pub async fn run(
    session: &mut Session,
    ctx: &mut RequestContext,
    model: &edge_runtime::ModelHandle,
    mut request: LocalRequest<'_>,
) -> Result<Answered, Failure> {
    let info = model.info();
    // Where a prompt's problem is reported: the chat's `messages`, or the completion's
    // `prompt` (with its position when there are several).
    let param = match request.endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    let several = request.prompts.len() > 1;
    let which = |index: usize| {
        if several {
            format!("prompt {index}: ")
        } else {
            String::new()
        }
    };
    // With tools offered, the model writes its answer as JSON (a call, or the text in a
    // wrapper): stop strings would be matched against that JSON, not the text the client
    // gets, ending answers early or not at all. Refused rather than misapplied.
    if request.generation.tool_call.is_some() && !request.generation.stop.is_empty() {
        return Err(GatewayError::unsupported(
            "stop",
            "`stop` together with `tools` is not supported by local models (their answers are \
             written as JSON that stop strings would cut); send one or the other",
        )
        .into());
    }
    // How many sequences the request asks for, refused before any prompt is rendered or
    // tokenized.
    let per_prompt = request.generation.n.max(1);
    let total = u32::try_from(request.prompts.len())
        .unwrap_or(u32::MAX)
        .saturating_mul(per_prompt);
    if total > info.parallel_sequences {
        return Err(if several {
            GatewayError::invalid_value(
                "prompt",
                format!(
                    "`{}` generates at most {} choices at once ({} parallel sequences); {} \
                     prompts with n = {per_prompt} ask for {total}",
                    info.name,
                    info.parallel_sequences,
                    info.parallel_sequences,
                    request.prompts.len()
                ),
            )
        } else {
            GatewayError::invalid_value(
                "n",
                format!(
                    "`{}` generates at most {} choices at once ({} parallel sequences)",
                    info.name, info.parallel_sequences, info.parallel_sequences
                ),
            )
        }
        .into());
    }
    // Rendering and tokenizing a large prompt takes milliseconds or more: on a blocking
    // thread, not the runtime's, so other connections keep being served meanwhile.
    let prompts = std::mem::take(&mut request.prompts);
    let preparing = model.clone();
    let results = tokio::task::spawn_blocking(move || {
        prompts
            .iter()
            .map(|prompt| preparing.prepare(prompt))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|error| GatewayError::unfinished("preparing the prompt failed", &error))?;
    let prepared = results
        .into_iter()
        .enumerate()
        .map(|(index, result)| {
            result.map_err(|error| match error {
                edge_runtime::PromptError::Empty => {
                    GatewayError::invalid_value(param, format!("{}the prompt is empty", which(index)))
                }
                edge_runtime::PromptError::Template(reason) => GatewayError::invalid_value(
                    param,
                    format!("the messages cannot be rendered: {reason}"),
                ),
                edge_runtime::PromptError::UnknownToken { token, vocabulary } => {
                    GatewayError::invalid_value(
                        param,
                        format!(
                            "{}token {token} is not in the vocabulary of `{}` ({vocabulary} tokens)",
                            which(index),
                            info.name
                        ),
                    )
                }
                edge_runtime::PromptError::TooLong { .. }
                | edge_runtime::PromptError::TooManyMessages { .. } => GatewayError::ContextLengthExceeded {
                    message: format!("{}{error}", which(index)),
                    param,
                },
                edge_runtime::PromptError::ModelNotLoaded(model) => GatewayError::Internal {
                    message: format!("model `{model}` is not loaded"),
                },
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prompt_tokens = prepared.iter().map(|prompt| prompt.token_count()).sum();
    let seed = request
        .generation
        .seed
        .map_or_else(rand::random::<u32>, |seed| (seed ^ (seed >> 32)) as u32);
    // Converting a JSON schema into a grammar can take tens of milliseconds (its size is
    // capped where the request is read): on a blocking thread too.
    let grammar = match (
        request.generation.response_format.clone(),
        request.generation.tool_call.clone(),
    ) {
        (None, None) => None,
        (format, call) => tokio::task::spawn_blocking(move || match (&format, &call) {
            (format, Some(call)) => tool_call_grammar(call, format.as_ref()).map(Some),
            (Some(format), None) => json_grammar(format).map(Some),
            (None, None) => Ok(None),
        })
        .await
        .map_err(|error| GatewayError::unfinished("converting the JSON schema failed", &error))??,
    };
    // Each choice is a sequence of its own, with its own seed; a refusal of any drops (and so
    // cancels) those already submitted.
    let mut streams = Vec::with_capacity(total as usize);
    for prompt in prepared {
        let max_tokens = match request.generation.max_tokens {
            Some(max_tokens) => max_tokens,
            None => info.context_tokens.saturating_sub(prompt.token_count()),
        };
        let generation = edge_runtime::GenerationRequest {
            prompt,
            max_tokens,
            sampling: edge_runtime::SamplingParams {
                temperature: request.generation.temperature,
                top_p: request.generation.top_p,
                seed,
                presence_penalty: request.generation.presence_penalty,
                frequency_penalty: request.generation.frequency_penalty,
            },
            stop: request.generation.stop.clone(),
            ignore_eos: request.generation.ignore_eos,
            record_margins: false,
            grammar: grammar.clone(),
            logprobs: request.generation.logprobs,
            logit_bias: request.generation.logit_bias.clone(),
        };
        for _ in 0..per_prompt {
            let mut one = generation.clone();
            let choice = u32::try_from(streams.len()).unwrap_or(u32::MAX);
            one.sampling.seed = choice_seed(seed, choice);
            let stream = model
                .submit(one)
                .map_err(|error| submit_error(error, &info.name, param))?;
            streams.push(Some(stream));
        }
    }
    let mut choices = Choices {
        streams,
        start: 0,
        per_prompt: per_prompt as usize,
    };
    // Charged from here on (a caller who leaves now leaves a prompt the model takes up);
    // a request refused before it was queued, or that fails before its first token, is
    // not (`refused_before_generation`).
    ctx.usage.prompt_tokens = prompt_tokens;

    let meta = ResponseMeta::new(request.endpoint, &ctx.request_id, unix_now_s(), &info.name);
    let first_token_deadline = tokio::time::Instant::now() + request.first_token_timeout;
    let shape = Shape {
        include_usage: request.generation.include_usage,
        wants_logprobs: request.generation.logprobs.is_some(),
        calls: request.generation.tool_call.as_ref(),
    };
    if request.generation.stream {
        stream_events(
            session,
            ctx,
            &mut choices,
            &meta,
            &shape,
            first_token_deadline,
        )
        .await
    } else {
        collect_events(
            session,
            ctx,
            &mut choices,
            &meta,
            &shape,
            first_token_deadline,
        )
        .await
    }
}

/// What the answer carries beside the choices' text, as the request asked.
struct Shape<'a> {
    /// A stream's last chunk carries the usage (`stream_options.include_usage`).
    include_usage: bool,
    wants_logprobs: bool,
    /// The functions offered, when the answer is a function call.
    calls: Option<&'a openai::ToolCall>,
}

/// The answer to an embeddings request that was not accepted.
pub(crate) fn embed_submit_error(
    error: edge_runtime::EmbedSubmitError,
    model: &str,
) -> GatewayError {
    match error {
        edge_runtime::EmbedSubmitError::Input(error) => embedding_error(error),
        edge_runtime::EmbedSubmitError::Submit(error) => submit_error(error, model, "input"),
    }
}

/// The answer to an embeddings request that failed.
pub(crate) fn embedding_error(error: edge_runtime::EmbeddingError) -> GatewayError {
    use edge_runtime::EmbeddingError;
    match error {
        EmbeddingError::InputTooLong { .. } => GatewayError::ContextLengthExceeded {
            message: error.to_string(),
            param: "input",
        },
        EmbeddingError::EmptyInput { .. } | EmbeddingError::UnknownToken { .. } => {
            GatewayError::invalid_value("input", error.to_string())
        }
        EmbeddingError::Failed(message) => GatewayError::Internal { message },
        EmbeddingError::WorkerStopped => GatewayError::Unavailable {
            message: "the model's embeddings worker stopped".to_owned(),
            retry_after_s: QUEUE_FULL_RETRY_AFTER_S,
        },
    }
}

fn submit_error(
    error: edge_runtime::SubmitError,
    model: &str,
    param: &'static str,
) -> GatewayError {
    match error {
        edge_runtime::SubmitError::QueueFull { .. } => GatewayError::QueueFull {
            retry_after_s: QUEUE_FULL_RETRY_AFTER_S,
        },
        edge_runtime::SubmitError::ContextLengthExceeded {
            context_tokens,
            prompt_tokens,
            max_tokens,
        } => GatewayError::ContextLengthExceeded {
            message: format!(
                "this model's maximum context length is {context_tokens} tokens; you requested \
                 {} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion)",
                u64::from(prompt_tokens) + u64::from(max_tokens)
            ),
            param,
        },
        edge_runtime::SubmitError::UnknownToken { token, vocabulary } => {
            GatewayError::invalid_value(
                format!("logit_bias.{token}"),
                format!(
                    "token {token} is not in the vocabulary of `{model}` ({vocabulary} tokens)"
                ),
            )
        }
        edge_runtime::SubmitError::Grammar { reason } => GatewayError::invalid_value(
            "response_format",
            format!("the local model cannot follow this response_format: {reason}"),
        ),
        edge_runtime::SubmitError::WrongModel { .. } | edge_runtime::SubmitError::WorkerStopped => {
            GatewayError::Unavailable {
                message: format!("the inference worker of `{model}` is not running"),
                retry_after_s: 5,
            }
        }
    }
}

/// The generations of one request's choices (`n`), read together.
struct Choices {
    /// By choice index; `None` once the choice has ended.
    streams: Vec<Option<edge_runtime::GenerationStream>>,
    /// Where the next read starts, so that no choice waits behind another.
    start: usize,
    /// Choices per prompt (`n`): choice `i` answers prompt `i / per_prompt`.
    per_prompt: usize,
}

impl Choices {
    fn count(&self) -> usize {
        self.streams.len()
    }

    /// The next event of a running choice, with its index; `None` for the event when that
    /// choice's worker went away without ending it, and `None` altogether when no choice
    /// runs.
    async fn next(&mut self) -> Option<(usize, Option<edge_runtime::Event>)> {
        std::future::poll_fn(|cx| {
            let count = self.streams.len();
            let mut running = false;
            for offset in 0..count {
                let index = (self.start + offset) % count;
                let Some(stream) = &mut self.streams[index] else {
                    continue;
                };
                running = true;
                if let std::task::Poll::Ready(event) = stream.poll_next(cx) {
                    self.start = (index + 1) % count;
                    if !matches!(event, Some(edge_runtime::Event::Token { .. })) {
                        self.streams[index] = None;
                    }
                    return std::task::Poll::Ready(Some((index, event)));
                }
            }
            if running {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(None)
            }
        })
        .await
    }
}

/// The next event of the generation, unless the client leaves or the first token is late.
async fn next_event(
    session: &mut Session,
    ctx: &RequestContext,
    choices: &mut Choices,
    first_token_deadline: tokio::time::Instant,
) -> Result<(usize, edge_runtime::Event), Waited> {
    let waiting_for_first = ctx.first_token.is_none();
    let deadline = async {
        if waiting_for_first {
            tokio::time::sleep_until(first_token_deadline).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        event = choices.next() => match event {
            Some((index, Some(event))) => Ok((index, event)),
            Some((_, None)) | None => Err(Waited::WorkerGone),
        },
        idle = session.as_downstream_mut().read_body_or_idle(true) => Err(Waited::ClientGone(match idle {
            Ok(_) => "the client sent data during the response".to_owned(),
            Err(error) => format!("the client closed the connection: {error}"),
        })),
        () = deadline => Err(Waited::FirstTokenTimeout),
    }
}

enum Waited {
    ClientGone(String),
    WorkerGone,
    FirstTokenTimeout,
}

/// What a forced function call adds to the conversation: the functions, and the shape of a
/// call, for a model whose chat template knows no tools. The grammar enforces the shape; this
/// tells the model what the functions are for.
pub fn tool_instructions(call: &openai::ToolCall) -> String {
    let mut text = String::from(if call.parallel {
        "Answer with calls of these functions, as one JSON object {\"tool_calls\": \
         [{\"name\": <function name>, \"arguments\": <its arguments>}, ...]} with one \
         entry per call needed"
    } else {
        "Answer with a call of one of these functions, as one JSON object \
         {\"name\": <function name>, \"arguments\": <its arguments>}"
    });
    text.push_str(if call.text_allowed {
        ", or, when no function fits, with {\"response\": <your answer>}.\nFunctions:"
    } else {
        ".\nFunctions:"
    });
    for tool in &call.tools {
        text.push_str("\n- ");
        text.push_str(&tool.name);
        if let Some(description) = &tool.description {
            text.push_str(": ");
            text.push_str(description);
        }
        text.push_str("\n  arguments (JSON Schema): ");
        text.push_str(&tool.parameters);
    }
    text
}

/// The seed of choice `choice` of a request seeded `seed`: consecutive, skipping `u32::MAX`,
/// which the engine reads as another seed's (its sampler takes `u32::MAX` for "random"), so
/// that no two choices of one request share a seed.
fn choice_seed(seed: u32, choice: u32) -> u32 {
    let seeds = u64::from(u32::MAX);
    u32::try_from((u64::from(seed) + u64::from(choice)) % seeds).unwrap_or(0)
}

/// The grammar of a forced call: `{"name": <one of the functions>, "arguments": <that
/// function's arguments>}`, name first so the model picks the function before its arguments;
/// with `parallel_tool_calls`, `{"tool_calls": [<such a call>, ...]}` with 1 to
/// [`openai::PARALLEL_CALLS_MAX`] calls. Where text may answer instead (`auto`), also
/// `{"response": <text>}`, or with a `response_format` `{"response": <JSON of that format>}`.
fn tool_call_grammar(
    call: &openai::ToolCall,
    format: Option<&openai::ResponseFormat>,
) -> Result<edge_runtime::Grammar, GatewayError> {
    let mut definitions = Vec::new();
    let calls: Vec<String> = call
        .tools
        .iter()
        .enumerate()
        .map(|(index, tool)| {
            format!(
                r#"{{"type":"object","properties":{{"name":{{"const":{}}},"arguments":{}}},"required":["name","arguments"],"additionalProperties":false}}"#,
                serde_json::Value::from(tool.name.as_str()),
                hoisted(&tool.parameters, &format!("t{index}_"), &mut definitions)
            )
        })
        .collect();
    let one_of = |alternatives: &[String]| match alternatives {
        [one] => one.clone(),
        many => format!(r#"{{"anyOf":[{}]}}"#, many.join(",")),
    };
    let mut alternatives = if call.parallel {
        vec![format!(
            r#"{{"type":"object","properties":{{"tool_calls":{{"type":"array","items":{},"minItems":1,"maxItems":{}}}}},"required":["tool_calls"],"additionalProperties":false}}"#,
            one_of(&calls),
            openai::PARALLEL_CALLS_MAX
        )]
    } else {
        calls
    };
    if call.text_allowed {
        let response = match format {
            None => r#"{"type":"string"}"#.to_owned(),
            Some(openai::ResponseFormat::JsonObject) => r#"{"type":"object"}"#.to_owned(),
            Some(openai::ResponseFormat::JsonSchema { schema }) => {
                hoisted(schema, "r_", &mut definitions)
            }
        };
        alternatives.push(format!(
            r#"{{"type":"object","properties":{{"response":{response}}},"required":["response"],"additionalProperties":false}}"#
        ));
    }
    let schema = if definitions.is_empty() {
        one_of(&alternatives)
    } else {
        let definitions: Vec<String> = definitions
            .iter()
            .map(|(name, definition)| {
                format!("{}:{definition}", serde_json::Value::from(name.as_str()))
            })
            .collect();
        format!(
            r#"{{"anyOf":[{}],"$defs":{{{}}}}}"#,
            alternatives.join(","),
            definitions.join(",")
        )
    };
    edge_runtime::Grammar::json_schema(&schema).map_err(|error| {
        GatewayError::invalid_value(
            "tools",
            format!(
                "the local model cannot follow these functions' parameters ({error}): check \
                 `$ref` targets and the types of keyword values"
            ),
        )
    })
}

/// `schema`, spliced into the grammar's own schema (a function's parameters, a response
/// format), with its local definitions (`$defs`, `definitions`) added to `definitions` under
/// names that start with `prefix` and its references rewritten to them: a `#/$defs/X` left
/// as it was would resolve against the grammar's root, where there is no `X`. The text
/// keeps its key order (the order a model writes properties in).
fn hoisted(schema: &str, prefix: &str, definitions: &mut Vec<(String, String)>) -> String {
    #[derive(serde::Deserialize)]
    struct Local<'a> {
        #[serde(rename = "$defs", default, borrow)]
        defs: std::collections::BTreeMap<String, &'a serde_json::value::RawValue>,
        #[serde(default, borrow)]
        definitions: std::collections::BTreeMap<String, &'a serde_json::value::RawValue>,
    }
    let rewrite = |text: &str| {
        text.replace("\"#/$defs/", &format!("\"#/$defs/{prefix}"))
            .replace("\"#/definitions/", &format!("\"#/$defs/{prefix}"))
    };
    if let Ok(local) = serde_json::from_str::<Local<'_>>(schema) {
        for (name, definition) in local.defs.iter().chain(&local.definitions) {
            definitions.push((format!("{prefix}{name}"), rewrite(definition.get())));
        }
    }
    rewrite(schema)
}

/// The grammar a JSON `response_format` becomes.
fn json_grammar(format: &openai::ResponseFormat) -> Result<edge_runtime::Grammar, GatewayError> {
    match format {
        openai::ResponseFormat::JsonObject => {
            edge_runtime::Grammar::json_object().map_err(|error| GatewayError::Internal {
                message: format!("the JSON object grammar: {error}"),
            })
        }
        openai::ResponseFormat::JsonSchema { schema } => edge_runtime::Grammar::json_schema(schema)
            .map_err(|error| {
                GatewayError::invalid_value(
                    "response_format.json_schema.schema",
                    format!(
                        "the local model cannot follow this JSON schema ({error}): check \
                         `$ref` targets and the types of keyword values"
                    ),
                )
            }),
    }
}

fn waited_error(waited: &Waited, timeout: Duration) -> GatewayError {
    match waited {
        Waited::FirstTokenTimeout => GatewayError::Timeout {
            message: format!(
                "no token was generated within {} ms; the local model is overloaded",
                timeout.as_millis()
            ),
        },
        Waited::WorkerGone | Waited::ClientGone(_) => GatewayError::Unavailable {
            message: "the inference worker stopped".to_owned(),
            retry_after_s: 5,
        },
    }
}

fn generation_error(error: &edge_runtime::GenerationError) -> GatewayError {
    match error {
        edge_runtime::GenerationError::QueueTimeout { .. } => GatewayError::Timeout {
            message: error.to_string(),
        },
        edge_runtime::GenerationError::Decode(_) | edge_runtime::GenerationError::WorkerFailed => {
            GatewayError::Internal {
                message: error.to_string(),
            }
        }
        edge_runtime::GenerationError::WorkerStopped => GatewayError::Unavailable {
            message: error.to_string(),
            retry_after_s: 5,
        },
    }
}

/// What one choice has produced so far.
#[derive(Default)]
struct ChoiceState {
    text: String,
    /// Reads a streamed answer to a request that offered functions as it is written.
    reader: openai::CallReader,
    logprobs: Vec<edge_runtime::TokenLogprobs>,
    finish_reason: Option<&'static str>,
    usage: edge_runtime::Usage,
    /// Tokens generated so far, counted as they come.
    generated: u32,
}

/// Counts one more generated token of `state`, one of `choices`, in `ctx`'s usage, so that an
/// answer cut short (the client left, generation failed) is charged and audited with what was
/// generated, and its time per output token is taken over the longest choice, not the sum of
/// all; the engine's own counts replace these once every choice is done.
/// A request that ends in an error before any token was generated (its queue wait or its
/// first token ran out of time, its prefill failed) is not charged its prompt: the caller
/// got nothing for it, and one that retries a 429 or 504 would otherwise pay each time.
fn refused_before_generation(ctx: &mut RequestContext) {
    if ctx.usage.completion_tokens == 0 {
        ctx.usage.prompt_tokens = 0;
    }
}

fn count_generated_token(ctx: &mut RequestContext, state: &mut ChoiceState, choices: usize) {
    ctx.usage.completion_tokens = ctx.usage.completion_tokens.saturating_add(1);
    state.generated = state.generated.saturating_add(1);
    if choices > 1 {
        ctx.longest_choice_tokens =
            Some(ctx.longest_choice_tokens.unwrap_or(0).max(state.generated));
    }
}

/// Records the usage of the request's choices in `ctx`: each prompt once (as OpenAI bills
/// `n`), the completions summed, and with several choices the longest one's tokens.
fn record_usage(ctx: &mut RequestContext, states: &[ChoiceState], per_prompt: usize) {
    ctx.usage = total_usage(states, per_prompt);
    if states.len() > 1 {
        ctx.longest_choice_tokens = states
            .iter()
            .map(|state| state.usage.completion_tokens)
            .max();
    }
    ctx.finish_reason = states.first().and_then(|state| state.finish_reason);
}

/// The request's usage over its choices: each prompt once (from its first choice), the
/// completions summed.
fn total_usage(states: &[ChoiceState], per_prompt: usize) -> edge_runtime::Usage {
    let firsts = || states.iter().step_by(per_prompt.max(1));
    edge_runtime::Usage {
        prompt_tokens: firsts().map(|state| state.usage.prompt_tokens).sum(),
        cached_tokens: firsts().map(|state| state.usage.cached_tokens).sum(),
        completion_tokens: states
            .iter()
            .map(|state| state.usage.completion_tokens)
            .sum(),
    }
}

/// Hands the choices' texts to the audit capture, in index order, once all have ended:
/// several answers interleaved token by token would read as one garbled text.
fn capture_choices(ctx: &mut RequestContext, states: &[ChoiceState]) {
    for (index, state) in states.iter().enumerate() {
        if index > 0 {
            crate::audit_trail::capture_completion(ctx, &format!("\n[choice {index}]\n"));
        }
        crate::audit_trail::capture_completion(ctx, &state.text);
    }
}

async fn collect_events(
    session: &mut Session,
    ctx: &mut RequestContext,
    choices: &mut Choices,
    meta: &ResponseMeta,
    shape: &Shape<'_>,
    first_token_deadline: tokio::time::Instant,
) -> Result<Answered, Failure> {
    let Shape {
        wants_logprobs,
        calls,
        ..
    } = *shape;
    let started = tokio::time::Instant::now();
    let mut states: Vec<ChoiceState> = (0..choices.count())
        .map(|_| ChoiceState::default())
        .collect();
    let mut running = states.len();
    while running > 0 {
        let (index, event) = match next_event(session, ctx, choices, first_token_deadline).await {
            Ok(event) => event,
            Err(Waited::ClientGone(reason)) => return Ok(Answered::ClientGone(reason)),
            Err(waited) => {
                refused_before_generation(ctx);
                return Err(waited_error(
                    &waited,
                    first_token_deadline.saturating_duration_since(started),
                )
                .into());
            }
        };
        let choices = states.len();
        let state = &mut states[index];
        match event {
            edge_runtime::Event::Token { text, logprobs, .. } => {
                let now = ctx.started.elapsed();
                ctx.first_token.get_or_insert(now);
                ctx.last_token = Some(now);
                count_generated_token(ctx, state, choices);
                state.text.push_str(&text);
                state.logprobs.extend(logprobs);
            }
            edge_runtime::Event::Done(completion) => {
                state.text.push_str(&completion.text_tail);
                state.logprobs.extend(completion.tail_logprobs);
                state.usage = completion.usage;
                state.finish_reason = Some(completion.finish_reason.as_str());
                running -= 1;
            }
            edge_runtime::Event::Failed(error) => {
                refused_before_generation(ctx);
                return Err(generation_error(&error).into());
            }
        }
    }
    capture_choices(ctx, &states);
    let called: Vec<Vec<openai::CalledTool>> = states
        .iter_mut()
        .enumerate()
        .map(|(index, state)| made_call(ctx, calls, index, state))
        .collect();
    record_usage(ctx, &states, choices.per_prompt);
    let bodies: Vec<openai::ChoiceBody<'_>> = states
        .iter()
        .zip(called)
        .map(|(state, tool_calls)| openai::ChoiceBody {
            tool_calls,
            legacy: calls.is_some_and(|calls| calls.legacy),
            text: &state.text,
            finish_reason: state.finish_reason.unwrap_or("stop"),
            logprobs: wants_logprobs.then(|| {
                let tokens: Vec<&edge_runtime::TokenLogprobs> = state.logprobs.iter().collect();
                meta.logprobs(&tokens, 0)
            }),
        })
        .collect();
    let body = serde_json::to_vec(&meta.full_response(&bodies, ctx.usage)).unwrap_or_default();
    let body = ctx.answer_body(body);
    respond_json(session, ctx, 200, body, None).await?;
    Ok(Answered::Complete)
}

/// The function calls a finished choice made, when the request offered functions: for a
/// complete answer, its calls with the finish reason `tool_calls`, or for an `auto` answer
/// without a call, `{"response": <text>}`, that text. An answer cut short (`length`, or a
/// stop string met inside its JSON) reads as its stream carried it: the text so far, or
/// the calls with the arguments written so far, its finish reason kept. None for a text
/// answer.
fn made_call(
    ctx: &RequestContext,
    calls: Option<&openai::ToolCall>,
    index: usize,
    state: &mut ChoiceState,
) -> Vec<openai::CalledTool> {
    let Some(calls) = calls else {
        return Vec::new();
    };
    if state.finish_reason == Some("stop")
        && let Some(made) =
            openai::CalledTool::from_answer(|at| call_id(ctx, index, at), &state.text)
    {
        state.finish_reason = Some(if calls.legacy {
            "function_call"
        } else {
            "tool_calls"
        });
        return made;
    }
    // A text answer (a string, or JSON of the request's format), or an answer cut short:
    // read as its stream carried it.
    let mut reader = openai::CallReader::default();
    let mut text = String::new();
    let mut made: Vec<openai::CalledTool> = Vec::new();
    for piece in reader.push(&state.text) {
        match piece {
            openai::Piece::Text(more) => text.push_str(&more),
            openai::Piece::Call { at, name } => made.push(openai::CalledTool {
                id: call_id(ctx, index, at),
                name,
                arguments: String::new(),
            }),
            openai::Piece::Arguments { at, text } => {
                if let Some(call) = made.get_mut(at) {
                    call.arguments.push_str(&text);
                }
            }
        }
    }
    // Of the expected shape, the JSON around the text never shows, even when no text or
    // call has begun yet; of another shape (a grammar that failed), the text stays as written.
    if made.is_empty() && !reader.failed() {
        state.text = text;
    }
    made
}

/// The id of call `at` of choice `index`.
fn call_id(ctx: &RequestContext, index: usize, at: usize) -> String {
    format!("call_{}_{index}_{at}", ctx.request_id)
}

/// The stream events for what newly written answer text completed of a call or of a text
/// answer (`auto` without a call).
fn call_events(
    ctx: &RequestContext,
    meta: &ResponseMeta,
    index: usize,
    pieces: Vec<openai::Piece>,
    shape: &Shape<'_>,
) -> Vec<u8> {
    let include_usage = shape.include_usage;
    let legacy = shape.calls.is_some_and(|calls| calls.legacy);
    let mut events = Vec::new();
    for piece in pieces {
        let chunk = match &piece {
            openai::Piece::Text(text) => {
                meta.chunk(index, false, Some(text), None, include_usage, None)
            }
            openai::Piece::Call { at, name } => {
                let id = call_id(ctx, index, *at);
                let start = openai::CallPiece::Start {
                    at: *at,
                    id: &id,
                    name,
                };
                meta.tool_call_piece(index, start, legacy, include_usage)
            }
            openai::Piece::Arguments { at, text } => meta.tool_call_piece(
                index,
                openai::CallPiece::Arguments { at: *at, text },
                legacy,
                include_usage,
            ),
        };
        events.extend_from_slice(&openai::sse_event(&chunk));
    }
    events
}

async fn stream_events(
    session: &mut Session,
    ctx: &mut RequestContext,
    choices: &mut Choices,
    meta: &ResponseMeta,
    shape: &Shape<'_>,
    first_token_deadline: tokio::time::Instant,
) -> Result<Answered, Failure> {
    let Shape {
        include_usage,
        wants_logprobs,
        calls,
    } = *shape;
    let started = tokio::time::Instant::now();
    // Wait for the first event before committing to a 200, so that a queue timeout or a
    // failed prefill is still answered with its own status.
    let first = match next_event(session, ctx, choices, first_token_deadline).await {
        Ok((_, edge_runtime::Event::Failed(error))) => {
            refused_before_generation(ctx);
            return Err(generation_error(&error).into());
        }
        Ok(event) => event,
        Err(Waited::ClientGone(reason)) => return Ok(Answered::ClientGone(reason)),
        Err(waited) => {
            refused_before_generation(ctx);
            return Err(waited_error(
                &waited,
                first_token_deadline.saturating_duration_since(started),
            )
            .into());
        }
    };
    let header = stream_header(session, ctx)?;
    ctx.status = 200;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    let count = choices.count();
    if meta.endpoint == Endpoint::Chat {
        let mut roles = Vec::new();
        for index in 0..count {
            roles.extend_from_slice(&openai::sse_event(&meta.chunk(
                index,
                true,
                Some(""),
                None,
                include_usage,
                None,
            )));
        }
        write(session, ctx, Bytes::from(roles)).await?;
    }
    // With one choice its text goes to the audit capture as it is made (a stream cut short
    // keeps what was sent); several are captured in order at the end.
    let capture_as_sent = count == 1;
    let mut states: Vec<ChoiceState> = (0..count).map(|_| ChoiceState::default()).collect();
    // Bytes of each choice's tokens so far: legacy completions' `text_offset`.
    let mut token_bytes = vec![0usize; count];
    let mut running = count;
    let (mut index, mut event) = first;
    loop {
        match event {
            edge_runtime::Event::Token { text, logprobs, .. } => {
                let now = ctx.started.elapsed();
                ctx.first_token.get_or_insert(now);
                ctx.last_token = Some(now);
                count_generated_token(ctx, &mut states[index], count);
                if capture_as_sent {
                    crate::audit_trail::capture_completion(ctx, &text);
                }
                states[index].text.push_str(&text);
                if calls.is_some() {
                    // A call or a text answer goes out as its JSON is written.
                    let pieces = states[index].reader.push(&text);
                    if !pieces.is_empty() {
                        let events = call_events(ctx, meta, index, pieces, shape);
                        write(session, ctx, Bytes::from(events)).await?;
                    }
                } else {
                    let logprobs = wants_logprobs
                        .then(|| chunk_logprobs(meta, &logprobs, &mut token_bytes[index]));
                    write(
                        session,
                        ctx,
                        openai::sse_event(&meta.chunk(
                            index,
                            false,
                            Some(&text),
                            None,
                            include_usage,
                            logprobs,
                        )),
                    )
                    .await?;
                }
            }
            edge_runtime::Event::Done(completion) => {
                let finish_reason = completion.finish_reason.as_str();
                let state = &mut states[index];
                state.usage = completion.usage;
                state.finish_reason = Some(finish_reason);
                if capture_as_sent {
                    crate::audit_trail::capture_completion(ctx, &completion.text_tail);
                }
                state.text.push_str(&completion.text_tail);
                let mut end = Vec::new();
                if calls.is_some() {
                    let pieces = state.reader.push(&completion.text_tail);
                    end.extend(call_events(ctx, meta, index, pieces, shape));
                    let streamed = state.reader.called() || state.reader.texted();
                    match made_call(ctx, calls, index, state).as_slice() {
                        made @ [_, ..] => {
                            // Whole only when the reader could not follow the answer.
                            if !state.reader.called() {
                                let legacy = calls.is_some_and(|calls| calls.legacy);
                                for (at, call) in made.iter().enumerate() {
                                    end.extend_from_slice(&openai::sse_event(
                                        &meta.tool_call_chunk(
                                            index,
                                            at,
                                            call,
                                            legacy,
                                            include_usage,
                                        ),
                                    ));
                                }
                            }
                            end.extend_from_slice(&openai::sse_event(&meta.chunk(
                                index,
                                false,
                                None,
                                state.finish_reason,
                                include_usage,
                                None,
                            )));
                        }
                        // Text (`auto` without a call), or a call cut off by `max_tokens`:
                        // what was streamed stays; else the text goes out whole.
                        [] => {
                            let text = (!streamed).then_some(state.text.as_str());
                            end.extend_from_slice(&openai::sse_event(&meta.chunk(
                                index,
                                false,
                                text,
                                Some(finish_reason),
                                include_usage,
                                None,
                            )));
                        }
                    }
                } else {
                    let tail =
                        (!completion.text_tail.is_empty()).then_some(completion.text_tail.as_str());
                    let logprobs =
                        (wants_logprobs && !completion.tail_logprobs.is_empty()).then(|| {
                            chunk_logprobs(meta, &completion.tail_logprobs, &mut token_bytes[index])
                        });
                    let last = meta.chunk(
                        index,
                        false,
                        tail,
                        Some(finish_reason),
                        include_usage,
                        logprobs,
                    );
                    end.extend_from_slice(&openai::sse_event(&last));
                }
                running -= 1;
                if running > 0 {
                    write(session, ctx, Bytes::from(end)).await?;
                } else {
                    if !capture_as_sent {
                        capture_choices(ctx, &states);
                    }
                    record_usage(ctx, &states, choices.per_prompt);
                    if include_usage {
                        end.extend_from_slice(&openai::sse_event(&meta.usage_chunk(ctx.usage)));
                    }
                    return end_stream(session, ctx, end).await;
                }
            }
            edge_runtime::Event::Failed(error) => {
                // The status line is gone; tell the client in the stream, as OpenAI does.
                let error = generation_error(&error);
                ctx.outcome = Some(error.record_description());
                ctx.cut_short = true;
                let body = serde_json::to_value(error.body()).unwrap_or_default();
                return end_stream(session, ctx, openai::sse_event(&body).to_vec()).await;
            }
        }
        (index, event) = match next_event(session, ctx, choices, first_token_deadline).await {
            Ok(next) => next,
            Err(Waited::ClientGone(reason)) => return Ok(Answered::ClientGone(reason)),
            Err(waited) => (
                index,
                edge_runtime::Event::Failed(match waited {
                    Waited::FirstTokenTimeout => edge_runtime::GenerationError::QueueTimeout {
                        timeout_ms: u64::try_from(
                            first_token_deadline
                                .saturating_duration_since(started)
                                .as_millis(),
                        )
                        .unwrap_or(u64::MAX),
                    },
                    Waited::WorkerGone | Waited::ClientGone(_) => {
                        edge_runtime::GenerationError::WorkerStopped
                    }
                }),
            ),
        };
    }
}

/// The `logprobs` of a chunk for `tokens`, whose bytes start at `offset` in the choice's
/// text (legacy completions' `text_offset`); moves `offset` past them.
fn chunk_logprobs(
    meta: &ResponseMeta,
    tokens: &[edge_runtime::TokenLogprobs],
    offset: &mut usize,
) -> serde_json::Value {
    let refs: Vec<&edge_runtime::TokenLogprobs> = tokens.iter().collect();
    let body = meta.logprobs(&refs, *offset);
    *offset += tokens.iter().map(|token| token.token.len()).sum::<usize>();
    body
}

/// Ends a stream with `last` and `[DONE]`, once the outcome's audit record is durable.
async fn end_stream(
    session: &mut Session,
    ctx: &mut RequestContext,
    mut last: Vec<u8>,
) -> Result<Answered, Failure> {
    last.extend_from_slice(openai::SSE_DONE);
    let last = ctx.stream_bytes(Bytes::from(last));
    crate::audit_trail::seal(session, ctx).await?;
    session.write_response_body(Some(last), true).await?;
    Ok(Answered::Complete)
}

/// Writes stream bytes, in the request's API.
async fn write(
    session: &mut Session,
    ctx: &mut RequestContext,
    data: Bytes,
) -> Result<(), Failure> {
    let data = ctx.stream_bytes(data);
    if data.is_empty() {
        return Ok(());
    }
    session.write_response_body(Some(data), false).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
