//! Prefix states on disk: restored by the next run, validated, rebuilt when anything is wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness::*;

fn batch(s: &Scratch, systems: &[String], n: usize) -> PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let system = &systems[i % systems.len()];
            request(
                &format!("d{i}"),
                Some(system),
                &profile(i),
                json!({"max_tokens": 10, "temperature": 0}),
            )
        })
        .collect();
    s.write_lines("in.jsonl", &lines)
}

fn state_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "ibprefix"));
    files.sort();
    files
}

fn contents(results: &BTreeMap<String, Value>) -> BTreeMap<String, String> {
    results
        .iter()
        .map(|(k, v)| (k.clone(), content(v).to_owned()))
        .collect()
}

fn tokens(summary: &Value, field: &str) -> u64 {
    summary["tokens"][field].as_u64().unwrap()
}

#[test]
fn second_run_restores_the_prefix_and_gives_the_same_output() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = batch(&s, &[rubric(200)], 4);
    let args = ["--parallel", "2"];
    let (o1, first) = run_batch(&s, &input, "one.jsonl", &args);
    let (o2, second) = run_batch(&s, &input, "two.jsonl", &args);
    assert!(o1.status.success() && o2.status.success(), "{o1:?} {o2:?}");
    let (a, b) = (summary(&s, "one.jsonl"), summary(&s, "two.jsonl"));
    let prefix = tokens(&a, "prefix_prefilled");
    assert!(prefix > 200, "first run prefilled the prefix: {a}");
    assert_eq!(tokens(&a, "prefix_restored"), 0);
    assert_eq!(
        tokens(&b, "prefix_prefilled"),
        0,
        "second run prefilled nothing: {b}"
    );
    assert_eq!(tokens(&b, "prefix_restored"), prefix);
    assert_eq!(
        tokens(&b, "prompt_computed"),
        tokens(&a, "prompt_computed") - prefix
    );
    assert_eq!(b["prefixes"][0]["source"], "restored");
    assert_eq!(contents(&first), contents(&second));
    for (id, v) in &second {
        assert_eq!(
            usage(v, "cached_tokens"),
            usage(&first[id], "cached_tokens")
        );
    }
}

/// Rewrites a state file's checksum so only the identity checks can catch a change.
fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 32;
    let sum = Sha256::digest(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum);
}

#[test]
fn corrupt_or_foreign_state_files_are_detected_reported_and_rebuilt() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = batch(&s, &[rubric(120)], 3);
    let (_, baseline) = run_batch(&s, &input, "base.jsonl", &[]);
    let files = state_files(&s.path("prefix-cache"));
    assert_eq!(files.len(), 1);
    let file = &files[0];

    // Header layout: magic 0..8, version 8..12, header length 12..16, then the model hash
    // (16..48), the computation identity's length (48..56) and the identity, as JSON.
    type Corrupt = fn(&mut Vec<u8>);
    let cases: [(&str, &str, Corrupt); 5] = [
        ("truncated", "truncated", |b| b.truncate(b.len() / 2)),
        ("flipped bit", "checksum", |b| {
            let mid = b.len() / 2;
            b[mid] ^= 0x04;
        }),
        ("other model", "another model", |b| {
            b[20] ^= 0xff;
            reseal(b);
        }),
        (
            "another machine",
            "the machine's backend was \"gpu\", now \"cpu\"",
            |b| {
                let at = b
                    .windows(13)
                    .position(|w| w == br#""backend":"cp"#)
                    .expect("the identity names the backend");
                b[at + 11] = b'g';
                reseal(b);
            },
        ),
        ("other format version", "format version", |b| {
            b[8..12].copy_from_slice(&99u32.to_le_bytes());
            reseal(b);
        }),
    ];
    for (i, (what, reason, corrupt)) in cases.iter().enumerate() {
        let mut bytes = std::fs::read(file).unwrap();
        corrupt(&mut bytes);
        std::fs::write(file, &bytes).unwrap();
        let out = format!("case{i}.jsonl");
        let (o, results) = run_batch(&s, &input, &out, &[]);
        assert!(o.status.success(), "{what}: {o:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("invalid") && stderr.contains(reason),
            "{what}: {stderr}"
        );
        let sum = summary(&s, &out);
        assert_eq!(tokens(&sum, "prefix_restored"), 0, "{what}: not trusted");
        assert!(tokens(&sum, "prefix_prefilled") > 0, "{what}: rebuilt");
        assert_eq!(
            contents(&results),
            contents(&baseline),
            "{what}: same output"
        );
    }
    // The last rebuild left a valid file that the next run restores.
    let (_, again) = run_batch(&s, &input, "again.jsonl", &[]);
    assert!(tokens(&summary(&s, "again.jsonl"), "prefix_restored") > 0);
    assert_eq!(contents(&again), contents(&baseline));
}

#[test]
fn two_processes_writing_the_same_prefix_leave_one_valid_file() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = batch(&s, &[rubric(150)], 2);
    let cache = s.path("shared-cache");
    let model = model_path();
    let spawn = |out: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_infer-batch"))
            .args(["--model", model.to_str().unwrap(), "--threads", "1"])
            .args(["--prefix-cache-dir", cache.to_str().unwrap()])
            .args(["-o", s.path(out).to_str().unwrap()])
            .arg(&input)
            .env("INFER_BATCH_LOG", "warn")
            .env("XDG_CACHE_HOME", test_cache_home())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("a.jsonl"), spawn("b.jsonl"));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let names: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".ibprefix")).count(),
        1,
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    let (o, _) = run_batch(
        &s,
        &input,
        "c.jsonl",
        &["--prefix-cache-dir", cache.to_str().unwrap()],
    );
    assert!(o.status.success());
    assert!(
        tokens(&summary(&s, "c.jsonl"), "prefix_restored") > 0,
        "the file is valid"
    );
}

#[test]
fn eviction_holds_the_size_bound() {
    let _lock = model_lock();
    let s = Scratch::new();
    let systems: Vec<String> = (0..3)
        .map(|i| format!("{}\nVariant {i}.", rubric(60)))
        .collect();
    let input = batch(&s, &systems, 3);
    // Learn one file's size from a run without a bound, in another directory.
    let probe = s.path("probe-cache");
    run_batch(
        &s,
        &input,
        "probe.jsonl",
        &["--prefix-cache-dir", probe.to_str().unwrap()],
    );
    let sizes: Vec<u64> = state_files(&probe)
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .collect();
    assert_eq!(sizes.len(), 3);
    let bound = sizes.iter().max().unwrap() * 2 + sizes.iter().max().unwrap() / 2;
    let bound_arg = bound.to_string();
    let (o, _) = run_batch(
        &s,
        &input,
        "bounded.jsonl",
        &["--prefix-cache-max-bytes", &bound_arg],
    );
    assert!(o.status.success());
    let kept = state_files(&s.path("prefix-cache"));
    let total: u64 = kept.iter().map(|p| p.metadata().unwrap().len()).sum();
    assert_eq!(kept.len(), 2, "one of three evicted");
    assert!(total <= bound, "{total} > {bound}");
}

#[test]
fn cache_warm_ls_and_clear() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = batch(&s, &[rubric(100), "Be brief and kind.".to_owned()], 4);
    let cache = s.path("prefix-cache");
    let model = model_path();
    let dir = ["--prefix-cache-dir", cache.to_str().unwrap()];
    let warm = infer_batch(
        &[
            &["cache", "warm", "--model", model.to_str().unwrap()],
            &dir[..],
            &[input.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(warm.status.success(), "{warm:?}");
    assert_eq!(state_files(&cache).len(), 2);

    let (o, _) = run_batch(&s, &input, "out.jsonl", &[]);
    assert!(o.status.success());
    let sum = summary(&s, "out.jsonl");
    assert_eq!(
        tokens(&sum, "prefix_prefilled"),
        0,
        "warm prepared every prefix: {sum}"
    );

    let ls = infer_batch(&[&["cache", "ls"], &dir[..]].concat());
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(listing.contains("2 states"), "{listing}");

    // `clear` removes our states and the temporary files of dead writers, nothing else: not a
    // live writer's file, nor files that only look like ours in a shared directory.
    let stale = cache.join(format!(".{}.ab12Cd.tmp", state_name(&cache)));
    let live = cache.join(format!(".{}.Ef34Gh.tmp", state_name(&cache)));
    let unrelated = ["notes.tmp", ".build.1234.tmp", "other.ibprefix"].map(|n| cache.join(n));
    for p in [&stale, &live].into_iter().chain(&unrelated) {
        std::fs::write(p, b"not ours to judge").unwrap();
    }
    let writer = std::fs::File::open(&live).unwrap();
    writer.try_lock().unwrap();
    let clear = infer_batch(&[&["cache", "clear"], &dir[..]].concat());
    assert!(clear.status.success());
    assert_eq!(
        String::from_utf8_lossy(&clear.stdout).trim(),
        format!("removed 3 files from {}", cache.display())
    );
    assert!(state_files(&cache)
        .iter()
        .all(|p| p.file_name().unwrap() == "other.ibprefix"));
    assert!(!stale.exists());
    assert!(live.exists(), "a live writer's file stays");
    for p in &unrelated {
        assert!(p.exists(), "{} is not ours", p.display());
    }
}

/// The file name of one state in `dir`.
fn state_name(dir: &Path) -> String {
    state_files(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .find(|n| n.len() == 32 + ".ibprefix".len())
        .expect("a state file")
}

#[test]
fn the_cache_directory_is_private_and_the_model_hash_is_remembered_without_it() {
    use std::os::unix::fs::PermissionsExt;
    let _lock = model_lock();
    let s = Scratch::new();
    let input = batch(&s, &["Be brief.".to_owned()], 1);
    let cache = s.path("new/cache");
    let dir = ["--prefix-cache-dir", cache.to_str().unwrap()];
    let (o, _) = run_batch(&s, &input, "a.jsonl", &dir);
    assert!(o.status.success(), "{o:?}");
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "created private to its user");

    // Under --no-disk-cache no state is written, but the model's hash is still remembered, so
    // a large model is not hashed again at every start.
    let other = s.path("memo-only");
    let (o, _) = run_batch(
        &s,
        &input,
        "b.jsonl",
        &[
            "--no-disk-cache",
            "--prefix-cache-dir",
            other.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{o:?}");
    assert!(state_files(&other).is_empty());
    let memos = std::fs::read_dir(other.join("model-ids")).unwrap().count();
    assert_eq!(memos, 1);
}

#[test]
fn bench_compares_naive_memory_and_disk_on_a_sample_of_the_input() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = batch(&s, &[rubric(80)], 6);
    let model = model_path();
    let json_path = s.path("bench.json");
    let o = infer_batch(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "4",
        "--sample",
        "3",
        "--parallel",
        "1,2",
        "--json",
        json_path.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{o:?}");
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("3 requests sampled of 6"), "{table}");
    assert!(table.contains("the whole input (6 requests)"), "{table}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["measurements"].as_array().unwrap().len(), 6);
    let row = |mode: &str, p: u64| {
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["median"]["mode"] == mode && r["median"]["parallel"] == p)
            .unwrap()["median"]
            .clone()
    };
    for p in [1, 2] {
        let (naive, memory, disk) = (row("naive", p), row("memory", p), row("disk", p));
        assert_eq!(naive["prompt_reused"], 0);
        assert!(memory["prompt_reused"].as_u64().unwrap() > 0);
        let computed = |m: &Value| m["prompt_computed"].as_u64().unwrap();
        assert!(computed(&disk) < computed(&memory) && computed(&memory) < computed(&naive));
        assert!(
            disk["prefix_restored"].as_u64().unwrap() > 0,
            "disk restored its prefix"
        );
        assert_eq!(naive["requests"], 3);
    }
    assert!(s.path("bench.svg").is_file(), "a plot beside the JSON");
}
