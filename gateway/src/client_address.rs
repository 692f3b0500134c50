//! The address of the client behind trusted proxies: an ingress, Application Gateway for
//! Containers or APIM in front of the gateway appends the address it received a request
//! from to `X-Forwarded-For` (or, configured so, to RFC 7239's `Forwarded` as `for=`), and
//! only addresses that such a proxy vouches for are believed.

use std::net::IpAddr;

/// A block of addresses, `10.0.0.0/8` or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressBlock {
    network: IpAddr,
    prefix: u8,
}

impl AddressBlock {
    /// Parses `ADDRESS` or `ADDRESS/PREFIX`; the address must be the block's first (no
    /// host bits set), so that what is written is what is matched.
    pub fn parse(text: &str) -> Result<AddressBlock, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| {
            format!("`{text}` is not an IP address or block (10.0.0.0/8, fd00::/8)")
        })?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= bits)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0 to {bits}"))?,
        };
        // An IPv4-mapped block (`::ffff:10.0.0.0/104`) is the IPv4 block it maps, since
        // addresses are matched as IPv4.
        let (network, prefix) = match network {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                let Some(prefix) = prefix.checked_sub(96) else {
                    return Err(format!(
                        "`{text}`: an IPv4-mapped block needs a prefix length of 96 to 128 \
                         (or write it as an IPv4 block)"
                    ));
                };
                (canonical(network), prefix)
            }
            other => (other, prefix),
        };
        let block = AddressBlock { network, prefix };
        if masked(block.network, prefix) != block.network {
            return Err(format!(
                "`{text}` has host bits set; the block is {}/{prefix}",
                masked(block.network, prefix)
            ));
        }
        Ok(block)
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        address.is_ipv4() == self.network.is_ipv4() && masked(address, self.prefix) == self.network
    }
}

impl std::fmt::Display for AddressBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The header trusted proxies append the client's address to. Only one is read: a proxy
/// that appends to one passes the other on from the client unchecked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: 203.0.113.9, 10.0.0.7`.
    #[default]
    XForwardedFor,
    /// RFC 7239: `Forwarded: for=203.0.113.9;proto=https, for="[2001:db8::7]:4711"`.
    Forwarded,
}

impl ForwardedHeader {
    /// The configuration's names: `x-forwarded-for` or `forwarded`.
    pub fn parse(text: &str) -> Result<ForwardedHeader, String> {
        match text {
            "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            other => Err(format!(
                "`{other}` is not a forwarding header: use \"x-forwarded-for\" or \"forwarded\""
            )),
        }
    }

    /// The header's name, lower case.
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }

    /// The address one comma-separated entry names: the entry itself, or a `Forwarded`
    /// element's `for=` (an obfuscated or `unknown` node is none).
    fn address(self, entry: &[u8]) -> Option<IpAddr> {
        match self {
            ForwardedHeader::XForwardedFor => forwarded_address(entry),
            ForwardedHeader::Forwarded => {
                let node = entry.split(|byte| *byte == b';').find_map(|pair| {
                    let pair = pair.trim_ascii();
                    let (key, value) = pair.split_at(pair.iter().position(|byte| *byte == b'=')?);
                    key.eq_ignore_ascii_case(b"for").then_some(&value[1..])
                })?;
                let node = node.trim_ascii();
                let node = node
                    .strip_prefix(b"\"")
                    .and_then(|quoted| quoted.strip_suffix(b"\""))
                    .unwrap_or(node);
                forwarded_address(node)
            }
        }
    }
}

/// IPv4 addresses that arrive as IPv4-mapped IPv6 (`::ffff:10.0.0.1`, from a dual-stack
/// socket) are the IPv4 address.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

fn masked(address: IpAddr, prefix: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// The client of a request that reached the gateway from `peer`: `peer` itself unless it is
/// a trusted proxy; then the forwarding header's lines (`forwarded`, of kind `header`) are
/// read from the end (the entry the nearest proxy appended) towards the start, past every
/// trusted proxy, to the first address no trusted proxy is. An entry that is not an address
/// stops the walk at the last hop believed, since what precedes it came from the client
/// unchecked.
pub fn client_address<'a>(
    peer: IpAddr,
    header: ForwardedHeader,
    forwarded: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &[AddressBlock],
) -> IpAddr {
    let trusted_hop = |address: IpAddr| trusted.iter().any(|block| block.contains(address));
    let mut client = canonical(peer);
    if !trusted_hop(client) {
        return client;
    }
    let entries = forwarded
        .rev()
        .flat_map(|value| value.rsplit(|byte| *byte == b','));
    for entry in entries {
        let Some(address) = header.address(entry) else {
            break;
        };
        client = address;
        if !trusted_hop(address) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry or `Forwarded` node: an address, with or without a port
/// (`[v6]:port`, `[v6]`).
fn forwarded_address(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?.trim();
    if let Ok(address) = entry.parse::<IpAddr>() {
        return Some(canonical(address));
    }
    if let Some(v6) = entry
        .strip_prefix('[')
        .and_then(|bracketed| bracketed.strip_suffix(']'))
    {
        return v6.parse::<IpAddr>().ok().map(canonical);
    }
    entry
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|socket| canonical(socket.ip()))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{AddressBlock, ForwardedHeader, client_address};

    fn ip(text: &str) -> IpAddr {
        text.parse()
            .unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    fn blocks(texts: &[&str]) -> Vec<AddressBlock> {
        texts
            .iter()
            .map(|text| AddressBlock::parse(text).unwrap_or_else(|error| panic!("{error}")))
            .collect()
    }

    fn client(peer: &str, headers: &[&str], trusted: &[&str]) -> IpAddr {
        client_address(
            ip(peer),
            ForwardedHeader::XForwardedFor,
            headers.iter().map(|header| header.as_bytes()),
            &blocks(trusted),
        )
    }

    fn forwarded_client(peer: &str, headers: &[&str], trusted: &[&str]) -> IpAddr {
        client_address(
            ip(peer),
            ForwardedHeader::Forwarded,
            headers.iter().map(|header| header.as_bytes()),
            &blocks(trusted),
        )
    }

    #[test]
    fn forwarded_elements_name_their_client_in_for() {
        let trusted = ["10.0.0.0/8"];
        assert_eq!(
            forwarded_client("10.0.0.5", &["for=203.0.113.9;proto=https"], &trusted),
            ip("203.0.113.9")
        );
        // Quoted IPv6 with and without a port, keys in any case, spaces around pairs.
        assert_eq!(
            forwarded_client(
                "10.0.0.5",
                &["For=\"[2001:db8::7]:4711\"; proto=https"],
                &trusted
            ),
            ip("2001:db8::7")
        );
        assert_eq!(
            forwarded_client("10.0.0.5", &["proto=http;for=\"[2001:db8::8]\""], &trusted),
            ip("2001:db8::8")
        );
        // Walked from the nearest hop; the client's own element before it is not believed.
        assert_eq!(
            forwarded_client(
                "10.0.0.5",
                &["for=1.1.1.1, for=203.0.113.9;by=10.0.0.7", "for=10.0.0.7"],
                &trusted
            ),
            ip("203.0.113.9")
        );
        // An obfuscated or unknown node stops the walk at the last hop believed.
        assert_eq!(
            forwarded_client("10.0.0.5", &["for=_hidden, for=10.0.0.8"], &trusted),
            ip("10.0.0.8")
        );
        assert_eq!(
            forwarded_client("10.0.0.5", &["for=unknown"], &trusted),
            ip("10.0.0.5")
        );
        // The other header is not read: a client can write either.
        assert_eq!(
            forwarded_client("10.0.0.5", &["203.0.113.9"], &trusted),
            ip("10.0.0.5")
        );
        assert_eq!(
            ForwardedHeader::parse("forwarded-for"),
            Err("`forwarded-for` is not a forwarding header: use \"x-forwarded-for\" or \"forwarded\"".to_owned())
        );
    }

    #[test]
    fn blocks_match_their_addresses_and_refuse_what_would_mislead() {
        let private = blocks(&["10.0.0.0/8", "fd00::/8", "192.168.1.7"]);
        assert!(private[0].contains(ip("10.244.3.9")));
        assert!(private[0].contains(ip("::ffff:10.1.2.3")));
        assert!(!private[0].contains(ip("11.0.0.1")));
        assert!(private[1].contains(ip("fd12::1")));
        assert!(!private[1].contains(ip("10.0.0.1")));
        assert!(private[2].contains(ip("192.168.1.7")));
        assert!(!private[2].contains(ip("192.168.1.8")));
        assert!(blocks(&["0.0.0.0/0"])[0].contains(ip("8.8.8.8")));
        // An IPv4-mapped block is the IPv4 block it maps.
        let mapped = blocks(&["::ffff:10.0.0.0/104", "::ffff:192.168.1.7"]);
        assert_eq!(mapped[0].to_string(), "10.0.0.0/8");
        assert!(mapped[0].contains(ip("10.9.8.7")));
        assert!(mapped[0].contains(ip("::ffff:10.9.8.7")));
        assert!(!mapped[0].contains(ip("11.0.0.1")));
        assert_eq!(mapped[1].to_string(), "192.168.1.7/32");
        for (text, problem) in [
            (
                "::ffff:10.0.0.0/64",
                "`::ffff:10.0.0.0/64`: an IPv4-mapped block needs a prefix length of 96 to 128 \
                 (or write it as an IPv4 block)",
            ),
            (
                "::ffff:10.0.0.1/104",
                "`::ffff:10.0.0.1/104` has host bits set; the block is 10.0.0.0/8",
            ),
            (
                "10.0.0.1/8",
                "`10.0.0.1/8` has host bits set; the block is 10.0.0.0/8",
            ),
            (
                "10.0.0.0/33",
                "`10.0.0.0/33`: the prefix length must be 0 to 32",
            ),
            (
                "ingress",
                "`ingress` is not an IP address or block (10.0.0.0/8, fd00::/8)",
            ),
        ] {
            assert_eq!(AddressBlock::parse(text), Err(problem.to_owned()));
        }
    }

    #[test]
    fn only_trusted_proxies_are_believed_from_the_nearest_hop_back() {
        let trusted = ["10.0.0.0/8"];
        // No trusted proxies, or a peer that is not one: the peer, whatever it claims.
        assert_eq!(client("10.0.0.5", &["203.0.113.9"], &[]), ip("10.0.0.5"));
        assert_eq!(
            client("198.51.100.2", &["203.0.113.9"], &trusted),
            ip("198.51.100.2")
        );
        // The ingress appended the client it saw.
        assert_eq!(
            client("10.0.0.5", &["203.0.113.9"], &trusted),
            ip("203.0.113.9")
        );
        // A client's own claim before it is not believed: only the entry the trusted
        // proxy appended is.
        assert_eq!(
            client("10.0.0.5", &["1.1.1.1, 203.0.113.9"], &trusted),
            ip("203.0.113.9")
        );
        // Two trusted hops (APIM behind an ingress), over two header lines.
        assert_eq!(
            client(
                "10.0.0.5",
                &["1.1.1.1, 203.0.113.9", "10.0.0.7:41234"],
                &trusted
            ),
            ip("203.0.113.9")
        );
        // IPv6 with a port, and a mapped IPv4 peer.
        assert_eq!(
            client("::ffff:10.0.0.5", &["[2001:db8::7]:5555"], &trusted),
            ip("2001:db8::7")
        );
        // Garbage stops the walk at the last hop believed; no header leaves the peer.
        assert_eq!(client("10.0.0.5", &["unknown"], &trusted), ip("10.0.0.5"));
        assert_eq!(
            client("10.0.0.5", &["203.0.113.9, junk, 10.0.0.8"], &trusted),
            ip("10.0.0.8")
        );
        assert_eq!(client("10.0.0.5", &[], &trusted), ip("10.0.0.5"));
    }
}
