//! The shared prefix of raw-text prompts (`/v1/completions`), which name no system part: the
//! longest leading text that all of a file's completions prompts have in common, cut after its
//! last line break. A few-shot header common to every prompt is then computed once; a file with
//! a single such prompt, or prompts with no common line, shares nothing.
//!
//! The whole file is read for it, whatever the shard, so every shard, a resume and a run of the
//! whole file split the prompts alike and report the same `cached_tokens`.

/// The common leading text of the prompts seen so far.
#[derive(Debug, Default)]
pub struct CommonText {
    text: Option<String>,
    prompts: u64,
}

impl CommonText {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes in one more prompt.
    pub fn add(&mut self, prompt: &str) {
        self.prompts += 1;
        match &mut self.text {
            None => self.text = Some(prompt.to_owned()),
            Some(text) => {
                let n = common_len(text, prompt);
                text.truncate(n);
            }
        }
    }

    /// The shared prefix: the common text up to and including its last line break. `None` for
    /// fewer than two prompts, or none in common.
    pub fn finish(self) -> Option<String> {
        if self.prompts < 2 {
            return None;
        }
        let mut text = self.text?;
        let cut = text.rfind('\n')? + 1;
        text.truncate(cut);
        (!text.trim().is_empty()).then_some(text)
    }
}

/// Bytes of the longest common prefix of `a` and `b`, on a character boundary.
fn common_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .take_while(|((_, x), y)| x == y)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(prompts: &[&str]) -> Option<String> {
        let mut c = CommonText::new();
        for p in prompts {
            c.add(p);
        }
        c.finish()
    }

    #[test]
    fn the_common_text_is_cut_after_its_last_line_break() {
        let header = "Grade each answer.\nQ: 2+2\nA: 4\n\n";
        let a = format!("{header}Q: 3+3\nA:");
        let b = format!("{header}Q: 3+5\nA:");
        // "Q: 3+" is common too, but not a whole line.
        assert_eq!(common(&[&a, &b]).as_deref(), Some(header));
        assert_eq!(
            common(&[&a, &b, "Grade each answer.\nZ"]).as_deref(),
            Some("Grade each answer.\n")
        );
    }

    #[test]
    fn one_prompt_or_nothing_in_common_shares_nothing() {
        assert_eq!(common(&[]), None);
        assert_eq!(common(&["Header\nQ: 1"]), None);
        assert_eq!(common(&["Header\nQ: 1", "Other\nQ: 1"]), None);
        assert_eq!(
            common(&["no line break here 1", "no line break here 2"]),
            None
        );
        assert_eq!(
            common(&["\n\nx", "\n\ny"]),
            None,
            "blank lines alone are not worth a prefix"
        );
    }

    #[test]
    fn multi_byte_characters_are_never_split() {
        assert_eq!(common_len("añb", "añc"), 3);
        assert_eq!(common_len("ñ", "ó"), 0);
        assert_eq!(common(&["é\nà1", "é\nà2"]).as_deref(), Some("é\n"));
    }
}
