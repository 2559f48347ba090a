//! `logd`: the bounded, hardened log sink that `metricsd` exports to and any service can
//! log to.
//!
//! Who uses it: `metricsd` (batched APPENDs of structured records through
//! [`client::BufferedClient`]), the QEMU selftest (QUERY and STATS to check exported
//! values exactly), operators (the `logd` binary: `logd serve`, `logd query`,
//! `logd stats`) and other crates' tests (an in-process [`server::Server`]).
//!
//! ```
//! use logd::{client::Client, server::Server, Config, Level, Query, Record};
//!
//! let socket = std::env::temp_dir().join(format!("logd-doc-{}.sock", std::process::id()));
//! let config = Config { socket, ..Config::default() };
//! let server = Server::bind(config)?.spawn()?; // listening once bind returns
//! let mut c = Client::connect(server.path())?;
//! let report = c.append(&[Record::new(Level::Info, "metrics", "requests_total")
//!     .field("value", "42")])?;
//! assert!(report.all_accepted());
//! let page = c.query(&Query::new().field("value", "42"))?;
//! assert_eq!(page.records[0].record.message, "requests_total");
//! server.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! logd stamps every record with its receive time, a record id and the sender's identity
//! from `SO_PEERCRED` (pid, uid, gid), named by policy (a configured `[[service]]`, else
//! `uid:<uid>`). A record whose fields claim an identity ([`is_identity_key`]) is refused
//! as `invalid_args`. A peer reads only the records its own uid sent unless it is root
//! or the `[access]` section lists it ([`access`]). Every bound and the wire format are in `logd/README.md`.

pub mod access;
pub mod client;
pub mod config;
pub mod disk;
pub mod frame;
pub mod journal;
pub mod policy;
pub mod privilege;
pub mod query;
pub mod quota;
pub mod record;
pub mod server;
pub mod stats;
pub mod status;
pub mod time;

pub use access::{Access, IdSpec};
pub use client::{BufferedClient, Client, ClientError, ClientOptions};
pub use config::Config;
pub use query::{Query, QueryPage};
pub use record::{Identity, Level, Record, StoredRecord, is_identity_key, key_in_lists};
pub use server::{RunningServer, Server, ServerError, ShutdownHandle};
pub use stats::{RejectCounts, SenderStats, Stats};
pub use status::{AppendReport, Reason, RecordStatus, Reject};
