//! A loaded GGUF model: its shape, vocabulary, chat templates and tokenizer.

use std::path::{Path, PathBuf};

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use super::device::backend;
use super::state::MemoryKind;
use super::{EngineError, Token, Vocab};
use crate::formats::message::Message;

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
    pub(super) model: LlamaModel,
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

    /// `text` as tokens with no BOS, special tokens parsed: a marker such as `<think>` is one
    /// token where the vocabulary has it whole.
    pub fn tokenize_piece(&self, text: &str) -> Vec<Token> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), false, true)
            .into_iter()
            .map(|t| Token(t.0))
            .collect()
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
