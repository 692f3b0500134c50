//! In-process inference on llama.cpp for the Isthmus gateway.
//!
//! The runtime loads the GGUF models named in the configuration and gives each one a worker
//! thread that owns its `LlamaContext`. Requests reach a worker through a bounded queue; the
//! worker admits up to `parallel_sequences` of them at once and puts every active sequence
//! into each `llama_decode` (continuous batching): sequences still reading their prompt
//! contribute a bounded chunk of it, generating sequences one token. Tokens go back to the
//! caller as they are produced, one event per token, already assembled into valid UTF-8 and
//! with stop strings removed.
//!
//! This crate knows nothing of HTTP or JSON. Only the `llama` module names `llama_cpp_2`.

pub mod backends;
pub mod gguf;
mod llama;
pub mod logprobs;
pub mod prefix;
pub mod schedule;
pub mod stop;
pub mod template;
pub mod utf8;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use gguf::KvCacheType;
pub use llama::{EmbedSubmitError, Engine, GenerationStream, ModelHandle};

/// How the runtime finds llama.cpp's backend modules.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// A directory of backend modules (`libggml-cpu-*.so`, `libggml-cuda.so`). When absent,
    /// the directories in [`Engine::backend_search_dirs`] are tried in order.
    pub backends_dir: Option<PathBuf>,
}

/// One model to load, with the capacity it serves.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The name clients use in `model`.
    pub name: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// Context length of each sequence (prompt plus completion), in tokens.
    pub context_tokens: u32,
    /// How many requests decode together in one batch.
    pub parallel_sequences: u32,
    /// Most tokens one decode step takes.
    pub batch_tokens: u32,
    /// Most prompt tokens one decode step takes while other sequences are generating: bounds
    /// the gap between their tokens when long prompts arrive (chunked prefill).
    pub prefill_chunk_tokens: u32,
    /// CPU threads for decoding.
    pub threads: u32,
    /// Layers offloaded to a GPU; 0 runs on the CPU.
    pub gpu_layers: u32,
    /// Requests that may wait for a free sequence before submissions are refused.
    pub queue_depth_max: u32,
    /// One KV cache shared by all sequences (a prefix is stored once and reused by every
    /// request that starts with it) rather than one cache per sequence.
    pub kv_unified: bool,
    /// How the KV cache stores keys and values (f16 unless set; `q8_0` about halves it).
    pub kv_cache_type: KvCacheType,
    /// Finished sequences kept for prefix reuse: cache sequences in a unified cache,
    /// host-memory states with one cache per sequence.
    pub prefix_cache_entries: u32,
    /// Tokens those kept sequences may hold in all; the KV cache grows by this many cells.
    pub prefix_cache_tokens_max: u32,
    /// With one cache per sequence: copy what finished sequences leave in their slots into
    /// the prefix cache only while nothing runs, instead of as each finishes. Worth it where
    /// the copy is a device transfer (GPU layers); on the CPU it is a memory copy.
    pub park_prefixes_when_idle: bool,
    /// Hand each step's tokens to their connections while the device computes the next
    /// step, instead of before launching it. Worth it where `llama_decode` returns before
    /// the device finishes (GPU layers); on the CPU it computes on the worker's thread, so
    /// every token would go out a whole step later.
    pub overlap_token_delivery: bool,
    /// How long a request may wait in the queue before it fails.
    pub queue_timeout_ms: u64,
    /// llama.cpp contexts the sequences are split over, each with `parallel_sequences /
    /// lanes` sequences, its own KV cache, prefix cache and worker thread, sharing the
    /// model's weights and `threads`. On a GPU one lane's host work (graph inputs, launch,
    /// token choice) runs while the others' steps compute, and the lanes' kernels share the
    /// device. Must divide `parallel_sequences`.
    pub lanes: u32,
    /// Jinja text that renders chat messages instead of the template in the GGUF (for a
    /// model file without one, or one to correct). It must compile and render.
    pub chat_template: Option<String>,
}

/// Who said a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a chat prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Rendered with the model's own chat template (from its GGUF metadata).
    Chat(Vec<ChatMessage>),
    /// Used as it is.
    Text(String),
    /// Token ids of the model's vocabulary, used as they are (no start token is added).
    Tokens(Vec<u32>),
}

/// Sampling settings of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 samples greedily (always the most likely token).
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f32,
    /// Seed of the request's own random stream (`u32::MAX` draws as `u32::MAX - 1`: llama.cpp
    /// reserves it for a seed from the clock).
    pub seed: u32,
    /// Subtracted from the logit of every token the answer already holds (OpenAI's
    /// `presence_penalty`, -2 to 2; 0 for none).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time the answer already holds it (OpenAI's
    /// `frequency_penalty`, -2 to 2; 0 for none).
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: temperature 1, `top_p` 1, no penalties.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// A constraint on what a generation may produce: a grammar in llama.cpp's GBNF whose `root`
/// rule the whole completion must match. Tokens the grammar does not allow are never
/// chosen, and once it is complete only an end of generation is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grammar {
    gbnf: String,
}

/// Why a JSON schema cannot become a [`Grammar`]: llama.cpp's converter refused it (not
/// JSON, a `$ref` it cannot resolve, a keyword value of the wrong type, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("llama.cpp's JSON schema converter refused the schema")]
pub struct GrammarError;

impl Grammar {
    /// Any JSON object, with at most a little whitespace between its tokens.
    pub fn json_object() -> Result<Grammar, GrammarError> {
        Grammar::json_schema(r#"{"type": "object"}"#)
    }

    /// JSON that matches `schema` (JSON Schema text), converted by llama.cpp's own converter
    /// (the one llama-server uses for `response_format`): types, `properties` and
    /// `required`, `additionalProperties`, `items`, `enum`, `const`, `anyOf`/`oneOf`/`allOf`,
    /// `$ref` within the schema, string lengths and patterns, array lengths, number bounds.
    pub fn json_schema(schema: &str) -> Result<Grammar, GrammarError> {
        llama::json_schema_gbnf(schema)
            .map(|gbnf| Grammar { gbnf })
            .ok_or(GrammarError)
    }

    /// The grammar's GBNF text.
    pub fn gbnf(&self) -> &str {
        &self.gbnf
    }
}

/// A prompt rendered and tokenized for one model, ready to submit.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    model: String,
    tokens: Vec<i32>,
}

impl PreparedPrompt {
    /// Prompt length in tokens, as billed in `usage.prompt_tokens`.
    pub fn token_count(&self) -> u32 {
        u32::try_from(self.tokens.len()).unwrap_or(u32::MAX)
    }

    /// The model the prompt was tokenized for.
    pub fn model(&self) -> &str {
        &self.model
    }
}

/// A generation to run.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: PreparedPrompt,
    /// Most tokens to generate; generation also ends when the sequence's context is full.
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Never end on an end-of-generation token (benchmarks generate exactly `max_tokens`).
    pub ignore_eos: bool,
    /// Attach each token's top-2 logit margin to its event.
    pub record_margins: bool,
    /// What the completion must match (a JSON `response_format`); `None` leaves it free.
    pub grammar: Option<Grammar>,
    /// Attach each token's log-probability, and this many most likely alternatives, to its
    /// event (OpenAI's `logprobs`); `None` for neither.
    pub logprobs: Option<u8>,
    /// Added to these tokens' logits before any choice (OpenAI's `logit_bias`: -100 bans a
    /// token, 100 all but forces it). Ids must be in the model's vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
}

/// A generated token's log-probability under the model (the log of the softmax of its raw
/// logits: before temperature, top-p or a grammar), and the most likely tokens there.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token's bytes; a token may hold part of a UTF-8 character.
    pub token: Vec<u8>,
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first, as many as asked.
    pub top: Vec<TopLogprob>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: Vec<u8>,
    pub logprob: f32,
}

/// Why generation ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer or a stop string was reached.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token accounting of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    /// Tokens sampled for the answer, the end-of-generation token excluded.
    pub completion_tokens: u32,
    /// Prompt tokens served from the KV cache instead of being decoded.
    pub cached_tokens: u32,
}

/// Where the time of one request went, measured by the worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// From submission until a sequence was free.
    pub queued: Duration,
    /// From admission until the first token was sampled.
    pub prefill: Duration,
    /// From the first token until the last.
    pub decode: Duration,
}

/// The end of a successful generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    /// Text held back while it might have begun a stop string, released at the end.
    pub text_tail: String,
    /// The log-probabilities of the tokens whose text is released in `text_tail`.
    pub tail_logprobs: Vec<TokenLogprobs>,
    pub usage: Usage,
    pub timings: Timings,
}

/// What a generation stream yields: one `Token` per generated token, then `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The text this token completes; empty while bytes or a possible stop string are held.
    /// `margin`: the gap between the two largest logits, when the request asked for it.
    Token {
        text: String,
        margin: Option<f32>,
        /// The log-probabilities of the tokens whose text begins in `text`, when the request
        /// asked for them: none while a token's text is held, several once held text goes
        /// out, and never those of a stop string's tokens.
        logprobs: Vec<TokenLogprobs>,
    },
    Done(Completion),
    Failed(GenerationError),
}

/// A generation that failed after it was accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerationError {
    #[error("request waited more than {timeout_ms} ms for a free sequence")]
    QueueTimeout { timeout_ms: u64 },
    #[error("inference failed: {0}")]
    Decode(String),
    #[error("inference worker stopped")]
    WorkerStopped,
    #[error("the inference thread failed while generating this answer; it restarts")]
    WorkerFailed,
}

/// Why a prompt could not be prepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("model `{0}` is not loaded")]
    ModelNotLoaded(String),
    #[error("the model's chat template could not render these messages: {0}")]
    Template(String),
    #[error("the prompt is empty")]
    Empty,
    #[error("token {token} is not in the model's vocabulary of {vocabulary} tokens")]
    UnknownToken { token: u32, vocabulary: u32 },
    /// Refused before tokenizing: no token of the vocabulary is longer than
    /// `token_bytes_max`, so the text holds more tokens than the context.
    #[error(
        "this model's maximum context length is {context_tokens} tokens; the prompt's \
         {text_bytes} bytes of text hold more (no token of its vocabulary is longer than \
         {token_bytes_max} bytes)"
    )]
    TooLong {
        text_bytes: usize,
        context_tokens: u32,
        token_bytes_max: usize,
    },
    /// Refused before rendering: every message takes at least one token (its role's marker).
    #[error(
        "this model's maximum context length is {context_tokens} tokens; {messages} messages \
         take more (each at least one)"
    )]
    TooManyMessages {
        messages: usize,
        context_tokens: u32,
    },
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("inference queue is full ({capacity} requests)")]
    QueueFull { capacity: u32 },
    #[error(
        "this model's maximum context length is {context_tokens} tokens; the request needs \
         {prompt_tokens} for the prompt and {max_tokens} for the completion"
    )]
    ContextLengthExceeded {
        context_tokens: u32,
        prompt_tokens: u32,
        max_tokens: u32,
    },
    #[error("prompt was prepared for model `{prepared_for}`, not `{model}`")]
    WrongModel { prepared_for: String, model: String },
    #[error("inference worker stopped")]
    WorkerStopped,
    #[error("the grammar cannot be used with this model's vocabulary: {reason}")]
    Grammar { reason: String },
    #[error("token {token} is not in the model's vocabulary of {vocabulary} tokens")]
    UnknownToken { token: u32, vocabulary: u32 },
}

/// One input of an embeddings request: text (tokenized with the model's start token), or
/// tokens as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// The vectors of an embeddings request, one per input in order, each of unit length.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
}

/// Why an embeddings request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbeddingError {
    #[error("input {index} has {tokens} tokens; this model embeds at most {tokens_max} at once")]
    InputTooLong {
        index: usize,
        tokens: usize,
        tokens_max: u32,
    },
    #[error("input {index} is empty")]
    EmptyInput { index: usize },
    #[error(
        "token {token} of input {index} is not in the model's vocabulary of {vocabulary} tokens"
    )]
    UnknownToken {
        index: usize,
        token: u32,
        vocabulary: u32,
    },
    #[error("embedding failed: {0}")]
    Failed(String),
    #[error("inference worker stopped")]
    WorkerStopped,
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    #[error("model `{model}`: {path}: {reason}")]
    Model {
        model: String,
        path: PathBuf,
        reason: String,
    },
    #[error("model `{model}`: creating the inference context: {reason}")]
    Context { model: String, reason: String },
    #[error("model `{model}`: gpu_layers is {gpu_layers} but no GPU device was found{hint}")]
    NoGpu {
        model: String,
        gpu_layers: u32,
        hint: String,
    },
    #[error("model `{model}`: starting the worker thread: {reason}")]
    Worker { model: String, reason: String },
}

/// Static facts about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub context_tokens: u32,
    pub parallel_sequences: u32,
    /// Contexts the sequences are split over (`ModelSpec::lanes`).
    pub lanes: u32,
    /// Context length the model was trained with.
    pub trained_context_tokens: u32,
    pub parameters: u64,
    pub size_bytes: u64,
    /// Unix time the model file was last modified (OpenAI's `created`).
    pub created_unix_s: u64,
    /// Dimensions of the model's embeddings (`/v1/embeddings`).
    pub embedding_width: u32,
}

/// Live counters of one model's worker, for metrics and routing signals.
#[derive(Debug, Default)]
pub struct ModelStats {
    queue_depth: AtomicU64,
    active_sequences: AtomicU64,
    decode_steps: AtomicU64,
    batched_tokens: AtomicU64,
    decode_micros: AtomicU64,
    busy_micros: AtomicU64,
    sync_micros: AtomicU64,
    sampling_nanos: AtomicU64,
    prompt_tokens: AtomicU64,
    prefill_tokens: AtomicU64,
    decode_tokens: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    kv_cells_used: AtomicU64,
    kv_cells_total: AtomicU64,
    prefix_cache_entries: AtomicU64,
    prefix_cache_host_bytes: AtomicU64,
    workers_failed: AtomicU64,
    worker_panics: AtomicU64,
}

impl ModelStats {
    /// The model's inference threads (lanes and the embeddings worker) down after a panic:
    /// waiting to restart, or not restarted after repeated panics (what they serve then
    /// fails until the gateway restarts).
    pub fn workers_failed(&self) -> u64 {
        self.workers_failed.load(Ordering::Relaxed)
    }
    /// Panics of the model's inference threads so far; each failed the requests the thread
    /// was generating.
    pub fn worker_panics(&self) -> u64 {
        self.worker_panics.load(Ordering::Relaxed)
    }
    /// Requests waiting for a free sequence.
    pub fn queue_depth(&self) -> u64 {
        self.queue_depth.load(Ordering::Relaxed)
    }
    /// Sequences admitted and not yet finished.
    pub fn active_sequences(&self) -> u64 {
        self.active_sequences.load(Ordering::Relaxed)
    }
    /// `llama_decode` calls so far.
    pub fn decode_steps(&self) -> u64 {
        self.decode_steps.load(Ordering::Relaxed)
    }
    /// Tokens put into those calls.
    pub fn batched_tokens(&self) -> u64 {
        self.batched_tokens.load(Ordering::Relaxed)
    }
    /// Time spent in `llama_decode`, in microseconds.
    pub fn decode_micros(&self) -> u64 {
        self.decode_micros.load(Ordering::Relaxed)
    }
    /// Time the worker spent working (admitting, batching, decoding, sampling, delivering),
    /// in microseconds; the part beyond `decode_micros` is the host's share of each step.
    pub fn busy_micros(&self) -> u64 {
        self.busy_micros.load(Ordering::Relaxed)
    }
    /// Time spent waiting for the device to finish decode steps (GPUs decode asynchronously;
    /// on the CPU this is near zero), in microseconds.
    pub fn sync_micros(&self) -> u64 {
        self.sync_micros.load(Ordering::Relaxed)
    }
    /// Time spent choosing tokens from the logits (greedy scans and sampler chains), in
    /// nanoseconds: part of the host's share of each step.
    pub fn sampling_nanos(&self) -> u64 {
        self.sampling_nanos.load(Ordering::Relaxed)
    }
    /// Prompt tokens of admitted requests.
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens.load(Ordering::Relaxed)
    }
    /// Prompt tokens decoded (those not served from the prefix cache).
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens.load(Ordering::Relaxed)
    }
    /// Tokens generated.
    pub fn decode_tokens(&self) -> u64 {
        self.decode_tokens.load(Ordering::Relaxed)
    }
    /// Prompt tokens served from a cached prefix.
    pub fn prefix_hit_tokens(&self) -> u64 {
        self.prefix_hit_tokens.load(Ordering::Relaxed)
    }
    /// KV cells holding data some sequence or cached prefix uses.
    pub fn kv_cells_used(&self) -> u64 {
        self.kv_cells_used.load(Ordering::Relaxed)
    }
    /// KV cells of the context.
    pub fn kv_cells_total(&self) -> u64 {
        self.kv_cells_total.load(Ordering::Relaxed)
    }
    /// Finished sequences kept for prefix reuse.
    pub fn prefix_cache_entries(&self) -> u64 {
        self.prefix_cache_entries.load(Ordering::Relaxed)
    }
    /// Host memory the kept prefixes take (one cache per sequence keeps them there).
    pub fn prefix_cache_host_bytes(&self) -> u64 {
        self.prefix_cache_host_bytes.load(Ordering::Relaxed)
    }
}

/// Shared handle to a model's counters.
pub type SharedStats = Arc<ModelStats>;
