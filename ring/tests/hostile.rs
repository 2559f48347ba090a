//! A producer can write anything, at any time, to every byte it maps. These tests
//! scribble random words over the header, both lines and the records while the reader
//! drains, from another thread and from another process: the reader must never panic,
//! hang or read outside the region, and must count every violation it acts on.
#![expect(
    unsafe_code,
    reason = "lays regions over test-owned memory and maps a received fd"
)]

mod support;

use std::os::unix::net::UnixListener;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use telemetry_abi::{Geometry, LINE_SIZE, RECORDS_OFFSET};
use telemetry_ring::{MappedRegion, MemfdRegion, Reader, ReaderStats, Region};

use support::Rng;

const CAPACITY: u64 = 64;
const BUDGET: u64 = 16;

const WRITE_POS_WORD: usize = 128 / 8;
const READ_POS_WORD: usize = 2 * LINE_SIZE / 8;

/// One scribble. While `plausible`, the write position only ever advances within the
/// ring's bounds (so the reader keeps reading, and copies out records scribbled with
/// known and unknown kinds); afterwards anything goes.
fn scribble<'a>(
    rng: &mut Rng,
    word: impl Fn(usize) -> &'a AtomicU64,
    words: usize,
    plausible: bool,
) {
    let records = RECORDS_OFFSET / 8;
    let (index, value) = match rng.next() % 10 {
        0..=2 if plausible => {
            let read = word(READ_POS_WORD).load(Ordering::Relaxed);
            let write = word(WRITE_POS_WORD).load(Ordering::Relaxed);
            let next = write.wrapping_add(rng.next() % 4);
            let bounded = if next.wrapping_sub(read) > CAPACITY {
                write
            } else {
                next
            };
            (WRITE_POS_WORD, bounded)
        }
        0..=2 => {
            let current = word(WRITE_POS_WORD).load(Ordering::Relaxed);
            let value = match rng.next() % 3 {
                0 => current.wrapping_sub(1 + rng.next() % 8),
                1 => current.wrapping_add(CAPACITY + rng.next() % 8),
                _ => rng.next(),
            };
            (WRITE_POS_WORD, value)
        }
        3 => (136 / 8, rng.next()),                    // dropped counter
        4 => (READ_POS_WORD + 1, rng.next()),          // consumer flags
        5 => ((rng.next() % 16) as usize, rng.next()), // header
        _ => {
            let i = records + (rng.next() as usize % (words - records));
            // Half of the record heads get a kind the ABI defines.
            let value = if (i - records) % 4 == 0 && rng.next() % 2 == 0 {
                (rng.next() % 4) | (rng.next() << 32)
            } else {
                rng.next()
            };
            (i, value)
        }
    };
    word(index).store(value, Ordering::Release);
}

/// Checks what a reader reports after a hostile round: every consumed record was either
/// delivered or rejected, and a quarantine was counted exactly once.
fn check_round(reader: &Reader<impl Region>, quarantined: bool, delivered: u64) -> ReaderStats {
    let s = reader.stats();
    assert_eq!(
        s.delivered, delivered,
        "the callback saw exactly what was counted"
    );
    assert_eq!(
        s.consumed,
        s.delivered + s.unknown_kind,
        "every record accounted for"
    );
    let violations = s.write_out_of_range + s.write_moved_back;
    assert_eq!(
        violations,
        u64::from(quarantined),
        "one violation counted per quarantine"
    );
    assert_eq!(reader.quarantined().is_some(), quarantined);
    s
}

#[test]
fn a_scribbling_thread_cannot_break_the_reader() {
    const ROUNDS: u64 = 40;
    let geometry = Geometry::new(CAPACITY).expect("valid");
    let len = geometry.region_len();
    let mut quarantined_rounds = 0;
    let mut delivered_total = 0;
    for round in 0..ROUNDS {
        let words: Arc<Vec<AtomicU64>> =
            Arc::new((0..len / 8).map(|_| AtomicU64::new(0)).collect());
        let base = NonNull::new(words.as_ptr().cast::<u8>().cast_mut()).expect("non-null");
        // SAFETY: `words` (kept alive by the Arc until the end of the round) spans `len`
        // bytes, 8-aligned; every access to it, here and in the scribbler, is atomic.
        let region = unsafe { MappedRegion::init(base, len, geometry, round) }.expect("fits");
        let mut reader = Reader::new(&region);
        let stop = Arc::new(AtomicBool::new(false));
        let scribbler = {
            let (words, stop) = (Arc::clone(&words), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut rng = Rng(0x5EED_0000 + round);
                for i in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    scribble(&mut rng, |w| &words[w], words.len(), i < 10_000);
                }
            })
        };
        let mut delivered = 0u64;
        let mut quarantined = false;
        while !quarantined && !scribbler.is_finished() {
            match reader.drain(BUDGET, |r| {
                assert!(r.kind.name().is_some(), "only known kinds are delivered");
                delivered += 1;
            }) {
                Ok(d) => assert!(d.consumed <= BUDGET, "the budget bounds every drain"),
                Err(_) => quarantined = true,
            }
        }
        stop.store(true, Ordering::Relaxed);
        scribbler.join().expect("scribbler thread");
        // One more drain over whatever the scribbler left behind; a reader quarantined
        // before stays quarantined and reads nothing more.
        let (was_quarantined, consumed_before) = (quarantined, reader.stats().consumed);
        quarantined |= reader
            .drain(BUDGET, |r| {
                assert!(r.kind.name().is_some(), "only known kinds are delivered");
                delivered += 1;
            })
            .is_err();
        if was_quarantined {
            assert_eq!(
                reader.stats().consumed,
                consumed_before,
                "nothing read after quarantine"
            );
        }
        check_round(&reader, quarantined, delivered);
        quarantined_rounds += u64::from(quarantined);
        delivered_total += delivered;
        drop(reader);
        drop(words);
    }
    assert!(
        quarantined_rounds > 0,
        "random write positions must trip the range check"
    );
    eprintln!(
        "{quarantined_rounds}/{ROUNDS} rounds quarantined, {delivered_total} records delivered"
    );
}

#[test]
fn a_scribbling_process_cannot_break_the_reader_or_resize_the_ring() {
    let path = support::socket_path("hostile");
    let listener = UnixListener::bind(&path).expect("bind test socket");
    let region = MemfdRegion::create("hostile", Geometry::new(CAPACITY).expect("valid"), 9)
        .expect("create memfd ring");
    let len_before = region.len();
    let mut child = support::spawn_child("child_scribbles_over_its_ring", &path);
    let stream = support::accept_within(&listener, Duration::from_secs(30));
    support::send_fd(&stream, region.fd());

    let mut reader = Reader::new(&region);
    let mut delivered = 0u64;
    let mut quarantined = false;
    let mut passes = 0u64;
    loop {
        passes += 1;
        if reader
            .drain(BUDGET, |r| {
                assert!(r.kind.name().is_some(), "only known kinds are delivered");
                delivered += 1;
            })
            .is_err()
        {
            quarantined = true;
        }
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        std::thread::yield_now();
    }
    assert!(
        support::wait_within(&mut child, Duration::from_secs(60)),
        "child failed"
    );
    check_round(&reader, quarantined, delivered);
    let size = rustix::fs::fstat(region.fd()).expect("fstat").st_size;
    assert_eq!(
        size as usize, len_before,
        "the producer could not resize the ring"
    );
    eprintln!("{passes} drain passes, quarantined: {quarantined}, delivered: {delivered}");
    let _ = std::fs::remove_file(&path);
}

#[test]
#[ignore = "the child half of a_scribbling_process_cannot_break_the_reader_or_resize_the_ring"]
fn child_scribbles_over_its_ring() {
    let fd = support::receive_fd_from_parent();
    // The seals hold: neither shrinking nor growing the memfd is allowed.
    let len = rustix::fs::fstat(&fd).expect("fstat").st_size as u64;
    assert_eq!(rustix::fs::ftruncate(&fd, 0), Err(rustix::io::Errno::PERM));
    assert_eq!(
        rustix::fs::ftruncate(&fd, len * 2),
        Err(rustix::io::Errno::PERM)
    );
    let region = MemfdRegion::attach(fd).expect("attach");
    let words = region.len() / 8;
    let base = region.mapped().base();
    let mut rng = Rng(0xBAD5EED);
    for i in 0..200_000 {
        scribble(
            &mut rng,
            |w| {
                assert!(w < words);
                // SAFETY: `w < words`, so the word lies inside the mapping, which `region`
                // keeps alive for this whole loop; every access to it is atomic.
                unsafe { AtomicU64::from_ptr(base.as_ptr().add(w * 8).cast::<u64>()) }
            },
            words,
            i < 100_000,
        );
    }
}
