//! Command line: `ringside-engine serve [MODEL] [OPTIONS]`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// File name of the default model inside `<cache>/models/`.
pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// ringside-engine: an OpenAI-compatible llama.cpp server with continuous batching that records
/// every request into a shared-memory ring for the ringside agent.
#[derive(Debug, Parser)]
#[command(name = "ringside-engine", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a GGUF model over HTTP (OpenAI API).
    Serve(ServeArgs),
}

/// Initial state of the ring's tracing control word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Records are written.
    On,
    /// Nothing is written until the agent or CLI switches tracing on.
    Off,
}

/// `serve` options.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// GGUF model file. Default: the project's default model (Gemma 3 270M Q4_K_M) in the
    /// cache directory, installed by `scripts/install-model.sh`.
    #[arg(env = "RINGSIDE_MODEL", value_name = "MODEL")]
    pub model: Option<PathBuf>,

    /// Address to listen on.
    #[arg(long, env = "RINGSIDE_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on.
    #[arg(long, env = "RINGSIDE_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Model name(s) clients must use in `model` (the first is reported by /v1/models and in
    /// responses). Default: the model file's name without `.gguf`.
    #[arg(long, env = "RINGSIDE_SERVED_MODEL_NAME", num_args = 1.., value_delimiter = ',')]
    pub served_model_name: Vec<String>,

    /// Sequences decoded together in one batch (continuous batching slots).
    #[arg(long, env = "RINGSIDE_PARALLEL", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,

    /// Context length of each sequence, in tokens (prompt + completion). The KV cache holds
    /// `ctx-size × parallel` tokens. A longer prompt is refused with 400.
    #[arg(long, env = "RINGSIDE_CTX_SIZE", default_value = "4096")]
    pub ctx_size: NonZeroU32,

    /// Most tokens per decode step (llama.cpp `n_batch`): one token per decoding sequence,
    /// the rest of the budget goes to prompt chunks, so a long prompt never stalls the others
    /// for longer than one step.
    #[arg(long, env = "RINGSIDE_BATCH_SIZE", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(16..=8192))]
    pub batch_size: u32,

    /// CPU threads for llama.cpp. Default: the cores this process may really use.
    #[arg(long, env = "RINGSIDE_THREADS")]
    pub threads: Option<NonZeroU32>,

    /// Layers offloaded to the GPU (needs a build with `--features cuda`; ignored otherwise).
    #[arg(long, env = "RINGSIDE_N_GPU_LAYERS", default_value_t = 0)]
    pub n_gpu_layers: u32,

    /// Requests that may wait for a slot; beyond it requests are refused with 429.
    #[arg(long, env = "RINGSIDE_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// Require `Authorization: Bearer <KEY>` on /v1/* (also read from VLLM_API_KEY).
    #[arg(long, env = "RINGSIDE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Name of the shared-memory segment the agent attaches to. Default: `engine-<port>`.
    #[arg(long, env = "RINGSIDE_INSTANCE")]
    pub instance: Option<String>,

    /// Records the ring holds (a power of two).
    #[arg(long, env = "RINGSIDE_RING_CAPACITY", default_value_t = 16384)]
    pub ring_capacity: u32,

    /// Initial state of tracing; the agent or CLI switches it at run time without a restart.
    #[arg(long, env = "RINGSIDE_TRACING", value_enum, default_value_t = Switch::On)]
    pub tracing: Switch,

    /// Export this engine's requests as OTLP spans to this collector (gRPC, e.g.
    /// `http://collector:4317`): starts a companion `ringside-agent` attached to this engine.
    /// Without it, an `OTEL_EXPORTER_OTLP_ENDPOINT` (or `_TRACES_ENDPOINT`) in the environment
    /// does the same, with the agent configured by the OTEL_* variables.
    #[arg(long, env = "RINGSIDE_OTLP_TRACES_ENDPOINT", value_name = "URL")]
    pub otlp_traces_endpoint: Option<String>,

    /// Never start a companion agent, even with OTEL_EXPORTER_OTLP_* set (a host-wide
    /// `ringside-agent` attaches by itself).
    #[arg(long, env = "RINGSIDE_NO_COMPANION_AGENT")]
    pub no_companion_agent: bool,

    /// Chat template: `gemma`, `chatml`, or a name/template llama.cpp knows (e.g. `llama3`).
    /// Default: the model's own template, else the built-in one for its architecture.
    #[arg(long, env = "RINGSIDE_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,

    /// Do not reuse a finished request's prompt from its slot's KV cache: every prompt is
    /// computed in full (`cached_tokens` and `gen_ai.usage.cache_read.input_tokens` stay 0).
    #[arg(long, env = "RINGSIDE_NO_PROMPT_CACHE")]
    pub no_prompt_cache: bool,

    /// Largest request body accepted, in bytes; larger bodies are refused with 413.
    #[arg(long, env = "RINGSIDE_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Most HTTP connections open at once; beyond it a connection gets 503 and is closed
    /// (keep the unit's `LimitNOFILE=` above it).
    #[arg(long, env = "RINGSIDE_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Seconds a client has to send a request's head, from its first byte (from the
    /// connection's opening, for the first request); then the connection is closed.
    #[arg(long, env = "RINGSIDE_HEADER_READ_TIMEOUT", default_value = "10",
          value_parser = parse_seconds, value_name = "SECONDS")]
    pub header_read_timeout: Duration,

    /// Seconds a request's whole body may take to arrive; then 408 and the connection is
    /// closed (a slow upload holds a connection as a slow head does).
    #[arg(long, env = "RINGSIDE_BODY_READ_TIMEOUT", default_value = "30",
          value_parser = parse_seconds, value_name = "SECONDS")]
    pub body_read_timeout: Duration,

    /// Seconds a kept-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "RINGSIDE_IDLE_TIMEOUT", default_value = "60",
          value_parser = parse_seconds, value_name = "SECONDS")]
    pub idle_timeout: Duration,

    /// Seconds requests in flight may take to finish after SIGTERM/SIGINT; then they are
    /// aborted and recorded as 503. A second signal exits at once.
    #[arg(long, env = "RINGSIDE_SHUTDOWN_TIMEOUT", default_value = "30",
          value_parser = parse_seconds, value_name = "SECONDS")]
    pub shutdown_timeout: Duration,

    /// Ring records written per second for each cause of rejection (401, 413, 429…); the
    /// rest are counted in `ringside_rejection_records_suppressed_total`.
    #[arg(
        long,
        env = "RINGSIDE_REJECTION_RECORDS_PER_SECOND",
        default_value_t = 20
    )]
    pub rejection_records_per_second: u32,
}

/// Seconds, fractions allowed (`0.5`), as a [`Duration`].
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// The cache directory: `$RINGSIDE_CACHE_DIR`, else `$HOME/.cache/ringside`.
#[must_use]
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("RINGSIDE_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".cache").join("ringside"))
}

/// Where `scripts/install-model.sh` puts the default model.
#[must_use]
pub fn default_model_path() -> Option<PathBuf> {
    cache_dir().map(|d| d.join("models").join(DEFAULT_MODEL_FILE))
}

/// Threads available to this process (affinity and cgroup quota aware), at least 1.
#[must_use]
pub fn available_threads() -> u32 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok())
        .unwrap_or(1)
}

impl ServeArgs {
    /// The instance (segment) name.
    #[must_use]
    pub fn instance_name(&self) -> String {
        self.instance
            .clone()
            .unwrap_or_else(|| format!("engine-{}", self.port))
    }

    /// The API key from `--api-key` / `RINGSIDE_API_KEY`, else `VLLM_API_KEY`; empty means none.
    #[must_use]
    pub fn effective_api_key(&self) -> Option<String> {
        self.api_key
            .clone()
            .or_else(|| std::env::var("VLLM_API_KEY").ok())
            .filter(|k| !k.is_empty())
    }

    /// Threads for llama.cpp.
    #[must_use]
    pub fn effective_threads(&self) -> u32 {
        self.threads.map_or_else(available_threads, NonZeroU32::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["ringside-engine", "serve"]).unwrap();
        let Command::Serve(args) = cli.command;
        assert_eq!(args.port, 8000);
        assert_eq!(args.instance_name(), "engine-8000");
        assert!(args.effective_threads() >= 1);
        let cli = Cli::try_parse_from([
            "ringside-engine",
            "serve",
            "m.gguf",
            "--port",
            "9001",
            "--served-model-name",
            "a,b",
            "--tracing",
            "off",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command;
        assert_eq!(args.instance_name(), "engine-9001");
        assert_eq!(args.served_model_name, ["a", "b"]);
        assert_eq!(args.tracing, Switch::Off);
        assert!(Cli::try_parse_from(["ringside-engine", "serve", "--parallel", "0"]).is_err());
        assert_eq!(args.max_connections, 1024);
        assert_eq!(args.shutdown_timeout, Duration::from_secs(30));
        let cli =
            Cli::try_parse_from(["ringside-engine", "serve", "--idle-timeout", "0.5"]).unwrap();
        let Command::Serve(args) = cli.command;
        assert_eq!(args.idle_timeout, Duration::from_millis(500));
        assert!(
            Cli::try_parse_from(["ringside-engine", "serve", "--shutdown-timeout", "-1"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["ringside-engine", "serve", "--max-connections", "0"]).is_err()
        );
    }
}
