//! The `logd` binary: `serve`, `query`, `stats`. Parsing and wiring only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use logd::IdSpec;
use logd::config::default_socket_path;
use logd::privilege::{RunAs, drop_privileges};
use logd::time::{format_rfc3339, now_ns, parse_time};
use logd::{Client, Config, Level, Query, Record, RecordStatus, Server, Stats, StoredRecord};

const ABOUT: &str = "The bounded, hardened log sink: per-sender budgets, identity from the kernel, a query surface.";

const LONG_ABOUT: &str = "\
logd stores structured log records sent over a Unix socket. Who sent a record is what the
kernel says (SO_PEERCRED), mapped to a service name by the config's [[service]] entries;
unknown uids are named uid:<uid>. A user reads only the records its own uid sent (and only
its own rows of `logd stats`) unless it is root or listed in the config's [access] readers
or reader_groups; a query naming another service is refused (denied/query_without_acl).
Every bound has a default (see logd/README.md).

Examples:
  logd serve                                   # default socket, memory-only journal
  logd serve --socket /tmp/logd.sock --journal-dir /var/lib/logd
  logd query --service metricsd --level warn --since 15m
  logd query --field name=requests_total --json
  logd query --follow --scope 'metrics.*'
  logd stats --json";

#[derive(Parser)]
#[command(name = "logd", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    #[command(long_about = "\
Run the daemon in the foreground until SIGTERM or SIGINT; then it finishes the requests in
flight, syncs the disk journal and removes the socket. Prints `logd: listening on <path>`
once the socket accepts connections. With --ready-check it then proves it serves: it
appends a start record (scope `logd`, message `ready`, field `instance`) through its own
socket, queries it back, compares, and only then prints `logd: ready` (on a mismatch:
`logd: FAIL: ...`, and it stops with an error).

The socket defaults to $XDG_RUNTIME_DIR/logd.sock, else /run/logd.sock. Flags override the
config file. With --journal-dir, records are written to append-only segment files before
they are acknowledged and recovered at the next start.

Examples:
  logd serve
  logd serve --config /etc/logd.toml
  logd serve --socket /tmp/logd.sock --journal-dir /tmp/logd-journal
  logd serve --socket /run/logd.sock --ready-check")]
    Serve(ServeArgs),
    /// Print stored records, oldest first.
    #[command(long_about = "\
Print stored records matching every given filter, oldest first, one per line:
  <time> #<id> <service>[<pid>] <LEVEL> <scope>: <message> key=value ...
A page holds at most --limit records; when more match, the last line (on stderr) gives the
--cursor to continue with. --follow keeps printing new records as they arrive.

Times (--since, --until) take an RFC 3339 UTC time (2024-05-01T12:00:00Z), @<unix seconds>,
or an age (30s, 15m, 2h, 1d).

Examples:
  logd query --service metricsd --since 1h
  logd query --level error --scope 'net.*'
  logd query --field name=requests_total --field kind=counter --json
  logd query --cursor 1200 --limit 50
  logd query --follow")]
    Query(QueryArgs),
    /// Print logd's counters: records, rejects per class and per sender, journal sizes.
    #[command(long_about = "\
Print logd's counters: records stored and evicted, rejects per class (invalid_args,
over_limit, rate_limited, internal, denied) in total and per sender, the memory and disk
journal sizes. Unless root or an [access] reader, a user sees only its own uid's senders.

Examples:
  logd stats
  logd stats --json")]
    Stats(StatsArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Socket path [default: $XDG_RUNTIME_DIR/logd.sock, else /run/logd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TOML config file (every key optional; see logd/README.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Keep an on-disk journal in DIR (created if missing).
    #[arg(long, value_name = "DIR")]
    journal_dir: Option<PathBuf>,
    /// When started as root: switch to this user (uid or name) once the socket is bound
    /// and the journal opened [config: user].
    #[arg(long, value_name = "USER", value_parser = parse_id)]
    user: Option<IdSpec>,
    /// The group to switch to with --user [config: group; default: the user's primary
    /// group].
    #[arg(long, value_name = "GROUP", value_parser = parse_id)]
    group: Option<IdSpec>,
    /// After binding, append a start record through the socket, read it back, and only
    /// then print `logd: ready` (for supervisors; the record stays in the journal).
    #[arg(long)]
    ready_check: bool,
}

#[derive(Args)]
struct Conn {
    /// Socket path [default: $XDG_RUNTIME_DIR/logd.sock, else /run/logd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Args)]
struct QueryArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only records from this service (as logd stamped it, e.g. metricsd or uid:1000).
    #[arg(long, value_name = "S")]
    service: Option<String>,
    /// Only this scope; end with * for a prefix (e.g. 'metrics.*').
    #[arg(long, value_name = "S")]
    scope: Option<String>,
    /// Only this level and above: trace, debug, info, warn, error.
    #[arg(long, value_name = "L", value_parser = parse_level)]
    level: Option<Level>,
    /// Only records received at or after this time.
    #[arg(long, value_name = "TIME", value_parser = parse_when)]
    since: Option<u64>,
    /// Only records received before this time.
    #[arg(long, value_name = "TIME", value_parser = parse_when)]
    until: Option<u64>,
    /// Only records with this field (repeatable; all must match).
    #[arg(long = "field", value_name = "KEY=VALUE", value_parser = parse_field)]
    fields: Vec<(String, String)>,
    /// Start after this record id (from a previous page).
    #[arg(long, value_name = "C", default_value_t = 0)]
    cursor: u64,
    /// At most N records per page (logd caps it at its max_query_limit).
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: u32,
    /// Keep waiting for and printing new records until interrupted.
    #[arg(long)]
    follow: bool,
    /// JSON output: one object {records, next_cursor, more}; with --follow, one record
    /// object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StatsArgs {
    #[command(flatten)]
    conn: Conn,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

fn parse_id(s: &str) -> Result<IdSpec, String> {
    if s.is_empty() {
        return Err("expected a number or a name (e.g. 998 or logd)".into());
    }
    Ok(match s.parse::<u32>() {
        Ok(n) => IdSpec::Id(n),
        Err(_) => IdSpec::Name(s.to_owned()),
    })
}

fn parse_level(s: &str) -> Result<Level, String> {
    s.parse::<Level>().map_err(|e| e.to_string())
}

fn parse_when(s: &str) -> Result<u64, String> {
    parse_time(s, now_ns())
}

fn parse_field(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!(
            "{s:?} is not a field match; expected KEY=VALUE (e.g. name=requests_total)"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Query(a) => query(a),
        Command::Stats(a) => stats(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("logd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let mut config = match &a.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(s) = a.socket {
        config.socket = s;
    }
    if let Some(d) = a.journal_dir {
        config.journal_dir = Some(d);
    }
    if a.user.is_some() {
        config.user = a.user;
    }
    if a.group.is_some() {
        config.group = a.group;
    }
    let run_as = config.run_as()?;
    let journal_dir = config.journal_dir.clone();
    let server = Server::bind(config)?;
    // Before any thread starts: a credential change applies to the calling thread only.
    if let Some(to) = run_as {
        if rustix::process::geteuid().is_root() {
            if let Some(dir) = &journal_dir {
                hand_over_journal(dir, to)?;
            }
        }
        if drop_privileges(to)? {
            println!("logd: running as uid {} gid {}", to.uid, to.gid);
        }
    }
    let handle = server.shutdown_handle();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install SIGTERM/SIGINT handlers")?;
    std::thread::Builder::new()
        .name("logd-signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                handle.shutdown();
            }
        })
        .context("cannot start the signal thread")?;
    println!("logd: listening on {}", server.path().display());
    let failed = Arc::new(AtomicBool::new(false));
    if a.ready_check {
        let path = server.path().to_owned();
        let stop = server.shutdown_handle();
        let failed = Arc::clone(&failed);
        std::thread::Builder::new()
            .name("logd-ready".into())
            .spawn(move || match ready_round_trip(&path) {
                Ok(()) => println!("logd: ready"),
                Err(e) => {
                    println!("logd: FAIL: ready check: {e:#}");
                    failed.store(true, Ordering::Release);
                    stop.shutdown();
                }
            })
            .context("cannot start the ready-check thread")?;
    }
    server.run()?;
    if failed.load(Ordering::Acquire) {
        bail!("the ready check failed");
    }
    Ok(())
}

/// Gives the journal directory and its segment files to the user logd switches to, so
/// it can keep writing and rotating them.
fn hand_over_journal(dir: &Path, to: RunAs) -> Result<()> {
    let owner = (
        Some(rustix::process::Uid::from_raw(to.uid)),
        Some(rustix::process::Gid::from_raw(to.gid)),
    );
    rustix::fs::chown(dir, owner.0, owner.1)
        .with_context(|| format!("cannot give {} to uid {}", dir.display(), to.uid))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "seg") {
            rustix::fs::chown(&path, owner.0, owner.1)
                .with_context(|| format!("cannot give {} to uid {}", path.display(), to.uid))?;
        }
    }
    Ok(())
}

/// One real round trip through the server's own socket: APPEND a start record, QUERY it
/// back by its unique `instance` field, and compare it with what was sent.
fn ready_round_trip(path: &Path) -> Result<()> {
    let pid = std::process::id();
    let instance = format!("{pid}-{}", now_ns());
    let sent = Record::new(Level::Info, "logd", "ready").field("instance", &instance);
    let mut client = Client::connect(path).context("connecting to the own socket")?;
    let report = client.append(std::slice::from_ref(&sent))?;
    let id = match report.statuses.as_slice() {
        [RecordStatus::Accepted(id)] => *id,
        other => bail!("the start record was not stored: {other:?}"),
    };
    let page = client.query(&Query::new().scope("logd").field("instance", &instance))?;
    match page.records.as_slice() {
        [got] if got.id == id && got.record == sent && got.sender.pid == pid => Ok(()),
        [got] => bail!(
            "read back #{} {:?} from pid {}; expected #{id} {sent:?} from pid {pid}",
            got.id,
            got.record,
            got.sender.pid
        ),
        other => bail!("read back {} start records; expected 1", other.len()),
    }
}

fn connect(c: &Conn) -> Result<Client> {
    let path = c.socket.clone().unwrap_or_else(default_socket_path);
    Client::connect(&path).with_context(|| {
        "is logd running? start it with `logd serve` or pass --socket PATH".to_owned()
    })
}

fn query(a: QueryArgs) -> Result<()> {
    if a.limit == 0 {
        bail!("--limit 0: expected a page size of at least 1");
    }
    if let (Some(s), Some(u)) = (a.since, a.until) {
        if s >= u {
            bail!(
                "--since must be before --until (got {} and {})",
                format_rfc3339(s),
                format_rfc3339(u)
            );
        }
    }
    let mut client = connect(&a.conn)?;
    let q = Query {
        service: a.service,
        scope: a.scope,
        min_level: a.level,
        since_ns: a.since,
        until_ns: a.until,
        fields: a.fields,
        cursor: a.cursor,
        limit: a.limit,
        wait_ms: 0,
    };
    if !a.follow {
        let page = client.query(&q)?;
        if a.json {
            let v = serde_json::json!({
                "records": page.records.iter().map(record_json).collect::<Vec<_>>(),
                "next_cursor": page.next_cursor,
                "more": page.more,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            for r in &page.records {
                println!("{}", record_line(r));
            }
            if page.more {
                eprintln!(
                    "-- more records: continue with --cursor {}",
                    page.next_cursor
                );
            }
        }
        return Ok(());
    }
    let mut q = q;
    q.wait_ms = 10_000;
    loop {
        let page = client.query(&q)?;
        for r in &page.records {
            if a.json {
                println!("{}", serde_json::to_string(&record_json(r))?);
            } else {
                println!("{}", record_line(r));
            }
        }
        q.cursor = page.next_cursor;
        if page.records.is_empty() && !page.more {
            // Caught up and logd's long poll ended: ask again.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn record_line(r: &StoredRecord) -> String {
    let mut s = format!(
        "{} #{} {}[{}] {} {}: {}",
        format_rfc3339(r.received_ns),
        r.id,
        r.sender.service,
        r.sender.pid,
        r.record.level.as_str().to_ascii_uppercase(),
        r.record.scope,
        r.record.message
    );
    for (k, v) in &r.record.fields {
        if v.contains(char::is_whitespace) || v.is_empty() {
            s.push_str(&format!(" {k}={v:?}"));
        } else {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    s
}

fn record_json(r: &StoredRecord) -> serde_json::Value {
    let fields: serde_json::Map<String, serde_json::Value> = r
        .record
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "id": r.id,
        "received_ns": r.received_ns,
        "time": format_rfc3339(r.received_ns),
        "service": r.sender.service,
        "pid": r.sender.pid,
        "uid": r.sender.uid,
        "gid": r.sender.gid,
        "level": r.record.level.as_str(),
        "scope": r.record.scope,
        "message": r.record.message,
        "fields": fields,
    })
}

fn stats(a: StatsArgs) -> Result<()> {
    let mut client = connect(&a.conn)?;
    let s = client.stats()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", stats_text(&s));
    }
    Ok(())
}

fn stats_text(s: &Stats) -> String {
    let mut out = String::new();
    let r = &s.rejected;
    out.push_str(&format!(
        "uptime {:.1}s  connections {}  next id {}\n\
         records: accepted {}  evicted {}  held {} ({} bytes)\n\
         rejected: invalid_args {}  over_limit {}  rate_limited {}  internal {}  denied {}\n",
        s.uptime_ms as f64 / 1000.0,
        s.connections,
        s.next_id,
        s.accepted,
        s.evicted,
        s.journal_records,
        s.journal_bytes,
        r.invalid_args,
        r.over_limit,
        r.rate_limited,
        r.internal,
        r.denied
    ));
    if s.disk.enabled {
        let d = &s.disk;
        out.push_str(&format!(
            "disk: {} bytes in {} segments  recovered {}  corrupt skipped {}  errors {}\n",
            d.bytes, d.segments, d.recovered, d.corrupt_skipped, d.errors
        ));
    } else {
        out.push_str("disk: off (memory-only journal)\n");
    }
    out.push_str(&format!(
        "{:<24} {:>8} {:>6} {:>5} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}\n",
        "SERVICE",
        "PID",
        "UID",
        "CONN",
        "ACCEPTED",
        "HELD",
        "EVICTED",
        "INVALID",
        "OVER",
        "RATE",
        "DENIED"
    ));
    for p in &s.senders {
        out.push_str(&format!(
            "{:<24} {:>8} {:>6} {:>5} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}\n",
            p.service,
            p.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            p.uid,
            p.connections,
            p.accepted,
            p.held_records,
            p.evicted,
            p.rejected.invalid_args,
            p.rejected.over_limit,
            p.rejected.rate_limited,
            p.rejected.denied
        ));
    }
    out
}
