//! Identity policy: kernel credentials (SO_PEERCRED) to a service name.
//!
//! The kernel tells logd the peer's pid, uid and gid when it connects; the payload is
//! never asked. Config entries `[[service]] name = "metricsd" uid = 998` name uids; a
//! uid no entry names is called `uid:<uid>` (so `uid:1000`).

use std::collections::HashMap;

use serde::Deserialize;

use crate::access::IdSpec;
use crate::config::ConfigError;
use crate::record::Identity;

/// One `[[service]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRule {
    /// The service name: 1-64 bytes of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// The uid whose processes are this service: a number, or a user name looked up in
    /// `/etc/passwd` when the config is validated.
    pub uid: IdSpec,
}

/// The uid to service-name map.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    by_uid: HashMap<u32, String>,
}

impl Policy {
    /// Builds the map, refusing bad names and a uid named twice.
    pub fn new(rules: &[ServiceRule]) -> Result<Policy, ConfigError> {
        let mut by_uid = HashMap::new();
        for r in rules {
            let uid = r.uid.uid("service.uid")?;
            let ok = !r.name.is_empty()
                && r.name.len() <= 64
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return Err(ConfigError::Invalid {
                    key: "service.name",
                    expected: format!(
                        "1-64 bytes of A-Z a-z 0-9 . _ - (got {:?} for uid {uid})",
                        r.name
                    ),
                });
            }
            if by_uid.insert(uid, r.name.clone()).is_some() {
                return Err(ConfigError::Invalid {
                    key: "service.uid",
                    expected: format!("each uid named once (uid {uid} repeats)"),
                });
            }
        }
        Ok(Policy { by_uid })
    }

    /// The service name for a uid: the configured name, else `uid:<uid>`.
    pub fn service_for(&self, uid: u32) -> String {
        match self.by_uid.get(&uid) {
            Some(name) => name.clone(),
            None => format!("uid:{uid}"),
        }
    }

    /// The identity of a peer with these credentials.
    pub fn identify(&self, pid: u32, uid: u32, gid: u32) -> Identity {
        Identity {
            service: self.service_for(uid),
            pid,
            uid,
            gid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_unnamed_uids() {
        let p = Policy::new(&[ServiceRule {
            name: "metricsd".into(),
            uid: IdSpec::Id(998),
        }])
        .unwrap();
        assert_eq!(p.service_for(998), "metricsd");
        assert_eq!(p.service_for(1000), "uid:1000");
        let id = p.identify(7, 998, 5);
        assert_eq!((id.service.as_str(), id.pid, id.gid), ("metricsd", 7, 5));
    }

    #[test]
    fn bad_rules_are_refused() {
        let bad = |name: &str| ServiceRule {
            name: name.into(),
            uid: IdSpec::Id(1),
        };
        assert!(Policy::new(&[bad("")]).is_err());
        assert!(Policy::new(&[bad("a b")]).is_err());
        assert!(Policy::new(&[bad("uid:1")]).is_err());
        assert!(Policy::new(&[bad("a"), bad("b")]).is_err());
    }
}
