//! Addresses one node gives others to dial it (`host:port`).

use std::net::Ipv6Addr;

use crate::InvalidValue;

/// Longest address accepted: a DNS name (253) plus a port.
const MAX_ADDRESS_LEN: usize = 260;

/// Checks an address other nodes will dial: `host:port` with a DNS name, an
/// IPv4 address or a bracketed IPv6 address, and a non-zero port. Anything
/// else is refused where it enters (Join, the configuration) so that no node
/// ever holds an address it cannot connect to.
pub fn validate_node_address(addr: &str) -> Result<(), InvalidValue> {
    validate(addr, true)
}

/// Checks the address clients are told to reach the AWS API at: as
/// [`validate_node_address`], but the port may be left out (a load
/// balancer on the scheme's default port).
pub fn validate_api_address(addr: &str) -> Result<(), InvalidValue> {
    validate(addr, false)
}

fn validate(addr: &str, port_required: bool) -> Result<(), InvalidValue> {
    let bad = |why: &str| {
        Err(InvalidValue(format!(
            "node address {:?} {why}; expected host:port",
            truncate(addr)
        )))
    };
    if addr.is_empty() || addr.len() > MAX_ADDRESS_LEN {
        return bad("is empty or too long");
    }
    let split = addr
        .rsplit_once(':')
        .filter(|(host, _)| !host.starts_with('[') || host.ends_with(']'));
    let host = match split {
        Some((host, port)) => {
            match port.parse::<u16>() {
                Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
                _ => return bad("has no valid port"),
            }
            host
        }
        None if port_required => return bad("has no port"),
        None => addr,
    };
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => bad("has an invalid IPv6 address"),
        };
    }
    let name_char = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_';
    if host.is_empty()
        || !host.bytes().all(name_char)
        || host.starts_with(['-', '.'])
        || host.contains("..")
    {
        return bad("has no valid host name or IP address");
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::{validate_api_address, validate_node_address};

    #[test]
    fn dialable_addresses_pass_and_others_are_refused() {
        for good in [
            "127.0.0.1:7451",
            "kinesin-0.kinesin.default.svc.cluster.local:7451",
            "[::1]:7451",
            "node_2:1",
        ] {
            assert!(validate_node_address(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "x y",
            "x y:7451",
            "host",
            "host:",
            "host:0",
            "host:65536",
            "host:+1",
            ":7451",
            "[::1:7451",
            "[zz]:7451",
            "a/b:7451",
            "http://a:7451",
            "-a:7451",
            "a..b:7451",
            &"a".repeat(300),
        ] {
            assert!(validate_node_address(bad).is_err(), "{bad:?}");
        }
        for api in ["kinesin.example.com", "[::1]", "10.0.0.1:7450"] {
            assert!(validate_api_address(api).is_ok(), "{api}");
            assert_eq!(
                validate_node_address(api).is_ok(),
                api.ends_with(":7450"),
                "{api}"
            );
        }
        assert!(validate_api_address("a b").is_err());
    }
}
