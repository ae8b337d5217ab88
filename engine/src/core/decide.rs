//! The handshake decision: a pure function of the two nodes' `Hello`s.
//!
//! Both nodes run it on (own hello, peer hello) and reach mirror-image
//! conclusions, so no further negotiation is needed. The rules:
//!
//! 1. A node with an empty history holds a new disk: the other node is the
//!    authority and sends a full remirror. Two new disks are refused.
//! 2. Histories that are not a prefix of one another diverge: both nodes
//!    accepted writes in conflicting generations (split brain). Refused; the
//!    operator chooses the survivor (invariant I5).
//! 3. A history that extends the other wins: that node is the authority. The
//!    other drops its ring entries from the fork seq on (they were never
//!    acknowledged by the authority, so never completed to a host) and asks
//!    for their extents to be rewritten, since a backup may have executed them.
//! 4. Equal histories: the primary is the authority (two backups: the longer
//!    ring, then the lower node id). The other drops entries beyond the
//!    authority's head (a primary's torn ring tail lost them before they were
//!    executed anywhere the host could see).

use super::msg::Hello;
use super::types::{Role, Seq};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// This node is the authority: it sends the peer what it misses.
    Sender,
    /// This node receives: drop ring entries after `truncate_to`, adopt the
    /// authority's history, become (or stay) backup.
    Receiver { truncate_to: Seq },
    /// Refuse the pairing; the operator must decide.
    Refuse(String),
}

/// A node's history from the fork point on, bounded: at most the last
/// three generations, with a count of those left out.
fn history_str(h: &Hello, fork: usize) -> String {
    let branch = &h.history[fork.min(h.history.len())..];
    let shown = &branch[branch.len().saturating_sub(3)..];
    let mut s = shown
        .iter()
        .map(|g| format!("gen {} from seq {} (node {})", g.gen, g.first_seq, g.origin))
        .collect::<Vec<_>>()
        .join(", ");
    if branch.len() > shown.len() {
        s = format!("{} more, then {s}", branch.len() - shown.len());
    }
    s
}

pub fn decide(local: &Hello, peer: &Hello) -> Plan {
    if local.node_id == peer.node_id {
        return Plan::Refuse(format!(
            "both nodes have node.id = {}; give the two nodes different ids",
            local.node_id
        ));
    }
    let (l_new, p_new) = (local.history.is_empty(), peer.history.is_empty());
    match (l_new, p_new) {
        (true, true) => {
            return Plan::Refuse(
                "both disks are new (formatted with --replace): format one node without --replace"
                    .into(),
            )
        }
        (true, false) => return Plan::Receiver { truncate_to: 0 },
        (false, true) => return Plan::Sender,
        _ => {}
    }
    let k = local
        .history
        .iter()
        .zip(&peer.history)
        .take_while(|(a, b)| a == b)
        .count();
    if k < local.history.len() && k < peer.history.len() {
        let fork_seq = local.history[k].first_seq.min(peer.history[k].first_seq);
        return Plan::Refuse(format!(
            "split brain: both nodes accepted writes in diverging generations after \
             generation {} (fork at seq {fork_seq}; this node: {}; peer: {}). Choose the \
             survivor, then run `deltamirror format --replace --force` on the other node",
            k.checked_sub(1).map_or(0, |i| local.history[i].gen),
            history_str(local, k),
            history_str(peer, k)
        ));
    }
    // `true` when the local node is the authority.
    let (local_wins, fork_head) = if local.history.len() > k {
        (true, local.history[k].first_seq - 1)
    } else if peer.history.len() > k {
        (false, peer.history[k].first_seq - 1)
    } else {
        let local_wins = match (local.role, peer.role) {
            (Role::Primary, Role::Backup) => true,
            (Role::Backup, Role::Primary) => false,
            (Role::Primary, Role::Primary) => {
                return Plan::Refuse(
                    "both nodes are primary in the same generation; demote one of them".into(),
                )
            }
            (Role::Backup, Role::Backup) => {
                (local.head, std::cmp::Reverse(local.node_id))
                    > (peer.head, std::cmp::Reverse(peer.node_id))
            }
        };
        (local_wins, if local_wins { local.head } else { peer.head })
    };
    if local_wins {
        Plan::Sender
    } else {
        Plan::Receiver {
            truncate_to: local.head.min(fork_head),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::GenEntry;

    fn hello(id: u32, role: Role, hist: &[(u64, u64, u32)], head: Seq) -> Hello {
        Hello {
            node_id: id,
            role,
            history: hist
                .iter()
                .map(|&(gen, first_seq, origin)| GenEntry {
                    gen,
                    first_seq,
                    origin,
                })
                .collect(),
            head,
            first: 1,
            fresh: hist.is_empty(),
            resyncing: false,
            incarnation: 1,
            failover: 0,
        }
    }

    fn both(a: &Hello, b: &Hello) -> (Plan, Plan) {
        (decide(a, b), decide(b, a))
    }

    #[test]
    fn equal_histories_primary_is_authority_and_backup_tail_is_dropped() {
        let p = hello(1, Role::Primary, &[(1, 1, 0)], 10);
        let b = hello(2, Role::Backup, &[(1, 1, 0)], 12);
        assert_eq!(
            both(&p, &b),
            (Plan::Sender, Plan::Receiver { truncate_to: 10 })
        );
    }

    #[test]
    fn promoted_backup_wins_and_old_primary_drops_unacked_tail() {
        let old = hello(1, Role::Primary, &[(1, 1, 0)], 110);
        let new = hello(2, Role::Primary, &[(1, 1, 0), (2, 106, 2)], 130);
        assert_eq!(
            both(&old, &new),
            (Plan::Receiver { truncate_to: 105 }, Plan::Sender)
        );
    }

    #[test]
    fn diverging_generations_are_split_brain() {
        let a = hello(1, Role::Primary, &[(1, 1, 0), (2, 50, 1)], 60);
        let b = hello(2, Role::Primary, &[(1, 1, 0), (2, 48, 2)], 70);
        let (x, y) = both(&a, &b);
        assert!(matches!(x, Plan::Refuse(ref r) if r.contains("split brain")));
        assert!(matches!(y, Plan::Refuse(_)));
    }

    #[test]
    fn split_brain_reason_stays_short_after_many_failovers() {
        let mut common: Vec<(u64, u64, u32)> = (1..=40).map(|g| (g, g * 10, 1)).collect();
        let mut a = common.clone();
        a.extend((41..=45).map(|g| (g, g * 10, 1)));
        common.extend((41..=43).map(|g| (g, g * 10 + 1, 2)));
        let x = hello(1, Role::Primary, &a, 500);
        let y = hello(2, Role::Primary, &common, 450);
        let Plan::Refuse(r) = decide(&x, &y) else {
            panic!("not refused")
        };
        assert!(r.len() < 450, "{} bytes: {r}", r.len());
        assert!(r.contains("after generation 40"), "{r}");
        assert!(r.contains("fork at seq 410"), "{r}");
        assert!(r.contains("2 more, then gen 43 from seq 430"), "{r}");
    }

    #[test]
    fn new_disk_gets_full_copy_and_two_new_disks_are_refused() {
        let a = hello(1, Role::Primary, &[(1, 1, 0)], 5);
        let n = hello(2, Role::Backup, &[], 0);
        assert_eq!(
            both(&a, &n),
            (Plan::Sender, Plan::Receiver { truncate_to: 0 })
        );
        assert!(matches!(
            decide(&n, &hello(1, Role::Backup, &[], 0)),
            Plan::Refuse(_)
        ));
    }

    #[test]
    fn two_backups_longer_ring_wins() {
        let a = hello(1, Role::Backup, &[(1, 1, 0)], 5);
        let b = hello(2, Role::Backup, &[(1, 1, 0)], 9);
        assert_eq!(
            both(&a, &b),
            (Plan::Receiver { truncate_to: 5 }, Plan::Sender)
        );
    }
}
