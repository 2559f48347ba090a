//! `metricsd`: the telemetry daemon. Parses the command line and the config, starts the
//! daemon, prints `metricsd: ready` once the first export round trip to logd succeeded,
//! and runs until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use metricsd::{Config, Daemon};

/// The telemetry daemon: grants shared-memory rings to producers, drains them,
/// aggregates under hard caps and exports to logd.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon.
    ///
    /// Producers (services linking nexus-metrics) connect to the control socket and are
    /// granted rings; every `export.interval_ms` the changed series and the completed
    /// spans are appended to logd. `metricsd: ready` is printed once a start marker was
    /// appended to logd and read back. Every limit is in the config file (see
    /// metricsd/README.md); without one, the defaults apply.
    ///
    /// Example: metricsd serve --config /etc/metricsd.toml --logd-socket /run/logd.sock
    Serve {
        /// A TOML config file (unknown keys and bad values are refused, naming the key).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The control socket [default: $NEXUS_METRICSD_SOCKET, else
        /// $XDG_RUNTIME_DIR/metricsd.sock, else /run/metricsd.sock; overrides the config].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// logd's socket [default: $LOGD_SOCKET, else $XDG_RUNTIME_DIR/logd.sock, else
        /// /run/logd.sock; overrides the config].
        #[arg(long, value_name = "PATH")]
        logd_socket: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve {
            config,
            socket,
            logd_socket,
        } => serve(config, socket, logd_socket),
    }
}

fn serve(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    logd_socket: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut cfg = match &config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(s) = socket {
        cfg.socket = s;
    }
    if let Some(s) = logd_socket {
        cfg.logd_socket = s;
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing SIGTERM/SIGINT handlers")?;
    let logd = cfg.logd_socket.clone();
    let daemon = Daemon::start(cfg)?;
    eprintln!(
        "metricsd: serving {} (waiting for logd at {})",
        daemon.socket_path().display(),
        logd.display()
    );
    let handle = signals.handle();
    let waiter = std::thread::spawn(move || signals.forever().next());
    loop {
        if daemon.is_ready() {
            println!("metricsd: ready");
            break;
        }
        if waiter.is_finished() {
            daemon.shutdown();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = waiter.join();
    handle.close();
    daemon.shutdown();
    eprintln!("metricsd: stopped");
    Ok(())
}
