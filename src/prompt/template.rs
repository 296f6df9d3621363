//! Chat templates: how a conversation becomes prompt text.
//!
//! A template is either Jinja, rendered with minijinja the way Hugging Face renders chat
//! templates (the GGUF's own `tokenizer.chat_template`, or a file given by `--chat-template`),
//! or one of llama.cpp's built-in formatters, named by `--chat-template` (`gemma`, `chatml`,
//! ...) and applied by the engine.

use std::path::{Path, PathBuf};

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::digest::{sha256_parts, short_hex};
use crate::formats::message::Message;

/// Where the chat template comes from, as `--chat-template` says.
/// `chat_template_kwargs`: extra variables a chat template reads (Qwen3's
/// `enable_thinking`, ...).
pub type TemplateKwargs = serde_json::Map<String, serde_json::Value>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateChoice {
    /// The GGUF's own template (no `--chat-template`).
    Gguf,
    /// One of llama.cpp's built-in templates, by name.
    Builtin(String),
    /// A Jinja file.
    File(PathBuf),
}

impl TemplateChoice {
    /// Reads `--chat-template`: an existing file is a Jinja file, anything else a built-in name.
    pub fn from_arg(arg: Option<&str>) -> Self {
        match arg {
            None => Self::Gguf,
            Some(a) if Path::new(a).is_file() => Self::File(PathBuf::from(a)),
            Some(name) => Self::Builtin(name.to_owned()),
        }
    }

    /// What the manifest records: the choice, and a file's content hash (its path may move).
    pub fn identity(&self) -> String {
        match self {
            Self::Gguf => "gguf".into(),
            Self::Builtin(name) => format!("llama.cpp:{name}"),
            Self::File(path) => match std::fs::read(path) {
                Ok(bytes) => format!("file:{}", short_hex(&sha256_parts([bytes.as_slice()]), 8)),
                Err(_) => format!("file:{}", path.display()),
            },
        }
    }
}

/// A Jinja chat template, compiled once.
pub struct JinjaTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    identity: String,
}

/// A message as templates see it.
#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'a str,
    content: &'a str,
}

impl JinjaTemplate {
    /// Compiles `source`; `origin` names it in messages and in the identity (`gguf`, a path).
    ///
    /// # Errors
    /// The template's syntax error, with its line.
    pub fn new(
        source: &str,
        origin: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        // As Hugging Face's renderer: block tags leave no stray newlines or indentation.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string and dict methods (`.strip()`, `.items()`, ...) that templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| format!("chat template ({origin}) does not compile: {e:#}"))?;
        let digest = sha256_parts([source.as_bytes()]);
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            identity: format!("jinja:{origin}:{}", short_hex(&digest, 8)),
        })
    }

    /// Renders a conversation; `add_generation_prompt` opens the assistant's turn.
    ///
    /// # Errors
    /// What the template raised, or what it could not evaluate.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &TemplateKwargs,
    ) -> Result<String, String> {
        let messages: Vec<TemplateMessage<'_>> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: &m.role,
                content: &m.content,
            })
            .collect();
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                // The template's own switches (`enable_thinking`, ...); ours above win.
                ..minijinja::Value::from_serialize(kwargs)
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("raised").to_owned(),
                _ => format!("{e:#}"),
            })
    }

    /// What the manifest records: the source kind and a hash of the template text.
    pub fn identity(&self) -> &str {
        &self.identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nDefault<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn m(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_a_hugging_face_template() {
        let t = JinjaTemplate::new(CHATML, "test", "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&[m("system", "S"), m("user", "U")], true, &TemplateKwargs::new()).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&[m("user", "U")], false, &TemplateKwargs::new())
                .unwrap(),
            "<|im_start|>system\nDefault<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
        assert!(t.identity().starts_with("jinja:test:"));
    }

    #[test]
    fn template_kwargs_reach_the_template_and_cannot_replace_the_messages() {
        let source = "{% if enable_thinking is defined and not enable_thinking %}[off]{% endif %}{{ messages[0].content }}";
        let t = JinjaTemplate::new(source, "test", "", "").unwrap();
        let mut kwargs = TemplateKwargs::new();
        assert_eq!(t.render(&[m("user", "U")], true, &kwargs).unwrap(), "U");
        kwargs.insert("enable_thinking".into(), false.into());
        kwargs.insert("messages".into(), serde_json::json!([{"content": "X"}]));
        assert_eq!(
            t.render(&[m("user", "U")], true, &kwargs).unwrap(),
            "[off]U"
        );
    }

    #[test]
    fn globals_python_methods_and_raised_errors() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}{{ raise_exception('no assistant turns here') }}{% endif %}[{{ m.content.strip() | upper }}]{% endfor %}{{ eos_token }}";
        let t = JinjaTemplate::new(source, "test", "<bos>", "<eos>").unwrap();
        assert_eq!(
            t.render(&[m("user", "  hi ")], true, &TemplateKwargs::new())
                .unwrap(),
            "<bos>[HI]<eos>"
        );
        let e = t
            .render(&[m("assistant", "x")], true, &TemplateKwargs::new())
            .unwrap_err();
        assert!(e.contains("no assistant turns here"), "{e}");
    }

    #[test]
    fn a_broken_template_is_refused_with_its_origin() {
        let e = JinjaTemplate::new("{% for %}", "my.jinja", "", "")
            .err()
            .unwrap();
        assert!(e.contains("my.jinja"), "{e}");
    }

    #[test]
    fn identity_follows_the_source() {
        let a = JinjaTemplate::new("{{ 1 }}", "f", "", "").unwrap();
        let b = JinjaTemplate::new("{{ 2 }}", "f", "", "").unwrap();
        assert_ne!(a.identity(), b.identity());
    }

    #[test]
    fn a_choice_is_a_file_when_one_exists() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.jinja");
        std::fs::write(&f, "x").unwrap();
        assert_eq!(
            TemplateChoice::from_arg(Some(f.to_str().unwrap())),
            TemplateChoice::File(f)
        );
        assert_eq!(
            TemplateChoice::from_arg(Some("gemma")),
            TemplateChoice::Builtin("gemma".into())
        );
        assert_eq!(TemplateChoice::from_arg(None), TemplateChoice::Gguf);
    }
}
