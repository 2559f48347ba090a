//! Hot-path instrumentation for services and drivers: counters, gauges, histograms and spans written into a shared-memory ring.
