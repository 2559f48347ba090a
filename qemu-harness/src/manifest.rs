//! The manifest the host packs into the initramfs at [`GUEST_PATH`] and the guest init
//! reads: which daemons to start (and how to tell they are ready) and which selftests to
//! run. It is generated from a [`Plan`]; nobody writes it by hand.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::plan::{self, Plan};

/// Where the manifest lives inside the guest.
pub const GUEST_PATH: &str = "/etc/qemu-harness/manifest.toml";

/// What the guest init does after mounting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plan's name, for messages.
    pub plan: String,
    /// Daemons, started in order.
    #[serde(default)]
    pub daemons: Vec<DaemonEntry>,
    /// Selftests, run in order.
    #[serde(default)]
    pub selftests: Vec<SelftestEntry>,
}

/// A daemon as the guest init sees it (see [`plan::Daemon`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonEntry {
    /// A short name for messages.
    pub name: String,
    /// Absolute path of the executable inside the guest.
    pub path: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// The readiness marker the daemon prints.
    pub ready_line: String,
    /// A Unix socket that must exist before the daemon counts as ready.
    pub socket: Option<String>,
    /// How long to wait for readiness, in milliseconds.
    pub ready_timeout_ms: u64,
}

/// A selftest as the guest init sees it (see [`plan::Selftest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelftestEntry {
    /// A short name for messages.
    pub name: String,
    /// Absolute path of the executable inside the guest.
    pub path: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// How long it may run, in milliseconds.
    pub timeout_ms: u64,
}

/// A manifest that could not be written or read.
#[derive(Debug)]
pub enum ManifestError {
    /// Serializing failed.
    Write(toml::ser::Error),
    /// The text is not a valid manifest.
    Read(toml::de::Error),
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Write(e) => write!(f, "cannot write the guest manifest: {e}"),
            Self::Read(e) => write!(f, "invalid guest manifest {GUEST_PATH}: {e}"),
        }
    }
}

impl std::error::Error for ManifestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Write(e) => Some(e),
            Self::Read(e) => Some(e),
        }
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

impl Manifest {
    /// The manifest for `plan`, with every timeout multiplied by `timeout_factor`.
    #[must_use]
    pub fn from_plan(plan: &Plan, timeout_factor: f64) -> Self {
        let scale = |d: std::time::Duration| millis(d.mul_f64(timeout_factor));
        Self {
            plan: plan.name.to_owned(),
            daemons: plan
                .daemons
                .iter()
                .map(|d| DaemonEntry {
                    name: d.name.to_owned(),
                    path: plan::guest_path(d.bin),
                    args: strings(d.args),
                    ready_line: d.ready_line.to_owned(),
                    socket: d.socket.map(str::to_owned),
                    ready_timeout_ms: scale(d.ready_timeout),
                })
                .collect(),
            selftests: plan
                .selftests
                .iter()
                .map(|s| SelftestEntry {
                    name: s.name.to_owned(),
                    path: plan::guest_path(s.bin),
                    args: strings(s.args),
                    timeout_ms: scale(s.timeout),
                })
                .collect(),
        }
    }

    /// The manifest as TOML text.
    pub fn to_toml(&self) -> Result<String, ManifestError> {
        toml::to_string_pretty(self).map_err(ManifestError::Write)
    }

    /// Parses manifest text.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        toml::from_str(text).map_err(ManifestError::Read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_plan() {
        for plan in plan::PLANS {
            let manifest = Manifest::from_plan(plan, 2.0);
            let text = manifest.to_toml().expect("serializes");
            assert_eq!(Manifest::parse(&text).expect("parses"), manifest);
            assert_eq!(manifest.daemons.len(), plan.daemons.len());
        }
    }

    #[test]
    fn scales_timeouts_and_maps_paths() {
        let manifest = Manifest::from_plan(&plan::INIT_ONLY, 2.0);
        let daemon = &manifest.daemons[0];
        assert_eq!(daemon.path, "/bin/guest-fixture");
        assert_eq!(
            daemon.ready_timeout_ms,
            2 * millis(plan::INIT_ONLY.daemons[0].ready_timeout)
        );
    }

    #[test]
    fn rejects_unknown_fields() {
        let err = Manifest::parse("plan = \"x\"\nbogus = 1\n").expect_err("unknown field");
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
