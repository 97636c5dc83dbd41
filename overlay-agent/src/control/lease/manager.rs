//! Choosing this node's subnet, as flannel's local manager does: reuse our existing lease
//! (same PublicIP; same PublicIPv6 in an IPv6-only network) if it still fits the config, else the subnet of the old subnet file if it
//! is free and fits, else a random free subnet among the first 100. The choice is a pure
//! function of the config and the leases; claiming it (a create-if-absent transaction) and
//! renewing it are in `registry`, driven from the daemon.

use ipnet::{Ipv4Net, Ipv6Net};
use rand::seq::IndexedRandom as _;

use super::{Lease, LeaseAttrs, LeaseKey};
use crate::config::NetworkConfig;

/// How many free subnets flannel picks among (spreads concurrent starters).
pub const CANDIDATES: usize = 100;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Our own lease (same node), still valid under the config: renew it.
    Reuse { key: LeaseKey, etcd_lease: i64 },
    /// Try to claim these, in order (the previous subnet first, then a random free one).
    Claim(Vec<LeaseKey>),
    /// No subnet left between SubnetMin and SubnetMax (or IPv6SubnetMin and IPv6SubnetMax).
    Exhausted,
}

/// Whether a lease's IPv4 subnet overlaps `s` (an IPv6-only lease has none).
fn taken4(leases: &[Lease], s: &Ipv4Net) -> bool {
    leases.iter().filter(|l| !l.key().is_ipv6_only()).any(|l| l.subnet.contains(s) || s.contains(&l.subnet))
}

/// Whether a lease's IPv6 subnet overlaps `s`.
fn taken6(leases: &[Lease], s: &Ipv6Net) -> bool {
    leases.iter().filter_map(|l| l.subnet6).any(|t| t.contains(s) || s.contains(&t))
}

/// IPv4 subnets in the config's range that no lease overlaps, in address order.
pub fn free_subnets<'a>(cfg: &'a NetworkConfig, leases: &'a [Lease]) -> impl Iterator<Item = Ipv4Net> + 'a {
    cfg.subnets().filter(move |s| !taken4(leases, s))
}

/// IPv6 subnets in the config's IPv6 range that no lease overlaps, in address order (none
/// when IPv6 is off).
pub fn free_subnets6<'a>(cfg: &'a NetworkConfig, leases: &'a [Lease]) -> impl Iterator<Item = Ipv6Net> + 'a {
    let c6 = cfg.ipv6;
    (0u128..).map_while(move |i| c6.and_then(|c| c.nth(i))).filter(move |s| !taken6(leases, s))
}

/// This node's leases (same node: `LeaseAttrs::same_node`) that the config no longer allows:
/// flannel deletes them before choosing.
pub fn incompatible_own(cfg: &NetworkConfig, leases: &[Lease], me: &LeaseAttrs) -> Vec<LeaseKey> {
    leases.iter().filter(|l| me.same_node(&l.attrs) && !cfg.fits_key(&l.key())).map(Lease::key).collect()
}

/// The IPv6 subnet to claim beside IPv4 subnet `v4` (dual stack): the one at the same
/// position in its range as `v4` in the IPv4 range if free (a node's two subnets then read
/// alike: 10.244.7.0/24 and fd00:..:7::/64), else a random one among the first
/// `CANDIDATES` free ones (so that nodes starting together rarely pick the same; the claim
/// settles a tie). `None`: IPv6 off, or no IPv6 subnet left. (flannel picks any free one.)
pub fn choose_v6(cfg: &NetworkConfig, leases: &[Lease], v4: Ipv4Net, rng: &mut impl rand::Rng) -> Option<Ipv6Net> {
    let c6 = cfg.ipv6.as_ref()?;
    let step4 = 1u32 << (32 - cfg.subnet_len);
    let index = (u32::from(v4.network()).saturating_sub(u32::from(cfg.subnet_min)) / step4) as u128;
    if let Some(s) = c6.nth(index).filter(|s| !taken6(leases, s)) {
        return Some(s);
    }
    let free: Vec<Ipv6Net> = free_subnets6(cfg, leases).take(CANDIDATES).collect();
    free.choose(rng).copied()
}

/// What to take, as flannel's local manager decides it: our lease (same node) if it still
/// fits, else the previous subnet if free and fitting, then a random free one among the
/// first `CANDIDATES`. An IPv6-only network chooses among IPv6 subnets; a dual-stack one
/// pairs each IPv4 candidate with an IPv6 subnet (`choose_v6`).
pub fn choose(cfg: &NetworkConfig, leases: &[Lease], me: &LeaseAttrs, previous: Option<LeaseKey>, rng: &mut impl rand::Rng) -> Choice {
    if let Some(l) = leases.iter().find(|l| me.same_node(&l.attrs) && cfg.fits_key(&l.key())) {
        return Choice::Reuse { key: l.key(), etcd_lease: l.etcd_lease };
    }
    if !cfg.enable_ipv4 {
        let previous = previous.and_then(|k| k.v6).filter(|p| cfg.ipv6.is_some_and(|c| c.fits(p)) && !taken6(leases, p));
        let free: Vec<Ipv6Net> = free_subnets6(cfg, leases).take(CANDIDATES).collect();
        return order(previous, free.choose(rng).copied()).map_or(Choice::Exhausted, |o| Choice::Claim(o.into_iter().map(LeaseKey::ipv6_only).collect()));
    }
    let previous = previous.map(|k| k.v4).filter(|p| cfg.fits(p) && !taken4(leases, p));
    let free: Vec<Ipv4Net> = free_subnets(cfg, leases).take(CANDIDATES).collect();
    let Some(v4s) = order(previous, free.choose(rng).copied()) else { return Choice::Exhausted };
    let mut keys = Vec::new();
    for v4 in v4s {
        let v6 = match cfg.ipv6 {
            Some(_) => match choose_v6(cfg, leases, v4, rng) {
                Some(s) => Some(s),
                None => return Choice::Exhausted,
            },
            None => None,
        };
        keys.push(LeaseKey { v4, v6 });
    }
    Choice::Claim(keys)
}

/// The previous subnet (if usable) then the random pick, without repeats; `None` if neither.
fn order<N: PartialEq>(previous: Option<N>, random: Option<N>) -> Option<Vec<N>> {
    let mut o: Vec<N> = previous.into_iter().collect();
    if let Some(r) = random.filter(|r| !o.contains(r)) {
        o.push(r);
    }
    (!o.is_empty()).then_some(o)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;

    use std::net::Ipv4Addr;

    use super::*;
    use crate::config;

    fn cfg(json: &str) -> NetworkConfig {
        config::parse(json).unwrap()
    }
    fn lease(subnet: &str, ip: [u8; 4]) -> Lease {
        Lease { subnet: subnet.parse().unwrap(), subnet6: None, attrs: LeaseAttrs::udp(Ipv4Addr::from(ip)), etcd_lease: 7 }
    }

    #[test]
    fn dual_stack_subnets_pair_up_and_stale_single_stack_leases_go() {
        let c = cfg(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#);
        let v4: Ipv4Net = "10.0.7.0/24".parse().unwrap();
        assert_eq!(choose_v6(&c, &[], v4, &mut rng()), Some("fd00:0:0:7::/64".parse().unwrap()));
        // Taken by someone (a stock node chose it): another free one, spread.
        let mut other = lease("10.0.9.0/24", [9, 9, 9, 9]);
        other.subnet6 = Some("fd00:0:0:7::/64".parse().unwrap());
        let mut r = rng();
        let picks: std::collections::BTreeSet<Ipv6Net> = (0..50).map(|_| choose_v6(&c, &[other.clone()], v4, &mut r).unwrap()).collect();
        assert!(!picks.contains(&other.subnet6.unwrap()) && picks.len() > 10, "{picks:?}");
        assert!(picks.iter().all(|s| c.ipv6.unwrap().fits(s)));
        assert_eq!(choose_v6(&cfg(r#"{"Network":"10.0.0.0/16"}"#), &[], v4, &mut rng()), None);
        // Our single-stack lease from before IPv6 was switched on: deleted, not reused.
        let mine = lease("10.0.5.0/24", [2, 2, 2, 2]);
        assert_eq!(incompatible_own(&c, &[mine.clone(), other.clone()], &LeaseAttrs::udp(Ipv4Addr::new(2, 2, 2, 2))), vec![mine.key()]);
        let mut dual = mine.clone();
        dual.subnet6 = Some("fd00:0:0:5::/64".parse().unwrap());
        assert!(incompatible_own(&c, &[dual.clone()], &LeaseAttrs::udp(Ipv4Addr::new(2, 2, 2, 2))).is_empty());
        let dual_key = dual.key();
        assert_eq!(choose(&c, &[dual], &LeaseAttrs::udp(Ipv4Addr::new(2, 2, 2, 2)), None, &mut rng()), Choice::Reuse { key: dual_key, etcd_lease: 7 });
        // IPv6 full.
        let tiny = cfg(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/120","Backend":{"Type":"vxlan"}}"#);
        let held: Vec<Lease> = (1..4u8)
            .map(|i| Lease { subnet6: Some(format!("fd00::{:x}/122", i * 64).parse().unwrap()), ..lease(&format!("10.0.{i}.0/24"), [i, 0, 0, 1]) })
            .collect();
        assert_eq!(choose_v6(&tiny, &held, v4, &mut rng()), None);
    }
    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(1)
    }

    #[test]
    fn reuses_our_lease_when_it_still_fits() {
        let c = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let leases = [lease("10.0.5.0/24", [1, 1, 1, 1]), lease("10.0.9.0/24", [2, 2, 2, 2])];
        assert_eq!(
            choose(&c, &leases, &LeaseAttrs::udp(Ipv4Addr::new(2, 2, 2, 2)), None, &mut rng()),
            Choice::Reuse { key: LeaseKey::from(&"10.0.9.0/24".parse::<Ipv4Net>().unwrap()), etcd_lease: 7 }
        );
    }

    #[test]
    fn does_not_reuse_a_lease_the_config_no_longer_allows() {
        let c = cfg(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.20.0"}"#);
        let leases = [lease("10.0.9.0/24", [2, 2, 2, 2]), lease("10.0.8.0/24", [3, 3, 3, 3])];
        assert!(matches!(choose(&c, &leases, &LeaseAttrs::udp(Ipv4Addr::new(2, 2, 2, 2)), None, &mut rng()), Choice::Claim(_)));
        assert_eq!(incompatible_own(&c, &leases, &LeaseAttrs::udp(Ipv4Addr::new(2, 2, 2, 2))), vec![LeaseKey::from(&"10.0.9.0/24".parse::<Ipv4Net>().unwrap())]);
        assert!(incompatible_own(&c, &[lease("10.0.21.0/24", [2, 2, 2, 2])], &LeaseAttrs::udp(Ipv4Addr::new(2, 2, 2, 2))).is_empty());
    }

    #[test]
    fn prefers_the_previous_subnet_when_free() {
        let c = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let prev: Ipv4Net = "10.0.42.0/24".parse().unwrap();
        match choose(&c, &[], &LeaseAttrs::udp(Ipv4Addr::new(3, 3, 3, 3)), Some(LeaseKey::from(&prev)), &mut rng()) {
            Choice::Claim(order) => assert_eq!(order[0].v4, prev),
            other => panic!("{other:?}"),
        }
        // Taken by someone else: not first.
        let leases = [lease("10.0.42.0/24", [9, 9, 9, 9])];
        match choose(&c, &leases, &LeaseAttrs::udp(Ipv4Addr::new(3, 3, 3, 3)), Some(LeaseKey::from(&prev)), &mut rng()) {
            Choice::Claim(order) => assert!(!order.iter().any(|k| k.v4 == prev)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn picks_among_the_first_hundred_free_subnets() {
        let c = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let leases = [lease("10.0.1.0/24", [1, 1, 1, 1])];
        let mut r = rng();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            match choose(&c, &leases, &LeaseAttrs::udp(Ipv4Addr::new(5, 5, 5, 5)), None, &mut r) {
                Choice::Claim(order) => {
                    let o = order[0].v4.network().octets();
                    assert!((2..=101).contains(&o[2]), "{} is not among the first 100 free", order[0]);
                    seen.insert(o[2]);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(seen.len() > 50, "choices should spread, saw {}", seen.len());
    }

    #[test]
    fn exhaustion_is_reported() {
        let c = cfg(r#"{"Network":"10.0.0.0/28"}"#); // /30 subnets: .4, .8, .12
        let leases = [lease("10.0.0.4/30", [1, 1, 1, 1]), lease("10.0.0.8/30", [2, 2, 2, 2]), lease("10.0.0.12/30", [3, 3, 3, 3])];
        assert_eq!(choose(&c, &leases, &LeaseAttrs::udp(Ipv4Addr::new(4, 4, 4, 4)), None, &mut rng()), Choice::Exhausted);
    }

    #[test]
    fn overlapping_leases_of_other_lengths_block_subnets() {
        let c = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let leases = [lease("10.0.0.0/20", [1, 1, 1, 1])];
        let free: Vec<_> = free_subnets(&c, &leases).take(1).collect();
        assert_eq!(free[0], "10.0.16.0/24".parse::<Ipv4Net>().unwrap());
    }
}
