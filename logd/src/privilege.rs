//! Socket file modes and owners, and dropping root after binding.
//!
//! Both daemons use these: logd for its socket, metricsd for its control socket.
//! [`SocketAccess::apply`] sets the socket file's owner, group and mode right after bind;
//! [`drop_privileges`] switches a process started as root to an unprivileged uid and gid
//! (supplementary groups cleared) before it starts any thread.

use std::fmt;
use std::io;
use std::path::Path;

use rustix::fs::Mode;
use rustix::process::{Gid, Uid};

use crate::access::IdSpec;
use crate::config::ConfigError;

/// Owner, group and mode a socket file gets after bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits (at most `0o777`).
    pub mode: u32,
    /// New owner uid; `None` keeps the binding process's.
    pub owner: Option<u32>,
    /// New group gid; `None` keeps the binding process's.
    pub group: Option<u32>,
}

impl SocketAccess {
    /// Resolves the config's `socket_mode`, `socket_owner` and `socket_group`.
    pub fn new(
        mode: u32,
        owner: Option<&IdSpec>,
        group: Option<&IdSpec>,
    ) -> Result<SocketAccess, ConfigError> {
        if mode > 0o777 {
            return Err(ConfigError::Invalid {
                key: "socket_mode",
                expected: format!("permission bits 0o000 ..= 0o777 (got 0o{mode:o})"),
            });
        }
        Ok(SocketAccess {
            mode,
            owner: owner.map(|o| o.uid("socket_owner")).transpose()?,
            group: group.map(|g| g.gid("socket_group")).transpose()?,
        })
    }

    /// Sets owner and group (when given), then the mode, of the socket file at `path`.
    pub fn apply(&self, path: &Path) -> io::Result<()> {
        if self.owner.is_some() || self.group.is_some() {
            rustix::fs::chown(
                path,
                self.owner.map(Uid::from_raw),
                self.group.map(Gid::from_raw),
            )?;
        }
        rustix::fs::chmod(path, Mode::from_raw_mode(self.mode))?;
        Ok(())
    }
}

/// The unprivileged identity a daemon started as root switches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// The uid.
    pub uid: u32,
    /// The gid (and the only group: supplementary groups are cleared).
    pub gid: u32,
}

impl RunAs {
    /// Resolves `user` (and `group`, which defaults to the user's primary group in
    /// `/etc/passwd`, or to the number of a numeric uid that has no entry there).
    pub fn new(user: &IdSpec, group: Option<&IdSpec>) -> Result<RunAs, ConfigError> {
        let uid = user.uid("user")?;
        let gid = match group {
            Some(g) => g.gid("group")?,
            None => {
                let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
                primary_gid(&passwd, uid).unwrap_or(uid)
            }
        };
        if uid == 0 {
            return Err(ConfigError::Invalid {
                key: "user",
                expected: "an unprivileged user (not uid 0)".into(),
            });
        }
        Ok(RunAs { uid, gid })
    }
}

/// The primary gid of `uid` in `/etc/passwd` text.
fn primary_gid(passwd: &str, uid: u32) -> Option<u32> {
    passwd.lines().find_map(|line| {
        let cols: Vec<&str> = line.split(':').collect();
        let u: u32 = cols.get(2)?.parse().ok()?;
        if u == uid {
            cols.get(3)?.parse().ok()
        } else {
            None
        }
    })
}

/// Why privileges could not be dropped. The daemon must not serve in that case.
#[derive(Debug)]
pub enum PrivilegeError {
    /// More than one thread runs: a per-thread credential change would leave the others
    /// privileged.
    Threads(usize),
    /// A system call failed.
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// After the switch the process could still become root again.
    NotDropped,
}

impl fmt::Display for PrivilegeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrivilegeError::Threads(n) => write!(
                f,
                "cannot drop privileges: {n} threads run (it must happen before any thread starts)"
            ),
            PrivilegeError::Os { what, source } => {
                write!(f, "cannot drop privileges: {what}: {source}")
            }
            PrivilegeError::NotDropped => {
                f.write_str("privileges not dropped: setuid(0) still succeeds")
            }
        }
    }
}

impl std::error::Error for PrivilegeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PrivilegeError::Os { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Switches this process to `to` if it runs as root: supplementary groups cleared, then
/// the gid, then the uid (real, effective and saved). Returns `Ok(false)` and changes
/// nothing when not running as root. Must run before any thread is started, which is
/// checked (`/proc/self/task`).
pub fn drop_privileges(to: RunAs) -> Result<bool, PrivilegeError> {
    if !rustix::process::geteuid().is_root() {
        return Ok(false);
    }
    let os = |what| {
        move |e: rustix::io::Errno| PrivilegeError::Os {
            what,
            source: e.into(),
        }
    };
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|source| PrivilegeError::Os {
            what: "reading /proc/self/task",
            source,
        })?
        .count();
    if threads != 1 {
        return Err(PrivilegeError::Threads(threads));
    }
    let gid = Gid::from_raw(to.gid);
    let uid = Uid::from_raw(to.uid);
    rustix::thread::set_thread_groups(&[gid]).map_err(os("setgroups"))?;
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(os("setresgid"))?;
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(os("setresuid"))?;
    if rustix::thread::set_thread_uid(Uid::ROOT).is_ok() {
        return Err(PrivilegeError::NotDropped);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mode_above_0o777_is_refused() {
        let e = SocketAccess::new(0o4777, None, None).unwrap_err();
        assert!(e.to_string().contains("socket_mode"), "{e}");
        assert!(SocketAccess::new(0o660, Some(&IdSpec::Id(5)), None).is_ok());
    }

    #[test]
    fn root_is_not_a_user_to_drop_to() {
        let e = RunAs::new(&IdSpec::Id(0), None).unwrap_err();
        assert!(e.to_string().contains("user"), "{e}");
    }

    #[test]
    fn the_primary_group_comes_from_passwd() {
        let passwd = "root:x:0:0::/root:/bin/sh\nlogd:x:998:990::/:/sbin/nologin\n";
        assert_eq!(primary_gid(passwd, 998), Some(990));
        assert_eq!(primary_gid(passwd, 61001), None);
    }
}
