//! The guest selftest (`/bin/guest-selftest` in the `full` proof run): a producer that
//! exercises every feature through the real grant, ring and export path and prints each
//! ladder marker only after reading its evidence back from logd (see
//! `qemu_harness::selftest`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qemu_harness::markers::SELFTEST_FAIL;
use qemu_harness::selftest::{self, Options, backpressure, hardening, retention, security};

#[derive(Parser)]
#[command(
    name = "guest-selftest",
    about = "The QEMU proof run's selftest producer."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every step and print the ladder markers.
    Run {
        /// logd's socket.
        #[arg(long, value_name = "PATH")]
        logd: PathBuf,
        /// metricsd's control socket.
        #[arg(long, value_name = "PATH")]
        metricsd: PathBuf,
        /// The config file logd was started with (default: logd's defaults).
        #[arg(long, value_name = "FILE")]
        logd_config: Option<PathBuf>,
        /// The config file metricsd was started with (default: metricsd's defaults).
        #[arg(long, value_name = "FILE")]
        metricsd_config: Option<PathBuf>,
    },
    /// The security step's flood producer (started by `run`).
    #[command(name = "flood-child")]
    FloodChild {
        /// metricsd's control socket.
        #[arg(long, value_name = "PATH")]
        metricsd: PathBuf,
        /// Label sets to flood.
        #[arg(long, value_name = "N")]
        n: usize,
    },
    /// The hardening step's second-uid child (started by `run` as another uid).
    #[command(name = "denied-query-child")]
    DeniedQueryChild {
        /// logd's socket.
        #[arg(long, value_name = "PATH")]
        logd: PathBuf,
        /// The service to ask for (the selftest's own).
        #[arg(long, value_name = "NAME")]
        service: String,
    },
    /// The backpressure step's child process (started by `run`).
    #[command(name = "backpressure-child")]
    BackpressureChild {
        /// metricsd's control socket.
        #[arg(long, value_name = "PATH")]
        metricsd: PathBuf,
    },
    /// The retention step's recording child (started by `run`; stops at a line on
    /// stdin).
    #[command(name = "retention-child")]
    RetentionChild {
        /// The step's own metricsd's control socket.
        #[arg(long, value_name = "PATH")]
        metricsd: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Run {
            logd,
            metricsd,
            logd_config,
            metricsd_config,
        } => selftest::run(&Options {
            logd,
            metricsd,
            logd_config,
            metricsd_config,
        }),
        Cmd::FloodChild { metricsd, n } => match security::flood_child(&metricsd, n) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("{SELFTEST_FAIL}: flood child: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::DeniedQueryChild { logd, service } => match hardening::denied_child(&logd, &service) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("{SELFTEST_FAIL}: second-uid child: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::BackpressureChild { metricsd } => match backpressure::child(&metricsd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("{SELFTEST_FAIL}: backpressure child: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::RetentionChild { metricsd } => match retention::child(&metricsd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("{SELFTEST_FAIL}: retention child: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
