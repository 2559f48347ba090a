//! Boots a real kernel with the real binaries under QEMU and checks the marker ladder.
