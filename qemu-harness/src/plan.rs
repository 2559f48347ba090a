//! What goes into the guest, in one place: the binaries to build, the daemons the init
//! starts (and how it knows each is ready), the selftests it runs, and the ladder the
//! host expects. Wiring a new daemon or selftest is adding entries here.
//!
//! Every binary is built statically for `x86_64-unknown-linux-gnu` and packed as
//! `/bin/<bin>` (the init as `/init`). The init receives the daemons and selftests as a
//! manifest (see [`crate::manifest`]).

use std::time::Duration;

use crate::guest_config::{self, GuestFile};
use crate::ladder::Step;
use crate::markers;

/// A binary target to build for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBinary {
    /// The cargo package that owns it.
    pub package: &'static str,
    /// The `[[bin]]` name; packed as `/bin/<bin>`.
    pub bin: &'static str,
}

/// The guest's `/init`.
pub const INIT: GuestBinary = GuestBinary {
    package: "qemu-harness",
    bin: "guest-init",
};

/// The fixture echo daemon and selftest of the developer ladder.
pub const FIXTURE: GuestBinary = GuestBinary {
    package: "qemu-harness",
    bin: "guest-fixture",
};

/// A long-running process the init starts before the selftests, in list order.
///
/// The init relays its stdout and stderr to the console line by line and calls it ready
/// when both hold: it printed a line starting with `ready_line` (a marker it prints only
/// after a real round trip through its own service) and, if `socket` is set, a Unix
/// socket exists at that path. It fails (prints a FAIL line) when the daemon exits first
/// or `ready_timeout` passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Daemon {
    /// A short name for messages.
    pub name: &'static str,
    /// The binary, one of the plan's [`GuestBinary`] names.
    pub bin: &'static str,
    /// Its arguments.
    pub args: &'static [&'static str],
    /// The readiness marker the daemon prints itself.
    pub ready_line: &'static str,
    /// A Unix socket the daemon serves, which must exist before it counts as ready.
    pub socket: Option<&'static str>,
    /// How long the init waits for readiness.
    pub ready_timeout: Duration,
}

/// A program the init runs to completion after every daemon is ready, in list order.
/// It prints its own ladder markers; the init fails it (prints a FAIL line) when it exits
/// non-zero or outlives `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selftest {
    /// A short name for messages.
    pub name: &'static str,
    /// The binary, one of the plan's [`GuestBinary`] names.
    pub bin: &'static str,
    /// Its arguments.
    pub args: &'static [&'static str],
    /// How long it may run.
    pub timeout: Duration,
}

/// One kind of proof run: what to build, what the init does, what the host expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The name given to `--ladder`.
    pub name: &'static str,
    /// The binaries to build and pack; the first is the init.
    pub binaries: &'static [GuestBinary],
    /// Daemons, started in order.
    pub daemons: &'static [Daemon],
    /// Selftests, run in order.
    pub selftests: &'static [Selftest],
    /// Config files packed into the image.
    pub files: &'static [GuestFile],
    /// The expected console ladder.
    pub ladder: &'static [Step],
}

/// The full proof ladder: logd, metricsd and the selftest producer.
///
/// logd prints `logd: ready` after appending a start record through its own socket and
/// reading it back (`--ready-check`); metricsd prints `metricsd: ready` after its first
/// export round trip to logd. Both read their config from the files of
/// [`guest_config::FILES`], which the selftest reads too. The selftest starts
/// `guest-hostile` (a separate binary, so metricsd's default identity policy, the
/// executable's file name, makes it a service of its own) and re-executes itself for the
/// backpressure child.
pub const FULL: Plan = Plan {
    name: "full",
    binaries: &[
        INIT,
        GuestBinary {
            package: "logd",
            bin: "logd",
        },
        GuestBinary {
            package: "metricsd",
            bin: "metricsd",
        },
        GuestBinary {
            package: "qemu-harness",
            bin: "guest-selftest",
        },
        GuestBinary {
            package: "qemu-harness",
            bin: "guest-hostile",
        },
        GuestBinary {
            package: "qemu-harness",
            bin: "guest-sealed",
        },
    ],
    daemons: &[
        Daemon {
            name: "logd",
            bin: "logd",
            args: &[
                "serve",
                "--socket",
                "/run/logd.sock",
                "--config",
                guest_config::LOGD_PATH,
                "--ready-check",
            ],
            ready_line: markers::LOGD_READY,
            socket: Some("/run/logd.sock"),
            ready_timeout: Duration::from_secs(25),
        },
        Daemon {
            name: "metricsd",
            bin: "metricsd",
            args: &[
                "serve",
                "--config",
                guest_config::METRICSD_PATH,
                "--socket",
                "/run/metricsd.sock",
                "--logd-socket",
                "/run/logd.sock",
            ],
            ready_line: markers::METRICSD_READY,
            socket: Some("/run/metricsd.sock"),
            ready_timeout: Duration::from_secs(55),
        },
    ],
    selftests: &[Selftest {
        name: "selftest",
        bin: "guest-selftest",
        args: &[
            "run",
            "--logd",
            "/run/logd.sock",
            "--metricsd",
            "/run/metricsd.sock",
            "--logd-config",
            guest_config::LOGD_PATH,
            "--metricsd-config",
            guest_config::METRICSD_PATH,
        ],
        timeout: Duration::from_secs(600),
    }],
    files: guest_config::FILES,
    ladder: markers::FULL,
};

/// The developer run that works today: the init, the fixture echo daemon and selftest.
pub const INIT_ONLY: Plan = Plan {
    name: "init-only",
    binaries: &[INIT, FIXTURE],
    daemons: &[Daemon {
        name: "fixture-echo",
        bin: "guest-fixture",
        args: &["daemon", "/run/fixture-echo.sock"],
        ready_line: markers::FIXTURE_READY,
        socket: Some("/run/fixture-echo.sock"),
        ready_timeout: Duration::from_secs(25),
    }],
    selftests: &[Selftest {
        name: "fixture-selftest",
        bin: "guest-fixture",
        args: &["selftest", "/run/fixture-echo.sock"],
        timeout: Duration::from_secs(25),
    }],
    files: &[],
    ladder: markers::INIT_ONLY,
};

/// Every plan, for `--ladder`.
pub const PLANS: &[Plan] = &[FULL, INIT_ONLY];

/// The plan called `name`.
#[must_use]
pub fn by_name(name: &str) -> Option<&'static Plan> {
    PLANS.iter().find(|plan| plan.name == name)
}

/// Where a guest binary lives inside the initramfs.
#[must_use]
pub fn guest_path(bin: &str) -> String {
    format!("/bin/{bin}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_consistent() {
        for plan in PLANS {
            assert_eq!(plan.binaries.first(), Some(&INIT), "{}", plan.name);
            let built = |bin: &str| plan.binaries.iter().any(|b| b.bin == bin);
            for daemon in plan.daemons {
                assert!(built(daemon.bin), "{}: {} not built", plan.name, daemon.bin);
                assert!(
                    plan.ladder.iter().any(|s| s.ok == daemon.ready_line),
                    "{}: {} is not on the ladder",
                    plan.name,
                    daemon.ready_line
                );
            }
            for selftest in plan.selftests {
                assert!(
                    built(selftest.bin),
                    "{}: {} not built",
                    plan.name,
                    selftest.bin
                );
            }
            for file in plan.files {
                let dir = file.path.rsplit_once('/').map(|(dir, _)| dir);
                assert!(
                    dir.is_some_and(crate::initramfs::creates_dir),
                    "{}: {} is not in a directory of the image",
                    plan.name,
                    file.path
                );
            }
            assert_eq!(by_name(plan.name), Some(plan));
        }
    }
}
