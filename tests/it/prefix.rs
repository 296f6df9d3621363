//! The engine's prefix sharing at the level of logits: a prefix forked by sequence copy gives
//! bit-identical logits to the same prefix computed in the request's own sequence.

use infer_batch::engine::{Model, ModelSettings, Session, SessionSettings, Token};
use infer_batch::prompt::PromptBuilder;
use infer_batch::request::Message;
use infer_batch::scheduler::chunk_end;

use crate::harness::{model_lock, model_path, profile, rubric};

const CHUNK: usize = 64;

fn load() -> Model {
    Model::load(&ModelSettings {
        path: model_path(),
        gpu_layers: 0,
        verbose: false,
    })
    .unwrap()
}

fn session(model: &Model) -> Session<'_> {
    model
        .new_session(&SessionSettings {
            n_ctx: 1024,
            n_batch: CHUNK as u32,
            n_seq_max: 4,
            threads: 2,
            flash_attn: Default::default(),
            kv_unified: true,
        })
        .unwrap()
}

/// Decodes `tokens[from..to]` into `seq` with the scheduler's chunk cuts; returns the logits of
/// the last token.
fn feed(
    s: &mut Session<'_>,
    tokens: &[Token],
    split: usize,
    from: usize,
    to: usize,
    seq: i32,
) -> Vec<f32> {
    let mut pos = from;
    let mut last_row = None;
    while pos < to {
        let end = chunk_end(pos, split, tokens.len(), CHUNK).min(to);
        for (p, &t) in tokens.iter().enumerate().take(end).skip(pos) {
            let want = p + 1 == to;
            let row = s.push(t, p as u32, seq, want).unwrap();
            if want {
                last_row = Some(row);
            }
        }
        s.decode().unwrap();
        pos = end;
    }
    last_row.map(|r| s.logits(r)).unwrap_or_default()
}

#[test]
fn forked_prefix_gives_bit_identical_logits() {
    let _lock = model_lock();
    let model = load();
    let mut prompts = PromptBuilder::new(&model);
    let messages = [
        Message {
            role: "system".into(),
            content: rubric(150),
        },
        Message {
            role: "user".into(),
            content: profile(4),
        },
    ];
    let prompt = prompts.build(&messages).unwrap();
    let (tokens, split) = (&prompt.tokens, prompt.shared_len);
    assert!(
        split > 2 * CHUNK,
        "the prefix spans several chunks ({split})"
    );

    // The request computes its own prefix, then its suffix, in its own sequence.
    let mut own = session(&model);
    feed(&mut own, tokens, split, 0, split, 0);
    let expected = feed(&mut own, tokens, split, split, tokens.len(), 0);

    // The prefix is computed once in sequence 3 and forked to sequence 0 by sequence copy.
    let mut shared = session(&model);
    feed(&mut shared, tokens, split, 0, split, 3);
    shared.share_prefix(3, 0);
    let got = feed(&mut shared, tokens, split, split, tokens.len(), 0);

    assert_eq!(expected.len(), got.len());
    assert!(!got.is_empty());
    let same_bits = expected
        .iter()
        .zip(&got)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same_bits, "forked prefix changed the logits");

    // A second fork of the same prefix, after the first slot is cleared, gives the same again.
    shared.clear_seq(0);
    shared.share_prefix(3, 1);
    let again = feed(&mut shared, tokens, split, split, tokens.len(), 1);
    assert!(expected
        .iter()
        .zip(&again)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
