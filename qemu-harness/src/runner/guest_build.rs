//! Builds the guest binaries statically, in their own target dir.

use std::collections::BTreeSet;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use qemu_harness::elf;
use qemu_harness::plan::GuestBinary;

/// The guest's target triple. Naming it explicitly keeps `RUSTFLAGS` away from build
/// scripts and proc macros, which must stay dynamic host binaries.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Static glibc: the initramfs has no loader and no shared libraries.
const RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// A built guest binary.
#[derive(Debug)]
pub struct Built {
    /// Which binary.
    pub binary: GuestBinary,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// The workspace root (this crate's parent).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// `<target dir>/qemu-guest`: separate, so switching RUSTFLAGS does not rebuild the
/// host's own artifacts.
pub fn target_dir() -> PathBuf {
    let base = env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    base.join("qemu-guest")
}

/// Builds `binaries` with one cargo invocation and checks each is static.
pub fn build(binaries: &[GuestBinary]) -> Result<Vec<Built>> {
    let target_dir = target_dir();
    let packages: BTreeSet<&str> = binaries.iter().map(|b| b.package).collect();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("RUSTFLAGS", RUSTFLAGS)
        // No debug info in the guest: it would triple the image (and the kernel's time
        // to unpack it under TCG); symbols stay, so a panic still names its function.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        // Takes precedence over RUSTFLAGS; a parent cargo may have set it.
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    for package in &packages {
        command.args(["-p", package]);
    }
    for binary in binaries {
        command.args(["--bin", binary.bin]);
    }
    let names: Vec<_> = binaries.iter().map(|b| b.bin).collect();
    println!(
        "[build] {} static for {TARGET} into {} (RUSTFLAGS=\"{RUSTFLAGS}\", no debug info)",
        names.join(", "),
        target_dir.display()
    );
    let status = command.status().context("starting cargo")?;
    ensure!(
        status.success(),
        "building the guest binaries failed ({status})"
    );
    let release = target_dir.join(TARGET).join("release");
    binaries
        .iter()
        .map(|binary| {
            let path = release.join(binary.bin);
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            elf::check_static(&bytes)
                .with_context(|| format!("guest binary {}", path.display()))?;
            Ok(Built {
                binary: *binary,
                bytes,
            })
        })
        .collect()
}
