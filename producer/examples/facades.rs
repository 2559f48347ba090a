//! A service instrumented only with the `metrics` and `tracing` facades; `main` installs
//! the nexus backends once ("libraries emit, executables install").
//!
//! ```sh
//! NEXUS_METRICSD_SOCKET=$D/m.sock cargo run --release -p nexus-metrics \
//!     --features metrics,tracing --example facades -- 1000
//! ```
//!
//! Without a metricsd the records are dropped and counted; the example prints
//! `nexus_metrics::stats()` at the end either way.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_histogram, gauge, histogram};
use tracing::{info, instrument, warn};
use tracing_subscriber::layer::SubscriberExt;

/// The "library": nothing here knows about nexus-metrics.
mod shop {
    use super::*;

    #[instrument(skip(items))]
    pub fn checkout(order: u64, items: &[u64]) -> Result<u64, String> {
        gauge!("shop.carts.open").increment(1.0);
        let total = price(items);
        let result = if order % 10 == 0 {
            warn!(order, "card declined");
            tracing::Span::current().record("error", true);
            Err(format!("order {order}: card declined"))
        } else {
            counter!("shop.orders", "outcome" => "paid").increment(1);
            info!(order, total, "paid");
            Ok(total)
        };
        histogram!("shop.order.value").record(total as f64 / 100.0);
        gauge!("shop.carts.open").decrement(1.0);
        result
    }

    #[instrument(fields(items = items.len()))]
    fn price(items: &[u64]) -> u64 {
        items.iter().sum()
    }
}

fn main() {
    // The executable installs the backends once, before anything records.
    nexus_metrics::install(nexus_metrics::Config::new()).expect("first install");
    nexus_metrics::MetricsRecorder::new()
        .install()
        .expect("the first metrics recorder");
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(nexus_metrics::TracingLayer::new()),
    )
    .expect("the first tracing subscriber");

    describe_counter!("shop.orders", metrics::Unit::Count, "Orders by outcome");
    describe_histogram!("shop.order.value", "Order value in currency units");

    let orders: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let workers: Vec<_> = (0..2u64)
        .map(|w| {
            std::thread::spawn(move || {
                let mut paid = 0;
                for order in (w..orders).step_by(2) {
                    if shop::checkout(order, &[1999, 500, order % 700]).is_ok() {
                        paid += 1;
                    }
                }
                // Pending counter and gauge increments, for exact totals at exit.
                nexus_metrics::flush_for(Duration::from_secs(1));
                paid
            })
        })
        .collect();
    let paid: u64 = workers.into_iter().map(|w| w.join().unwrap_or(0)).sum();
    println!("{orders} orders, {paid} paid");
    println!("{:?}", nexus_metrics::stats());
}
