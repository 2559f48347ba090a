//! Who a producer is: the kernel's word (`SO_PEERCRED` at accept) mapped to a service
//! name by policy. Nothing a producer writes can change it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::ServiceRule;

/// A connected producer as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// metricsd's id for the connection (from 1, never reused while running).
    pub connection: u64,
    /// Process id at connect time.
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// The executable, as `/proc/<pid>/exe` read at accept (`None` when unreadable).
    pub exe: Option<PathBuf>,
}

impl Peer {
    /// The peer of `connection` with credentials `(pid, uid, gid)`, reading its
    /// executable path from `/proc` (maintained by the kernel, not the process).
    pub fn from_credentials(connection: u64, pid: u32, uid: u32, gid: u32) -> Self {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        Self {
            connection,
            pid,
            uid,
            gid,
            exe,
        }
    }
}

/// Maps a peer to its service name. The production policy is [`Policy`]; tests and
/// other capability systems may supply their own.
pub trait Identify: Send {
    /// The service name of `peer` (1 to 64 bytes of `[A-Za-z0-9_.:-]`; anything else
    /// is replaced by `uid:<n>`).
    fn service(&self, peer: &Peer) -> String;
}

impl<F: Fn(&Peer) -> String + Send> Identify for F {
    fn service(&self, peer: &Peer) -> String {
        self(peer)
    }
}

/// The configured policy: `[[services]]` rules, first match wins; otherwise the
/// executable's file name; otherwise `uid:<n>`.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Arc<[ServiceRule]>,
}

impl Policy {
    /// The policy of these rules.
    pub fn new(rules: &[ServiceRule]) -> Self {
        Self {
            rules: Arc::from(rules.to_vec()),
        }
    }
}

fn rule_matches(rule: &ServiceRule, peer: &Peer) -> bool {
    rule.uid.is_none_or(|u| u == peer.uid)
        && rule.pid.is_none_or(|p| p == peer.pid)
        && rule
            .exe
            .as_ref()
            .is_none_or(|e| peer.exe.as_ref() == Some(e))
}

impl Identify for Policy {
    fn service(&self, peer: &Peer) -> String {
        if let Some(rule) = self.rules.iter().find(|r| rule_matches(r, peer)) {
            return rule.name.clone();
        }
        let from_exe = peer
            .exe
            .as_ref()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .map(sanitize)
            .filter(|n| crate::config::valid_service_name(n));
        from_exe.unwrap_or_else(|| format!("uid:{}", peer.uid))
    }
}

/// The service name `identify` gives `peer`, made safe to bind: a name that is not
/// 1 to 64 bytes of `[A-Za-z0-9_.:-]`, or that is metricsd's own health service
/// (`metricsd`, which no producer may speak for, whatever its executable is called),
/// becomes `uid:<n>`.
pub fn bound_service(identify: &dyn Identify, peer: &Peer) -> String {
    let name = identify.service(peer);
    if crate::config::valid_service_name(&name) && name != crate::schema::HEALTH_SERVICE {
        name
    } else {
        format!("uid:{}", peer.uid)
    }
}

/// Keeps the allowed bytes of a file name (others become `_`), at most 64 of them.
fn sanitize(name: &str) -> String {
    name.bytes()
        .take(64)
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-') {
                char::from(b)
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, exe: Option<&str>) -> Peer {
        Peer {
            connection: 1,
            pid: 42,
            uid,
            gid: 0,
            exe: exe.map(PathBuf::from),
        }
    }

    #[test]
    fn rules_then_exe_then_uid() {
        let policy = Policy::new(&[
            ServiceRule {
                name: "web".into(),
                uid: Some(1000),
                pid: None,
                exe: None,
            },
            ServiceRule {
                name: "db".into(),
                uid: None,
                pid: None,
                exe: Some("/usr/bin/pg".into()),
            },
        ]);
        assert_eq!(policy.service(&peer(1000, Some("/usr/bin/pg"))), "web");
        assert_eq!(policy.service(&peer(7, Some("/usr/bin/pg"))), "db");
        assert_eq!(policy.service(&peer(7, Some("/opt/my app"))), "my_app");
        assert_eq!(policy.service(&peer(7, None)), "uid:7");
    }

    #[test]
    fn no_producer_is_bound_to_metricsds_own_service() {
        let policy = Policy::new(&[]);
        let impostor = peer(1000, Some("/tmp/evil/metricsd"));
        assert_eq!(
            policy.service(&impostor),
            "metricsd",
            "the exe rule alone would allow it"
        );
        assert_eq!(bound_service(&policy, &impostor), "uid:1000");
        let custom = |_: &Peer| String::from("metricsd");
        assert_eq!(bound_service(&custom, &peer(7, None)), "uid:7");
        let bad = |_: &Peer| String::from("has space");
        assert_eq!(bound_service(&bad, &peer(8, None)), "uid:8");
        assert_eq!(
            bound_service(&policy, &peer(9, Some("/usr/bin/checkout"))),
            "checkout"
        );
    }
}
