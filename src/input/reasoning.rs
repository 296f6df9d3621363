//! What a request asks of a reasoning model: how hard to think (`reasoning_effort` on chat,
//! `reasoning.effort` on Responses) and the chat template's own switches
//! (`chat_template_kwargs`, as vLLM and llama-server name them).

use serde_json::Value;

use crate::formats::line_error::ErrorCode;
use crate::input::fields::{Fault, Honoured};
use crate::prompt::template::TemplateKwargs;

/// OpenAI's reasoning efforts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effort {
    /// No thinking.
    None,
    /// As little as the model allows: no thinking here.
    Minimal,
    /// The `low` budget of `--reasoning-budget`.
    Low,
    /// The `medium` budget.
    Medium,
    /// The `high` budget.
    High,
}

impl Effort {
    const ALL: [(&'static str, Self); 5] = [
        ("none", Self::None),
        ("minimal", Self::Minimal),
        ("low", Self::Low),
        ("medium", Self::Medium),
        ("high", Self::High),
    ];

    /// The effort named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|&(_, e)| e)
    }

    /// Its API name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, e)| *e == self)
            .map_or("medium", |(n, _)| n)
    }

    /// Whether it asks for no thinking at all.
    pub fn is_off(self) -> bool {
        matches!(self, Self::None | Self::Minimal)
    }
}

/// A request's reasoning settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReasoningAsk {
    /// The effort asked; `None`: the run's default.
    pub effort: Option<Effort>,
    /// The request's own template switches, over the run's `--chat-template-kwargs`.
    pub template_kwargs: TemplateKwargs,
}

fn fault(message: String) -> Fault {
    (ErrorCode::InvalidParameter, message)
}

fn effort(value: &Value, field: &str) -> Result<Option<Effort>, Fault> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Effort::parse(s).map(Some).ok_or_else(|| {
            fault(format!(
                "field `{field}` is {s:?}; expected one of none, minimal, low, medium, high"
            ))
        }),
        v => Err(fault(format!(
            "field `{field}` is {v}; expected one of none, minimal, low, medium, high"
        ))),
    }
}

fn kwargs(body: &Honoured) -> Result<TemplateKwargs, Fault> {
    match body.get("chat_template_kwargs") {
        None | Some(Value::Null) => Ok(TemplateKwargs::new()),
        Some(Value::Object(map)) => Ok(map.clone()),
        Some(v) => Err(fault(format!(
            "field `chat_template_kwargs` is {v}; expected an object of the template's \
             variables, such as {{\"enable_thinking\": false}}"
        ))),
    }
}

/// `reasoning_effort` and `chat_template_kwargs` of a chat body.
///
/// # Errors
/// An effort that is not one of OpenAI's, or kwargs that are not an object.
pub fn parse_chat(body: &Honoured) -> Result<ReasoningAsk, Fault> {
    Ok(ReasoningAsk {
        effort: match body.get("reasoning_effort") {
            Some(v) => effort(v, "reasoning_effort")?,
            None => None,
        },
        template_kwargs: kwargs(body)?,
    })
}

/// `reasoning` (`effort`; a summary is not produced) and `chat_template_kwargs` of a
/// Responses body.
///
/// # Errors
/// As [`parse_chat`]; and a `reasoning` that is not an object or asks for a summary.
pub fn parse_responses(body: &Honoured) -> Result<ReasoningAsk, Fault> {
    let effort = match body.get("reasoning") {
        None | Some(Value::Null) => None,
        Some(Value::Object(r)) => {
            for (k, v) in r {
                match k.as_str() {
                    "effort" => {}
                    "summary" | "generate_summary" if v.is_null() => {}
                    "summary" | "generate_summary" => {
                        return Err(fault(format!(
                            "field `reasoning.{k}`: no summary of the thinking is produced; the \
                             whole thinking comes back as a `reasoning` output item; remove it"
                        )))
                    }
                    other => {
                        return Err(fault(format!(
                            "field `reasoning.{other}` is not known; `reasoning` takes `effort`"
                        )))
                    }
                }
            }
            match r.get("effort") {
                Some(v) => effort(v, "reasoning.effort")?,
                None => None,
            }
        }
        Some(v) => {
            return Err(fault(format!(
                "field `reasoning` is {v}; expected an object such as {{\"effort\": \"low\"}}"
            )))
        }
    };
    Ok(ReasoningAsk {
        effort,
        template_kwargs: kwargs(body)?,
    })
}
