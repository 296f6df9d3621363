//! Applies the chat template and splits a prompt's tokens into a shared prefix and its own suffix.
//!
//! The prefix is what the leading system messages render to. Tokenizing the prefix alone can end
//! on a different token boundary than tokenizing the whole prompt (a merge across the seam), so
//! the shared part is the longest common token prefix of the two: prefix + suffix always equals
//! the whole prompt's tokens, token for token.

pub mod grammar;
pub mod template;
pub mod text_prefix;
pub mod thinking;

use std::collections::HashMap;

use crate::digest::{sha256_parts, short_hex, Hasher};
use crate::engine::{Model, Token};
use crate::formats::message::Message;
use crate::input::request::Prompt;
use std::sync::Arc;

use crate::input::reasoning::{Effort, ReasoningAsk};
use crate::prompt::template::TemplateKwargs;
use crate::prompt::template::{JinjaTemplate, TemplateChoice};
use crate::prompt::thinking::{ReasoningFault, ThinkSetup};
use crate::schedule::reasoning::ThinkPlan;

/// Identity of a shared prefix: the SHA-256 of its exact token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixKey(pub [u8; 32]);

impl PrefixKey {
    /// The key of a token sequence.
    pub fn of(tokens: &[Token]) -> Self {
        let mut h = Hasher::new();
        for t in tokens {
            h.update(t.0.to_le_bytes());
        }
        Self(h.finish())
    }

    /// The first 8 bytes, for sets that must stay small.
    pub fn hash64(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("32 bytes"))
    }

    /// The first 8 bytes in hex, for logs and file names.
    pub fn short(&self) -> String {
        short_hex(&self.0, 8)
    }
}

/// A request's prompt, tokenized and split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPrompt {
    /// All tokens of the rendered prompt.
    pub tokens: Vec<Token>,
    /// How many leading tokens come from the shared prefix (0: none shared).
    pub shared_len: usize,
}

impl SplitPrompt {
    /// The shared prefix tokens.
    pub fn prefix(&self) -> &[Token] {
        &self.tokens[..self.shared_len]
    }

    /// The request's own tokens after the prefix.
    pub fn suffix(&self) -> &[Token] {
        &self.tokens[self.shared_len..]
    }

    /// The prefix's key, or `None` when nothing is shared.
    pub fn prefix_key(&self) -> Option<PrefixKey> {
        (self.shared_len > 0).then(|| PrefixKey::of(self.prefix()))
    }
}

/// Why a conversation cannot become a prompt: what the template (or the lack of one) said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PromptError(String);

impl From<String> for PromptError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

/// How many leading tokens of `full` may come from `prefix`.
///
/// This is the longest common prefix of the two, kept one token short of `full` so that the
/// request always computes at least its last prompt token itself: that token's logits start
/// generation.
pub fn shared_len(prefix: &[Token], full: &[Token]) -> usize {
    let common = prefix.iter().zip(full).take_while(|(a, b)| a == b).count();
    common.min(full.len().saturating_sub(1))
}

/// The leading system messages of a conversation: the part requests can share.
pub fn leading_system(messages: &[Message]) -> &[Message] {
    let n = messages.iter().take_while(|m| m.role == "system").count();
    &messages[..n]
}

/// Most distinct system prompts whose tokens are remembered; beyond it the memo starts over.
const PREFIX_MEMO_CAPACITY: usize = 256;

/// Stands for the first user message when the shared part of a prompt is rendered: the text
/// before it is what every request with these system messages begins with, its user turn's
/// opening included. Private-use characters, so no template or input would write them.
const SPLIT_MARK: &str = "\u{E000}infer-batch-split\u{E000}";

/// How conversations become prompt text: a Jinja template, or llama.cpp's formatter.
pub enum Renderer {
    /// A Jinja template (the GGUF's own, or a file), rendered with minijinja.
    Jinja(Box<JinjaTemplate>),
    /// llama.cpp's formatter for a built-in template name, or a template text it recognises.
    LlamaCpp {
        /// The name or text llama.cpp is given.
        template: String,
        /// What the run reports it as.
        identity: String,
    },
    /// None could be had, in a run whose input holds only raw-text prompts: a conversation
    /// gets an error line that says why.
    Missing(String),
}

impl Renderer {
    /// The renderer `choice` asks for, checked by rendering a system and a user message.
    ///
    /// # Errors
    /// When the GGUF has no template and none is given, a name is not one of llama.cpp's, a
    /// file cannot be read or compiled, or the template cannot render a plain conversation.
    /// The message names `--chat-template`.
    pub fn for_model(model: &Model, choice: &TemplateChoice) -> Result<Self, PromptError> {
        let (bos, eos) = model.bos_eos_text();
        let renderer = match choice {
            TemplateChoice::Gguf => {
                let Some(source) = model.gguf_chat_template() else {
                    return Err(format!(
                        "the model's GGUF carries no chat template: pass --chat-template with one \
                         of llama.cpp's built-in names ({}), or a Jinja file",
                        Model::builtin_templates().join(", ")
                    )
                    .into());
                };
                match JinjaTemplate::new(&source, "gguf", &bos, &eos) {
                    Ok(t) => Self::Jinja(Box::new(t)),
                    Err(e) => {
                        // llama.cpp recognises many common templates by their text.
                        tracing::warn!("{e}; using llama.cpp's formatter for it instead");
                        Self::LlamaCpp {
                            identity: format!(
                                "llama.cpp:gguf:{}",
                                short_hex(&sha256_parts([source.as_bytes()]), 8)
                            ),
                            template: source,
                        }
                    }
                }
            }
            TemplateChoice::Builtin(name) => {
                let known = Model::builtin_templates();
                if !known.contains(name) {
                    return Err(format!(
                        "--chat-template {name:?} is neither a file nor one of llama.cpp's \
                         built-in templates: {}",
                        known.join(", ")
                    )
                    .into());
                }
                Self::LlamaCpp {
                    template: name.clone(),
                    identity: format!("llama.cpp:{name}"),
                }
            }
            TemplateChoice::File(path) => {
                let source = std::fs::read_to_string(path).map_err(|e| {
                    format!("--chat-template {}: cannot read it: {e}", path.display())
                })?;
                Self::Jinja(Box::new(JinjaTemplate::new(
                    &source,
                    &path.display().to_string(),
                    &bos,
                    &eos,
                )?))
            }
        };
        let probe = [
            Message {
                role: "system".into(),
                content: "You are a grader.".into(),
            },
            Message {
                role: "user".into(),
                content: "Grade this.".into(),
            },
        ];
        renderer
            .render(model, &probe, true, &TemplateKwargs::new())
            .map_err(|e| {
                format!(
                "chat template {} cannot render a system and a user message ({e}); choose another \
                 with --chat-template",
                renderer.identity()
            )
            })?;
        Ok(renderer)
    }

    /// Whether the template reads `chat_template_kwargs` (a Jinja template does; llama.cpp's
    /// formatter takes none).
    pub fn reads_kwargs(&self) -> bool {
        matches!(self, Self::Jinja(_))
    }

    /// Refuses run-wide template variables that this renderer cannot take, before any request
    /// runs.
    ///
    /// # Errors
    /// `--chat-template-kwargs` given to llama.cpp's formatter.
    pub fn check_kwargs(&self, kwargs: &TemplateKwargs) -> Result<(), PromptError> {
        if kwargs.is_empty() || self.reads_kwargs() || matches!(self, Self::Missing(_)) {
            return Ok(());
        }
        Err(format!(
            "--chat-template-kwargs needs a Jinja chat template, and {} is rendered by llama.cpp's \
             own formatter; pass a Jinja file with --chat-template",
            self.identity()
        )
        .into())
    }

    /// What the run reports the template as.
    pub fn identity(&self) -> &str {
        match self {
            Self::Jinja(t) => t.identity(),
            Self::LlamaCpp { identity, .. } => identity,
            Self::Missing(_) => "none",
        }
    }

    /// Renders a conversation; `add_generation_prompt` opens the assistant's turn.
    ///
    /// # Errors
    /// What the template said.
    pub fn render(
        &self,
        model: &Model,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &TemplateKwargs,
    ) -> Result<String, String> {
        match self {
            Self::Jinja(t) => t.render(messages, add_generation_prompt, kwargs),
            Self::LlamaCpp { identity, .. } if !kwargs.is_empty() => Err(format!(
                "chat_template_kwargs need a Jinja chat template, and {identity} is rendered by \
                 llama.cpp's own formatter; pass a Jinja file with --chat-template"
            )),
            Self::LlamaCpp { template, .. } => model
                .render_llama_cpp(template, messages, add_generation_prompt)
                .map_err(|e| e.to_string()),
            Self::Missing(why) => Err(why.clone()),
        }
    }
}

/// Renders and splits prompts, remembering the tokens of each distinct system prompt so a
/// rubric shared by a million requests is tokenized once.
pub struct PromptBuilder<'m> {
    model: &'m Model,
    renderer: &'m Renderer,
    /// Which conversations think, and how.
    think: ThinkSetup,
    memo: HashMap<[u8; 32], Vec<Token>>,
    /// The tokens of the text that raw-text prompts share ([`text_prefix`]).
    text_prefix: Vec<Token>,
}

impl<'m> PromptBuilder<'m> {
    /// A builder for prompts of `model`, rendered by `renderer`; raw-text prompts share
    /// `text_prefix` where they begin with it.
    pub fn new(
        model: &'m Model,
        renderer: &'m Renderer,
        text_prefix: Option<&str>,
        think: ThinkSetup,
    ) -> Self {
        Self {
            model,
            renderer,
            think,
            memo: HashMap::new(),
            text_prefix: text_prefix.map(|t| model.tokenize(t)).unwrap_or_default(),
        }
    }

    /// A request's prompt, tokenized and split, and how it thinks: its template switches are
    /// the run's under its own, and an effort of `none` or `minimal` turns thinking off through
    /// the template where the template reads `enable_thinking`.
    ///
    /// # Errors
    /// What the template said, or why it cannot think as it asked.
    pub fn build_request(
        &mut self,
        prompt: &Prompt,
        ask: &ReasoningAsk,
        max_tokens: u32,
    ) -> Result<(SplitPrompt, Option<Arc<ThinkPlan>>), RequestPromptError> {
        let mut kwargs = self.think.kwargs_for(ask);
        let Prompt::Chat(messages) = prompt else {
            return Ok((self.build_prompt(prompt, &kwargs)?, None));
        };
        let off = ask.effort.is_some_and(Effort::is_off);
        if off
            && self.think.markers.is_some()
            && self.renderer.reads_kwargs()
            && !kwargs.contains_key(ENABLE_THINKING)
        {
            let with = |on: bool| {
                let mut k = kwargs.clone();
                k.insert(ENABLE_THINKING.into(), on.into());
                k
            };
            if self.render(messages, &with(false))? != self.render(messages, &with(true))? {
                kwargs = with(false);
            }
        }
        let rendered = self.render(messages, &kwargs)?;
        let think = self
            .think
            .plan(ask, &rendered, max_tokens)
            .map_err(RequestPromptError::Reasoning)?;
        Ok((self.build(messages, &kwargs)?, think))
    }

    /// Tokenizes and splits a request's prompt: a conversation through the chat template, raw
    /// text as it is.
    ///
    /// # Errors
    /// What the template said when it cannot render the conversation.
    pub fn build_prompt(
        &mut self,
        prompt: &Prompt,
        kwargs: &TemplateKwargs,
    ) -> Result<SplitPrompt, PromptError> {
        match prompt {
            Prompt::Chat(messages) => self.build(messages, kwargs),
            Prompt::Text(text) => {
                let tokens = self.model.tokenize(text);
                let shared_len = shared_len(&self.text_prefix, &tokens);
                Ok(SplitPrompt { tokens, shared_len })
            }
            Prompt::Embed(_) => Err("inputs to embed are not a prompt to continue"
                .to_owned()
                .into()),
        }
    }

    /// The text every conversation that opens with `system` begins with: the rendering of
    /// `system` and a marker user message, cut at the marker. A template that does not show
    /// the marker gives the rendering of `system` alone.
    fn prefix_text(&self, system: &[Message], kwargs: &TemplateKwargs) -> Result<String, String> {
        let mut probe = system.to_vec();
        probe.push(Message {
            role: "user".into(),
            content: SPLIT_MARK.into(),
        });
        let text = self.renderer.render(self.model, &probe, false, kwargs)?;
        match text.find(SPLIT_MARK) {
            Some(at) => Ok(text[..at].to_owned()),
            None => self.renderer.render(self.model, system, false, kwargs),
        }
    }

    /// The text of a conversation's prompt, its assistant turn opened.
    ///
    /// # Errors
    /// What the template said.
    pub fn render(&self, messages: &[Message], kwargs: &TemplateKwargs) -> Result<String, String> {
        self.renderer.render(self.model, messages, true, kwargs)
    }

    /// Renders, tokenizes and splits one conversation. The split is made in every mode: the
    /// naive baseline uses it for its chunk cuts, without sharing anything.
    ///
    /// # Errors
    /// What the template said when it cannot render the conversation.
    pub fn build(
        &mut self,
        messages: &[Message],
        kwargs: &TemplateKwargs,
    ) -> Result<SplitPrompt, PromptError> {
        let tokens = self
            .model
            .tokenize(&self.renderer.render(self.model, messages, true, kwargs)?);
        let system = leading_system(messages);
        if system.is_empty() {
            return Ok(SplitPrompt {
                tokens,
                shared_len: 0,
            });
        }
        let key = system_key(system, kwargs);
        if !self.memo.contains_key(&key) {
            if self.memo.len() >= PREFIX_MEMO_CAPACITY {
                self.memo.clear();
            }
            let prefix = self.model.tokenize(&self.prefix_text(system, kwargs)?);
            self.memo.insert(key, prefix);
        }
        let shared_len = shared_len(&self.memo[&key], &tokens);
        Ok(SplitPrompt { tokens, shared_len })
    }
}

/// The template switch that Qwen3-style templates read.
const ENABLE_THINKING: &str = "enable_thinking";

/// Why a request's prompt cannot be built.
#[derive(Debug)]
pub enum RequestPromptError {
    /// The template refused the conversation.
    Template(PromptError),
    /// It cannot think as it asked.
    Reasoning(ReasoningFault),
}

impl From<PromptError> for RequestPromptError {
    fn from(e: PromptError) -> Self {
        Self::Template(e)
    }
}

impl From<String> for RequestPromptError {
    fn from(e: String) -> Self {
        Self::Template(e.into())
    }
}

/// A hash of the system messages' roles and texts and the template's kwargs, unambiguous
/// about their boundaries.
fn system_key(system: &[Message], kwargs: &TemplateKwargs) -> [u8; 32] {
    let kwargs = serde_json::to_vec(kwargs).unwrap_or_default();
    sha256_parts(
        system
            .iter()
            .flat_map(|m| [m.role.as_bytes(), m.content.as_bytes()])
            .chain([kwargs.as_slice()]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(ids: &[i32]) -> Vec<Token> {
        ids.iter().copied().map(Token).collect()
    }

    #[test]
    fn shared_len_is_the_common_prefix() {
        assert_eq!(shared_len(&toks(&[1, 2, 3]), &toks(&[1, 2, 3, 4, 5])), 3);
    }

    #[test]
    fn shared_len_stops_at_a_seam_merge() {
        // The prefix ends in token 3, but the whole prompt merged it with what follows into 9.
        assert_eq!(shared_len(&toks(&[1, 2, 3]), &toks(&[1, 2, 9, 4])), 2);
    }

    #[test]
    fn shared_len_leaves_the_last_token_to_the_request() {
        assert_eq!(shared_len(&toks(&[1, 2, 3]), &toks(&[1, 2, 3])), 2);
        assert_eq!(shared_len(&toks(&[1]), &toks(&[1])), 0);
        assert_eq!(shared_len(&[], &toks(&[1, 2])), 0);
        assert_eq!(shared_len(&toks(&[1, 2]), &[]), 0);
    }

    #[test]
    fn split_parts_add_up() {
        let p = SplitPrompt {
            tokens: toks(&[5, 6, 7, 8]),
            shared_len: 3,
        };
        assert_eq!([p.prefix(), p.suffix()].concat(), p.tokens);
        assert_eq!(p.prefix_key(), Some(PrefixKey::of(&toks(&[5, 6, 7]))));
        let none = SplitPrompt {
            tokens: toks(&[5]),
            shared_len: 0,
        };
        assert_eq!(none.prefix_key(), None);
    }

    #[test]
    fn prefix_keys_differ_by_content_and_order() {
        assert_ne!(PrefixKey::of(&toks(&[1, 2])), PrefixKey::of(&toks(&[2, 1])));
        assert_eq!(PrefixKey::of(&toks(&[1, 2])), PrefixKey::of(&toks(&[1, 2])));
        assert_eq!(PrefixKey::of(&toks(&[1, 2])).short().len(), 16);
    }

    #[test]
    fn leading_system_takes_only_the_head() {
        let m = |role: &str| Message {
            role: role.into(),
            content: "x".into(),
        };
        let conv = [m("system"), m("system"), m("user"), m("system")];
        assert_eq!(leading_system(&conv).len(), 2);
        assert!(leading_system(&[m("user")]).is_empty());
    }

    #[test]
    fn system_key_respects_boundaries() {
        let m = |c: &str| Message {
            role: "system".into(),
            content: c.into(),
        };
        assert_ne!(
            system_key(&[m("ab"), m("c")], &TemplateKwargs::new()),
            system_key(&[m("a"), m("bc")], &TemplateKwargs::new())
        );
    }
}
