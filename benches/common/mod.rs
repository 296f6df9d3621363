//! What the criterion benches share: the default model, the thread count, and prefixes of an
//! exact token length.

use std::path::Path;

use infer_batch::commands::cli::physical_cores;
use infer_batch::engine::{Model, ModelSettings, Token};

/// The default model, which `./models/fetch.sh` puts in place.
pub fn model() -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    Model::load(&ModelSettings {
        path,
        gpu_layers: 0,
        verbose: false,
    })
    .expect("run ./models/fetch.sh first")
}

/// `INFER_BATCH_BENCH_THREADS`, else the physical cores (the binary's default).
pub fn threads() -> u32 {
    std::env::var("INFER_BATCH_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(physical_cores)
}

/// Exactly `n` tokens of rubric-like text.
pub fn prefix_tokens(model: &Model, n: usize) -> Vec<Token> {
    let mut text = String::new();
    let mut i = 0;
    loop {
        text.push_str(&format!(
            "Criterion {i}: rate the candidate's evidence of shipped work from 0 to 3, citing only the profile. "
        ));
        let mut tokens = model.tokenize(&text);
        if tokens.len() >= n {
            tokens.truncate(n);
            return tokens;
        }
        i += 1;
    }
}
