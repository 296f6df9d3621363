//! Command-line arguments, turned into a validated [`RunConfig`] before anything runs.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::commands::merge::Order;
use crate::engine::embed::Pooling;
use crate::engine::{FlashAttn, KvType, KvTypes};
use crate::formats::shard::Shard;
use crate::input::fields::FieldPolicy;
use crate::prompt::template::{TemplateChoice, TemplateKwargs};
use crate::prompt::thinking::{ReasoningFormat, DEFAULT_BUDGETS};
use crate::schedule::job::Defaults;
use crate::schedule::scheduler::EXACT_MAX_ROWS;

/// Default prefill chunk and batch size, in tokens.
pub const DEFAULT_BATCH: u32 = 512;
/// Default number of sequences decoded together.
pub const DEFAULT_PARALLEL: u32 = 4;
/// Default `max_tokens` for requests that give none.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Default size bound of the prefix cache directory: 4 GiB.
pub const DEFAULT_PREFIX_CACHE_MAX_BYTES: u64 = 4 << 30;
/// Default interval between syncs of the output to disk.
pub const DEFAULT_FSYNC_MS: u64 = 2000;
/// Default number of distinct shared prefixes kept in the KV cache at once.
pub const DEFAULT_RESIDENT_PREFIXES: u32 = 4;

/// `--version`: ours (with the git commit) and the llama.cpp we link, as the computation
/// identity names them, so a benchmark or a bug report can record both.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("INFER_BATCH_GIT_COMMIT"),
    ")\nllama.cpp: llama-cpp-sys-2 ",
    env!("INFER_BATCH_LLAMA_CPP_SYS_VERSION"),
    " (",
    env!("INFER_BATCH_LLAMA_CPP_SOURCES"),
    "), ",
    env!("INFER_BATCH_LLAMA_LIB_PROFILE"),
    "\ncompiler: ",
    env!("INFER_BATCH_LLAMA_CPP_COMPILER"),
    "\nbackends: ",
    env!("INFER_BATCH_BACKENDS")
);

/// Offline batch inference on a GGUF model: the shared system prompt is prefilled once, and
/// every request decodes from it independently.
#[derive(Debug, Parser)]
#[command(
    name = "infer-batch",
    version = VERSION,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A management command instead of a batch run.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The batch run.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Management commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a run's progress from its output and manifest, without loading the model.
    Status {
        /// The output file of the run.
        #[arg(value_name = "OUTPUT.jsonl")]
        output: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Join the shard outputs of OUTPUT (`OUTPUT.shard-K-of-N.jsonl`) into OUTPUT, checking
    /// that every input request appears exactly once; refuses (exit 2) and lists what is missing
    /// or duplicated otherwise.
    Merge {
        /// The main output the shards were named after.
        #[arg(value_name = "OUTPUT.jsonl")]
        output: PathBuf,
        /// Where the shard outputs are [default: beside OUTPUT].
        #[arg(long, value_name = "DIR")]
        shards: Option<PathBuf>,
        /// The order of the merged lines.
        #[arg(long, value_enum, default_value_t = Order::Completion)]
        order: Order,
    },
    /// Measure prefix-cache reuse on a sample of your own requests: naive re-prefill, the
    /// prefix shared in memory, and restored from disk, at each --parallel. Prints a table and
    /// what the whole input would take.
    Bench {
        /// What to run and how.
        #[command(flatten)]
        args: Box<BenchArgs>,
    },
    /// Serve OpenAI's Files and Batches API on a local port: batches run one after another
    /// on this model, with the run's flags, and survive crashes and restarts.
    Serve {
        /// The server's flags and the run's.
        #[command(flatten)]
        args: Box<ServeArgs>,
    },
    /// Manage the on-disk prefix state cache.
    Cache {
        /// What to do.
        #[command(subcommand)]
        action: CacheAction,
    },
}

/// Prefix cache actions.
#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// List stored prefix states: tokens, bytes, model, last use.
    Ls {
        /// The cache directory [default: $XDG_CACHE_HOME/infer-batch].
        #[arg(long, value_name = "DIR")]
        prefix_cache_dir: Option<PathBuf>,
    },
    /// Delete every stored prefix state.
    Clear {
        /// The cache directory [default: $XDG_CACHE_HOME/infer-batch].
        #[arg(long, value_name = "DIR")]
        prefix_cache_dir: Option<PathBuf>,
    },
    /// Prefill and store the prefixes of an input without decoding anything (to prepare
    /// shards).
    Warm {
        /// Same flags as a batch run; only those that shape the prefix state matter.
        #[command(flatten)]
        run: Box<RunArgs>,
    },
}

/// Arguments of `infer-batch serve`: the run's (no input or output: those come through the
/// API) and the server's own.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Every batch runs with these flags.
    #[command(flatten)]
    pub run: RunArgs,

    /// The address to listen on. Anything but loopback needs --api-key-file.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub host: std::net::IpAddr,

    /// The port to listen on (0: any free one, printed at start).
    #[arg(long, default_value_t = 8080, value_name = "PORT")]
    pub port: u16,

    /// Where files, batches and the database live.
    #[arg(long, default_value = "infer-batch-data", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// A file whose first line is the API key every request must send as
    /// `Authorization: Bearer KEY`.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,

    /// The largest file upload, in bytes.
    #[arg(long, default_value_t = 200_000_000, value_name = "BYTES")]
    pub max_upload_bytes: u64,

    /// Seconds a request (an upload included) may take before it gets 408.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub request_timeout: u64,
}

impl ServeArgs {
    /// Checks the run's flags as a batch would take them, and refuses those that belong to
    /// one run only.
    ///
    /// # Errors
    /// A flag `serve` cannot take, or one the run would refuse.
    pub fn check_run_flags(&self) -> Result<(), UsageError> {
        let c = &self.run.common;
        let refused = [
            (
                c.input.is_some(),
                "input file: clients upload theirs (POST /v1/files)",
            ),
            (
                c.output.is_some(),
                "--output: each batch gets its own output file",
            ),
            (
                c.restart,
                "--restart: it would throw away a resumed batch's progress",
            ),
            (
                c.shard.is_some(),
                "--shard: shards are for Slurm runs of the command line",
            ),
            (
                c.dry_run,
                "--dry-run: run it on the command line with an input",
            ),
            (c.retry_failed, "--retry-failed: it applies to one output"),
        ];
        if let Some((_, what)) = refused.iter().find(|(given, _)| *given) {
            return Err(UsageError(format!("serve takes no {what}")));
        }
        let mut probe = self.run.clone();
        probe.common.input = Some(PathBuf::from("batch.jsonl"));
        let cfg = probe.resolve()?;
        // Checked now, not at the first batch: a server that cannot run one should not start.
        if !cfg.model.is_file() {
            return Err(UsageError(format!(
                "--model {} is not a file (./models/fetch.sh fetches the default model)",
                cfg.model.display()
            )));
        }
        Ok(())
    }
}

/// Arguments of a batch run.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Everything but `--parallel`.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Sequences decoded together.
    #[arg(long, default_value_t = DEFAULT_PARALLEL, value_name = "N")]
    pub parallel: u32,
}

impl RunArgs {
    /// Resolves defaults and checks ranges.
    ///
    /// # Errors
    /// A [`UsageError`] that names the flag and the fix.
    pub fn resolve(&self) -> Result<RunConfig, UsageError> {
        self.common.resolve(self.parallel)
    }
}

/// Arguments of `infer-batch bench`: a run's, with a list of `--parallel` values.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The run's flags (model, input, threads, ...).
    #[command(flatten)]
    pub common: CommonArgs,

    /// The `--parallel` values to compare.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,4,8",
        value_name = "N,N,..."
    )]
    pub parallel: Vec<u32>,

    /// Requests sampled from the input (by a hash of their `custom_id`, so the same ones each
    /// time, spread over the whole input).
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub sample: usize,

    /// Repetitions of each configuration, interleaved; medians are reported.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub reps: u32,

    /// Write every measurement as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// Write a plot of requests/s against --parallel here (SVG) [default: beside --json].
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,
}

/// The arguments every batch run takes, `--parallel` aside.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// The GGUF model file.
    #[arg(long, short = 'm', value_name = "GGUF")]
    pub model: Option<PathBuf>,

    /// Input: one OpenAI Batch request per line (JSONL).
    #[arg(value_name = "INPUT.jsonl")]
    pub input: Option<PathBuf>,

    /// Output file [default: the input with `.jsonl` replaced by `.results.jsonl`].
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// CPU threads [default: the physical cores].
    #[arg(long, value_name = "N")]
    pub threads: Option<u32>,

    /// `max_tokens` for requests that give none.
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS, value_name = "N")]
    pub max_tokens: u32,

    /// `temperature` for requests that give none (0 is greedy).
    #[arg(long, default_value_t = 1.0, value_name = "T")]
    pub temperature: f32,

    /// Base seed; a request without its own `seed` samples with one derived from this and its
    /// `custom_id`.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,

    /// Model layers offloaded to the GPU, a number or `all` [default: all on a GPU build
    /// (`cuda`, `vulkan`), else 0]. Fewer are offloaded when the plan does not fit the VRAM.
    #[arg(long, value_name = "N|all", value_parser = parse_layers)]
    pub gpu_layers: Option<u32>,

    /// Naive baseline: every request computes its whole prompt, nothing is shared.
    #[arg(long)]
    pub no_prefix_cache: bool,

    /// KV cache size in tokens [default: the largest resident prefixes plus `--parallel` times
    /// the largest per-request need].
    #[arg(long, value_name = "TOKENS")]
    pub ctx_size: Option<u32>,

    /// Let batch-mates change a request's output in the last bits, for less KV memory: one
    /// unified KV cache where a prefix sits once for all slots, and mixed batches. By default
    /// every request's output is independent of its batch-mates, so it is the same at any
    /// --parallel and after a resume.
    #[arg(long)]
    pub no_deterministic: bool,

    /// llama.cpp's flash-attention kernels [default: off, on with a quantized
    /// --cache-type-v, llama.cpp's choice with --no-deterministic]. In deterministic mode `on`
    /// is exact too: prompts are prefilled alone and the start-up probe decides the decode
    /// groups with it; `auto` is a fixed choice there, off, so that a run and its resume never
    /// differ in it.
    #[arg(long, value_enum, value_name = "WHEN")]
    pub flash_attn: Option<FlashAttn>,

    /// The KV cache's key type. Quantized types hold more sequences in the same memory and
    /// change the outputs a little (docs/benchmarks.md measures how much).
    #[arg(long, value_enum, default_value_t, value_name = "TYPE")]
    pub cache_type_k: KvType,

    /// The KV cache's value type. llama.cpp needs flash attention for a quantized one: it is
    /// turned on, and `--flash-attn off` is refused.
    #[arg(long, value_enum, default_value_t, value_name = "TYPE")]
    pub cache_type_v: KvType,

    /// Most tokens per decode call, and the prefill chunk size.
    #[arg(long, default_value_t = DEFAULT_BATCH, value_name = "TOKENS")]
    pub batch_size: u32,

    /// Distinct shared prefixes kept in the KV cache at once.
    #[arg(long, default_value_t = DEFAULT_RESIDENT_PREFIXES, value_name = "N")]
    pub max_prefixes: u32,

    /// Where prefix states are kept between runs [default: $XDG_CACHE_HOME/infer-batch, or
    /// ~/.cache/infer-batch].
    #[arg(long, value_name = "DIR")]
    pub prefix_cache_dir: Option<PathBuf>,

    /// Keep prefix states in memory only: neither read nor write the disk cache.
    #[arg(long)]
    pub no_disk_cache: bool,

    /// Size bound of the prefix cache directory; least recently used states go first.
    #[arg(long, default_value_t = DEFAULT_PREFIX_CACHE_MAX_BYTES, value_name = "BYTES")]
    pub prefix_cache_max_bytes: u64,

    /// Start over: delete the output and its manifest instead of resuming into them.
    #[arg(long)]
    pub restart: bool,

    /// On resume, run again the requests that got error lines.
    #[arg(long)]
    pub retry_failed: bool,

    /// Resume into an output whose lines were computed on another machine (another build,
    /// backend, device, CPU variant or offload), knowing that their bits may differ from this
    /// machine's. The manifest and the summary record every machine, and `merge` accepts such
    /// shards only if all of them were run with this flag.
    #[arg(long)]
    pub resume_anywhere: bool,

    /// An earlier output (repeatable): a request whose computation matches one of its results
    /// (same model and engine settings, prompt tokens, sampling, seed, constraint, endpoint)
    /// takes a copy, with its own ids, instead of running. Its manifest must show the same
    /// model and engine settings, in deterministic mode.
    #[arg(long, value_name = "PREVIOUS.jsonl")]
    pub reuse: Vec<PathBuf>,

    /// How `/v1/embeddings` pools a sequence's token vectors into one [default: the GGUF's
    /// `pooling_type`, else `mean`].
    #[arg(long, value_enum, value_name = "HOW")]
    pub pooling: Option<Pooling>,

    /// Return embeddings as the model gives them, not scaled to unit length.
    #[arg(long)]
    pub no_normalize_embeddings: bool,

    /// Compute every request, even one identical to another in the file (by default, in
    /// deterministic mode, identical requests are computed once and the others take a copy).
    #[arg(long)]
    pub no_dedup: bool,

    /// Sync the output to disk at least this often (0: after every line).
    #[arg(long, default_value_t = DEFAULT_FSYNC_MS, value_name = "MS")]
    pub fsync_interval_ms: u64,

    /// Memory the run may use, in bytes [default: 90% of the RAM free at start]. A plan that
    /// does not fit runs with fewer slots, or not at all.
    #[arg(long, value_name = "BYTES")]
    pub memory_budget: Option<u64>,

    /// VRAM the run may use on the first GPU, in bytes [default: 90% of what it has free at
    /// start]. Offloaded layers that do not fit come down, after --parallel.
    #[arg(long, value_name = "BYTES")]
    pub vram_budget: Option<u64>,

    /// Scan the input, print the plan and its memory footprint as JSON, and exit.
    #[arg(long)]
    pub dry_run: bool,

    /// Run the batch in a worker process and restart it (resuming) when it dies abnormally;
    /// after a SIGKILL, which is most likely the OOM killer, with half the --parallel.
    #[arg(long)]
    pub supervise: bool,

    /// Run only shard K of N (0 <= K < N) of the input, chosen by a hash of each `custom_id`,
    /// into `OUTPUT.shard-K-of-N.jsonl`. `auto/N` takes K from a Slurm array task's
    /// `SLURM_ARRAY_TASK_ID` or a Kubernetes Indexed Job's `JOB_COMPLETION_INDEX`; `auto` also
    /// takes N from the array. `infer-batch merge OUTPUT` joins the shards.
    #[arg(long, value_name = "K/N|auto|auto/N")]
    pub shard: Option<String>,

    /// The chat template: one of llama.cpp's built-in names (`gemma`, `chatml`, `llama3`, ...)
    /// or a Jinja file [default: the GGUF's own template, rendered as Jinja].
    #[arg(long, value_name = "NAME|FILE")]
    pub chat_template: Option<String>,

    /// Variables every conversation's chat template gets (such as `{"enable_thinking": false}`),
    /// under each request's own `chat_template_kwargs`. A JSON object.
    #[arg(long, value_name = "JSON")]
    pub chat_template_kwargs: Option<String>,

    /// Where a reasoning model's thinking markers come from: `auto` takes `<think>` and
    /// `</think>` when the vocabulary holds each as one token, `deepseek` takes them whatever
    /// the vocabulary, `none` looks for no thinking (it stays in `content`).
    #[arg(long, value_enum, default_value_t, value_name = "FORMAT")]
    pub reasoning_format: ReasoningFormat,

    /// Thinking budgets in tokens of the efforts `low`, `medium` and `high`. A request that
    /// asks for no effort thinks with the `medium` budget, capped at half its `max_tokens`.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_BUDGETS, value_name = "LOW,MEDIUM,HIGH")]
    pub reasoning_budget: Vec<u32>,

    /// Skip request fields this version does not know instead of giving the request an error
    /// line. Known fields that are not honoured (`tools`, `"stream": true`, `audio`, ...) are
    /// still refused.
    #[arg(long)]
    pub ignore_unknown_fields: bool,

    /// Show llama.cpp's own logs and debug messages.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// Everything a batch run needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// GGUF model file.
    pub model: PathBuf,
    /// JSONL input.
    pub input: PathBuf,
    /// JSONL output.
    pub output: PathBuf,
    /// Slots decoded together.
    pub parallel: u32,
    /// CPU threads.
    pub threads: u32,
    /// Default `max_tokens`.
    pub max_tokens: u32,
    /// Default temperature.
    pub temperature: f32,
    /// Base seed.
    pub seed: u64,
    /// GPU layers.
    pub gpu_layers: u32,
    /// Share prefixes (false is the naive baseline).
    pub prefix_cache: bool,
    /// KV cache size override.
    pub ctx_size: Option<u32>,
    /// Decode batch and prefill chunk size.
    pub batch_size: u32,
    /// Attention kernels.
    pub flash_attn: FlashAttn,
    /// The KV cache's key and value types.
    pub kv_types: KvTypes,
    /// Batch-invariant outputs.
    pub deterministic: bool,
    /// Resident prefix sequences.
    pub max_prefixes: u32,
    /// Prefix state directory.
    pub prefix_cache_dir: PathBuf,
    /// Read and write prefix states on disk.
    pub disk_cache: bool,
    /// Size bound of the prefix state directory.
    pub prefix_cache_max_bytes: u64,
    /// Delete the output instead of resuming.
    pub restart: bool,
    /// Rerun requests that have error lines.
    pub retry_failed: bool,
    /// Accept resuming lines computed on another machine.
    pub resume_anywhere: bool,
    /// Earlier outputs whose results may be copied.
    pub reuse: Vec<PathBuf>,
    /// Copy results between identical requests of the file (deterministic mode only).
    pub dedup: bool,
    /// `--pooling` as given.
    pub pooling: Option<Pooling>,
    /// Scale embeddings to unit length.
    pub normalize_embeddings: bool,
    /// Longest time a written line may wait for a sync.
    pub fsync_every: std::time::Duration,
    /// Restart a dying worker.
    pub supervise: bool,
    /// Memory budget override.
    pub memory_budget: Option<u64>,
    /// VRAM budget override.
    pub vram_budget: Option<u64>,
    /// Plan only.
    pub dry_run: bool,
    /// Show progress on stderr (`infer-batch bench` shows its own).
    pub progress: bool,
    /// What unknown request fields get.
    pub fields: FieldPolicy,
    /// The shard this run serves; `output` is then that shard's output.
    pub shard: Option<Shard>,
    /// Where the chat template comes from.
    pub chat_template: TemplateChoice,
    /// `--chat-template-kwargs`.
    pub template_kwargs: TemplateKwargs,
    /// `--reasoning-format`.
    pub reasoning_format: ReasoningFormat,
    /// `--reasoning-budget`: low, medium, high.
    pub reasoning_budgets: [u32; 3],
    /// llama.cpp logs.
    pub verbose: bool,
}

impl RunConfig {
    /// The run's reasoning settings, resolved against `model`.
    pub fn think_setup(&self, model: &crate::engine::Model) -> crate::prompt::thinking::ThinkSetup {
        crate::prompt::thinking::ThinkSetup::new(
            model,
            self.reasoning_format,
            self.reasoning_budgets,
            self.template_kwargs.clone(),
        )
    }

    /// What a request that leaves a setting out gets.
    pub fn defaults(&self) -> Defaults {
        Defaults {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            seed: self.seed,
            prefix_cache: self.prefix_cache,
        }
    }
}

/// A command line that cannot run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

impl CommonArgs {
    /// The attention kernels a run uses.
    fn flash_attn(&self) -> Result<FlashAttn, UsageError> {
        if self.cache_type_v.is_quantized() {
            // Never a silent slower path: llama.cpp has no other kernel for such values.
            return match self.flash_attn {
                Some(FlashAttn::Off) => Err(UsageError(format!(
                    "--cache-type-v {} needs flash attention in llama.cpp, and --flash-attn off \
                     turns it off: drop --flash-attn off, or use --cache-type-v f16",
                    self.cache_type_v.name()
                ))),
                _ => Ok(FlashAttn::On),
            };
        }
        Ok(match (self.flash_attn, self.no_deterministic) {
            // llama.cpp's own choice could differ between a run and its resume (another
            // device, another build): deterministic mode fixes it.
            (Some(FlashAttn::Auto) | None, false) => FlashAttn::Off,
            (Some(fa), _) => fa,
            (None, true) => FlashAttn::Auto,
        })
    }

    /// Resolves defaults and checks ranges, for a run of `parallel` slots.
    ///
    /// # Errors
    /// A [`UsageError`] that names the flag and the fix.
    pub fn resolve(&self, parallel: u32) -> Result<RunConfig, UsageError> {
        let model = self.model.clone().ok_or_else(|| {
            UsageError("no model given: pass --model PATH.gguf (./models/fetch.sh fetches the default model)".into())
        })?;
        let input = self.input.clone().ok_or_else(|| {
            UsageError("no input given: pass the JSONL input file as the last argument".into())
        })?;
        let positive = |name: &str, v: u32| {
            if v == 0 {
                Err(UsageError(format!("--{name} must be at least 1")))
            } else {
                Ok(v)
            }
        };
        let parallel = positive("parallel", parallel)?;
        if parallel > 128 {
            return Err(UsageError("--parallel must be at most 128".into()));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(UsageError("--temperature must be within [0, 2]".into()));
        }
        let batch_size = positive("batch-size", self.batch_size)?;
        let step = decode_step_rows(parallel, !self.no_deterministic);
        if batch_size < step {
            return Err(UsageError(format!(
                "--batch-size {batch_size} cannot hold one decode step: with --parallel {parallel} \
                 a step feeds up to {step} tokens at once; raise --batch-size to at least {step}, \
                 or lower --parallel"
            )));
        }
        let shard = self
            .shard
            .as_deref()
            .map(|s| Shard::resolve(s, &std::env::vars().collect()))
            .transpose()
            .map_err(|e| UsageError(e.to_string()))?;
        if self.no_deterministic && !self.reuse.is_empty() {
            return Err(UsageError(
                "--reuse copies results only into a deterministic run, where a copy is what the \
                 computation would give; drop --no-deterministic"
                    .into(),
            ));
        }
        let output = self
            .output
            .clone()
            .unwrap_or_else(|| default_output(&input));
        let template_kwargs = match self.chat_template_kwargs.as_deref() {
            None => TemplateKwargs::new(),
            Some(text) => match serde_json::from_str(text) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => {
                    return Err(UsageError(format!(
                        "--chat-template-kwargs {text:?} is not a JSON object, such as \
                         '{{\"enable_thinking\": false}}'"
                    )))
                }
            },
        };
        let reasoning_budgets: [u32; 3] =
            self.reasoning_budget.clone().try_into().map_err(|_| {
                UsageError("--reasoning-budget takes three budgets: LOW,MEDIUM,HIGH".into())
            })?;
        Ok(RunConfig {
            output: shard.map_or(output.clone(), |s| s.output(&output)),
            shard,
            chat_template: TemplateChoice::from_arg(self.chat_template.as_deref()),
            template_kwargs,
            reasoning_format: self.reasoning_format,
            reasoning_budgets,
            model,
            input,
            parallel,
            threads: positive("threads", self.threads.unwrap_or_else(physical_cores))?,
            max_tokens: positive("max-tokens", self.max_tokens)?,
            temperature: self.temperature,
            seed: self.seed,
            gpu_layers: self.gpu_layers.unwrap_or(DEFAULT_GPU_LAYERS),
            prefix_cache: !self.no_prefix_cache,
            ctx_size: self.ctx_size,
            batch_size,
            flash_attn: self.flash_attn()?,
            kv_types: KvTypes {
                k: self.cache_type_k,
                v: self.cache_type_v,
            },
            deterministic: !self.no_deterministic,
            max_prefixes: positive("max-prefixes", self.max_prefixes)?,
            prefix_cache_dir: self
                .prefix_cache_dir
                .clone()
                .unwrap_or_else(crate::cache::prefix_store::default_dir),
            disk_cache: !self.no_disk_cache,
            prefix_cache_max_bytes: self.prefix_cache_max_bytes,
            restart: self.restart,
            retry_failed: self.retry_failed,
            resume_anywhere: self.resume_anywhere,
            reuse: self.reuse.clone(),
            dedup: !self.no_dedup && !self.no_deterministic,
            pooling: self.pooling,
            normalize_embeddings: !self.no_normalize_embeddings,
            fsync_every: std::time::Duration::from_millis(self.fsync_interval_ms),
            supervise: self.supervise,
            memory_budget: self.memory_budget,
            vram_budget: self.vram_budget,
            dry_run: self.dry_run,
            progress: true,
            fields: FieldPolicy {
                ignore_unknown: self.ignore_unknown_fields,
            },
            verbose: self.verbose,
        })
    }
}

/// Tokens one decode step feeds at most: every generating slot's next token in a mixed batch;
/// in deterministic mode a group of at most [`EXACT_MAX_ROWS`] generated tokens, and at least
/// two rows (a lone row may be padded, and the start-up probe decodes two).
pub fn decode_step_rows(parallel: u32, deterministic: bool) -> u32 {
    if deterministic {
        parallel.min(EXACT_MAX_ROWS as u32).max(2)
    } else {
        parallel
    }
}

/// All layers go to the GPU on a GPU build; a CPU build has nowhere to put them.
const DEFAULT_GPU_LAYERS: u32 = if env!("INFER_BATCH_GPU_BACKEND").is_empty() {
    0
} else {
    u32::MAX
};

/// `--gpu-layers`: a count, or `all` (as many as the model has).
fn parse_layers(value: &str) -> Result<u32, String> {
    if value == "all" {
        return Ok(u32::MAX);
    }
    value
        .parse()
        .map_err(|_| format!("`{value}` is neither a layer count nor `all`"))
}

/// `in.jsonl` → `in.results.jsonl`; any other name gets `.results.jsonl` appended.
pub fn default_output(input: &Path) -> PathBuf {
    crate::formats::paths::sibling_path(input, "results.jsonl")
}

/// Physical cores: llama.cpp runs 3× slower here when it also uses the hyper-threads.
pub fn physical_cores() -> u32 {
    let n = sysinfo::System::physical_core_count()
        .ok()
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    u32::try_from(n).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunConfig, UsageError> {
        let mut argv = vec!["infer-batch"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().run.resolve()
    }

    #[test]
    fn reasoning_flags_are_checked() {
        let base = ["--model", "m.gguf", "in.jsonl"];
        let with = |extra: &[&str]| {
            let mut a = base.to_vec();
            a.extend_from_slice(extra);
            parse(&a)
        };
        let c = with(&["--chat-template-kwargs", r#"{"enable_thinking": false}"#]).unwrap();
        assert_eq!(c.template_kwargs["enable_thinking"], false);
        assert_eq!(
            c.reasoning_budgets,
            crate::prompt::thinking::DEFAULT_BUDGETS
        );
        let e = with(&["--chat-template-kwargs", "[1]"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--chat-template-kwargs"), "{e}");
        let e = with(&["--reasoning-budget", "1,2"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOW,MEDIUM,HIGH"), "{e}");
        assert_eq!(
            with(&["--reasoning-budget", "1,2,3"])
                .unwrap()
                .reasoning_budgets,
            [1, 2, 3]
        );
    }

    #[test]
    fn default_output_replaces_jsonl() {
        assert_eq!(
            default_output(Path::new("/d/in.jsonl")),
            PathBuf::from("/d/in.results.jsonl")
        );
        assert_eq!(
            default_output(Path::new("batch.txt")),
            PathBuf::from("batch.txt.results.jsonl")
        );
    }

    #[test]
    fn resolves_defaults() {
        let c = parse(&["--model", "m.gguf", "in.jsonl"]).unwrap();
        assert_eq!(c.output, PathBuf::from("in.results.jsonl"));
        assert_eq!(c.parallel, DEFAULT_PARALLEL);
        assert!(c.prefix_cache);
        assert!(c.threads >= 1);
        assert!(c.deterministic);
        assert_eq!(c.flash_attn, FlashAttn::Off);
    }

    #[test]
    fn rejects_bad_values_with_the_flag_name() {
        let e = parse(&["--model", "m", "--parallel", "0", "in"]).unwrap_err();
        assert!(e.to_string().contains("--parallel"));
        let e = parse(&["in.jsonl"]).unwrap_err();
        assert!(e.to_string().contains("--model"));
        let e = parse(&["--model", "m"]).unwrap_err();
        assert!(e.to_string().contains("input"));
        let e = parse(&["--model", "m", "--batch-size", "4", "--parallel", "8", "in"]).unwrap_err();
        assert!(
            e.to_string().contains("--batch-size 4") && e.to_string().contains("at least 8"),
            "{e}"
        );
        let e = parse(&["--model", "m", "--batch-size", "1", "--parallel", "1", "in"]).unwrap_err();
        assert!(e.to_string().contains("at least 2"), "{e}");
        parse(&[
            "--model",
            "m",
            "--batch-size",
            "32",
            "--parallel",
            "64",
            "in",
        ])
        .expect("deterministic decode groups hold 32 rows");
        let e = parse(&[
            "--model",
            "m",
            "--batch-size",
            "32",
            "--parallel",
            "64",
            "--no-deterministic",
            "in",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("at least 64"), "{e}");
        let c = parse(&["--model", "m", "--flash-attn", "on", "in"]).unwrap();
        assert_eq!(c.flash_attn, FlashAttn::On);
        let c = parse(&[
            "--model",
            "m",
            "--flash-attn",
            "on",
            "--no-deterministic",
            "in",
        ]);
        assert_eq!(c.unwrap().flash_attn, FlashAttn::On);
        // `auto` is a fixed choice in deterministic mode, so a run and its resume agree on it;
        // without it, llama.cpp decides per device.
        let c = parse(&["--model", "m", "--flash-attn", "auto", "in"]).unwrap();
        assert_eq!(c.flash_attn, FlashAttn::Off);
        let c = parse(&[
            "--model",
            "m",
            "--flash-attn",
            "auto",
            "--no-deterministic",
            "in",
        ]);
        assert_eq!(c.unwrap().flash_attn, FlashAttn::Auto);
    }

    #[test]
    fn kv_types_default_to_f16_and_a_quantized_value_type_turns_flash_attention_on() {
        let c = parse(&["--model", "m", "in"]).unwrap();
        assert_eq!(c.kv_types, KvTypes::default());
        assert_eq!(c.kv_types.describe(), "f16/f16");
        let c = parse(&["--model", "m", "--cache-type-k", "q8_0", "in"]).unwrap();
        assert_eq!((c.kv_types.k, c.kv_types.v), (KvType::Q8_0, KvType::F16));
        // Quantized keys alone run without flash attention.
        assert_eq!(c.flash_attn, FlashAttn::Off);
        for v in ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] {
            let c = parse(&["--model", "m", "--cache-type-v", v, "in"]).unwrap();
            assert_eq!(c.kv_types.v.name(), v);
            assert_eq!(c.flash_attn, FlashAttn::On, "{v}");
        }
        let e = parse(&[
            "--model",
            "m",
            "--cache-type-v",
            "q4_0",
            "--flash-attn",
            "off",
            "in",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--cache-type-v q4_0") && e.contains("--flash-attn off"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_kv_type_lists_the_valid_ones() {
        let e = Cli::try_parse_from(["infer-batch", "--model", "m", "--cache-type-k", "q3", "in"])
            .unwrap_err()
            .to_string();
        for name in ["f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] {
            assert!(e.contains(name), "{e}");
        }
    }
}
