//! Who may read what (the journald model), and the OS identities a config names.
//!
//! A querying peer is identified by `SO_PEERCRED` when it connects. It sees only records
//! whose sender had its uid, and only its own uid's rows in STATS, unless it is root or
//! the `[access]` section lists its uid (`readers`) or its group (`reader_groups`, matched
//! against the gid the kernel reports for the peer). A QUERY that names another service
//! than the peer's own is refused `denied`/`query_without_acl` and counted.
//!
//! Users and groups in a config are numbers or names; names are looked up once, when the
//! config is validated, in `/etc/passwd` and `/etc/group`.

use std::fmt;

use serde::Deserialize;

use crate::config::ConfigError;

/// A user or group as a config names it: a number, or a name looked up in `/etc/passwd`
/// (users) or `/etc/group` (groups).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IdSpec {
    /// A numeric uid or gid.
    Id(u32),
    /// A user or group name.
    Name(String),
}

impl fmt::Display for IdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdSpec::Id(n) => write!(f, "{n}"),
            IdSpec::Name(s) => write!(f, "{s:?}"),
        }
    }
}

/// Which database a name is looked up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Db {
    Users,
    Groups,
}

impl Db {
    fn file(self) -> &'static str {
        match self {
            Db::Users => "/etc/passwd",
            Db::Groups => "/etc/group",
        }
    }
}

/// The id of `name` in a `name:x:id:...` file's text.
fn lookup_in(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut cols = line.split(':');
        let n = cols.next()?;
        let id = cols.nth(1)?;
        (n == name).then(|| id.parse().ok()).flatten()
    })
}

impl IdSpec {
    fn resolve(&self, db: Db, key: &'static str) -> Result<u32, ConfigError> {
        match self {
            IdSpec::Id(n) => Ok(*n),
            IdSpec::Name(name) => {
                let text = std::fs::read_to_string(db.file()).unwrap_or_default();
                lookup_in(&text, name).ok_or_else(|| ConfigError::Invalid {
                    key,
                    expected: format!(
                        "a number or a name listed in {} (no entry {name:?})",
                        db.file()
                    ),
                })
            }
        }
    }

    /// The uid this names; `key` is the config key named in the error.
    pub fn uid(&self, key: &'static str) -> Result<u32, ConfigError> {
        self.resolve(Db::Users, key)
    }

    /// The gid this names; `key` is the config key named in the error.
    pub fn gid(&self, key: &'static str) -> Result<u32, ConfigError> {
        self.resolve(Db::Groups, key)
    }
}

/// The `[access]` section: who reads every sender's records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Users that read all records and every STATS row (root always does).
    pub readers: Vec<IdSpec>,
    /// Groups whose members read all records: a peer whose gid (as the kernel reports it
    /// in `SO_PEERCRED`, its effective gid when it connected) is listed.
    pub reader_groups: Vec<IdSpec>,
}

/// The resolved read policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    readers: Vec<u32>,
    reader_groups: Vec<u32>,
}

impl Access {
    /// Resolves names; an unknown name is an error naming the key.
    pub fn new(c: &AccessConfig) -> Result<Access, ConfigError> {
        Ok(Access {
            readers: c
                .readers
                .iter()
                .map(|r| r.uid("access.readers"))
                .collect::<Result<_, _>>()?,
            reader_groups: c
                .reader_groups
                .iter()
                .map(|g| g.gid("access.reader_groups"))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether a peer with these credentials reads every sender's records.
    pub fn reads_all(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || self.readers.contains(&uid) || self.reader_groups.contains(&gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_looked_up_by_the_first_column() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nlogd:x:998:998::/:/usr/sbin/nologin\n";
        assert_eq!(lookup_in(passwd, "logd"), Some(998));
        assert_eq!(lookup_in(passwd, "root"), Some(0));
        assert_eq!(lookup_in(passwd, "log"), None);
        assert_eq!(lookup_in("broken\nx:y:zz\n", "x"), None);
    }

    #[test]
    fn root_and_listed_ids_read_all() {
        let a = Access::new(&AccessConfig {
            readers: vec![IdSpec::Id(1000)],
            reader_groups: vec![IdSpec::Id(50)],
        })
        .unwrap();
        assert!(a.reads_all(0, 0));
        assert!(a.reads_all(1000, 1000));
        assert!(a.reads_all(1001, 50));
        assert!(!a.reads_all(1001, 1001));
        assert!(!Access::default().reads_all(1000, 1000));
    }

    #[test]
    fn an_unknown_name_is_named() {
        let e = Access::new(&AccessConfig {
            readers: vec![IdSpec::Name("no-such-user-for-logd".into())],
            reader_groups: vec![],
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("access.readers") && msg.contains("no-such-user-for-logd"),
            "{msg}"
        );
    }
}
