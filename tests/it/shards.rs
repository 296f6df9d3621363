//! Sharding without a cluster: two shard processes side by side on one warmed prefix, one
//! killed and resumed, then merged and compared with a single-process run. The merge refuses
//! anything incomplete, duplicated or disagreeing, and names it.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::harness::*;

/// 12 requests, a line that is not JSON, and a duplicate id: 14 lines that get output lines.
fn input(s: &Scratch) -> PathBuf {
    let system = rubric(120);
    let mut lines: Vec<String> = (0..12)
        .map(|i| {
            request(
                &format!("cand-{i}"),
                Some(&system),
                &profile(i),
                json!({"max_tokens": 12, "temperature": 0}),
            )
        })
        .collect();
    lines.insert(5, "{not json".to_owned());
    lines.push(request("cand-3", Some(&system), "again", json!({})));
    s.write_lines("in.jsonl", &lines)
}

fn run_args(s: &Scratch, input: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let model = model_path();
    let mut a: Vec<String> = [
        "--model",
        model.to_str().unwrap(),
        "--prefix-cache-dir",
        s.path("shared-cache").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn merge(main: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["merge", main.to_str().unwrap()];
    args.extend_from_slice(extra);
    infer_batch(&args)
}

fn shard_out(s: &Scratch, k: u32) -> PathBuf {
    s.path(&format!("out.shard-000{k}-of-0002.jsonl"))
}

fn summary_of(path: &Path) -> Value {
    let text = std::fs::read_to_string(path.with_extension("summary.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn shards_side_by_side_killed_resumed_and_merged_equal_one_process() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let single = s.path("single.jsonl");
    assert_eq!(
        spawn(&run_args(&s, &input, &single, &["--threads", "1"]))
            .wait()
            .unwrap()
            .code(),
        Some(1)
    );
    let want = essences(&single);
    assert_eq!(want.len(), 14);

    // One warm job computes the prefix; the shards restore it.
    let model = model_path();
    let warm = infer_batch(&[
        "cache",
        "warm",
        "--model",
        model.to_str().unwrap(),
        "--prefix-cache-dir",
        s.path("shared-cache").to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert!(warm.status.success(), "{warm:?}");

    let main = s.path("out.jsonl");
    let shard = |k: u32| {
        run_args(
            &s,
            &input,
            &main,
            &["--threads", "1", "--shard", &format!("{k}/2")],
        )
    };
    let mut zero = spawn(&shard(0));
    let mut one = spawn(&shard(1));
    assert!(wait_until(&mut one, || line_count(&shard_out(&s, 1)) >= 2));
    send_signal("-KILL", i64::from(one.id()));
    one.wait().unwrap();
    let before = line_count(&shard_out(&s, 1));
    assert_eq!(zero.wait().unwrap().code().map(|c| c <= 1), Some(true));

    // Shard 1 is unfinished: the merge refuses, names it and what is missing, writes nothing.
    let o = merge(&main, &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unfinished shards: 1/2") && err.contains("missing"),
        "{err}"
    );
    assert!(!main.exists(), "no partial merge");
    let status: Value =
        serde_json::from_slice(&infer_batch(&["status", "--json", main.to_str().unwrap()]).stdout)
            .unwrap();
    assert_eq!(status["shards"].as_array().unwrap().len(), 2, "{status}");
    assert_eq!(status["status"], "in_progress", "{status}");

    // The resumed shard computes only what it lacked.
    assert!(spawn(&shard(1)).wait().unwrap().code().unwrap() <= 1);
    let resumed = summary_of(&shard_out(&s, 1));
    let total = line_count(&shard_out(&s, 1));
    let ran = resumed["requests"]["ok"].as_u64().unwrap()
        + resumed["requests"]["failed"].as_u64().unwrap();
    assert_eq!(ran as usize, total - before, "{resumed}");
    for k in 0..2 {
        let sum = summary_of(&shard_out(&s, k));
        assert_eq!(
            sum["tokens"]["prefix_prefilled"], 0,
            "shard {k} restored the warm prefix"
        );
    }

    let o = merge(&main, &["--order", "input"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(essences(&main), want, "merged equals one process");
    // Input order: success lines by their input line, error lines by the line they name.
    let order: Vec<String> = read_results(&main)
        .iter()
        .map(|v| {
            v["custom_id"]
                .as_str()
                .map_or_else(|| format!("line:{}", v["error"]["line"]), str::to_owned)
        })
        .collect();
    assert_eq!(order.first().map(String::as_str), Some("cand-0"));
    assert_eq!(order[5], "line:6", "{order:?}");
    let status: Value =
        serde_json::from_slice(&infer_batch(&["status", "--json", main.to_str().unwrap()]).stdout)
            .unwrap();
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["request_counts"]["total"], 14);
    let merged = summary_of(&main);
    assert_eq!(merged["requests"]["ok"], 12, "{merged}");
    assert_eq!(merged["requests"]["failed"], 2, "{merged}");
}

#[test]
fn merge_refuses_duplicates_disagreement_and_missing_shards() {
    let s = Scratch::new();
    let input = input(&s);
    let main = s.path("out.jsonl");
    let o = merge(&main, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no shard outputs"));

    // Two hand-made shards of a two-line input: each manifest as a run writes it.
    let text = std::fs::read_to_string(&input).unwrap();
    let two: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&input, two.join("\n") + "\n").unwrap();
    let sha = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(std::fs::read(&input).unwrap()))
    };
    let ids: Vec<String> = two
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let shard_of = |id: &str| infer_batch::formats::shard::shard_of(id.as_bytes(), 2);
    let write_shard_on = |k: u32, seed: u64, backend: &str, anywhere: bool, lines: &[&String]| {
        let out = shard_out(&s, k);
        let body: String = lines
            .iter()
            .map(|id| format!("{}\n", json!({"custom_id": id, "response": {"status_code": 200, "body": {}}, "error": null})))
            .collect();
        std::fs::write(&out, body).unwrap();
        let manifest = json!({
            "version": 2,
            "input": {"path": input, "sha256": sha, "total": lines.len()},
            "model": {"path": "m.gguf"},
            "identity": {"model": "m", "machine": {"backend": backend},
                         "settings": {"batch-size": 256}, "output": {"seed": seed}},
            "resume_anywhere": anywhere,
            "runs": [],
            "state": "finished",
            "shard": {"index": k, "count": 2},
        });
        std::fs::write(out.with_extension("manifest.json"), manifest.to_string()).unwrap();
    };
    let write_shard =
        |k: u32, seed: u64, lines: &[&String]| write_shard_on(k, seed, "cpu", false, lines);
    let in_shard = |k: u32| -> Vec<&String> { ids.iter().filter(|id| shard_of(id) == k).collect() };
    write_shard(0, 1, &in_shard(0));
    let o = merge(&main, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("have no output: 1/2"),
        "{o:?}"
    );

    write_shard(1, 2, &in_shard(1));
    let o = merge(&main, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--seed was 1, now 2"),
        "{o:?}"
    );

    // Agreeing shards, but one request written by both.
    let all: Vec<&String> = ids.iter().collect();
    write_shard(1, 1, &[in_shard(1).as_slice(), &all[..1]].concat());
    let o = merge(&main, &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("written twice") && err.contains(all[0].as_str()),
        "{err}"
    );
    assert!(!main.exists());

    // Shards computed on other machines: refused, unless every shard accepted that.
    write_shard_on(1, 1, "cpu+vulkan", false, &in_shard(1));
    let o = merge(&main, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("the machine's backend was \"cpu\", now \"cpu+vulkan\""),
        "{o:?}"
    );
    write_shard_on(0, 1, "cpu", true, &in_shard(0));
    let o = merge(&main, &[]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "one shard alone cannot accept for all"
    );
    write_shard_on(1, 1, "cpu+vulkan", true, &in_shard(1));
    let o = merge(&main, &[]);
    assert!(o.status.success(), "{o:?}");
    let merged: Value = serde_json::from_str(
        &std::fs::read_to_string(main.with_extension("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        merged["other_machines"],
        json!([{"backend": "cpu+vulkan"}]),
        "{merged}"
    );
    std::fs::remove_file(&main).unwrap();

    write_shard(0, 1, &in_shard(0));
    write_shard(1, 1, &in_shard(1));
    let o = merge(&main, &[]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(read_results(&main).len(), 2);
}
