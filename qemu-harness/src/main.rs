//! The proof-run runner: `cargo run --release -p qemu-harness`.

mod runner;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

const ABOUT: &str = "Boot a real kernel under QEMU with the project's own static binaries and \
check the marker ladder the guest prints on its serial console.";

const LONG_ABOUT: &str = "\
Boot a real kernel under QEMU with the project's own static binaries and check the marker \
ladder the guest prints on its serial console.

One run does, in order:
  1. provision: uses qemu-system-x86_64 from PATH, else Debian's qemu-system-x86
     and the libraries the machine lacks, downloaded (apt-get --download-only, the
     machine's configured sources, needs root once) and unpacked into the cache,
     never installed, so no package of the machine changes; and fetches a Debian
     cloud kernel with `apt-get download` into the cache (once);
  2. builds the guest binaries statically (+crt-static, x86_64-unknown-linux-gnu) into
     target/qemu-guest, so the host build cache stays valid;
  3. packs an initramfs: /init (guest-init), /bin/<binaries>, the init's manifest;
  4. boots `qemu-system-x86_64 -M microvm -nographic -no-reboot` under TCG with
     tsc_early_khz= taken from the host's /proc/cpuinfo;
  5. reads the serial console and checks the ladder: every marker in order, each within
     its own timeout; any FAIL line, a kernel panic, a missing or out-of-order marker or a
     timeout fails the run, naming the first failing step and showing the last console
     lines; so does any `panicked at` line (a Rust panic in any guest thread). The VM
     must then power off by itself and QEMU exit with status 0.

Ladders (--ladder):
  full       the full proof ladder: logd: ready, metricsd: ready, eight SELFTEST
             markers (each printed only after its evidence was read back from logd and
             matched exactly), SELFTEST: done
  init-only  a developer ladder: init mounts, a fixture echo daemon started and awaited
             like a real daemon, a fixture selftest, SELFTEST: done

Cache: $XDG_CACHE_HOME/nexus-qemu (default ~/.cache/nexus-qemu); delete it to re-fetch.
Exit status: 0 when every run climbed the whole ladder and powered off, 1 otherwise.

Examples:
  cargo run --release -p qemu-harness
  cargo run --release -p qemu-harness -- --runs 10
  cargo run --release -p qemu-harness -- --ladder init-only --console --keep
  cargo run --release -p qemu-harness -- --show-plan";

/// Command-line options.
#[derive(Debug, Parser)]
#[command(name = "qemu-harness", about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    /// Which ladder to check: `full` (the full proof ladder) or `init-only` (the developer ladder).
    #[arg(long, default_value = "full", value_name = "NAME")]
    ladder: String,

    /// Boot this many times in a row (one build and one initramfs) and report each time.
    #[arg(long, default_value_t = 1, value_name = "N")]
    runs: u32,

    /// Keep the work dir (initramfs, manifest, console logs) and print its path. It is
    /// always kept when a run fails.
    #[arg(long)]
    keep: bool,

    /// Echo every console line as it arrives, not only the markers.
    #[arg(long)]
    console: bool,

    /// Run the QEMU unpacked in the cache (downloading and unpacking it first if
    /// needed) even when a qemu-system-x86_64 is on PATH.
    #[arg(long)]
    unpacked_qemu: bool,

    /// Boot this kernel image instead of the cached Debian cloud kernel.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Multiply every step timeout (host side and guest side) by this factor.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    timeout_factor: f64,

    /// Append this to the kernel command line (repeatable), e.g. `--kernel-arg loglevel=7`
    /// to see the kernel's messages, which `quiet` hides.
    #[arg(long, value_name = "ARG")]
    kernel_arg: Vec<String>,

    /// Guest vCPUs.
    #[arg(long, default_value_t = 2, value_name = "N")]
    smp: u32,

    /// Guest memory, as QEMU's -m takes it.
    #[arg(long, default_value = "512M", value_name = "SIZE")]
    memory: String,

    /// Print the plan (binaries, daemons, selftests, ladder) and the guest manifest, then
    /// exit without building or booting.
    #[arg(long)]
    show_plan: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(plan) = qemu_harness::plan::by_name(&cli.ladder) else {
        let names: Vec<_> = qemu_harness::plan::PLANS.iter().map(|p| p.name).collect();
        eprintln!(
            "qemu-harness: unknown ladder {:?}; expected one of: {}",
            cli.ladder,
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    if !(cli.timeout_factor.is_finite() && cli.timeout_factor > 0.0) || cli.runs == 0 {
        eprintln!("qemu-harness: --timeout-factor must be > 0 and --runs at least 1");
        return ExitCode::from(2);
    }
    let options = runner::Options {
        plan,
        runs: cli.runs,
        keep: cli.keep,
        echo_console: cli.console,
        kernel: cli.kernel,
        unpacked_qemu: cli.unpacked_qemu,
        kernel_args: cli.kernel_arg,
        timeout_factor: cli.timeout_factor,
        smp: cli.smp,
        memory: cli.memory,
    };
    if cli.show_plan {
        return match runner::show_plan(&options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("qemu-harness: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match runner::run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("qemu-harness: {e:#}");
            ExitCode::FAILURE
        }
    }
}
