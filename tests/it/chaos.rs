//! The chaos matrix. Runs are killed with SIGKILL at several moments, plain and under
//! `--supervise`, in deterministic and `--no-deterministic` mode; a second run starts on an
//! output in use; Ctrl-C reaches a supervised run; a request crashes its worker every time.
//! Each case ends by comparing the output with an uninterrupted run of the same batch: no line
//! lost, none written twice, and in deterministic mode the same content, `finish_reason` and
//! usage for every request.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;
use crate::resume::{args, input};

/// Input lines that get an output line.
const TOTAL: usize = 9;

/// Where a run is when it is killed.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// Model loaded and plan written, (almost always) before the first result line.
    Planned,
    /// After this many result lines.
    Lines(usize),
}

fn reach(child: &mut Child, out: &Path, moment: Moment) {
    let reached = wait_until(child, || match moment {
        Moment::Planned => planned(out),
        Moment::Lines(n) => line_count(out) >= n,
    });
    assert!(reached, "the run ended before {moment:?}");
}

/// Kills `pid` with SIGKILL and checks that the output was left unfinished.
fn kill_mid_run(pid: i64, out: &Path, moment: Moment) {
    send_signal("-KILL", pid);
    // The line count can only grow until the kill lands; read it after.
    std::thread::sleep(Duration::from_millis(50));
    let written = line_count(out);
    assert!(
        written < TOTAL,
        "{moment:?}: the kill landed after the end ({written} lines)"
    );
}

/// An uninterrupted run's lines, reduced to what must match (deterministic) or their keys.
fn baseline(deterministic: bool) -> &'static BTreeMap<String, Value> {
    static DET: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    static MIXED: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    let cell = if deterministic { &DET } else { &MIXED };
    cell.get_or_init(|| {
        let s = Scratch::new();
        let input = input(&s);
        let out = s.path("baseline.jsonl");
        let mut a = args(&s, &input, &out, "1");
        if !deterministic {
            a.push("--no-deterministic".into());
        }
        assert_eq!(spawn(&a).wait().unwrap().code(), Some(1), "one bad line");
        let lines = essences(&out);
        assert_eq!(lines.len(), TOTAL);
        lines
    })
}

/// Compares an output with the uninterrupted run: every line once, and in deterministic mode
/// the same essence; otherwise the same keys and the same error lines.
fn assert_matches_baseline(out: &Path, deterministic: bool, case: &str) {
    let got = essences(out);
    let want = baseline(deterministic);
    if deterministic {
        assert_eq!(&got, want, "{case}: differs from the uninterrupted run");
    } else {
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{case}: lines lost or added"
        );
        assert_eq!(
            got["line:4"], want["line:4"],
            "{case}: the bad line's error"
        );
    }
}

fn supervised(
    s: &Scratch,
    input: &Path,
    out: &Path,
    parallel: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a = args(s, input, out, parallel);
    a.push("--supervise".into());
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn finish(child: Child) -> (Option<i32>, String) {
    let o = child.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn killed_at_any_moment_a_plain_run_resumes_to_the_same_output() {
    let _lock = model_lock();
    for deterministic in [true, false] {
        let s = Scratch::new();
        let input = input(&s);
        let cases = [
            ("4-planned", "4", Moment::Planned, false),
            ("4-mid", "4", Moment::Lines(4), false),
            ("1-torn", "1", Moment::Lines(3), true),
        ];
        for (name, parallel, moment, tear) in cases {
            let case = format!("{name} deterministic={deterministic}");
            let out = s.path(&format!("{name}.jsonl"));
            let mut a = args(&s, &input, &out, parallel);
            if !deterministic {
                a.push("--no-deterministic".into());
            }
            let mut child = spawn(&a);
            reach(&mut child, &out, moment);
            kill_mid_run(i64::from(child.id()), &out, moment);
            child.wait().unwrap();
            if tear {
                let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
                std::io::Write::write_all(&mut f, br#"{"id":"batch_req_x","custom_id":"r9","resp"#)
                    .unwrap();
            }
            // The lock of the killed run is gone with it: the resume is not blocked.
            let (code, err) = finish(spawn(&a));
            assert_eq!(code, Some(1), "{case}: {err}");
            assert_matches_baseline(&out, deterministic, &case);
        }
    }
}

#[test]
fn a_supervised_run_survives_its_worker_being_killed_in_every_mode() {
    let _lock = model_lock();
    let cases = [
        (true, Moment::Planned),
        (true, Moment::Lines(3)),
        (false, Moment::Lines(3)),
    ];
    for (deterministic, moment) in cases {
        let case = format!("{moment:?} deterministic={deterministic}");
        let s = Scratch::new();
        let input = input(&s);
        let out = s.path("out.jsonl");
        let extra: &[&str] = if deterministic {
            &[]
        } else {
            &["--no-deterministic"]
        };
        let mut sup = spawn(&supervised(&s, &input, &out, "4", extra));
        reach(&mut sup, &out, moment);
        let worker = worker_of(sup.id()).expect("the supervisor runs a worker");
        kill_mid_run(worker, &out, moment);
        let (code, err) = finish(sup);
        assert_eq!(code, Some(1), "{case}: {err}");
        assert!(err.contains("--parallel 4 -> 2"), "{case}: {err}");
        assert_matches_baseline(&out, deterministic, &case);
        // The manifest records the --parallel each run actually used.
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(s.path("out.manifest.json")).unwrap())
                .unwrap();
        let used: Vec<u64> = manifest["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["parallel"].as_u64().unwrap())
            .collect();
        assert_eq!(used.last(), Some(&2), "{case}: {manifest}");
        assert_eq!(status_json(&out)["status"], "completed");
    }
}

#[test]
fn a_second_run_on_an_output_in_use_is_refused_at_once() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let out = s.path("out.jsonl");
    let a = args(&s, &input, &out, "2");
    let mut first = spawn(&a);
    reach(&mut first, &out, Moment::Planned);
    let started = Instant::now();
    let (code, err) = finish(spawn(&a));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("in use by process {}", first.id())),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused before loading anything"
    );
    assert_eq!(
        status_json(&out)["running_pid"],
        serde_json::json!(first.id()),
        "status names the running process"
    );
    let (code, err) = finish(first);
    assert_eq!(code, Some(1), "{err}");
    assert_matches_baseline(&out, true, "concurrent");
}

#[test]
fn ctrl_c_under_supervise_stops_cleanly_and_a_plain_rerun_resumes() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let out = s.path("out.jsonl");
    // A terminal sends Ctrl-C to its whole foreground process group: supervisor and worker.
    let mut sup = Command::new(env!("CARGO_BIN_EXE_infer-batch"))
        .args(supervised(&s, &input, &out, "2", &[]))
        .env("INFER_BATCH_LOG", "warn")
        .env("XDG_CACHE_HOME", test_cache_home())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    reach(&mut sup, &out, Moment::Lines(2));
    send_signal("-INT", -i64::from(sup.id()));
    let (code, err) = finish(sup);
    assert_eq!(code, Some(75), "{err}");
    assert!(line_count(&out) < TOTAL, "stopped before the end");
    assert_eq!(status_json(&out)["status"], "interrupted");
    assert!(s.path("out.summary.json").is_file(), "{err}");
    let (code, err) = finish(spawn(&args(&s, &input, &out, "2")));
    assert_eq!(code, Some(1), "{err}");
    assert_matches_baseline(&out, true, "ctrl-c");
}

#[test]
fn a_request_that_crashes_every_worker_is_quarantined_and_the_batch_goes_on() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let out = s.path("out.jsonl");
    let poison = "r5";
    let sup = spawn_with(
        &supervised(&s, &input, &out, "4", &[]),
        &[("INFER_BATCH_TEST_ABORT_ON", poison)],
    );
    let (code, err) = finish(sup);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("quarantined"), "{err}");
    let lines = by_key(&out);
    let (key, line) = lines
        .iter()
        .find(|(_, v)| v["custom_id"] == poison)
        .expect("a line for the poisonous request");
    let bad = &line["error"];
    assert_eq!(bad["code"], "engine_error", "{bad}");
    assert!(
        bad["message"].as_str().unwrap().contains("quarantined"),
        "{bad}"
    );
    // Its batch-mates at the first crash ran again, alone, and match the uninterrupted run.
    let mut want = baseline(true).clone();
    want.remove(poison);
    let mut got = essences(&out);
    got.remove(key);
    assert_eq!(got, want);
}

#[test]
fn supervise_restart_starts_over_once_and_keeps_what_the_first_worker_wrote() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let out = s.path("out.jsonl");
    // An earlier, finished output that --restart must throw away.
    assert_eq!(
        spawn(&args(&s, &input, &out, "4")).wait().unwrap().code(),
        Some(1)
    );
    let mut sup = spawn(&supervised(&s, &input, &out, "2", &["--restart"]));
    // The old output is gone once the supervisor starts over; wait for new lines.
    let mut fresh = false;
    reach_fresh(&mut sup, &out, &mut fresh);
    let worker = worker_of(sup.id()).expect("a worker");
    kill_mid_run(worker, &out, Moment::Lines(3));
    let kept = std::fs::read(&out).unwrap();
    let (code, err) = finish(sup);
    assert_eq!(code, Some(1), "{err}");
    let after = std::fs::read(&out).unwrap();
    assert!(
        after.starts_with(&kept),
        "the restarted worker resumed instead of starting over again"
    );
    assert_matches_baseline(&out, true, "supervise --restart");
}

/// Waits until the output was replaced (empty or gone) and then holds three new lines.
fn reach_fresh(child: &mut Child, out: &Path, fresh: &mut bool) {
    let reached = wait_until(child, || {
        let n = line_count(out);
        *fresh = *fresh || n < TOTAL;
        *fresh && (3..TOTAL).contains(&n)
    });
    assert!(reached, "the supervised run ended early");
}

#[test]
fn fixed_shape_decoding_gives_the_same_outputs() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    // The path a GPU takes when its kernels depend on the row count: every block of slots
    // decoded in full, dummy rows for the slots that are not generating.
    for parallel in ["1", "3"] {
        let out = s.path(&format!("fixed-p{parallel}.jsonl"));
        let child = spawn_with(
            &args(&s, &input, &out, parallel),
            &[("INFER_BATCH_TEST_FIXED_SHAPE", "1")],
        );
        let (code, err) = finish(child);
        assert_eq!(code, Some(1), "{err}");
        assert_matches_baseline(&out, true, &format!("fixed shape at --parallel {parallel}"));
    }
}
