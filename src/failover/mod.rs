//! Automatic failover with an etcd lease (`failover.mode = "etcd"`).
//!
//! A control thread (`dm-failover`) runs the agent on its own small tokio
//! runtime (current-thread): the `etcd-client` crate needs one. It never
//! touches the data path: it reads the node's status and sends it commands
//! (`NodeControl::failover`), as the admin endpoint does. The decisions are
//! the pure state machine in [`decide`]; this module does the etcd I/O.
//! A second thread (`dm-fence-watch`) checks every 10 ms whether a primary
//! lost both its lease and its backup, so a hung etcd request never delays
//! the self-fence.
//!
//! Keys, under `failover.key_prefix` (JSON values):
//! - `<prefix>/leader`: the primary (node, generation), under its lease.
//! - `<prefix>/generation`: the highest generation granted (no lease).
//! - `<prefix>/stale`: "backup N stale from seq S", written by the primary
//!   under its lease (a transaction that checks the leader key's lease)
//!   before it completes a write without the backup; deleted once the backup
//!   caught up.

pub mod clock;
pub mod decide;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use engine::node::NodeControl;
use engine::status::{Control, FailoverCommand, FailoverStatus, NodeStatus, VerifyRequest};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp,
};

use crate::config::Config;
use decide::{Brain, Do, EtcdView, GenRecord, Key, Leader, NodeView, StaleMark};

/// What the agent needs from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub lease_ttl_ms: u64,
    pub pair: String,
    pub node_id: u32,
    pub node_name: String,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            endpoints: cfg.failover.etcd_endpoints.clone(),
            prefix: cfg.failover_key_prefix(),
            lease_ttl_ms: cfg.failover.lease_ttl_ms,
            pair: cfg
                .volume_uuid_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            node_id: cfg.node.id,
            node_name: cfg.node.name.clone(),
        }
    }
    fn leader_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }
    fn gen_key(&self) -> String {
        format!("{}/generation", self.prefix)
    }
    fn stale_key(&self) -> String {
        format!("{}/stale", self.prefix)
    }
    /// Each etcd request gives up after this: a tenth of the TTL (at most
    /// 1 s), so the agent's decisions never wait long.
    fn op_timeout(&self) -> Duration {
        Duration::from_millis((self.lease_ttl_ms / 10).clamp(100, 1000))
    }
}

/// An operator's `promote` in etcd mode, answered by the agent.
struct PromoteRequest {
    force: bool,
    reply: mpsc::Sender<Result<(), String>>,
}

/// The running agent.
pub struct Failover {
    status: Arc<Mutex<FailoverStatus>>,
    requests: Mutex<mpsc::Sender<PromoteRequest>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Failover {
    /// Starts the agent and its fence watchdog for `node`.
    pub fn start(s: Settings, node: Arc<NodeControl>) -> std::io::Result<Failover> {
        let status = Arc::new(Mutex::new(FailoverStatus {
            mode: "etcd".into(),
            key: s.leader_key(),
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        // The lease deadline on our clock (u64::MAX: none), for the watchdog.
        let deadline = Arc::new(Mutex::new(None::<u64>));
        let (tx, rx) = mpsc::channel();
        let agent = {
            let (status, stop, deadline, node) =
                (status.clone(), stop.clone(), deadline.clone(), node.clone());
            std::thread::Builder::new()
                .name("dm-failover".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            log::error!("failover: cannot start the agent's runtime: {e}");
                            return;
                        }
                    };
                    let mut a = Agent {
                        brain: Brain::new(s.node_id, s.lease_ttl_ms),
                        s,
                        node,
                        client: None,
                        turn: 0,
                        keeper: None,
                        status,
                        deadline,
                    };
                    rt.block_on(a.run(&stop, &rx));
                })?
        };
        let watch = {
            let (stop, deadline) = (stop.clone(), deadline.clone());
            std::thread::Builder::new()
                .name("dm-fence-watch".into())
                .spawn(move || watchdog(&node, &deadline, &stop))?
        };
        Ok(Failover {
            status,
            requests: Mutex::new(tx),
            stop,
            threads: vec![agent, watch],
        })
    }

    pub fn status(&self) -> FailoverStatus {
        self.status.lock().unwrap().clone()
    }

    /// The operator's `promote`: through etcd when it answers.
    pub fn promote(&self, force: bool) -> Result<(), String> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .lock()
            .unwrap()
            .send(PromoteRequest { force, reply })
            .map_err(|_| "the failover agent stopped".to_string())?;
        answer
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the failover agent did not answer within 30 s".to_string())?
    }

    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Fences a primary that lost both its lease (on our clock) and its
/// backup, independently of the agent's etcd requests.
fn watchdog(node: &NodeControl, deadline: &Mutex<Option<u64>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
        let st = node.published_status();
        if st.role.is_empty() {
            continue; // no status published yet
        }
        let n = node_view(&st);
        let d = *deadline.lock().unwrap();
        let now = clock::now_ms();
        if n.primary && !n.peer_connected && !n.self_fenced && d.is_none_or(|d| now >= d) {
            let why = format!(
                "lost both etcd ({}) and the backup (link down): fencing before the lease can \
                 expire in etcd",
                if d.is_some() {
                    "the lease was not renewed in time"
                } else {
                    "this node holds no lease"
                }
            );
            log::warn!("failover: {why}");
            if let Err(e) = node.failover(FailoverCommand::SelfFence(why)) {
                log::error!("failover: the node did not take the fence: {e}");
            }
        }
    }
}

pub fn node_view(st: &NodeStatus) -> NodeView {
    NodeView {
        primary: st.role == "primary",
        serving: st.serving,
        peer_connected: matches!(st.peer_state.as_str(), "connected" | "replaying"),
        generation: st.generation,
        current: st.current,
        degraded: st.degraded,
        stale_wanted: st
            .stale_mark_wanted
            .as_ref()
            .map(|w| (w.generation, w.from_seq)),
        self_fenced: st.self_fenced_reason.is_some(),
    }
}

struct Agent {
    s: Settings,
    brain: Brain,
    node: Arc<NodeControl>,
    /// A client of one member: `s.endpoints[turn % len]`.
    client: Option<Client>,
    /// Advanced on every failed request, so the next client talks to the
    /// next member.
    turn: usize,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    status: Arc<Mutex<FailoverStatus>>,
    deadline: Arc<Mutex<Option<u64>>>,
}

/// `fut` bounded by the agent's request timeout, errors as text.
async fn bounded<T>(
    d: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(d, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {} ms", d.as_millis())),
    }
}

impl Agent {
    async fn run(&mut self, stop: &AtomicBool, requests: &mpsc::Receiver<PromoteRequest>) {
        log::info!(
            "failover: automatic failover through etcd {:?}, key {}, lease {} ms",
            self.s.endpoints,
            self.s.leader_key(),
            self.s.lease_ttl_ms
        );
        let tick = Duration::from_millis((self.s.lease_ttl_ms / 50).clamp(10, 100));
        while !stop.load(Ordering::Acquire) {
            self.read().await;
            let st = self.node.published_status();
            if st.role.is_empty() {
                // The node has not published its first status yet.
                tokio::time::sleep(tick).await;
                continue;
            }
            let n = node_view(&st);
            if let Ok(r) = requests.try_recv() {
                let answer = self.operator_promote(r.force, &n).await;
                let _ = r.reply.send(answer);
            }
            let now = clock::now_ms();
            for d in self.brain.step(now, &n) {
                self.carry_out(d).await;
            }
            self.publish();
            tokio::time::sleep(tick).await;
        }
    }

    async fn client(&mut self) -> Result<Client, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let t = self.s.op_timeout();
        let opts = ConnectOptions::new()
            .with_connect_timeout(t)
            .with_timeout(t);
        // One member at a time, not the client's balance over all of them:
        // that kept sending a share of the requests to a member that was
        // down (each failing, often the lease's keep-alive, until the lease
        // lapsed with two healthy members left). A failure moves on to the
        // next member (`failed`).
        let member = self.member(0).to_string();
        let c = bounded(t, "connecting", Client::connect([member], Some(opts)))
            .await
            .map_err(|e| self.explain(e))?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// The member the agent talks to now failed with `e`: says which, and
    /// that the next request tries the next member.
    fn explain(&self, e: String) -> String {
        let member = self.member(0);
        let next = if self.s.endpoints.len() > 1 {
            format!("; the next request tries {}", self.member(1))
        } else {
            String::new()
        };
        format!(
            "etcd member {member} unreachable or not etcd ({e}){next}; check \
             failover.etcd_endpoints (client URLs of the etcd members, e.g. \
             http://10.0.0.1:2379) and that etcd runs"
        )
    }

    /// The member the agent talks to (`ahead` = 0), or the one it moves to
    /// after `ahead` more failures.
    fn member(&self, ahead: usize) -> &str {
        let all = &self.s.endpoints;
        &all[self.turn.wrapping_add(ahead) % all.len()]
    }

    fn failed(&mut self, e: String) {
        self.client = None;
        self.turn = self.turn.wrapping_add(1);
        self.keeper = None;
        self.brain.etcd_failed(e);
    }

    /// Reads the pair's keys.
    async fn read(&mut self) {
        let mut c = match self.client().await {
            Ok(c) => c,
            Err(e) => return self.failed(e),
        };
        let t = self.s.op_timeout();
        let r = bounded(
            t,
            "reading the pair's keys",
            c.get(
                format!("{}/", self.s.prefix),
                Some(GetOptions::new().with_prefix()),
            ),
        )
        .await;
        let resp = match r {
            Ok(r) => r,
            Err(e) => {
                let e = self.explain(e);
                return self.failed(e);
            }
        };
        let mut v = EtcdView {
            leader: Key::Absent,
            generation: Key::Absent,
            stale: Key::Absent,
        };
        let pair = self.s.pair.clone();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).to_string();
            let (rev, lease) = (kv.mod_revision(), kv.lease());
            if key == self.s.leader_key() {
                v.leader =
                    decide::parse_key::<Leader>(&key, kv.value(), rev, lease, &pair, |x| &x.pair);
            } else if key == self.s.gen_key() {
                v.generation =
                    decide::parse_key::<GenRecord>(&key, kv.value(), rev, lease, &pair, |x| {
                        &x.pair
                    });
            } else if key == self.s.stale_key() {
                v.stale =
                    decide::parse_key::<StaleMark>(&key, kv.value(), rev, lease, &pair, |x| {
                        &x.pair
                    });
            }
        }
        self.brain.etcd_read(v);
    }

    async fn carry_out(&mut self, d: Do) {
        let r = match d {
            Do::Claim {
                generation,
                leader_rev,
                gen_rev,
                promote,
            } => self.claim(generation, leader_rev, gen_rev, promote).await,
            Do::Renew => self.renew().await,
            Do::RecordStale {
                generation,
                from_seq,
            } => self.record_stale(generation, from_seq).await,
            Do::ConfirmStale {
                generation,
                from_seq,
            } => {
                self.command(FailoverCommand::StaleRecorded {
                    gen: generation,
                    from_seq,
                });
                Ok(())
            }
            Do::ClearStale => self.clear_stale().await,
            Do::Release => self.release().await,
            Do::Promote { floor } => {
                let r = self.node.failover(FailoverCommand::PromoteTo {
                    force: false,
                    floor,
                });
                self.brain.promote_result(clock::now_ms(), &r);
                if r.is_err() {
                    self.release().await
                } else {
                    Ok(())
                }
            }
            Do::SelfFence(why) => {
                self.command(FailoverCommand::SelfFence(why));
                Ok(())
            }
            Do::LiftFence(why) => {
                self.command(FailoverCommand::LiftFence(why));
                Ok(())
            }
        };
        if let Err(e) = r {
            self.failed(e);
        }
    }

    fn command(&self, c: FailoverCommand) {
        if let Err(e) = self.node.failover(c.clone()) {
            log::warn!("failover: the node refused {c:?}: {e}");
        }
    }

    fn leader_value(&self, generation: u64) -> String {
        serde_json::to_string(&Leader {
            pair: self.s.pair.clone(),
            node_id: self.s.node_id,
            node_name: self.s.node_name.clone(),
            generation,
        })
        .expect("JSON")
    }

    fn gen_value(&self, generation: u64) -> String {
        serde_json::to_string(&GenRecord {
            pair: self.s.pair.clone(),
            generation,
            node_id: self.s.node_id,
        })
        .expect("JSON")
    }

    /// Grants a lease and wins the leader key in one transaction.
    async fn claim(
        &mut self,
        generation: u64,
        leader_rev: i64,
        gen_rev: i64,
        promote: bool,
    ) -> Result<(), String> {
        let mut c = self.client().await?;
        let t = self.s.op_timeout();
        let sent = clock::now_ms();
        let ttl_s = (self.s.lease_ttl_ms / 1000) as i64;
        let lease = bounded(t, "granting a lease", c.lease_grant(ttl_s, None))
            .await?
            .id();
        let (lk, gk) = (self.s.leader_key(), self.s.gen_key());
        let rev_is = |k: &str, rev: i64| {
            if rev == 0 {
                Compare::create_revision(k, CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(k, CompareOp::Equal, rev)
            }
        };
        let txn = Txn::new()
            .when([rev_is(&lk, leader_rev), rev_is(&gk, gen_rev)])
            .and_then([
                TxnOp::put(
                    lk.clone(),
                    self.leader_value(generation),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(gk, self.gen_value(generation), None),
            ]);
        let won = bounded(t, "claiming the leader key", c.txn(txn))
            .await?
            .succeeded();
        if !won {
            let _ = bounded(t, "revoking an unused lease", c.lease_revoke(lease)).await;
            log::info!("failover: the leader key changed meanwhile; not claimed");
        }
        self.keeper = None;
        self.brain
            .claim_result(sent, lease, won, generation, promote);
        Ok(())
    }

    async fn renew(&mut self) -> Result<(), String> {
        let Some(lease) = self.brain.lease else {
            return Ok(());
        };
        let mut c = self.client().await?;
        let t = self.s.op_timeout();
        let sent = clock::now_ms();
        if self.keeper.is_none() {
            self.keeper =
                Some(bounded(t, "opening a keep-alive", c.lease_keep_alive(lease)).await?);
        }
        let (keeper, stream) = self.keeper.as_mut().unwrap();
        let r = async {
            bounded(t, "renewing the lease", keeper.keep_alive()).await?;
            bounded(t, "renewing the lease", stream.message()).await
        }
        .await;
        match r {
            Ok(Some(resp)) => {
                self.brain.lease_renewed(sent, resp.ttl() > 0);
                Ok(())
            }
            Ok(None) => {
                self.keeper = None;
                Err("the keep-alive stream ended".into())
            }
            Err(e) => {
                // A late answer would be taken for a newer request's.
                self.keeper = None;
                Err(e)
            }
        }
    }

    /// Under our lease: "backup stale from `from_seq`".
    async fn record_stale(&mut self, generation: u64, from_seq: u64) -> Result<(), String> {
        let Some(lease) = self.brain.lease else {
            return Ok(());
        };
        let mut c = self.client().await?;
        let t = self.s.op_timeout();
        let mark = StaleMark {
            pair: self.s.pair.clone(),
            node_id: 3 - self.s.node_id,
            from_seq,
            generation,
            by: self.s.node_id,
        };
        let newest = self
            .brain
            .etcd
            .as_ref()
            .map_or(0, |v| v.max_generation())
            .max(generation);
        let txn = Txn::new()
            .when([Compare::lease(self.s.leader_key(), CompareOp::Equal, lease)])
            .and_then([
                TxnOp::put(
                    self.s.stale_key(),
                    serde_json::to_string(&mark).expect("JSON"),
                    None,
                ),
                TxnOp::put(self.s.gen_key(), self.gen_value(newest), None),
            ]);
        let ok = bounded(t, "recording the stale mark", c.txn(txn))
            .await?
            .succeeded();
        if ok {
            self.brain.transition(format!(
                "recorded in etcd: backup node {} stale from seq {from_seq} (generation \
                 {generation}); writes may complete without it",
                mark.node_id
            ));
            self.command(FailoverCommand::StaleRecorded {
                gen: generation,
                from_seq,
            });
        } else {
            log::warn!(
                "failover: the stale mark was not recorded: our lease no longer holds the key"
            );
        }
        Ok(())
    }

    async fn clear_stale(&mut self) -> Result<(), String> {
        let Some(lease) = self.brain.lease else {
            return Ok(());
        };
        let mut c = self.client().await?;
        let t = self.s.op_timeout();
        let txn = Txn::new()
            .when([Compare::lease(self.s.leader_key(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(self.s.stale_key(), None)]);
        if bounded(t, "clearing the stale mark", c.txn(txn))
            .await?
            .succeeded()
        {
            self.brain
                .transition("the backup caught up: stale mark cleared in etcd".into());
        }
        Ok(())
    }

    async fn release(&mut self) -> Result<(), String> {
        let Some(lease) = self.brain.lease else {
            self.brain.released();
            return Ok(());
        };
        let mut c = self.client().await?;
        let t = self.s.op_timeout();
        let txn = Txn::new()
            .when([Compare::lease(self.s.leader_key(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(self.s.leader_key(), None)]);
        bounded(t, "releasing the leader key", c.txn(txn)).await?;
        let _ = bounded(t, "revoking the lease", c.lease_revoke(lease)).await;
        self.keeper = None;
        self.brain.released();
        Ok(())
    }

    /// `deltamirror promote` on this node in etcd mode.
    async fn operator_promote(&mut self, force: bool, n: &NodeView) -> Result<(), String> {
        if n.primary {
            // Fenced or waiting primaries: the core decides (force).
            return self
                .node
                .failover(FailoverCommand::PromoteTo { force, floor: 0 });
        }
        let view = self.brain.etcd.clone().filter(|v| v.doubt().is_none());
        let Some(v) = view else {
            let why = self
                .brain
                .etcd_error
                .clone()
                .or_else(|| self.brain.etcd.as_ref().and_then(|v| v.doubt()))
                .unwrap_or_else(|| "etcd was not read yet".into());
            if !force {
                return Err(format!(
                    "automatic failover cannot record the new generation in etcd: {why}. If the \
                     primary is surely down, `deltamirror promote --force` promotes without etcd"
                ));
            }
            let msg = format!(
                "promote --force without etcd ({why}): the new generation is not recorded \
                 there; this node serves without a quorum (the operator's choice) and claims \
                 the key with it once etcd answers"
            );
            self.brain.transition(msg);
            self.force_override();
            let r = self
                .node
                .failover(FailoverCommand::PromoteTo { force, floor: 0 });
            if r.is_err() {
                self.brain.forced = false;
            }
            return r;
        };
        let generation = v.max_generation().max(n.generation) + 1;
        if let Some(l) = v.leader.value() {
            if l.node_id != self.s.node_id {
                if !force {
                    return Err(format!(
                        "node {} ({}) holds the etcd lease in generation {}: it is alive and \
                         primary; demote it first (or wait for its lease to expire)",
                        l.node_id, l.node_name, l.generation
                    ));
                }
                self.brain.transition(format!(
                    "promote --force while node {} holds the etcd lease: generation {generation} \
                     is not recorded in etcd",
                    l.node_id
                ));
                self.force_override();
                let r = self.node.failover(FailoverCommand::PromoteTo {
                    force,
                    floor: generation,
                });
                if r.is_err() {
                    self.brain.forced = false;
                }
                return r;
            }
        }
        self.claim(
            generation,
            v.leader.mod_revision(),
            v.generation.mod_revision(),
            false,
        )
        .await?;
        if !self.brain.holds_key {
            return Err("the leader key changed in etcd meanwhile; try again".into());
        }
        let r = self.node.failover(FailoverCommand::PromoteTo {
            force,
            floor: generation,
        });
        self.brain.promote_result(clock::now_ms(), &r);
        if r.is_err() {
            let _ = self.release().await;
        }
        r
    }

    /// The operator forced a promotion etcd cannot record: no self-fence
    /// for lack of a quorum (the watchdog included) until the node holds
    /// the key or sees its peer.
    fn force_override(&mut self) {
        self.brain.forced = true;
        *self.deadline.lock().unwrap() = self.brain.watch_deadline();
    }

    fn publish(&mut self) {
        let now = clock::now_ms();
        let b = &self.brain;
        *self.deadline.lock().unwrap() = b.watch_deadline();
        let mut st = self.status.lock().unwrap();
        let leader = b.etcd.as_ref().and_then(|v| v.leader.value().cloned());
        st.lease_holder = leader
            .as_ref()
            .map_or(String::new(), |l| l.node_name.clone());
        st.lease_holder_node_id = leader.as_ref().map(|l| l.node_id);
        st.lease_generation = leader.as_ref().map(|l| l.generation);
        st.holds_lease = b.holds_key;
        st.lease_left_ms = match (b.holds_key, b.renewed_at) {
            (true, Some(t)) => (t + b.lease_ttl_ms).saturating_sub(now),
            _ => 0,
        };
        st.last_renewal_ms_ago = b.renewed_at.map(|t| now.saturating_sub(t));
        st.etcd_generation = b.etcd.as_ref().map(|v| v.max_generation());
        st.etcd_reachable = b.etcd_error.is_none() && b.etcd.is_some();
        st.etcd_error = b
            .etcd_error
            .clone()
            .or_else(|| b.etcd.as_ref().and_then(|v| v.doubt()));
        st.stale_mark = b.etcd.as_ref().and_then(|v| v.stale.value()).map(|s| {
            format!(
                "backup node {} stale from seq {} (generation {}, recorded by node {})",
                s.node_id, s.from_seq, s.generation, s.by
            )
        });
        st.last_transition = b.last_transition.clone();
        st.transitions = b.transitions;
    }
}

/// The admin endpoint's view of a node with automatic failover: its status
/// carries the agent's, and `promote` goes through etcd.
pub struct FailoverControl {
    pub node: Arc<NodeControl>,
    pub agent: Failover,
}

impl Control for FailoverControl {
    fn status(&self) -> NodeStatus {
        let mut s = self.node.status();
        let mut f = self.agent.status();
        f.fenced = s.self_fenced_reason.is_some();
        f.fenced_reason = s.self_fenced_reason.clone();
        s.failover = Some(f);
        s
    }
    fn promote(&self, force: bool) -> Result<(), String> {
        self.agent.promote(force)
    }
    fn demote(&self) -> Result<(), String> {
        self.node.demote()
    }
    fn reset_latency(&self) -> Result<(), String> {
        self.node.reset_latency()
    }
    fn verify(&self, req: VerifyRequest) -> Result<(), String> {
        self.node.verify(req)
    }
}
