//! Acquiring this node's subnet as a state machine without I/O: it says what to do next
//! (list the leases, delete one of ours the config no longer allows, renew our lease, take
//! our reservation, claim a subnet) and the daemon performs it and feeds back the result.
//! Every path (reuse, reservation, expiry meanwhile, stale lease, concurrent claims,
//! exhaustion, giving up) is tested here without etcd.

use std::collections::VecDeque;

use super::{
    manager::{self, Choice},
    Lease, LeaseAttrs, LeaseKey,
};
use crate::config::NetworkConfig;

/// Listings before giving up when other nodes keep taking the chosen subnets.
pub const MAX_ATTEMPTS: u32 = 10;

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// List the leases; answer `Outcome::Listed`.
    List,
    /// Delete this lease of ours, which the config no longer allows; answer `Outcome::Done`.
    Delete(LeaseKey),
    /// Write our attributes into our reservation (no TTL); answer `Outcome::Done`.
    TakeReservation(LeaseKey),
    /// Write our attributes into our lease and refresh it; answer `Outcome::Renewed(ttl)`.
    Renew { key: LeaseKey, etcd_lease: i64 },
    /// Claim this subnet; answer `Outcome::Claimed`.
    Claim(LeaseKey),
    /// Held: `etcd_lease` 0 is a reservation; `ttl_secs` what etcd granted (None: the
    /// TTL the claim asked for).
    Acquired { key: LeaseKey, etcd_lease: i64, ttl_secs: Option<i64> },
    /// No free subnet in the config's range.
    Exhausted,
    /// `MAX_ATTEMPTS` listings and every chosen subnet was taken meanwhile.
    GaveUp,
}

/// What the last step gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Listed(Vec<Lease>),
    /// The delete or the reservation write is done.
    Done,
    /// The TTL etcd granted on renewal (0 or less: the lease expired meanwhile).
    Renewed(i64),
    /// The claim's etcd lease, or None if another node holds the subnet.
    Claimed(Option<i64>),
}

#[derive(Debug)]
enum Waiting {
    Listing,
    Deleting { rest: Vec<LeaseKey>, leases: Vec<Lease> },
    Reservation(LeaseKey),
    Renewal { key: LeaseKey, etcd_lease: i64 },
    Claim { key: LeaseKey, rest: VecDeque<LeaseKey> },
    Finished,
}

pub struct Acquisition<'a> {
    cfg: &'a NetworkConfig,
    /// Our attributes: which leases are this node's (`LeaseAttrs::same_node`).
    me: &'a LeaseAttrs,
    previous: Option<LeaseKey>,
    listings: u32,
    waiting: Waiting,
}

impl<'a> Acquisition<'a> {
    /// Start: the first step is always a listing.
    pub fn start(cfg: &'a NetworkConfig, me: &'a LeaseAttrs, previous: Option<LeaseKey>) -> (Self, Step) {
        (Self { cfg, me, previous, listings: 0, waiting: Waiting::Listing }, Step::List)
    }

    /// The next step, given what the last one gave.
    pub fn next(&mut self, outcome: Outcome, rng: &mut impl rand::Rng) -> Step {
        match (std::mem::replace(&mut self.waiting, Waiting::Finished), outcome) {
            (Waiting::Listing, Outcome::Listed(leases)) => {
                self.listings += 1;
                let stale = manager::incompatible_own(self.cfg, &leases, self.me);
                self.after_deletes(stale, leases, rng)
            }
            (Waiting::Deleting { rest, leases }, Outcome::Done) => self.after_deletes(rest, leases, rng),
            (Waiting::Reservation(key), Outcome::Done) => Step::Acquired { key, etcd_lease: 0, ttl_secs: None },
            (Waiting::Renewal { key, etcd_lease }, Outcome::Renewed(ttl)) if ttl > 0 => {
                Step::Acquired { key, etcd_lease, ttl_secs: Some(ttl) }
            }
            // Expired meanwhile: its key went with it; choose again.
            (Waiting::Renewal { .. }, Outcome::Renewed(_)) => self.relist(),
            (Waiting::Claim { key, .. }, Outcome::Claimed(Some(etcd_lease))) => Step::Acquired { key, etcd_lease, ttl_secs: None },
            (Waiting::Claim { mut rest, .. }, Outcome::Claimed(None)) => match rest.pop_front() {
                Some(key) => {
                    self.waiting = Waiting::Claim { key, rest };
                    Step::Claim(key)
                }
                None => self.relist(),
            },
            (w, o) => panic!("acquisition: outcome {o:?} does not answer the step it waited for ({w:?})"),
        }
    }

    fn relist(&mut self) -> Step {
        if self.listings >= MAX_ATTEMPTS {
            return Step::GaveUp;
        }
        self.waiting = Waiting::Listing;
        Step::List
    }

    fn after_deletes(&mut self, mut stale: Vec<LeaseKey>, leases: Vec<Lease>, rng: &mut impl rand::Rng) -> Step {
        if let Some(key) = stale.pop() {
            let leases = leases.into_iter().filter(|l| l.key() != key).collect();
            self.waiting = Waiting::Deleting { rest: stale, leases };
            return Step::Delete(key);
        }
        match manager::choose(self.cfg, &leases, self.me, self.previous, rng) {
            Choice::Reuse { key, etcd_lease: 0 } => {
                self.waiting = Waiting::Reservation(key);
                Step::TakeReservation(key)
            }
            Choice::Reuse { key, etcd_lease } => {
                self.waiting = Waiting::Renewal { key, etcd_lease };
                Step::Renew { key, etcd_lease }
            }
            Choice::Claim(order) => {
                let mut rest: VecDeque<LeaseKey> = order.into();
                match rest.pop_front() {
                    Some(key) => {
                        self.waiting = Waiting::Claim { key, rest };
                        Step::Claim(key)
                    }
                    None => Step::Exhausted,
                }
            }
            Choice::Exhausted => Step::Exhausted,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;

    use std::net::Ipv4Addr;

    use super::*;
    use crate::config;

    const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

    fn cfg(json: &str) -> NetworkConfig {
        config::parse(json).unwrap()
    }
    fn lease(subnet: &str, ip: Ipv4Addr, etcd_lease: i64) -> Lease {
        Lease { subnet: subnet.parse().unwrap(), subnet6: None, attrs: LeaseAttrs::udp(ip), etcd_lease }
    }
    fn net(s: &str) -> LeaseKey {
        LeaseKey { v4: s.parse().unwrap(), v6: None }
    }
    /// Our attributes (a udp lease of ME's).
    static MINE: LeaseAttrs =
        LeaseAttrs { public_ip: ME, public_ipv6: None, backend_type: String::new(), backend_data: None, backend_v6_data: None };

    #[test]
    fn our_lease_is_renewed_and_kept() {
        let c = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut a, step) = Acquisition::start(&c, &MINE, None);
        assert_eq!(step, Step::List);
        let step = a.next(Outcome::Listed(vec![lease("10.0.5.0/24", ME, 7), lease("10.0.6.0/24", Ipv4Addr::new(1, 1, 1, 1), 8)]), &mut rng);
        assert_eq!(step, Step::Renew { key: net("10.0.5.0/24"), etcd_lease: 7 });
        assert_eq!(a.next(Outcome::Renewed(86400), &mut rng), Step::Acquired { key: net("10.0.5.0/24"), etcd_lease: 7, ttl_secs: Some(86400) });
    }

    #[test]
    fn a_lease_that_expired_meanwhile_means_choosing_again() {
        let c = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut a, _) = Acquisition::start(&c, &MINE, Some(net("10.0.5.0/24")));
        a.next(Outcome::Listed(vec![lease("10.0.5.0/24", ME, 7)]), &mut rng);
        assert_eq!(a.next(Outcome::Renewed(0), &mut rng), Step::List);
        // Gone from the next listing: the previous subnet is claimed first.
        assert_eq!(a.next(Outcome::Listed(vec![]), &mut rng), Step::Claim(net("10.0.5.0/24")));
        assert_eq!(a.next(Outcome::Claimed(Some(9)), &mut rng), Step::Acquired { key: net("10.0.5.0/24"), etcd_lease: 9, ttl_secs: None });
    }

    #[test]
    fn a_reservation_is_taken_as_it_is() {
        let c = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut a, _) = Acquisition::start(&c, &MINE, None);
        assert_eq!(a.next(Outcome::Listed(vec![lease("10.0.42.0/24", ME, 0)]), &mut rng), Step::TakeReservation(net("10.0.42.0/24")));
        assert_eq!(a.next(Outcome::Done, &mut rng), Step::Acquired { key: net("10.0.42.0/24"), etcd_lease: 0, ttl_secs: None });
    }

    #[test]
    fn leases_of_ours_the_config_dropped_are_deleted_before_choosing() {
        let c = cfg(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.20.0"}"#);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut a, _) = Acquisition::start(&c, &MINE, Some(net("10.0.9.0/24")));
        let step = a.next(Outcome::Listed(vec![lease("10.0.9.0/24", ME, 7), lease("10.0.8.0/24", ME, 6)]), &mut rng);
        let Step::Delete(first) = step else { panic!("{step:?}") };
        let Step::Delete(second) = a.next(Outcome::Done, &mut rng) else { panic!() };
        assert_eq!([first, second].iter().filter(|s| s.v4.network().octets()[2] < 20).count(), 2);
        // Then a fresh claim (the previous subnet no longer fits).
        let Step::Claim(s) = a.next(Outcome::Done, &mut rng) else { panic!() };
        assert!(c.fits_key(&s), "{s:?}");
    }

    #[test]
    fn concurrent_claims_move_on_then_list_again_then_give_up() {
        let c = cfg(r#"{"Network":"10.0.0.0/16"}"#);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut a, _) = Acquisition::start(&c, &MINE, Some(net("10.0.3.0/24")));
        assert_eq!(a.next(Outcome::Listed(vec![]), &mut rng), Step::Claim(net("10.0.3.0/24")));
        // Taken meanwhile: the random candidate next, then a new listing.
        let Step::Claim(other) = a.next(Outcome::Claimed(None), &mut rng) else { panic!() };
        assert_ne!(other, net("10.0.3.0/24"));
        assert_eq!(a.next(Outcome::Claimed(None), &mut rng), Step::List);
        let mut step = Step::List;
        for _ in 1..MAX_ATTEMPTS {
            assert_eq!(step, Step::List);
            let Step::Claim(_) = a.next(Outcome::Listed(vec![]), &mut rng) else { panic!() };
            step = a.next(Outcome::Claimed(None), &mut rng);
            if step != Step::List {
                step = a.next(Outcome::Claimed(None), &mut rng);
            }
        }
        assert_eq!(step, Step::GaveUp);
    }

    #[test]
    fn a_full_range_is_exhausted() {
        let c = cfg(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.2.0"}"#);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut a, _) = Acquisition::start(&c, &MINE, None);
        let other = Ipv4Addr::new(9, 9, 9, 9);
        assert_eq!(a.next(Outcome::Listed(vec![lease("10.0.1.0/24", other, 1), lease("10.0.2.0/24", other, 2)]), &mut rng), Step::Exhausted);
    }

    /// An IPv6-only network: leases named by their IPv6 subnet, our own found by PublicIPv6
    /// (every IPv6-only lease says PublicIP 0.0.0.0), the previous IPv6 subnet claimed first.
    #[test]
    fn an_ipv6_only_network_chooses_and_keeps_ipv6_subnets() {
        let c = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"vxlan"}}"#);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let me = LeaseAttrs::vxlan_ipv6_only("fd00:64::1".parse().unwrap(), 1, [1; 6]);
        let other = LeaseAttrs::vxlan_ipv6_only("fd00:64::2".parse().unwrap(), 1, [2; 6]);
        let v6 = |s: &str| LeaseKey::ipv6_only(s.parse().unwrap());
        let l6 = |k: LeaseKey, attrs: &LeaseAttrs, etcd_lease| Lease { subnet: k.v4, subnet6: k.v6, attrs: attrs.clone(), etcd_lease };
        // The other node's lease is not ours although its PublicIP (0.0.0.0) is the same.
        let (mut a, _) = Acquisition::start(&c, &me, None);
        let step = a.next(Outcome::Listed(vec![l6(v6("fd00:10:0:5::/64"), &other, 3), l6(v6("fd00:10:0:9::/64"), &me, 4)]), &mut rng);
        assert_eq!(step, Step::Renew { key: v6("fd00:10:0:9::/64"), etcd_lease: 4 });
        // None of ours: the previous IPv6 subnet first, then a random free one; never a taken one.
        let (mut a, _) = Acquisition::start(&c, &me, Some(v6("fd00:10:0:7::/64")));
        assert_eq!(a.next(Outcome::Listed(vec![l6(v6("fd00:10:0:5::/64"), &other, 3)]), &mut rng), Step::Claim(v6("fd00:10:0:7::/64")));
        let Step::Claim(k) = a.next(Outcome::Claimed(None), &mut rng) else { panic!() };
        assert!(k.is_ipv6_only() && c.fits_key(&k) && k != v6("fd00:10:0:5::/64"), "{k:?}");
        // IPv4 and dual-stack keys are not this network's: ours among them (our dual-stack
        // lease from before the network became IPv6-only: same PublicIPv6) is deleted, and its
        // IPv6 subnet, our previous one, taken again.
        let dual = LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 9), 1, [1; 6]).with_ipv6("fd00:64::1".parse().unwrap(), 1, [1; 6]);
        let (mut a, _) = Acquisition::start(&c, &me, Some(v6("fd00:10:0:1::/64")));
        let stale = Lease { subnet: "10.0.1.0/24".parse().unwrap(), subnet6: Some("fd00:10:0:1::/64".parse().unwrap()), attrs: dual, etcd_lease: 5 };
        assert_eq!(a.next(Outcome::Listed(vec![stale.clone(), l6(v6("fd00:10:0:5::/64"), &other, 3)]), &mut rng), Step::Delete(stale.key()));
        assert_eq!(a.next(Outcome::Done, &mut rng), Step::Claim(v6("fd00:10:0:1::/64")));
        // Full.
        let tiny = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/120","Backend":{"Type":"vxlan"}}"#);
        let held: Vec<Lease> = (1..4u8).map(|i| l6(v6(&format!("fd00::{:x}/122", i * 64)), &other, 1)).collect();
        let (mut a, _) = Acquisition::start(&tiny, &me, None);
        assert_eq!(a.next(Outcome::Listed(held), &mut rng), Step::Exhausted);
    }
}
