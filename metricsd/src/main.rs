//! `metricsd`: the daemon binary (wired up in a later commit).
fn main() {}
