//! The only module that touches `llama_cpp_2`: model, context, batch, decode, sampling.
//!
//! Everything above this boundary sees our own types ([`Token`], [`SeqId`], [`SamplerSpec`]),
//! so the scheduler and the prompt logic can be read and tested without knowing llama.cpp.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::formats::message::Message;

mod backends;
pub use backends::not_loaded as gpu_modules_not_loaded;
pub mod embed;
mod seam;
pub mod state;

pub use seam::{Engine, Vocab};

use state::{MemoryKind, SeqState};

/// The llama.cpp build this binary links: the `llama-cpp-sys-2` version (which pins the
/// llama.cpp sources), the GPU backend compiled in and the CMake build type. A GPU build
/// (`cuda`, `vulkan`) picks its kernels at run time (the CPU variant for this processor, the
/// GPU), so its identity also names the devices the backends found; call it after a model
/// loaded.
pub fn llama_build() -> String {
    let gpu = env!("INFER_BATCH_GPU_BACKEND");
    let backend = if gpu.is_empty() {
        "cpu".to_owned()
    } else {
        format!("{gpu} [{}]", backend_devices().join("; "))
    };
    format!(
        "llama-cpp-sys-2 {} {backend} {}",
        env!("INFER_BATCH_LLAMA_CPP_SYS_VERSION"),
        env!("INFER_BATCH_LLAMA_LIB_PROFILE")
    )
}

/// Each device of the started backends, as "name: description".
#[cfg_attr(not(backend_modules), allow(dead_code))]
fn backend_devices() -> Vec<String> {
    devices()
        .into_iter()
        .map(|d| format!("{}: {}", d.name, d.description))
        .collect()
}

/// A NUL-terminated string of ggml's, or nothing for a null pointer.
fn c_text(p: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: ggml returns NUL-terminated strings that live as long as the device.
    (!p.is_null()).then(|| {
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    })
}

/// One device of the started backends, as ggml's backend-neutral device query reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// ggml's name for it: `CPU`, `CUDA0`, `Vulkan0`.
    pub name: String,
    /// What it is: `NVIDIA H200`, `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub description: String,
    /// An accelerator that layers can be offloaded to (a GPU or integrated GPU).
    pub gpu: bool,
    /// Its PCI bus id (`0000:c1:00.0`), where the backend knows it.
    pub pci_bus_id: Option<String>,
    /// Memory free now, in bytes, as the backend reports it.
    pub free: u64,
    /// Memory in all, in bytes.
    pub total: u64,
}

/// Every device of the started backends, in ggml's order (the order offloaded layers take).
fn devices() -> Vec<Device> {
    use llama_cpp_sys_2 as sys;
    // SAFETY: plain queries of ggml's device registry, indices below its count; the props
    // struct is plain data that ggml fills.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let dev = sys::ggml_backend_dev_get(i);
                let mut props: sys::ggml_backend_dev_props = std::mem::zeroed();
                sys::ggml_backend_dev_get_props(dev, &raw mut props);
                Device {
                    name: c_text(props.name).unwrap_or_default(),
                    description: c_text(props.description).unwrap_or_default(),
                    gpu: matches!(
                        props.type_,
                        sys::GGML_BACKEND_DEVICE_TYPE_GPU | sys::GGML_BACKEND_DEVICE_TYPE_IGPU
                    ),
                    pci_bus_id: c_text(props.device_id),
                    free: props.memory_free as u64,
                    total: props.memory_total as u64,
                }
            })
            .collect()
    }
}

/// The GPUs that layers can be offloaded to, with their memory as each backend reports it
/// (CUDA's and Vulkan's own queries alike). Starts the backends if no model did yet.
pub fn gpu_devices() -> Vec<Device> {
    if backend(false).is_err() {
        return Vec::new();
    }
    devices().into_iter().filter(|d| d.gpu).collect()
}

/// Positions of context the decode-group probe fills before it compares rows.
const PROBE_DEPTH: u32 = 16;

/// The largest decode group the probe compares with the pair: the most rows a decode call of
/// generated tokens holds.
const MAX_PROBED_GROUP: usize = 32;

/// How a decoded row's logits depend on the number of rows in its decode call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowDependence {
    /// Bit-identical at every group size probed, the lone row included.
    None,
    /// Every group of 2 up to this many rows gives the same row; a lone row (or a larger
    /// group) may not.
    SameFrom2UpTo(usize),
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A token id of the loaded model's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub i32);

/// A llama.cpp sequence id: one slot or one resident prefix.
pub type SeqId = i32;

/// Failures of the engine, each with the context a person needs.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The llama.cpp backend could not start.
    #[error("could not initialise the llama.cpp backend: {0}")]
    Backend(String),
    /// The GGUF file is missing or unreadable.
    #[error("could not load model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },
    /// The model has no usable chat template.
    #[error("model has no chat template llama.cpp can apply: {0}")]
    Template(String),
    /// The context could not be allocated.
    #[error("could not create a context of {n_ctx} tokens: {reason}")]
    Context { n_ctx: u32, reason: String },
    /// `llama_decode` failed.
    #[error("llama_decode failed: {0}")]
    Decode(String),
    /// A saved sequence state was refused.
    #[error("a saved prefix state of {0} bytes was refused: {1}")]
    Restore(usize, String),
    /// More tokens were queued than the batch holds.
    #[error("batch overflow: {0}")]
    Batch(String),
    /// A sampler could not be built.
    #[error("could not build the sampler: {0}")]
    Sampler(String),
    /// A KV cache operation (copy or removal of a sequence's cells) failed.
    #[error("KV cache operation failed: {0}")]
    Cache(String),
    /// A sequence's state could not be serialised.
    #[error("cannot save the sequence state: {0}")]
    Save(String),
}

/// The llama.cpp backend initialises once per process; every model shares it.
fn backend(verbose: bool) -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp is chatty on stderr; it speaks only under -v.
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(verbose),
            );
            load_backend_modules()?;
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Backend(e.clone()))
}

/// With backends built as modules (the GPU builds), loads them.
#[cfg(backend_modules)]
fn load_backend_modules() -> Result<(), String> {
    backends::load()
}

#[cfg(not(backend_modules))]
#[allow(clippy::unnecessary_wraps)] // the GPU builds' can fail
fn load_backend_modules() -> Result<(), String> {
    Ok(())
}

/// Whether a GPU backend with at least one device is loaded, after the backend started.
pub fn gpu_available() -> bool {
    // SAFETY: a plain query of llama.cpp's backend registry.
    unsafe { llama_cpp_sys_2::llama_supports_gpu_offload() }
}

/// Settings for loading a model.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// Path of the GGUF file.
    pub path: PathBuf,
    /// Layers offloaded to the GPU (0 on a CPU build).
    pub gpu_layers: u32,
    /// Pass llama.cpp's own logs through.
    pub verbose: bool,
}

/// A loaded GGUF model.
pub struct Model {
    model: LlamaModel,
    path: PathBuf,
}

/// Shape facts of a model that planning and state keys need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Context length the model was trained for.
    pub n_ctx_train: u32,
    /// Transformer layers.
    pub n_layer: u32,
    /// Attention KV heads.
    pub n_head_kv: u32,
    /// Embedding width.
    pub n_embd: u32,
    /// Attention heads.
    pub n_head: u32,
    /// Feed-forward width (0 when the GGUF does not say).
    pub n_ff: u32,
    /// Key width per head (0 when the GGUF does not say: then embedding ÷ heads).
    pub head_dim_k: u32,
    /// Value width per head (0 likewise).
    pub head_dim_v: u32,
    /// Vocabulary size.
    pub n_vocab: u32,
    /// Weights size in bytes.
    pub size: u64,
}

impl Model {
    /// Loads a GGUF model.
    ///
    /// # Errors
    /// [`EngineError::ModelLoad`] when the file is missing or not a model llama.cpp can read.
    pub fn load(settings: &ModelSettings) -> Result<Self, EngineError> {
        let path = settings.path.clone();
        if !path.is_file() {
            return Err(EngineError::ModelLoad {
                path,
                reason: "no such file".into(),
            });
        }
        let backend = backend(settings.verbose)?;
        let params = LlamaModelParams::default().with_n_gpu_layers(settings.gpu_layers);
        let model = LlamaModel::load_from_file(backend, &path, &params).map_err(|e| {
            EngineError::ModelLoad {
                path: path.clone(),
                reason: format!("{e} (is it a GGUF file?)"),
            }
        })?;
        Ok(Self { model, path })
    }

    /// Path the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF's own chat template (`tokenizer.chat_template`), when it carries one.
    pub fn gguf_chat_template(&self) -> Option<String> {
        self.model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok())
    }

    /// The text of a special token such as BOS, for templates that write it themselves.
    fn special_text(&self, token: LlamaToken) -> String {
        if token.0 < 0 {
            return String::new();
        }
        let bytes = self.model.vocab().token_to_piece(token, true, None);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The vocabulary as llguidance sees it, to compile JSON schemas against. It walks every
    /// token: build it once per model.
    pub fn token_env(&self) -> llguidance::toktrie::TokEnv {
        LlamaSampler::llguidance_tok_env(&self.model)
    }

    /// Whether llama.cpp accepts `grammar` as a GBNF grammar (rooted at `root`).
    ///
    /// # Errors
    /// llama.cpp's reason.
    pub fn check_gbnf(&self, grammar: &str) -> Result<(), EngineError> {
        LlamaSampler::grammar(&self.model, grammar, "root")
            .map(drop)
            .map_err(|e| EngineError::Sampler(e.to_string()))
    }

    /// The BOS and EOS token texts that chat templates may write.
    pub fn bos_eos_text(&self) -> (String, String) {
        let vocab = self.model.vocab();
        (
            self.special_text(vocab.bos()),
            self.special_text(vocab.eos()),
        )
    }

    /// The names of llama.cpp's built-in chat templates.
    pub fn builtin_templates() -> Vec<String> {
        let mut names: Vec<*const std::os::raw::c_char> = vec![std::ptr::null(); 256];
        // SAFETY: llama.cpp writes at most `len` pointers to static, NUL-terminated names and
        // returns how many it has in all.
        let n = unsafe {
            llama_cpp_sys_2::llama_chat_builtin_templates(names.as_mut_ptr(), names.len())
        };
        names.truncate(usize::try_from(n).unwrap_or(0).min(256));
        names
            .into_iter()
            .filter(|p| !p.is_null())
            // SAFETY: each pointer is one of llama.cpp's static template names.
            .map(|p| {
                unsafe { std::ffi::CStr::from_ptr(p) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// How the model's KV memory is laid out, which decides whether its prefix states can be
    /// saved and restored.
    pub fn memory_kind(&self) -> MemoryKind {
        use llama_cpp_2::model::RopeType;
        if self.model.is_recurrent() {
            return MemoryKind::Untested("recurrent");
        }
        if self.model.is_hybrid() {
            return MemoryKind::Untested("hybrid attention and recurrent layers");
        }
        // Multi-dimensional positions add per-cell fields to the state.
        if matches!(
            self.model.rope_type(),
            Some(RopeType::MRope | RopeType::Vision)
        ) {
            return MemoryKind::Untested("multi-dimensional positions");
        }
        let window = self
            .model
            .meta_val_str("general.architecture")
            .and_then(|arch| {
                self.model
                    .meta_val_str(&format!("{arch}.attention.sliding_window"))
            })
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if window > 0 {
            MemoryKind::KvSwa
        } else {
            MemoryKind::Kv
        }
    }

    /// A number from the GGUF's metadata for this architecture (`{arch}.{key}`).
    fn arch_meta(&self, key: &str) -> Option<u32> {
        self.model
            .meta_val_str("general.architecture")
            .and_then(|arch| self.model.meta_val_str(&format!("{arch}.{key}")))
            .ok()
            .and_then(|v| v.parse().ok())
    }

    /// Shape facts of the model.
    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            n_ctx_train: self.model.n_ctx_train(),
            n_layer: self.model.n_layer(),
            n_head_kv: self.model.n_head_kv(),
            n_embd: u32::try_from(self.model.n_embd()).unwrap_or(0),
            n_head: self.model.n_head(),
            n_ff: self.arch_meta("feed_forward_length").unwrap_or(0),
            head_dim_k: self.arch_meta("attention.key_length").unwrap_or(0),
            head_dim_v: self.arch_meta("attention.value_length").unwrap_or(0),
            n_vocab: u32::try_from(self.model.n_vocab()).unwrap_or(0),
            size: self.model.size(),
        }
    }

    /// Renders a conversation with llama.cpp's formatter for `template`: a built-in template's
    /// name, or a template text llama.cpp recognises.
    ///
    /// # Errors
    /// [`EngineError::Template`] when llama.cpp cannot apply the template.
    pub fn render_llama_cpp(
        &self,
        template: &str,
        messages: &[Message],
        add_assistant: bool,
    ) -> Result<String, EngineError> {
        let template =
            LlamaChatTemplate::new(template).map_err(|e| EngineError::Template(e.to_string()))?;
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Template(e.to_string()))?;
        self.model
            .apply_chat_template(&template, &chat, add_assistant)
            .map_err(|e| EngineError::Template(e.to_string()))
    }

    /// Tokenizes rendered prompt text; special tokens in the text are parsed as such. The
    /// vocabulary's BOS is added unless the text already opens with it (templates that write
    /// `bos_token` themselves).
    pub fn tokenize(&self, text: &str) -> Vec<Token> {
        let bos = self.special_text(self.model.vocab().bos());
        let add_bos = bos.is_empty() || !text.starts_with(&bos);
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_bos, true)
            .into_iter()
            .map(|t| Token(t.0))
            .collect()
    }

    /// Creates a context (with its KV cache) and a reusable batch.
    ///
    /// # Errors
    /// [`EngineError::Context`] when llama.cpp cannot allocate it.
    pub fn new_session(&self, settings: &SessionSettings) -> Result<Session<'_>, EngineError> {
        let backend = backend(false)?;
        let threads = i32::try_from(settings.threads).unwrap_or(i32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(settings.n_ctx))
            .with_n_batch(settings.n_batch)
            .with_n_ubatch(settings.n_batch)
            .with_n_seq_max(settings.n_seq_max)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_flash_attention_policy(settings.flash_attn.policy())
            .with_kv_unified(settings.kv_unified)
            // Named, not left to the default: saved states record and check them.
            .with_type_k(KvCacheType::F16)
            .with_type_v(KvCacheType::F16);
        let ctx = self
            .model
            .new_context(backend, params)
            .map_err(|e| EngineError::Context {
                n_ctx: settings.n_ctx,
                reason: e.to_string(),
            })?;
        let batch = LlamaBatch::new(settings.n_batch as usize, 1);
        Ok(Session {
            ctx,
            batch,
            streams: if settings.kv_unified {
                1
            } else {
                settings.n_seq_max
            },
            capacity: settings.n_batch as usize,
            memory: self.memory_kind(),
            model: self,
        })
    }
}

impl SessionSettings {
    /// Every setting that changes the bytes of a sequence state: the model's memory layout,
    /// the KV cache types, the attention path (which decides whether V is stored transposed),
    /// the prefill chunk size (which changes rounding) and where the layers ran. Not the stream
    /// layout: states are stored in one-stream form.
    pub fn state_layout(&self, memory: MemoryKind, gpu_layers: u32) -> String {
        format!(
            "memory={memory} kv=f16/f16 flash_attn={:?} n_batch={} gpu_layers={gpu_layers}",
            self.flash_attn, self.n_batch
        )
    }
}

/// Context settings chosen by the planner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSettings {
    /// KV cache cells shared by all sequences.
    pub n_ctx: u32,
    /// Most tokens in one decode call; also the prefill chunk size.
    pub n_batch: u32,
    /// Distinct sequences (slots plus resident prefixes).
    pub n_seq_max: u32,
    /// Threads for decode and prefill.
    pub threads: u32,
    /// Attention kernel choice.
    pub flash_attn: FlashAttn,
    /// One KV cache for all sequences, so a prefix copied to a slot is shared, not duplicated.
    /// Otherwise each sequence has a stream of `n_ctx / n_seq_max` cells of its own, and a
    /// sequence's cells sit at places that do not depend on the others.
    pub kv_unified: bool,
}

/// Whether llama.cpp uses its flash-attention kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FlashAttn {
    /// llama.cpp decides per device.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

impl FlashAttn {
    fn policy(self) -> llama_cpp_sys_2::llama_flash_attn_type {
        match self {
            Self::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
            Self::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            Self::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }
    }
}

/// A context with its KV cache and one reusable batch.
pub struct Session<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// KV streams: 1 for a unified cache, else one per sequence.
    streams: u32,
    /// How states of this model are laid out.
    memory: MemoryKind,
    capacity: usize,
    model: &'m Model,
}

impl<'m> Session<'m> {
    /// Drops the cells of `seq` from position `from` (all of them for `None`).
    fn remove_cells(&mut self, seq: SeqId, from: Option<u32>) -> Result<(), EngineError> {
        let seq_id = u32::try_from(seq).map_err(|e| EngineError::Cache(e.to_string()))?;
        match self.ctx.clear_kv_cache_seq(Some(seq_id), from, None) {
            Ok(true) => Ok(()),
            Ok(false) => Err(EngineError::Cache(format!(
                "sequence {seq}'s cells could not be removed"
            ))),
            Err(e) => Err(EngineError::Cache(e.to_string())),
        }
    }

    /// The model behind this session.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// KV sections in this model's states; an error for layouts no test has covered.
    fn state_sections(&self) -> Result<usize, String> {
        self.memory.sections().ok_or_else(|| {
            format!(
                "states of this model's memory layout ({}) are not saved",
                self.memory
            )
        })
    }

    fn probe_groups(&mut self, seqs: &[SeqId]) -> Result<RowDependence, EngineError> {
        let Some(&first) = seqs.first() else {
            return Ok(RowDependence::None);
        };
        // Context first: at position 0 a row attends to one key, whose softmax weight is
        // exactly 1 whatever the kernel, which would hide attention kernels that sum over the
        // keys in an order that depends on the row count.
        let n_vocab = u32::try_from(self.model.model.n_vocab())
            .unwrap_or(1)
            .max(1);
        for p in 0..PROBE_DEPTH {
            let token = i32::try_from((p * 7919 + 13) % n_vocab).unwrap_or(0);
            self.push(Token(token), p, first, false)?;
        }
        self.decode()?;
        for &seq in &seqs[1..] {
            self.share_prefix(first, seq)?;
        }
        let alone = self.probe_rows(&seqs[..1])?;
        let mut invariant = true;
        for size in [2, 4, 8, 16, 32].into_iter().filter(|&n| n <= seqs.len()) {
            let rows = self.probe_rows(&seqs[..size])?;
            if !rows.iter().all(|r| same_bits(r, &alone[0])) {
                invariant = false;
                break;
            }
        }
        if invariant {
            return Ok(RowDependence::None);
        }
        // Two or more sequences, since a group of two differed.
        let pair = self.probe_rows(&seqs[..2])?;
        let mut up_to = 2;
        while up_to < seqs.len().min(MAX_PROBED_GROUP) {
            let rows = self.probe_rows(&seqs[..=up_to])?;
            if !rows.iter().all(|r| same_bits(r, &pair[0])) {
                break;
            }
            up_to += 1;
        }
        Ok(RowDependence::SameFrom2UpTo(up_to))
    }

    /// Decodes the probe token at [`PROBE_DEPTH`] in every sequence of `group` in one call and
    /// returns each row's logits, then drops the token again.
    fn probe_rows(&mut self, group: &[SeqId]) -> Result<Vec<Vec<f32>>, EngineError> {
        for &seq in group {
            self.push(Token(0), PROBE_DEPTH, seq, true)?;
        }
        let decoded = self.decode();
        let rows = (0..group.len())
            .map(|i| self.logits(i32::try_from(i).unwrap_or(0)))
            .collect();
        for &seq in group {
            self.truncate_seq(seq, PROBE_DEPTH)?;
        }
        decoded.map(|()| rows)
    }

    /// The raw logits row at batch index `index` of the last decode (for tests and checks).
    pub fn logits(&self, index: i32) -> Vec<f32> {
        self.ctx.get_logits_ith(index).to_vec()
    }
}

impl Vocab for Model {
    /// Whether a token ends generation.
    fn is_end_of_generation(&self, token: Token) -> bool {
        self.model.vocab().is_eog(LlamaToken(token.0))
    }

    /// The text of any token, special tokens included (`<|im_end|>`), as log probabilities
    /// show alternatives.
    fn token_piece(&self, token: Token) -> Vec<u8> {
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token.0), true, None)
    }

    /// Appends the bytes of a token's text to `out`; special tokens render as nothing.
    fn token_bytes(&self, token: Token, out: &mut Vec<u8>) {
        self.model
            .vocab()
            .token_to_piece_into(LlamaToken(token.0), out, false, None);
    }
}

impl<'m> Engine for Session<'m> {
    type Sampler = Sampler;
    type Vocab = Model;

    fn vocab(&self) -> &Model {
        self.model
    }

    /// Tokens the batch holds at most.
    fn batch_capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens queued in the batch so far.
    fn batch_len(&self) -> usize {
        usize::try_from(self.batch.n_tokens()).unwrap_or(0)
    }

    /// Queues one token of sequence `seq` at position `pos`; `logits` asks for its output row.
    /// Returns the row index that [`Session::sample`] needs when `logits` is set.
    ///
    /// # Errors
    /// [`EngineError::Batch`] when the batch is full.
    fn push(
        &mut self,
        token: Token,
        pos: u32,
        seq: SeqId,
        logits: bool,
    ) -> Result<i32, EngineError> {
        let index = self.batch.n_tokens();
        let pos = i32::try_from(pos).map_err(|e| EngineError::Batch(e.to_string()))?;
        self.batch
            .add(LlamaToken(token.0), pos, &[seq], logits)
            .map_err(|e| EngineError::Batch(e.to_string()))?;
        Ok(index)
    }

    /// Runs the queued batch through the model and empties it.
    ///
    /// # Errors
    /// [`EngineError::Decode`] when llama.cpp fails (for example, no KV cell is free).
    fn decode(&mut self) -> Result<(), EngineError> {
        let result = self.ctx.decode(&mut self.batch);
        // A GPU backend queues the work and returns: wait for it here, so that the caller's
        // clock around this call measures the computation, not its submission.
        self.ctx.synchronize();
        self.batch.clear();
        result.map_err(|e| EngineError::Decode(e.to_string()))
    }

    /// Empties the batch without decoding it.
    fn discard_batch(&mut self) {
        self.batch.clear();
    }

    /// Gives `dst` every cell of `src`. In a unified cache the cells are only tagged, not
    /// copied; with a KV stream per sequence llama.cpp copies the whole stream, so `dst` gets
    /// the same cells at the same places.
    fn share_prefix(&mut self, src: SeqId, dst: SeqId) -> Result<(), EngineError> {
        // The whole range: llama.cpp only copies whole streams.
        self.ctx
            .copy_kv_cache_seq(src, dst, None, None)
            .map_err(|e| EngineError::Cache(e.to_string()))
    }

    /// Drops the cells of `seq` at positions `from` and after.
    fn truncate_seq(&mut self, seq: SeqId, from: u32) -> Result<(), EngineError> {
        self.remove_cells(seq, Some(from))
    }

    /// Drops every cell of `seq`; cells still shared with another sequence stay.
    fn clear_seq(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.remove_cells(seq, None)
    }

    /// The serialised KV state of sequence `seq`, in llama.cpp's per-sequence format as a
    /// unified (one-stream) cache writes it, whatever this session's layout.
    ///
    /// # Errors
    /// When this model's states are of an untested layout, or llama.cpp's bytes do not parse
    /// as the layout this build knows.
    fn seq_state(&self, seq: SeqId) -> Result<Vec<u8>, EngineError> {
        let sections = self.state_sections().map_err(EngineError::Save)?;
        let flags = LlamaStateSeqFlags::empty();
        let size = self.ctx.state_seq_get_size_ext(seq, flags);
        let mut bytes = vec![0u8; size];
        // SAFETY: the buffer holds the `size` bytes llama.cpp just said the state needs.
        let written = unsafe {
            self.ctx
                .state_seq_get_data_ext(bytes.as_mut_ptr(), seq, flags)
        };
        bytes.truncate(written);
        SeqState::parse(&bytes, sections)
            .and_then(|s| s.to_one_stream())
            .map_err(|e| EngineError::Save(e.to_string()))
    }

    /// Loads a state produced by [`Self::seq_state`] into sequence `seq`.
    ///
    /// The caller must only pass bytes that this build wrote for this model and layout:
    /// llama.cpp's loader trusts its input and may abort on malformed state.
    ///
    /// # Errors
    /// [`EngineError::Restore`] when the bytes do not parse as a one-stream state of this
    /// model's layout, or llama.cpp rejects them.
    fn restore_seq_state(&mut self, seq: SeqId, state: &[u8]) -> Result<(), EngineError> {
        let flags = LlamaStateSeqFlags::empty();
        let refused = |why: String| EngineError::Restore(state.len(), why);
        let parsed = SeqState::parse(state, self.state_sections().map_err(refused)?)
            .map_err(|e| refused(e.to_string()))?;
        if parsed.streams() != 1 {
            return Err(refused("not in one-stream form".into()));
        }
        // A unified cache reads the one-stream form as it is; only streams need a new layout.
        let state: std::borrow::Cow<'_, [u8]> = if self.streams > 1 {
            let stream = u32::try_from(seq).map_err(|e| refused(e.to_string()))?;
            parsed
                .to_streams(self.streams, stream)
                .map_err(|e| refused(e.to_string()))?
                .into()
        } else {
            state.into()
        };
        // SAFETY: `state` passed the prefix store's checksum and identity checks and parses
        // whole as a state of this model's layout and KV types, so it is what `seq_state`
        // produced under this build, model and KV layout (with the stream count adapted).
        let ok = unsafe { self.ctx.state_seq_set_data_ext(&state, seq, flags) };
        if ok {
            Ok(())
        } else {
            // The refusal is the error to report; a failed clear would only repeat it.
            self.clear_seq(seq).ok();
            Err(EngineError::Restore(
                state.len(),
                "llama.cpp's loader refused it".into(),
            ))
        }
    }

    /// How a decoded row's logits depend on how many rows share its decode call. Every
    /// sequence of `seqs` gets the same 16 positions of context, then the same token is decoded
    /// in groups of 1, 2, 4, 8, 16 and 32 of them (as many as `seqs` allows), and every row of
    /// every group is compared bit for bit with the lone row. Where one differs, groups of 2, 3,
    /// 4, ... are compared with the pair, up to the first that differs. `seqs` must be
    /// consecutive ids, so that llama.cpp keeps each group in one call; they are left empty.
    /// CPU kernels are row-independent; GPU kernels pick their matrix-product and attention
    /// kernels by row count (lavapipe: a lone row, 2 to 8 rows, and more, each differently).
    ///
    /// # Errors
    /// When a decode fails.
    fn decode_group_probe(&mut self, seqs: &[SeqId]) -> Result<RowDependence, EngineError> {
        let result = self.probe_groups(seqs);
        for &seq in seqs {
            self.clear_seq(seq)?;
        }
        result
    }

    /// A sampler for one choice of a request, constrained by `constraint` when it has one.
    ///
    /// # Errors
    /// [`EngineError::Sampler`] when llama.cpp refuses the grammar (it was checked before, so
    /// only a failure inside llama.cpp).
    fn sampler(
        &self,
        spec: &SamplerSpec,
        constraint: Option<&Constraint>,
    ) -> Result<Sampler, EngineError> {
        Sampler::new(spec, self.model, constraint)
    }

    /// The log probability of `token` at batch row `index` of the last decode under the
    /// model's own distribution (a log-softmax of the raw logits: before temperature,
    /// truncation or grammar masks), and the `top` most likely tokens with theirs.
    fn logprobs(&self, index: i32, token: Token, top: usize) -> TokenLogprobs {
        log_softmax_top(self.ctx.get_logits_ith(index), token, top)
    }

    /// Draws the next token for the row `index` of the last decode.
    fn sample(&self, sampler: &mut Sampler, index: i32) -> Token {
        Token(sampler.inner.sample(&self.ctx, index).0)
    }
}

/// A token's log probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token's own.
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(Token, f32)>,
}

/// Log-softmax of `logits` at `token`, and its `top` largest entries (ties by lower id).
pub fn log_softmax_top(logits: &[f32], token: Token, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let logprob = |l: f32| (f64::from(l) - lse) as f32;
    let mut best: Vec<(Token, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &l) in logits.iter().enumerate() {
            if best.len() == top && l <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (Token(i32::try_from(id).unwrap_or(i32::MAX)), l));
            best.truncate(top);
        }
    }
    let own = usize::try_from(token.0)
        .ok()
        .and_then(|i| logits.get(i))
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    TokenLogprobs {
        logprob: logprob(own),
        top: best.into_iter().map(|(t, l)| (t, logprob(l))).collect(),
    }
}

/// A compiled constraint on a request's answer, ready to copy into each of its samplers.
#[derive(Clone)]
pub enum Constraint {
    /// A JSON schema's llguidance matcher, compiled once; each sampler takes a deep copy.
    Json(std::sync::Arc<llguidance::Matcher>),
    /// A GBNF grammar (rooted at `root`) that llama.cpp accepted.
    Gbnf(std::sync::Arc<str>),
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Json(_) => f.write_str("Constraint::Json"),
            Self::Gbnf(g) => write!(f, "Constraint::Gbnf({} bytes)", g.len()),
        }
    }
}

/// Resolved sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerSpec {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass (1 disables).
    pub top_p: f32,
    /// Top-k (0 disables).
    pub top_k: i32,
    /// Min-p (0 disables).
    pub min_p: f32,
    /// Seed of the random draw.
    pub seed: u32,
    /// OpenAI's frequency penalty (0 disables): subtracted once per earlier occurrence.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty (0 disables): subtracted once if the token occurred.
    pub presence_penalty: f32,
    /// Generated tokens the penalties look back over: the request's `max_tokens`, so all.
    pub penalty_window: u32,
}

impl SamplerSpec {
    /// The settings of choice `k` of a request (`n` > 1): its own seed, derived from the
    /// request's, so each choice draws differently and the same way every run. Choice 0 keeps
    /// the request's seed.
    pub fn for_choice(&self, k: u32) -> Self {
        let mut spec = self.clone();
        if k > 0 {
            spec.seed = crate::digest::choice_seed(self.seed, k);
        }
        spec
    }
}

/// One request's sampling chain; its random state belongs to that request alone.
pub struct Sampler {
    inner: LlamaSampler,
}

impl Sampler {
    fn new(
        spec: &SamplerSpec,
        model: &Model,
        constraint: Option<&Constraint>,
    ) -> Result<Self, EngineError> {
        let mut chain = Vec::new();
        // Penalties see only the tokens this sampler drew: the request's own completion.
        if spec.frequency_penalty != 0.0 || spec.presence_penalty != 0.0 {
            chain.push(LlamaSampler::penalties(
                model.model.n_vocab(),
                i32::try_from(spec.penalty_window).unwrap_or(i32::MAX),
                1.0,
                spec.frequency_penalty,
                spec.presence_penalty,
            ));
        }
        // The grammar masks what it does not allow; the draw below picks among the rest.
        match constraint {
            Some(Constraint::Json(matcher)) => chain.push(LlamaSampler::from(matcher.deep_clone())),
            Some(Constraint::Gbnf(grammar)) => chain.push(
                LlamaSampler::grammar(&model.model, grammar, "root")
                    .map_err(|e| EngineError::Sampler(e.to_string()))?,
            ),
            None => {}
        }
        if spec.temperature <= 0.0 {
            if chain.is_empty() {
                return Ok(Self {
                    inner: LlamaSampler::greedy(),
                });
            }
            chain.push(LlamaSampler::greedy());
            return Ok(Self {
                inner: LlamaSampler::chain_simple(chain),
            });
        }
        if spec.top_k > 0 {
            chain.push(LlamaSampler::top_k(spec.top_k));
        }
        if spec.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(spec.top_p, 1));
        }
        if spec.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(spec.min_p, 1));
        }
        chain.push(LlamaSampler::temp(spec.temperature));
        chain.push(LlamaSampler::dist(spec.seed));
        Ok(Self {
            inner: LlamaSampler::chain_simple(chain),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises_and_ranks() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = log_softmax_top(&logits, Token(2), 2);
        let total: f64 = (0..4)
            .map(|t| f64::from(log_softmax_top(&logits, Token(t), 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let z = 1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp();
        assert!((f64::from(lp.logprob) - (2.0 - z.ln())).abs() < 1e-6);
        // Ties go to the lower id; most likely first.
        assert_eq!(
            lp.top.iter().map(|(t, _)| t.0).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert!(lp.top[0].1 > lp.logprob);
        assert_eq!(
            log_softmax_top(&logits, Token(9), 0).logprob,
            f32::NEG_INFINITY
        );
    }

    #[test]
    fn choices_get_their_own_stable_seeds() {
        let spec = SamplerSpec {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 7,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_window: 8,
        };
        assert_eq!(spec.for_choice(0), spec);
        assert_ne!(spec.for_choice(1).seed, spec.seed);
        assert_ne!(spec.for_choice(1).seed, spec.for_choice(2).seed);
        assert_eq!(spec.for_choice(3), spec.for_choice(3));
    }
}
