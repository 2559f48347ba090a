//! The hostile producer of the `metrics security rejects` step (`/bin/guest-hostile`),
//! started by the guest selftest: see `qemu_harness::selftest::hostile`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "guest-hostile",
    about = "Claims a metricsd ring, writes garbage and a bogus write position."
)]
struct Cli {
    /// metricsd's control socket.
    #[arg(long, value_name = "PATH")]
    metricsd: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match qemu_harness::selftest::hostile::run(&cli.metricsd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The parent reports the step's FAIL marker with this text.
            eprintln!("guest-hostile: {e:#}");
            ExitCode::FAILURE
        }
    }
}
