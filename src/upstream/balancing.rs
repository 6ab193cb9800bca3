//! Load balancing: how one endpoint is picked among those a request may use.
//!
//! ```text
//! round_robin           the next usable endpoint in turn
//! weighted_round_robin  smooth weighted order (nginx's), so a heavy endpoint's turns are
//!                       spread out
//! random                weighted by each endpoint's weight
//! least_connections     fewest open requests and streams (ties rotate): what spreads
//!                       long-lived event streams evenly
//! consistent_hash       Ketama ring (pingora-ketama) over `hash_key`; a key whose endpoint
//!                       cannot be used falls through to the next node on the ring
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use pingora_ketama::{Bucket, Continuum};
use serde::Deserialize;

/// How an endpoint is chosen: `services.<name>.load_balancing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    Random,
    LeastConnections,
    ConsistentHash,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::Random => "random",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::ConsistentHash => "consistent_hash",
        }
    }
}

/// `hash_key:` what `consistent_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum HashKey {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Path,
}

impl TryFrom<String> for HashKey {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, String> {
        match raw.split_once(':') {
            None if raw == "client_ip" => Ok(HashKey::ClientIp),
            None if raw == "path" => Ok(HashKey::Path),
            Some(("header", name)) => http::HeaderName::from_bytes(name.trim().as_bytes())
                .map(HashKey::Header)
                .map_err(|_| format!("`{name}` is not a header name")),
            Some(("cookie", name)) if !name.trim().is_empty() => {
                Ok(HashKey::Cookie(name.trim().to_string()))
            }
            _ => Err(format!(
                "unknown hash key `{raw}`: use client_ip, header:NAME, cookie:NAME or path"
            )),
        }
    }
}

/// Points a weight unit gets on pingora-ketama's ring (its `POINT_MULTIPLE`).
const RING_POINTS_PER_WEIGHT: usize = 160;

/// What is derived from one membership for picking: weights in order, the weighted
/// schedule and the hash ring.
pub struct Plan {
    /// Each member's address and weight, in membership order.
    members: Vec<(SocketAddr, usize)>,
    /// Indices into `members`, each repeated by its weight (interleaved).
    weighted: Vec<usize>,
    ring: Option<Continuum>,
}

impl Plan {
    pub fn new(algorithm: Algorithm, members: Vec<(SocketAddr, usize)>) -> Self {
        let weighted = interleave(&members.iter().map(|(_, w)| *w).collect::<Vec<_>>());
        let ring = (algorithm == Algorithm::ConsistentHash).then(|| {
            let buckets: Vec<Bucket> = members
                .iter()
                .map(|(addr, w)| Bucket::new(*addr, (*w).clamp(1, u32::MAX as usize) as u32))
                .collect();
            Continuum::new(&buckets)
        });
        Plan {
            members,
            weighted,
            ring,
        }
    }

    /// Picks a member index with `algorithm`. `turn` rotates the round-robin orders, `key`
    /// is the consistent-hash input, `open(i)` is member `i`'s open count, and only members
    /// for which `usable(i)` holds are picked.
    pub fn pick(
        &self,
        algorithm: Algorithm,
        turn: usize,
        key: &[u8],
        open: impl Fn(usize) -> usize,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let weight = |i: usize| self.members[i].1.max(1);
        match algorithm {
            Algorithm::RoundRobin => (0..n).map(|k| (turn + k) % n).find(|&i| usable(i)),
            Algorithm::WeightedRoundRobin => {
                let w = &self.weighted;
                (0..w.len())
                    .map(|k| w[(turn + k) % w.len()])
                    .find(|&i| usable(i))
            }
            Algorithm::Random => {
                let total: usize = (0..n).filter(|&i| usable(i)).map(weight).sum();
                if total == 0 {
                    return None;
                }
                let mut pick = fastrand::usize(0..total);
                (0..n).filter(|&i| usable(i)).find(|&i| {
                    if pick < weight(i) {
                        true
                    } else {
                        pick -= weight(i);
                        false
                    }
                })
            }
            Algorithm::LeastConnections => (0..n)
                .map(|k| (turn + k) % n)
                .filter(|&i| usable(i))
                .min_by_key(|&i| open(i)),
            Algorithm::ConsistentHash => self.ring.as_ref().and_then(|ring| {
                // The ring's iterator wraps around forever: one lap is enough.
                let points: usize = (0..n).map(weight).sum();
                ring.node_iter(key)
                    .take(points.saturating_mul(RING_POINTS_PER_WEIGHT))
                    .find_map(|addr| (0..n).find(|&i| self.members[i].0 == *addr && usable(i)))
            }),
        }
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

/// A shared, immutable plan.
pub type SharedPlan = Arc<Plan>;

/// Indices `0..weights.len()` each repeated `weight` times, spread out (smooth weighted
/// round robin, as nginx does it), so a heavy endpoint does not take its turns in a row.
fn interleave(weights: &[usize]) -> Vec<usize> {
    let weights: Vec<i64> = weights.iter().map(|w| (*w).clamp(1, 1000) as i64).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_spreads_weights() {
        assert_eq!(interleave(&[1, 1]), vec![0, 1]);
        assert_eq!(interleave(&[3, 1]), vec![0, 0, 1, 0]);
        let five = interleave(&[5, 1, 1]);
        assert_eq!(five, vec![0, 0, 1, 0, 2, 0, 0], "nginx's order");
    }

    #[test]
    fn hash_keys_parse() {
        assert_eq!(HashKey::try_from("path".to_string()), Ok(HashKey::Path));
        assert_eq!(
            HashKey::try_from("cookie: sid".to_string()),
            Ok(HashKey::Cookie("sid".into()))
        );
        assert!(HashKey::try_from("header:bad name".to_string()).is_err());
        assert!(HashKey::try_from("nope".to_string()).is_err());
    }
}
