//! The engine's prefix sharing at the level of logits: a prefix forked by sequence copy, or
//! saved and restored through a state file's payload, gives bit-identical logits to the same
//! prefix computed in the request's own sequence. Checked on both architectures the suite
//! carries (SmolLM2's plain KV cache, Gemma 3's interleaved sliding-window cache) and in both
//! KV layouts (one unified cache, a stream per sequence).

use std::path::Path;

use infer_batch::engine::state::MemoryKind;
use infer_batch::engine::{Engine, Model, ModelSettings, Session, SessionSettings, Token};
use infer_batch::formats::message::Message;
use infer_batch::prompt::template::TemplateChoice;
use infer_batch::prompt::{shared_len, PromptBuilder, Renderer};
use infer_batch::schedule::scheduler::chunk_end;

use crate::harness::{gemma_path, model_lock, model_path, profile, rubric};

const CHUNK: usize = 128;
/// Sequences: 0 and 1 are slots, 2 takes restored prefixes, 3 holds the computed prefix.
const SEQS: u32 = 4;

fn load(path: &Path) -> Model {
    Model::load(&ModelSettings {
        path: path.to_owned(),
        gpu_layers: 0,
        verbose: false,
    })
    .unwrap()
}

fn session(model: &Model, kv_unified: bool) -> Session<'_> {
    model
        .new_session(&SessionSettings {
            n_ctx: 2048 * SEQS,
            n_batch: CHUNK as u32,
            n_seq_max: SEQS,
            threads: 2,
            flash_attn: infer_batch::engine::FlashAttn::Off,
            kv_types: infer_batch::engine::KvTypes::default(),
            kv_unified,
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

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    !a.is_empty() && a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Fork, second fork, and save-then-restore (into a fresh session, and at another sequence)
/// all give the logits of the prefix computed in the request's own sequence.
fn fork_and_restore_match_own_prefix(model: &Model, tokens: &[Token], split: usize) {
    for kv_unified in [true, false] {
        let layout = if kv_unified { "unified" } else { "streams" };
        let mut own = session(model, kv_unified);
        feed(&mut own, tokens, split, 0, split, 0);
        let expected = feed(&mut own, tokens, split, split, tokens.len(), 0);

        let mut shared = session(model, kv_unified);
        feed(&mut shared, tokens, split, 0, split, 3);
        let state = shared
            .seq_state(3)
            .expect("the state of this layout is saved");
        shared.share_prefix(3, 0).unwrap();
        let got = feed(&mut shared, tokens, split, split, tokens.len(), 0);
        assert!(
            same_bits(&expected, &got),
            "{layout}: fork changed the logits"
        );

        shared.clear_seq(0).unwrap();
        shared.share_prefix(3, 1).unwrap();
        let again = feed(&mut shared, tokens, split, split, tokens.len(), 1);
        assert!(
            same_bits(&expected, &again),
            "{layout}: second fork differs"
        );

        // Restored into another session (the other layout's state form is the same), at
        // sequence 2, then forked to a slot as a run does.
        let mut restored = session(model, kv_unified);
        restored.restore_seq_state(2, &state).unwrap();
        restored.share_prefix(2, 1).unwrap();
        let back = feed(&mut restored, tokens, split, split, tokens.len(), 1);
        assert!(
            same_bits(&expected, &back),
            "{layout}: restored prefix differs"
        );

        // A state cut short is refused before llama.cpp sees it.
        let mut broken = session(model, kv_unified);
        assert!(broken
            .restore_seq_state(2, &state[..state.len() - 1])
            .is_err());
    }
}

#[test]
fn forked_and_restored_prefix_gives_bit_identical_logits() {
    let _lock = model_lock();
    let model = load(&model_path());
    assert_eq!(model.memory_kind(), MemoryKind::Kv);
    let renderer = Renderer::for_model(&model, &TemplateChoice::Gguf).unwrap();
    let mut prompts = PromptBuilder::new(&model, &renderer, None, Default::default());
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
    let prompt = prompts.build(&messages, &Default::default()).unwrap();
    assert!(
        prompt.shared_len > CHUNK,
        "the prefix spans chunks ({})",
        prompt.shared_len
    );
    fork_and_restore_match_own_prefix(&model, &prompt.tokens, prompt.shared_len);
}

#[test]
fn sliding_window_prefix_forks_saves_and_restores_exactly() {
    let _lock = model_lock();
    let model = load(&gemma_path());
    assert_eq!(model.memory_kind(), MemoryKind::KvSwa);
    // The GGUF has no chat template: raw text is enough for the engine. The prefix is longer
    // than the 512-token window, so its state holds masked-out cells the window drops.
    let prefix = model.tokenize(&rubric(520));
    let tokens = model.tokenize(&format!("{}{}", rubric(520), profile(4)));
    let split = shared_len(&prefix, &tokens);
    assert!(split > 600, "the prefix outgrows the window ({split})");
    fork_and_restore_match_own_prefix(&model, &tokens, split);
}
