//! Carrying out `Decision::Local`: hand the prompt to the model's worker and turn its events
//! into an OpenAI response, streamed as server-sent events or collected into one body.
//!
//! While it waits for tokens the handler also watches the client: if the connection closes,
//! the generation stream is dropped, which frees the sequence before the worker's next step.

use std::time::Duration;

use bytes::Bytes;
use pingora_proxy::Session;

use crate::data_plane::{Failure, RequestContext, respond_json, response_header, unix_now_s};
use crate::error::GatewayError;
use crate::openai::{self, Endpoint, ResponseMeta};

/// How long to wait for a free place in the queue is not a client's choice; when the queue is
/// full the client is told to retry after this long.
const QUEUE_FULL_RETRY_AFTER_S: u64 = 1;

/// A local generation to run.
#[derive(Debug)]
pub struct LocalRequest<'a> {
    pub endpoint: Endpoint,
    pub prompt: edge_runtime::Prompt,
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
    request: LocalRequest<'_>,
) -> Result<Answered, Failure> {
    let info = model.info();
    let prepared = model
        .prepare(&request.prompt)
        .map_err(|error| match error {
            edge_runtime::PromptError::Empty => {
                GatewayError::invalid_value("messages", "the prompt is empty")
            }
            edge_runtime::PromptError::Template(reason) => GatewayError::invalid_value(
                "messages",
                format!("the messages cannot be rendered: {reason}"),
            ),
            edge_runtime::PromptError::ModelNotLoaded(model) => GatewayError::Internal {
                message: format!("model `{model}` is not loaded"),
            },
        })?;
    let prompt_tokens = prepared.token_count();
    let max_tokens = match request.generation.max_tokens {
        Some(max_tokens) => max_tokens,
        None => info.context_tokens.saturating_sub(prompt_tokens),
    };
    ctx.usage.prompt_tokens = prompt_tokens;
    let seed = request
        .generation
        .seed
        .map_or_else(rand::random::<u32>, |seed| (seed ^ (seed >> 32)) as u32);
    let grammar = match &request.generation.response_format {
        None => None,
        Some(format) => Some(json_grammar(format)?),
    };
    let submitted = model.submit(edge_runtime::GenerationRequest {
        prompt: prepared,
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
        grammar,
        logprobs: request.generation.logprobs,
        logit_bias: request.generation.logit_bias.clone(),
    });
    let mut stream = submitted.map_err(|error| match error {
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
        },
        edge_runtime::SubmitError::UnknownToken { token, vocabulary } => {
            GatewayError::invalid_value(
                format!("logit_bias.{token}"),
                format!(
                    "token {token} is not in the vocabulary of `{}` ({vocabulary} tokens)",
                    info.name
                ),
            )
        }
        edge_runtime::SubmitError::Grammar { reason } => GatewayError::invalid_value(
            "response_format",
            format!("the local model cannot follow this response_format: {reason}"),
        ),
        edge_runtime::SubmitError::WrongModel { .. } | edge_runtime::SubmitError::WorkerStopped => {
            GatewayError::Unavailable {
                message: format!("the inference worker of `{}` is not running", info.name),
                retry_after_s: 5,
            }
        }
    })?;

    let meta = ResponseMeta::new(request.endpoint, &ctx.request_id, unix_now_s(), &info.name);
    let first_token_deadline = tokio::time::Instant::now() + request.first_token_timeout;
    if request.generation.stream {
        stream_events(
            session,
            ctx,
            &mut stream,
            &meta,
            request.generation.include_usage,
            first_token_deadline,
        )
        .await
    } else {
        let wants_logprobs = request.generation.logprobs.is_some();
        collect_events(
            session,
            ctx,
            &mut stream,
            &meta,
            wants_logprobs,
            first_token_deadline,
        )
        .await
    }
}

/// The next event of the generation, unless the client leaves or the first token is late.
async fn next_event(
    session: &mut Session,
    ctx: &RequestContext,
    stream: &mut edge_runtime::GenerationStream,
    first_token_deadline: tokio::time::Instant,
) -> Result<edge_runtime::Event, Waited> {
    let waiting_for_first = ctx.first_token.is_none();
    let deadline = async {
        if waiting_for_first {
            tokio::time::sleep_until(first_token_deadline).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        event = stream.next() => event.ok_or(Waited::WorkerGone),
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
        edge_runtime::GenerationError::Decode(_) => GatewayError::Internal {
            message: error.to_string(),
        },
        edge_runtime::GenerationError::WorkerStopped => GatewayError::Unavailable {
            message: error.to_string(),
            retry_after_s: 5,
        },
    }
}

async fn collect_events(
    session: &mut Session,
    ctx: &mut RequestContext,
    stream: &mut edge_runtime::GenerationStream,
    meta: &ResponseMeta,
    wants_logprobs: bool,
    first_token_deadline: tokio::time::Instant,
) -> Result<Answered, Failure> {
    let started = tokio::time::Instant::now();
    let mut text = String::new();
    let mut logprobs = Vec::new();
    loop {
        let event = match next_event(session, ctx, stream, first_token_deadline).await {
            Ok(event) => event,
            Err(Waited::ClientGone(reason)) => return Ok(Answered::ClientGone(reason)),
            Err(waited) => {
                return Err(waited_error(
                    &waited,
                    first_token_deadline.saturating_duration_since(started),
                )
                .into());
            }
        };
        match event {
            edge_runtime::Event::Token {
                text: piece,
                logprobs: token_logprobs,
                ..
            } => {
                let now = ctx.started.elapsed();
                ctx.first_token.get_or_insert(now);
                ctx.last_token = Some(now);
                text.push_str(&piece);
                logprobs.extend(token_logprobs);
            }
            edge_runtime::Event::Done(completion) => {
                text.push_str(&completion.text_tail);
                crate::audit_trail::capture_completion(ctx, &text);
                ctx.usage = completion.usage;
                ctx.finish_reason = Some(completion.finish_reason.as_str());
                let logprobs = (!logprobs.is_empty() || wants_logprobs).then(|| {
                    let tokens: Vec<&edge_runtime::TokenLogprobs> =
                        logprobs.iter().map(AsRef::as_ref).collect();
                    meta.logprobs(&tokens, 0)
                });
                let body = meta.full_response(
                    &text,
                    completion.finish_reason.as_str(),
                    completion.usage,
                    logprobs,
                );
                let body = serde_json::to_vec(&body).unwrap_or_default();
                respond_json(session, ctx, 200, body, None).await?;
                return Ok(Answered::Complete);
            }
            edge_runtime::Event::Failed(error) => return Err(generation_error(&error).into()),
        }
    }
}

async fn stream_events(
    session: &mut Session,
    ctx: &mut RequestContext,
    stream: &mut edge_runtime::GenerationStream,
    meta: &ResponseMeta,
    include_usage: bool,
    first_token_deadline: tokio::time::Instant,
) -> Result<Answered, Failure> {
    let started = tokio::time::Instant::now();
    // Wait for the first event before committing to a 200, so that a queue timeout or a
    // failed prefill is still answered with its own status.
    let first = match next_event(session, ctx, stream, first_token_deadline).await {
        Ok(edge_runtime::Event::Failed(error)) => return Err(generation_error(&error).into()),
        Ok(event) => event,
        Err(Waited::ClientGone(reason)) => return Ok(Answered::ClientGone(reason)),
        Err(waited) => {
            return Err(waited_error(
                &waited,
                first_token_deadline.saturating_duration_since(started),
            )
            .into());
        }
    };
    let mut header = response_header(ctx, 200, "text/event-stream")?;
    header.insert_header("cache-control", "no-cache")?;
    ctx.status = 200;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    if meta.endpoint == Endpoint::Chat {
        write(
            session,
            openai::sse_event(&meta.chunk(true, Some(""), None, include_usage, None)),
        )
        .await?;
    }
    let mut event = first;
    // Bytes of the answer's tokens so far: legacy completions' `text_offset`.
    let mut token_bytes = 0;
    loop {
        match event {
            edge_runtime::Event::Token { text, logprobs, .. } => {
                let now = ctx.started.elapsed();
                ctx.first_token.get_or_insert(now);
                ctx.last_token = Some(now);
                crate::audit_trail::capture_completion(ctx, &text);
                let logprobs = logprobs.map(|token| {
                    let body = meta.logprobs(&[&token], token_bytes);
                    token_bytes += token.token.len();
                    body
                });
                write(
                    session,
                    openai::sse_event(&meta.chunk(
                        false,
                        Some(&text),
                        None,
                        include_usage,
                        logprobs,
                    )),
                )
                .await?;
            }
            edge_runtime::Event::Done(completion) => {
                ctx.usage = completion.usage;
                let finish_reason = completion.finish_reason.as_str();
                ctx.finish_reason = Some(finish_reason);
                crate::audit_trail::capture_completion(ctx, &completion.text_tail);
                let tail =
                    (!completion.text_tail.is_empty()).then_some(completion.text_tail.as_str());
                let last = meta.chunk(false, tail, Some(finish_reason), include_usage, None);
                let mut end = openai::sse_event(&last).to_vec();
                if include_usage {
                    end.extend_from_slice(&openai::sse_event(&meta.usage_chunk(completion.usage)));
                }
                end.extend_from_slice(openai::SSE_DONE);
                crate::audit_trail::seal(session, ctx).await?;
                session
                    .write_response_body(Some(Bytes::from(end)), true)
                    .await?;
                return Ok(Answered::Complete);
            }
            edge_runtime::Event::Failed(error) => {
                // The status line is gone; tell the client in the stream, as OpenAI does.
                let error = generation_error(&error);
                ctx.outcome = Some(error.to_string());
                let body = serde_json::to_value(error.body()).unwrap_or_default();
                let mut end = openai::sse_event(&body).to_vec();
                end.extend_from_slice(openai::SSE_DONE);
                crate::audit_trail::seal(session, ctx).await?;
                session
                    .write_response_body(Some(Bytes::from(end)), true)
                    .await?;
                return Ok(Answered::Complete);
            }
        }
        event = match next_event(session, ctx, stream, first_token_deadline).await {
            Ok(event) => event,
            Err(Waited::ClientGone(reason)) => return Ok(Answered::ClientGone(reason)),
            Err(waited) => edge_runtime::Event::Failed(match waited {
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
        };
    }
}

async fn write(session: &mut Session, data: Bytes) -> Result<(), Failure> {
    session.write_response_body(Some(data), false).await?;
    Ok(())
}
