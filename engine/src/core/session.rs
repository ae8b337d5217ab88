//! The replication session: one connection's life, from the link coming up
//! to it going down.
//!
//! ```text
//!   Down ──PeerConnected──► Handshake ──Hello, plan Sender──► AwaitReady ──Ready──► Active(Sender)
//!                               │      └─Hello, plan Receiver─► SendingReady ─Ready sent─► Active(Receiver)
//!                               └─Hello, plan Refuse (or the peer's Refuse)──► Refused
//!   any state ──PeerDisconnected / ResetLink──► Down
//! ```
//!
//! The sender is the authority of the pairing: it streams ring entries and
//! resync extents; the receiver appends and acknowledges. `Refused` lasts
//! until the link goes down (and a new handshake refuses again until an
//! operator resolves it).

use std::collections::VecDeque;

use super::msg::Hello;
use super::types::{GenEntry, ReqHeader, Seq};

/// Which end of an active session this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The authority: streams entries and extents, receives ACKs.
    Sender,
    /// Appends what the sender streams, answers ACK1/ACK2.
    Receiver,
}

/// Where the replication session stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionState {
    Down,
    /// Hello sent; waiting for the peer's.
    Handshake,
    /// Sender: waiting for the receiver's `Ready`.
    AwaitReady,
    /// Receiver: preparing `Ready` (metadata and ring flush pending).
    SendingReady,
    Active(Side),
    /// The handshake refused the pairing (split brain...): the reason.
    Refused(String),
}

impl SessionState {
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionState::Down => "down",
            SessionState::Handshake | SessionState::AwaitReady | SessionState::SendingReady => {
                "handshake"
            }
            SessionState::Active(_) => "active",
            SessionState::Refused(_) => "refused",
        }
    }
}

/// A receiver between the handshake decision and `Ready`.
pub(super) struct PendingReceiver {
    /// Metadata version holding the rollback extents and the role.
    pub gate: u64,
    /// Drop ring entries after this seq.
    pub truncate: Option<Seq>,
    /// The authority's history, adopted once the truncation is durable.
    pub history: Vec<GenEntry>,
}

/// The session and what belongs to it: the peer's hello, the receiver's
/// preparation, the liveness clocks and the received entries not yet
/// appended.
pub(super) struct Session {
    state: SessionState,
    /// The peer's hello of this session (kept after it ends, for `promote`'s
    /// check of a connected primary and the remirror's history).
    pub peer: Option<Hello>,
    /// From the receiver's handshake decision until its `Ready` is about
    /// to go out (or the link goes down; a refusal meanwhile keeps it, so
    /// nothing past the fork executes).
    pub pending: Option<PendingReceiver>,
    /// Counts sessions that reached `Active` (host flushes are resent once
    /// per session).
    pub number: u64,
    pub last_rx_ms: u64,
    pub last_hb_ms: u64,
    /// Since when heartbeats showed the same peer alive with no gap (the
    /// timeout confirm rule).
    pub alive_since_ms: u64,
    /// Received REQs waiting for ring room or the end of a resync.
    pub rx_backlog: VecDeque<(ReqHeader, Vec<u8>)>,
}

impl Session {
    pub fn new(now_ms: u64) -> Self {
        Session {
            state: SessionState::Down,
            peer: None,
            pending: None,
            number: 0,
            last_rx_ms: now_ms,
            last_hb_ms: now_ms,
            alive_since_ms: now_ms,
            rx_backlog: VecDeque::new(),
        }
    }

    pub fn state(&self) -> &SessionState {
        &self.state
    }

    pub fn is_down(&self) -> bool {
        self.state == SessionState::Down
    }

    /// Connected and not refused: heartbeats flow.
    pub fn is_up(&self) -> bool {
        !matches!(self.state, SessionState::Down | SessionState::Refused(_))
    }

    pub fn is_active(&self) -> bool {
        matches!(self.state, SessionState::Active(_))
    }

    pub fn is_active_sender(&self) -> bool {
        self.state == SessionState::Active(Side::Sender)
    }

    pub fn is_active_receiver(&self) -> bool {
        self.state == SessionState::Active(Side::Receiver)
    }

    /// The sender's end from the handshake decision on (awaiting `Ready`
    /// or active).
    pub fn is_sender(&self) -> bool {
        matches!(
            self.state,
            SessionState::AwaitReady | SessionState::Active(Side::Sender)
        )
    }

    /// The link came up: a new handshake begins.
    pub fn connect(&mut self, now_ms: u64) {
        assert!(self.is_down(), "session: connect while {:?}", self.state);
        self.state = SessionState::Handshake;
        self.last_rx_ms = now_ms;
        self.last_hb_ms = now_ms;
        self.alive_since_ms = now_ms;
        self.peer = None;
    }

    /// The link went down: everything of the session goes.
    pub fn disconnect(&mut self) {
        self.state = SessionState::Down;
        self.pending = None;
        self.rx_backlog.clear();
    }

    /// The handshake decided this node sends.
    pub fn await_ready(&mut self) {
        assert_eq!(
            self.state,
            SessionState::Handshake,
            "session: plan outside the handshake"
        );
        self.state = SessionState::AwaitReady;
    }

    /// The handshake decided this node receives, once `pending` is done.
    pub fn prepare_ready(&mut self, pending: PendingReceiver) {
        assert_eq!(
            self.state,
            SessionState::Handshake,
            "session: plan outside the handshake"
        );
        self.state = SessionState::SendingReady;
        self.pending = Some(pending);
    }

    /// Sender: the receiver's `Ready` arrived.
    pub fn ready_received(&mut self) {
        assert_eq!(
            self.state,
            SessionState::AwaitReady,
            "session: Ready while not awaiting it"
        );
        self.state = SessionState::Active(Side::Sender);
        self.number += 1;
    }

    /// Receiver: `Ready` went out.
    pub fn ready_sent(&mut self) {
        assert_eq!(
            self.state,
            SessionState::SendingReady,
            "session: Ready sent out of turn"
        );
        assert!(
            self.pending.is_none(),
            "session: Ready before the receiver's preparation"
        );
        self.state = SessionState::Active(Side::Receiver);
    }

    /// Either node refused the pairing.
    pub fn refuse(&mut self, reason: String) {
        assert!(!self.is_down(), "session: refusal without a link");
        self.state = SessionState::Refused(reason);
    }

    /// The truncation a receiver still has to make before `Ready`, if any.
    pub fn pending_truncate(&self) -> Option<Seq> {
        self.pending.as_ref().and_then(|p| p.truncate)
    }
}
