//! Everything that touches llama.cpp: backend modules, model loading, prompt rendering and
//! the inference worker. This is the only module of the crate that names `llama_cpp_2`.
//!
//! Each model has one worker thread that owns its `LlamaContext` for the context's whole
//! life. The worker admits queued requests into free sequence slots and, on every step, puts
//! all active sequences into one batch: a bounded chunk of prompt for sequences still in
//! prefill, the last sampled token for sequences that are generating. It then samples each
//! sequence with that sequence's own sampler chain and sends the token's text to its caller.
//! A sequence whose caller went away is dropped before the next step and its KV cells freed.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvError, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::{LlamaBackendDeviceType, LogOptions};
use tokio::sync::mpsc;

use crate::stop::{StopMatcher, StopOutcome};
use crate::utf8::Utf8Assembler;
use crate::{
    Completion, EngineOptions, Event, FinishReason, GenerationError, GenerationRequest, LoadError,
    ModelInfo, ModelSpec, PreparedPrompt, Prompt, PromptError, SamplingParams, SharedStats,
    SubmitError, Timings, Usage,
};

/// Candidates kept by top-k before top-p, as llama-server does by default.
const TOP_K: i32 = 40;
/// Tokens below this share of the top token's probability are never drawn (llama-server's
/// default `min_p`); it removes the long tail that makes small models ramble.
const MIN_P: f32 = 0.05;

/// The loaded models and the llama.cpp backend they run on.
#[derive(Debug)]
pub struct Engine {
    models: Vec<ModelHandle>,
    backends_dir: PathBuf,
    devices: Vec<String>,
}

/// A cheap, cloneable handle to one loaded model and its worker.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    shared: Arc<ModelShared>,
}

struct ModelShared {
    info: ModelInfo,
    model: Arc<LlamaModel>,
    template: Option<LlamaChatTemplate>,
    jobs: SyncSender<Job>,
    stats: SharedStats,
    queue_depth_max: u32,
}

impl std::fmt::Debug for ModelShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelShared")
            .field("info", &self.info)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A request on its way to, or waiting in, the worker's queue.
struct Job {
    request: GenerationRequest,
    events: mpsc::Sender<Event>,
    submitted_at: Instant,
}

impl Engine {
    /// Directories searched for backend modules when none is configured, best first: beside
    /// the executable, the packaged library directory, then the build tree.
    pub fn backend_search_dirs() -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(exe_dir) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
        {
            dirs.push(exe_dir.join("backends"));
            dirs.push(exe_dir.join("../lib/isthmus/backends"));
        }
        if let Some(build_dir) = option_env!("ISTHMUS_BUILD_BACKENDS_DIR") {
            dirs.push(PathBuf::from(build_dir));
        }
        dirs
    }

    /// Loads the backend modules, then every model, and starts one worker per model. Returns
    /// when all models are loaded and their contexts created, or with the first failure.
    pub fn start(options: &EngineOptions, specs: &[ModelSpec]) -> Result<Engine, LoadError> {
        llama_cpp_2::send_logs_to_tracing(LogOptions::default());
        let backends_dir = find_backends_dir(options)?;
        llama_cpp_2::llama_backend::load_backends_from_path(&backends_dir);
        let backend =
            Arc::new(LlamaBackend::init().map_err(|error| LoadError::Backend(error.to_string()))?);
        let devices = llama_cpp_2::list_llama_ggml_backend_devices();
        if !devices
            .iter()
            .any(|device| device.device_type == LlamaBackendDeviceType::Cpu)
        {
            return Err(LoadError::Backend(format!(
                "no CPU backend could be loaded from {}",
                backends_dir.display()
            )));
        }
        let has_gpu = devices.iter().any(|device| {
            matches!(
                device.device_type,
                LlamaBackendDeviceType::Gpu | LlamaBackendDeviceType::IntegratedGpu
            )
        });
        let device_names: Vec<String> = devices
            .iter()
            .map(|device| {
                format!(
                    "{} ({}: {})",
                    device.name, device.backend, device.description
                )
            })
            .collect();
        tracing::info!(
            backends_dir = %backends_dir.display(),
            devices = ?device_names,
            "llama.cpp backends loaded"
        );

        let mut models = Vec::with_capacity(specs.len());
        for spec in specs {
            if spec.gpu_layers > 0 && !has_gpu {
                return Err(LoadError::NoGpu {
                    model: spec.name.clone(),
                    gpu_layers: spec.gpu_layers,
                    hint: format!(
                        " (backends loaded from {}; is libggml-cuda.so there?)",
                        backends_dir.display()
                    ),
                });
            }
            models.push(ModelHandle::load(&backend, spec)?);
        }
        Ok(Engine {
            models,
            backends_dir,
            devices: device_names,
        })
    }

    /// The model clients call `name`, if it is loaded.
    pub fn model(&self, name: &str) -> Option<&ModelHandle> {
        self.models.iter().find(|model| model.info().name == name)
    }

    /// All loaded models, in configuration order.
    pub fn models(&self) -> &[ModelHandle] {
        &self.models
    }

    /// Where the backend modules were loaded from.
    pub fn backends_dir(&self) -> &Path {
        &self.backends_dir
    }

    /// The devices llama.cpp found, as `name (backend: description)`.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }
}

fn find_backends_dir(options: &EngineOptions) -> Result<PathBuf, LoadError> {
    let candidates = match &options.backends_dir {
        Some(dir) => vec![dir.clone()],
        None => Engine::backend_search_dirs(),
    };
    candidates
        .iter()
        .find(|dir| has_cpu_backend(dir))
        .cloned()
        .ok_or_else(|| {
            let searched: Vec<String> = candidates
                .iter()
                .map(|dir| dir.display().to_string())
                .collect();
            LoadError::Backend(format!(
                "no llama.cpp CPU backend module (libggml-cpu*.so) in {}",
                searched.join(", ")
            ))
        })
}

fn has_cpu_backend(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with("libggml-cpu") && name.ends_with(".so"))
        })
    })
}

impl ModelHandle {
    fn load(backend: &Arc<LlamaBackend>, spec: &ModelSpec) -> Result<ModelHandle, LoadError> {
        let model_error = |reason: String| LoadError::Model {
            model: spec.name.clone(),
            path: spec.path.clone(),
            reason,
        };
        let metadata =
            std::fs::metadata(&spec.path).map_err(|error| model_error(error.to_string()))?;
        let params = LlamaModelParams::default().with_n_gpu_layers(spec.gpu_layers);
        let started = Instant::now();
        let model = Arc::new(
            LlamaModel::load_from_file(backend, &spec.path, &params)
                .map_err(|error| model_error(error.to_string()))?,
        );
        let template = model.chat_template(None).ok();
        let info = ModelInfo {
            name: spec.name.clone(),
            path: spec.path.clone(),
            context_tokens: spec.context_tokens,
            parallel_sequences: spec.parallel_sequences,
            trained_context_tokens: model.n_ctx_train(),
            parameters: model.n_params(),
            size_bytes: model.size(),
            created_unix_s: metadata
                .modified()
                .ok()
                .and_then(|modified| modified.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |age| age.as_secs()),
        };
        tracing::info!(
            model = %spec.name,
            path = %spec.path.display(),
            parameters = info.parameters,
            size_bytes = info.size_bytes,
            trained_context_tokens = info.trained_context_tokens,
            has_chat_template = template.is_some(),
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );

        let queue_depth = usize::try_from(spec.queue_depth_max).unwrap_or(usize::MAX);
        let (jobs, receiver) = std::sync::mpsc::sync_channel(queue_depth);
        let stats = SharedStats::default();
        let (ready_sender, ready) = std::sync::mpsc::sync_channel(1);
        let worker = Worker {
            backend: Arc::clone(backend),
            model: Arc::clone(&model),
            spec: spec.clone(),
            stats: Arc::clone(&stats),
            eog_tokens: eog_tokens(&model),
        };
        std::thread::Builder::new()
            .name(format!("infer-{}", spec.name))
            .spawn(move || worker.run(receiver, ready_sender))
            .map_err(|error| LoadError::Worker {
                model: spec.name.clone(),
                reason: error.to_string(),
            })?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                return Err(LoadError::Context {
                    model: spec.name.clone(),
                    reason,
                });
            }
            Err(RecvError) => {
                return Err(LoadError::Worker {
                    model: spec.name.clone(),
                    reason: "worker ended during start-up".to_owned(),
                });
            }
        }
        Ok(ModelHandle {
            shared: Arc::new(ModelShared {
                info,
                model,
                template,
                jobs,
                stats,
                queue_depth_max: spec.queue_depth_max,
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    pub fn stats(&self) -> &SharedStats {
        &self.shared.stats
    }

    /// Renders `prompt` (chat messages through the model's own template) and tokenizes it.
    pub fn prepare(&self, prompt: &Prompt) -> Result<PreparedPrompt, PromptError> {
        let text = match prompt {
            Prompt::Text(text) => text.clone(),
            Prompt::Chat(messages) => {
                let template = self.shared.template.as_ref().ok_or_else(|| {
                    PromptError::Template("the model's GGUF carries no chat template".to_owned())
                })?;
                let messages = messages
                    .iter()
                    .map(|message| {
                        LlamaChatMessage::new(
                            message.role.as_str().to_owned(),
                            message.content.clone(),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| PromptError::Template(error.to_string()))?;
                self.shared
                    .model
                    .apply_chat_template(template, &messages, true)
                    .map_err(|error| PromptError::Template(error.to_string()))?
            }
        };
        let tokens: Vec<i32> = self
            .shared
            .model
            .vocab()
            .tokenize(text.as_bytes(), true, true)
            .into_iter()
            .map(|token| token.0)
            .collect();
        if tokens.is_empty() {
            return Err(PromptError::Empty);
        }
        Ok(PreparedPrompt {
            model: self.shared.info.name.clone(),
            tokens,
        })
    }

    /// Queues a generation. The stream yields one event per token, then the end.
    pub fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, SubmitError> {
        let info = &self.shared.info;
        if request.prompt.model != info.name {
            return Err(SubmitError::WrongModel {
                prepared_for: request.prompt.model.clone(),
                model: info.name.clone(),
            });
        }
        let prompt_tokens = request.prompt.token_count();
        if prompt_tokens.saturating_add(request.max_tokens) > info.context_tokens
            || prompt_tokens >= info.context_tokens
        {
            return Err(SubmitError::ContextLengthExceeded {
                context_tokens: info.context_tokens,
                prompt_tokens,
                max_tokens: request.max_tokens,
            });
        }
        // One event per generated token plus the final one: the worker never has to wait.
        let events_max = usize::try_from(request.max_tokens)
            .unwrap_or(usize::MAX)
            .saturating_add(2);
        let (events, receiver) = mpsc::channel(events_max);
        let job = Job {
            request,
            events,
            submitted_at: Instant::now(),
        };
        self.shared
            .stats
            .queue_depth
            .fetch_add(1, Ordering::Relaxed);
        match self.shared.jobs.try_send(job) {
            Ok(()) => Ok(GenerationStream { receiver }),
            Err(error) => {
                self.shared
                    .stats
                    .queue_depth
                    .fetch_sub(1, Ordering::Relaxed);
                match error {
                    TrySendError::Full(_) => Err(SubmitError::QueueFull {
                        capacity: self.shared.queue_depth_max,
                    }),
                    TrySendError::Disconnected(_) => Err(SubmitError::WorkerStopped),
                }
            }
        }
    }
}

/// The events of one generation. Dropping it cancels the generation within one step.
#[derive(Debug)]
pub struct GenerationStream {
    receiver: mpsc::Receiver<Event>,
}

impl GenerationStream {
    /// The next event; after `Done` or `Failed` there are none.
    pub async fn next(&mut self) -> Option<Event> {
        self.receiver.recv().await
    }
}

fn eog_tokens(model: &LlamaModel) -> Vec<LlamaToken> {
    let vocab = model.vocab();
    vocab
        .tokens()
        .filter(|token| vocab.is_eog(*token))
        .collect()
}

/// What the worker thread owns besides its context.
struct Worker {
    backend: Arc<LlamaBackend>,
    model: Arc<LlamaModel>,
    spec: ModelSpec,
    stats: SharedStats,
    eog_tokens: Vec<LlamaToken>,
}

/// One admitted request, bound to a sequence id (its slot index).
struct Sequence {
    id: i32,
    events: mpsc::Sender<Event>,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens already decoded into the KV cache.
    prompt_fed: usize,
    /// Position the next decoded token takes.
    position: i32,
    /// The token sampled last step, to be decoded this step.
    pending_token: Option<LlamaToken>,
    /// Where this sequence's logits are in the current batch, if it asked for any.
    logits_index: Option<i32>,
    sampler: LlamaSampler,
    generated: u32,
    max_tokens: u32,
    ignore_eos: bool,
    utf8: Utf8Assembler,
    stop: StopMatcher,
    piece: Vec<u8>,
    queued: Duration,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
}

enum Step {
    Continue,
    Finished,
}

impl Worker {
    fn run(self, jobs: Receiver<Job>, ready: SyncSender<Result<(), String>>) {
        let spec = &self.spec;
        let threads = i32::try_from(spec.threads).unwrap_or(i32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(
                spec.context_tokens.saturating_mul(spec.parallel_sequences),
            ))
            .with_n_batch(spec.batch_tokens)
            .with_n_ubatch(spec.batch_tokens)
            .with_n_seq_max(spec.parallel_sequences)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_kv_unified(false);
        let mut context = match self.model.new_context(&self.backend, params) {
            Ok(context) => context,
            Err(error) => {
                let _ = ready.send(Err(error.to_string()));
                return;
            }
        };
        if ready.send(Ok(())).is_err() {
            return;
        }
        tracing::info!(
            model = %spec.name,
            context_tokens = spec.context_tokens,
            parallel_sequences = spec.parallel_sequences,
            batch_tokens = spec.batch_tokens,
            threads = spec.threads,
            "inference worker ready"
        );
        let batch_capacity = usize::try_from(spec.batch_tokens).unwrap_or(512);
        let mut batch = LlamaBatch::new(batch_capacity, 1);
        let mut slots: Vec<Option<Sequence>> = (0..spec.parallel_sequences).map(|_| None).collect();
        // Admission order, so prefill chunks go to the oldest request first.
        let mut admitted: Vec<i32> = Vec::new();

        loop {
            if !self.admit(&jobs, &mut slots, &mut admitted, &mut context) {
                return;
            }
            self.drop_cancelled(&mut slots, &mut admitted, &mut context);
            if admitted.is_empty() {
                continue;
            }
            let participants = self.fill_batch(&mut batch, &mut slots, &admitted, batch_capacity);
            if participants.is_empty() {
                continue;
            }
            self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            self.stats.batched_tokens.fetch_add(
                u64::try_from(batch.n_tokens()).unwrap_or(0),
                Ordering::Relaxed,
            );
            if let Err(error) = context.decode(&mut batch) {
                tracing::error!(model = %spec.name, %error, "llama_decode failed");
                for id in participants {
                    if let Some(sequence) = slot(&mut slots, id) {
                        let failure = GenerationError::Decode(error.to_string());
                        let _ = sequence.events.try_send(Event::Failed(failure));
                    }
                    self.release(id, &mut slots, &mut admitted, &mut context);
                }
                continue;
            }
            for id in admitted.clone() {
                let Some(sequence) = slot(&mut slots, id) else {
                    continue;
                };
                let Some(index) = sequence.logits_index.take() else {
                    continue;
                };
                if let Step::Finished = self.sample(sequence, &context, index) {
                    self.release(id, &mut slots, &mut admitted, &mut context);
                }
            }
        }
    }

    /// Moves queued jobs into free slots. Blocks when nothing is running. Returns false when
    /// the runtime is gone and the worker should end.
    fn admit(
        &self,
        jobs: &Receiver<Job>,
        slots: &mut [Option<Sequence>],
        admitted: &mut Vec<i32>,
        context: &mut LlamaContext<'_>,
    ) -> bool {
        while let Some(free) = slots.iter().position(Option::is_none) {
            let job = if admitted.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(RecvError) => return false,
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => return true,
                }
            };
            self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                continue;
            }
            let queued = job.submitted_at.elapsed();
            if queued > Duration::from_millis(self.spec.queue_timeout_ms) {
                let _ = job
                    .events
                    .try_send(Event::Failed(GenerationError::QueueTimeout {
                        timeout_ms: self.spec.queue_timeout_ms,
                    }));
                continue;
            }
            let id = i32::try_from(free).unwrap_or(i32::MAX);
            // A slot's cells are freed when it is released; clear again in case a failed
            // decode left some behind.
            let _ = context.clear_kv_cache_seq(u32::try_from(id).ok(), None, None);
            let request = job.request;
            let sampler = self.sampler_for(&request.sampling, request.ignore_eos);
            slots[free] = Some(Sequence {
                id,
                events: job.events,
                prompt: request
                    .prompt
                    .tokens
                    .iter()
                    .copied()
                    .map(LlamaToken::new)
                    .collect(),
                prompt_fed: 0,
                position: 0,
                pending_token: None,
                logits_index: None,
                sampler,
                generated: 0,
                max_tokens: request.max_tokens,
                ignore_eos: request.ignore_eos,
                utf8: Utf8Assembler::default(),
                stop: StopMatcher::new(request.stop),
                piece: Vec::new(),
                queued,
                admitted_at: Instant::now(),
                first_token_at: None,
            });
            admitted.push(id);
            self.stats.active_sequences.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    fn sampler_for(&self, sampling: &SamplingParams, ignore_eos: bool) -> LlamaSampler {
        let mut chain = Vec::new();
        if ignore_eos {
            let biases: Vec<LlamaLogitBias> = self
                .eog_tokens
                .iter()
                .map(|token| LlamaLogitBias::new(*token, f32::NEG_INFINITY))
                .collect();
            chain.push(LlamaSampler::logit_bias(self.model.n_vocab(), &biases));
        }
        if sampling.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            chain.push(LlamaSampler::top_k(TOP_K));
            chain.push(LlamaSampler::top_p(sampling.top_p, 1));
            chain.push(LlamaSampler::min_p(MIN_P, 1));
            chain.push(LlamaSampler::temp(sampling.temperature));
            chain.push(LlamaSampler::dist(sampling.seed));
        }
        LlamaSampler::chain_simple(chain)
    }

    fn drop_cancelled(
        &self,
        slots: &mut [Option<Sequence>],
        admitted: &mut Vec<i32>,
        context: &mut LlamaContext<'_>,
    ) {
        for id in admitted.clone() {
            if slot(slots, id).is_some_and(|sequence| sequence.events.is_closed()) {
                tracing::debug!(model = %self.spec.name, sequence = id, "caller gone; sequence dropped");
                self.release(id, slots, admitted, context);
            }
        }
    }

    /// Generating sequences contribute their pending token; the rest of the batch goes to
    /// prompt chunks, oldest request first. Returns the sequences that are in the batch.
    fn fill_batch(
        &self,
        batch: &mut LlamaBatch<'_>,
        slots: &mut [Option<Sequence>],
        admitted: &[i32],
        batch_capacity: usize,
    ) -> Vec<i32> {
        batch.clear();
        let mut participants = Vec::with_capacity(admitted.len());
        for &id in admitted {
            let Some(sequence) = slot(slots, id) else {
                continue;
            };
            if let Some(token) = sequence.pending_token.take()
                && batch
                    .add(token, sequence.position, &[sequence.id], true)
                    .is_ok()
            {
                sequence.logits_index = Some(batch.n_tokens() - 1);
                sequence.position += 1;
                participants.push(id);
            }
        }
        for &id in admitted {
            let Some(sequence) = slot(slots, id) else {
                continue;
            };
            let remaining = sequence.prompt.len() - sequence.prompt_fed;
            let room =
                batch_capacity.saturating_sub(usize::try_from(batch.n_tokens()).unwrap_or(0));
            if remaining == 0 || room == 0 {
                continue;
            }
            let chunk = remaining.min(room);
            let completes = chunk == remaining;
            participants.push(id);
            for offset in 0..chunk {
                let index = sequence.prompt_fed + offset;
                let last = completes && offset + 1 == chunk;
                if batch
                    .add(
                        sequence.prompt[index],
                        sequence.position,
                        &[sequence.id],
                        last,
                    )
                    .is_err()
                {
                    break;
                }
                sequence.position += 1;
                if last {
                    sequence.logits_index = Some(batch.n_tokens() - 1);
                }
            }
            sequence.prompt_fed += chunk;
        }
        participants
    }

    /// Samples the sequence's next token and sends its text.
    fn sample(&self, sequence: &mut Sequence, context: &LlamaContext<'_>, index: i32) -> Step {
        let token = sequence.sampler.sample(context, index);
        let now = Instant::now();
        sequence.first_token_at.get_or_insert(now);
        if !sequence.ignore_eos && self.model.vocab().is_eog(token) {
            return self.finish(sequence, FinishReason::Stop, true);
        }
        sequence.generated += 1;
        sequence.piece.clear();
        self.model
            .vocab()
            .token_to_piece_into(token, &mut sequence.piece, false, None);
        let text = sequence.utf8.push(&sequence.piece);
        let (emit, stopped) = match sequence.stop.push(&text) {
            StopOutcome::Continue(emit) => (emit, false),
            StopOutcome::Stopped(emit) => (emit, true),
        };
        if sequence
            .events
            .try_send(Event::Token { text: emit })
            .is_err()
        {
            return Step::Finished;
        }
        if stopped {
            return self.finish(sequence, FinishReason::Stop, false);
        }
        let context_full =
            u32::try_from(sequence.position).unwrap_or(u32::MAX) >= self.spec.context_tokens;
        if sequence.generated >= sequence.max_tokens || context_full {
            return self.finish(sequence, FinishReason::Length, true);
        }
        sequence.pending_token = Some(token);
        Step::Continue
    }

    fn finish(&self, sequence: &mut Sequence, reason: FinishReason, flush: bool) -> Step {
        let text_tail = if flush {
            let rest = sequence.utf8.finish();
            match sequence.stop.push(&rest) {
                StopOutcome::Continue(emit) => emit + &sequence.stop.finish(),
                StopOutcome::Stopped(emit) => emit,
            }
        } else {
            String::new()
        };
        let first_token_at = sequence.first_token_at.unwrap_or(sequence.admitted_at);
        let completion = Completion {
            finish_reason: reason,
            text_tail,
            usage: Usage {
                prompt_tokens: u32::try_from(sequence.prompt.len()).unwrap_or(u32::MAX),
                completion_tokens: sequence.generated,
                cached_tokens: 0,
            },
            timings: Timings {
                queued: sequence.queued,
                prefill: first_token_at.duration_since(sequence.admitted_at),
                decode: first_token_at.elapsed(),
            },
        };
        tracing::debug!(
            model = %self.spec.name,
            sequence = sequence.id,
            prompt_tokens = completion.usage.prompt_tokens,
            completion_tokens = completion.usage.completion_tokens,
            finish_reason = reason.as_str(),
            "generation finished"
        );
        let _ = sequence.events.try_send(Event::Done(completion));
        Step::Finished
    }

    fn release(
        &self,
        id: i32,
        slots: &mut [Option<Sequence>],
        admitted: &mut Vec<i32>,
        context: &mut LlamaContext<'_>,
    ) {
        if let Some(entry) = usize::try_from(id)
            .ok()
            .and_then(|index| slots.get_mut(index))
            && entry.take().is_some()
        {
            self.stats.active_sequences.fetch_sub(1, Ordering::Relaxed);
        }
        admitted.retain(|&other| other != id);
        let _ = context.clear_kv_cache_seq(u32::try_from(id).ok(), None, None);
    }
}

fn slot(slots: &mut [Option<Sequence>], id: i32) -> Option<&mut Sequence> {
    usize::try_from(id)
        .ok()
        .and_then(|index| slots.get_mut(index))
        .and_then(Option::as_mut)
}
