//! The `dicom-gateway` command line: a thin shell over the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dicom_gateway::config::{Config, LogFormat};
use dicom_gateway::node::Node;
use tracing::info;

/// `--version`: the crate version and the crypto backend of this build (the same choice as
/// `tls::provider` and `keystore::BACKEND`: `ring` wins when both features are on).
const VERSION: &str = if cfg!(feature = "ring") {
    concat!(env!("CARGO_PKG_VERSION"), " (crypto: ring)")
} else if cfg!(feature = "fips") {
    concat!(env!("CARGO_PKG_VERSION"), " (crypto: aws-lc-rs (FIPS))")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (crypto: aws-lc-rs)")
};

#[derive(Parser)]
#[command(
    name = "dicom-gateway",
    version = VERSION,
    about = "Secure DICOM store-and-forward gateway"
)]
struct Cli {
    /// Log line format on stderr (default: `[log] format` of the config, else text).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines (ANSI colours only when stderr is a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(a: LogFormatArg) -> LogFormat {
        match a {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve {
        /// The node's TOML config.
        #[arg(long, env = "DICOM_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Run two sites on loopback, send generated studies through them and verify them.
    Demo {
        /// Work folder to create (default: a new folder under the temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Number of studies.
        #[arg(long, default_value_t = 3)]
        studies: u32,
        /// Objects per study.
        #[arg(long, default_value_t = 40)]
        objects: u32,
        /// Approximate object size in KiB.
        #[arg(long, default_value_t = 512)]
        object_kib: usize,
        /// Keep both sites running afterwards and print their addresses.
        #[arg(long)]
        keep_running: bool,
        /// Keep the work folder at the end and print where it is (default: removed).
        #[arg(long)]
        keep: bool,
        /// Print the summary as one JSON object on stdout (the lines for people go to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Probe the admin endpoint; exit 0 only on a 200 (for Docker's HEALTHCHECK).
    Healthcheck {
        /// The URL to GET.
        #[arg(long, default_value = "http://127.0.0.1:9464/healthz")]
        url: String,
    },
    /// Development PKI.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Show the running node's destinations: queues, dead letters, circuits, last errors.
    Status {
        /// The node's TOML config (its data directory holds the admin socket).
        #[arg(long)]
        config: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Open every stored object and check it (authentication of every segment, count,
    /// length, SHA-256) without writing plaintext anywhere; each that fails is quarantined
    /// (its entries become dead letters) and listed by internal id. Exit 1 if any fails.
    /// Through the running node, or on a stopped node's data directory.
    Verify {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Print the outcome as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Inspect and fix the running node's queues.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Validate a config offline: files exist and parse, certificates are in date, routes
    /// name real listeners and destinations, nothing is unreachable. Exit 0 when it holds
    /// no error, 78 when it does not parse, 1 on any other error.
    Check {
        /// The TOML config to check.
        #[arg(long, env = "DICOM_GATEWAY_CONFIG")]
        config: PathBuf,
        /// A DICOM Part-10 file: say which routes and destinations it would take.
        #[arg(long, value_name = "FILE")]
        explain: Option<PathBuf>,
        /// With --explain: only this listener (default: each listener).
        #[arg(long, requires = "explain")]
        listener: Option<String>,
        /// With --explain: the sender's calling AE title (DICOM listeners).
        #[arg(long, requires = "explain")]
        calling_ae: Option<String>,
        /// With --explain: the peer gateway's node name (link listeners).
        #[arg(long, requires = "explain")]
        peer: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List queue entries (with their Study and SOP Instance UIDs).
    List {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Only this destination.
        #[arg(long)]
        destination: Option<String>,
        /// Only dead letters.
        #[arg(long)]
        dead: bool,
        /// Only this object (its hex id, as listed).
        #[arg(long)]
        id: Option<String>,
        /// Only entries of this study.
        #[arg(long)]
        study: Option<String>,
        /// Show each entry's failed attempts, with times and reasons (always in --json).
        #[arg(long)]
        history: bool,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Replay dead letters with a fresh retry budget.
    Retry(Selection),
    /// Delete entries for good (the object, once no destination waits for it, and its study
    /// key when nothing of the study is left).
    Purge(Selection),
    /// Send a delivered study again from its retained copy (needs `[spool] retention`).
    Resend {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// The Study Instance UID.
        #[arg(long)]
        study: String,
        /// Only to this destination (default: wherever each object was delivered).
        #[arg(long)]
        destination: Option<String>,
        /// Return once queued, without following the delivery.
        #[arg(long)]
        no_wait: bool,
        /// Print the node's answer as JSON at once (for scripts; implies --no-wait).
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
#[group(id = "which", required = true, multiple = true)]
struct Selection {
    /// The node's TOML config.
    #[arg(long)]
    config: PathBuf,
    /// One object id (from `queue list`).
    #[arg(long, group = "which")]
    id: Option<String>,
    /// Every entry of one study.
    #[arg(long, group = "which")]
    study: Option<String>,
    /// A destination (with --dead: all its dead letters).
    #[arg(long, group = "which")]
    destination: Option<String>,
    /// Only dead letters.
    #[arg(long)]
    dead: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Make a CA and a key and certificate per site (DNS SAN = site name).
    Init {
        /// Folder to write into.
        #[arg(long)]
        dir: PathBuf,
        /// Site name (repeat for each site).
        #[arg(long = "site", required = true)]
        sites: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a fresh 32-byte key-encryption key with mode 0600.
    NewKek {
        /// The file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a KEK version (the file `<kek_file>.N`), make it the newest and rewrap every
    /// stored data key under it; with `retire_old_versions` (the default), the older
    /// versions are then retired. Through the running node's admin socket, or on the data
    /// directory of a stopped node.
    Rotate {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Return once the node uses the new version, without following the rewrap.
        #[arg(long)]
        no_wait: bool,
        /// Print the outcome as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Destroy a study's key (crypto-shredding): its queue entries and retained copies are
    /// purged, then its key is deleted and compacted out of the database files, so that
    /// nothing of the study left anywhere (backups included) can be decrypted.
    Shred {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// The Study Instance UID.
        #[arg(long)]
        study: String,
        /// Print the outcome as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Show the KEK versions: which is the newest, how many stored keys each wraps, which
    /// are retired.
    Status {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

use dicom_gateway::exit::{EX_CONFIG, code_for};

/// Logs go to stderr (stdout is for command output), coloured only on a terminal.
fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .init(),
    }
}

/// Keys live in this process's memory (the KEK, unwrapped study keys): no core dump may
/// carry them, and no other process of the same user may read its memory. Done first,
/// for every command (the key commands handle KEKs too). `PR_SET_DUMPABLE=0` also stops a
/// same-user `ptrace` and makes `/proc/<pid>` root-owned; the process itself keeps its
/// own `/proc/self` (the folder destination links files through `/proc/self/fd`).
fn disable_core_dumps() {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, none) {
        eprintln!("warning: cannot disable core dumps (RLIMIT_CORE): {e}");
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        eprintln!("warning: cannot mark the process not dumpable (PR_SET_DUMPABLE): {e}");
    }
}

fn main() -> ExitCode {
    disable_core_dumps();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            init_logging("info", cli.log_format.map_or(cfg.log.format, Into::into));
            runtime.block_on(async {
                let node = match Node::start(cfg).await {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        return ExitCode::from(code_for(&e));
                    }
                };
                wait_for_signal().await;
                info!("shutting down (a second signal aborts at once)");
                tokio::select! {
                    _ = node.stop() => ExitCode::SUCCESS,
                    _ = wait_for_signal() => {
                        // Safe: every acknowledged object is already durable, and start-up
                        // recovery removes whatever was half-written.
                        eprintln!("second signal: aborting without draining");
                        ExitCode::from(130)
                    }
                }
            })
        }
        Command::Demo {
            dir,
            studies,
            objects,
            object_kib,
            keep_running,
            keep,
            json,
        } => {
            init_logging("warn", cli.log_format.map_or(LogFormat::Text, Into::into));
            let opts = dicom_gateway::demo::DemoOptions {
                dir,
                studies,
                objects_per_study: objects,
                object_kib,
                keep_running,
                keep,
                json,
            };
            report(runtime.block_on(dicom_gateway::demo::run(opts)))
        }
        Command::Healthcheck { url } => report(dicom_gateway::healthcheck::probe(
            &url,
            std::time::Duration::from_secs(3),
        )),
        Command::Pki {
            command: PkiCommand::Init { dir, sites },
        } => report(dicom_gateway::pki::init(&dir, &sites).map(|f| {
            println!("CA: {}", f.ca_cert.display());
            for (site, cert, key) in f.sites {
                println!("{site}: {} {}", cert.display(), key.display());
            }
        })),
        Command::Check {
            config,
            explain,
            listener,
            calling_ae,
            peer,
            json,
        } => {
            let origin = dicom_gateway::check::ExplainOrigin {
                listener,
                calling_ae,
                peer,
            };
            match dicom_gateway::check::run(&config, explain.as_deref().map(|f| (f, origin)))
                .and_then(|r| dicom_gateway::check::print(&r, json))
            {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => report(Err(e)),
            }
        }
        Command::Verify { config, json } => {
            init_logging("warn", cli.log_format.map_or(LogFormat::Text, Into::into));
            report(runtime.block_on(dicom_gateway::cli::verify(&config, json)))
        }
        Command::Status { config, json } => {
            report(runtime.block_on(dicom_gateway::cli::status(&config, json)))
        }
        Command::Queue {
            command:
                QueueCommand::List {
                    config,
                    destination,
                    dead,
                    id,
                    study,
                    history,
                    json,
                },
        } => report(runtime.block_on(dicom_gateway::cli::queue_list(
            &config,
            dicom_gateway::cli::ListFilter {
                destination,
                dead,
                id,
                study,
            },
            history,
            json,
        ))),
        Command::Queue {
            command: QueueCommand::Retry(s),
        } => report(runtime.block_on(dicom_gateway::cli::queue_change(
            &s.config,
            selector(&s),
            false,
            s.json,
        ))),
        Command::Queue {
            command:
                QueueCommand::Resend {
                    config,
                    study,
                    destination,
                    no_wait,
                    json,
                },
        } => report(runtime.block_on(dicom_gateway::cli::queue_resend(
            &config,
            study,
            destination,
            no_wait,
            json,
        ))),
        Command::Queue {
            command: QueueCommand::Purge(s),
        } => report(runtime.block_on(dicom_gateway::cli::queue_change(
            &s.config,
            selector(&s),
            true,
            s.json,
        ))),
        Command::Keys {
            command:
                KeysCommand::Rotate {
                    config,
                    no_wait,
                    json,
                },
        } => {
            init_logging("warn", cli.log_format.map_or(LogFormat::Text, Into::into));
            report(runtime.block_on(dicom_gateway::cli::keys_rotate(&config, no_wait, json)))
        }
        Command::Keys {
            command:
                KeysCommand::Shred {
                    config,
                    study,
                    json,
                },
        } => {
            init_logging("warn", cli.log_format.map_or(LogFormat::Text, Into::into));
            report(runtime.block_on(dicom_gateway::cli::keys_shred(&config, study, json)))
        }
        Command::Keys {
            command: KeysCommand::Status { config, json },
        } => {
            init_logging("warn", cli.log_format.map_or(LogFormat::Text, Into::into));
            report(runtime.block_on(dicom_gateway::cli::keys_status(&config, json)))
        }
        Command::Keys {
            command: KeysCommand::NewKek { out },
        } => report(
            keystore::Kek::generate_file(&out)
                .with_context(|| format!("writing {}", out.display()))
                .map(|()| {
                    println!(
                        "wrote {} (mode 0600); keep it off the data volume and back it up",
                        out.display()
                    )
                }),
        ),
    }
}

fn selector(s: &Selection) -> dicom_gateway::admin::Selector {
    dicom_gateway::admin::Selector {
        id: s.id.clone(),
        study: s.study.clone(),
        destination: s.destination.clone(),
        dead: s.dead,
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(code_for(&e))
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
