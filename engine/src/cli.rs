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

    /// Require `Authorization: Bearer <KEY>` on /v1/* (also read from VLLM_API_KEY). Shows in
    /// `ps`: prefer --api-key-file.
    #[arg(long, env = "RINGSIDE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Read the API key from this file (trimmed): a regular file not readable by others (0600
    /// or 0640), at most 4 KiB. Not with --api-key.
    #[arg(
        long,
        env = "RINGSIDE_API_KEY_FILE",
        value_name = "PATH",
        conflicts_with = "api_key"
    )]
    pub api_key_file: Option<PathBuf>,

    /// Name of the shared-memory segment the agent attaches to. Default: `engine-<port>`.
    #[arg(long, env = "RINGSIDE_INSTANCE")]
    pub instance: Option<String>,

    /// Records the ring holds (a power of two).
    #[arg(long, env = "RINGSIDE_RING_CAPACITY", default_value_t = 16384)]
    pub ring_capacity: u32,

    /// Engine steps the step ring holds (a power of two; 0 = record no steps): one record per
    /// scheduler step, for per-request inter-token gaps and batch context. 4096 steps hold
    /// about 40 s of history at 100 steps/s.
    #[arg(long, env = "RINGSIDE_STEP_RING_CAPACITY", default_value_t = ringside_shm_protocol::DEFAULT_STEP_CAPACITY)]
    pub step_ring_capacity: u32,

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

/// Largest `--api-key-file` read.
pub const MAX_API_KEY_FILE_BYTES: u64 = 4096;

/// Why the API key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The file cannot be opened or read.
    #[error("--api-key-file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A directory, FIFO, device or socket.
    #[error("--api-key-file {path} is not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// Other users may read or write it.
    #[error(
        "--api-key-file {path} has mode {mode:04o}: other users may read or change the key; \
         chmod o-rwx it (0600, or 0640 for a group)"
    )]
    OthersMayRead {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Larger than [`MAX_API_KEY_FILE_BYTES`].
    #[error("--api-key-file {path} is larger than {MAX_API_KEY_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Nothing but whitespace.
    #[error("--api-key-file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A byte a client could not send in an `Authorization` header.
    #[error(
        "--api-key-file {path} holds a byte that is not printable ASCII (a key must fit an \
         HTTP header)"
    )]
    NotPrintable {
        /// The file.
        path: PathBuf,
    },
    /// `--api-key-file` and another source both give a key.
    #[error("--api-key-file and {0} both give an API key: keep one")]
    TwoSources(&'static str),
}

/// Reads `--api-key-file`: a regular file (opened without blocking, so a FIFO cannot hang
/// the start), not readable or writable by others, at most [`MAX_API_KEY_FILE_BYTES`], one
/// printable-ASCII key with surrounding whitespace trimmed. Links are followed: Kubernetes
/// mounts secrets through them.
///
/// # Errors
/// See [`ApiKeyError`].
pub fn read_api_key_file(path: &std::path::Path) -> Result<String, ApiKeyError> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

    let read_error = |source: std::io::Error| ApiKeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| read_error(e.into()))?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(read_error)?;
    let kind = meta.file_type();
    if !kind.is_file() || kind.is_fifo() {
        return Err(ApiKeyError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(ApiKeyError::OthersMayRead {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_API_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_API_KEY_FILE_BYTES {
        return Err(ApiKeyError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let key = bytes.trim_ascii();
    if key.is_empty() {
        return Err(ApiKeyError::Empty {
            path: path.to_path_buf(),
        });
    }
    if !key.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(ApiKeyError::NotPrintable {
            path: path.to_path_buf(),
        });
    }
    Ok(String::from_utf8_lossy(key).into_owned())
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

    /// The API key: from `--api-key-file`, else `--api-key` / `RINGSIDE_API_KEY`, else
    /// `VLLM_API_KEY`; empty means none.
    ///
    /// # Errors
    /// [`ApiKeyError`] when the key file is unusable, or when another source gives a key too
    /// (two keys: refuse rather than guess).
    pub fn effective_api_key(&self) -> Result<Option<String>, ApiKeyError> {
        let vllm = std::env::var("VLLM_API_KEY").ok().filter(|k| !k.is_empty());
        if let Some(path) = &self.api_key_file {
            // clap refuses both flags; a key left in the environment is refused here.
            if self.api_key.is_some() {
                return Err(ApiKeyError::TwoSources("--api-key (RINGSIDE_API_KEY)"));
            }
            if vllm.is_some() {
                return Err(ApiKeyError::TwoSources("VLLM_API_KEY"));
            }
            return read_api_key_file(path).map(Some);
        }
        Ok(self.api_key.clone().or(vllm).filter(|k| !k.is_empty()))
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

    /// A fresh directory under the system's temporary one.
    fn scratch_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringside-cli-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn key_file(dir: &std::path::Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn an_api_key_file_is_trimmed_and_must_be_private_regular_small_and_printable() {
        let dir = scratch_dir("key");
        let good = key_file(&dir, "good", b"  sk-file key\n", 0o600);
        assert_eq!(read_api_key_file(&good).unwrap(), "sk-file key");
        let group = key_file(&dir, "group", b"sk-group\n", 0o640);
        assert_eq!(read_api_key_file(&group).unwrap(), "sk-group");
        // A link is followed (Kubernetes secrets are links); its target is checked.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert_eq!(read_api_key_file(&link).unwrap(), "sk-file key");

        let readable = key_file(&dir, "readable", b"sk\n", 0o644);
        assert!(matches!(
            read_api_key_file(&readable),
            Err(ApiKeyError::OthersMayRead { mode: 0o644, .. })
        ));
        let writable = key_file(&dir, "writable", b"sk\n", 0o602);
        assert!(matches!(
            read_api_key_file(&writable),
            Err(ApiKeyError::OthersMayRead { .. })
        ));
        let empty = key_file(&dir, "empty", b" \n\t", 0o600);
        assert!(matches!(
            read_api_key_file(&empty),
            Err(ApiKeyError::Empty { .. })
        ));
        let huge = key_file(&dir, "huge", &[b'k'; 4097], 0o600);
        assert!(matches!(
            read_api_key_file(&huge),
            Err(ApiKeyError::TooLarge { .. })
        ));
        let binary = key_file(&dir, "binary", b"sk\x00\x7f", 0o600);
        assert!(matches!(
            read_api_key_file(&binary),
            Err(ApiKeyError::NotPrintable { .. })
        ));
        assert!(matches!(
            read_api_key_file(&dir),
            Err(ApiKeyError::NotRegular { .. })
        ));
        assert!(matches!(
            read_api_key_file(&dir.join("missing")),
            Err(ApiKeyError::Read { .. })
        ));
        // A FIFO with no writer: refused at once instead of blocking the start.
        let fifo = dir.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(
            read_api_key_file(&fifo),
            Err(ApiKeyError::NotRegular { .. })
        ));
        let message = read_api_key_file(&readable).unwrap_err().to_string();
        assert!(
            message.contains("other users may read") && message.contains("0644"),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn api_key_and_api_key_file_are_mutually_exclusive() {
        let both = Cli::try_parse_from([
            "ringside-engine",
            "serve",
            "--api-key",
            "k",
            "--api-key-file",
            "/k",
        ]);
        assert_eq!(
            both.unwrap_err().kind(),
            clap::error::ErrorKind::ArgumentConflict
        );
        let cli =
            Cli::try_parse_from(["ringside-engine", "serve", "--api-key-file", "/k"]).unwrap();
        let Command::Serve(args) = cli.command;
        assert_eq!(
            args.api_key_file.as_deref(),
            Some(std::path::Path::new("/k"))
        );
    }

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
