//! The IPv6 overlay: a ULA prefix per network (RFC 4193: `fd`, a random 40-bit global id, a
//! /64 by default) and a stable address in it per node.
//!
//! A node's interface id comes from a hash of the network's prefix and the node's key, so the
//! same key lands on the same address by construction; the address is stored with the node
//! anyway (the hash only proposes), and the unique index on `(network_id, address6)` makes
//! two nodes with one address impossible, as for IPv4. On a clash (with a live node or a
//! tombstone, which holds its address like the IPv4 one) the next attempt hashes again with a
//! counter. A network created with `--cidr6 off` has no prefix and its nodes no address6.

use super::sql::{params, Conn, OptionalExtension};
use super::StoreError;
use mesh_proto::control::{valid_prefix6, ErrorCode, Ipv6Net, MAX_PREFIX6_LEN, MIN_PREFIX6_LEN};
use mesh_proto::PublicKey;
use sha2::{Digest, Sha256};
use std::net::{Ipv6Addr, SocketAddr};

/// Prefix length of the prefix a network gets unless told otherwise.
pub const DEFAULT_PREFIX6_LEN: u8 = 64;

/// How many hashes an allocation tries before it calls the prefix full. Even a /112 holding
/// the most nodes a network can list ([`mesh_proto::control::MAX_PEERS`]) clashes with a
/// probability of 1/16 per try.
const MAX_ATTEMPTS: u32 = 256;

/// Interface ids kept out of every prefix: the top 128 (RFC 2526 reserved subnet anycast).
const RESERVED_TOP: u128 = 128;

/// A fresh ULA prefix: `fd` and a random 40-bit global id, subnet 0, a /64.
pub fn random_ula() -> Ipv6Net {
    let mut id = [0u8; 5];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
    ula_with_global_id(id)
}

/// The /64 of global id `id` (subnet 0).
fn ula_with_global_id(id: [u8; 5]) -> Ipv6Net {
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&id);
    Ipv6Net::new_assert(Ipv6Addr::from(octets), DEFAULT_PREFIX6_LEN)
}

/// Reads `--cidr6`: `off` (or `none`) for no IPv6 overlay, else a ULA prefix.
pub fn parse_cidr6(text: &str) -> Result<Option<Ipv6Net>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") || text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let prefix: Ipv6Net = text.parse().map_err(|_| {
        format!("{text:?} is not an IPv6 prefix (expected e.g. fd7a:115c:a1e0::/64, or `off`)")
    })?;
    if !(MIN_PREFIX6_LEN..=MAX_PREFIX6_LEN).contains(&prefix.prefix_len()) {
        return Err(format!(
            "prefix length /{} out of range: use /{MIN_PREFIX6_LEN} to /{MAX_PREFIX6_LEN} (/64 is usual)",
            prefix.prefix_len()
        ));
    }
    if prefix.trunc() != prefix {
        return Err(format!(
            "{text} has host bits set; did you mean {}?",
            prefix.trunc()
        ));
    }
    if !valid_prefix6(&prefix) {
        return Err(format!(
            "{text} is not a unique local prefix (fc00::/7); use one such as {}, or leave --cidr6 out for a random one",
            random_ula()
        ));
    }
    Ok(Some(prefix))
}

/// The address attempt `attempt` proposes for `key` in `prefix`: the prefix with a hash of
/// prefix, key and attempt as its host part. `None` when the hash falls on a reserved id
/// (all zeros, the subnet-router anycast; the top 128, RFC 2526): the caller tries the next.
pub fn candidate(prefix: &Ipv6Net, key: &PublicKey, attempt: u32) -> Option<Ipv6Addr> {
    let mut h = Sha256::new();
    h.update(b"mesh overlay6 interface id v1");
    h.update(prefix.network().octets());
    h.update([prefix.prefix_len()]);
    h.update(key.0);
    h.update(attempt.to_be_bytes());
    let digest = h.finalize();
    let mut bits = [0u8; 16];
    bits.copy_from_slice(&digest[..16]);
    let host_mask = u128::MAX >> prefix.prefix_len();
    let id = u128::from_be_bytes(bits) & host_mask;
    if id == 0 || id > host_mask - RESERVED_TOP {
        return None;
    }
    Some(Ipv6Addr::from(u128::from(prefix.network()) | id))
}

/// The network's IPv6 prefix, if it has one.
pub(super) fn prefix_of(conn: &Conn, network_id: i64) -> Result<Option<Ipv6Net>, StoreError> {
    let text: Option<String> = conn
        .query_row(
            "SELECT prefix6 FROM networks WHERE id = ?1",
            [network_id],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    Ok(text.and_then(|t| t.parse().ok()))
}

/// A stored address6, if it is one inside `prefix` (a row of a network whose prefix changed
/// keeps no address outside it).
pub(super) fn stored(text: Option<String>, prefix: Option<Ipv6Net>) -> Option<Ipv6Addr> {
    let prefix = prefix?;
    text.and_then(|t| t.parse().ok())
        .filter(|a| prefix.contains(a))
}

/// A free address for `key` in the network's `prefix`: the first of its hashed candidates
/// that no node of the network, live or removed, holds.
pub(super) fn allocate(
    tx: &Conn,
    network_id: i64,
    network: &str,
    prefix: &Ipv6Net,
    key: &PublicKey,
) -> Result<Ipv6Addr, StoreError> {
    let mut taken =
        tx.prepare_cached("SELECT 1 FROM nodes WHERE network_id = ?1 AND address6 = ?2")?;
    for attempt in 0..MAX_ATTEMPTS {
        let Some(address) = candidate(prefix, key, attempt) else {
            continue;
        };
        if !taken.exists(params![network_id, address.to_string()])? {
            return Ok(address);
        }
    }
    Err(StoreError::Refused {
        code: ErrorCode::NetworkFull,
        message: format!(
            "network {network:?} found no free IPv6 address in {prefix} after {MAX_ATTEMPTS} tries; remove nodes, or recreate the network with a shorter --cidr6 (a /64)"
        ),
    })
}

/// Gives the node with `key` an address in the network's prefix, unless it has one there
/// already; its address, or `None` in a network without an IPv6 overlay.
pub(super) fn ensure(
    tx: &Conn,
    network_id: i64,
    network: &str,
    key: &str,
) -> Result<Option<Ipv6Addr>, StoreError> {
    let Some(prefix) = prefix_of(tx, network_id)? else {
        return Ok(None);
    };
    let current: Option<String> = tx
        .query_row(
            "SELECT address6 FROM nodes WHERE network_id = ?1 AND key = ?2",
            params![network_id, key],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    if let Some(address) = stored(current, Some(prefix)) {
        return Ok(Some(address));
    }
    let parsed: PublicKey = key
        .parse()
        .map_err(|_| StoreError::Invalid(format!("stored node key {key:?} is not a key")))?;
    let address = allocate(tx, network_id, network, &prefix, &parsed)?;
    tx.execute(
        "UPDATE nodes SET address6 = ?1 WHERE network_id = ?2 AND key = ?3",
        params![address.to_string(), network_id, key],
    )?;
    Ok(Some(address))
}

/// Leaves out of `endpoints` those inside the IPv6 overlay (they would carry the tunnel
/// inside itself); how many went.
pub fn refuse_overlay6(prefix: Option<Ipv6Net>, endpoints: &mut Vec<SocketAddr>) -> usize {
    let Some(prefix) = prefix else { return 0 };
    let before = endpoints.len();
    endpoints.retain(|e| match e.ip() {
        std::net::IpAddr::V6(ip) => !prefix.contains(&ip),
        std::net::IpAddr::V4(_) => true,
    });
    before - endpoints.len()
}

/// Schema version 6: every network gets a random ULA prefix, every node (tombstones too: they
/// hold their addresses) an address in it, and no two nodes of a network one address.
pub(super) fn migrate(tx: &Conn) -> Result<(), StoreError> {
    super::add_column(tx, "networks", "prefix6", "TEXT")?;
    super::add_column(tx, "nodes", "address6", "TEXT")?;
    tx.execute_batch(
        "CREATE UNIQUE INDEX IF NOT EXISTS nodes_by_address6 ON nodes (network_id, address6);",
    )?;
    let networks: Vec<(i64, String)> = {
        let mut st =
            tx.prepare("SELECT id, name FROM networks WHERE prefix6 IS NULL ORDER BY id")?;
        let rows = st.query_map(params![], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    for (id, name) in networks {
        let prefix = random_ula();
        tx.execute(
            "UPDATE networks SET prefix6 = ?1 WHERE id = ?2",
            params![prefix.to_string(), id],
        )?;
        let keys: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT key FROM nodes WHERE network_id = ?1 AND address6 IS NULL ORDER BY id",
            )?;
            let rows = st.query_map([id], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for key in keys {
            ensure(tx, id, &name, &key)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    #[test]
    fn random_prefixes_are_ula_slash_64s() {
        let a = random_ula();
        assert!(valid_prefix6(&a), "{a}");
        assert_eq!(a.prefix_len(), 64);
        assert_eq!(a.network().octets()[0], 0xfd);
        // 40 random bits: two in a row differ.
        assert_ne!(a, random_ula());
        let fixed = ula_with_global_id([0x12, 0x34, 0x56, 0x78, 0x9a]);
        assert_eq!(fixed.to_string(), "fd12:3456:789a::/64");
    }

    #[test]
    fn the_cidr6_flag() {
        assert_eq!(parse_cidr6("off"), Ok(None));
        assert_eq!(
            parse_cidr6("fd12:3456:789a::/64"),
            Ok(Some("fd12:3456:789a::/64".parse().unwrap()))
        );
        assert!(parse_cidr6("fd12:3456:789a::/48").unwrap().is_some());
        for (bad, says) in [
            ("fd12::", "not an IPv6 prefix"),
            ("10.0.0.0/8", "not an IPv6 prefix"),
            ("fd12::/120", "out of range"),
            ("fd12::/40", "out of range"),
            ("fd12::1/64", "did you mean fd12::/64"),
            ("2001:db8::/64", "not a unique local prefix"),
        ] {
            let e = parse_cidr6(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn candidates_are_stable_inside_the_prefix_and_differ_by_key_and_attempt() {
        let p: Ipv6Net = "fd12:3456:789a::/64".parse().unwrap();
        let a = candidate(&p, &key(1), 0).unwrap();
        assert!(p.contains(&a) && a != p.network());
        assert_eq!(candidate(&p, &key(1), 0), Some(a));
        assert_ne!(candidate(&p, &key(2), 0), Some(a));
        assert_ne!(candidate(&p, &key(1), 1), Some(a));
        // A /112 leaves 16 bits, never all zeros nor the reserved top.
        let small: Ipv6Net = "fd12:3456:789a::/112".parse().unwrap();
        for n in 0..=255u8 {
            for attempt in 0..4 {
                if let Some(a) = candidate(&small, &key(n), attempt) {
                    let id = u128::from(a) & 0xffff;
                    assert!(small.contains(&a) && id != 0 && id <= 0xffff - 128, "{a}");
                }
            }
        }
    }

    #[test]
    fn overlay_endpoints_are_refused() {
        let p: Ipv6Net = "fd12:3456:789a::/64".parse().unwrap();
        let mut e: Vec<SocketAddr> = vec![
            "[fd12:3456:789a::5]:51820".parse().unwrap(),
            "[2001:db8::5]:51820".parse().unwrap(),
            "192.0.2.5:51820".parse().unwrap(),
        ];
        assert_eq!(refuse_overlay6(Some(p), &mut e), 1);
        assert_eq!(e.len(), 2);
        assert_eq!(refuse_overlay6(None, &mut e), 0);
    }
}
