//! Which requests think, and how: the model's thinking markers (`--reasoning-format`), the
//! budgets of each effort (`--reasoning-budget`), the run's template switches
//! (`--chat-template-kwargs`), and for each request the [`ThinkPlan`] its choices follow.

use std::sync::Arc;

use crate::engine::{Model, Token, Vocab};
use crate::input::reasoning::{Effort, ReasoningAsk};
use crate::prompt::template::TemplateKwargs;
use crate::schedule::reasoning::ThinkPlan;

/// Where the thinking markers come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReasoningFormat {
    /// `<think>` and `</think>` when the vocabulary holds each as one token; otherwise the
    /// model does not think, as far as the run is concerned.
    #[default]
    Auto,
    /// No thinking is looked for: everything the model writes is `content`.
    None,
    /// `<think>` and `</think>`, whatever the vocabulary (DeepSeek-R1's format).
    Deepseek,
}

impl ReasoningFormat {
    /// llama-server's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::None => "none",
            Self::Deepseek => "deepseek",
        }
    }
}

/// The markers' text and tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Markers {
    /// `<think>`.
    pub open: String,
    /// `</think>`.
    pub close: String,
    /// `open` as tokens.
    pub open_tokens: Vec<Token>,
    /// `close` as tokens.
    pub close_tokens: Vec<Token>,
}

/// Thinking budgets of `low`, `medium` and `high`, in tokens.
pub const DEFAULT_BUDGETS: [u32; 3] = [256, 1024, 4096];

/// The run's reasoning settings, resolved against the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ThinkSetup {
    /// The markers; `None`: nothing thinks.
    pub markers: Option<Markers>,
    /// Budgets of `low`, `medium`, `high`.
    pub budgets: [u32; 3],
    /// `--chat-template-kwargs`, under each request's own.
    pub kwargs: TemplateKwargs,
}

/// Why a request cannot think as it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasoningFault(pub String);

impl ThinkSetup {
    /// The settings for `model`.
    pub fn new(
        model: &Model,
        format: ReasoningFormat,
        budgets: [u32; 3],
        kwargs: TemplateKwargs,
    ) -> Self {
        let markers = || Markers {
            open: "<think>".into(),
            close: "</think>".into(),
            open_tokens: model.tokenize_piece("<think>"),
            close_tokens: model.tokenize_piece("</think>"),
        };
        // Markers are found in the text, so their tokens must write them: a marker that is a
        // control token (rendered as nothing) could never be seen.
        let written = |m: &Markers| {
            let text = |tokens: &[Token]| {
                let mut bytes = Vec::new();
                for &t in tokens {
                    model.token_bytes(t, &mut bytes);
                }
                bytes
            };
            text(&m.open_tokens) == m.open.as_bytes() && text(&m.close_tokens) == m.close.as_bytes()
        };
        let markers = match format {
            ReasoningFormat::None => None,
            ReasoningFormat::Deepseek => Some(markers()),
            ReasoningFormat::Auto => {
                Some(markers()).filter(|m| m.open_tokens.len() == 1 && m.close_tokens.len() == 1)
            }
        };
        let markers = markers.filter(|m| {
            let ok = written(m);
            if !ok {
                tracing::warn!(
                    "this model's <think> and </think> tokens do not write their text (control \
                     tokens): its thinking cannot be followed, and nothing thinks"
                );
            }
            ok
        });
        Self {
            markers,
            budgets,
            kwargs,
        }
    }

    /// The template switches of a request: the run's, under its own.
    pub fn kwargs_for(&self, ask: &ReasoningAsk) -> TemplateKwargs {
        let mut kwargs = self.kwargs.clone();
        kwargs.extend(ask.template_kwargs.clone());
        kwargs
    }

    /// How a conversation whose rendered prompt is `rendered` thinks; `None` when it answers
    /// at once. It thinks when its prompt opens the block (as DeepSeek-R1's template does) or
    /// when it asks for an effort (then the engine opens the block); a model whose template
    /// does not open it is otherwise left to answer as it writes, its constraint from the
    /// first token.
    ///
    /// # Errors
    /// An effort asked of a model with no markers, or an asked effort whose budget, with the
    /// markers the engine writes, leaves no room for an answer within `max_tokens`.
    pub fn plan(
        &self,
        ask: &ReasoningAsk,
        rendered: &str,
        max_tokens: u32,
    ) -> Result<Option<Arc<ThinkPlan>>, ReasoningFault> {
        let Some(m) = &self.markers else {
            return match ask.effort {
                Some(e) if !e.is_off() => Err(ReasoningFault(format!(
                    "field `reasoning_effort` (`reasoning.effort` on /v1/responses) is {:?}, but \
                     this model has no thinking markers (no `<think>` and `</think>` tokens in \
                     its vocabulary); if it writes <think>...</think> all the same, pass \
                     --reasoning-format deepseek",
                    e.name()
                ))),
                _ => Ok(None),
            };
        };
        let tail = rendered.trim_end();
        // A prompt that closed the block itself (a template's `enable_thinking` off) leaves
        // nothing to think.
        if tail.ends_with(&m.close) {
            return Ok(None);
        }
        let opened_by_prompt = tail.ends_with(&m.open);
        if !opened_by_prompt && ask.effort.is_none() {
            return Ok(None);
        }
        let effort = ask.effort.unwrap_or(Effort::Medium);
        let budget = match effort {
            Effort::None | Effort::Minimal => 0,
            Effort::Low => self.budgets[0],
            Effort::Medium => self.budgets[1],
            Effort::High => self.budgets[2],
        };
        // The markers the engine may write count against max_tokens too.
        let markers = m.close_tokens.len()
            + if opened_by_prompt {
                0
            } else {
                m.open_tokens.len()
            };
        let markers = u32::try_from(markers).unwrap_or(u32::MAX);
        let budget = match ask.effort {
            // The run's default leaves at least half of max_tokens to the answer.
            None => budget.min(max_tokens.saturating_sub(markers) / 2),
            Some(e) if budget.saturating_add(markers) >= max_tokens => {
                return Err(ReasoningFault(format!(
                    "field `reasoning_effort` (`reasoning.effort` on /v1/responses) is {:?}: its \
                     thinking budget of {budget} tokens (--reasoning-budget) and the {markers} \
                     tokens of its markers leave none of max_tokens ({max_tokens}) to the \
                     answer: raise `max_tokens` (or `max_completion_tokens`) above {}, or ask \
                     for less effort",
                    e.name(),
                    budget + markers
                )))
            }
            Some(_) => budget,
        };
        Ok(Some(Arc::new(ThinkPlan {
            open: m.open.clone(),
            close: m.close.clone(),
            open_tokens: m.open_tokens.clone(),
            close_tokens: m.close_tokens.clone(),
            opened_by_prompt,
            budget,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> ThinkSetup {
        ThinkSetup {
            markers: Some(Markers {
                open: "<think>".into(),
                close: "</think>".into(),
                open_tokens: vec![Token(1)],
                close_tokens: vec![Token(2)],
            }),
            budgets: [10, 20, 40],
            kwargs: TemplateKwargs::new(),
        }
    }

    fn ask(effort: Option<Effort>) -> ReasoningAsk {
        ReasoningAsk {
            effort,
            template_kwargs: TemplateKwargs::new(),
        }
    }

    #[test]
    fn efforts_map_to_budgets_and_the_prompt_decides_who_opens() {
        let s = setup();
        let p = s
            .plan(&ask(Some(Effort::Low)), "...<|assistant|>\n<think>\n", 100)
            .unwrap()
            .unwrap();
        assert_eq!((p.budget, p.opened_by_prompt), (10, true));
        let p = s
            .plan(&ask(Some(Effort::High)), "...<|assistant|>\n", 100)
            .unwrap()
            .unwrap();
        assert_eq!((p.budget, p.opened_by_prompt), (40, false));
        let p = s
            .plan(&ask(Some(Effort::None)), "<think>", 100)
            .unwrap()
            .unwrap();
        assert_eq!(p.budget, 0, "none closes at once");
        let p = s.plan(&ask(None), "<think>", 31).unwrap().unwrap();
        assert_eq!(
            p.budget, 15,
            "the default leaves half of max_tokens, less the close marker, to the answer"
        );
        assert_eq!(
            s.plan(&ask(None), "<|assistant|>", 100).unwrap(),
            None,
            "a block the prompt did not open, and no effort asked: it answers at once"
        );
        assert_eq!(
            s.plan(&ask(Some(Effort::Low)), "<think>\n\n</think>\n\n", 100)
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_budget_over_max_tokens_and_thinking_without_markers_are_refused() {
        let e = setup()
            .plan(&ask(Some(Effort::Medium)), "", 20)
            .unwrap_err();
        assert!(e.0.contains("max_tokens (20)"), "{e:?}");
        // 20 thinking tokens and the 2 marker tokens the engine writes: 22 leave no answer.
        assert!(setup().plan(&ask(Some(Effort::Medium)), "", 22).is_err());
        assert!(setup().plan(&ask(Some(Effort::Medium)), "", 23).is_ok());
        let none = ThinkSetup::default();
        let e = none.plan(&ask(Some(Effort::Low)), "", 100).unwrap_err();
        assert!(e.0.contains("--reasoning-format deepseek"), "{e:?}");
        assert_eq!(none.plan(&ask(Some(Effort::None)), "", 100).unwrap(), None);
        assert_eq!(none.plan(&ask(None), "", 100).unwrap(), None);
    }
}
