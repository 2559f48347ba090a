//! Provisioning: QEMU from Debian's packages and a Debian cloud kernel, cached outside the
//! source tree. Idempotent: a warm run only looks.
//!
//! Nothing is installed or removed: a `qemu-system-x86_64` already on `PATH` is used as
//! it is; otherwise Debian's `qemu-system-x86` and whatever it needs that the machine
//! lacks are downloaded (`apt-get install --download-only`, which changes no installed
//! package) and unpacked with `dpkg-deb -x` into the cache, and run from there with
//! `LD_LIBRARY_PATH` and `-L` pointing into it. Installing the package instead would
//! remove a newer `qemu-utils` a user installed (it declares that it breaks the older
//! `qemu-system-common`).

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
/// The packages of QEMU itself unpacked into the cache: the binary, its modules (the TCG
/// accelerator is one) and its firmware. Their other dependencies are unpacked too when
/// the machine lacks them.
const QEMU_PACKAGES: &[&str] = &[QEMU_PACKAGE, "qemu-system-common", "qemu-system-data"];
const QEMU_BINARY: &str = "qemu-system-x86_64";

/// The architecture directory of Debian's multiarch library paths.
const MULTIARCH: &str = "x86_64-linux-gnu";

/// How to run QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    /// The binary.
    pub binary: PathBuf,
    /// For a QEMU unpacked into the cache: its root, whose libraries go on
    /// `LD_LIBRARY_PATH` and whose `usr/share/qemu` holds the firmware (`-L`).
    pub unpacked: Option<PathBuf>,
}

impl Qemu {
    /// `LD_LIBRARY_PATH` for an unpacked QEMU: its own library dirs, then the caller's.
    #[must_use]
    pub fn library_path(&self) -> Option<std::ffi::OsString> {
        let root = self.unpacked.as_ref()?;
        let mut dirs = vec![
            root.join("usr/lib").join(MULTIARCH),
            root.join("lib").join(MULTIARCH),
        ];
        if let Some(old) = env::var_os("LD_LIBRARY_PATH") {
            dirs.extend(env::split_paths(&old));
        }
        env::join_paths(dirs).ok()
    }

    /// The firmware dir of an unpacked QEMU (`-L`), when the cache has one (it does not
    /// when the machine had `qemu-system-data` already: QEMU's own default dir holds it).
    #[must_use]
    pub fn data_dir(&self) -> Option<PathBuf> {
        let dir = self.unpacked.as_ref()?.join("usr/share/qemu");
        dir.is_dir().then_some(dir)
    }

    /// The module dir of an unpacked QEMU (`QEMU_MODULE_DIR`).
    #[must_use]
    pub fn module_dir(&self) -> Option<PathBuf> {
        let dir = self
            .unpacked
            .as_ref()?
            .join("usr/lib")
            .join(MULTIARCH)
            .join("qemu");
        dir.is_dir().then_some(dir)
    }

    /// A command running this QEMU.
    #[must_use]
    pub fn command(&self) -> Command {
        let mut command = self.bare_command();
        if let Some(dir) = self.data_dir() {
            command.arg("-L").arg(dir);
        }
        command
    }

    /// A command running this QEMU with its environment but no arguments.
    fn bare_command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        if let Some(path) = self.library_path() {
            command.env("LD_LIBRARY_PATH", path);
        }
        if let Some(dir) = self.module_dir() {
            command.env("QEMU_MODULE_DIR", dir);
        }
        command
    }

    /// `qemu-system-x86_64 --version`'s first line, if it runs.
    fn version(&self) -> Result<String> {
        let output = self
            .bare_command()
            .arg("--version")
            .output()
            .with_context(|| format!("running {}", self.binary.display()))?;
        ensure!(
            output.status.success(),
            "{} does not run: {}",
            self.binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text.lines().next().unwrap_or("").to_owned())
    }
}

/// What a proof run boots with.
#[derive(Debug)]
pub struct Provisioned {
    /// QEMU.
    pub qemu: Qemu,
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
/// With `unpacked`, QEMU comes from the cache even when one is on `PATH`.
pub fn provision(kernel_override: Option<&Path>, unpacked: bool) -> Result<Provisioned> {
    let mut apt = Apt::default();
    let on_path = if unpacked { None } else { which(QEMU_BINARY) };
    let qemu = match on_path {
        Some(path) => {
            say(&format!("{QEMU_BINARY}: {}", path.display()));
            Qemu {
                binary: path,
                unpacked: None,
            }
        }
        None => unpacked_qemu(&mut apt, &cache_dir()?.join("qemu"))?,
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

/// QEMU unpacked in `dir` (the cache), fetching and unpacking it first if it is not.
fn unpacked_qemu(apt: &mut Apt, dir: &Path) -> Result<Qemu> {
    let root = dir.join("root");
    let qemu = Qemu {
        binary: root.join("usr/bin").join(QEMU_BINARY),
        unpacked: Some(root.clone()),
    };
    if qemu.binary.is_file() {
        match qemu.version() {
            Ok(version) => {
                say(&format!(
                    "{QEMU_BINARY}: {} (unpacked in the cache: {version})",
                    qemu.binary.display()
                ));
                return Ok(qemu);
            }
            Err(e) => {
                say(&format!(
                    "the cached QEMU does not run ({e:#}); fetching it again"
                ));
                fs::remove_dir_all(&root)
                    .with_context(|| format!("removing {}", root.display()))?;
            }
        }
    }
    say(&format!(
        "{QEMU_BINARY} not on PATH: downloading Debian's {QEMU_PACKAGE} and what it needs \
         into {} (nothing is installed or removed)",
        dir.display()
    ));
    Apt::require_root(&format!("downloading {QEMU_PACKAGE}"))?;
    apt.update()?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix("fetch-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a temporary dir in {}", dir.display()))?;
    let debs = work.path().join("debs");
    fs::create_dir_all(debs.join("partial"))?;
    let installed_before = installed_packages()?;
    // The packages apt would install for qemu-system-x86, downloaded only: no package
    // of the machine is installed, upgraded or removed. `--reinstall` makes apt fetch
    // QEMU's own packages even when the machine has them (their other dependencies are
    // then there too).
    let mut archives = std::ffi::OsString::from("Dir::Cache::archives=");
    archives.push(&debs);
    run(Command::new("apt-get")
        .args([
            "install",
            "--download-only",
            "--reinstall",
            "-y",
            "-q",
            "--no-install-recommends",
        ])
        .args(["-o", "APT::Sandbox::User=root", "-o"])
        .arg(&archives)
        .args(QEMU_PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let installed_after = installed_packages()?;
    ensure!(
        installed_before == installed_after,
        "the machine's installed packages changed while downloading {QEMU_PACKAGE}"
    );
    let mut names: Vec<PathBuf> = fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension() == Some(OsStr::new("deb")))
        .collect();
    names.sort();
    ensure!(
        !names.is_empty(),
        "apt downloaded no package for {QEMU_PACKAGE}"
    );
    let unpacking = work.path().join("root");
    for deb in &names {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&unpacking))?;
    }
    let probe = Qemu {
        binary: unpacking.join("usr/bin").join(QEMU_BINARY),
        unpacked: Some(unpacking.clone()),
    };
    let version = probe.version()?;
    let list: Vec<String> = names
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    fs::write(
        dir.join("packages"),
        format!("{version}\n{}\n", list.join("\n")),
    )?;
    // The root appears last, by rename, so a half-done fetch is never taken for a
    // cached QEMU.
    fs::rename(&unpacking, &root)
        .with_context(|| format!("moving the unpacked QEMU to {}", root.display()))?;
    say(&format!(
        "{QEMU_BINARY}: {} ({version}; {} packages unpacked, the machine's packages unchanged)",
        qemu.binary.display(),
        list.len()
    ));
    Ok(qemu)
}

/// Every installed package and its version, as dpkg lists them.
fn installed_packages() -> Result<String> {
    let output = Command::new("dpkg-query")
        .args([
            "-W",
            "-f",
            "${Package}:${Architecture} ${Version} ${db:Status-Abbrev}\n",
        ])
        .output()
        .context("running dpkg-query")?;
    ensure!(
        output.status.success(),
        "dpkg-query failed: {}",
        output.status
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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
                "{what} needs root (apt's lock and package lists). Run this once as root, \
                 or put a {QEMU_BINARY} on PATH"
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
