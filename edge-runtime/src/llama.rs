//! Everything that touches llama.cpp: backend modules, model loading, prompt rendering and
//! the inference worker. This is the only module of the crate that names `llama_cpp_2`.
//!
//! Each model has one worker thread that owns its `LlamaContext` for the context's whole
//! life. The worker admits queued requests into free sequence slots and, on every step, puts
//! all active sequences into one batch: a bounded chunk of prompt for sequences still in
//! prefill, the last sampled token for sequences that are generating. It then samples each
//! sequence with that sequence's own sampler chain and sends the token's text to its caller.
//! A sequence whose caller went away is dropped before the next step and its KV cells freed.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::session::{LlamaStateSeqFlags, SeqState};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::{DecodeError, LlamaBackendDeviceType, LogOptions};
use tokio::sync::mpsc;

use crate::prefix::{
    CellLedger, PrefixCache, PrefixMatch, RecentPrompts, SeqId, best_match, block_digests,
    choose_slot,
};
use crate::schedule::{PendingPrompt, prefill_plan};
use crate::stop::{StopMatcher, StopOutcome, TokenValues};
use crate::template::{ChatTemplate, SpecialTokens};
use crate::utf8::Utf8Assembler;
use crate::{
    ChatMessage, Completion, EmbeddingError, EmbeddingInput, Embeddings, EngineOptions, Event,
    FinishReason, GenerationError, GenerationRequest, LoadError, ModelInfo, ModelSpec, ModelStats,
    PreparedPrompt, Prompt, PromptError, SamplingParams, SharedStats, SubmitError, Timings,
    TokenLogprobs, TopLogprob, Usage,
};
use scan::{GreedyRow, ScanCrew, greedy_choice};

/// Candidates kept by top-k before top-p, as llama-server does by default.
const TOP_K: i32 = 40;
/// Tokens below this share of the top token's probability are never drawn (llama-server's
/// default `min_p`); it removes the long tail that makes small models ramble.
const MIN_P: f32 = 0.05;
/// Shorter common prefixes are decoded again rather than copied. In a unified cache a copy
/// is free; with one cache per sequence it moves the source's whole state through host
/// memory, which costs about as much as decoding a few dozen tokens.
const PREFIX_REUSE_TOKENS_MIN_UNIFIED: usize = 1;
const PREFIX_REUSE_TOKENS_MIN_SPLIT: usize = 32;
/// Shorter finished sequences are not kept for reuse.
const PREFIX_PARK_TOKENS_MIN: usize = 16;
/// Handles of prefixes kept in host memory start here, far above any sequence id.
const HOST_PREFIX_IDS: SeqId = 1 << 24;

/// Prompts a lane remembers for routing, per sequence of the lane: about what its slots'
/// leftovers and a prefix cache of one entry per sequence hold, and a few more.
const RECENT_PROMPTS_PER_SEQUENCE: usize = 4;

/// The loaded models and the llama.cpp backend they run on.
#[derive(Debug)]
pub struct Engine {
    models: Vec<ModelHandle>,
    backends_dir: PathBuf,
    devices: Vec<String>,
}

/// How chat messages become the prompt's text.
enum PromptTemplate {
    /// The GGUF's Jinja template, rendered as Hugging Face renders it.
    Jinja(Box<ChatTemplate>),
    /// llama.cpp's built-in formats, recognised from the template: for a template the Jinja
    /// engine cannot use.
    Builtin(LlamaChatTemplate),
}

impl PromptTemplate {
    /// The configured template, else the model's own if its GGUF has one; llama.cpp's
    /// built-in rendering of the model's own when its Jinja text does not compile or cannot
    /// render a user message (logged). A configured template must work.
    fn load(model: &LlamaModel, spec: &ModelSpec) -> Result<Option<Self>, String> {
        let name = &spec.name;
        let tokens = Self::special_tokens(model);
        if let Some(source) = &spec.chat_template {
            return ChatTemplate::compile(source, tokens)
                .map(|template| Some(PromptTemplate::Jinja(Box::new(template))))
                .map_err(|reason| format!("the configured chat template: {reason}"));
        }
        let Ok(builtin) = model.chat_template(None) else {
            return Ok(None);
        };
        let Ok(source) = builtin.to_str() else {
            return Ok(Some(PromptTemplate::Builtin(builtin)));
        };
        Ok(Some(match ChatTemplate::compile(source, tokens) {
            Ok(template) => {
                if !template.keeps_system() {
                    tracing::info!(
                        model = %name,
                        "the chat template has no system role: system messages join the next \
                         user message"
                    );
                }
                PromptTemplate::Jinja(Box::new(template))
            }
            Err(reason) => {
                tracing::warn!(
                    model = %name,
                    %reason,
                    "the model's Jinja chat template cannot be used; llama.cpp's built-in \
                     format for it renders the prompts instead"
                );
                PromptTemplate::Builtin(builtin)
            }
        }))
    }

    /// The start and end tokens' text, as templates write them.
    fn special_tokens(model: &LlamaModel) -> SpecialTokens {
        let vocab = model.vocab();
        let text = |token: LlamaToken| {
            (0..vocab.n_tokens())
                .contains(&token.0)
                .then(|| vocab.text(token))
                .flatten()
                .map(|text| text.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        SpecialTokens {
            bos: text(vocab.bos()),
            eos: text(vocab.eos()),
            tokenizer_adds_bos: vocab.should_add_bos(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            PromptTemplate::Jinja(_) => "jinja",
            PromptTemplate::Builtin(_) => "builtin",
        }
    }

    fn render(&self, model: &LlamaModel, messages: &[ChatMessage]) -> Result<String, String> {
        match self {
            PromptTemplate::Jinja(template) => template.render(messages),
            PromptTemplate::Builtin(template) => {
                crate::template::render_continuing(messages, |messages, add_assistant| {
                    let messages = messages
                        .iter()
                        .map(|message| {
                            LlamaChatMessage::new(
                                message.role.as_str().to_owned(),
                                message.content.clone(),
                            )
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|error| error.to_string())?;
                    model
                        .apply_chat_template(template, &messages, add_assistant)
                        .map_err(|error| error.to_string())
                })
            }
        }
    }
}

/// A cheap, cloneable handle to one loaded model and its workers.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    shared: Arc<ModelShared>,
}

struct ModelShared {
    info: ModelInfo,
    model: Arc<LlamaModel>,
    template: Option<PromptTemplate>,
    /// The longest token's text, in bytes, where the tokenizer keeps every byte of the text
    /// (byte-level BPE, SentencePiece): a text longer than the context times this cannot fit.
    token_bytes_max: Option<usize>,
    /// Finds the texts of the vocabulary's control and user-defined tokens, which the
    /// tokenizer reads as those tokens where it parses special tokens.
    special_texts: Option<aho_corasick::AhoCorasick>,
    /// One per lane (`ModelSpec::lanes`), in order.
    lanes: Vec<LaneHandle>,
    /// Sequences each lane decodes together.
    lane_sequences: u64,
    /// Whether requests spread over the lanes (least loaded first) rather than fill them in
    /// order: on the CPU each lane computes on its own threads, so an idle lane leaves cores
    /// idle; on a GPU the lanes share the device, and a fuller batch reads the weights once
    /// for more tokens.
    spread: bool,
    stats: SharedStats,
    queue_depth_max: u32,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The embeddings worker's queue (its context is made at the first request).
    embedder: SyncSender<EmbedCommand>,
}

/// The way into one lane's worker.
struct LaneHandle {
    port: LanePort,
    /// With several lanes: the prompts sent here lately, whose prefixes this lane's caches
    /// most likely hold.
    recent: Mutex<RecentPrompts>,
}

/// A lane's channel and load, known to `submit` and to the other lanes' workers.
#[derive(Clone)]
struct LanePort {
    jobs: Sender<Command>,
    /// Requests sent to the lane and not yet finished: queued there or holding a sequence.
    load: Arc<AtomicU64>,
    /// Whether the lane takes jobs: cleared, under this lock, by its thread as it ends for
    /// good, before it fails what waits in its channel. A job sent under the lock while it
    /// was set is in the channel then, and is answered; none is sent after.
    open: Arc<Mutex<bool>>,
}

impl LanePort {
    /// Whether the lane still takes jobs (it has not ended for good).
    fn takes_jobs(&self) -> bool {
        *self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a job if the lane still takes jobs; else gives it back.
    fn send(&self, job: Job) -> Result<(), Box<Job>> {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if !*open {
            return Err(Box::new(job));
        }
        match self.jobs.send(Command::Generate(job)) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::SendError(Command::Generate(job))) => Err(Box::new(job)),
            // Only jobs are sent here.
            Err(_) => Ok(()),
        }
    }

    /// Takes no more jobs (its thread is ending for good).
    fn close(&self) {
        *self.open.lock().unwrap_or_else(PoisonError::into_inner) = false;
    }

    /// Counts one more request in, if the lane has a free sequence.
    fn reserve_free(&self, sequences: u64) -> bool {
        self.load
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |load| {
                (load < sequences).then_some(load + 1)
            })
            .is_ok()
    }
}

impl ModelShared {
    /// Tests only: makes lane `lane`'s thread panic at its next admission.
    #[cfg(test)]
    pub(crate) fn panic_lane(&self, lane: usize) {
        let _ = self.lanes[lane].port.jobs.send(Command::Panic);
    }

    fn stop(&self) {
        let Ok(mut workers) = self.workers.lock() else {
            return;
        };
        let threads = std::mem::take(&mut *workers);
        let _ = self.embedder.send(EmbedCommand::Stop);
        stop_lanes(&self.lanes, threads);
    }

    /// Requests reserved on the lanes beyond their sequences: those that wait for one.
    fn waiting_for_a_sequence(&self) -> u64 {
        self.lanes
            .iter()
            .map(|lane| {
                lane.port
                    .load
                    .load(Ordering::Acquire)
                    .saturating_sub(self.lane_sequences)
            })
            .sum()
    }

    /// The lane a new request goes to, its load already counted: among lanes with a free
    /// sequence, the one sent the longest shared start of `prompt` lately (a conversation's
    /// earlier turns, a system prompt), where its prefix is most likely cached; among equals,
    /// on the CPU the least loaded (so every lane's threads work), on a GPU the first (so
    /// lanes fill in order and a light load runs as one batch). When all are full, the
    /// least loaded one, where it queues.
    fn reserve_lane(&self, prompt: &[i32]) -> Option<&LaneHandle> {
        if let [lane] = self.lanes.as_slice() {
            if !lane.port.reserve_free(self.lane_sequences) {
                lane.port.load.fetch_add(1, Ordering::AcqRel);
            }
            return Some(lane);
        }
        let digests = block_digests(prompt);
        // A lane that ended for good has no load left and would look the least loaded.
        let mut lanes: Vec<(std::cmp::Reverse<usize>, u64, &LaneHandle)> = self
            .lanes
            .iter()
            .filter(|lane| lane.port.takes_jobs())
            .map(|lane| {
                let shared = if digests.is_empty() {
                    0
                } else {
                    lane.recent
                        .lock()
                        .map_or(0, |recent| recent.shared_blocks(&digests))
                };
                let load = if self.spread {
                    lane.port.load.load(Ordering::Acquire)
                } else {
                    0
                };
                (std::cmp::Reverse(shared), load, lane)
            })
            .collect();
        // Stable: lane order among equals.
        lanes.sort_by_key(|(shared, load, _)| (*shared, *load));
        let free = lanes
            .iter()
            .map(|(_, _, lane)| *lane)
            .find(|lane| lane.port.reserve_free(self.lane_sequences));
        let lane = match free {
            Some(lane) => lane,
            None => {
                let lane = lanes
                    .iter()
                    .map(|(_, _, lane)| *lane)
                    .min_by_key(|lane| lane.port.load.load(Ordering::Acquire))?;
                lane.port.load.fetch_add(1, Ordering::AcqRel);
                lane
            }
        };
        if !digests.is_empty()
            && let Ok(mut recent) = lane.recent.lock()
        {
            recent.remember(digests);
        }
        Some(lane)
    }
}

/// Stops the lanes' workers and waits for their threads.
fn stop_lanes(lanes: &[LaneHandle], threads: Vec<std::thread::JoinHandle<()>>) {
    for lane in lanes {
        let _ = lane.port.jobs.send(Command::Stop);
    }
    for thread in threads {
        let _ = thread.join();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for ModelShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelShared")
            .field("info", &self.info)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What reaches a worker.
enum Command {
    Generate(Job),
    /// Finish: fail what is queued or running, free the context, end the thread.
    Stop,
    /// Tests only: panic, as a bug in a step would.
    #[cfg(test)]
    Panic,
}

/// A request on its way to, or waiting in, the worker's queue.
struct Job {
    request: GenerationRequest,
    /// The request's grammar, made for the model's vocabulary when it was submitted.
    grammar: Option<LlamaSampler>,
    events: mpsc::Sender<Event>,
    submitted_at: Instant,
    /// Where its queue timeout counts from: when it was submitted, or when it was last held
    /// back while a sequence that shares its prompt prefilled (a wait by choice, to share
    /// that prefix, not for want of a sequence).
    expires_from: Instant,
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
        if let Some(build_dir) = crate::backends::build_dir() {
            dirs.push(PathBuf::from(build_dir));
        }
        dirs
    }

    /// Loads the backend modules, then every model, and starts one worker per model. Returns
    /// when all models are loaded and their contexts created, or with the first failure.
    pub fn start(options: &EngineOptions, specs: &[ModelSpec]) -> Result<Engine, LoadError> {
        let (backend, backends_dir) = backend(options)?;
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

    /// Stops every worker: queued and running requests fail with `WorkerStopped`, contexts
    /// are freed, and the threads are joined. Call before the process exits, so that no
    /// worker still holds a device context while the runtime tears down.
    pub fn shutdown(&self) {
        for model in &self.models {
            model.shared.stop();
        }
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

/// llama.cpp's backend is process-wide: its modules are loaded and it is initialised once,
/// by the first engine; later engines (a reload, tests) share it.
fn backend(options: &EngineOptions) -> Result<(Arc<LlamaBackend>, PathBuf), LoadError> {
    static BACKEND: Mutex<Option<(Arc<LlamaBackend>, PathBuf)>> = Mutex::new(None);
    let mut slot = BACKEND
        .lock()
        .map_err(|_| LoadError::Backend("backend initialisation panicked".to_owned()))?;
    if let Some((backend, dir)) = slot.as_ref() {
        if options
            .backends_dir
            .as_ref()
            .is_some_and(|wanted| wanted != dir)
        {
            tracing::warn!(
                loaded_from = %dir.display(),
                "llama.cpp backends are already loaded; a different backends_dir takes effect after a restart"
            );
        }
        return Ok((Arc::clone(backend), dir.clone()));
    }
    llama_cpp_2::send_logs_to_tracing(LogOptions::default());
    // llama.cpp also loads whatever module this variable names, unchecked.
    if std::env::var_os("GGML_BACKEND_PATH").is_some_and(|path| !path.is_empty()) {
        return Err(LoadError::Backend(
            "GGML_BACKEND_PATH is set: llama.cpp would load the module it names without the \
             source check; unset it (modules are loaded from backends_dir only)"
                .to_owned(),
        ));
    }
    let dir = find_backends_dir(options)?;
    // Never load a module that was not built from our llama.cpp sources.
    let checked =
        crate::backends::check_dir(&dir).map_err(|error| LoadError::Backend(error.to_string()))?;
    tracing::info!(
        backends_dir = %dir.display(),
        cpu_variants = checked.cpu_modules.len(),
        other_modules = ?checked.other_modules,
        source_fingerprint = crate::backends::source_fingerprint(),
        "backend modules verified"
    );
    if dir.to_str().is_none() {
        return Err(LoadError::Backend(format!(
            "{}: the backends directory's path must be UTF-8",
            dir.display()
        )));
    }
    llama_cpp_2::llama_backend::load_backends_from_path(&dir);
    // With nothing registered, initialising the backend would search llama.cpp's own
    // places (its build directory, the executable's, the working directory) and load what
    // it finds there unchecked.
    if llama_cpp_2::list_llama_ggml_backend_devices().is_empty() {
        return Err(LoadError::Backend(format!(
            "no backend module in {} could be loaded (a library they need, such as \
             libggml-base.so or libgomp, may be missing)",
            dir.display()
        )));
    }
    let backend =
        Arc::new(LlamaBackend::init().map_err(|error| LoadError::Backend(error.to_string()))?);
    *slot = Some((Arc::clone(&backend), dir.clone()));
    Ok((backend, dir))
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
        let template = PromptTemplate::load(&model, spec).map_err(model_error)?;
        let token_bytes_max = token_bytes_max(&model);
        let special_texts = special_texts(&model);
        let info = ModelInfo {
            name: spec.name.clone(),
            path: spec.path.clone(),
            context_tokens: spec.context_tokens,
            parallel_sequences: spec.parallel_sequences,
            lanes: spec.lanes.max(1),
            trained_context_tokens: model.n_ctx_train(),
            parameters: model.n_params(),
            size_bytes: model.size(),
            created_unix_s: metadata
                .modified()
                .ok()
                .and_then(|modified| modified.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |age| age.as_secs()),
            embedding_width: u32::try_from(model.n_embd_out()).unwrap_or(0),
        };
        tracing::info!(
            model = %spec.name,
            path = %spec.path.display(),
            parameters = info.parameters,
            size_bytes = info.size_bytes,
            trained_context_tokens = info.trained_context_tokens,
            chat_template = template.as_ref().map_or("none", PromptTemplate::kind),
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );

        let lane_count = spec.lanes.max(1);
        if !spec.parallel_sequences.is_multiple_of(lane_count) {
            return Err(LoadError::Context {
                model: spec.name.clone(),
                reason: format!(
                    "parallel_sequences ({}) is not a multiple of lanes ({lane_count})",
                    spec.parallel_sequences
                ),
            });
        }
        // Each lane is a context of its own share of the sequences and threads.
        let lane_spec = ModelSpec {
            parallel_sequences: spec.parallel_sequences / lane_count,
            threads: (spec.threads / lane_count).max(1),
            ..spec.clone()
        };
        let stats = SharedStats::default();
        // Unbounded as channels; `submit` bounds what waits by `queue_depth_max`.
        let (ports, receivers): (Vec<LanePort>, Vec<Receiver<Command>>) = (0..lane_count)
            .map(|_| {
                let (jobs, receiver) = std::sync::mpsc::channel();
                let load = Arc::new(AtomicU64::new(0));
                let open = Arc::new(Mutex::new(true));
                (LanePort { jobs, load, open }, receiver)
            })
            .unzip();
        let ports = Arc::new(ports);
        let mut lanes = Vec::new();
        let mut threads = Vec::new();
        for (lane, receiver) in (0..lane_count).zip(receivers) {
            match start_lane(backend, &model, &lane_spec, lane, &ports, receiver, &stats) {
                Ok(thread) => {
                    lanes.push(LaneHandle {
                        port: ports[lane as usize].clone(),
                        recent: Mutex::new(RecentPrompts::new(
                            usize::try_from(lane_spec.parallel_sequences)
                                .unwrap_or(0)
                                .saturating_mul(RECENT_PROMPTS_PER_SEQUENCE),
                        )),
                    });
                    threads.push(thread);
                }
                Err(error) => {
                    stop_lanes(&lanes, threads);
                    return Err(error);
                }
            }
        }
        let (embedder, embed_jobs) = std::sync::mpsc::sync_channel(
            usize::try_from(spec.queue_depth_max.max(1)).unwrap_or(usize::MAX),
        );
        let embedding = Embedder {
            backend: Arc::clone(backend),
            model: Arc::clone(&model),
            tokens_max: embedding_tokens_max(spec, model.n_ctx_train()),
            threads: i32::try_from(spec.threads).unwrap_or(i32::MAX),
            name: spec.name.clone(),
        };
        let embedding_stats = Arc::clone(&stats);
        match std::thread::Builder::new()
            .name(format!("embed-{}", spec.name))
            .spawn(move || {
                let model = embedding.name.clone();
                supervised(&embedding_stats, &model, |restart| {
                    if restart {
                        // Its context is made at the next request: serving again at once.
                        embedding_stats
                            .workers_failed
                            .fetch_sub(1, Ordering::Relaxed);
                    }
                    embedding.run(&embed_jobs);
                });
            }) {
            Ok(thread) => threads.push(thread),
            Err(error) => {
                stop_lanes(&lanes, threads);
                return Err(LoadError::Worker {
                    model: spec.name.clone(),
                    reason: error.to_string(),
                });
            }
        }
        Ok(ModelHandle {
            shared: Arc::new(ModelShared {
                embedder,
                info,
                model,
                template,
                token_bytes_max,
                special_texts,
                lanes,
                lane_sequences: u64::from(lane_spec.parallel_sequences),
                spread: spec.gpu_layers == 0,
                stats,
                queue_depth_max: spec.queue_depth_max,
                workers: Mutex::new(threads),
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
    ///
    /// The template's own markup is read with the vocabulary's special tokens; a message's
    /// content never is: content that spells a special token (`<|im_end|>` in a user
    /// message) stays text, so that it cannot end its turn and open one in another role.
    pub fn prepare(&self, prompt: &Prompt) -> Result<PreparedPrompt, PromptError> {
        let (text, literal) = match prompt {
            Prompt::Tokens(tokens) => return self.prepare_tokens(tokens),
            Prompt::Text(text) => (text.clone(), Vec::new()),
            Prompt::Chat(messages) => {
                let context_tokens = self.shared.info.context_tokens;
                if messages.len() > usize::try_from(context_tokens).unwrap_or(usize::MAX) {
                    return Err(PromptError::TooManyMessages {
                        messages: messages.len(),
                        context_tokens,
                    });
                }
                let template = self.shared.template.as_ref().ok_or_else(|| {
                    PromptError::Template("the model's GGUF carries no chat template".to_owned())
                })?;
                self.render_chat(template, messages)?
            }
        };
        // llama.cpp's split on special tokens takes time quadratic in their number: a body
        // of many tiny messages would hold a thread for minutes, to be refused anyway.
        if let Some(token_bytes_max) = self.shared.token_bytes_max {
            let context_tokens = self.shared.info.context_tokens;
            let fit = usize::try_from(context_tokens)
                .unwrap_or(usize::MAX)
                .saturating_mul(token_bytes_max);
            if text.len() > fit {
                return Err(PromptError::TooLong {
                    text_bytes: text.len(),
                    context_tokens,
                    token_bytes_max,
                });
            }
        }
        // Template text with special tokens parsed, message contents that spell one without.
        let mut pieces: Vec<(&str, bool)> = Vec::with_capacity(literal.len() * 2 + 1);
        let mut at = 0;
        for span in &literal {
            pieces.push((&text[at..span.start], true));
            pieces.push((&text[span.clone()], false));
            at = span.end;
        }
        pieces.push((&text[at..], true));
        let vocab = self.shared.model.vocab();
        let mut tokens: Vec<i32> = Vec::new();
        let mut started = false;
        for (piece, parse_special) in pieces {
            if piece.is_empty() {
                continue;
            }
            // The start token (where the model wants one) goes in front of the first piece.
            tokens.extend(
                vocab
                    .tokenize(piece.as_bytes(), !started, parse_special)
                    .into_iter()
                    .map(|token| token.0),
            );
            started = true;
        }
        if tokens.is_empty() {
            return Err(PromptError::Empty);
        }
        Ok(PreparedPrompt {
            model: self.shared.info.name.clone(),
            tokens,
        })
    }

    /// The prompt text of `messages`, and the byte ranges in it of the contents that spell
    /// a special token (to be tokenized as plain text; none for ordinary content).
    fn render_chat(
        &self,
        template: &PromptTemplate,
        messages: &[ChatMessage],
    ) -> Result<(String, Vec<std::ops::Range<usize>>), PromptError> {
        let spells_special = |content: &str| {
            self.shared
                .special_texts
                .as_ref()
                .is_some_and(|special| special.is_match(content))
        };
        if !messages
            .iter()
            .any(|message| spells_special(&message.content))
        {
            let text = template
                .render(&self.shared.model, messages)
                .map_err(PromptError::Template)?;
            return Ok((text, Vec::new()));
        }
        // Such contents are rendered as markers, which are then found in the text and
        // replaced by the contents, remembering where they went.
        let marker = |index: usize| format!("\u{E000}isthmus-content-{index}\u{E001}");
        let mut literal: Vec<(String, &str)> = Vec::new();
        let marked: Vec<ChatMessage> = messages
            .iter()
            .map(|message| {
                if !spells_special(&message.content) {
                    return message.clone();
                }
                let stand_in = marker(literal.len());
                literal.push((stand_in.clone(), &message.content));
                ChatMessage {
                    role: message.role,
                    content: stand_in,
                }
            })
            .collect();
        if messages
            .iter()
            .any(|message| message.content.contains('\u{E000}'))
        {
            return Err(PromptError::Template(
                "a message spells a special token and holds U+E000; the two cannot be told \
                 apart from the template's markup"
                    .to_owned(),
            ));
        }
        let rendered = template
            .render(&self.shared.model, &marked)
            .map_err(PromptError::Template)?;
        let mut found: Vec<(usize, usize)> = Vec::new();
        for (index, (stand_in, _)) in literal.iter().enumerate() {
            let mut places = rendered.match_indices(stand_in.as_str());
            if let Some((at, _)) = places.next() {
                if places.next().is_some() {
                    return Err(PromptError::Template(
                        "the template repeats a message's content that spells a special token"
                            .to_owned(),
                    ));
                }
                found.push((at, index));
            }
        }
        found.sort_unstable();
        let mut text = String::with_capacity(rendered.len());
        let mut spans = Vec::with_capacity(found.len());
        let mut from = 0;
        for (at, index) in found {
            let (stand_in, content) = &literal[index];
            text.push_str(&rendered[from..at]);
            spans.push(text.len()..text.len() + content.len());
            text.push_str(content);
            from = at + stand_in.len();
        }
        text.push_str(&rendered[from..]);
        Ok((text, spans))
    }

    /// A prompt given as token ids, each checked against the vocabulary.
    fn prepare_tokens(&self, tokens: &[u32]) -> Result<PreparedPrompt, PromptError> {
        let vocabulary = u32::try_from(self.shared.model.n_vocab()).unwrap_or(0);
        if let Some(&token) = tokens.iter().find(|&&token| token >= vocabulary) {
            return Err(PromptError::UnknownToken { token, vocabulary });
        }
        if tokens.is_empty() {
            return Err(PromptError::Empty);
        }
        Ok(PreparedPrompt {
            model: self.shared.info.name.clone(),
            tokens: tokens
                .iter()
                .map(|&token| i32::try_from(token).unwrap_or(0))
                .collect(),
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
        let vocabulary = u32::try_from(self.shared.model.n_vocab()).unwrap_or(0);
        if let Some(&(token, _)) = request
            .logit_bias
            .iter()
            .find(|(token, _)| *token >= vocabulary)
        {
            return Err(SubmitError::UnknownToken { token, vocabulary });
        }
        let grammar = match &request.grammar {
            Some(_) if request.ignore_eos => {
                return Err(SubmitError::Grammar {
                    reason: "a grammar decides where the answer ends; it cannot be combined \
                             with ignore_eos"
                        .to_owned(),
                });
            }
            Some(grammar) => Some(
                LlamaSampler::grammar(&self.shared.model, grammar.gbnf(), "root").map_err(
                    |error| SubmitError::Grammar {
                        reason: error.to_string(),
                    },
                )?,
            ),
            None => None,
        };
        // One event per generated token plus the final one: the worker never has to wait.
        let events_max = usize::try_from(request.max_tokens)
            .unwrap_or(usize::MAX)
            .saturating_add(2);
        let (events, receiver) = mpsc::channel(events_max);
        let now = Instant::now();
        let job = Job {
            request,
            grammar,
            events,
            submitted_at: now,
            expires_from: now,
        };
        let stats = &self.shared.stats;
        let Some(lane) = self.shared.reserve_lane(&job.request.prompt.tokens) else {
            return Err(SubmitError::WorkerStopped);
        };
        // `queue_depth_max` bounds the requests that wait for a sequence, not those that
        // find one free (a request of `n` choices on an idle model, a burst of requests).
        if self.shared.waiting_for_a_sequence() > u64::from(self.shared.queue_depth_max) {
            lane.port.load.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueueFull {
                capacity: self.shared.queue_depth_max,
            });
        }
        stats.queue_depth.fetch_add(1, Ordering::AcqRel);
        if lane.port.send(job).is_err() {
            lane.port.load.fetch_sub(1, Ordering::AcqRel);
            stats.queue_depth.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::WorkerStopped);
        }
        Ok(GenerationStream { receiver })
    }
}

impl ModelHandle {
    /// Queues an embeddings request: every input is tokenized and checked here (so a bad one
    /// fails at once), then the model's embeddings worker computes one unit-length vector per
    /// input, pooled over its tokens.
    pub fn embed(
        &self,
        inputs: &[EmbeddingInput],
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Embeddings, EmbeddingError>>, EmbedSubmitError>
    {
        let tokens_max = embedding_tokens_max_of(&self.shared.info);
        let vocabulary = u32::try_from(self.shared.model.n_vocab()).unwrap_or(0);
        let mut sequences = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.iter().enumerate() {
            let tokens: Vec<i32> = match input {
                // Text is text: a `<|im_end|>` in it is not the special token (the start and
                // end tokens the model wants are still added).
                EmbeddingInput::Text(text) => self
                    .shared
                    .model
                    .vocab()
                    .tokenize(text.as_bytes(), true, false)
                    .into_iter()
                    .map(|token| token.0)
                    .collect(),
                EmbeddingInput::Tokens(tokens) => {
                    if let Some(&token) = tokens.iter().find(|&&token| token >= vocabulary) {
                        return Err(EmbedSubmitError::Input(EmbeddingError::UnknownToken {
                            index,
                            token,
                            vocabulary,
                        }));
                    }
                    tokens
                        .iter()
                        .map(|&token| i32::try_from(token).unwrap_or(0))
                        .collect()
                }
            };
            if tokens.is_empty() {
                return Err(EmbedSubmitError::Input(EmbeddingError::EmptyInput {
                    index,
                }));
            }
            if tokens.len() > tokens_max as usize {
                return Err(EmbedSubmitError::Input(EmbeddingError::InputTooLong {
                    index,
                    tokens: tokens.len(),
                    tokens_max,
                }));
            }
            sequences.push(tokens);
        }
        let (reply, receiver) = tokio::sync::oneshot::channel();
        match self
            .shared
            .embedder
            .try_send(EmbedCommand::Embed(EmbedJob { sequences, reply }))
        {
            Ok(()) => Ok(receiver),
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                Err(EmbedSubmitError::Submit(SubmitError::QueueFull {
                    capacity: self.shared.queue_depth_max,
                }))
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                Err(EmbedSubmitError::Submit(SubmitError::WorkerStopped))
            }
        }
    }
}

/// Why an embeddings request was not accepted: one of its inputs, or the queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbedSubmitError {
    #[error(transparent)]
    Input(EmbeddingError),
    #[error(transparent)]
    Submit(SubmitError),
}

/// Most inputs one embeddings decode takes (each is a sequence of the context).
const EMBEDDING_SEQUENCES_MAX: u32 = 16;
/// Most tokens the embeddings context holds, and so the longest input (a pooled input must
/// be decoded in one piece), as llama-server's default micro-batch. In embeddings mode
/// llama.cpp keeps every token's logits too: the output and compute buffers grow with
/// this times the vocabulary (about 100 MB each for SmolLM2's 49,152 tokens at 512).
const EMBEDDING_TOKENS_MAX: u32 = 512;
/// Most tokens of inputs decoded together: every token of a decode attends over the cells
/// of all its inputs (one KV cache).
const EMBEDDING_GROUP_TOKENS: usize = EMBEDDING_TOKENS_MAX as usize;

fn embedding_tokens_max(spec: &ModelSpec, trained: u32) -> u32 {
    spec.context_tokens
        .min(EMBEDDING_TOKENS_MAX)
        .min(trained.max(1))
}

fn embedding_tokens_max_of(info: &ModelInfo) -> u32 {
    info.context_tokens
        .min(EMBEDDING_TOKENS_MAX)
        .min(info.trained_context_tokens.max(1))
}

enum EmbedCommand {
    Embed(EmbedJob),
    Stop,
}

struct EmbedJob {
    sequences: Vec<Vec<i32>>,
    reply: tokio::sync::oneshot::Sender<Result<Embeddings, EmbeddingError>>,
}

/// The embeddings worker of one model: its own context in embeddings mode (made at the
/// first request, so a model never asked for embeddings spends no memory on it), pooling
/// by the model's own pooling type, or the mean of the tokens' states when the GGUF names
/// none (a generative model), as llama-server's `--pooling mean` does.
struct Embedder {
    backend: Arc<LlamaBackend>,
    model: Arc<LlamaModel>,
    tokens_max: u32,
    threads: i32,
    name: String,
}

impl Embedder {
    fn run(&self, jobs: &Receiver<EmbedCommand>) {
        let mut context: Option<LlamaContext<'_>> = None;
        while let Ok(EmbedCommand::Embed(job)) = jobs.recv() {
            // The caller left while the job waited its turn: nothing to compute for.
            if job.reply.is_closed() {
                continue;
            }
            if context.is_none() {
                match self.context() {
                    Ok(made) => context = Some(made),
                    Err(reason) => {
                        let _ = job.reply.send(Err(EmbeddingError::Failed(reason)));
                        continue;
                    }
                }
            }
            let Some(context) = context.as_mut() else {
                continue;
            };
            let outcome = self.embed(context, &job.sequences);
            let _ = job.reply.send(outcome);
        }
    }

    fn context(&self) -> Result<LlamaContext<'_>, String> {
        use llama_cpp_2::context::params::LlamaPoolingType;
        let architecture = self
            .model
            .meta_val_str("general.architecture")
            .unwrap_or_default();
        let pooling = if self
            .model
            .meta_val_str(&format!("{architecture}.pooling_type"))
            .is_ok()
        {
            LlamaPoolingType::Unspecified
        } else {
            LlamaPoolingType::Mean
        };
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.tokens_max))
            .with_n_batch(self.tokens_max)
            .with_n_ubatch(self.tokens_max)
            .with_n_seq_max(EMBEDDING_SEQUENCES_MAX)
            .with_kv_unified(true)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads)
            .with_embeddings(true)
            .with_pooling_type(pooling);
        let context = self
            .model
            .new_context(&self.backend, params)
            .map_err(|error| format!("making the embeddings context: {error}"))?;
        tracing::info!(
            model = %self.name,
            tokens_max = self.tokens_max,
            pooling = ?pooling,
            "embeddings context made"
        );
        Ok(context)
    }

    /// Decodes the inputs in groups that fit the context and reads one pooled vector each.
    fn embed(
        &self,
        context: &mut LlamaContext<'_>,
        sequences: &[Vec<i32>],
    ) -> Result<Embeddings, EmbeddingError> {
        let failed = |what: &str, error: &dyn std::fmt::Display| {
            EmbeddingError::Failed(format!("{what}: {error}"))
        };
        let mut vectors = Vec::with_capacity(sequences.len());
        let mut start = 0;
        while start < sequences.len() {
            let mut end = start;
            let mut tokens = 0_usize;
            let budget = EMBEDDING_GROUP_TOKENS
                .max(sequences[start].len())
                .min(self.tokens_max as usize);
            while end < sequences.len()
                && end - start < EMBEDDING_SEQUENCES_MAX as usize
                && tokens + sequences[end].len() <= budget
            {
                tokens += sequences[end].len();
                end += 1;
            }
            context.clear_kv_cache();
            let mut batch = LlamaBatch::new(tokens, i32::try_from(end - start).unwrap_or(1));
            for (sequence, input) in sequences[start..end].iter().enumerate() {
                let sequence = i32::try_from(sequence).unwrap_or(0);
                for (position, &token) in input.iter().enumerate() {
                    batch
                        .add(
                            LlamaToken(token),
                            i32::try_from(position).unwrap_or(i32::MAX),
                            &[sequence],
                            true,
                        )
                        .map_err(|error| failed("building the batch", &error))?;
                }
            }
            context
                .decode(&mut batch)
                .map_err(|error| failed("decoding", &error))?;
            for sequence in 0..(end - start) {
                let pooled = context
                    .embeddings_seq_ith(i32::try_from(sequence).unwrap_or(0))
                    .map_err(|error| failed("reading the pooled state", &error))?;
                vectors.push(unit_length(pooled));
            }
            start = end;
        }
        let prompt_tokens = sequences.iter().map(Vec::len).sum::<usize>();
        Ok(Embeddings {
            vectors,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
        })
    }
}

/// `vector` scaled to Euclidean length 1 (as OpenAI's and llama-server's are); a zero vector
/// stays zero.
fn unit_length(vector: &[f32]) -> Vec<f32> {
    let norm = vector
        .iter()
        .map(|value| f64::from(*value) * f64::from(*value))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return vector.to_vec();
    }
    vector
        .iter()
        .map(|value| (f64::from(*value) / norm) as f32)
        .collect()
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

    /// Polls for the next event, for callers that read several streams at once.
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        self.receiver.poll_recv(cx)
    }
}

/// Whether a request's penalties change its logits.
fn has_penalties(sampling: &SamplingParams) -> bool {
    sampling.presence_penalty != 0.0 || sampling.frequency_penalty != 0.0
}

/// The GBNF grammar for JSON that matches `schema` (JSON Schema text), from llama.cpp's
/// converter; `None` when it refuses the schema.
pub(crate) fn json_schema_gbnf(schema: &str) -> Option<String> {
    llama_cpp_2::json_schema_to_grammar(schema).ok()
}

/// The longest token's text in bytes (special tokens as written), for vocabularies whose
/// tokenizer turns every byte of a text into some token: byte-level BPE and SentencePiece
/// (spaces become a three-byte `▁`, unknown bytes byte tokens). Others may normalise text
/// away (WordPiece strips accents, Unigram collapses spaces): `None`.
fn token_bytes_max(model: &LlamaModel) -> Option<usize> {
    let vocab = model.vocab();
    if !matches!(
        vocab.vocab_type(),
        llama_cpp_2::vocab::VocabType::BPE | llama_cpp_2::vocab::VocabType::SPM
    ) {
        return None;
    }
    let mut piece = Vec::new();
    let longest = (0..vocab.n_tokens())
        .map(|token| {
            piece.clear();
            vocab.token_to_piece_into(LlamaToken(token), &mut piece, true, None);
            piece.len()
        })
        .max()?;
    // A token written as its text, and one byte more for the space SentencePiece puts in
    // front of the text.
    Some(longest.max(1) + 1)
}

/// A finder of the texts of the control and user-defined tokens (`<|im_start|>`, `</s>`,
/// ...): those the tokenizer turns into their tokens when it parses special tokens.
fn special_texts(model: &LlamaModel) -> Option<aho_corasick::AhoCorasick> {
    use llama_cpp_2::token_type::LlamaTokenAttr;
    let vocab = model.vocab();
    let mut texts: Vec<String> = Vec::new();
    let mut piece = Vec::new();
    for token in 0..vocab.n_tokens() {
        let attributes = vocab.attr(LlamaToken(token));
        if !attributes.intersects(LlamaTokenAttr::Control | LlamaTokenAttr::UserDefined) {
            continue;
        }
        piece.clear();
        vocab.token_to_piece_into(LlamaToken(token), &mut piece, true, None);
        if let Ok(text) = std::str::from_utf8(&piece)
            && !text.is_empty()
        {
            texts.push(text.to_owned());
        }
    }
    texts.sort_unstable();
    texts.dedup();
    if texts.is_empty() {
        return None;
    }
    aho_corasick::AhoCorasick::new(&texts).ok()
}

fn eog_mask(model: &LlamaModel) -> Vec<bool> {
    let mut mask = vec![false; usize::try_from(model.n_vocab()).unwrap_or(0)];
    for token in eog_tokens(model) {
        if let Some(entry) = usize::try_from(token.0)
            .ok()
            .and_then(|index| mask.get_mut(index))
        {
            *entry = true;
        }
    }
    mask
}

fn eog_tokens(model: &LlamaModel) -> Vec<LlamaToken> {
    let vocab = model.vocab();
    vocab
        .tokens()
        .filter(|token| vocab.is_eog(*token))
        .collect()
}

/// Starts lane `lane`'s worker, which takes its jobs from `receiver`, and waits until its
/// context is made.
fn start_lane(
    backend: &Arc<LlamaBackend>,
    model: &Arc<LlamaModel>,
    spec: &ModelSpec,
    lane: u32,
    ports: &Arc<Vec<LanePort>>,
    receiver: Receiver<Command>,
    stats: &SharedStats,
) -> Result<std::thread::JoinHandle<()>, LoadError> {
    let (ready_sender, ready) = std::sync::mpsc::sync_channel(1);
    let worker = Worker {
        backend: Arc::clone(backend),
        model: Arc::clone(model),
        spec: spec.clone(),
        lane,
        ports: Arc::clone(ports),
        stats: Arc::clone(stats),
        eog_tokens: eog_tokens(model),
        eog_mask: eog_mask(model),
    };
    let name = if spec.lanes > 1 {
        format!("infer-{}-{lane}", spec.name)
    } else {
        format!("infer-{}", spec.name)
    };
    let thread_stats = Arc::clone(stats);
    let model_name = spec.name.clone();
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut ready = Some(ready_sender);
            supervised(&thread_stats, &model_name, |_| {
                worker.run(&receiver, ready.take());
            });
            worker.port().close();
            worker.fail_waiting(&receiver);
        })
        .map_err(|error| LoadError::Worker {
            model: spec.name.clone(),
            reason: error.to_string(),
        })?;
    match ready.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(reason)) => {
            let _ = thread.join();
            Err(LoadError::Context {
                model: spec.name.clone(),
                reason,
            })
        }
        Err(RecvError) => {
            let _ = thread.join();
            Err(LoadError::Worker {
                model: spec.name.clone(),
                reason: "worker ended during start-up".to_owned(),
            })
        }
    }
}

/// Debug builds only: a prompt that holds the token id this variable names makes the lane
/// that takes it panic (after queueing it, so it fails as a running request would), so that
/// the end-to-end tests can watch a panicking lane through the gateway. Release builds never
/// read it.
pub const TEST_PANIC_TOKEN_ENV: &str = "ISTHMUS_TEST_PANIC_TOKEN";

fn panics_on_request(job: &Job) -> bool {
    if !cfg!(debug_assertions) {
        return false;
    }
    static TOKEN: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
    let token = *TOKEN.get_or_init(|| {
        std::env::var(TEST_PANIC_TOKEN_ENV)
            .ok()
            .and_then(|token| token.parse().ok())
    });
    token.is_some_and(|token| job.request.prompt.tokens.contains(&token))
}

/// Panics of one inference thread within [`RESTART_WINDOW`] after which it is not restarted
/// again: a bug that every request hits would otherwise loop, failing each one; down, the
/// thread fails the model's health checks, so the service manager restarts the gateway.
const RESTARTS_MAX: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(600);
/// The wait before each restart of a thread within the window: a panic caused by a passing
/// condition (memory pressure, a driver hiccup) gets a moment to clear.
const RESTART_DELAYS_MS: [u64; RESTARTS_MAX] = if cfg!(test) {
    [1, 1, 1]
} else {
    [100, 1_000, 5_000]
};

thread_local! {
    /// This thread's panic is already counted (by the loop that unwound, before it failed
    /// the requests it held).
    static PANIC_COUNTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts the panic unwinding this thread, once: in `worker_panics`, and in `workers_failed`
/// until the thread serves again. Done before the requests the thread held are failed, so a
/// client told of the failure never finds the health checks still passing.
fn count_panic(stats: &ModelStats) {
    if !PANIC_COUNTED.replace(true) {
        stats.worker_panics.fetch_add(1, Ordering::Relaxed);
        stats.workers_failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs an inference thread's `body`, and runs it again after a panic, up to [`RESTARTS_MAX`]
/// times within [`RESTART_WINDOW`]. `body` is told whether it is a restart. The requests a
/// panicking body held fail (`GenerationError::WorkerFailed`); what waits in its queue is
/// served once it runs again. From the panic until the body is serving again (it says so by
/// taking one off `workers_failed`), the thread counts in the model's `workers_failed`, which
/// the gateway's health checks read; every panic counts in `worker_panics`.
fn supervised(stats: &ModelStats, model: &str, mut body: impl FnMut(bool)) {
    let mut panics: VecDeque<Instant> = VecDeque::with_capacity(RESTARTS_MAX + 1);
    let mut restart = false;
    loop {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(restart)));
        if outcome.is_ok() {
            return;
        }
        count_panic(stats);
        PANIC_COUNTED.set(false);
        let now = Instant::now();
        while panics
            .front()
            .is_some_and(|&at| now.duration_since(at) > RESTART_WINDOW)
        {
            panics.pop_front();
        }
        panics.push_back(now);
        let Some(&delay_ms) = RESTART_DELAYS_MS.get(panics.len() - 1) else {
            tracing::error!(
                model,
                panics = panics.len(),
                window_s = RESTART_WINDOW.as_secs(),
                "an inference thread panicked again: it is not restarted, its requests fail \
                 and the model's health checks fail until the gateway restarts"
            );
            return;
        };
        tracing::error!(
            model,
            restart_in_ms = delay_ms,
            "an inference thread panicked: the requests it was generating failed; it restarts"
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        restart = true;
    }
}

/// What a lane's worker thread owns besides its context.
struct Worker {
    backend: Arc<LlamaBackend>,
    model: Arc<LlamaModel>,
    /// This lane's share: `parallel_sequences` and `threads` are the lane's.
    spec: ModelSpec,
    lane: u32,
    /// Every lane's port, this one's included: its load, and the others' for handing
    /// queued jobs over.
    ports: Arc<Vec<LanePort>>,
    stats: SharedStats,
    eog_tokens: Vec<LlamaToken>,
    /// `eog_mask[token]`: whether the token ends generation.
    eog_mask: Vec<bool>,
}

/// One admitted request, bound to a sequence id (its slot index).
struct Sequence {
    id: SeqId,
    events: mpsc::Sender<Event>,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens whose KV is in the cache (copied from a prefix or decoded).
    prompt_fed: usize,
    /// Tokens whose KV is in the cache, in order: what a later prompt can reuse.
    history: Vec<i32>,
    /// Tokens this step puts into the batch for this sequence.
    in_batch: Vec<i32>,
    /// The token sampled last step, to be decoded this step.
    pending_token: Option<LlamaToken>,
    /// Where this sequence's logits are in the current batch, if it asked for any.
    logits_index: Option<i32>,
    sampler: LlamaSampler,
    /// The grammar the answer must match, if any; its tokens are chosen by
    /// [`constrained_choice`].
    grammar: Option<LlamaSampler>,
    /// Report each token's top-2 logit margin (tests compare batched and solo runs with it).
    record_margins: bool,
    /// Report each token's log-probability and this many alternatives.
    logprobs: Option<u8>,
    /// Temperature 0 and no grammar: take the largest logit.
    greedy: bool,
    generated: u32,
    max_tokens: u32,
    cached_tokens: u32,
    ignore_eos: bool,
    utf8: Utf8Assembler,
    stop: StopMatcher,
    /// The log-probabilities of tokens whose text is held back by `stop`.
    held_logprobs: TokenValues<TokenLogprobs>,
    piece: Vec<u8>,
    queued: Duration,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
    /// With `overlap_token_delivery`: the token chosen last step, whose text goes out while
    /// the device computes this step.
    undelivered: Option<Undelivered>,
    /// Its answer has ended while a token of it was in flight (a stop string matched, or
    /// the caller left): it leaves at the next chance and that token is not used.
    ended: bool,
}

/// A chosen token whose text has not gone out yet.
#[derive(Debug)]
struct Undelivered {
    token: LlamaToken,
    recorded: Recorded,
    /// The answer's last token (`max_tokens` or the context reached): it ends after it.
    last: bool,
}

/// What a request asked to know of each chosen token, beside its text.
#[derive(Debug, Default)]
struct Recorded {
    /// The top-2 logit margin.
    margin: Option<f32>,
    logprobs: Option<Box<TokenLogprobs>>,
}

/// What a chosen token does to its sequence, known before its text is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// End of generation: the answer stops without it.
    EndOfGeneration,
    /// More tokens follow.
    More,
    /// The answer's last token.
    Last,
}

/// What became of a token's text.
enum Emitted {
    Sent,
    /// A stop string matched: the answer is complete.
    Stopped,
    /// The caller has gone.
    Gone,
}

impl Sequence {
    /// Position the next decoded token takes.
    fn position(&self) -> i32 {
        i32::try_from(self.history.len() + self.in_batch.len()).unwrap_or(i32::MAX)
    }
}

/// How a sequence leaves its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// Finished or abandoned with a consistent KV state: its tokens may be kept for reuse.
    Keep,
    /// Its KV state is not trustworthy (a failed decode): drop it.
    Discard,
}

enum Step {
    Continue,
    Finished,
}

/// The worker loop's state; lives on the worker thread with the context it borrows.
struct Loop<'m> {
    worker: &'m Worker,
    context: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    batch_capacity: usize,
    /// Whether the batch holds prompt tokens: the next step's graph then differs from this
    /// one's, and llama.cpp builds it anew before launching it.
    batch_has_prompt: bool,
    slots: Vec<Option<Sequence>>,
    /// With one KV cache per sequence, the tokens a free slot's last occupant left in its
    /// cache, by slot (empty in a unified cache, where a finished sequence's cells are
    /// freed or parked). They count as free cells: the next occupant keeps the prefix it
    /// shares with them and overwrites the rest.
    leftovers: Vec<Vec<i32>>,
    /// By slot, with `park_prefixes_when_idle`: whether the leftover still has to be copied
    /// into the host prefix cache. Copying a state out of a GPU context takes a millisecond
    /// or more per sequence (one synchronous transfer per layer), so it is then done while
    /// the worker is idle, never between the steps of running sequences; under sustained
    /// load a leftover the next occupant does not share is overwritten uncopied.
    unparked: Vec<bool>,
    /// Admission order, so prefill chunks go to the oldest request first.
    admitted: Vec<SeqId>,
    /// Jobs waiting for a free slot, oldest first; bounded by `queue_depth_max` at submission.
    queue: VecDeque<Job>,
    /// Parked prefixes: in the KV cache (unified) or as host-memory states (one cache per
    /// sequence), the latter under ids from `first_host_prefix` up.
    prefixes: PrefixCache,
    /// Whether prompts may share cached prefixes (not with recurrent layers).
    shares_prefixes: bool,
    host_states: HashMap<SeqId, SeqState>,
    first_host_prefix: SeqId,
    ledger: CellLedger,
    /// When the current stretch of work began: after the last blocking wait for a job.
    busy_since: Instant,
    /// Threads that share the greedy scans of an offloaded model's logits.
    scan_crew: Option<ScanCrew>,
    /// This lane's share of the model's cell and prefix gauges, as last published.
    published: Published,
}

/// A lane's contribution to gauges that sum over the lanes.
#[derive(Debug, Default, Clone, Copy)]
struct Published {
    cells_used: u64,
    prefix_entries: u64,
    prefix_host_bytes: u64,
}

/// A lane that panics mid-step unwinds through here: what it held fails and leaves the
/// model's gauges, so that the restarted lane (and admission, which reads the queue depth
/// and the lane's load) starts from true counts. The context is freed after this.
impl Drop for Loop<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let worker = self.worker;
        let stats = &worker.stats;
        count_panic(stats);
        let load = worker.load();
        for job in self.queue.drain(..) {
            stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
            load.fetch_sub(1, Ordering::AcqRel);
            let _ = job
                .events
                .try_send(Event::Failed(GenerationError::WorkerFailed));
        }
        for sequence in self.slots.iter_mut().filter_map(Option::take) {
            stats.active_sequences.fetch_sub(1, Ordering::Relaxed);
            load.fetch_sub(1, Ordering::AcqRel);
            let _ = sequence
                .events
                .try_send(Event::Failed(GenerationError::WorkerFailed));
        }
        self.admitted.clear();
        let last = std::mem::take(&mut self.published);
        move_gauge(&stats.kv_cells_used, last.cells_used, 0);
        move_gauge(&stats.prefix_cache_entries, last.prefix_entries, 0);
        move_gauge(&stats.prefix_cache_host_bytes, last.prefix_host_bytes, 0);
        stats
            .kv_cells_total
            .fetch_sub(u64::from(worker.kv_cells()), Ordering::Relaxed);
    }
}

impl Worker {
    /// Fails the jobs still waiting in the lane's channel as its thread ends for good
    /// (stopped, or left down after repeated panics), and counts them out of the queue
    /// depth and the lane's load, which `submit` counted them into.
    fn fail_waiting(&self, jobs: &Receiver<Command>) {
        for command in jobs.try_iter() {
            if let Command::Generate(job) = command {
                self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.load().fetch_sub(1, Ordering::AcqRel);
                let _ = job
                    .events
                    .try_send(Event::Failed(GenerationError::WorkerStopped));
            }
        }
    }

    /// This lane's requests, queued or running; counted up by `submit`.
    fn load(&self) -> &AtomicU64 {
        &self.port().load
    }

    fn port(&self) -> &LanePort {
        &self.ports[usize::try_from(self.lane).unwrap_or(usize::MAX)]
    }

    /// KV cells the context holds: every sequence's full context, plus the prefix cache.
    fn kv_cells(&self) -> u32 {
        let spec = &self.spec;
        let cache = if spec.kv_unified {
            spec.prefix_cache_tokens_max
        } else {
            0
        };
        spec.context_tokens
            .saturating_mul(spec.parallel_sequences)
            .saturating_add(cache)
    }

    /// Makes the lane's context and serves its jobs until told to stop. `ready` hears
    /// whether the context was made at start-up; it is `None` on a restart after a panic,
    /// when the lane counts in `workers_failed` until its context is made again.
    fn run(&self, jobs: &Receiver<Command>, ready: Option<SyncSender<Result<(), String>>>) {
        let spec = &self.spec;
        let threads = i32::try_from(spec.threads).unwrap_or(i32::MAX);
        let cache_entries = if spec.prefix_cache_tokens_max > 0 {
            spec.prefix_cache_entries
        } else {
            0
        };
        // Unified: parked prefixes are sequences of the context. Split: host-memory states.
        let context_cache_entries = if spec.kv_unified { cache_entries } else { 0 };
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.kv_cells()))
            .with_n_batch(spec.batch_tokens)
            .with_n_ubatch(spec.batch_tokens)
            .with_n_seq_max(
                spec.parallel_sequences
                    .saturating_add(context_cache_entries),
            )
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_kv_unified(spec.kv_unified)
            .with_type_k(cache_type(spec.kv_cache_type))
            .with_type_v(cache_type(spec.kv_cache_type));
        let context = match self.model.new_context(&self.backend, params) {
            Ok(context) => context,
            Err(error) => {
                match ready {
                    Some(ready) => {
                        let _ = ready.send(Err(error.to_string()));
                    }
                    // The lane stays counted in `workers_failed`; its queue closes with the
                    // thread, so what is sent to it fails at once.
                    None => tracing::error!(
                        model = %spec.name,
                        lane = self.lane,
                        %error,
                        "the inference context could not be made again after a panic: the \
                         lane stays down until the gateway restarts"
                    ),
                }
                return;
            }
        };
        // Lanes add their cells: the gauges are the model's totals, complete once every lane
        // has reported ready (so before the report).
        self.stats
            .kv_cells_total
            .fetch_add(u64::from(self.kv_cells()), Ordering::Relaxed);
        match ready {
            Some(ready) => {
                if ready.send(Ok(())).is_err() {
                    self.stats
                        .kv_cells_total
                        .fetch_sub(u64::from(self.kv_cells()), Ordering::Relaxed);
                    return;
                }
            }
            None => {
                self.stats.workers_failed.fetch_sub(1, Ordering::Relaxed);
            }
        }
        tracing::info!(
            model = %spec.name,
            lane = self.lane,
            lanes = spec.lanes,
            context_tokens = spec.context_tokens,
            parallel_sequences = spec.parallel_sequences,
            batch_tokens = spec.batch_tokens,
            threads = spec.threads,
            kv_unified = spec.kv_unified,
            kv_cells = self.kv_cells(),
            prefix_cache_entries = cache_entries,
            park_prefixes_when_idle = spec.park_prefixes_when_idle,
            overlap_token_delivery = spec.overlap_token_delivery,
            "inference worker ready"
        );
        let batch_capacity = usize::try_from(spec.batch_tokens).unwrap_or(512);
        let first_cache_seq = if spec.kv_unified {
            SeqId::try_from(spec.parallel_sequences).unwrap_or(SeqId::MAX)
        } else {
            HOST_PREFIX_IDS
        };
        let mut state = Loop {
            worker: self,
            context,
            batch: LlamaBatch::new(batch_capacity, 1),
            batch_capacity,
            batch_has_prompt: false,
            slots: (0..spec.parallel_sequences).map(|_| None).collect(),
            leftovers: (0..spec.parallel_sequences).map(|_| Vec::new()).collect(),
            unparked: (0..spec.parallel_sequences).map(|_| false).collect(),
            admitted: Vec::new(),
            queue: VecDeque::new(),
            // A recurrent layer's state cannot be shared up to a position: llama.cpp links
            // the source's whole state (its prompt and all it generated) whatever the range,
            // and a sequence would continue from the wrong state. Those models (hybrid ones
            // too) decode every prompt whole, and nothing waits to share one.
            shares_prefixes: !(self.model.is_recurrent() || self.model.is_hybrid()),
            prefixes: PrefixCache::new(
                first_cache_seq,
                usize::try_from(cache_entries).unwrap_or(0),
                usize::try_from(spec.prefix_cache_tokens_max).unwrap_or(0),
            ),
            ledger: CellLedger::default(),
            host_states: HashMap::new(),
            first_host_prefix: if spec.kv_unified {
                SeqId::MAX
            } else {
                HOST_PREFIX_IDS
            },
            busy_since: Instant::now(),
            scan_crew: (spec.gpu_layers > 0 && spec.threads > 1)
                .then(|| {
                    ScanCrew::new(usize::try_from(spec.threads).unwrap_or(1))
                        .map_err(|error| {
                            tracing::warn!(
                                model = %spec.name,
                                %error,
                                "no thread pool for the logits scans; each step scans them on the worker thread alone"
                            );
                        })
                        .ok()
                })
                .flatten(),
            published: Published::default(),
        };
        while state.admit(jobs) {
            state.step();
            let busy = state.busy_since.elapsed();
            state.busy_since = Instant::now();
            self.stats.busy_micros.fetch_add(
                u64::try_from(busy.as_micros()).unwrap_or(0),
                Ordering::Relaxed,
            );
        }
    }

    /// The request's sampler chain: its logit biases (and end of generation banned for
    /// `ignore_eos`), its penalties over the tokens it generates (counted as the chain
    /// accepts them), then greedy or its temperature, top-k, top-p and min-p draw.
    fn sampler_for(&self, request: &GenerationRequest) -> LlamaSampler {
        let sampling = &request.sampling;
        let mut chain = Vec::new();
        if request.ignore_eos {
            let biases: Vec<LlamaLogitBias> = self
                .eog_tokens
                .iter()
                .map(|token| LlamaLogitBias::new(*token, f32::NEG_INFINITY))
                .collect();
            chain.push(LlamaSampler::logit_bias(self.model.n_vocab(), &biases));
        }
        if !request.logit_bias.is_empty() {
            let biases: Vec<LlamaLogitBias> = request
                .logit_bias
                .iter()
                .filter_map(|&(token, bias)| {
                    Some(LlamaLogitBias::new(
                        LlamaToken::new(i32::try_from(token).ok()?),
                        bias,
                    ))
                })
                .collect();
            chain.push(LlamaSampler::logit_bias(self.model.n_vocab(), &biases));
        }
        if has_penalties(sampling) {
            // The window holds every token the answer can have.
            let window = i32::try_from(request.max_tokens).unwrap_or(i32::MAX);
            chain.push(LlamaSampler::penalties(
                self.model.n_vocab(),
                window,
                1.0,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            ));
        }
        if sampling.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            chain.push(LlamaSampler::top_k(TOP_K));
            chain.push(LlamaSampler::top_p(sampling.top_p, 1));
            chain.push(LlamaSampler::min_p(MIN_P, 1));
            chain.push(LlamaSampler::temp(sampling.temperature));
            // llama.cpp reads u32::MAX (LLAMA_DEFAULT_SEED) as "seed from the clock": the
            // request's seed would not repeat its answer. It draws as its neighbour instead.
            let seed = if sampling.seed == u32::MAX {
                u32::MAX - 1
            } else {
                sampling.seed
            };
            chain.push(LlamaSampler::dist(seed));
        }
        LlamaSampler::chain_simple(chain)
    }
}

/// Moves a gauge that sums over lanes by one lane's change from `last` to `now`.
fn move_gauge(gauge: &AtomicU64, last: u64, now: u64) {
    if now >= last {
        gauge.fetch_add(now - last, Ordering::Relaxed);
    } else {
        gauge.fetch_sub(last - now, Ordering::Relaxed);
    }
}

/// The active sequence `id`, if any.
fn slot(slots: &mut [Option<Sequence>], id: SeqId) -> Option<&mut Sequence> {
    usize::try_from(id)
        .ok()
        .and_then(|index| slots.get_mut(index))
        .and_then(Option::as_mut)
}

impl Loop<'_> {
    fn sequence(&mut self, id: SeqId) -> Option<&mut Sequence> {
        slot(&mut self.slots, id)
    }

    fn publish_cells(&mut self) {
        let stats = &self.worker.stats;
        let now = Published {
            cells_used: self.ledger.used_cells() as u64,
            prefix_entries: self.prefixes.len() as u64,
            prefix_host_bytes: self
                .host_states
                .values()
                .map(|state| state.byte_len() as u64)
                .sum(),
        };
        let last = std::mem::replace(&mut self.published, now);
        move_gauge(&stats.kv_cells_used, last.cells_used, now.cells_used);
        move_gauge(
            &stats.prefix_cache_entries,
            last.prefix_entries,
            now.prefix_entries,
        );
        move_gauge(
            &stats.prefix_cache_host_bytes,
            last.prefix_host_bytes,
            now.prefix_host_bytes,
        );
    }

    /// Takes new jobs into the worker's queue, fails those that waited too long or whose
    /// caller left, and moves the oldest into free slots. Blocks while there is nothing to do.
    /// Returns false when the runtime is gone and the worker should end.
    fn admit(&mut self, jobs: &Receiver<Command>) -> bool {
        let worker = self.worker;
        let timeout = Duration::from_millis(worker.spec.queue_timeout_ms);
        // Nothing running and nothing waiting: save the slots' leftovers into the prefix
        // cache while no job waits, then sleep until one arrives.
        if self.admitted.is_empty() && self.queue.is_empty() {
            let mut arrived = None;
            while let Some(slot) = self.unparked.iter().position(|&unparked| unparked) {
                match jobs.try_recv() {
                    Ok(command) => {
                        arrived = Some(Ok(command));
                        break;
                    }
                    Err(TryRecvError::Empty) => {
                        self.park_leftover(slot);
                        self.publish_cells();
                    }
                    Err(TryRecvError::Disconnected) => {
                        arrived = Some(Err(RecvError));
                        break;
                    }
                }
            }
            let job = arrived.unwrap_or_else(|| jobs.recv());
            self.busy_since = Instant::now();
            match job {
                Ok(Command::Generate(job)) => self.take(job),
                Ok(Command::Stop) | Err(RecvError) => return self.stop(),
                #[cfg(test)]
                Ok(Command::Panic) => panic!("a bug in a decode step"),
            }
        }
        // Take whatever else is waiting without blocking.
        while let Ok(command) = jobs.try_recv() {
            match command {
                Command::Generate(job) => self.take(job),
                Command::Stop => return self.stop(),
                #[cfg(test)]
                Command::Panic => panic!("a bug in a decode step"),
            }
        }
        self.expire_queued(timeout);
        // Jobs that wait for a running sequence to finish prefilling the prompt they share.
        let mut deferred = Vec::new();
        while self.slots.iter().any(Option::is_none) {
            let Some(job) = self.queue.pop_front() else {
                break;
            };
            let free_slots = self
                .slots
                .iter()
                .zip(&self.leftovers)
                .enumerate()
                .filter(|(_, (sequence, _))| sequence.is_none())
                .map(|(index, (_, leftover))| (index, leftover.as_slice()));
            let Some((free, leftover)) = choose_slot(&job.request.prompt.tokens, free_slots) else {
                self.queue.push_front(job);
                break;
            };
            let reuse = self.find_prefix(&job.request.prompt.tokens);
            let available = reuse.map_or(0, |reuse| reuse.length).max(leftover);
            if self.sharer_prefilling(&job.request.prompt.tokens, available) {
                let mut job = job;
                job.expires_from = Instant::now();
                deferred.push(job);
                continue;
            }
            worker.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
            let queued = job.submitted_at.elapsed();
            let request = job.request;
            let grammar = job.grammar;
            let sampler = worker.sampler_for(&request);
            let prompt: Vec<i32> = request.prompt.tokens;
            let id = SeqId::try_from(free).unwrap_or(SeqId::MAX);
            let cached = match reuse {
                Some(reuse) if reuse.length > leftover => {
                    if self.reuse_prefix(reuse, id) {
                        self.prefixes.touch(reuse.source);
                        reuse.length
                    } else {
                        // Nothing of the slot's leftover may stay in its cache: the prompt
                        // is decoded from position 0.
                        self.keep_leftover(id, 0)
                    }
                }
                _ => self.keep_leftover(id, leftover),
            };
            let history = prompt[..cached].to_vec();
            worker
                .stats
                .prompt_tokens
                .fetch_add(prompt.len() as u64, Ordering::Relaxed);
            worker
                .stats
                .prefix_hit_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
            self.slots[free] = Some(Sequence {
                id,
                events: job.events,
                prompt: prompt.iter().copied().map(LlamaToken::new).collect(),
                prompt_fed: cached,
                history,
                in_batch: Vec::new(),
                pending_token: None,
                logits_index: None,
                sampler,
                // Biases and penalties change the logits a plain scan would read.
                greedy: request.sampling.temperature <= 0.0
                    && grammar.is_none()
                    && request.logit_bias.is_empty()
                    && !has_penalties(&request.sampling),
                grammar,
                record_margins: request.record_margins,
                logprobs: request.logprobs,
                generated: 0,
                max_tokens: request.max_tokens,
                cached_tokens: u32::try_from(cached).unwrap_or(u32::MAX),
                ignore_eos: request.ignore_eos,
                utf8: Utf8Assembler::default(),
                stop: StopMatcher::new(request.stop),
                held_logprobs: TokenValues::default(),
                piece: Vec::new(),
                queued,
                admitted_at: Instant::now(),
                first_token_at: None,
                undelivered: None,
                ended: false,
            });
            self.admitted.push(id);
            worker
                .stats
                .active_sequences
                .fetch_add(1, Ordering::Relaxed);
        }
        // Jobs handed to another lane would prefill the shared prompt there again.
        self.hand_over_queued();
        for job in deferred.into_iter().rev() {
            self.queue.push_front(job);
        }
        true
    }

    /// Whether a running sequence is still prefilling a prompt that shares more of `prompt`
    /// than the cache holds now (`available` tokens), and at least the reuse minimum: then
    /// `prompt` waits for that prefill and copies it, instead of computing the same tokens
    /// beside it (the `n` choices of one request, concurrent requests with one long system
    /// prompt).
    fn sharer_prefilling(&self, prompt: &[i32], available: usize) -> bool {
        if !self.prefixes.enabled() || !self.shares_prefixes {
            return false;
        }
        let minimum = if self.worker.spec.kv_unified {
            PREFIX_REUSE_TOKENS_MIN_UNIFIED
        } else {
            PREFIX_REUSE_TOKENS_MIN_SPLIT
        };
        let usable = prompt.len().saturating_sub(1);
        self.slots.iter().flatten().any(|sequence| {
            sequence.prompt_fed < sequence.prompt.len() && {
                let shared = prompt
                    .iter()
                    .zip(&sequence.prompt)
                    .take_while(|(token, other)| **token == other.0)
                    .count()
                    .min(usable);
                shared >= minimum && shared > available
            }
        })
    }

    /// With several lanes: jobs still queued here once every sequence is taken go, oldest
    /// first, to lanes with a free sequence, so that no request waits behind this lane's
    /// answers while another lane could start it. (`submit` queues a request in the least
    /// loaded lane when all are full; whichever lane frees a sequence first should take it.)
    fn hand_over_queued(&mut self) {
        let worker = self.worker;
        let sequences = u64::from(worker.spec.parallel_sequences);
        let own = usize::try_from(worker.lane).unwrap_or(usize::MAX);
        while !self.queue.is_empty() {
            let Some(port) = worker
                .ports
                .iter()
                .enumerate()
                .filter(|(index, _)| *index != own)
                .map(|(_, port)| port)
                // A lane that ended for good cannot take jobs (its free sequences are none).
                .filter(|port| port.takes_jobs())
                .find(|port| port.reserve_free(sequences))
            else {
                return;
            };
            let Some(job) = self.queue.pop_front() else {
                port.load.fetch_sub(1, Ordering::AcqRel);
                return;
            };
            match port.send(job) {
                Ok(()) => {
                    worker.load().fetch_sub(1, Ordering::AcqRel);
                }
                Err(job) => {
                    // That lane has stopped: keep the job here.
                    port.load.fetch_sub(1, Ordering::AcqRel);
                    self.queue.push_front(*job);
                    return;
                }
            }
        }
    }

    /// Queues a job the lane took from its channel.
    fn take(&mut self, job: Job) {
        let panics = panics_on_request(&job);
        self.queue.push_back(job);
        assert!(!panics, "a bug in a decode step, made on demand");
    }

    /// Fails everything queued or running; returns false, which ends the worker.
    fn stop(&mut self) -> bool {
        let stats = &self.worker.stats;
        for job in self.queue.drain(..) {
            stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
            self.worker.load().fetch_sub(1, Ordering::AcqRel);
            let _ = job
                .events
                .try_send(Event::Failed(GenerationError::WorkerStopped));
        }
        for id in self.admitted.clone() {
            if let Some(sequence) = self.sequence(id) {
                let _ = sequence
                    .events
                    .try_send(Event::Failed(GenerationError::WorkerStopped));
            }
            self.release(id, Release::Discard);
        }
        tracing::info!(model = %self.worker.spec.name, "inference worker stopped");
        false
    }

    /// Fails queued jobs that waited longer than `timeout`, and forgets those whose caller
    /// has gone.
    fn expire_queued(&mut self, timeout: Duration) {
        let stats = &self.worker.stats;
        let load = self.worker.load();
        self.queue.retain(|job| {
            if job.events.is_closed() {
                stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                load.fetch_sub(1, Ordering::AcqRel);
                return false;
            }
            if job.expires_from.elapsed() > timeout {
                // Counted out before the caller hears of it.
                stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                load.fetch_sub(1, Ordering::AcqRel);
                let _ = job
                    .events
                    .try_send(Event::Failed(GenerationError::QueueTimeout {
                        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    }));
                return false;
            }
            true
        });
    }

    /// Gives the empty sequence `target` the KV of `reuse.source`'s first `reuse.length`
    /// tokens. In a unified cache the cells are shared (no data moves); with one cache per
    /// sequence the source's state is copied into the target's cache and cut to the prefix.
    fn reuse_prefix(&mut self, reuse: PrefixMatch, target: SeqId) -> bool {
        let length = u32::try_from(reuse.length).unwrap_or(u32::MAX);
        if self.worker.spec.kv_unified {
            if !self.shares_prefixes {
                return false;
            }
            if self
                .context
                .copy_kv_cache_seq(reuse.source, target, Some(0), Some(length))
                .is_err()
            {
                return false;
            }
            self.ledger.copy_prefix(reuse.source, target, reuse.length);
            return true;
        }
        // The source's state is taken first: parking the target's leftover below may evict
        // the source's parked prefix and hand its id to the leftover.
        let state = match self.host_states.get(&reuse.source) {
            Some(state) => state.clone(),
            // An active sequence: take its state now.
            None => match self
                .context
                .state_seq_get(reuse.source, LlamaStateSeqFlags::empty())
            {
                Ok(state) => state,
                Err(error) => {
                    tracing::warn!(%error, "reading a sequence state for prefix reuse failed");
                    return false;
                }
            },
        };
        // The target's leftover goes; the state read above replaces it.
        if let Ok(index) = usize::try_from(target) {
            self.leftover_overwritten(index, 0);
            if let Some(leftover) = self.leftovers.get_mut(index) {
                leftover.clear();
            }
        }
        let _ = self
            .context
            .clear_kv_cache_seq(u32::try_from(target).ok(), None, None);
        let restored = self.context.state_seq_set(&state, target).is_ok()
            && self
                .context
                .clear_kv_cache_seq(u32::try_from(target).ok(), Some(length), None)
                .unwrap_or(false);
        if !restored {
            let _ = self
                .context
                .clear_kv_cache_seq(u32::try_from(target).ok(), None, None);
            return false;
        }
        self.ledger.extend(target, reuse.length);
        true
    }

    /// The leftover of free slot `slot` is about to be cut to its first `keep` tokens for a
    /// new occupant. With nothing else running it is parked first when that cut would lose
    /// enough tokens; otherwise its parking, left to idle time, is given up.
    fn leftover_overwritten(&mut self, slot: usize, keep: usize) {
        let loses = self
            .leftovers
            .get(slot)
            .map_or(0, |tokens| tokens.len().saturating_sub(keep));
        if self.admitted.is_empty()
            && self.unparked.get(slot) == Some(&true)
            && loses >= PREFIX_PARK_TOKENS_MIN
        {
            self.park_leftover(slot);
        }
        if let Some(unparked) = self.unparked.get_mut(slot) {
            *unparked = false;
        }
    }

    /// Keeps the first `length` tokens of the free slot `id`'s leftover for its new occupant
    /// and drops the rest; returns how many it kept (none if the cut failed).
    fn keep_leftover(&mut self, id: SeqId, length: usize) -> usize {
        let Ok(index) = usize::try_from(id) else {
            return 0;
        };
        self.leftover_overwritten(index, length);
        let Some(leftover) = self.leftovers.get_mut(index) else {
            return 0;
        };
        if std::mem::take(leftover).is_empty() {
            return 0;
        }
        let sequence = u32::try_from(id).ok();
        let cut = length > 0
            && u32::try_from(length).is_ok_and(|from| {
                self.context
                    .clear_kv_cache_seq(sequence, Some(from), None)
                    .unwrap_or(false)
            });
        if !cut {
            let _ = self.context.clear_kv_cache_seq(sequence, None, None);
            return 0;
        }
        self.ledger.extend(id, length);
        length
    }

    /// The longest prefix of `prompt` already in the cache: in a parked prefix or in the
    /// tokens an active sequence has decoded.
    fn find_prefix(&self, prompt: &[i32]) -> Option<PrefixMatch> {
        if !self.prefixes.enabled() || !self.shares_prefixes {
            return None;
        }
        let active = self
            .slots
            .iter()
            .flatten()
            .map(|sequence| (sequence.id, sequence.history.as_slice()));
        let minimum = if self.worker.spec.kv_unified {
            PREFIX_REUSE_TOKENS_MIN_UNIFIED
        } else {
            PREFIX_REUSE_TOKENS_MIN_SPLIT
        };
        best_match(prompt, self.prefixes.candidates().chain(active), minimum)
    }

    /// One decode step over every active sequence, then sampling.
    fn step(&mut self) {
        self.drop_cancelled();
        if self.admitted.is_empty() {
            return;
        }
        let participants = self.fill_batch();
        if participants.is_empty() {
            // Only last tokens were waiting to go out: nothing to compute meanwhile.
            for id in self.deliver_deferred() {
                self.release(id, Release::Keep);
            }
            self.publish_cells();
            return;
        }
        let started = Instant::now();
        let mut result = self.context.decode(&mut self.batch);
        // Out of cells: parked prefixes (when they hold cells) are the first to go.
        while self.worker.spec.kv_unified && matches!(result, Err(DecodeError::NoKvCacheSlot)) {
            let Some(evicted) = self.prefixes.evict_lru() else {
                break;
            };
            self.clear_sequence(evicted);
            result = self.context.decode(&mut self.batch);
        }
        if let Some(crew) = &mut self.scan_crew {
            if result.is_ok() {
                let rows = self
                    .slots
                    .iter()
                    .flatten()
                    .filter(|sequence| sequence.greedy && sequence.logits_index.is_some())
                    .count();
                crew.launched(rows, !self.batch_has_prompt);
            } else {
                crew.abandon();
            }
        }
        let worker = self.worker;
        let stats = &worker.stats;
        stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        stats.batched_tokens.fetch_add(
            u64::try_from(self.batch.n_tokens()).unwrap_or(0),
            Ordering::Relaxed,
        );
        stats.decode_micros.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(0),
            Ordering::Relaxed,
        );
        // The last step's tokens go out while the device computes this one; the answers
        // that ended leave once it is done.
        let delivered_last = self.deliver_deferred();
        if let Err(error) = result {
            tracing::error!(model = %self.worker.spec.name, %error, "llama_decode failed");
            for id in participants {
                if let Some(sequence) = self.sequence(id) {
                    sequence.in_batch.clear();
                    let failure = GenerationError::Decode(error.to_string());
                    let _ = sequence.events.try_send(Event::Failed(failure));
                }
                self.release(id, Release::Discard);
            }
            for id in delivered_last {
                self.release(id, Release::Keep);
            }
            self.publish_cells();
            return;
        }
        // Reading the first logits waits for the device to finish the step (llama.cpp decodes
        // asynchronously on GPUs); timed apart so that host work and device work show apart.
        let first_output = participants
            .iter()
            .find_map(|&id| slot(&mut self.slots, id).and_then(|sequence| sequence.logits_index));
        if let Some(index) = first_output {
            let waited = Instant::now();
            let _ = self.context.get_logits_ith(index);
            stats.sync_micros.fetch_add(
                u64::try_from(waited.elapsed().as_micros()).unwrap_or(0),
                Ordering::Relaxed,
            );
        }
        let sampling = Instant::now();
        let mut choices = self.greedy_choices();
        stats.sampling_nanos.fetch_add(
            u64::try_from(sampling.elapsed().as_nanos()).unwrap_or(0),
            Ordering::Relaxed,
        );
        // After a step with prompt tokens (first tokens among them) the next step's graph
        // is built anew, which takes milliseconds on the host before it computes anything:
        // those tokens go out now rather than after it.
        let defer = worker.spec.overlap_token_delivery && !self.batch_has_prompt;
        // Finished sequences leave their slots once every sequence's token of this step is
        // out: parking a finished sequence (a copy of its state, from the GPU when offloaded)
        // must not delay the others' tokens.
        let mut finished = Vec::new();
        for id in participants {
            let Some(sequence) = self.sequence(id) else {
                continue;
            };
            let added = std::mem::take(&mut sequence.in_batch);
            let count = added.len();
            sequence.history.extend(added);
            let logits = sequence.logits_index.take();
            let ended = sequence.ended;
            self.ledger.extend(id, count);
            if ended {
                finished.push(id);
                continue;
            }
            if let Some(index) = logits {
                let Some(sequence) = slot(&mut self.slots, id) else {
                    continue;
                };
                let worker = self.worker;
                let chosen = usize::try_from(id)
                    .ok()
                    .and_then(|slot| choices.get_mut(slot))
                    .and_then(Option::take);
                if let Step::Finished = worker.sample(sequence, &self.context, index, chosen, defer)
                {
                    finished.push(id);
                }
            }
        }
        for id in finished.into_iter().chain(delivered_last) {
            self.release(id, Release::Keep);
        }
        self.publish_cells();
    }

    /// With a scan pool (a model offloaded to a GPU), the greedy choice (token, top-2 margin)
    /// of every greedy sequence with logits in this step, by slot; otherwise none, and each
    /// sequence chooses in `sample`. The logits of an offloaded model arrive by DMA in host
    /// memory that no core has cached: scanning 32 rows of a 49,152-token vocabulary reads
    /// 6 MB at one core's memory bandwidth, most of a millisecond per step on a GPU host,
    /// while the worker's threads are idle waiting for the GPU.
    fn greedy_choices(&mut self) -> Vec<Option<(usize, f32)>> {
        let Some(crew) = &mut self.scan_crew else {
            return Vec::new();
        };
        let mut choices = vec![None; self.slots.len()];
        let worker = self.worker;
        let mut rows = Vec::new();
        for (slot_index, sequence) in self.slots.iter().enumerate() {
            let Some(sequence) = sequence else {
                continue;
            };
            if let (true, Some(index)) = (sequence.greedy, sequence.logits_index) {
                rows.push(GreedyRow {
                    slot: slot_index,
                    logits: self.context.get_logits_ith(index),
                    banned: sequence.ignore_eos.then_some(worker.eog_mask.as_slice()),
                    margin: sequence.record_margins,
                });
            }
        }
        for (row, choice) in rows.iter().zip(crew.choose(&rows)) {
            choices[row.slot] = Some(choice);
        }
        choices
    }

    fn drop_cancelled(&mut self) {
        for id in self.admitted.clone() {
            if self
                .sequence(id)
                .is_some_and(|sequence| sequence.ended || sequence.events.is_closed())
            {
                tracing::debug!(model = %self.worker.spec.name, sequence = id, "caller gone; sequence dropped");
                self.release(id, Release::Keep);
            }
        }
    }

    /// Sends the text of the tokens `sample` chose last step. Returns the sequences
    /// whose answers are complete, for release once the device is done with the step in
    /// flight; one whose answer ended early (a stop string, a caller gone) while its next
    /// token is in flight is marked `ended` and leaves after that step.
    fn deliver_deferred(&mut self) -> Vec<SeqId> {
        let worker = self.worker;
        let mut complete = Vec::new();
        for sequence in self.slots.iter_mut().flatten() {
            let Some(Undelivered {
                token,
                recorded,
                last,
            }) = sequence.undelivered.take()
            else {
                continue;
            };
            if let Step::Finished = worker.deliver(sequence, token, recorded, last) {
                if last {
                    complete.push(sequence.id);
                } else {
                    sequence.ended = true;
                    sequence.pending_token = None;
                }
            }
        }
        complete
    }

    /// Generating sequences contribute their pending token; the rest of the batch goes to
    /// prompt chunks, oldest request first. Returns the sequences that are in the batch.
    ///
    /// The tokens are laid out in sequence-id order. With one KV stream per sequence
    /// (`kv_unified = false`), llama.cpp cuts a batch into micro-batches of consecutive,
    /// increasing sequence ids, each a forward pass of its own, and reorders the logits rows
    /// back into batch order, a copy of a whole vocabulary row per swap, when the passes
    /// produced them in another order. A batch in admission order, which differs from slot
    /// order once sequences have come and gone, cost several passes per step and those copies;
    /// in id order the decode tokens of consecutive slots are one pass.
    fn fill_batch(&mut self) -> Vec<SeqId> {
        self.batch.clear();
        self.batch_has_prompt = false;
        let generating = self
            .slots
            .iter()
            .flatten()
            .filter(|sequence| sequence.pending_token.is_some())
            .count();
        // Prompt tokens per sequence this step (`schedule`), by slot.
        let pending: Vec<(SeqId, PendingPrompt)> = self
            .admitted
            .iter()
            .filter_map(|&id| {
                let sequence = usize::try_from(id)
                    .ok()
                    .and_then(|index| self.slots.get(index))?
                    .as_ref()?;
                let cached = usize::try_from(sequence.cached_tokens).unwrap_or(0);
                let prompt = PendingPrompt {
                    remaining: sequence.prompt.len() - sequence.prompt_fed,
                    uncached: sequence.prompt.len().saturating_sub(cached),
                };
                (prompt.remaining > 0).then_some((id, prompt))
            })
            .collect();
        let prompts: Vec<PendingPrompt> = pending.iter().map(|&(_, prompt)| prompt).collect();
        let plan = prefill_plan(
            &prompts,
            generating,
            self.batch_capacity,
            usize::try_from(self.worker.spec.prefill_chunk_tokens).unwrap_or(usize::MAX),
        );
        let mut chunks = vec![0_usize; self.slots.len()];
        for ((id, _), take) in pending.iter().zip(plan) {
            if let Some(entry) = usize::try_from(*id)
                .ok()
                .and_then(|index| chunks.get_mut(index))
            {
                *entry = take;
            }
        }
        let mut participants = Vec::with_capacity(self.admitted.len());
        for (sequence, chunk) in self.slots.iter_mut().zip(chunks) {
            let Some(sequence) = sequence.as_mut() else {
                continue;
            };
            if let Some(token) = sequence.pending_token.take() {
                if self
                    .batch
                    .add(token, sequence.position(), &[sequence.id], true)
                    .is_ok()
                {
                    sequence.logits_index = Some(self.batch.n_tokens() - 1);
                    sequence.in_batch.push(token.0);
                    participants.push(sequence.id);
                } else {
                    sequence.pending_token = Some(token);
                }
                continue;
            }
            if chunk == 0 {
                continue;
            }
            let completes = sequence.prompt_fed + chunk == sequence.prompt.len();
            participants.push(sequence.id);
            let mut fed = 0;
            for offset in 0..chunk {
                let token = sequence.prompt[sequence.prompt_fed + offset];
                let last = completes && offset + 1 == chunk;
                if self
                    .batch
                    .add(token, sequence.position(), &[sequence.id], last)
                    .is_err()
                {
                    break;
                }
                sequence.in_batch.push(token.0);
                fed += 1;
                if last {
                    sequence.logits_index = Some(self.batch.n_tokens() - 1);
                }
            }
            sequence.prompt_fed += fed;
            self.batch_has_prompt |= fed > 0;
            self.worker
                .stats
                .prefill_tokens
                .fetch_add(fed as u64, Ordering::Relaxed);
        }
        participants
    }

    /// Frees the slot. With `Keep`, a unified cache parks the sequence's tokens as a reusable
    /// prefix at once (a copy between sequences of one cache, on the device); one cache per
    /// sequence keeps them in the slot as its leftover and parks them at once too, or, with
    /// `park_prefixes_when_idle`, later while the worker idles.
    fn release(&mut self, id: SeqId, how: Release) {
        let Some(sequence) = usize::try_from(id)
            .ok()
            .and_then(|index| self.slots.get_mut(index))
            .and_then(Option::take)
        else {
            return;
        };
        self.worker
            .stats
            .active_sequences
            .fetch_sub(1, Ordering::Relaxed);
        self.worker.load().fetch_sub(1, Ordering::AcqRel);
        self.admitted.retain(|&other| other != id);
        if how == Release::Keep && !self.worker.spec.kv_unified {
            let when_idle = self.worker.spec.park_prefixes_when_idle;
            if !when_idle {
                self.park(id, sequence.history.clone());
            }
            // The slot's cache keeps the tokens for its next occupant; the cells count as free.
            self.ledger.remove(id);
            if let Some(index) = usize::try_from(id)
                .ok()
                .filter(|&index| index < self.leftovers.len())
            {
                self.unparked[index] = when_idle
                    && sequence.history.len() >= PREFIX_PARK_TOKENS_MIN
                    && self.prefixes.enabled();
                self.leftovers[index] = sequence.history;
            }
            return;
        }
        if how == Release::Keep {
            self.park(id, sequence.history);
        }
        self.clear_sequence(id);
    }

    /// Copies the leftover of free slot `slot` into the host prefix cache.
    fn park_leftover(&mut self, slot: usize) {
        let Some(unparked) = self.unparked.get_mut(slot) else {
            return;
        };
        *unparked = false;
        let (Some(tokens), Ok(id)) = (self.leftovers.get(slot), SeqId::try_from(slot)) else {
            return;
        };
        let tokens = tokens.clone();
        self.park(id, tokens);
    }

    /// Parks the first `tokens.len()` tokens of context sequence `id` as a reusable prefix,
    /// evicting what the cache's bounds require; nothing when they are too few or already in.
    fn park(&mut self, id: SeqId, tokens: Vec<i32>) {
        let length = tokens.len();
        // A prefix no prompt can share (recurrent layers) is not worth its memory.
        if length < PREFIX_PARK_TOKENS_MIN || !self.shares_prefixes {
            return;
        }
        let Some(park) = self.prefixes.park(tokens) else {
            return;
        };
        for evicted in park.clear {
            self.clear_sequence(evicted);
            self.host_states.remove(&evicted);
        }
        if self.worker.spec.kv_unified {
            let end = u32::try_from(length).unwrap_or(u32::MAX);
            if self
                .context
                .copy_kv_cache_seq(id, park.target, Some(0), Some(end))
                .is_ok()
            {
                self.ledger.copy_prefix(id, park.target, length);
            }
            return;
        }
        match self.context.state_seq_get(id, LlamaStateSeqFlags::empty()) {
            Ok(state) => {
                self.host_states.insert(park.target, state);
            }
            Err(error) => {
                tracing::warn!(%error, "saving a sequence state for prefix reuse failed");
                self.prefixes.forget(park.target);
            }
        }
    }

    fn clear_sequence(&mut self, id: SeqId) {
        // Host-memory prefixes have ids beyond the context's sequences: nothing to clear there.
        if id < self.first_host_prefix {
            let _ = self
                .context
                .clear_kv_cache_seq(u32::try_from(id).ok(), None, None);
        }
        self.ledger.remove(id);
    }
}

impl Worker {
    /// Samples the sequence's next token and sends its text. With `defer`
    /// (`overlap_token_delivery`) the text is left to `Loop::deliver_deferred`, which sends it
    /// while the device computes the step the token feeds; a sequence whose last token waits
    /// there stays in its slot until then. `chosen` is the greedy choice when
    /// `greedy_choices` made it.
    fn sample(
        &self,
        sequence: &mut Sequence,
        context: &LlamaContext<'_>,
        index: i32,
        chosen: Option<(usize, f32)>,
        defer: bool,
    ) -> Step {
        let (token, recorded) = self.choose(sequence, context, index, chosen);
        let next = self.accept(sequence, token);
        if next == Next::EndOfGeneration {
            return self.finish(sequence, FinishReason::Stop, true);
        }
        let last = next == Next::Last;
        let step = if defer {
            sequence.undelivered = Some(Undelivered {
                token,
                recorded,
                last,
            });
            Step::Continue
        } else {
            self.deliver(sequence, token, recorded, last)
        };
        if let (Step::Continue, false) = (&step, last) {
            sequence.pending_token = Some(token);
        }
        step
    }

    /// The sequence's next token and what its request records of it (top-2 logit margin,
    /// log-probabilities).
    fn choose(
        &self,
        sequence: &mut Sequence,
        context: &LlamaContext<'_>,
        index: i32,
        chosen: Option<(usize, f32)>,
    ) -> (LlamaToken, Recorded) {
        let started = Instant::now();
        // With end-of-generation banned, the choice is among the other tokens.
        let banned = sequence.ignore_eos.then_some(self.eog_mask.as_slice());
        let (token, margin) = if let Some(grammar) = sequence.grammar.as_mut() {
            let logits = context.get_logits_ith(index);
            let margin = if sequence.record_margins {
                greedy_choice(logits, banned).1
            } else {
                f32::NAN
            };
            (
                constrained_choice(logits, &mut sequence.sampler, grammar),
                margin,
            )
        } else if sequence.greedy {
            // Greedy needs only the largest logit: no candidate array, no sampler chain.
            let (best, margin) = chosen.unwrap_or_else(|| {
                let row = GreedyRow {
                    slot: 0,
                    logits: context.get_logits_ith(index),
                    banned,
                    margin: sequence.record_margins,
                };
                row.choose()
            });
            (LlamaToken::new(i32::try_from(best).unwrap_or(0)), margin)
        } else {
            let margin = if sequence.record_margins {
                greedy_choice(context.get_logits_ith(index), banned).1
            } else {
                f32::NAN
            };
            (sequence.sampler.sample(context, index), margin)
        };
        let logprobs = sequence
            .logprobs
            .map(|top| Box::new(self.token_logprobs(context.get_logits_ith(index), token, top)));
        self.stats.sampling_nanos.fetch_add(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(0),
            Ordering::Relaxed,
        );
        let recorded = Recorded {
            margin: sequence.record_margins.then_some(margin),
            logprobs,
        };
        (token, recorded)
    }

    /// `token`'s log-probability in `logits` and the `top` most likely tokens', with their
    /// bytes: the chosen token's as its text is made, the alternatives' with special tokens
    /// spelled out (an end of generation among them shows as itself).
    fn token_logprobs(&self, logits: &[f32], token: LlamaToken, top: u8) -> TokenLogprobs {
        let piece_of = |id: LlamaToken, special: bool| {
            let mut bytes = Vec::new();
            self.model
                .vocab()
                .token_to_piece_into(id, &mut bytes, special, None);
            bytes
        };
        let piece = |id: LlamaToken| piece_of(id, true);
        let chosen = usize::try_from(token.0).unwrap_or(usize::MAX);
        let (logprob, best) = crate::logprobs::logprobs(logits, chosen, usize::from(top));
        TokenLogprobs {
            token: piece_of(token, false),
            logprob,
            top: best
                .into_iter()
                .map(|(id, logprob)| TopLogprob {
                    token: piece(LlamaToken::new(i32::try_from(id).unwrap_or(0))),
                    logprob,
                })
                .collect(),
        }
    }

    /// Counts a chosen token and says what it does to the sequence.
    fn accept(&self, sequence: &mut Sequence, token: LlamaToken) -> Next {
        sequence.first_token_at.get_or_insert_with(Instant::now);
        if !sequence.ignore_eos && self.model.vocab().is_eog(token) {
            return Next::EndOfGeneration;
        }
        sequence.generated += 1;
        self.stats.decode_tokens.fetch_add(1, Ordering::Relaxed);
        let context_full =
            u32::try_from(sequence.position()).unwrap_or(u32::MAX) >= self.spec.context_tokens;
        if sequence.generated >= sequence.max_tokens || context_full {
            Next::Last
        } else {
            Next::More
        }
    }

    /// Sends a token's text; the answer ends after it when it is the `last`.
    fn deliver(
        &self,
        sequence: &mut Sequence,
        token: LlamaToken,
        recorded: Recorded,
        last: bool,
    ) -> Step {
        match self.emit(sequence, token, recorded) {
            Emitted::Gone => Step::Finished,
            Emitted::Stopped => self.finish(sequence, FinishReason::Stop, false),
            Emitted::Sent if last => self.finish(sequence, FinishReason::Length, true),
            Emitted::Sent => Step::Continue,
        }
    }

    /// Makes a token's text, holding back what may begin a stop string, and sends it.
    fn emit(&self, sequence: &mut Sequence, token: LlamaToken, recorded: Recorded) -> Emitted {
        sequence.piece.clear();
        self.model
            .vocab()
            .token_to_piece_into(token, &mut sequence.piece, false, None);
        let text = sequence.utf8.push(&sequence.piece);
        sequence
            .held_logprobs
            .push(text.len(), recorded.logprobs.map(|token| *token));
        let (emit, stopped) = match sequence.stop.push(&text) {
            StopOutcome::Continue(emit) => (emit, false),
            StopOutcome::Stopped(emit) => (emit, true),
        };
        let mut logprobs = Vec::new();
        sequence.held_logprobs.release(emit.len(), &mut logprobs);
        if sequence
            .events
            .try_send(Event::Token {
                text: emit,
                margin: recorded.margin,
                logprobs,
            })
            .is_err()
        {
            return Emitted::Gone;
        }
        if stopped {
            Emitted::Stopped
        } else {
            Emitted::Sent
        }
    }

    fn finish(&self, sequence: &mut Sequence, reason: FinishReason, flush: bool) -> Step {
        let mut tail_logprobs = Vec::new();
        let text_tail = if flush {
            let rest = sequence.utf8.finish();
            sequence.held_logprobs.push(rest.len(), None);
            match sequence.stop.push(&rest) {
                StopOutcome::Continue(emit) => {
                    sequence.held_logprobs.finish(&mut tail_logprobs);
                    emit + &sequence.stop.finish()
                }
                StopOutcome::Stopped(emit) => {
                    sequence
                        .held_logprobs
                        .release(emit.len(), &mut tail_logprobs);
                    emit
                }
            }
        } else {
            String::new()
        };
        let first_token_at = sequence.first_token_at.unwrap_or(sequence.admitted_at);
        let completion = Completion {
            finish_reason: reason,
            text_tail,
            tail_logprobs,
            usage: Usage {
                prompt_tokens: u32::try_from(sequence.prompt.len()).unwrap_or(u32::MAX),
                completion_tokens: sequence.generated,
                cached_tokens: sequence.cached_tokens,
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
            cached_tokens = completion.usage.cached_tokens,
            completion_tokens = completion.usage.completion_tokens,
            finish_reason = reason.as_str(),
            "generation finished"
        );
        let _ = sequence.events.try_send(Event::Done(completion));
        Step::Finished
    }
}

/// llama.cpp's name for a KV cache type.
fn cache_type(kind: crate::KvCacheType) -> llama_cpp_2::context::params::KvCacheType {
    use crate::KvCacheType as Kind;
    use llama_cpp_2::context::params::KvCacheType as Llama;
    match kind {
        Kind::F32 => Llama::F32,
        Kind::F16 => Llama::F16,
        Kind::Bf16 => Llama::BF16,
        Kind::Q8_0 => Llama::Q8_0,
        Kind::Q5_1 => Llama::Q5_1,
        Kind::Q5_0 => Llama::Q5_0,
        Kind::Q4_1 => Llama::Q4_1,
        Kind::Q4_0 => Llama::Q4_0,
        Kind::Iq4Nl => Llama::IQ4_NL,
    }
}

/// The next token under a grammar: the sequence's own choice (its sampler chain over every
/// logit) when the grammar allows that token, else its choice among the tokens the grammar
/// allows. Checking one token first is what llama.cpp's own servers do: masking the whole
/// vocabulary walks the grammar once per token, and most steps' choice is allowed anyway.
/// Both the chain and the grammar then accept the token.
fn constrained_choice(
    logits: &[f32],
    sampler: &mut LlamaSampler,
    grammar: &mut LlamaSampler,
) -> LlamaToken {
    let candidates = || {
        LlamaTokenDataArray::from_iter(
            logits.iter().enumerate().map(|(id, &logit)| {
                LlamaTokenData::new(LlamaToken::new(i32::try_from(id).unwrap_or(0)), logit, 0.0)
            }),
            false,
        )
    };
    let mut free = candidates();
    sampler.apply(&mut free);
    let allowed = free.selected_token().filter(|&token| {
        let logit = usize::try_from(token.0)
            .ok()
            .and_then(|id| logits.get(id))
            .copied()
            .unwrap_or(f32::NEG_INFINITY);
        let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, logit, 0.0)], false);
        grammar.apply(&mut one);
        one.data
            .first()
            .is_some_and(|data| data.logit().is_finite())
    });
    let token = allowed.unwrap_or_else(|| {
        let mut constrained = candidates();
        grammar.apply(&mut constrained);
        sampler.apply(&mut constrained);
        // A grammar leaves at least an end of generation allowed; should the chain select
        // nothing, the largest allowed logit is the choice.
        constrained.selected_token().unwrap_or_else(|| {
            constrained
                .data
                .iter()
                .max_by(|a, b| a.logit().total_cmp(&b.logit()))
                .map_or(LlamaToken::new(0), LlamaTokenData::id)
        })
    });
    grammar.accept(token);
    sampler.accept(token);
    token
}

mod scan;
#[cfg(test)]
mod tests;
