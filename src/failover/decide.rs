//! The failover agent's decisions: a pure state machine. What the node
//! reports (`NodeView`), what etcd held at the last read (`EtcdView`) and
//! the time (the node's monotonic clock, ms) go in; steps (`Do`) come out.
//! The I/O around it (`super::agent`) carries the steps out and reports
//! their results back (`lease_renewed`, `claim_result`, ...).
//!
//! The rules (quorum of two out of {primary, backup, etcd}):
//! - A primary serves while its lease is valid on its own clock (renewed
//!   less than `lease_ttl - margin` ago) or while the link is up with the
//!   peer as backup. Without either it fences itself: the lease cannot have
//!   expired in etcd yet, so the backup cannot have taken over.
//! - A primary completes no write without the backup before etcd holds the
//!   stale mark, written under its lease (the core's gate asks for it).
//! - A backup takes over only when etcd has expired the primary's lease
//!   (the key is gone), the link has been down for a whole lease TTL, it is
//!   current and etcd does not mark it stale; it wins the key in a
//!   transaction with a generation newer than any recorded in etcd and
//!   promotes to that generation.
//! - Anything etcd holds that does not parse, or names another pair, stops
//!   every promotion (no promotion on doubt) and is shown as the error.

use serde::{Deserialize, Serialize};

/// The primary's key value (under its lease).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    /// The pair's volume uuid (hex): a key of another pair is refused.
    pub pair: String,
    pub node_id: u32,
    pub node_name: String,
    pub generation: u64,
}

/// "Backup `node_id` is stale from `from_seq`", recorded by primary `by`
/// before it completed writes without it, in generation `generation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleMark {
    pub pair: String,
    pub node_id: u32,
    pub from_seq: u64,
    pub generation: u64,
    pub by: u32,
}

/// The highest generation etcd granted (not under a lease: it outlives
/// every primary).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenRecord {
    pub pair: String,
    pub generation: u64,
    pub node_id: u32,
}

/// A key as read: absent, a parsed value with its revision (and lease), or
/// a value the agent cannot trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key<T> {
    Absent,
    Held {
        value: T,
        mod_revision: i64,
        lease: i64,
    },
    Bad(String),
}

impl<T> Key<T> {
    pub fn value(&self) -> Option<&T> {
        match self {
            Key::Held { value, .. } => Some(value),
            _ => None,
        }
    }
    pub fn mod_revision(&self) -> i64 {
        match self {
            Key::Held { mod_revision, .. } => *mod_revision,
            _ => 0,
        }
    }
}

/// Parses a key's JSON value and checks it belongs to this pair.
pub fn parse_key<T: for<'a> Deserialize<'a>>(
    key: &str,
    bytes: &[u8],
    mod_revision: i64,
    lease: i64,
    pair: &str,
    pair_of: impl Fn(&T) -> &str,
) -> Key<T> {
    match serde_json::from_slice::<T>(bytes) {
        Err(e) => Key::Bad(format!(
            "etcd key {key} holds a value that does not parse ({e}): {:?}; no promotion while it \
             does. If no node of this pair wrote it, another program uses this key: give the \
             pair its own failover.key_prefix (or delete the key with `etcdctl del {key}`)",
            String::from_utf8_lossy(&bytes[..bytes.len().min(120)])
        )),
        Ok(v) if pair_of(&v) != pair => Key::Bad(format!(
            "etcd key {key} is held by a node of another pair (volume uuid {}, this pair's is \
             {pair}): two pairs share failover.key_prefix; give each pair its own \
             failover.key_prefix",
            pair_of(&v)
        )),
        Ok(value) => Key::Held {
            value,
            mod_revision,
            lease,
        },
    }
}

/// What etcd held at the last successful read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdView {
    pub leader: Key<Leader>,
    pub generation: Key<GenRecord>,
    pub stale: Key<StaleMark>,
}

impl EtcdView {
    /// The first value that cannot be trusted, if any.
    pub fn doubt(&self) -> Option<String> {
        let bad = |k: Option<&String>| k.cloned();
        bad(match &self.leader {
            Key::Bad(e) => Some(e),
            _ => None,
        })
        .or_else(|| {
            bad(match &self.generation {
                Key::Bad(e) => Some(e),
                _ => None,
            })
        })
        .or_else(|| {
            bad(match &self.stale {
                Key::Bad(e) => Some(e),
                _ => None,
            })
        })
    }
    pub fn max_generation(&self) -> u64 {
        let g = self.generation.value().map_or(0, |g| g.generation);
        let l = self.leader.value().map_or(0, |l| l.generation);
        let s = self.stale.value().map_or(0, |s| s.generation);
        g.max(l).max(s)
    }
}

/// What the node reports (from its status).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub primary: bool,
    pub serving: bool,
    /// The link is up and the handshake done: the peer confirmed its role
    /// (backup when this node is primary).
    pub peer_connected: bool,
    pub generation: u64,
    pub current: bool,
    pub degraded: bool,
    /// The stale mark the core's gate waits for (generation, from seq).
    pub stale_wanted: Option<(u64, u64)>,
    pub self_fenced: bool,
}

/// A step for the I/O layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Do {
    /// Grant a lease and win the leader key in a transaction: the key is
    /// absent (or ours from a lease we lost, at `leader_rev`), and the
    /// generation record is unchanged since the read (`gen_rev`); record
    /// `generation` in both. `promote` afterwards when this node is backup.
    Claim {
        generation: u64,
        leader_rev: i64,
        gen_rev: i64,
        promote: bool,
    },
    /// Send a keep-alive for our lease.
    Renew,
    /// Under our lease: record the backup stale from `from_seq`.
    RecordStale {
        generation: u64,
        from_seq: u64,
    },
    /// Tell the core the mark is recorded (it was already in etcd).
    ConfirmStale {
        generation: u64,
        from_seq: u64,
    },
    /// Under our lease: delete the stale mark (the backup caught up).
    ClearStale,
    /// Delete our leader key and revoke our lease.
    Release,
    /// Promote the node to at least `floor`.
    Promote {
        floor: u64,
    },
    SelfFence(String),
    LiftFence(String),
}

/// The agent's state.
#[derive(Clone, Debug)]
pub struct Brain {
    pub node_id: u32,
    pub lease_ttl_ms: u64,
    /// Our lease id, if one is granted.
    pub lease: Option<i64>,
    /// The leader key names us under `lease`.
    pub holds_key: bool,
    /// When the request of the last successful grant or keep-alive was
    /// sent (ms): etcd expires the lease no earlier than `lease_ttl_ms`
    /// after it received it, which is later.
    pub renewed_at: Option<u64>,
    pub last_renew_try: u64,
    /// etcd's last answer (None before any, or after an error).
    pub etcd: Option<EtcdView>,
    pub etcd_error: Option<String>,
    /// Since when the link is down, on our clock.
    pub link_down_since: Option<u64>,
    /// We won the key as backup: promote to this generation.
    pub promote_pending: Option<u64>,
    /// The node accepted the promotion at this time; it is under way.
    pub promoted_at: Option<u64>,
    pub fenced: Option<String>,
    /// The operator forced this node primary while etcd could not record
    /// it: it serves without a quorum until it holds the key or sees its
    /// peer (the operator's choice, as a forced DRBD primary).
    pub forced: bool,
    /// The last transition and its reason; how many.
    pub last_transition: Option<String>,
    pub transitions: u64,
    /// Say a blocked takeover once, not at every tick.
    said: Option<String>,
}

impl Brain {
    pub fn new(node_id: u32, lease_ttl_ms: u64) -> Self {
        Brain {
            node_id,
            lease_ttl_ms,
            lease: None,
            holds_key: false,
            renewed_at: None,
            last_renew_try: 0,
            etcd: None,
            etcd_error: None,
            link_down_since: None,
            promote_pending: None,
            promoted_at: None,
            fenced: None,
            forced: false,
            last_transition: None,
            transitions: 0,
            said: None,
        }
    }

    /// How long before the lease's expiry (on our clock) a primary that
    /// lost its peer too fences itself: a quarter of the TTL, at least
    /// 250 ms (etcd may expire a lease up to 500 ms late, never early).
    pub fn margin_ms(&self) -> u64 {
        (self.lease_ttl_ms / 4).max(250)
    }

    /// Keep-alives go out five times per TTL.
    pub fn renew_interval_ms(&self) -> u64 {
        self.lease_ttl_ms / 5
    }

    /// The moment (our clock) from which our lease no longer counts.
    pub fn lease_deadline(&self) -> Option<u64> {
        if !self.holds_key {
            return None;
        }
        self.renewed_at
            .map(|t| t + self.lease_ttl_ms - self.margin_ms())
    }

    pub fn lease_valid(&self, now: u64) -> bool {
        self.lease_deadline().is_some_and(|d| now < d)
    }

    pub fn transition(&mut self, what: String) {
        log::warn!("failover: {what}");
        self.last_transition = Some(what);
        self.transitions += 1;
    }

    fn say_once(&mut self, what: String) {
        if self.said.as_ref() != Some(&what) {
            log::warn!("failover: {what}");
            self.said = Some(what);
        }
    }

    // ----- results of the I/O -----

    /// A read of the pair's keys succeeded.
    pub fn etcd_read(&mut self, view: EtcdView) {
        if self.etcd_error.take().is_some() {
            log::info!("failover: etcd answers again");
        }
        // The key is ours only while it names us under our lease.
        let ours = match (&view.leader, self.lease) {
            (Key::Held { value, lease, .. }, Some(l)) => {
                value.node_id == self.node_id && *lease == l
            }
            _ => false,
        };
        if self.holds_key && !ours {
            self.transition(
                "the leader key no longer names this node under its lease (expired or taken)"
                    .into(),
            );
            self.renewed_at = None;
        }
        self.holds_key = ours;
        self.etcd = Some(view);
    }

    /// An etcd request failed (unreachable, timeout, refused).
    pub fn etcd_failed(&mut self, err: String) {
        if self.etcd_error.as_ref() != Some(&err) {
            log::warn!("failover: etcd: {err}");
        }
        self.etcd_error = Some(err);
        self.etcd = None;
    }

    /// A keep-alive sent at `sent_at` was answered: `alive` false when etcd
    /// says the lease is gone.
    pub fn lease_renewed(&mut self, sent_at: u64, alive: bool) {
        if alive {
            if self.holds_key {
                self.renewed_at = Some(self.renewed_at.map_or(sent_at, |t| t.max(sent_at)));
            }
        } else {
            if self.holds_key {
                self.transition("etcd says our lease expired".into());
            }
            self.lease = None;
            self.holds_key = false;
            self.renewed_at = None;
        }
    }

    /// A claim transaction, whose lease grant was sent at `sent_at`, ended.
    pub fn claim_result(
        &mut self,
        sent_at: u64,
        lease: i64,
        won: bool,
        generation: u64,
        promote: bool,
    ) {
        if won {
            self.lease = Some(lease);
            self.holds_key = true;
            self.renewed_at = Some(sent_at);
            self.last_renew_try = sent_at;
            self.transition(format!(
                "won the leader key in generation {generation}{}",
                if promote { "; promoting" } else { "" }
            ));
            if promote {
                self.promote_pending = Some(generation);
            }
        } else {
            self.lease = None;
            self.holds_key = false;
        }
    }

    /// The node answered the promotion.
    pub fn promote_result(&mut self, now: u64, r: &Result<(), String>) {
        self.promote_pending = None;
        match r {
            Ok(()) => self.promoted_at = Some(now),
            Err(e) => self.transition(format!("the node refused the promotion: {e}")),
        }
    }

    /// The key was released (demoted, or a refused promotion).
    pub fn released(&mut self) {
        self.lease = None;
        self.holds_key = false;
        self.renewed_at = None;
        self.promote_pending = None;
    }

    // ----- decisions -----

    /// Whether a primary must fence itself now: no valid lease and no
    /// peer confirmed as backup.
    pub fn must_fence(&self, now: u64, n: &NodeView) -> bool {
        n.primary && !n.peer_connected && !self.lease_valid(now) && !self.forced
    }

    /// What the fence watchdog uses: the lease deadline, `u64::MAX` while
    /// the operator's forced promotion stands.
    pub fn watch_deadline(&self) -> Option<u64> {
        if self.forced {
            Some(u64::MAX)
        } else {
            self.lease_deadline()
        }
    }

    /// One decision pass.
    pub fn step(&mut self, now: u64, n: &NodeView) -> Vec<Do> {
        let mut out = Vec::new();
        if n.peer_connected {
            self.link_down_since = None;
        } else if self.link_down_since.is_none() {
            self.link_down_since = Some(now);
        }
        if self.lease.is_some()
            && self.holds_key
            && now >= self.last_renew_try + self.renew_interval_ms()
        {
            self.last_renew_try = now;
            out.push(Do::Renew);
        }
        if self.forced && (self.holds_key || n.peer_connected) {
            self.forced = false;
            self.transition("the forced primary holds the key or sees its peer again".into());
        }
        if n.primary {
            self.promote_pending = None;
            self.promoted_at = None;
            self.step_primary(now, n, &mut out);
        } else {
            self.step_backup(now, n, &mut out);
        }
        out
    }

    fn step_primary(&mut self, now: u64, n: &NodeView, out: &mut Vec<Do>) {
        // Quorum: our lease, or the peer as backup.
        if self.must_fence(now, n) && self.fenced.is_none() && !n.self_fenced {
            let why = format!(
                "lost both etcd (no valid lease: {}) and the backup (link down): fencing \
                 before the lease can expire in etcd",
                match (self.holds_key, self.renewed_at) {
                    (true, Some(t)) => format!("last renewed {} ms ago", now - t),
                    _ => "this node holds none".to_string(),
                }
            );
            self.transition(why.clone());
            self.fenced = Some(why.clone());
            out.push(Do::SelfFence(why));
        }
        // What etcd says about the key.
        let mut stale_primary = None;
        if let Some(v) = self.etcd.clone() {
            if let Some(d) = v.doubt() {
                self.say_once(d);
            } else {
                match &v.leader {
                    Key::Held { value, .. } if value.node_id != self.node_id => {
                        // A holder in an older generation is stale itself
                        // (it restarted and waits for its peer): wait.
                        if !n.peer_connected && value.generation >= n.generation {
                            stale_primary = Some(format!(
                                "etcd names node {} ({}) primary in generation {}: it took over",
                                value.node_id, value.node_name, value.generation
                            ));
                        }
                    }
                    Key::Held { lease, .. } if Some(*lease) == self.lease => {}
                    leader => {
                        // Absent, or ours from a lease we lost (a restart).
                        let newest = v.max_generation();
                        if newest > n.generation && !n.peer_connected {
                            stale_primary = Some(format!(
                                "etcd records generation {newest}, newer than this node's {}: \
                                 another node was promoted",
                                n.generation
                            ));
                        } else if n.serving || n.peer_connected || n.self_fenced {
                            out.push(Do::Claim {
                                generation: n.generation.max(newest),
                                leader_rev: leader.mod_revision(),
                                gen_rev: v.generation.mod_revision(),
                                promote: false,
                            });
                        }
                    }
                }
                if self.holds_key {
                    if let Some((generation, from_seq)) = n.stale_wanted {
                        match v.stale.value() {
                            Some(s)
                                if s.generation == generation
                                    && s.from_seq == from_seq
                                    && s.by == self.node_id =>
                            {
                                out.push(Do::ConfirmStale {
                                    generation,
                                    from_seq,
                                })
                            }
                            _ if self.lease_valid(now) => out.push(Do::RecordStale {
                                generation,
                                from_seq,
                            }),
                            _ => {}
                        }
                    } else if !n.degraded
                        && n.peer_connected
                        && v.stale.value().is_some_and(|s| s.node_id != self.node_id)
                    {
                        out.push(Do::ClearStale);
                    }
                }
            }
        }
        if let Some(why) = stale_primary {
            if self.fenced.is_none() && !n.self_fenced {
                self.transition(why.clone());
                self.fenced = Some(why.clone());
                out.push(Do::SelfFence(why));
            }
            return;
        }
        if (self.fenced.is_some() || n.self_fenced) && !self.must_fence(now, n) {
            let why = if n.peer_connected {
                "the backup is connected again".to_string()
            } else {
                "the lease is held and renewed again".to_string()
            };
            self.transition(format!("quorum regained ({why}): serving again"));
            self.fenced = None;
            out.push(Do::LiftFence(why));
        }
    }

    fn step_backup(&mut self, now: u64, n: &NodeView, out: &mut Vec<Do>) {
        if self.fenced.is_some() || n.self_fenced {
            self.fenced = None;
            out.push(Do::LiftFence("this node is a backup now".into()));
        }
        if let Some(t) = self.promoted_at {
            if now < t + 30_000 {
                return; // executing what it holds, then primary
            }
            self.promoted_at = None;
            self.transition("the promotion did not complete within 30 s".into());
        }
        if let Some(g) = self.promote_pending {
            if self.holds_key {
                out.push(Do::Promote { floor: g });
                return;
            }
            self.promote_pending = None;
        }
        if self.holds_key {
            // A backup holding the key (a refused promotion, a demote):
            // give it back so that nobody waits on it.
            self.transition("this node is backup and holds the leader key: releasing it".into());
            out.push(Do::Release);
            return;
        }
        let Some(v) = self.etcd.clone() else {
            return;
        };
        if let Some(d) = v.doubt() {
            self.say_once(format!("not taking over: {d}"));
            return;
        }
        if n.peer_connected {
            self.said = None;
            return;
        }
        let blocked = if let Some(l) = v.leader.value() {
            Some(format!(
                "node {} ({}) holds the lease in generation {}",
                l.node_id, l.node_name, l.generation
            ))
        } else if let Some(s) = v.stale.value().filter(|s| s.node_id == self.node_id) {
            Some(format!(
                "etcd marks this node stale from seq {} (recorded by node {} in generation {}): \
                 the primary completed writes it lacks; start the primary again, or accept \
                 losing them with `deltamirror promote --force`",
                s.from_seq, s.by, s.generation
            ))
        } else if !n.current {
            Some(
                "this node has not caught up with the primary since it started, so it may lack \
                 acknowledged writes"
                    .to_string(),
            )
        } else if self
            .link_down_since
            .is_some_and(|t| now < t + self.lease_ttl_ms)
        {
            None // waiting for a whole TTL without the link: nothing to say
        } else {
            let generation = v.max_generation().max(n.generation) + 1;
            self.said = None;
            out.push(Do::Claim {
                generation,
                leader_rev: 0,
                gen_rev: v.generation.mod_revision(),
                promote: true,
            });
            return;
        };
        if let Some(b) = blocked {
            self.say_once(format!(
                "the primary is unreachable but not taking over: {b}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIR: &str = "abcd";

    fn leader(node_id: u32, generation: u64, lease: i64) -> Key<Leader> {
        Key::Held {
            value: Leader {
                pair: PAIR.into(),
                node_id,
                node_name: format!("n{node_id}"),
                generation,
            },
            mod_revision: 5,
            lease,
        }
    }

    fn view(leader: Key<Leader>, gen: u64, stale: Option<StaleMark>) -> EtcdView {
        EtcdView {
            leader,
            generation: Key::Held {
                value: GenRecord {
                    pair: PAIR.into(),
                    generation: gen,
                    node_id: 1,
                },
                mod_revision: 3,
                lease: 0,
            },
            stale: stale.map_or(Key::Absent, |s| Key::Held {
                value: s,
                mod_revision: 4,
                lease: 0,
            }),
        }
    }

    fn primary() -> NodeView {
        NodeView {
            primary: true,
            serving: true,
            peer_connected: true,
            generation: 3,
            ..Default::default()
        }
    }

    fn backup() -> NodeView {
        NodeView {
            primary: false,
            current: true,
            generation: 3,
            ..Default::default()
        }
    }

    /// A primary holding its lease (granted at 0, ttl 1000).
    fn holding() -> Brain {
        let mut b = Brain::new(1, 1000);
        b.claim_result(0, 77, true, 3, false);
        b.etcd_read(view(leader(1, 3, 77), 3, None));
        b
    }

    #[test]
    fn a_primary_with_its_lease_or_its_backup_keeps_serving() {
        let mut b = holding();
        let mut n = primary();
        n.peer_connected = false;
        // Lease valid until 1000 - 250.
        assert!(!b
            .step(700, &n)
            .iter()
            .any(|d| matches!(d, Do::SelfFence(_))));
        // Link up: no fence even with the lease long gone.
        n.peer_connected = true;
        assert!(!b
            .step(5000, &n)
            .iter()
            .any(|d| matches!(d, Do::SelfFence(_))));
    }

    #[test]
    fn a_primary_that_lost_both_fences_before_the_lease_can_expire() {
        let mut b = holding();
        let mut n = primary();
        n.peer_connected = false;
        b.etcd_failed("unreachable".into());
        assert!(b.step(740, &n).is_empty() || !b.must_fence(740, &n));
        let d = b.step(750, &n);
        assert!(d.iter().any(|d| matches!(d, Do::SelfFence(_))), "{d:?}");
        assert!(b.lease_deadline().unwrap() + b.margin_ms() <= 1000);
        // Once only.
        n.self_fenced = true;
        assert!(!b
            .step(800, &n)
            .iter()
            .any(|d| matches!(d, Do::SelfFence(_))));
        // The backup comes back: the fence lifts.
        n.peer_connected = true;
        assert!(b
            .step(900, &n)
            .iter()
            .any(|d| matches!(d, Do::LiftFence(_))));
    }

    #[test]
    fn renewals_push_the_deadline_from_the_time_they_were_sent() {
        let mut b = holding();
        let n = NodeView {
            peer_connected: false,
            ..primary()
        };
        assert_eq!(b.step(200, &n), vec![Do::Renew]);
        b.lease_renewed(200, true);
        assert_eq!(b.lease_deadline(), Some(950));
        // A late answer to an older request never moves it back.
        b.lease_renewed(100, true);
        assert_eq!(b.lease_deadline(), Some(950));
        b.lease_renewed(300, false);
        assert!(!b.lease_valid(301));
        assert!(b.must_fence(301, &n));
    }

    #[test]
    fn the_stale_mark_is_recorded_under_the_lease_then_confirmed() {
        let mut b = holding();
        let mut n = primary();
        n.peer_connected = false;
        n.stale_wanted = Some((4, 100));
        assert!(b.step(10, &n).contains(&Do::RecordStale {
            generation: 4,
            from_seq: 100
        }));
        let mark = StaleMark {
            pair: PAIR.into(),
            node_id: 2,
            from_seq: 100,
            generation: 4,
            by: 1,
        };
        b.etcd_read(view(leader(1, 3, 77), 4, Some(mark.clone())));
        assert!(b.step(20, &n).contains(&Do::ConfirmStale {
            generation: 4,
            from_seq: 100
        }));
        // Without a valid lease, nothing is recorded.
        b.etcd_read(view(leader(1, 3, 77), 3, None));
        assert!(!b
            .step(900, &n)
            .iter()
            .any(|d| matches!(d, Do::RecordStale { .. })));
        // The backup caught up: the mark goes.
        let mut b = holding();
        b.etcd_read(view(leader(1, 3, 77), 4, Some(mark)));
        assert!(b.step(10, &primary()).contains(&Do::ClearStale));
    }

    #[test]
    fn the_backup_takes_over_only_after_expiry_a_whole_ttl_without_link_and_not_stale() {
        let mut b = Brain::new(2, 1000);
        let n = backup();
        b.etcd_read(view(leader(1, 3, 77), 3, None));
        assert!(b.step(0, &n).is_empty(), "the primary holds the lease");
        // The lease expired, but the link went down only 500 ms ago.
        b.etcd_read(view(Key::Absent, 3, None));
        assert!(b.step(500, &n).is_empty());
        let d = b.step(1000, &n);
        assert_eq!(
            d,
            vec![Do::Claim {
                generation: 4,
                leader_rev: 0,
                gen_rev: 3,
                promote: true
            }]
        );
        b.claim_result(1000, 9, true, 4, true);
        b.etcd_read(view(leader(2, 4, 9), 4, None));
        assert!(b.step(1010, &n).contains(&Do::Promote { floor: 4 }));
        // Stale: never.
        let mut b = Brain::new(2, 1000);
        let stale = StaleMark {
            pair: PAIR.into(),
            node_id: 2,
            from_seq: 7,
            generation: 4,
            by: 1,
        };
        b.etcd_read(view(Key::Absent, 4, Some(stale)));
        assert!(b.step(0, &n).is_empty());
        assert!(b.step(10_000, &n).is_empty());
        // Not current, or the link up: never.
        let mut b = Brain::new(2, 1000);
        b.etcd_read(view(Key::Absent, 3, None));
        let mut m = n.clone();
        m.current = false;
        assert!(b.step(0, &m).is_empty() && b.step(10_000, &m).is_empty());
        let mut m = n.clone();
        m.peer_connected = true;
        assert!(b.step(20_000, &m).is_empty());
        // etcd unreachable: never.
        let mut b = Brain::new(2, 1000);
        b.etcd_failed("connection refused".into());
        assert!(b.step(0, &n).is_empty() && b.step(10_000, &n).is_empty());
    }

    #[test]
    fn the_new_generation_is_newer_than_any_in_etcd() {
        let mut b = Brain::new(2, 1000);
        let mut v = view(Key::Absent, 9, None);
        v.stale = Key::Held {
            value: StaleMark {
                pair: PAIR.into(),
                node_id: 1,
                from_seq: 3,
                generation: 12,
                by: 2,
            },
            mod_revision: 1,
            lease: 0,
        };
        b.etcd_read(v);
        b.step(0, &backup());
        let d = b.step(1000, &backup());
        assert!(matches!(d[..], [Do::Claim { generation: 13, .. }]), "{d:?}");
    }

    #[test]
    fn doubtful_keys_stop_every_promotion() {
        let other = parse_key::<Leader>(
            "/k/leader",
            br#"{"pair":"ffff","node_id":1,"node_name":"x","generation":4}"#,
            1,
            1,
            PAIR,
            |l| &l.pair,
        );
        assert!(matches!(&other, Key::Bad(e) if e.contains("another pair")));
        let junk = parse_key::<Leader>("/k/leader", b"node1", 1, 1, PAIR, |l| &l.pair);
        assert!(matches!(&junk, Key::Bad(e) if e.contains("does not parse")));
        for k in [other, junk] {
            let mut b = Brain::new(2, 1000);
            b.etcd_read(view(k, 3, None));
            assert!(b.step(0, &backup()).is_empty());
            assert!(b.step(10_000, &backup()).is_empty());
        }
    }

    #[test]
    fn a_primary_that_sees_a_newer_generation_fences() {
        let mut b = Brain::new(1, 1000);
        let mut n = primary();
        n.peer_connected = false;
        n.serving = false;
        b.etcd_read(view(leader(2, 4, 9), 4, None));
        let d = b.step(0, &n);
        assert!(d.iter().any(|d| matches!(d, Do::SelfFence(_))), "{d:?}");
        assert!(!d
            .iter()
            .any(|d| matches!(d, Do::Claim { .. } | Do::LiftFence(_))));
        // Even with the link back as sender, a fenced primary never claims
        // over the peer's key, and stays fenced while the peer holds it.
        n.self_fenced = true;
        let d = b.step(10, &n);
        assert!(
            !d.iter()
                .any(|d| matches!(d, Do::Claim { .. } | Do::LiftFence(_))),
            "{d:?}"
        );
        // The key gone but generation 4 recorded: still no claim.
        let mut b = Brain::new(1, 1000);
        b.etcd_read(view(Key::Absent, 4, None));
        let d = b.step(0, &n);
        assert!(!d.iter().any(|d| matches!(d, Do::Claim { .. })), "{d:?}");
    }

    #[test]
    fn a_forced_primary_serves_without_quorum_until_it_holds_the_key() {
        let mut b = Brain::new(2, 1000);
        b.etcd_failed("unreachable".into());
        b.forced = true;
        let n = NodeView {
            peer_connected: false,
            generation: 5,
            ..primary()
        };
        assert_eq!(b.watch_deadline(), Some(u64::MAX));
        assert!(!b.must_fence(10_000, &n));
        assert!(b.step(10_000, &n).is_empty());
        // etcd answers: the stale old primary holds the key (generation 3,
        // it waits for its peer): no fence; once the key is ours, the
        // override ends.
        b.etcd_read(view(leader(1, 3, 7), 3, None));
        assert!(!b
            .step(10_100, &n)
            .iter()
            .any(|d| matches!(d, Do::SelfFence(_))));
        b.claim_result(10_200, 8, true, 5, false);
        b.step(10_300, &n);
        assert!(!b.forced);
        assert_eq!(b.watch_deadline(), b.lease_deadline());
    }

    #[test]
    fn a_primary_claims_an_absent_key_in_its_generation() {
        let mut b = Brain::new(1, 1000);
        b.etcd_read(view(Key::Absent, 3, None));
        assert_eq!(
            b.step(0, &primary()),
            vec![Do::Claim {
                generation: 3,
                leader_rev: 0,
                gen_rev: 3,
                promote: false
            }]
        );
    }
}
