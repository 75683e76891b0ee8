//! Foreign changes to our table: another tool deleting or changing it (`nft flush ruleset`,
//! a firewall reload) is seen within milliseconds instead of at the next periodic resync.
//!
//! ```text
//!  any commit ─► kernel announces each changed object on NFNLGRP_NFTABLES, each message
//!                carrying the netlink port of the socket that asked for it
//!                   │  (our own socket in the agent's netns: TableMonitor's thread)
//!                   ▼
//!  ForeignChanges::observe(datagram) (pure)
//!     message about `inet <table>` from a port not ours ─► Change::Foreign { port }
//!     announcements lost (ENOBUFS) ─────────────────────► Change::Lost
//!                   │
//!                   ▼
//!  on_change(Change)  (the agent: next sync is full, now)
//! ```
//!
//! Our own commits come from the ports in [`own_ports`]: the agent's netlink sockets and
//! the `nft` children it runs (whose port is their pid). Ports, not the announced process
//! id, tell them apart: the kernel announces the committing task's pid in the *initial*
//! pid namespace, which a containerised agent cannot compare with its own.
//!
//! Our own big commits are made [`quietly`]: the monitor leaves the group for their
//! duration, so that the kernel builds no announcement of their hundreds of thousands of
//! elements (at 100 000 pods a 494 000-element full sync took 9.8-10.2 s to commit beside
//! the monitor and 0.77-0.93 s without it). What it could miss meanwhile is counted instead:
//!
//! ```text
//!  quietly(netns, commit):  generation g0 ─► monitor leaves the group ─► commit
//!     ─► monitor rejoins ─► generation g1 ─► g1 - g0 > (1 if committed, else 0)?
//!                                             └─ yes ─► Change::Unheard (someone else
//!                                                committed while nobody listened)
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use nix::errno::Errno;

use super::netlink::{self, NFNLGRP_NFTABLES, NetlinkSocket, generation, msg};

/// `NFPROTO_INET`: the family of our table, in each message's `nfgenmsg`.
const NFPROTO_INET: u8 = 1;
/// In every nf_tables message about an object of a table (table, chain, rule, set,
/// element list, object, flowtable), attribute 1 is the table's name.
const TABLE_NAME_ATTRIBUTE: u16 = 1;
/// How many ports of short-lived `nft` children to remember.
const REMEMBERED_CHILD_PORTS: usize = 64;
/// The membership mask of the monitor's socket.
const GROUPS: u32 = 1 << (NFNLGRP_NFTABLES - 1);
/// How long a generation reading may take (it is answered within the request's send).
const GENERATION_TIMEOUT: Duration = Duration::from_secs(2);

/// What the monitor saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A commit we did not make touched our table; `port` sent it.
    Foreign { port: u32 },
    /// Announcements were lost (the socket's buffer overflowed): whether one was foreign
    /// cannot be known.
    Lost,
    /// While the monitor did not listen (one of our own commits made [`quietly`]), `commits`
    /// commits were made that were not ours, to some table: whether one touched ours cannot
    /// be known. Also when what happened meanwhile could not be read at all (`commits` 0).
    Unheard { commits: u32 },
}

/// Decides which announcements are about our table and not of our making (pure). A
/// commit's announcements may span several datagrams; each foreign commit is reported
/// once (its generation ends with a NEWGEN message).
#[derive(Clone, Debug)]
pub struct ForeignChanges {
    table: Vec<u8>,
    reported_this_generation: bool,
}

impl ForeignChanges {
    pub fn new(table: &str) -> Self {
        ForeignChanges { table: table.as_bytes().to_vec(), reported_this_generation: false }
    }

    /// The foreign change the messages of one datagram reveal, if not reported yet.
    pub fn observe(&mut self, datagram: &[u8], is_ours: impl Fn(u32) -> bool) -> Option<Change> {
        let mut found = None;
        for (kind, port, payload) in netlink::messages_with_sender(datagram) {
            match netlink::nftables_message(kind) {
                Some(msg::NEWGEN) => self.reported_this_generation = false,
                Some(_) if !self.reported_this_generation && self.names_our_table(payload) && !is_ours(port) => {
                    self.reported_this_generation = true;
                    found = found.or(Some(Change::Foreign { port }));
                }
                _ => {}
            }
        }
        found
    }

    /// The payload (`nfgenmsg`, then attributes) is about `inet <table>`.
    fn names_our_table(&self, payload: &[u8]) -> bool {
        payload.first() == Some(&NFPROTO_INET)
            && netlink::attributes(payload.get(4..).unwrap_or_default())
                .find(|(kind, _)| *kind == TABLE_NAME_ATTRIBUTE)
                .is_some_and(|(_, name)| name.strip_suffix(&[0]).unwrap_or(name) == self.table.as_slice())
    }
}

/// The netlink ports this process commits nf_tables changes from.
#[derive(Default)]
struct OwnPorts {
    sockets: Vec<u32>,
    children: VecDeque<u32>,
}

fn own_ports() -> std::sync::MutexGuard<'static, OwnPorts> {
    static PORTS: Mutex<OwnPorts> = Mutex::new(OwnPorts { sockets: Vec::new(), children: VecDeque::new() });
    PORTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remembers the port of one of our long-lived netlink sockets.
pub fn note_own_socket(port: u32) {
    let mut ports = own_ports();
    if !ports.sockets.contains(&port) {
        ports.sockets.push(port);
    }
}

/// Remembers an `nft` child we started: libnftables binds its socket to the process's pid.
pub fn note_own_child(pid: u32) {
    let mut ports = own_ports();
    if ports.children.len() == REMEMBERED_CHILD_PORTS {
        ports.children.pop_front();
    }
    ports.children.push_back(pid);
}

/// Whether `port` is one of ours.
pub fn is_own_port(port: u32) -> bool {
    let ports = own_ports();
    ports.sockets.contains(&port) || ports.children.contains(&port)
}

/// Listens for foreign changes on its own thread until dropped.
pub struct TableMonitor {
    _listener: crate::nft::backend::netlink::Listener,
    hearing: Arc<Hearing>,
}

impl TableMonitor {
    /// Starts listening in `netns` (the current one if `None`) for changes to `inet table`.
    /// `on_change` runs on the monitor's thread, or on the thread of a commit made
    /// [`quietly`] (for [`Change::Unheard`]).
    pub fn start(
        netns: Option<&str>,
        table: &str,
        on_change: impl FnMut(Change) + Send + 'static,
    ) -> std::io::Result<TableMonitor> {
        let socket = Arc::new(NetlinkSocket::open(netns, GROUPS)?);
        // Wakes the thread now and then to see whether it should stop.
        socket.set_receive_timeout(Duration::from_millis(200))?;
        let asker = NetlinkSocket::open(netns, 0)?;
        asker.set_receive_timeout(GENERATION_TIMEOUT)?;
        let hearing = Arc::new(Hearing {
            netns: netns.map(String::from),
            socket: Arc::clone(&socket),
            asker: Mutex::new(asker),
            seq: AtomicU32::new(1),
            deaf: Mutex::new(0),
            on_change: Mutex::new(Box::new(on_change)),
            datagrams: AtomicU64::new(0),
        });
        let mut changes = ForeignChanges::new(table);
        let mut buf = vec![0u8; 256 * 1024];
        let heard = Arc::clone(&hearing);
        let listener = crate::nft::backend::netlink::Listener::spawn("table-monitor", move || {
            match socket.recv(&mut buf, true) {
                Ok(Some(n)) => {
                    heard.datagrams.fetch_add(1, Ordering::Relaxed);
                    if let Some(change) = changes.observe(&buf[..n], is_own_port) {
                        heard.report(change);
                    }
                }
                Ok(None) | Err(Errno::EINTR) => {}
                Err(Errno::ENOBUFS) => heard.report(Change::Lost),
                Err(e) => {
                    tracing::warn!("the nf_tables monitor stopped: {e}; foreign changes wait for the periodic resync");
                    return std::ops::ControlFlow::Break(());
                }
            }
            std::ops::ControlFlow::Continue(())
        })?;
        hearings().push(Arc::downgrade(&hearing));
        Ok(TableMonitor { _listener: listener, hearing })
    }

    /// How many datagrams of announcements the monitor has read (each holds one or more).
    pub fn datagrams_heard(&self) -> u64 {
        self.hearing.datagrams.load(Ordering::Relaxed)
    }
}

/// A monitor as a quiet commit sees it: its socket (to leave the group and rejoin it) and a
/// socket of its own to read generations with.
struct Hearing {
    netns: Option<String>,
    socket: Arc<NetlinkSocket>,
    asker: Mutex<NetlinkSocket>,
    seq: AtomicU32,
    /// How many quiet commits are under way (the group is left while any is).
    deaf: Mutex<u32>,
    on_change: Mutex<Box<dyn FnMut(Change) + Send>>,
    datagrams: AtomicU64,
}

impl Hearing {
    fn report(&self, change: Change) {
        (self.on_change.lock().unwrap_or_else(|e| e.into_inner()))(change);
    }

    fn generation(&self) -> Result<u32, Errno> {
        let asker = self.asker.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        generation::current(&asker, seq, GENERATION_TIMEOUT)
    }

    fn deafen(&self) -> std::io::Result<()> {
        let mut deaf = self.deaf.lock().unwrap_or_else(|e| e.into_inner());
        if *deaf == 0 {
            self.socket.set_groups(0)?;
        }
        *deaf += 1;
        Ok(())
    }

    fn listen(&self) -> std::io::Result<()> {
        let mut deaf = self.deaf.lock().unwrap_or_else(|e| e.into_inner());
        *deaf = deaf.saturating_sub(1);
        if *deaf == 0 { self.socket.set_groups(GROUPS) } else { Ok(()) }
    }
}

/// The monitors started in this process and not yet dropped.
fn hearings() -> std::sync::MutexGuard<'static, Vec<Weak<Hearing>>> {
    static HEARINGS: Mutex<Vec<Weak<Hearing>>> = Mutex::new(Vec::new());
    let mut hearings = HEARINGS.lock().unwrap_or_else(|e| e.into_inner());
    hearings.retain(|h| h.strong_count() > 0);
    hearings
}

/// Runs `commit`, one commit of ours in `netns` (`None`: this one), while the monitors
/// there do not listen, and reports to them [`Change::Unheard`] when someone else committed
/// meanwhile (a commit that fails is taken for none). For commits so big that announcing
/// them costs more than what a missed foreign commit costs (a full sync), the only thing
/// the monitors could miss: the caller decides which.
pub fn quietly<T, E>(netns: Option<&str>, commit: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let listening: Vec<Arc<Hearing>> =
        hearings().iter().filter_map(Weak::upgrade).filter(|h| h.netns.as_deref() == netns).collect();
    // Each monitor's generation is read before it leaves the group: a foreign commit between
    // the two is both heard and counted (reported twice, never missed).
    let deafened: Vec<(Arc<Hearing>, u32)> = listening
        .into_iter()
        .filter_map(|hearing| {
            let before = hearing.generation().ok()?;
            hearing.deafen().ok()?;
            Some((hearing, before))
        })
        .collect();
    let result = commit();
    for (hearing, before) in deafened {
        let rejoined = hearing.listen();
        let after = hearing.generation();
        if let Err(e) = &rejoined {
            tracing::warn!(
                "the nf_tables monitor could not rejoin its group: {e}; foreign changes wait for the periodic resync"
            );
        }
        if let Some(change) = unheard(before, after.ok().filter(|_| rejoined.is_ok()), result.is_ok()) {
            hearing.report(change);
        }
    }
    result
}

/// What a monitor missed while it did not listen (pure): generation `before` it left,
/// `after` it rejoined (`None`: unknown), and whether our own commit went through.
fn unheard(before: u32, after: Option<u32>, committed: bool) -> Option<Change> {
    let Some(after) = after else { return Some(Change::Unheard { commits: 0 }) };
    // The kernel skips 0 when its counter wraps.
    let commits = after.wrapping_sub(before) - u32::from(after < before);
    let others = commits.saturating_sub(u32::from(committed));
    (others > 0).then_some(Change::Unheard { commits: others })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message: header (with the sender's port), nfgenmsg, attributes.
    fn message(kind: u16, port: u32, family: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        for (t, v) in attrs {
            let len = 4 + v.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(v);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&((10u16 << 8) | kind).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&port.to_ne_bytes());
        m.extend_from_slice(&body);
        m
    }

    const OURS: u32 = 4242;
    fn ours(port: u32) -> bool {
        port == OURS
    }

    #[test]
    fn a_foreign_deletion_of_our_table_is_a_foreign_change_reported_once_per_commit() {
        let mut changes = ForeignChanges::new("netpol");
        let deletions = [
            message(msg::DELSET, 999, NFPROTO_INET, &[(1, b"netpol\0"), (2, b"peers4_x\0")]),
            message(msg::DELTABLE, 999, NFPROTO_INET, &[(1, b"netpol\0")]),
        ]
        .concat();
        assert_eq!(changes.observe(&deletions, ours), Some(Change::Foreign { port: 999 }));
        let rest_of_the_commit =
            [message(msg::DELCHAIN, 999, NFPROTO_INET, &[(1, b"netpol\0")]), message(msg::NEWGEN, 999, 0, &[])]
                .concat();
        assert_eq!(changes.observe(&rest_of_the_commit, ours), None, "the same commit, in a second datagram");
        let next_commit = message(msg::DELTABLE, 1000, NFPROTO_INET, &[(1, b"netpol\0")]);
        assert_eq!(changes.observe(&next_commit, ours), Some(Change::Foreign { port: 1000 }));
    }

    #[test]
    fn our_own_commits_and_other_tables_are_not_foreign_changes() {
        let mut changes = ForeignChanges::new("netpol");
        let own = [
            message(msg::NEWSETELEM, OURS, NFPROTO_INET, &[(1, b"netpol\0"), (2, b"peers4_x\0")]),
            message(msg::NEWGEN, OURS, 0, &[]),
        ]
        .concat();
        assert_eq!(changes.observe(&own, ours), None);
        let other_table = message(msg::NEWRULE, 999, NFPROTO_INET, &[(1, b"firewalld\0")]);
        assert_eq!(changes.observe(&other_table, ours), None);
        let other_family = message(msg::DELTABLE, 999, 2, &[(1, b"netpol\0")]);
        assert_eq!(changes.observe(&other_family, ours), None, "ip netpol is not inet netpol");
        let prefix = message(msg::DELTABLE, 999, NFPROTO_INET, &[(1, b"netpol2\0")]);
        assert_eq!(changes.observe(&prefix, ours), None);
    }

    #[test]
    fn a_foreign_message_after_our_own_in_one_datagram_is_found() {
        let datagram = [
            message(msg::NEWRULE, OURS, NFPROTO_INET, &[(1, b"netpol\0")]),
            message(msg::DELCHAIN, 7, NFPROTO_INET, &[(1, b"netpol\0"), (3, b"ingress\0")]),
        ]
        .concat();
        assert_eq!(ForeignChanges::new("netpol").observe(&datagram, ours), Some(Change::Foreign { port: 7 }));
    }

    #[test]
    fn a_quiet_commit_heard_nothing_it_should_have_when_only_it_moved_the_generation() {
        assert_eq!(unheard(41, Some(42), true), None, "our own commit");
        assert_eq!(unheard(41, Some(41), false), None, "our commit refused, nobody else's");
        assert_eq!(unheard(41, Some(43), true), Some(Change::Unheard { commits: 1 }));
        assert_eq!(unheard(41, Some(42), false), Some(Change::Unheard { commits: 1 }), "refused, yet a commit");
        assert_eq!(unheard(u32::MAX, Some(1), true), None, "across the wrap, which skips 0");
        assert_eq!(unheard(u32::MAX - 1, Some(1), true), Some(Change::Unheard { commits: 1 }));
        assert_eq!(unheard(41, None, true), Some(Change::Unheard { commits: 0 }), "unknown is not nothing");
    }

    #[test]
    fn nft_children_and_sockets_we_noted_are_ours() {
        note_own_socket(3_000_001);
        note_own_child(3_000_002);
        assert!(is_own_port(3_000_001) && is_own_port(3_000_002));
        assert!(!is_own_port(3_000_003));
        for pid in 0..REMEMBERED_CHILD_PORTS as u32 {
            note_own_child(4_000_000 + pid);
        }
        assert!(!is_own_port(3_000_002), "only the latest children are remembered");
        assert!(is_own_port(3_000_001), "sockets are remembered for good");
    }
}
