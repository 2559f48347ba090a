//! The guest's loopback interface: a fresh kernel starts with `lo` down, and the
//! selftest scrapes metricsd over `127.0.0.1`. The init brings it up with one netlink
//! `RTM_NEWLINK` request (what `ip link set lo up` sends) and checks the kernel's
//! answer and the interface flags in sysfs.

use std::os::fd::AsFd;

use anyhow::{Context, Result, bail};
use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

const RTM_NEWLINK: u16 = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const IFF_UP: u32 = 1;

/// The `RTM_NEWLINK` request setting `IFF_UP` on interface `index`: a `nlmsghdr`
/// (length, type, flags, sequence, port) then an `ifinfomsg` (family, pad, type,
/// index, flags, change mask), native byte order.
pub fn up_request(index: i32, seq: u32) -> [u8; 32] {
    let mut m = [0u8; 32];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(slot) = m.get_mut(at..at + bytes.len()) {
            slot.copy_from_slice(bytes);
        }
    };
    put(0, &32u32.to_ne_bytes());
    put(4, &RTM_NEWLINK.to_ne_bytes());
    put(6, &(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    put(8, &seq.to_ne_bytes());
    // 12..16: port 0 (the kernel); 16: AF_UNSPEC; 17: pad; 18..20: type 0.
    put(20, &index.to_ne_bytes());
    put(24, &IFF_UP.to_ne_bytes());
    put(28, &IFF_UP.to_ne_bytes());
    m
}

/// The error code of a netlink `NLMSG_ERROR` answer (0 is an acknowledgement).
pub fn ack_error(answer: &[u8]) -> Option<i32> {
    let field = |at: usize| answer.get(at..at + 4)?.try_into().ok();
    let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    Some(i32::from_ne_bytes(field(16)?))
}

/// Brings `lo` up and checks that it is.
pub fn loopback_up() -> Result<()> {
    let index: i32 = std::fs::read_to_string("/sys/class/net/lo/ifindex")
        .context("reading /sys/class/net/lo/ifindex")?
        .trim()
        .parse()
        .context("parsing lo's ifindex")?;
    // Protocol 0 of AF_NETLINK is NETLINK_ROUTE.
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None)
        .context("opening a NETLINK_ROUTE socket")?;
    let kernel = SocketAddrNetlink::new(0, 0);
    rustix::net::sendto(
        fd.as_fd(),
        &up_request(index, 1),
        SendFlags::empty(),
        &kernel,
    )
    .context("sending RTM_NEWLINK")?;
    let mut answer = [0u8; 256];
    let (n, _) = rustix::net::recv(fd.as_fd(), &mut answer, RecvFlags::empty())
        .context("reading the netlink answer")?;
    match ack_error(answer.get(..n).unwrap_or_default()) {
        Some(0) => {}
        Some(e) => bail!("the kernel refused to bring lo up: errno {}", -e),
        None => bail!("the kernel's netlink answer is not an acknowledgement"),
    }
    let flags = std::fs::read_to_string("/sys/class/net/lo/flags")
        .context("reading /sys/class/net/lo/flags")?;
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16)
        .with_context(|| format!("parsing lo's flags {flags:?}"))?;
    if flags & IFF_UP == 0 {
        bail!("lo is still down after RTM_NEWLINK (flags {flags:#x})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_32_byte_newlink_with_the_up_flag() {
        let m = up_request(1, 7);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().expect("4")), 32);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().expect("2")), 16);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().expect("2")), 5);
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().expect("4")), 1);
        assert_eq!(u32::from_ne_bytes(m[24..28].try_into().expect("4")), 1);
        assert_eq!(u32::from_ne_bytes(m[28..32].try_into().expect("4")), 1);
        let mut ack = [0u8; 36];
        ack[4..6].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(ack_error(&ack), Some(0));
        ack[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(ack_error(&ack), Some(-1));
        assert_eq!(ack_error(&m), None);
    }
}
