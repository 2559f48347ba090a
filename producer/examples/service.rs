//! A small service's instrumentation: two worker threads handling requests.
//!
//! ```sh
//! metricsd serve &    # or any grant server; the socket is found as the README says
//! NEXUS_METRICSD_SOCKET=/run/user/1000/metricsd.sock \
//!     cargo run -p nexus-metrics --example service -- 100000
//! ```
//!
//! Without metricsd it still runs: every record is dropped and counted, as the final
//! statistics show.

use std::time::{Duration, Instant};

use nexus_metrics::{DropReason, Status, counter, gauge, histogram, span};

const ROUTES: [&str; 3] = ["/users", "/orders", "/health"];

fn handle(i: u64) {
    let request = span!("handle_request");
    let started = Instant::now();
    let route = ROUTES[(i % 3) as usize];
    {
        let query = span!("db.query", parent: &request);
        query.attr("rows", i % 17);
        query.attr("route", route);
    }
    let ok = i % 50 != 0;
    request.set_status(if ok { Status::Ok } else { Status::Error });
    // Literal labels: the handle is cached at the call site.
    match (route, ok) {
        ("/users", true) => counter!("http.requests", "route" => "/users", "status" => "200"),
        ("/orders", true) => counter!("http.requests", "route" => "/orders", "status" => "200"),
        ("/health", true) => counter!("http.requests", "route" => "/health", "status" => "200"),
        _ => counter!("http.requests", "route" => "other", "status" => "500"),
    }
    .increment(1);
    histogram!("http.latency_ns").record(started.elapsed().as_nanos() as u64);
}

fn main() {
    let requests: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let workers: Vec<_> = (0..2)
        .map(|w| {
            std::thread::spawn(move || {
                for i in 0..requests {
                    handle(i);
                    if i % 1000 == 0 {
                        gauge!("worker.progress", "worker" => "any").set(i as i64);
                    }
                }
                // Write what counters still owe before the thread ends (waiting for
                // metricsd to make room, if it is behind).
                nexus_metrics::flush_for(Duration::from_secs(2));
                w
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let stats = nexus_metrics::stats();
    println!(
        "rings claimed {}, coalesced increments {}, lost increments {}, keys {}",
        stats.rings_claimed, stats.coalesced, stats.lost_increments, stats.keys
    );
    for reason in DropReason::ALL {
        println!("dropped {:12} {}", reason.name(), stats.dropped(reason));
    }
}
