//! The scheduler's decisions, driven through the engine seam by [`FakeEngine`]: no model file.
//! Each answer is checked against [`expected`], which computes it from the prompt alone, so a
//! request that saw a batch-mate's cells, lost its prefix, or kept a dummy row shows up as a
//! different answer or a failed decode.

use std::collections::{BTreeSet, VecDeque};

use super::admission::{admit_all, Apart, Feed, Intake, LoopEnd, Piece};
use super::fake::{
    blocks_of_4, by_depth, differs_at, gpu_like, hash_pick, passes, uniform, FakeEngine, Kernel,
    Pick, Row, EOS,
};
use super::groups::DecodeGroups;
use super::job::{GenParams, Job};
use super::scheduler::{Admission, Exact, Outcome, Scheduler, EXACT_MAX_ROWS};
use super::twins::{Release, Twins};
use crate::engine::probe::{DEEP, SHALLOW};
use crate::engine::{FlashAttn, KvTypes, SamplerSpec, SessionSettings, Token, Vocab};
use crate::formats::line_error::{ErrorCode, LineError};
use crate::formats::result::{ComputationKey, Endpoint, StopReason};
use crate::input::request::{Prompt, Request};
use crate::input::sampling::SamplingParams;
use crate::prompt::SplitPrompt;
use crate::report::metrics::Metrics;
use crate::schedule::reasoning::ThinkPlan;

fn job(line: u64, prefix: &[i32], own: &[i32], n: u32, max_tokens: u32) -> Job {
    let tokens: Vec<Token> = prefix.iter().chain(own).map(|&t| Token(t)).collect();
    Job {
        line,
        custom_id: format!("req-{line}"),
        prompt: SplitPrompt {
            tokens,
            shared_len: prefix.len(),
        },
        params: GenParams {
            sampler: SamplerSpec {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
                min_p: 0.0,
                seed: u32::try_from(line).unwrap() * 17,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
                penalty_window: max_tokens,
            },
            max_tokens,
            stop: Vec::new(),
            n,
            logprobs: None,
            constraint: None,
            think: None,
        },
        key: ComputationKey([u8::try_from(line % 256).unwrap(); 32]),
        endpoint: Endpoint::Chat,
    }
}

/// What each choice of `job` must say when its answer depends on its own prompt alone.
fn expected(job: &Job, pick: &dyn Fn(&[Token], u32) -> Token) -> Vec<(String, StopReason)> {
    (0..job.params.n)
        .map(|k| {
            let seed = job.params.sampler.for_choice(k).seed;
            let mut context = job.prompt.tokens.clone();
            let mut text = Vec::new();
            for g in 1..=job.params.max_tokens {
                let t = pick(&context, seed);
                if t == EOS {
                    return (String::from_utf8(text).unwrap(), StopReason::Stop);
                }
                super::fake::FakeVocab.token_bytes(t, &mut text);
                context.push(t);
                let s = String::from_utf8(text.clone()).unwrap();
                if let Some(at) = job.params.stop.iter().filter_map(|p| s.find(p)).min() {
                    return (s[..at].to_owned(), StopReason::Stop);
                }
                if g == job.params.max_tokens {
                    return (s, StopReason::Length);
                }
            }
            (String::new(), StopReason::Length)
        })
        .collect()
}

/// The answers of a run, by line: each choice's text and finish reason, or the error code.
type Answers = Vec<(u64, Result<Vec<(String, StopReason)>, ErrorCode>)>;

fn answers(outcomes: &[Outcome]) -> Answers {
    let mut out: Answers = outcomes
        .iter()
        .map(|o| match o {
            Ok(c) => (
                c.line,
                Ok(c.choices
                    .iter()
                    .map(|ch| (ch.content.clone(), ch.reason))
                    .collect()),
            ),
            Err(e) => (e.line, Err(e.code)),
        })
        .collect();
    out.sort_by_key(|a| a.0);
    out
}

struct Setup {
    parallel: usize,
    prefixes: usize,
    share: bool,
    exact: Option<Exact>,
}

impl Setup {
    fn scheduler<'s>(&self, engine: &'s mut FakeEngine) -> Scheduler<'s, FakeEngine> {
        Scheduler::new(
            engine,
            self.parallel,
            self.prefixes,
            self.share,
            None,
            self.exact,
        )
    }
}

const EXACT_ANY: Setup = Setup {
    parallel: 2,
    prefixes: 1,
    share: true,
    exact: Some(Exact {
        groups: DecodeGroups::Any,
        max_rows: EXACT_MAX_ROWS,
        findings: None,
        probe_time: None,
    }),
};

/// Exact mode with rows independent of their batch-mates, at `parallel` slots.
fn exact_any(parallel: usize) -> Setup {
    Setup {
        parallel,
        ..EXACT_ANY
    }
}

/// Runs `jobs` to the end as the run loop does: admit while a slot is free, then step.
fn run_all(engine: &mut FakeEngine, setup: &Setup, jobs: Vec<Job>) -> (Vec<Outcome>, Metrics) {
    let mut s = setup.scheduler(engine);
    let mut queue: VecDeque<Job> = jobs.into();
    let mut done = Vec::new();
    for _ in 0..10_000 {
        while s.has_idle_slot() {
            let Some(job) = queue.pop_front() else { break };
            match s.admit(job) {
                Ok(Admission::Started) => {}
                Ok(Admission::Wait(job)) => {
                    queue.push_front(*job);
                    break;
                }
                Err(e) => done.push(Err(e)),
            }
        }
        if s.is_idle() && queue.is_empty() {
            return (done, s.metrics.clone());
        }
        s.step(&mut done);
    }
    panic!("the scheduler did not finish");
}

fn expected_all(jobs: &[Job]) -> Answers {
    jobs.iter()
        .map(|j| (j.line, Ok(expected(j, &hash_pick))))
        .collect()
}

fn sample_jobs() -> Vec<Job> {
    vec![
        job(1, &[11, 12, 13, 14], &[21, 22], 1, 12),
        job(2, &[11, 12, 13, 14], &[31, 32, 33], 1, 9),
        job(3, &[], &[41, 42], 1, 15),
        job(4, &[11, 12, 13, 14], &[51, 52, 53, 54, 55], 1, 12),
    ]
}

#[test]
fn admission_waits_for_a_free_slot_and_returns_the_job() {
    let mut engine = FakeEngine::new(64);
    let mut s = Scheduler::new(&mut engine, 1, 1, true, None, EXACT_ANY.exact);
    assert!(matches!(
        s.admit(job(1, &[], &[5, 6], 1, 4)),
        Ok(Admission::Started)
    ));
    assert!(!s.has_idle_slot());
    match s.admit(job(2, &[], &[7], 1, 4)) {
        Ok(Admission::Wait(back)) => assert_eq!((back.line, back.custom_id.as_str()), (2, "req-2")),
        _ => panic!("a second job must wait while the only slot is busy"),
    }
    let mut done = Vec::new();
    while !s.is_idle() {
        s.step(&mut done);
    }
    assert_eq!(done.len(), 1);
    assert!(matches!(
        s.admit(job(2, &[], &[7], 1, 4)),
        Ok(Admission::Started)
    ));
}

#[test]
fn every_answer_depends_on_its_own_prompt_only() {
    let jobs = sample_jobs();
    let want = expected_all(&jobs);
    for parallel in [1, 2, 4] {
        let setup = exact_any(parallel);
        let (done, _) = run_all(&mut FakeEngine::new(64), &setup, jobs.clone());
        assert_eq!(answers(&done), want, "--parallel {parallel}");
    }
    // Mixed batches (no exact mode) share calls, never cells.
    let mixed = Setup {
        exact: None,
        ..EXACT_ANY
    };
    let (done, _) = run_all(&mut FakeEngine::new(64), &mixed, jobs);
    assert_eq!(answers(&done), want);
}

#[test]
fn a_shared_prefix_is_computed_once_and_counted_as_cached() {
    let jobs = sample_jobs();
    let (done, metrics) = run_all(&mut FakeEngine::new(64), &EXACT_ANY, jobs.clone());
    // The 4-token prefix once, then each request's own tokens.
    assert_eq!(metrics.prompt_tokens_computed, 4 + 2 + 3 + 2 + 5);
    for c in done.iter().flatten() {
        let cached = if c.line == 3 { 0 } else { 4 };
        assert_eq!(c.usage.cached_tokens, cached, "line {}", c.line);
    }
    let naive = Setup {
        share: false,
        ..EXACT_ANY
    };
    let (alone, metrics) = run_all(&mut FakeEngine::new(64), &naive, jobs);
    assert_eq!(metrics.prompt_tokens_computed, 6 + 7 + 2 + 9);
    assert_eq!(answers(&alone), answers(&done));
}

#[test]
fn choices_fork_from_one_prompt_into_reserved_slots() {
    let mut engine = FakeEngine::new(64);
    let three = job(1, &[], &[5, 6, 7, 8, 9], 3, 10);
    let mut s = Scheduler::new(&mut engine, 3, 1, true, None, EXACT_ANY.exact);
    assert!(matches!(s.admit(three.clone()), Ok(Admission::Started)));
    // The other two slots are reserved for the forks, not free for another request.
    assert!(!s.has_idle_slot());
    let mut done = Vec::new();
    while !s.is_idle() {
        s.step(&mut done);
    }
    assert_eq!(
        s.metrics.prompt_tokens_computed, 5,
        "the prompt is computed once"
    );
    drop(s);
    assert_eq!(engine.shares, vec![(0, 1), (0, 2)]);
    assert_eq!(answers(&done), vec![(1, Ok(expected(&three, &hash_pick)))]);
    let texts: Vec<_> = expected(&three, &hash_pick);
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "choices draw with their own seeds"
    );
}

#[test]
fn a_request_with_more_choices_than_free_slots_waits() {
    let jobs = vec![job(1, &[], &[5, 6], 1, 6), job(2, &[], &[7, 8], 2, 6)];
    let mut engine = FakeEngine::new(64);
    let mut s = Scheduler::new(&mut engine, 2, 1, true, None, EXACT_ANY.exact);
    assert!(matches!(s.admit(jobs[0].clone()), Ok(Admission::Started)));
    assert!(s.has_idle_slot());
    assert!(matches!(s.admit(jobs[1].clone()), Ok(Admission::Wait(_))));
    drop(s);
    let (done, _) = run_all(&mut FakeEngine::new(64), &EXACT_ANY, jobs.clone());
    assert_eq!(answers(&done), expected_all(&jobs));
}

#[test]
fn choices_beyond_the_slots_run_in_waves_with_the_same_answers() {
    let jobs = vec![
        job(1, &[11, 12, 13], &[5, 6], 5, 7),
        job(2, &[11, 12, 13], &[7, 8, 9], 1, 7),
        job(3, &[], &[10, 11], 3, 5),
    ];
    let want = expected_all(&jobs);
    for parallel in [1, 2, 3, 5] {
        let mut engine = FakeEngine::new(64);
        let (done, metrics) = run_all(&mut engine, &exact_any(parallel), jobs.clone());
        assert_eq!(answers(&done), want, "--parallel {parallel}");
        // The prefix once; each request's own part once per wave.
        let waves = |n: usize| n.div_ceil(parallel) as u64;
        assert_eq!(
            metrics.prompt_tokens_computed,
            3 + 2 * waves(5) + 3 + 2 * waves(3),
            "--parallel {parallel}"
        );
        for c in done.iter().flatten() {
            let own = c.usage.prompt_tokens - c.usage.cached_tokens;
            assert_eq!(c.usage.prompt_tokens, own + if c.line == 3 { 0 } else { 3 });
        }
    }
}

#[test]
fn a_failure_in_a_later_wave_fails_the_request_once_and_frees_its_slots() {
    let jobs = vec![job(1, &[], &[5, 6], 4, 6), job(2, &[], &[7, 8], 1, 6)];
    let mut engine = FakeEngine::new(64);
    // The second wave's prompt: the second time request 1's last prompt token is decoded.
    let mut prompts = 0;
    engine.fail_when = Some(Box::new(move |rows: &[Row]| {
        let hit = rows.iter().any(|r| r.token == Token(6) && r.pos == 1);
        prompts += usize::from(hit);
        hit && prompts == 2
    }));
    let (done, _) = run_all(&mut engine, &exact_any(2), jobs.clone());
    let mut want = expected_all(&jobs);
    want[0].1 = Err(ErrorCode::EngineError);
    assert_eq!(answers(&done), want);
    assert_eq!(done.len(), 2, "one line per request");
    for seq in 0..3 {
        assert!(engine.cells(seq).is_empty(), "sequence {seq} was freed");
    }
}

/// Scripted kernels, by name.
type Kernels = fn() -> Kernel;

/// A fake with `kernel`, the exact mode its probe finds (the batch holds 64 tokens, so a GPU
/// run probes up to 64 rows, a CPU run up to 32), and the probe's calls forgotten.
fn probed(kernel: Kernels, gpu: bool, force_fixed: bool) -> (FakeEngine, Exact) {
    let mut engine = FakeEngine::new(64);
    engine.kernel = kernel();
    let exact = Exact::probe(&mut engine, Exact::max_rows(gpu, 64), 10, gpu, force_fixed).unwrap();
    for seq in 0..=64 {
        assert!(
            engine.cells(seq).is_empty(),
            "the probe left sequence {seq} empty"
        );
    }
    engine.calls.clear();
    (engine, exact)
}

#[test]
fn the_probe_tries_every_size_and_decides_from_the_kernels() {
    let fixed = |lo, hi| DecodeGroups::Fixed { lo, hi };
    let cases: [(Kernels, bool, &str, DecodeGroups); 11] = [
        (uniform, false, "1-32", DecodeGroups::Any),
        (uniform, true, "1-64", DecodeGroups::Any),
        (|| differs_at(3..=3), false, "1-2 | 3 | 4-32", fixed(1, 2)),
        (|| differs_at(3..=3), true, "1-2 | 3 | 4-64", fixed(4, 64)),
        (|| differs_at(5..=7), false, "1-4 | 5-7 | 8-32", fixed(1, 4)),
        (|| differs_at(5..=7), true, "1-4 | 5-7 | 8-64", fixed(8, 64)),
        (gpu_like, true, "1 | 2-8 | 9-64", fixed(9, 64)),
        (gpu_like, false, "1 | 2-8 | 9-32", fixed(2, 8)),
        (by_depth, true, "", DecodeGroups::Alone),
        // Sizes 5-7 mix whole blocks with a tail: the deep rows at both ends differ.
        (blocks_of_4, false, "", fixed(1, 3)),
        (blocks_of_4, true, "", fixed(1, 3)),
    ];
    for (kernel, gpu, classes, groups) in cases {
        let (engine, exact) = probed(kernel, gpu, false);
        assert!(engine.calls.is_empty());
        let findings = exact.findings.unwrap();
        assert_eq!(findings.tried(), if gpu { 64 } else { 32 });
        if !classes.is_empty() {
            assert_eq!(findings.to_string(), classes);
        }
        assert_eq!(exact.groups, groups, "{findings}");
    }
    // Rows that change beside a deeper batch-mate: every size from 2 on is its own class.
    let (_, exact) = probed(by_depth, false, false);
    let classes = exact.findings.unwrap().classes();
    assert_eq!(classes.len(), 32);
    assert!(classes[1..].iter().all(|c| !c.usable()));
    assert_eq!(Exact::describe(Some(exact)), "one row a call");
    // The test hook turns any shape into fixed-shape calls.
    let (_, forced) = probed(uniform, false, true);
    assert_eq!(forced.groups, fixed(2, 32));
    assert_eq!(
        Exact::describe(Some(forced)),
        "fixed-shape, 2 to 32 rows a call"
    );
}

#[test]
fn the_probe_calls_hold_every_size_with_deep_rows_beside_shallow_ones() {
    let mut engine = FakeEngine::new(64);
    Exact::probe(&mut engine, 8, 10, false, false).unwrap();
    // After the deep context's prefill: the lone rows, then each size twice.
    let probe_calls: Vec<&Vec<Row>> = engine
        .calls
        .iter()
        .filter(|c| c.iter().all(|r| r.logits))
        .collect();
    assert_eq!(probe_calls.len(), 2 + 2 * 7);
    const { assert!(DEEP > SHALLOW + 256) };
    for n in 2..=8 {
        let sized: Vec<&&Vec<Row>> = probe_calls.iter().filter(|c| c.len() == n).collect();
        assert_eq!(sized.len(), 2, "size {n}");
        // One call in one pass; deep rows more than 256 positions beyond the shallow ones,
        // last, and first too from 3 rows on.
        for call in &sized {
            assert_eq!(passes(call).len(), 1);
        }
        let depths = |c: &Vec<Row>| c.iter().map(|r| r.pos).collect::<Vec<_>>();
        let deep = |i: usize| i + 1 == n || (n > 2 && i == 0);
        let want: Vec<u32> = (0..n)
            .map(|i| if deep(i) { DEEP } else { SHALLOW })
            .collect();
        assert_eq!(depths(sized[0]), want);
        assert!(depths(sized[1]).iter().all(|&p| p == SHALLOW));
    }
}

#[test]
fn a_class_wider_than_the_slots_gets_pad_streams_beyond_the_plans_one() {
    let exact = Exact {
        groups: DecodeGroups::Fixed { lo: 9, hi: 64 },
        max_rows: 64,
        findings: None,
        probe_time: None,
    };
    assert_eq!(exact.pad_streams(3), 6);
    assert_eq!(exact.pad_streams(8), 1);
    assert_eq!(exact.pad_streams(20), 1);
    // --parallel 3, one resident prefix and the plan's pad stream: 5 streams of 512 cells.
    let planned = SessionSettings {
        n_ctx: 5 * 512,
        n_batch: 64,
        n_seq_max: 5,
        threads: 1,
        flash_attn: FlashAttn::Off,
        kv_types: KvTypes::default(),
        kv_unified: false,
    };
    let settings = exact.session_settings(&planned, 3);
    assert_eq!((settings.n_seq_max, settings.n_ctx), (10, 10 * 512));
    assert_eq!(exact.session_settings(&planned, 8), planned);
    assert_eq!(
        EXACT_ANY.exact.unwrap().session_settings(&planned, 1),
        planned
    );
}

/// Requests enough for 20 slots at once, of various lengths.
fn many_jobs() -> Vec<Job> {
    (1..=30)
        .map(|i| {
            let own: Vec<i32> = (0..2 + i % 5).map(|t| 20 + t + i).collect();
            let prefix: &[i32] = if i % 3 == 0 { &[] } else { &[11, 12, 13, 14] };
            job(
                u64::try_from(i).unwrap(),
                prefix,
                &own,
                1,
                6 + u32::try_from(i % 7).unwrap(),
            )
        })
        .collect()
}

#[test]
fn calls_are_padded_to_lo_and_cut_at_hi_with_the_same_answers_at_any_parallel() {
    let jobs = many_jobs();
    let cases: [(Kernels, bool, (usize, usize)); 4] = [
        (gpu_like, true, (9, 64)),
        (gpu_like, false, (2, 8)),
        (|| differs_at(5..=7), false, (1, 4)),
        (by_depth, false, (1, 1)),
    ];
    for (kernel, gpu, (lo, hi)) in cases {
        let mut results = Vec::new();
        for parallel in [1, 3, 10, 20] {
            let (mut engine, exact) = probed(kernel, gpu, false);
            assert_eq!(exact.groups.bounds(exact.max_rows), (lo, hi));
            let setup = Setup {
                parallel,
                exact: Some(exact),
                ..EXACT_ANY
            };
            let (done, _) = run_all(&mut engine, &setup, jobs.clone());
            assert!(done.iter().all(Result::is_ok), "{done:?}");
            // Calls of generated tokens: every row asks for logits (a prompt chunk asks only
            // at its last token, and every own part is 2 tokens or more).
            let generated: Vec<&Vec<Row>> = engine
                .calls
                .iter()
                .filter(|c| !c.is_empty() && c.iter().all(|r| r.logits))
                .collect();
            assert!(!generated.is_empty());
            let mut widest = 0;
            for call in &generated {
                for pass in passes(call) {
                    assert!(
                        (lo..=hi).contains(&pass.len()),
                        "--parallel {parallel}: {call:?}"
                    );
                    widest = widest.max(pass.len());
                }
            }
            if lo > 1 {
                // Every generated call is one pass, padded up to `lo` where needed.
                assert!(generated.iter().all(|c| passes(c).len() == 1));
                if parallel < lo {
                    assert_eq!(widest, lo, "--parallel {parallel}");
                }
            }
            if parallel > hi {
                assert_eq!(widest, hi, "--parallel {parallel}: cut at {hi}");
            }
            // Dummy rows leave nothing behind in the slots' or the pad streams.
            let pads = exact.pad_streams(parallel);
            for seq in 0..parallel + pads {
                assert!(
                    engine.cells(i32::try_from(seq).unwrap()).is_empty(),
                    "{seq}"
                );
            }
            results.push(answers(&done));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{lo} to {hi}");
    }
    // Without the fixed shape, the same kernels give different answers at 1 and 10 slots:
    // the check above can fail.
    let any = |parallel: usize| {
        let mut engine = FakeEngine::new(64);
        engine.kernel = gpu_like();
        answers(&run_all(&mut engine, &exact_any(parallel), jobs.clone()).0)
    };
    assert_ne!(any(1), any(10));
}

/// Picks the `g`-th token of `script` for the `g`-th generated token of a 2-token prompt.
fn scripted(script: &'static [i32]) -> Pick {
    Box::new(move |context: &[Token], _| {
        let g = context.len() - 2;
        Token(script.get(g).copied().unwrap_or(0))
    })
}

#[test]
fn stop_strings_match_across_token_boundaries() {
    // "x" "ST" "OP" "a": the stop string spans two tokens and is cut from the answer.
    const SCRIPT: &[i32] = &[7, 5, 6, 1, 1];
    for (stop, want) in [("STOP", "x"), ("TO", "xS"), ("xS", ""), ("zz", "xSTOPaa")] {
        let mut engine = FakeEngine::new(64);
        engine.pick = scripted(SCRIPT);
        let mut j = job(1, &[], &[3, 4], 1, 5);
        j.params.stop = vec![stop.to_owned()];
        let (done, _) = run_all(&mut engine, &EXACT_ANY, vec![j]);
        let reason = if stop == "zz" {
            StopReason::Length
        } else {
            StopReason::Stop
        };
        assert_eq!(
            answers(&done),
            vec![(1, Ok(vec![(want.to_owned(), reason)]))],
            "stop {stop:?}"
        );
    }
}

#[test]
fn a_failing_decode_fails_only_the_requests_in_that_call() {
    let jobs = vec![
        job(1, &[], &[5, 6], 1, 8),
        job(2, &[], &[7, 8, 9], 1, 8),
        job(3, &[], &[10, 11], 1, 8),
    ];
    // Request 2's prompt is decoded alone in exact mode: failing it fails request 2 only, and
    // its slot serves request 3.
    let mut engine = FakeEngine::new(64);
    engine.fail_when = Some(Box::new(|rows: &[Row]| {
        rows.iter().any(|r| r.token == Token(9))
    }));
    let (done, metrics) = run_all(&mut engine, &EXACT_ANY, jobs.clone());
    let mut want = expected_all(&jobs);
    want[1].1 = Err(ErrorCode::EngineError);
    assert_eq!(answers(&done), want);
    assert_eq!(
        metrics.prompt_tokens_computed,
        2 + 2,
        "the failed chunk is not counted"
    );
    let failed = done.iter().find_map(|o| o.as_ref().err()).unwrap();
    assert_eq!(failed.custom_id.as_deref(), Some("req-2"));

    // In mixed batches the failing call holds both running requests: both fail, once each.
    let mut engine = FakeEngine::new(64);
    let mut failed_once = false;
    engine.fail_when = Some(Box::new(move |rows: &[Row]| {
        let hit = !failed_once && rows.iter().any(|r| r.token == Token(9));
        failed_once |= hit;
        hit
    }));
    let mixed = Setup {
        exact: None,
        ..EXACT_ANY
    };
    let (done, _) = run_all(&mut engine, &mixed, jobs.clone());
    let got = answers(&done);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].1, Err(ErrorCode::EngineError));
    assert_eq!(got[1].1, Err(ErrorCode::EngineError));
    assert_eq!(got[2], want[2]);
}

#[test]
fn a_failed_prefix_prefill_fails_its_request_and_the_next_one_prefills_again() {
    let jobs = vec![
        job(1, &[11, 12, 13], &[5], 1, 6),
        job(2, &[11, 12, 13], &[6], 1, 6),
    ];
    let mut engine = FakeEngine::new(64);
    let mut calls = 0;
    // The first call is the prefix's prefill into its own sequence.
    engine.fail_when = Some(Box::new(move |_: &[Row]| {
        calls += 1;
        calls == 1
    }));
    let (done, metrics) = run_all(&mut engine, &exact_any(1), jobs.clone());
    let mut want = expected_all(&jobs);
    want[0].1 = Err(ErrorCode::EngineError);
    assert_eq!(answers(&done), want);
    assert_eq!(metrics.prompt_tokens_computed, 3 + 1);
    assert_eq!(metrics.prefix_count(), 1);
}

#[test]
fn end_of_generation_and_max_tokens_set_the_finish_reason() {
    // "a" then the end token; and "a" "b" "c" cut by max_tokens 3.
    for (script, want) in [
        (&[1, 0][..], ("a", StopReason::Stop, 2)),
        (&[1, 2, 3, 1][..], ("abc", StopReason::Length, 3)),
    ] {
        let mut engine = FakeEngine::new(64);
        let script: &'static [i32] = Box::leak(script.to_vec().into_boxed_slice());
        engine.pick = scripted(script);
        let (done, metrics) = run_all(&mut engine, &EXACT_ANY, vec![job(1, &[], &[3, 4], 1, 3)]);
        let c = done[0].as_ref().unwrap();
        assert_eq!(
            (c.choices[0].content.as_str(), c.choices[0].reason),
            (want.0, want.1)
        );
        assert_eq!(c.usage.completion_tokens, want.2);
        assert_eq!(metrics.completion_tokens, want.2);
    }
}

/// What the admission loop did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Admitted(u64),
    /// A piece of the feed's own work on that line.
    Piece(u64),
    Written(u64, Result<(), ErrorCode>),
}

/// The fake's own work: a number of pieces to do.
#[derive(Debug)]
struct FakeWork {
    line: u64,
    left: usize,
    started: bool,
}

/// An in-memory feed: requests by line (an `Err` stands for a line that failed to parse), and
/// a log of what the loop did with them.
struct TestFeed {
    requests: VecDeque<Result<u64, u64>>,
    prepared: Vec<u64>,
    seen: Vec<Seen>,
    /// Stop once this many outcomes are written.
    stop_after: Option<usize>,
    /// Stop once this many pieces of work are done.
    stop_after_pieces: Option<usize>,
    /// Polls of `memory_short` (by their count from 0) that report memory short.
    short: std::ops::Range<usize>,
    polls: usize,
    /// What the last poll said (before any, whether the first will say short).
    short_now: bool,
    /// Lines admitted, or whose work started, while memory was short.
    admitted_while_short: Vec<u64>,
    /// Lines the feed settles itself (copies of earlier results).
    settle: BTreeSet<u64>,
    /// Lines that are work of the feed's own, with their number of pieces.
    work: std::collections::BTreeMap<u64, usize>,
    /// Identical requests: a line's content, by the line whose prompt and seed it has.
    content: std::collections::BTreeMap<u64, u64>,
    /// Identical requests wait on one another, as in a deterministic run.
    twins: Option<Twins>,
}

impl TestFeed {
    fn new(lines: &[Result<u64, u64>]) -> Self {
        Self {
            requests: lines.iter().copied().collect(),
            prepared: Vec::new(),
            seen: Vec::new(),
            stop_after: None,
            stop_after_pieces: None,
            short: 0..0,
            polls: 0,
            short_now: false,
            admitted_while_short: Vec::new(),
            settle: BTreeSet::new(),
            work: std::collections::BTreeMap::new(),
            content: std::collections::BTreeMap::new(),
            twins: None,
        }
    }

    /// Memory is short for polls `short` of `memory_short`.
    fn short_for(&mut self, short: std::ops::Range<usize>) {
        self.short_now = short.contains(&0);
        self.short = short;
    }

    fn written(&self) -> Vec<(u64, Result<(), ErrorCode>)> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                Seen::Written(line, r) => Some((*line, *r)),
                Seen::Admitted(_) | Seen::Piece(_) => None,
            })
            .collect()
    }

    fn pieces(&self) -> usize {
        self.seen
            .iter()
            .filter(|s| matches!(s, Seen::Piece(_)))
            .count()
    }

    fn at(&self, s: &Seen) -> usize {
        self.seen
            .iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("{s:?} not in {:?}", self.seen))
    }

    fn start(&mut self, line: u64) {
        self.seen.push(Seen::Admitted(line));
        if self.short_now {
            self.admitted_while_short.push(line);
        }
    }
}

impl Feed for TestFeed {
    type Error = std::convert::Infallible;
    type Work = FakeWork;

    fn next_request(&mut self) -> Result<Option<Result<Request, LineError>>, Self::Error> {
        Ok(self.requests.pop_front().map(|r| match r {
            Ok(line) => Ok(Request {
                line,
                custom_id: format!("req-{line}"),
                prompt: Prompt::Chat(Vec::new()),
                sampling: SamplingParams::default(),
                ignored_fields: Vec::new(),
                endpoint: Endpoint::Chat,
                reasoning: Default::default(),
            }),
            Err(line) => Err(LineError::new(
                line,
                None,
                ErrorCode::InvalidJson,
                "not JSON".into(),
            )),
        }))
    }

    fn prepare(
        &mut self,
        request: Request,
        _metrics: &mut Metrics,
    ) -> Result<Intake<FakeWork>, Self::Error> {
        let line = request.line;
        self.prepared.push(line);
        if self.settle.contains(&line) {
            return Ok(Intake::Settled);
        }
        if let Some(&left) = self.work.get(&line) {
            let work = FakeWork {
                line,
                left,
                started: false,
            };
            return Ok(Intake::Work { line, work });
        }
        let content = self.content.get(&line).copied().unwrap_or(line);
        let own = [i32::try_from(content).unwrap() + 100, 7];
        let mut job = job(content, &[11, 12, 13], &own, 1, 6);
        (job.line, job.custom_id) = (line, request.custom_id);
        if self.twins.as_mut().is_some_and(|t| t.hold(&job)) {
            return Ok(Intake::Settled);
        }
        Ok(Intake::Run(job))
    }

    fn admitted(&mut self, job: &Job) {
        self.start(job.line);
    }

    fn work(&mut self, work: &mut FakeWork, _metrics: &mut Metrics) -> Result<Piece, Self::Error> {
        if !work.started {
            work.started = true;
            self.start(work.line);
        }
        self.seen.push(Seen::Piece(work.line));
        work.left -= 1;
        if work.left > 0 {
            return Ok(Piece::More);
        }
        self.seen.push(Seen::Written(work.line, Ok(())));
        Ok(Piece::Done)
    }

    fn write(
        &mut self,
        _metrics: &mut Metrics,
        outcome: Outcome,
    ) -> Result<Option<Job>, Self::Error> {
        let (line, result) = match &outcome {
            Ok(c) => (c.line, Ok(())),
            Err(e) => (e.line, Err(e.code)),
        };
        self.seen.push(Seen::Written(line, result));
        let finished = self.twins.as_mut().and_then(|t| t.finished(line, &outcome));
        match finished.map(|f| f.release) {
            Some(Release::Copy(twins)) => {
                for twin in twins {
                    self.seen.push(Seen::Written(twin.line, result));
                }
                Ok(None)
            }
            Some(Release::Run(job)) => Ok(Some(*job)),
            None => Ok(None),
        }
    }

    fn memory_short(&mut self) -> bool {
        self.short_now = self.short.contains(&self.polls);
        self.polls += 1;
        self.short_now
    }

    fn stop_requested(&self) -> bool {
        self.stop_after.is_some_and(|n| self.written().len() >= n)
            || self.stop_after_pieces.is_some_and(|n| self.pieces() >= n)
    }

    fn stepped(&mut self, _metrics: &Metrics) {}
}

fn admit_feed(feed: &mut TestFeed, parallel: usize, apart: Apart<'_>) -> LoopEnd {
    let mut engine = FakeEngine::new(64);
    let mut s = exact_any(parallel).scheduler(&mut engine);
    admit_all(&mut s, feed, apart).unwrap()
}

#[test]
fn a_quarantined_request_gets_its_error_line_without_running() {
    let quarantine: BTreeSet<u64> = [2].into();
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Err(3), Ok(4)]);
    let apart = Apart {
        isolate: None,
        quarantine: Some(&quarantine),
    };
    assert_eq!(admit_feed(&mut feed, 2, apart), LoopEnd::Finished);
    let mut written = feed.written();
    written.sort_by_key(|w| w.0);
    assert_eq!(
        written,
        vec![
            (1, Ok(())),
            (2, Err(ErrorCode::EngineError)),
            (3, Err(ErrorCode::InvalidJson)),
            (4, Ok(())),
        ]
    );
    // Never prepared, never admitted: a request that crashed the worker twice is not touched.
    assert_eq!(feed.prepared, vec![1, 4]);
    assert!(!feed.seen.contains(&Seen::Admitted(2)));
}

#[test]
fn an_isolated_request_runs_alone() {
    let isolate: BTreeSet<u64> = [2].into();
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Ok(3), Ok(4)]);
    let apart = Apart {
        isolate: Some(&isolate),
        quarantine: None,
    };
    assert_eq!(admit_feed(&mut feed, 3, apart), LoopEnd::Finished);
    let at = |s: Seen| feed.seen.iter().position(|x| *x == s).unwrap();
    let (start, end) = (at(Seen::Admitted(2)), at(Seen::Written(2, Ok(()))));
    // Everything admitted before it was written before it started; nothing started beside it.
    assert_eq!(
        feed.seen[..start],
        [Seen::Admitted(1), Seen::Written(1, Ok(()))]
    );
    assert!(feed.seen[start + 1..end].is_empty());
    assert_eq!(feed.written().len(), 4);
    // Without isolation, 1, 2 and 3 share the three slots.
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Ok(3), Ok(4)]);
    admit_feed(&mut feed, 3, Apart::default());
    assert_eq!(
        feed.seen[..3],
        [Seen::Admitted(1), Seen::Admitted(2), Seen::Admitted(3)]
    );
}

#[test]
fn a_stop_request_ends_the_loop_and_admits_nothing_more() {
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Ok(3), Ok(4), Ok(5)]);
    feed.stop_after = Some(1);
    assert_eq!(
        admit_feed(&mut feed, 1, Apart::default()),
        LoopEnd::Interrupted
    );
    assert_eq!(feed.written(), vec![(1, Ok(()))]);
    assert_eq!(feed.requests.len(), 4, "requests 2 to 5 were never read");
}

#[test]
fn admission_pauses_while_memory_is_short() {
    // Short from the start: nothing starts until memory frees up.
    let mut feed = TestFeed::new(&[Ok(1), Ok(2)]);
    feed.short_for(0..2);
    assert_eq!(
        admit_feed(&mut feed, 2, Apart::default()),
        LoopEnd::Finished
    );
    assert!(feed.polls > 2, "the loop asked again until memory freed up");
    assert_eq!(feed.admitted_while_short, Vec::<u64>::new());
    assert_eq!(feed.written().len(), 2);

    // Short while requests run: they go on, and nothing more starts, job or work, until memory
    // frees up. Poll 0 admits request 1; polls 1 to 9 say short.
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Ok(3), Ok(4), Ok(5)]);
    feed.work = [(3, 2)].into();
    feed.short_for(1..10);
    assert_eq!(
        admit_feed(&mut feed, 2, Apart::default()),
        LoopEnd::Finished
    );
    assert_eq!(
        feed.admitted_while_short,
        Vec::<u64>::new(),
        "{:?}",
        feed.seen
    );
    assert!(feed.polls > 10);
    // Request 1 ran on through the pause: it was written before anything else started.
    assert_eq!(
        feed.seen[..2],
        [Seen::Admitted(1), Seen::Written(1, Ok(()))]
    );
    let mut written: Vec<u64> = feed.written().iter().map(|w| w.0).collect();
    written.sort_unstable();
    assert_eq!(written, [1, 2, 3, 4, 5]);
}

#[test]
fn work_goes_a_piece_at_a_time_between_steps() {
    // A job of six tokens beside work of forty pieces: the job is not held up until the work
    // is done, and each turn does one piece.
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Ok(3)]);
    feed.work = [(2, 40)].into();
    assert_eq!(
        admit_feed(&mut feed, 2, Apart::default()),
        LoopEnd::Finished
    );
    let first_piece = feed.at(&Seen::Piece(2));
    let work_done = feed.at(&Seen::Written(2, Ok(())));
    for line in [1, 3] {
        let written = feed.at(&Seen::Written(line, Ok(())));
        assert!(
            first_piece < written && written < work_done,
            "request {line} was written while the work went on: {:?}",
            feed.seen
        );
    }
    assert_eq!(feed.pieces(), 40);
}

#[test]
fn a_stop_request_is_seen_within_one_piece_of_work() {
    let mut feed = TestFeed::new(&[Ok(1), Ok(2)]);
    feed.work = [(1, 1000)].into();
    feed.stop_after_pieces = Some(3);
    assert_eq!(
        admit_feed(&mut feed, 1, Apart::default()),
        LoopEnd::Interrupted
    );
    assert_eq!(feed.pieces(), 3);
    // The interrupted work is not written: a resumed run computes it again.
    assert!(!feed.written().iter().any(|w| w.0 == 1), "{:?}", feed.seen);
}

#[test]
fn work_waits_for_the_lane_and_jobs_overtake_it() {
    // Two works take turns in the one lane; the jobs behind the second are not held up.
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Ok(3), Ok(4)]);
    feed.work = [(1, 30), (2, 3)].into();
    assert_eq!(
        admit_feed(&mut feed, 1, Apart::default()),
        LoopEnd::Finished
    );
    let first_done = feed.at(&Seen::Written(1, Ok(())));
    assert!(first_done < feed.at(&Seen::Piece(2)), "{:?}", feed.seen);
    assert!(feed.at(&Seen::Written(3, Ok(()))) < first_done);
    assert_eq!(feed.pieces(), 33);
    assert_eq!(feed.written().len(), 4);
}

#[test]
fn isolated_work_runs_alone() {
    let isolate: BTreeSet<u64> = [2].into();
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Ok(3)]);
    feed.work = [(2, 5)].into();
    let apart = Apart {
        isolate: Some(&isolate),
        quarantine: None,
    };
    assert_eq!(admit_feed(&mut feed, 3, apart), LoopEnd::Finished);
    let (start, end) = (
        feed.at(&Seen::Admitted(2)),
        feed.at(&Seen::Written(2, Ok(()))),
    );
    assert_eq!(
        feed.seen[..start],
        [Seen::Admitted(1), Seen::Written(1, Ok(()))]
    );
    assert!(feed.seen[start + 1..end]
        .iter()
        .all(|s| *s == Seen::Piece(2)));
    assert_eq!(
        feed.seen[end + 1..],
        [Seen::Admitted(3), Seen::Written(3, Ok(()))]
    );
}

#[test]
fn twins_of_a_transient_failure_are_computed_not_copied() {
    // Lines 1, 2 and 3 are one request; 4 another. The first computation of that request's
    // prompt fails (a decode error): 1 gets it, 2 runs in its place, 3 copies 2.
    let mut engine = FakeEngine::new(64);
    let mut failed = false;
    engine.fail_when = Some(Box::new(move |rows: &[Row]| {
        let hit = !failed && rows.iter().any(|r| r.token == Token(101));
        failed |= hit;
        hit
    }));
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Ok(3), Ok(4)]);
    feed.content = [(2, 1), (3, 1)].into();
    feed.twins = Some(Twins::new(true));
    let mut s = exact_any(2).scheduler(&mut engine);
    assert_eq!(
        admit_all(&mut s, &mut feed, Apart::default()).unwrap(),
        LoopEnd::Finished
    );
    let mut written = feed.written();
    written.sort_by_key(|w| w.0);
    assert_eq!(
        written,
        vec![
            (1, Err(ErrorCode::EngineError)),
            (2, Ok(())),
            (3, Ok(())),
            (4, Ok(())),
        ],
        "{:?}",
        feed.seen
    );
    // 2 was computed; 3 waited on it and was copied.
    assert!(feed.seen.contains(&Seen::Admitted(2)));
    assert!(!feed.seen.contains(&Seen::Admitted(3)));
}

#[test]
fn a_settled_request_never_takes_a_slot_and_the_loop_reads_on() {
    let mut feed = TestFeed::new(&[Ok(1), Ok(2), Ok(3), Ok(4)]);
    feed.settle = [2, 3].into();
    assert_eq!(
        admit_feed(&mut feed, 1, Apart::default()),
        LoopEnd::Finished
    );
    assert_eq!(feed.prepared, vec![1, 2, 3, 4]);
    assert!(!feed.seen.contains(&Seen::Admitted(2)));
    assert!(!feed.seen.contains(&Seen::Admitted(3)));
    let mut written = feed.written();
    written.sort_by_key(|w| w.0);
    assert_eq!(written, vec![(1, Ok(())), (4, Ok(()))]);
}

/// A job whose choices think under `plan` before they answer.
fn thinking_job(line: u64, n: u32, max_tokens: u32, plan: ThinkPlan, constrained: bool) -> Job {
    let mut j = job(line, &[11, 12, 13, 14], &[21, 22], n, max_tokens);
    j.params.think = Some(std::sync::Arc::new(plan));
    if constrained {
        j.params.constraint = Some(crate::engine::Constraint::Gbnf("root ::= \"x\"*".into()));
    }
    j
}

/// Markers as the fake spells them: `<think>` whole (10), `</think>` whole (11) or split
/// (12, 13).
fn plan(opened_by_prompt: bool, budget: u32) -> ThinkPlan {
    ThinkPlan {
        open: "<think>".into(),
        close: "</think>".into(),
        open_tokens: vec![Token(10)],
        close_tokens: vec![Token(12), Token(13)],
        opened_by_prompt,
        budget,
    }
}

/// A pick that thinks `thoughts` tokens (letters), then writes `close`, then answers by
/// [`hash_pick`] with no end of generation.
fn thinks_then(thoughts: usize, close: &'static [i32]) -> Pick {
    Box::new(move |context: &[Token], seed: u32| {
        let generated = context.len() - 6;
        let after_open = context[6..]
            .iter()
            .position(|t| t.0 == 10)
            .map_or(0, |p| p + 1);
        let k = generated - after_open;
        if k < thoughts {
            Token(1 + (k % 3) as i32)
        } else if k < thoughts + close.len() {
            Token(close[k - thoughts])
        } else {
            let t = hash_pick(context, seed);
            if t == EOS {
                Token(8)
            } else {
                t
            }
        }
    })
}

fn one_choice(outcomes: &[Outcome]) -> &crate::formats::result::Completion {
    match outcomes {
        [Ok(c)] => c,
        other => panic!("one completion expected: {other:?}"),
    }
}

#[test]
fn a_close_marker_whole_or_split_ends_the_thinking_and_tokens_are_counted() {
    for close in [&[11][..], &[12, 13][..]] {
        let mut engine = FakeEngine::new(64);
        engine.pick = thinks_then(4, Box::leak(close.to_vec().into_boxed_slice()));
        let (out, _) = run_all(
            &mut engine,
            &exact_any(2),
            vec![thinking_job(1, 1, 12, plan(true, 100), false)],
        );
        let c = one_choice(&out);
        let choice = &c.choices[0];
        assert_eq!(choice.reasoning.as_deref(), Some("abca"), "{choice:?}");
        assert!(!choice.content.contains("think"), "{choice:?}");
        assert_eq!(c.usage.reasoning_tokens, 4 + close.len() as u64);
        assert_eq!(c.usage.completion_tokens, 12);
        assert_eq!(choice.reason, StopReason::Length);
    }
}

#[test]
fn the_budget_forces_the_close_and_the_constraint_starts_with_the_answer() {
    let mut engine = FakeEngine::new(64);
    // It would think for ever: the engine closes after 3 tokens.
    engine.pick = thinks_then(1000, &[]);
    let (out, _) = run_all(
        &mut engine,
        &exact_any(2),
        vec![thinking_job(1, 1, 10, plan(true, 3), true)],
    );
    let c = one_choice(&out);
    let choice = &c.choices[0];
    assert_eq!(
        choice.reasoning.as_deref(),
        Some("abc"),
        "the thinking is free text"
    );
    assert_eq!(
        choice.content, "xxxxx",
        "the answer follows the constraint: {choice:?}"
    );
    assert_eq!(c.usage.reasoning_tokens, 5, "3 thought, 2 written to close");
    // The engine wrote the close marker: the sequence's cells hold it.
    let calls: Vec<i32> = engine.calls.iter().flatten().map(|r| r.token.0).collect();
    assert!(calls.windows(2).any(|w| w == [12, 13]), "{calls:?}");
}

#[test]
fn a_zero_budget_closes_at_once_and_an_unopened_block_is_opened_by_the_engine() {
    let mut engine = FakeEngine::new(64);
    engine.pick = thinks_then(1000, &[]);
    let (out, _) = run_all(
        &mut engine,
        &exact_any(2),
        vec![thinking_job(1, 1, 6, plan(true, 0), true)],
    );
    let c = one_choice(&out);
    assert_eq!(c.choices[0].reasoning.as_deref(), Some(""));
    assert_eq!(c.choices[0].content, "xxxx");
    assert_eq!(c.usage.reasoning_tokens, 2);

    let mut engine = FakeEngine::new(64);
    engine.pick = thinks_then(2, &[11]);
    let (out, _) = run_all(
        &mut engine,
        &exact_any(2),
        vec![thinking_job(1, 1, 8, plan(false, 100), false)],
    );
    let c = one_choice(&out);
    assert_eq!(
        c.choices[0].reasoning.as_deref(),
        Some("ab"),
        "{:?}",
        c.choices[0]
    );
    assert_eq!(
        c.usage.reasoning_tokens, 4,
        "the open marker, 2 thought, the close"
    );
}

#[test]
fn thinking_is_identical_across_parallel_and_forks() {
    let jobs = || {
        (1..=5)
            .map(|l| {
                thinking_job(
                    l,
                    1 + (l % 2) as u32,
                    9,
                    plan(true, 2 + l as u32 % 3),
                    l % 2 == 0,
                )
            })
            .collect::<Vec<_>>()
    };
    let answers = |parallel| {
        let mut engine = FakeEngine::new(64);
        engine.pick = thinks_then(1000, &[]);
        let (mut out, _) = run_all(&mut engine, &exact_any(parallel), jobs());
        out.sort_by_key(|o| o.as_ref().map(|c| c.line).unwrap_or(0));
        out.into_iter()
            .map(|o| {
                let c = o.unwrap();
                let texts: Vec<_> = c
                    .choices
                    .iter()
                    .map(|ch| (ch.reasoning.clone(), ch.content.clone()))
                    .collect();
                (c.line, texts, c.usage.reasoning_tokens)
            })
            .collect::<Vec<_>>()
    };
    let one = answers(1);
    assert_eq!(one.len(), 5);
    assert_eq!(answers(4), one);
}

#[test]
fn an_end_of_generation_while_thinking_becomes_the_close_and_the_answer_follows() {
    let mut engine = FakeEngine::new(64);
    // Two thoughts, then the model ends its generation; once closed, it answers.
    engine.pick = Box::new(|context: &[Token], seed: u32| {
        let generated = &context[6..];
        if generated.contains(&Token(13)) {
            let t = hash_pick(context, seed);
            if t == EOS {
                Token(8)
            } else {
                t
            }
        } else if generated.len() == 2 {
            EOS
        } else {
            Token(1)
        }
    });
    let (out, _) = run_all(
        &mut engine,
        &exact_any(2),
        vec![thinking_job(1, 1, 8, plan(true, 100), true)],
    );
    let c = one_choice(&out);
    let choice = &c.choices[0];
    assert_eq!(choice.reasoning.as_deref(), Some("aa"), "{choice:?}");
    assert_eq!(
        choice.content, "xxxx",
        "the constrained answer still came: {choice:?}"
    );
    assert_eq!(
        c.usage.reasoning_tokens, 4,
        "2 thought, the close written in place of the end"
    );
}
