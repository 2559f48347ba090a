//! The rule every network listener of metricsd follows: loopback unless told otherwise.
//!
//! A listener (the Prometheus endpoint, for one) checks its address with
//! [`listen_addr_allowed`] before binding. An address that is not loopback (a LAN
//! address, or `0.0.0.0` / `[::]`, which listen on every interface) is refused unless
//! the operator opted in with `[network] allow_non_loopback = true` or
//! `metricsd serve --allow-non-loopback`. `metricsd/README.md` shows TLS and basic auth
//! in front of such a listener with a reverse proxy.
//!
//! ```
//! use metricsd::listen::listen_addr_allowed;
//! assert!(listen_addr_allowed("127.0.0.1:9464".parse()?, false).is_ok());
//! assert!(listen_addr_allowed("[::1]:9464".parse()?, false).is_ok());
//! assert!(listen_addr_allowed("0.0.0.0:9464".parse()?, false).is_err());
//! assert!(listen_addr_allowed("0.0.0.0:9464".parse()?, true).is_ok());
//! # Ok::<(), std::net::AddrParseError>(())
//! ```

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A listen address refused by the loopback rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonLoopback {
    /// The address refused.
    pub addr: SocketAddr,
}

impl fmt::Display for NonLoopback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.addr.ip().is_unspecified() {
            "every interface"
        } else {
            "a non-loopback address"
        };
        write!(
            f,
            "listen address {} is {what}; expected a loopback address (127.0.0.0/8 or ::1), \
             or opt in with `[network] allow_non_loopback = true` or --allow-non-loopback \
             (and put TLS and authentication in front of it, see metricsd/README.md)",
            self.addr
        )
    }
}

impl std::error::Error for NonLoopback {}

/// Whether `ip` is loopback: `127.0.0.0/8`, `::1`, or `::ffff:127.x.y.z`.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Checks a listener's address against the loopback rule: loopback is always allowed,
/// anything else only with `allow_non_loopback`.
pub fn listen_addr_allowed(addr: SocketAddr, allow_non_loopback: bool) -> Result<(), NonLoopback> {
    if allow_non_loopback || is_loopback(addr.ip()) {
        Ok(())
    } else {
        Err(NonLoopback { addr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(addr: &str, allow: bool) -> Result<(), NonLoopback> {
        listen_addr_allowed(addr.parse().expect("a socket address"), allow)
    }

    #[test]
    fn loopback_is_allowed_without_opt_in() {
        for a in [
            "127.0.0.1:9464",
            "127.1.2.3:1",
            "[::1]:9464",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert_eq!(check(a, false), Ok(()), "{a}");
        }
    }

    #[test]
    fn everything_else_needs_the_opt_in() {
        for a in [
            "0.0.0.0:9464",
            "[::]:9464",
            "192.168.1.5:9464",
            "10.0.0.1:80",
            "[2001:db8::1]:9464",
            "[::ffff:10.0.0.1]:80",
        ] {
            let e = check(a, false).expect_err(a);
            let msg = e.to_string();
            assert!(
                msg.contains(a.trim_start_matches('[').split(']').next().unwrap_or(a))
                    && msg.contains("allow_non_loopback")
                    && msg.contains("--allow-non-loopback"),
                "{msg}"
            );
            assert_eq!(check(a, true), Ok(()), "{a} with the opt-in");
        }
        assert!(
            check("0.0.0.0:1", false)
                .expect_err("unspecified")
                .to_string()
                .contains("every interface")
        );
    }
}
