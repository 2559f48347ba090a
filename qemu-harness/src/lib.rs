//! The QEMU proof run: boots a real kernel with the project's real binaries and checks
//! the ladder of markers the guest prints on its serial console.
//!
//! Who uses it: developers and CI, through the runner (`cargo run --release -p
//! qemu-harness -- --help`). The library holds the parts that are pure and shared by the
//! host runner and the guest binaries:
//!
//! - [`ladder`]: the checker that turns console lines into pass or a named failing step;
//! - [`markers`]: the expected ladders, every ok marker with its FAIL marker;
//! - [`plan`]: what goes into the guest (binaries, daemons, selftests) per ladder;
//! - [`manifest`]: the plan as the guest init reads it;
//! - [`cpio`] and [`initramfs`]: packing the guest's root file system;
//! - [`elf`]: refusing a guest binary that is not static;
//! - [`guest_config`]: the daemons' config files in the guest;
//! - [`selftest`]: the guest selftest producer and the hostile producer it starts.
//!
//! ```
//! use std::time::Instant;
//! use qemu_harness::{ladder::Checker, plan};
//!
//! let plan = plan::by_name("init-only").unwrap();
//! let t0 = Instant::now();
//! let mut checker = Checker::new(plan.ladder, t0);
//! for line in ["init: mounts ok", "fixture-echo: ready"] {
//!     checker.feed(line, t0).unwrap();
//! }
//! assert_eq!(checker.seen().len(), 2);
//! assert!(!checker.is_done());
//! ```

pub mod cpio;
pub mod elf;
pub mod guest_config;
pub mod initramfs;
pub mod ladder;
pub mod manifest;
pub mod markers;
pub mod plan;
pub mod sealed;
pub mod selftest;
