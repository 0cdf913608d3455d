//! The client behind trusted proxies, from `X-Forwarded-For` or `Forwarded` (RFC 7239).

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The address of the client that `peer` (the TCP peer) forwards for.
///
/// A peer outside `trusted` is the client itself, whatever it sends. A trusted peer's
/// hops are read from `X-Forwarded-For`, or from the `for=` of `Forwarded` when there is
/// no `X-Forwarded-For`; the client is the right-most hop that is not itself a trusted
/// proxy (each trusted proxy appends the address it saw connect, so everything left of
/// that is the client's own say), the left-most hop when all are trusted, and the peer
/// when the header names no address. Hops that are not addresses (`unknown`,
/// obfuscated `_identifiers`, garbage) are skipped.
pub(crate) fn client_behind(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Each comma-separated hop of every value of `name`; a hop that is not text (bytes
    // the client put there) is skipped on its own, so it can't hide the hops after it.
    let hops_of = |name: &str| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|value| value.as_bytes().split(|b| *b == b','))
            .filter_map(|hop| std::str::from_utf8(hop).ok())
            .collect::<Vec<_>>()
    };
    let x_forwarded_for = hops_of("x-forwarded-for");
    let hops: Vec<IpAddr> = if x_forwarded_for.is_empty() {
        hops_of("forwarded")
            .into_iter()
            .filter_map(forwarded_for)
            .collect()
    } else {
        x_forwarded_for
            .into_iter()
            .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
            .collect()
    };
    let hops: Vec<IpAddr> = hops.into_iter().map(|ip| ip.to_canonical()).collect();
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

/// The address in the `for=` parameter of one `Forwarded` element
/// (`for=192.0.2.60;proto=http`, `for="[2001:db8::17]:4711"`), if it names one.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })?;
    let node = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    // `[v6]` without a port.
    node.strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .and_then(|v| v.parse::<IpAddr>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn balancer() -> Vec<IpNet> {
        vec!["10.0.0.0/8".parse().unwrap()]
    }

    #[test]
    fn forwarded_elements_name_their_client() {
        assert_eq!(
            forwarded_for("for=192.0.2.60;proto=http;by=203.0.113.43"),
            Some(ip("192.0.2.60"))
        );
        assert_eq!(
            forwarded_for(r#" For="[2001:db8:cafe::17]:4711""#),
            Some(ip("2001:db8:cafe::17"))
        );
        assert_eq!(
            forwarded_for(r#"for="[2001:db8::1]""#),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(
            forwarded_for("for=192.0.2.43:47011"),
            Some(ip("192.0.2.43"))
        );
        assert_eq!(forwarded_for("for=unknown"), None);
        assert_eq!(forwarded_for("for=_hidden"), None);
        assert_eq!(forwarded_for("proto=https"), None);
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop() {
        let trusted = balancer();
        let peer = ip("10.1.1.1");
        let sent = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.2.2.2")]);
        assert_eq!(client_behind(peer, &sent, &trusted), ip("203.0.113.9"));
        let sent = headers(&[("forwarded", "for=6.6.6.6, for=203.0.113.9;proto=https")]);
        assert_eq!(client_behind(peer, &sent, &trusted), ip("203.0.113.9"));
        // X-Forwarded-For wins over Forwarded when both come.
        let both = headers(&[
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(client_behind(peer, &both, &trusted), ip("203.0.113.9"));
        // From an untrusted peer, nothing it says counts.
        assert_eq!(
            client_behind(ip("198.51.100.1"), &both, &trusted),
            ip("198.51.100.1")
        );
        // A trusted peer that names no address is the client.
        assert_eq!(client_behind(peer, &HeaderMap::new(), &trusted), peer);
    }

    fn address() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ]
        .prop_filter("not the balancer's network", |ip| {
            !balancer()
                .iter()
                .any(|net| net.contains(&ip.to_canonical()))
        })
    }

    proptest! {
        #[test]
        fn any_header_is_read_without_a_panic(xff in ".{0,80}", forwarded in ".{0,80}") {
            let mut sent = HeaderMap::new();
            for (name, value) in [("x-forwarded-for", &xff), ("forwarded", &forwarded)] {
                if let Ok(value) = HeaderValue::from_str(value) {
                    sent.append(name, value);
                }
            }
            let peer = ip("10.0.0.1");
            let client = client_behind(peer, &sent, &balancer());
            prop_assert_eq!(client, client_behind(peer, &sent, &balancer()));
            // From a peer that is not trusted, none of it counts.
            prop_assert_eq!(client_behind(ip("192.0.2.1"), &sent, &balancer()), ip("192.0.2.1"));
        }

        #[test]
        fn what_the_client_prepends_never_changes_who_it_is(
            client in address(),
            spoofed in proptest::collection::vec(".{0,20}", 0..4),
            forwarded_style in any::<bool>(),
        ) {
            let spoofed: Vec<String> = spoofed
                .into_iter()
                .filter(|s| !s.contains(',') && HeaderValue::from_str(s).is_ok())
                .collect();
            // The balancer appends the address it saw to what the client sent.
            let value = if forwarded_style {
                let hop = match client {
                    IpAddr::V4(v4) => format!("for={v4}"),
                    IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
                };
                spoofed.iter().map(|s| format!("for={s}")).chain([hop]).collect::<Vec<_>>().join(", ")
            } else {
                spoofed.iter().cloned().chain([client.to_string()]).collect::<Vec<_>>().join(", ")
            };
            let name = if forwarded_style { "forwarded" } else { "x-forwarded-for" };
            let sent = headers(&[(name, &value)]);
            prop_assert_eq!(client_behind(ip("10.9.9.9"), &sent, &balancer()), client.to_canonical());
        }
    }
}
