//! The live connections of a listener, as mechanism: admits a new one (past
//! `server.max_connections` or the address's cap, by closing the first
//! connection in the order [`policy::ShedKey`] sets), tracks what each is
//! doing (request in flight, idle keep-alive, request head arriving, and how
//! many bytes of it), tells a connection to close, and knows when its request
//! head is overdue ([`policy::HeadRule`]). It decides nothing itself and
//! knows no HTTP: the server marks requests in flight and applies the closing.
//!
//! An address at its cap with no idle keep-alive connection to close does not
//! close its oldest waiting head for the newcomer: the newcomer waits in the
//! address's queue (an accepted socket, nothing read) and takes the first
//! slot the address frees. A flood from one address that reconnects when cut
//! would otherwise turn every new connection into a cut and a reconnect, a
//! storm everyone else's connections queue behind in the listen backlog.
//! Queued connections count against `max_connections` like served ones:
//! each holds a descriptor.
//!
//! The connections that may be closed are kept sorted by that order (and by
//! address and that order), updated as each changes phase, so a new client is
//! admitted in logarithmic time however many connections are held: a flood
//! of tens of thousands of connections, each new one making room, must not
//! cost a pass over all of them.

pub mod policy;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, Notify};

use crate::config::ServerConfig;
use policy::{HeadRule, Phase, ShedKey, View};

/// A client address as the per-address cap counts it: IPv4 whole, IPv6 by
/// /64 (what one host can easily hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrKey(u128);

impl AddrKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(u128::from(u32::from(v4))),
                None => Self((u128::from(v6) >> 64) | (1 << 127)),
            },
        }
    }
}

/// The connections of one listener.
pub struct Table {
    shared: Arc<Shared>,
    epoch: Instant,
    max: usize,
    per_address: usize,
    head: HeadRule,
}

/// What the table and its connections share: a connection changing phase
/// re-sorts itself.
struct Shared {
    inner: Mutex<Inner>,
    /// Woken when a connection ends or a request finishes.
    room: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Inner {
    next: u64,
    conns: HashMap<u64, Entry>,
    /// Connections not told to close.
    live: usize,
    per_address: HashMap<AddrKey, usize>,
    /// The connections that may be closed for another, first to close first.
    order: BTreeSet<(ShedKey, u64)>,
    /// The same, by address.
    by_address: BTreeSet<(AddrKey, ShedKey, u64)>,
    /// Connections waiting for a slot of their address, first come first.
    queued: HashMap<AddrKey, VecDeque<oneshot::Sender<Slot>>>,
    /// How many wait in `queued` (some may have given up).
    queued_count: usize,
}

struct Entry {
    conn: Arc<Conn>,
    /// Its place in `order` and `by_address`; `None` while busy or once shed.
    key: Option<ShedKey>,
}

/// One connection's state, shared by its task, its stream and its requests.
pub struct Conn {
    id: u64,
    addr: AddrKey,
    epoch: Instant,
    in_flight: AtomicU32,
    /// Whether a request was answered on it (so silence is keep-alive).
    served: AtomicBool,
    /// Bytes received since the last request ended (or the connection began).
    head_bytes: AtomicU64,
    /// When the current phase began, in microseconds since `epoch`.
    since_us: AtomicU64,
    shed: AtomicBool,
    /// HTTP/2: its frames between requests (window updates, pings) are no
    /// request head, so its bytes are not counted.
    h2: AtomicBool,
    close: Notify,
    table: Weak<Shared>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address holds its cap of connections, none idle, and the
    /// listener holds `max_connections` (served and queued).
    AddressFull,
    /// The listener holds `max_connections` (served and queued), every
    /// served one busy.
    Full,
}

/// A connection the table took: served now, or waiting for a slot of its
/// address.
pub enum Admission {
    Now(Slot),
    Queued(oneshot::Receiver<Slot>),
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Now(_) => "Now",
            Self::Queued(_) => "Queued",
        })
    }
}

impl Admission {
    /// Its slot, waiting at most `patience` for one; `None` when none came
    /// (the connection is then closed, as a head that never came would be).
    pub async fn slot(self, patience: Duration) -> Option<Slot> {
        match self {
            Self::Now(slot) => Some(slot),
            Self::Queued(rx) => tokio::time::timeout(patience, rx).await.ok()?.ok(),
        }
    }
}

impl Table {
    pub fn new(limits: &ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner::default()),
                room: Notify::new(),
            }),
            epoch: Instant::now(),
            max: limits.max_connections.max(1),
            per_address: limits.max_connections_per_address,
            head: HeadRule {
                grace: limits.header_grace,
                min_rate: limits.header_min_rate.0,
                max: limits.header_read_timeout,
            },
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Waits until a new connection can be admitted: below the cap, or some
    /// connection is not busy and can be closed for it.
    pub async fn room(&self) {
        loop {
            let notified = self.shared.room.notified();
            {
                let mut inner = self.lock();
                if inner.held(self.max) < self.max || !inner.order.is_empty() {
                    return;
                }
            }
            // The notification covers requests ending; the timer, anything missed.
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    /// Admits a connection from `ip`, closing the victims that makes room
    /// for, or queues it behind its address's connections; the slot is held
    /// for as long as the connection lives.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refused> {
        let addr = AddrKey::of(ip);
        let mut inner = self.lock();
        if self.per_address > 0
            && inner.per_address.get(&addr).copied().unwrap_or(0) >= self.per_address
        {
            let idle = inner
                .by_address
                .range((addr, ShedKey::FIRST, 0)..=(addr, ShedKey::LAST, u64::MAX))
                .next()
                .filter(|&&(_, key, _)| key.is_idle())
                .map(|&(_, _, id)| id);
            match idle {
                Some(id) => inner.shed(id),
                None if inner.held(self.max) < self.max => {
                    let (tx, rx) = oneshot::channel();
                    inner.queued.entry(addr).or_default().push_back(tx);
                    inner.queued_count += 1;
                    return Ok(Admission::Queued(rx));
                }
                None => return Err(Refused::AddressFull),
            }
        }
        if inner.held(self.max) >= self.max {
            match inner.order.first().map(|&(_, id)| id) {
                Some(id) => inner.shed(id),
                None => return Err(Refused::Full),
            }
        }
        Ok(Admission::Now(self.slot(&mut inner, addr)))
    }

    /// A new slot for a connection from `addr`, counted in.
    fn slot(self: &Arc<Self>, inner: &mut Inner, addr: AddrKey) -> Slot {
        inner.next += 1;
        let conn = Arc::new(Conn {
            id: inner.next,
            addr,
            epoch: self.epoch,
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            head_bytes: AtomicU64::new(0),
            since_us: AtomicU64::new(micros(self.now())),
            shed: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            close: Notify::new(),
            table: Arc::downgrade(&self.shared),
        });
        inner.conns.insert(
            conn.id,
            Entry {
                conn: conn.clone(),
                key: None,
            },
        );
        inner.resort(conn.id);
        inner.live += 1;
        *inner.per_address.entry(addr).or_insert(0) += 1;
        Slot {
            table: self.clone(),
            conn,
        }
    }

    /// Gives the slots `addr` has room for to the connections queued for
    /// it, first come first. Returns the slots of those that gave up
    /// meanwhile, to be dropped once the lock is released.
    fn hand_over(self: &Arc<Self>, inner: &mut Inner, addr: AddrKey) -> Vec<Slot> {
        let mut unwanted = Vec::new();
        loop {
            let held = inner.per_address.get(&addr).copied().unwrap_or(0);
            if held >= self.per_address || inner.live >= self.max {
                break;
            }
            let Some(waiter) = inner.queued.get_mut(&addr).and_then(VecDeque::pop_front) else {
                break;
            };
            inner.queued_count -= 1;
            if waiter.is_closed() {
                continue;
            }
            let slot = self.slot(inner, addr);
            if let Err(slot) = waiter.send(slot) {
                unwanted.push(slot);
            }
        }
        if inner.queued.get(&addr).is_some_and(VecDeque::is_empty) {
            inner.queued.remove(&addr);
        }
        unwanted
    }

    /// Connections open, and of them those told to close but not closed yet.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.conns.len(), inner.conns.len() - inner.live)
    }

    /// Completes when `conn`'s request head is overdue by the head rule;
    /// never while a request is in flight or the connection idles between
    /// requests (hyper's header read timeout bounds that).
    pub async fn head_overdue(&self, conn: &Conn) {
        loop {
            let view = conn.view();
            let wait = match view.phase {
                Phase::Head => {
                    let due = view.since + self.head.allowed(conn.head_bytes());
                    match due.checked_sub(self.now()) {
                        None | Some(Duration::ZERO) => return,
                        Some(left) => left,
                    }
                }
                Phase::Busy | Phase::Idle => self.head.grace.min(self.head.max),
            };
            tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
        }
    }
}

impl Inner {
    fn shed(&mut self, id: u64) {
        self.unsort(id);
        if let Some(Entry { conn: c, .. }) = self.conns.get(&id) {
            if !c.shed.swap(true, Ordering::SeqCst) {
                self.live -= 1;
                if let Some(n) = self.per_address.get_mut(&c.addr) {
                    *n -= 1;
                }
                c.close.notify_one();
            }
        }
    }

    /// Connections held, each with its descriptor: served, and queued for a
    /// slot of their address (those that gave up are forgotten first when
    /// the sum reaches `max`).
    fn held(&mut self, max: usize) -> usize {
        if self.live + self.queued_count >= max {
            self.prune_queued();
        }
        self.live + self.queued_count
    }

    /// Forgets the queued connections that gave up waiting; returns how
    /// many still wait.
    fn prune_queued(&mut self) -> usize {
        self.queued.retain(|_, q| {
            q.retain(|w| !w.is_closed());
            !q.is_empty()
        });
        self.queued_count = self.queued.values().map(VecDeque::len).sum();
        self.queued_count
    }

    /// Takes connection `id` out of the order of closing.
    fn unsort(&mut self, id: u64) {
        if let Some(e) = self.conns.get_mut(&id) {
            if let Some(key) = e.key.take() {
                self.order.remove(&(key, id));
                self.by_address.remove(&(e.conn.addr, key, id));
            }
        }
    }

    /// Puts connection `id` where its phase now places it in the order of
    /// closing (out of it while busy or once shed).
    fn resort(&mut self, id: u64) {
        let Some(e) = self.conns.get_mut(&id) else {
            return;
        };
        let key = if e.conn.is_shed() {
            None
        } else {
            ShedKey::of(e.conn.view())
        };
        if key == e.key {
            return;
        }
        let addr = e.conn.addr;
        if let Some(old) = std::mem::replace(&mut e.key, key) {
            self.order.remove(&(old, id));
            self.by_address.remove(&(addr, old, id));
        }
        if let Some(new) = key {
            self.order.insert((new, id));
            self.by_address.insert((addr, new, id));
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Conn {
    fn is_shed(&self) -> bool {
        self.shed.load(Ordering::SeqCst)
    }

    fn head_bytes(&self) -> u64 {
        self.head_bytes.load(Ordering::Relaxed)
    }

    /// What the shedding sees of it.
    pub fn view(&self) -> View {
        let phase = if self.in_flight.load(Ordering::SeqCst) > 0 {
            Phase::Busy
        } else if self.served.load(Ordering::Relaxed) && self.head_bytes() == 0 {
            Phase::Idle
        } else {
            Phase::Head
        };
        View {
            phase,
            since: Duration::from_micros(self.since_us.load(Ordering::Relaxed)),
        }
    }

    /// Changes its phase by `change`, under the table's lock when there is
    /// a table, and re-sorts it there: the admission never sees a phase
    /// without its place.
    fn change(&self, change: impl FnOnce(&Self)) {
        match self.table.upgrade() {
            Some(table) => {
                let mut inner = table.lock();
                change(self);
                inner.resort(self.id);
            }
            None => change(self),
        }
    }

    /// A request's head arrived: the connection is busy until the guard drops.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.change(|c| {
            c.in_flight.fetch_add(1, Ordering::SeqCst);
            c.head_bytes.store(0, Ordering::Relaxed);
        });
        Busy(self.clone())
    }

    /// Completes when the table closed it for a new client.
    pub async fn closed_for_another(&self) {
        self.close.notified().await;
    }

    fn received(&self, n: usize) {
        if self.in_flight.load(Ordering::SeqCst) == 0 && !self.h2.load(Ordering::Relaxed) {
            let before = self.head_bytes.fetch_add(n as u64, Ordering::Relaxed);
            if before == 0 && self.served.load(Ordering::Relaxed) {
                // A keep-alive connection's next head began: no longer idle.
                self.change(|_| {});
            }
        }
    }
}

/// A request in flight on a connection; its end makes the connection idle.
pub struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut last = false;
        self.0.change(|c| {
            c.head_bytes.store(0, Ordering::Relaxed);
            c.since_us
                .store(micros(c.epoch.elapsed()), Ordering::Relaxed);
            c.served.store(true, Ordering::Relaxed);
            last = c.in_flight.fetch_sub(1, Ordering::SeqCst) == 1;
        });
        if let (true, Some(table)) = (last, self.0.table.upgrade()) {
            table.room.notify_waiters();
        }
    }
}

/// The table's hold on one connection, released when it ends.
pub struct Slot {
    table: Arc<Table>,
    conn: Arc<Conn>,
}

impl Slot {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.table.lock();
        let addr = self.conn.addr;
        inner.unsort(self.conn.id);
        inner.conns.remove(&self.conn.id);
        if !self.conn.is_shed() {
            inner.live -= 1;
            if let Some(n) = inner.per_address.get_mut(&self.conn.addr) {
                *n -= 1;
            }
        }
        let unwanted = if inner.queued.contains_key(&addr) {
            self.table.hand_over(&mut inner, addr)
        } else {
            Vec::new()
        };
        if inner.per_address.get(&addr) == Some(&0) {
            inner.per_address.remove(&addr);
        }
        drop(inner);
        drop(unwanted);
        self.table.shared.room.notify_waiters();
    }
}

/// A connection's stream, counting the bytes of request heads it receives.
pub struct Counted<S> {
    inner: S,
    conn: Arc<Conn>,
    first: bool,
}

impl<S> Counted<S> {
    pub fn new(inner: S, conn: Arc<Conn>) -> Self {
        Self {
            inner,
            conn,
            first: true,
        }
    }
}

/// The start of HTTP/2's connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2";

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            if std::mem::take(&mut self.first) {
                let got = &buf.filled()[before..];
                let m = got.len().min(H2_PREFACE.len());
                if got[..m] == H2_PREFACE[..m] {
                    self.conn.h2.store(true, Ordering::Relaxed);
                }
            }
            self.conn.received(n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request in flight until it is done.
pub struct InFlight<B> {
    inner: B,
    _busy: Busy,
}

impl<B> InFlight<B> {
    pub fn new(inner: B, busy: Busy) -> Self {
        Self { inner, _busy: busy }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for InFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_address: usize) -> ServerConfig {
        ServerConfig {
            max_connections: max,
            max_connections_per_address: per_address,
            ..ServerConfig::default()
        }
    }

    fn now(table: &Arc<Table>, ip: IpAddr) -> Slot {
        match table.admit(ip) {
            Ok(Admission::Now(slot)) => slot,
            other => panic!("admitted now: {other:?}"),
        }
    }

    /// The slot a queued connection is handed, within a second.
    async fn handed(rx: oneshot::Receiver<Slot>) -> Slot {
        tokio::time::timeout(Duration::from_secs(1), rx)
            .await
            .expect("handed a slot")
            .expect("a slot")
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[tokio::test]
    async fn at_the_cap_the_oldest_idle_connection_is_closed_and_busy_ones_never() {
        let table = Table::new(&limits(2, 0));
        let first = now(&table, A);
        let second = now(&table, A);
        let _busy = second.conn().begin();
        drop(first.conn().begin()); // answered one request: idle keep-alive
        let third = now(&table, B);
        assert!(first.conn().is_shed(), "the idle one made room");
        assert!(!second.conn().is_shed());
        assert_eq!(table.counts(), (3, 1));
        tokio::time::timeout(Duration::from_secs(1), first.conn().closed_for_another())
            .await
            .expect("the victim is told");
        drop(first);
        assert_eq!(table.counts(), (2, 0));
        let _b = third.conn().begin();
        assert_eq!(table.admit(B).err(), Some(Refused::Full), "all busy");
    }

    #[tokio::test]
    async fn a_keep_alive_connection_whose_next_head_began_is_no_longer_idle() {
        let table = Table::new(&limits(3, 0));
        let older = now(&table, A);
        let newer = now(&table, A);
        let head = now(&table, B);
        drop(older.conn().begin());
        drop(newer.conn().begin());
        // Both idle; the older one's next request starts arriving.
        older.conn().received(10);
        let _fourth = now(&table, B);
        assert!(newer.conn().is_shed(), "the idle one went first");
        assert!(!older.conn().is_shed() && !head.conn().is_shed());
        // Then the oldest head: the one admitted first and never served (B's).
        let _fifth = now(&table, B);
        assert!(head.conn().is_shed());
        assert!(!older.conn().is_shed());
        let inner = table.lock();
        assert_eq!(
            inner.order.len(),
            3,
            "every live connection not busy is in the order"
        );
        assert_eq!(inner.by_address.len(), 3);
    }

    #[tokio::test]
    async fn an_address_at_its_cap_sheds_its_idle_one_else_queues_and_leaves_others_alone() {
        let table = Table::new(&limits(100, 2));
        let other = now(&table, B);
        let a1 = now(&table, A);
        let a2 = now(&table, A);
        drop(a1.conn().begin()); // answered: idle keep-alive
        let a3 = now(&table, A);
        assert!(a1.conn().is_shed(), "the address's idle one went");
        drop(a1);
        // a2 and a3 wait for their heads: none is closed, the newcomers queue.
        let Admission::Queued(gave_up) = table.admit(A).unwrap() else {
            panic!("queued")
        };
        let Admission::Queued(waits) = table.admit(A).unwrap() else {
            panic!("queued")
        };
        assert!(!a2.conn().is_shed() && !a3.conn().is_shed());
        assert!(
            matches!(table.admit(B), Ok(Admission::Now(_))),
            "another address is not held up"
        );
        assert!(!other.conn().is_shed());
        drop(gave_up);
        drop(a2);
        let slot = handed(waits).await;
        assert!(!slot.conn().is_shed());
        let inner = table.lock();
        assert_eq!(
            inner.per_address[&AddrKey::of(A)],
            2,
            "a3 and the handed one"
        );
        assert_eq!(inner.queued_count, 0);
    }

    #[tokio::test]
    async fn queued_connections_count_against_max_connections() {
        let table = Table::new(&limits(3, 1));
        let a = now(&table, A);
        let q1 = table.admit(A).unwrap();
        let Admission::Queued(q2) = table.admit(A).unwrap() else {
            panic!("queued")
        };
        assert_eq!(
            table.admit(A).err(),
            Some(Refused::AddressFull),
            "one served and two queued hold the three of max_connections"
        );
        drop(q1);
        let q3 = table.admit(A).unwrap();
        assert!(
            matches!(q3, Admission::Queued(_)),
            "one that gave up leaves room"
        );
        // Another address at the limit: the served head makes room, and its
        // slot goes to the first of A's queue.
        assert!(matches!(table.admit(B), Ok(Admission::Now(_))));
        assert!(a.conn().is_shed());
        drop(a);
        let slot = handed(q2).await;
        assert!(!slot.conn().is_shed());
    }

    #[test]
    fn ipv6_addresses_count_by_64() {
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let c: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(AddrKey::of(a), AddrKey::of(b));
        assert_ne!(AddrKey::of(a), AddrKey::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(AddrKey::of(mapped), AddrKey::of(A));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dripping_head_is_overdue_by_the_rule_and_a_busy_one_never() {
        let mut l = limits(10, 0);
        l.header_grace = Duration::from_secs(10);
        l.header_min_rate = crate::config::ByteSize(500);
        let table = Table::new(&l);
        let slot = now(&table, A);
        let conn = slot.conn().clone();
        let drip = {
            let conn = conn.clone();
            tokio::spawn(async move {
                loop {
                    conn.received(30);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        let started = tokio::time::Instant::now();
        table.head_overdue(&conn).await;
        let took = started.elapsed().as_secs_f64();
        assert!((10.5..11.5).contains(&took), "cut after {took} s");
        drip.abort();
        let _busy = conn.begin();
        let busy = tokio::time::timeout(Duration::from_secs(300), table.head_overdue(&conn));
        assert!(busy.await.is_err(), "a request in flight is never overdue");
    }
}
