//! `metricsd top`: a live view of what metricsd exported, read back from logd.
//!
//! metricsd runs in another process, and everything it knows it already exports to logd
//! every interval: its own health series (`producer_service = metricsd`: records
//! drained, drain lag, rings, rejects by class and reason, violations, drops per ring,
//! overflow, export failures, grant refusals, spans) and every changed series. So `top`
//! needs no new protocol and opens no new socket on metricsd (no new attack surface): it
//! queries logd (`scope = metrics`), keeps the last record of each series, and derives
//! rates from each record's window (`delta` over `window_end_ns - window_start_ns` for
//! counters, the change in `count` between records for histograms). A series not
//! exported in the newest window did not change: its rate is 0.
//!
//! [`View`] is the state and the renderer; [`run`] is the refresh loop.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use logd::{Client, Query, StoredRecord};

use crate::schema::{HEALTH_SERVICE, SCOPE_METRICS};

/// Most records read in one refresh (the rest is read by the next one).
const MAX_PER_REFRESH: usize = 500_000;

/// Why `top` stopped.
#[derive(Debug)]
pub enum TopError {
    /// logd could not be reached.
    Connect(PathBuf, logd::ClientError),
    /// A query failed.
    Query(logd::ClientError),
    /// Writing to stdout failed.
    Output(std::io::Error),
}

impl fmt::Display for TopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(p, e) => write!(
                f,
                "cannot reach logd at {}: {e} (is logd running there? pass its socket with \
                 --logd-socket PATH)",
                p.display()
            ),
            Self::Query(e) => write!(f, "querying logd: {e}"),
            Self::Output(e) => write!(f, "writing the view: {e}"),
        }
    }
}

impl std::error::Error for TopError {}

/// How `top` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// logd's socket.
    pub logd_socket: PathBuf,
    /// Only records logd stamped with this sender service (metricsd's name in logd's
    /// policy); `None`: any sender.
    pub sender: Option<String>,
    /// Only series of this producer service (health is always shown).
    pub service: Option<String>,
    /// Series rows shown.
    pub limit: usize,
    /// Time between refreshes.
    pub interval: Duration,
    /// Print one view and exit.
    pub once: bool,
    /// Clear the screen before each view (stdout is a terminal).
    pub clear: bool,
}

/// The last record of one series, and the rate derived from it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    /// The producer service.
    pub service: String,
    /// `counter`, `gauge`, `histogram`, `span_duration`.
    pub kind: String,
    /// The metric name.
    pub metric: String,
    /// `{k="v",...}` as in the series id.
    pub labels: String,
    /// The labels as exported (`label.<key>` fields), sorted by key.
    pub label_pairs: Vec<(String, String)>,
    /// The exported value (counter total, gauge value, histogram count).
    pub value: i128,
    /// Per second over the newest window (counters, histograms).
    pub rate: f64,
    /// The histogram's p50, p90 and p99 (bucket upper bounds, see
    /// [`crate::histogram::Histogram::quantile`]).
    pub quantiles: Option<[f64; 3]>,
    window_end_ns: u64,
    id: u64,
}

/// What `top` knows: the last record of every series read so far.
#[derive(Debug, Default)]
pub struct View {
    rows: HashMap<String, Row>,
    cursor: u64,
    newest_window_end: u64,
    newest_window_ns: u64,
    records: u64,
}

fn num<T: std::str::FromStr + Default>(r: &StoredRecord, field: &str) -> T {
    r.record
        .get(field)
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

impl View {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the records logd has received since the last refresh.
    pub fn refresh(&mut self, client: &mut Client, sender: Option<&str>) -> Result<(), TopError> {
        let mut q = Query::new().scope(SCOPE_METRICS).cursor(self.cursor);
        if let Some(s) = sender {
            q = q.service(s);
        }
        let records = client
            .query_all(&q, MAX_PER_REFRESH)
            .map_err(TopError::Query)?;
        for r in &records {
            self.cursor = self.cursor.max(r.id);
            self.absorb(r);
        }
        Ok(())
    }

    /// Takes one exported record into the view.
    pub fn absorb(&mut self, r: &StoredRecord) {
        let Some(series) = r.record.get("series") else {
            return;
        };
        self.records += 1;
        let start: u64 = num(r, "window_start_ns");
        let end: u64 = num(r, "window_end_ns");
        if end > self.newest_window_end {
            self.newest_window_end = end;
            self.newest_window_ns = end.saturating_sub(start);
        }
        let kind = r.record.get("kind").unwrap_or("").to_owned();
        let secs = end.saturating_sub(start) as f64 / 1e9;
        let previous = self.rows.get(series);
        if previous.is_some_and(|p| p.id > r.id) {
            return;
        }
        let (value, rate) = match kind.as_str() {
            "counter" => {
                let delta: f64 = num::<u128>(r, "delta") as f64;
                (num::<i128>(r, "value"), per_sec(delta, secs))
            }
            "histogram" | "span_duration" => {
                let count: i128 = num(r, "count");
                let rate = match previous {
                    Some(p) if p.window_end_ns < end => {
                        let dt = end.saturating_sub(p.window_end_ns) as f64 / 1e9;
                        (count - p.value).max(0) as f64 / dt
                    }
                    // The first record: its window holds everything counted in it.
                    _ => per_sec(count as f64, secs),
                };
                (count, rate)
            }
            _ => (num::<i128>(r, "value"), 0.0),
        };
        let labels = series
            .find('{')
            .map_or_else(String::new, |i| series[i..].to_owned());
        let labels = if labels == "{}" {
            String::new()
        } else {
            labels
        };
        let mut label_pairs: Vec<(String, String)> = r
            .record
            .fields
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("label.")?.to_owned(), v.clone())))
            .collect();
        label_pairs.sort();
        let row = Row {
            service: r.record.get("producer_service").unwrap_or("").to_owned(),
            kind,
            metric: r.record.get("metric").unwrap_or("").to_owned(),
            labels,
            label_pairs,
            value,
            rate,
            quantiles: crate::schema::histogram_of(&r.record)
                .and_then(|h| Some([h.quantile(0.5)?, h.quantile(0.9)?, h.quantile(0.99)?])),
            window_end_ns: end,
            id: r.id,
        };
        self.rows.insert(series.to_owned(), row);
    }

    /// The rate of a row as of the newest window: 0 if it was not exported in it.
    fn current_rate(&self, row: &Row) -> f64 {
        if row.window_end_ns == self.newest_window_end {
            row.rate
        } else {
            0.0
        }
    }

    fn health(&self, metric: &str) -> impl Iterator<Item = &Row> {
        self.rows
            .values()
            .filter(move |r| r.service == HEALTH_SERVICE && r.metric == metric)
    }

    fn health_one(&self, metric: &str) -> Option<&Row> {
        self.health(metric).find(|r| r.labels.is_empty())
    }

    fn health_value(&self, metric: &str) -> i128 {
        self.health_one(metric).map_or(0, |r| r.value)
    }

    /// The rows of a labelled health counter as `<label values> <value> (<rate>/s)`.
    fn health_by_label(&self, metric: &str) -> String {
        let mut parts: Vec<(String, String)> = self
            .health(metric)
            .map(|r| {
                let values: Vec<&str> = r.label_pairs.iter().map(|(_, v)| v.as_str()).collect();
                (values.join("/"), self.counted(r))
            })
            .collect();
        parts.sort();
        if parts.is_empty() {
            return "none".into();
        }
        parts
            .into_iter()
            .map(|(l, t)| format!("{l} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A counter's value, with its rate when it moved in the newest window.
    fn counted(&self, r: &Row) -> String {
        let rate = self.current_rate(r);
        if rate > 0.0 {
            format!("{} ({}/s)", r.value, human(rate))
        } else {
            r.value.to_string()
        }
    }

    /// Rejects by class, each with its reasons.
    fn rejects(&self) -> String {
        let mut classes: BTreeMap<&str, (i128, f64, Vec<String>)> =
            ["invalid_args", "over_limit", "rate_limited"]
                .into_iter()
                .map(|c| (c, (0, 0.0, Vec::new())))
                .collect();
        for r in self.health("metricsd.rejects") {
            let get = |key: &str| {
                r.label_pairs
                    .iter()
                    .find(|(k, _)| k == key)
                    .map_or("", |(_, v)| v.as_str())
            };
            let class = classes.entry(get("class")).or_default();
            class.0 += r.value;
            class.1 += self.current_rate(r);
            class.2.push(format!("{} {}", get("reason"), r.value));
        }
        classes
            .into_iter()
            .map(|(class, (n, rate, mut reasons))| {
                reasons.sort();
                let rate = if rate > 0.0 {
                    format!(" ({}/s)", human(rate))
                } else {
                    String::new()
                };
                if reasons.is_empty() {
                    format!("{class} {n}")
                } else {
                    format!("{class} {n}{rate}: {}", reasons.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Series known (metricsd's own health series included).
    pub fn series(&self) -> usize {
        self.rows.len()
    }

    /// The view as text: metricsd's health, the services, then the `limit` busiest
    /// series (of `service`, if given).
    pub fn render(&self, logd: &Path, service: Option<&str>, limit: usize) -> String {
        let mut s = String::new();
        let _ = self.render_into(&mut s, logd, service, limit);
        s
    }

    fn render_into(
        &self,
        s: &mut String,
        logd: &Path,
        service: Option<&str>,
        limit: usize,
    ) -> fmt::Result {
        writeln!(
            s,
            "metricsd top (from logd {}: {} records, {} series, window {} ms)",
            logd.display(),
            self.records,
            self.rows.len(),
            self.newest_window_ns / 1_000_000
        )?;
        if self.rows.is_empty() {
            return writeln!(
                s,
                "nothing exported yet: is metricsd running and exporting to this logd? \
                 (logd shows a user only its own uid's records: run top as metricsd's user, \
                 as root, or as a user logd's [access] readers or reader_groups list)"
            );
        }
        let drained = self.health_one("metricsd.records.drained");
        writeln!(
            s,
            "drained     {}/s (total {}), lag {} records, rings open {}, quarantined {}",
            human(drained.map_or(0.0, |r| self.current_rate(r))),
            drained.map_or(0, |r| r.value),
            self.health_value("metricsd.drain.lag"),
            self.health_value("metricsd.rings.open"),
            self.health_value("metricsd.rings.quarantined"),
        )?;
        writeln!(
            s,
            "series      {} live (+ overflow: {} registrations, {} samples), labels redacted {}",
            self.health_value("metricsd.series"),
            self.health_value("metricsd.overflow.registrations"),
            self.health_value("metricsd.overflow.samples"),
            self.health_value("metricsd.labels.redacted"),
        )?;
        writeln!(
            s,
            "expiry      {} series expired ({} overflow), {} came back, {} services released",
            self.health_value("metricsd.series.expired"),
            self.health_value("metricsd.series.expired_overflow"),
            self.health_value("metricsd.series.recreated"),
            self.health_value("metricsd.services.released"),
        )?;
        writeln!(s, "rejects     {}", self.rejects())?;
        writeln!(
            s,
            "violations  {}",
            self.health_by_label("metricsd.violations")
        )?;
        writeln!(
            s,
            "drops       {} (producer/ring: records the producer says it dropped)",
            self.health_by_label("metricsd.ring.dropped")
        )?;
        writeln!(
            s,
            "export      failures {}, dropped {}, refused {}; grant: granted {}, refused {}",
            self.health_value("metricsd.export.failures"),
            self.health_value("metricsd.export.dropped"),
            self.health_value("metricsd.export.refused"),
            self.health_value("metricsd.grant.granted"),
            self.health_by_label("metricsd.grant.refused"),
        )?;
        writeln!(
            s,
            "spans       live {}, ended {}, exported {}, orphaned {}, expired {}, dropped {}",
            self.health_value("metricsd.spans.live"),
            self.health_value("metricsd.spans.ended"),
            self.health_value("metricsd.spans.exported"),
            self.health_value("metricsd.spans.orphaned"),
            self.health_value("metricsd.spans.expired"),
            self.health_by_label("metricsd.spans.dropped"),
        )?;

        let mut services: BTreeMap<&str, usize> = BTreeMap::new();
        for r in self.rows.values().filter(|r| r.service != HEALTH_SERVICE) {
            *services.entry(r.service.as_str()).or_insert(0) += 1;
        }
        let list: Vec<String> = services
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        writeln!(s, "services    {} (series each)", list.join(", "))?;

        let mut rows: Vec<&Row> = self
            .rows
            .values()
            .filter(|r| r.service != HEALTH_SERVICE)
            .filter(|r| service.is_none_or(|want| r.service == want))
            .collect();
        rows.sort_by(|a, b| {
            self.current_rate(b)
                .total_cmp(&self.current_rate(a))
                .then_with(|| {
                    (&a.service, &a.metric, &a.labels).cmp(&(&b.service, &b.metric, &b.labels))
                })
        });
        writeln!(
            s,
            "\n{:<12} {:<13} {:>20} {:>10}  SERIES",
            "SERVICE", "KIND", "VALUE", "RATE/s"
        )?;
        for r in rows.iter().take(limit) {
            let value = match r.kind.as_str() {
                "histogram" | "span_duration" => match r.quantiles {
                    Some([p50, p90, p99]) => format!(
                        "{} p50 {} p90 {} p99 {}",
                        r.value,
                        human(p50),
                        human(p90),
                        human(p99)
                    ),
                    None => r.value.to_string(),
                },
                _ => r.value.to_string(),
            };
            writeln!(
                s,
                "{:<12} {:<13} {:>20} {:>10}  {}{}",
                r.service,
                r.kind,
                value,
                human(self.current_rate(r)),
                r.metric,
                r.labels
            )?;
        }
        if rows.len() > limit {
            writeln!(s, "... {} more series (--limit N)", rows.len() - limit)?;
        }
        Ok(())
    }
}

fn per_sec(amount: f64, secs: f64) -> f64 {
    if secs > 0.0 { amount / secs } else { 0.0 }
}

/// `1234567.0` as `1.23M`.
pub fn human(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else if x > 0.0 && x < 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// Refreshes and prints the view every `opts.interval` (once with `opts.once`).
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<(), TopError> {
    let mut client = Client::connect(&opts.logd_socket)
        .map_err(|e| TopError::Connect(opts.logd_socket.clone(), e))?;
    let mut view = View::new();
    loop {
        view.refresh(&mut client, opts.sender.as_deref())?;
        let text = view.render(&opts.logd_socket, opts.service.as_deref(), opts.limit);
        if opts.clear {
            write!(out, "\x1b[H\x1b[2J").map_err(TopError::Output)?;
        } else if view.records() > 0 && !opts.once {
            writeln!(out, "---").map_err(TopError::Output)?;
        }
        out.write_all(text.as_bytes()).map_err(TopError::Output)?;
        out.flush().map_err(TopError::Output)?;
        if opts.once {
            return Ok(());
        }
        std::thread::sleep(opts.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logd::{Identity, Level, Record};

    fn rec(
        id: u64,
        series: &str,
        kind: &str,
        fields: &[(&str, &str)],
        window: (u64, u64),
    ) -> StoredRecord {
        let (service, rest) = series.split_once('/').unwrap_or(("", series));
        let metric = rest
            .split_once('/')
            .map_or(rest, |(_, m)| m.split('{').next().unwrap_or(m));
        let mut r = Record::new(Level::Info, "metrics", metric)
            .field("series", series)
            .field("producer_service", service)
            .field("metric", metric)
            .field("kind", kind)
            .field("window_start_ns", window.0.to_string())
            .field("window_end_ns", window.1.to_string());
        for (k, v) in fields {
            r = r.field(*k, *v);
        }
        StoredRecord {
            id,
            received_ns: 0,
            sender: Identity {
                service: "metricsd".into(),
                pid: 1,
                uid: 0,
                gid: 0,
            },
            record: r,
        }
    }

    #[test]
    fn rates_come_from_the_newest_window() {
        let s = 1_000_000_000;
        let mut v = View::new();
        let a = r#"web/counter/http.requests{route="/a"}"#;
        let b = r#"web/counter/http.requests{route="/b"}"#;
        let h = "web/histogram/latency{}";
        v.absorb(&rec(
            1,
            a,
            "counter",
            &[("value", "10"), ("delta", "10")],
            (0, s),
        ));
        v.absorb(&rec(
            2,
            b,
            "counter",
            &[("value", "5"), ("delta", "5")],
            (0, s),
        ));
        v.absorb(&rec(
            3,
            h,
            "histogram",
            &[("count", "4"), ("sum", "40")],
            (0, s),
        ));
        v.absorb(&rec(
            4,
            a,
            "counter",
            &[("value", "30"), ("delta", "20")],
            (s, 2 * s),
        ));
        v.absorb(&rec(
            5,
            h,
            "histogram",
            &[
                ("count", "10"),
                ("sum", "100"),
                ("min", "1"),
                ("max", "30"),
                ("bounds", "5,10,+Inf"),
                ("buckets", "1,8,1"),
            ],
            (s, 2 * s),
        ));
        let row = |id: &str| v.rows.get(id).expect("row");
        assert_eq!(v.current_rate(row(a)), 20.0);
        assert_eq!(row(a).value, 30);
        assert_eq!(
            v.current_rate(row(b)),
            0.0,
            "not exported in the newest window"
        );
        assert_eq!(v.current_rate(row(h)), 6.0);
        let text = v.render(Path::new("/x"), None, 10);
        let a_line = text.lines().position(|l| l.contains(r#"{route="/a"}"#));
        let b_line = text.lines().position(|l| l.contains(r#"{route="/b"}"#));
        assert!(a_line < b_line, "busiest first:\n{text}");
        assert!(text.contains("web 3"), "{text}");
        // Ranks 5, 9 and 10 of 10: le 10, le 10, +Inf (clamped to the max, 30).
        assert_eq!(row(h).quantiles, Some([10.0, 10.0, 30.0]));
        assert!(text.contains("10 p50 10 p90 10 p99 30"), "{text}");
    }
}
