//! The node's role: primary or backup (persisted in `Meta::role`), the
//! transition between them in progress, how a primary mirrors (synchronous,
//! degrading, degraded with the backup stale), and the fence after a refused
//! pairing.
//!
//! ```text
//!   Primary: Synchronous ──peer gone past the timeout──► Degrading{meta version}
//!            ──that version durable──► Degraded{sync_from: None}
//!            ──backup near the head──► Degraded{sync_from: Some(next seq)}
//!            ──ACK1 reaches it──► Synchronous{acked_below}
//!   Backup ──promote──► Promoting ──every held entry executed──► Primary
//!   Primary ──demote──► Demoting ──in-flight writes done──► Backup
//! ```

use super::types::{Role, Seq};

/// A role change in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transition {
    Steady,
    /// `promote`: executing every held entry, then a new generation.
    /// `forced`: `promote --force`, recorded as such.
    Promoting {
        forced: bool,
    },
    /// `demote`: finishing in-flight writes, then backup.
    Demoting,
}

/// How a primary completes writes with respect to its backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mirroring {
    /// Every REQ waits for ACK1 before it executes. Seqs below
    /// `acked_below` were acknowledged while catching up from a degraded
    /// stretch and may execute without a new ACK1 (0: none).
    Synchronous { acked_below: Seq },
    /// The peer is gone past the timeout: the new generation and the
    /// backup's stale-from seq are being persisted (metadata `version`);
    /// nothing completes without ACK1 until that is durable.
    Degrading { version: u64, acked_below: Seq },
    /// Writes complete without the backup (recorded durably as stale). Once
    /// the backup is back near the head, seqs from `sync_from` on wait for
    /// ACK1 again; when ACK1 reaches it, the primary is synchronous again.
    Degraded { sync_from: Option<Seq> },
}

impl Mirroring {
    /// Seq `s` may execute (and complete) without ACK1.
    pub fn executes_unacked(self, s: Seq) -> bool {
        match self {
            Mirroring::Synchronous { acked_below } | Mirroring::Degrading { acked_below, .. } => {
                s < acked_below
            }
            Mirroring::Degraded { sync_from: None } => true,
            Mirroring::Degraded { sync_from: Some(n) } => s < n,
        }
    }

    /// The last seq that may execute without ACK1, if any.
    pub fn unacked_through(self) -> Option<Seq> {
        match self {
            Mirroring::Synchronous { acked_below } | Mirroring::Degrading { acked_below, .. } => {
                acked_below.checked_sub(1)
            }
            Mirroring::Degraded { sync_from: None } => Some(Seq::MAX),
            Mirroring::Degraded { sync_from: Some(n) } => n.checked_sub(1),
        }
    }
}

pub(super) struct RoleMachine {
    pub transition: Transition,
    pub mirroring: Mirroring,
    /// A node that (re)started as primary waits for the peer's handshake
    /// before it serves: the peer may have been promoted meanwhile. A
    /// handshake or `promote --force` clears it.
    pub awaiting_peer: bool,
    /// Backup: holds every write the primary may have completed, so a
    /// promote loses nothing. Set once the sender's `InSync` seq is durable
    /// here; false at every start and every new handshake.
    pub current: bool,
    /// The handshake refused the peer (split brain...): this node serves
    /// nothing until an operator resolves it (I6). The reason.
    pub fenced: Option<String>,
    /// Metadata version that made the current role durable.
    pub version: u64,
}

impl RoleMachine {
    /// The role machine of a node that starts as `role`, degraded when its
    /// metadata records the backup as stale.
    pub fn new(role: Role, peer_stale: bool) -> Self {
        RoleMachine {
            transition: Transition::Steady,
            mirroring: if role == Role::Primary && peer_stale {
                Mirroring::Degraded { sync_from: None }
            } else {
                Mirroring::Synchronous { acked_below: 0 }
            },
            awaiting_peer: role == Role::Primary,
            current: false,
            fenced: None,
            version: 0,
        }
    }

    pub fn promoting(&self) -> bool {
        matches!(self.transition, Transition::Promoting { .. })
    }

    pub fn demoting(&self) -> bool {
        self.transition == Transition::Demoting
    }

    pub fn is_degraded(&self) -> bool {
        matches!(self.mirroring, Mirroring::Degraded { .. })
    }

    /// Degrading or degraded: the peer is being, or has been, left behind.
    pub fn leaving_peer(&self) -> bool {
        !matches!(self.mirroring, Mirroring::Synchronous { .. })
    }

    /// Serves host I/O in `role`, with metadata durable through `durable`.
    pub fn serves(&self, role: Role, durable: u64) -> bool {
        self.fenced.is_none()
            && role == Role::Primary
            && self.transition == Transition::Steady
            && !self.awaiting_peer
            && durable >= self.version
    }

    /// The peer is gone past the timeout: `version` will record it stale.
    pub fn degrade(&mut self, version: u64) {
        let Mirroring::Synchronous { acked_below } = self.mirroring else {
            panic!("role: degrading while {:?}", self.mirroring);
        };
        self.mirroring = Mirroring::Degrading {
            version,
            acked_below,
        };
    }

    /// Metadata is durable through `durable`: a pending degrade takes effect.
    pub fn meta_persisted(&mut self, durable: u64) {
        if let Mirroring::Degrading { version, .. } = self.mirroring {
            if durable >= version {
                self.mirroring = Mirroring::Degraded { sync_from: None };
            }
        }
    }

    /// The backup is back near the head: seqs from `next` wait for ACK1.
    pub fn sync_from(&mut self, next: Seq) {
        assert_eq!(
            self.mirroring,
            Mirroring::Degraded { sync_from: None },
            "role: catching up out of turn"
        );
        self.mirroring = Mirroring::Degraded {
            sync_from: Some(next),
        };
    }

    /// ACK1 reached the catch-up point: synchronous again.
    pub fn caught_up(&mut self) {
        let Mirroring::Degraded { sync_from: Some(n) } = self.mirroring else {
            panic!("role: caught up while {:?}", self.mirroring);
        };
        self.mirroring = Mirroring::Synchronous { acked_below: n };
    }

    /// The node becomes (or returns to being) a backup.
    pub fn became_backup(&mut self) {
        self.transition = Transition::Steady;
        self.mirroring = Mirroring::Synchronous { acked_below: 0 };
        self.current = false;
    }

    /// Asserts what no sequence of events may produce.
    pub fn check(&self, role: Role) {
        if role == Role::Backup {
            assert!(
                matches!(self.mirroring, Mirroring::Synchronous { acked_below: 0 }),
                "role: a backup mirrors {:?}",
                self.mirroring
            );
            assert!(!self.demoting(), "role: a backup demoting");
        } else {
            assert!(!self.current, "role: a primary marked current");
        }
    }
}
