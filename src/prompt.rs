//! Applies the chat template and splits a prompt's tokens into a shared prefix and its own suffix.
//!
//! The prefix is what the leading system messages render to. Tokenizing the prefix alone can end
//! on a different token boundary than tokenizing the whole prompt (a merge across the seam), so
//! the shared part is the longest common token prefix of the two: prefix + suffix always equals
//! the whole prompt's tokens, token for token.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::digest::{sha256_parts, short_hex};
use crate::engine::{EngineError, Model, Token};
use crate::request::Message;

/// Identity of a shared prefix: the SHA-256 of its exact token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixKey(pub [u8; 32]);

impl PrefixKey {
    /// The key of a token sequence.
    pub fn of(tokens: &[Token]) -> Self {
        let mut h = Sha256::new();
        for t in tokens {
            h.update(t.0.to_le_bytes());
        }
        Self(h.finalize().into())
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

/// Renders and splits prompts, remembering the tokens of each distinct system prompt so a
/// rubric shared by a million requests is tokenized once.
pub struct PromptBuilder<'m> {
    model: &'m Model,
    memo: HashMap<[u8; 32], Vec<Token>>,
}

impl<'m> PromptBuilder<'m> {
    /// A builder for prompts of `model`.
    pub fn new(model: &'m Model) -> Self {
        Self {
            model,
            memo: HashMap::new(),
        }
    }

    /// Renders, tokenizes and splits one conversation. The split is made in every mode: the
    /// naive baseline uses it for its chunk cuts, without sharing anything.
    ///
    /// # Errors
    /// [`EngineError::Template`] when the template cannot be applied.
    pub fn build(&mut self, messages: &[Message]) -> Result<SplitPrompt, EngineError> {
        let tokens = self
            .model
            .tokenize(&self.model.render_chat(messages, true)?);
        let system = leading_system(messages);
        if system.is_empty() {
            return Ok(SplitPrompt {
                tokens,
                shared_len: 0,
            });
        }
        let key = system_key(system);
        if !self.memo.contains_key(&key) {
            if self.memo.len() >= PREFIX_MEMO_CAPACITY {
                self.memo.clear();
            }
            let prefix = self.model.tokenize(&self.model.render_chat(system, false)?);
            self.memo.insert(key, prefix);
        }
        let shared_len = shared_len(&self.memo[&key], &tokens);
        Ok(SplitPrompt { tokens, shared_len })
    }
}

/// A hash of the system messages' roles and texts, unambiguous about their boundaries.
fn system_key(system: &[Message]) -> [u8; 32] {
    sha256_parts(
        system
            .iter()
            .flat_map(|m| [m.role.as_bytes(), m.content.as_bytes()]),
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
            system_key(&[m("ab"), m("c")]),
            system_key(&[m("a"), m("bc")])
        );
    }
}
