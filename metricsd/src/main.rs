//! `metricsd`: the telemetry daemon. Parses the command line and the config, starts the
//! daemon, prints `metricsd: ready` once the first export round trip to logd and a grant
//! round trip through its own control socket succeeded,
//! and runs until SIGTERM or SIGINT. `demo` and `top` are library code
//! (`metricsd::demo`, `metricsd::top`) wired here.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use logd::IdSpec;
use metricsd::{Config, Daemon};

/// How long each step of the grant round trip before `metricsd: ready` may take.
const GRANT_CHECK_STEP: Duration = Duration::from_secs(2);
/// How long the round trip may keep failing before `serve` gives up.
const GRANT_CHECK_LIMIT: Duration = Duration::from_secs(60);

/// The telemetry daemon: grants shared-memory rings to producers, drains them,
/// aggregates under hard caps and exports to logd.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  \
        metricsd demo                                  # the whole pipeline, checked through logd\n  \
        metricsd serve --logd-socket /run/logd.sock    # the daemon\n  \
        metricsd serve --otlp-endpoint http://127.0.0.1:4318  # and to an OTLP collector\n  \
        metricsd top --logd-socket /run/logd.sock      # what it exported, live\n  \
        metricsd query --dir DIR --select NAME --since 6h --step 1m   # rollup history"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon.
    ///
    /// Producers (services linking nexus-metrics) connect to the control socket and are
    /// granted rings; every `export.interval_ms` the changed series and the completed
    /// spans are appended to logd. `metricsd: ready` is printed once a start marker was
    /// appended to logd and read back, and a ring was granted through the control socket
    /// (metricsd asks for one itself, checks it and gives it back). Every limit is in the config file (see
    /// metricsd/README.md); without one, the defaults apply.
    ///
    /// Example: metricsd serve --config /etc/metricsd.toml --logd-socket /run/logd.sock
    Serve {
        /// A TOML config file (unknown keys and bad values are refused, naming the key).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The control socket [default: $NEXUS_METRICSD_SOCKET, else
        /// $XDG_RUNTIME_DIR/metricsd.sock, else /run/metricsd.sock; overrides the config].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// logd's socket [default: $LOGD_SOCKET, else $XDG_RUNTIME_DIR/logd.sock, else
        /// /run/logd.sock; overrides the config].
        #[arg(long, value_name = "PATH")]
        logd_socket: Option<PathBuf>,
        /// Also export to an OpenTelemetry collector over OTLP/HTTP protobuf, at this
        /// base URL (e.g. http://127.0.0.1:4318; overrides `[otlp] endpoint`).
        #[arg(long, value_name = "URL")]
        otlp_endpoint: Option<String>,
        /// Serve Prometheus' `GET /metrics` on ADDR, e.g. 127.0.0.1:9464 [default: the
        /// config's prometheus.listen, else no endpoint; overrides the config].
        #[arg(long, value_name = "ADDR")]
        prometheus_listen: Option<String>,
        /// When started as root: switch to this user (uid or name) once the control
        /// socket is bound [config: user].
        #[arg(long, value_name = "USER", value_parser = parse_id)]
        user: Option<IdSpec>,
        /// The group to switch to with --user [config: group; default: the user's primary
        /// group].
        #[arg(long, value_name = "GROUP", value_parser = parse_id)]
        group: Option<IdSpec>,
        /// Let network listeners bind an address other than loopback [config:
        /// network.allow_non_loopback]; put TLS and authentication in front of them.
        #[arg(long)]
        allow_non_loopback: bool,
    },

    /// Run the whole pipeline on private sockets and check it end to end through logd.
    ///
    /// Starts logd and metricsd in this process (in a fresh temporary directory, export
    /// every 250 ms), then producer processes built on nexus-metrics: well-behaved
    /// services (request counters with route and status labels, latency histograms,
    /// nested spans, gauges), one service flooding label cardinality, and one hostile
    /// producer scribbling over its rings. Prints one progress line per second, then
    /// queries logd and compares every exported total with what each producer reports it
    /// recorded, exactly. Prints a summary and `demo: ok` only if everything matched;
    /// otherwise `demo: FAIL <first mismatch>` and exits 1.
    ///
    /// Examples:
    ///   metricsd demo
    ///   metricsd demo --seconds 3 --producers 2
    ///   metricsd demo --json > summary.json
    ///   metricsd demo --keep-sockets     # then try `metricsd top --logd-socket ...`
    ///   metricsd demo --otlp-endpoint http://127.0.0.1:4318   # also to a collector
    #[command(verbatim_doc_comment)]
    Demo {
        /// How long the producers run, in seconds (1 to 600).
        #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=600))]
        seconds: u64,
        /// Well-behaved services to run (1 to 6: checkout, search, inventory, payments,
        /// shipping, accounts), besides the flood and the hostile producer.
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=6))]
        producers: u64,
        /// Requests per second per service (and calls per second for the flood); 0
        /// runs flat out, which may fill rings: producers then drop span and histogram
        /// records, and the demo reports that as a failure [default: 20000; 2000 in a
        /// debug build, whose drain loop is far slower].
        #[arg(long, value_name = "N")]
        rate: Option<u64>,
        /// After the summary, keep logd and metricsd serving on their sockets (printed)
        /// until Ctrl-C, to look around with `metricsd top` or `logd query`.
        #[arg(long)]
        keep_sockets: bool,
        /// Print the summary as one JSON object on stdout (progress goes to stderr).
        #[arg(long)]
        json: bool,
        /// Also export to an OpenTelemetry collector over OTLP/HTTP protobuf at this
        /// base URL (e.g. http://127.0.0.1:4318); the demo then also checks that the
        /// collector accepted every exported span.
        #[arg(long, value_name = "URL")]
        otlp_endpoint: Option<String>,
    },

    /// A live view of what metricsd exported: series, rates, drops, rejects.
    ///
    /// metricsd already exports its own health (records drained, drain lag, rings,
    /// rejects by class and reason, violations, drops per ring, overflow, export
    /// failures) and every changed series to logd each interval, so `top` reads them
    /// back from logd: no new protocol, nothing new listening on metricsd. Rates come
    /// from each record's export window; a series not exported in the newest window did
    /// not change. Refreshes every second (clearing the screen on a terminal, appending
    /// otherwise) until Ctrl-C; --once prints one view, for scripts.
    ///
    /// Examples:
    ///   metricsd top --logd-socket /run/logd.sock
    ///   metricsd top --once --service checkout --limit 50
    ///   metricsd top --sender metricsd     # only records logd stamped as metricsd's
    #[command(verbatim_doc_comment)]
    Top {
        /// logd's socket [default: $LOGD_SOCKET, else $XDG_RUNTIME_DIR/logd.sock, else
        /// /run/logd.sock].
        #[arg(long, value_name = "PATH")]
        logd_socket: Option<PathBuf>,
        /// Print one view and exit.
        #[arg(long)]
        once: bool,
        /// Only series of this producer service (metricsd's health is always shown).
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// Only records logd stamped with this sender service (metricsd's name in
        /// logd's policy, e.g. metricsd or uid:998), so no other local process can
        /// feed the view.
        #[arg(long, value_name = "NAME")]
        sender: Option<String>,
        /// Series rows shown, busiest first.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
        /// Milliseconds between refreshes (at least 100).
        #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
        interval_ms: u64,
    },

    /// Range query over the rollup history metricsd keeps on disk (`[retention]`).
    ///
    /// Reads the segment files in the retention directory directly (read-only, no
    /// socket, so it answers while metricsd is stopped or after a crash), at the
    /// coarsest resolution (10s, 1m, 1h) whose step divides --step, and merges each
    /// step's windows: counters as the sum of their deltas, gauges as last/min/max/mean,
    /// histograms bucket by bucket. Windows still open in a running daemon (the newest
    /// 10 s, minute and hour) are not on disk yet: with --logd-socket they are rebuilt
    /// from the daemon's export records in logd (the same inputs, so the same windows).
    ///
    /// Examples:
    ///   metricsd query --dir /var/lib/metricsd --select 'http.requests{route="/a"}' --since 6h --step 1m
    ///   metricsd query --config /etc/metricsd.toml --series 'web/counter/http.requests{route="/a"}' --json
    #[command(verbatim_doc_comment)]
    Query {
        /// The config file whose `retention.dir` to read.
        #[arg(long, value_name = "FILE", conflicts_with = "dir")]
        config: Option<PathBuf>,
        /// The retention directory (instead of --config).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// One series by its id: `<service>/<kind>/<name>{k="v",...}`.
        #[arg(long, value_name = "ID", conflicts_with = "select")]
        series: Option<String>,
        /// Every series of a metric name whose labels include the given ones:
        /// `name` or `name{k="v",...}`.
        #[arg(long, value_name = "SELECTOR")]
        select: Option<String>,
        /// How far back: a number and s, m, h or d.
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        since: String,
        /// The step: a multiple of 10s.
        #[arg(long, value_name = "DURATION", default_value = "1m")]
        step: String,
        /// One JSON object per series on stdout.
        #[arg(long)]
        json: bool,
        /// Also read the windows not on disk yet from metricsd's exports in this logd.
        #[arg(long, value_name = "PATH")]
        logd_socket: Option<PathBuf>,
    },

    /// A demo producer process (started by `metricsd demo`, not by hand).
    #[command(name = "demo-producer", hide = true)]
    DemoProducer {
        /// checkout, search, inventory, payments, shipping, accounts, flood or hostile.
        #[arg(long)]
        role: String,
        /// Seconds to work.
        #[arg(long, default_value_t = 8.0)]
        seconds: f64,
        /// Requests (or calls) per second.
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve {
            config,
            socket,
            logd_socket,
            otlp_endpoint,
            prometheus_listen,
            user,
            group,
            allow_non_loopback,
        } => serve(ServeFlags {
            config,
            socket,
            logd_socket,
            otlp_endpoint,
            prometheus_listen,
            user,
            group,
            allow_non_loopback,
        }),
        Cmd::Demo {
            seconds,
            producers,
            rate,
            keep_sockets,
            json,
            otlp_endpoint,
        } => demo(seconds, producers, rate, keep_sockets, json, otlp_endpoint),
        Cmd::Top {
            logd_socket,
            once,
            service,
            sender,
            limit,
            interval_ms,
        } => {
            use std::io::IsTerminal as _;
            let opts = metricsd::top::Options {
                logd_socket: logd_socket.unwrap_or_else(|| Config::default().logd_socket),
                sender,
                service,
                limit,
                interval: Duration::from_millis(interval_ms),
                once,
                clear: !once && std::io::stdout().is_terminal(),
            };
            metricsd::top::run(&opts, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Cmd::Query {
            config,
            dir,
            series,
            select,
            since,
            step,
            json,
            logd_socket,
        } => query(
            config,
            dir,
            series,
            select,
            (&since, &step),
            json,
            logd_socket,
        ),
        Cmd::DemoProducer {
            role,
            seconds,
            rate,
        } => {
            if !(seconds.is_finite() && seconds > 0.0) {
                anyhow::bail!("--seconds {seconds}: expected a positive number of seconds");
            }
            metricsd::demo::producer_main(&role, Duration::from_secs_f64(seconds), rate)
                .map_err(|e| anyhow::anyhow!("demo producer {role}: {e}"))
        }
    }
}

fn query(
    config: Option<PathBuf>,
    dir: Option<PathBuf>,
    series: Option<String>,
    select: Option<String>,
    (since, step): (&str, &str),
    json: bool,
    logd_socket: Option<PathBuf>,
) -> anyhow::Result<()> {
    use metricsd::retention::{self, Query, Selector};
    let dir = match (dir, config) {
        (Some(d), _) => d,
        (None, Some(path)) => Config::load(&path)?.retention.dir.ok_or_else(|| {
            anyhow::anyhow!("{}: no retention.dir: nothing is kept", path.display())
        })?,
        (None, None) => anyhow::bail!("expected --dir DIR or --config FILE (with retention.dir)"),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "--dir {}: expected an existing retention directory",
            dir.display()
        );
    }
    let selector = match (series, select) {
        (Some(id), None) => Selector::Series(id),
        (None, Some(sel)) => Selector::parse(&sel)?,
        _ => anyhow::bail!("expected --series ID or --select 'name{{k=\"v\"}}'"),
    };
    let q = Query {
        selector,
        since_ns: retention::parse_duration(since).context("--since")?,
        step_ns: retention::parse_duration(step).context("--step")?,
    };
    let res = q.resolution()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let mut points = retention::read_points(&dir, res, |s| q.selector.matches(s));
    if let Some(path) = logd_socket {
        let mut lq = logd::Query::new()
            .scope(metricsd::schema::SCOPE_METRICS)
            .since_ns(now.saturating_sub(q.since_ns.saturating_add(2 * res.step_ns())));
        lq = match &q.selector {
            Selector::Series(id) => lq.field("series", id.as_str()),
            Selector::Labels { name, .. } => lq.field("metric", name.as_str()),
        };
        let mut client = logd::Client::connect(&path)
            .with_context(|| format!("--logd-socket {}", path.display()))?;
        // Bounded: logd holds a bounded journal; this caps what one query takes of it.
        let records = client
            .query_all(&lq, QUERY_MAX_RECORDS)
            .with_context(|| format!("querying logd at {}", path.display()))?;
        let recent =
            retention::windows_from_exports(&records, &points, res, |s| q.selector.matches(s));
        points.extend(recent);
    }
    let answer = q.assemble(points, now);
    let mut out = std::io::stdout().lock();
    retention::render(&answer, q.step_ns, json, &mut out)?;
    Ok(())
}

/// Export records one `metricsd query --logd-socket` reads from logd at most.
const QUERY_MAX_RECORDS: usize = 1_000_000;

fn demo(
    seconds: u64,
    producers: u64,
    rate: Option<u64>,
    keep_sockets: bool,
    json: bool,
    otlp_endpoint: Option<String>,
) -> anyhow::Result<()> {
    let program = std::env::current_exe().context("finding this program to run producers")?;
    let mut opts = metricsd::demo::Options::new(program);
    opts.duration = Duration::from_secs(seconds);
    opts.producers = usize::try_from(producers).context("--producers")?;
    opts.rate = rate.unwrap_or(if cfg!(debug_assertions) {
        2_000
    } else {
        20_000
    });
    opts.keep_sockets = keep_sockets;
    opts.otlp_endpoint = otlp_endpoint;
    let result = if json {
        metricsd::demo::run(&opts, &mut std::io::stderr())
    } else {
        metricsd::demo::run(&opts, &mut std::io::stdout())
    };
    match result {
        Ok(summary) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            }
            if !summary.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Err(e) => {
            // The verdict line, whatever went wrong (the summary was not reached).
            if json {
                eprintln!("demo: FAIL {e}");
            } else {
                println!("demo: FAIL {e}");
            }
            std::process::exit(1);
        }
    }
}

fn parse_id(s: &str) -> Result<IdSpec, String> {
    if s.is_empty() {
        return Err("expected a number or a name (e.g. 997 or metricsd)".into());
    }
    Ok(match s.parse::<u32>() {
        Ok(n) => IdSpec::Id(n),
        Err(_) => IdSpec::Name(s.to_owned()),
    })
}

/// `serve`'s flags that override the config.
struct ServeFlags {
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    logd_socket: Option<PathBuf>,
    otlp_endpoint: Option<String>,
    prometheus_listen: Option<String>,
    user: Option<IdSpec>,
    group: Option<IdSpec>,
    allow_non_loopback: bool,
}

fn serve(flags: ServeFlags) -> anyhow::Result<()> {
    let ServeFlags {
        config,
        socket,
        logd_socket,
        otlp_endpoint,
        prometheus_listen,
        user,
        group,
        allow_non_loopback,
    } = flags;
    let mut cfg = match &config {
        Some(path) => Config::read(path)?,
        None => Config::default(),
    };
    if user.is_some() {
        cfg.user = user;
    }
    if group.is_some() {
        cfg.group = group;
    }
    if allow_non_loopback {
        cfg.network.allow_non_loopback = true;
    }
    if let Some(s) = socket {
        cfg.socket = s;
    }
    if let Some(s) = logd_socket {
        cfg.logd_socket = s;
    }
    if let Some(url) = otlp_endpoint {
        cfg.otlp.endpoint = Some(url);
    }
    if let Some(a) = prometheus_listen {
        cfg.prometheus.listen = Some(a);
    }
    // Checked once the flags are applied: --allow-non-loopback can permit the file's
    // listen address.
    cfg.validate()?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing SIGTERM/SIGINT handlers")?;
    let open_files = metricsd::daemon::raise_open_file_limit(&cfg);
    let needed = metricsd::daemon::fds_needed(&cfg);
    if open_files < needed {
        eprintln!(
            "metricsd: warning: at most {open_files} open files (RLIMIT_NOFILE hard limit); \
             rings.max_total + rings.max_connections can need {needed}: grants past the \
             limit will be refused as unavailable"
        );
    }
    // A file size limit (RLIMIT_FSIZE) reached while writing rollup segments must be an
    // EFBIG write error, counted and logged, not the default SIGXFSZ kill.
    signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .context("installing the SIGXFSZ handler")?;
    let logd = cfg.logd_socket.clone();
    let run_as = cfg.run_as()?;
    let daemon = Daemon::start(cfg)?;
    if let Some(to) = run_as {
        if rustix::process::getuid().as_raw() == to.uid {
            eprintln!("metricsd: running as uid {} gid {}", to.uid, to.gid);
        }
    }
    eprintln!(
        "metricsd: serving {} (waiting for logd at {})",
        daemon.socket_path().display(),
        logd.display()
    );
    if let Some(addr) = daemon.prometheus_addr() {
        eprintln!("metricsd: Prometheus scrape endpoint http://{addr}/metrics");
    }
    let handle = signals.handle();
    let waiter = std::thread::spawn(move || signals.forever().next());
    let mut last_error = None;
    let mut first_try = None;
    loop {
        if daemon.is_ready() {
            // The start marker is in logd; now one grant round trip through the control
            // socket, as a producer would make it, before saying ready.
            let first = *first_try.get_or_insert_with(std::time::Instant::now);
            match metricsd::probe::grant_round_trip(daemon.socket_path(), GRANT_CHECK_STEP) {
                Ok(granted) => {
                    eprintln!(
                        "metricsd: grant round trip ok (ring {}, {} records, sealed memfd)",
                        granted.ring_id, granted.capacity
                    );
                    println!("metricsd: ready");
                    break;
                }
                Err(e) if first.elapsed() < GRANT_CHECK_LIMIT => last_error = Some(e),
                Err(e) => {
                    daemon.shutdown();
                    anyhow::bail!("metricsd: FAIL: no grant round trip on its own socket: {e}");
                }
            }
        }
        if waiter.is_finished() {
            daemon.shutdown();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(e) = last_error {
        eprintln!("metricsd: the grant round trip needed retries (last: {e})");
    }
    let _ = waiter.join();
    handle.close();
    daemon.shutdown();
    eprintln!("metricsd: stopped");
    Ok(())
}
