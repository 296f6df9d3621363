//! Chat templates: the GGUF's own rendered as Jinja, llama.cpp's built-in ones by name, Jinja
//! files; and Gemma 3, which carries none, end to end with `--chat-template gemma`.

use serde_json::json;

use crate::harness::*;

fn gemma_batch(s: &Scratch) -> std::path::PathBuf {
    let system = rubric(100);
    let lines: Vec<String> = (0..4)
        .map(|i| {
            request(
                &format!("g{i}"),
                Some(&system),
                &profile(i),
                json!({"max_tokens": 10, "temperature": 0}),
            )
        })
        .collect();
    s.write_lines("in.jsonl", &lines)
}

#[test]
fn a_model_without_a_chat_template_exits_2_naming_the_flag() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = s.write_lines("in.jsonl", &[request("a", None, "x", json!({}))]);
    let out_path = s.path("out.jsonl");
    let gemma = gemma_path();
    let out = infer_batch(&[
        "--model",
        gemma.to_str().unwrap(),
        "-o",
        out_path.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no chat template")
            && err.contains("--chat-template")
            && err.contains("gemma"),
        "{err}"
    );
    assert!(
        read_results(&out_path).is_empty(),
        "no error line per request"
    );

    let out = infer_batch(&[
        "--model",
        gemma.to_str().unwrap(),
        "--chat-template",
        "no-such-template",
        input.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-template") && err.contains("chatml"),
        "{err}"
    );
}

#[test]
fn gemma_runs_end_to_end_shared_equal_to_naive_and_restored_equal_to_memory() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = gemma_batch(&s);
    let gemma = gemma_path();
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "--model",
            gemma.to_str().unwrap(),
            "--chat-template",
            "gemma",
            "--parallel",
            "2",
        ];
        args.extend_from_slice(extra);
        run_batch_with_model(&s, &input, out, &args)
    };
    let (o, naive) = run("naive.jsonl", &["--no-prefix-cache"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let (o, first) = run("first.jsonl", &[]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let (o, restored) = run("restored.jsonl", &[]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(summary(&s, "first.jsonl")["tokens"]["prefix_restored"], 0);
    assert!(
        summary(&s, "restored.jsonl")["tokens"]["prefix_restored"]
            .as_u64()
            .unwrap()
            > 100
    );
    assert_eq!(naive.len(), 4);
    for (id, n) in &naive {
        for (what, other) in [("shared", &first[id]), ("restored", &restored[id])] {
            assert_eq!(
                content(other),
                content(n),
                "{id}: {what} differs from naive"
            );
            assert_eq!(usage(other, "prompt_tokens"), usage(n, "prompt_tokens"));
            assert_eq!(
                usage(other, "completion_tokens"),
                usage(n, "completion_tokens")
            );
        }
        assert!(
            usage(&first[id], "cached_tokens") > 100,
            "{id} shared its prefix"
        );
        assert_eq!(usage(n, "cached_tokens"), 0);
    }
}

#[test]
fn a_jinja_file_renders_prompts_and_its_exceptions_become_error_lines() {
    let _lock = model_lock();
    let s = Scratch::new();
    // ChatML without the GGUF's default system prompt, and no assistant turns allowed.
    let template = s.path("strict.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ raise_exception('assistant turns are not graded') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let ok = json!({"max_tokens": 4, "temperature": 0});
    let lines = vec![
        request("plain", Some("Be brief."), "Hi", ok.clone()),
        json!({"custom_id": "turns", "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Again"}], "max_tokens": 4})
        .to_string(),
    ];
    let input = s.write_lines("in.jsonl", &lines);
    let (o, results) = run_batch(
        &s,
        &input,
        "out.jsonl",
        &["--chat-template", template.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(results["plain"]["error"].is_null(), "{}", results["plain"]);
    let e = &results["turns"]["error"];
    assert_eq!(e["code"], "invalid_messages");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("assistant turns are not graded"),
        "{e}"
    );

    // The GGUF's own template (the default) adds SmolLM2's default system prompt when a
    // conversation has none; the file does not: the prompts differ by those tokens.
    let no_system = s.write_lines("nosys.jsonl", &[request("n", None, "Hi", ok)]);
    let (_, gguf) = run_batch(&s, &no_system, "gguf.jsonl", &[]);
    let (_, file) = run_batch(
        &s,
        &no_system,
        "file.jsonl",
        &["--chat-template", template.to_str().unwrap()],
    );
    assert!(usage(&gguf["n"], "prompt_tokens") > usage(&file["n"], "prompt_tokens") + 5);
}
