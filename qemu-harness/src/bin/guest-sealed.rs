//! The sealed producer (`/bin/guest-sealed`): records through `nexus-metrics` under
//! seccomp filters that allow no system call; see `qemu_harness::sealed`. Started by
//! the guest selftest's `no ipc per sample` step and by the host test `tests/sealed.rs`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "guest-sealed",
    about = "Records counters, gauges, histograms and spans with every system call forbidden."
)]
struct Cli {
    /// metricsd's control socket.
    #[arg(long, value_name = "PATH")]
    metricsd: PathBuf,
    /// Iterations: each records one counter increment, gauge set, histogram
    /// observation and span (start, attribute, end).
    #[arg(long, default_value_t = 1_000_000)]
    samples: u64,
    /// Make one system call right after the seal, which must kill the process: the
    /// check that the filters bite.
    #[arg(long)]
    probe_syscall: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match qemu_harness::sealed::run(&cli.metricsd, cli.samples, cli.probe_syscall) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-sealed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
