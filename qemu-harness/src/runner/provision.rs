//! Provisioning: QEMU from Debian's packages and a Debian cloud kernel, cached outside the
//! source tree. Idempotent: a warm run only looks.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The Debian meta-package whose dependency names the current cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";
/// The Debian package that ships `qemu-system-x86_64`.
const QEMU_PACKAGE: &str = "qemu-system-x86";
const QEMU_BINARY: &str = "qemu-system-x86_64";

/// What a proof run boots with.
#[derive(Debug)]
pub struct Provisioned {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The kernel image.
    pub kernel: PathBuf,
    /// Where the kernel came from, for the report.
    pub kernel_origin: String,
}

/// `$XDG_CACHE_HOME/nexus-qemu`, or `~/.cache/nexus-qemu`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("nexus-qemu"));
    }
    let home = env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_CACHE_HOME nor HOME is set: cannot place the cache")?;
    Ok(PathBuf::from(home).join(".cache").join("nexus-qemu"))
}

/// Finds QEMU and a kernel, installing or fetching what is missing.
pub fn provision(kernel_override: Option<&Path>) -> Result<Provisioned> {
    let mut apt = Apt::default();
    let qemu = match which(QEMU_BINARY) {
        Some(path) => {
            say(&format!("{QEMU_BINARY}: {}", path.display()));
            path
        }
        None => {
            say(&format!(
                "{QEMU_BINARY} not found: installing Debian's {QEMU_PACKAGE} \
                 (a minute or two on a fresh machine)"
            ));
            apt.install(&[QEMU_PACKAGE])?;
            which(QEMU_BINARY).with_context(|| {
                format!("{QEMU_PACKAGE} was installed but {QEMU_BINARY} is still not on PATH")
            })?
        }
    };

    if let Some(kernel) = kernel_override {
        ensure!(
            kernel.is_file(),
            "--kernel {}: no such file",
            kernel.display()
        );
        say(&format!("kernel: {} (from --kernel)", kernel.display()));
        return Ok(Provisioned {
            qemu,
            kernel: kernel.to_owned(),
            kernel_origin: "--kernel".to_owned(),
        });
    }

    let dir = cache_dir()?.join("kernel");
    let kernel = dir.join("vmlinuz");
    let origin_file = dir.join("package");
    if kernel.is_file() {
        let origin = fs::read_to_string(&origin_file).unwrap_or_default();
        let origin = origin.trim().to_owned();
        say(&format!("kernel: {} (cached, {origin})", kernel.display()));
        return Ok(Provisioned {
            qemu,
            kernel,
            kernel_origin: origin,
        });
    }
    say(&format!(
        "kernel: not cached in {}, fetching",
        dir.display()
    ));
    let origin = fetch_kernel(&mut apt, &dir)?;
    say(&format!("kernel: {} ({origin})", kernel.display()));
    Ok(Provisioned {
        qemu,
        kernel,
        kernel_origin: origin,
    })
}

/// Downloads the current cloud kernel package, extracts its vmlinuz into `dir` and
/// returns the package file name. The vmlinuz appears last, by rename, so a half-done
/// fetch is never taken for a cached kernel.
fn fetch_kernel(apt: &mut Apt, dir: &Path) -> Result<String> {
    let package = match kernel_package()? {
        Some(package) => package,
        None => {
            apt.update()?;
            kernel_package()?.with_context(|| {
                format!("apt-cache knows no {KERNEL_META} in the configured sources")
            })?
        }
    };
    say(&format!("kernel: apt-get download {package}"));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix("fetch-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a temporary dir in {}", dir.display()))?;
    // As root, apt would drop to its `_apt` user to download, which cannot write into
    // this root-owned cache dir, and say so in a warning; download as the caller instead.
    run(Command::new("apt-get")
        .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
        .arg(&package)
        .current_dir(work.path()))?;
    let deb = fs::read_dir(work.path())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension() == Some(OsStr::new("deb")))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let origin = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    say(&format!("kernel: extracting vmlinuz from {origin}"));
    let root = work.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let vmlinuz = fs::read_dir(root.join("boot"))
        .with_context(|| format!("{origin} has no /boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{origin} has no /boot/vmlinuz-*"))?;
    fs::write(dir.join("package"), format!("{origin}\n"))?;
    fs::rename(&vmlinuz, dir.join("vmlinuz"))
        .with_context(|| format!("moving {} into the cache", vmlinuz.display()))?;
    Ok(origin)
}

/// The concrete kernel package `linux-image-cloud-amd64` depends on, or `None` when apt
/// has no package lists yet.
fn kernel_package() -> Result<Option<String>> {
    let output = Command::new("apt-cache")
        .args(["depends", KERNEL_META])
        .output()
        .context("running apt-cache (is this a Debian machine?)")?;
    Ok(parse_depends(&String::from_utf8_lossy(&output.stdout)))
}

/// The first `Depends: linux-image-*` of `apt-cache depends` output.
fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && !name.starts_with('<'))
        .map(str::to_owned)
}

/// apt-get, with `update` run at most once per process.
#[derive(Debug, Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn require_root(what: &str) -> Result<()> {
        if !rustix::process::geteuid().is_root() {
            bail!(
                "{what} needs root. Run once as root: apt-get update && \
                 apt-get install -y --no-install-recommends {QEMU_PACKAGE}"
            );
        }
        Ok(())
    }

    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        Self::require_root("apt-get update")?;
        say("apt-get update");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        self.updated = true;
        Ok(())
    }

    fn install(&mut self, packages: &[&str]) -> Result<()> {
        Self::require_root(&format!("installing {}", packages.join(" ")))?;
        self.update()?;
        say(&format!(
            "apt-get install -y --no-install-recommends {}",
            packages.join(" ")
        ));
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    }
}

fn run(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("starting {shown}"))?;
    ensure!(status.success(), "{shown} failed: {status}");
    Ok(())
}

/// The first executable file called `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn say(line: &str) {
    println!("[provision] {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(parse_depends("W: Unable to locate package\n"), None);
    }
}
