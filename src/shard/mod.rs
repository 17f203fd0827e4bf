//! Thread-per-core shards: each a single-threaded compio runtime (io_uring, or epoll where
//! io_uring cannot be set up) with its own `SO_REUSEPORT` listener, its connections, and an
//! inbox through which the other shards reach it. The only module that knows about compio.

pub mod admission;
mod api;
mod conn;
mod event_loop;
mod exposition;
mod http;
mod inbox;
mod pacing;
mod readable;
mod router;
mod routes;
mod runtime;
mod state;
pub mod supervise;
mod transport;

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use compio::net::TcpListener;
use socket2::SockRef;

pub use inbox::Inbox;

use crate::auth::Verifier;
use crate::broker::{BrokerMsg, BrokerNode, Inboxes};
use crate::compression::ZstdSettings;
use crate::config::reload::Reload;
use crate::config::{Bucket, Config};
use crate::protocol::CloseCode;
use crate::ratelimit::KeyedBuckets;
use crate::tls::ServerCertificate;
use admission::{Admission, Refusal};
use runtime::{allowed_cores, bind_listeners, first_runtime, RuntimeKind};
use state::ShardState;
use supervise::Task;

/// How often a draining shard looks whether its connections have all ended.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// What shards say to each other.
#[derive(Debug)]
pub enum ShardMsg {
    /// To a channel's owner, or from the broker (see `broker::BrokerMsg`).
    Broker(BrokerMsg),
    /// Between a server API request's shard and the shards holding what it asks about.
    Api(api::ApiMsg),
    /// Tell every connection to go elsewhere, let them take what is queued for them until
    /// `deadline`, then stop.
    Shutdown { deadline: Instant },
}

/// Figures one shard keeps and anyone may read (relaxed atomics, written only by the shard).
#[derive(Debug, Default)]
pub struct ShardStats {
    pub connections: AtomicU64,
    pub accepted: AtomicU64,
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub channels: AtomicU64,
    pub inbox_dropped: AtomicU64,
    pub recoveries_served: AtomicU64,
    pub recoveries_refused: AtomicU64,
    pub history_size: AtomicU64,
    pub ack_failures: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Refused tokens, by `AuthFailure::index`.
    pub auth_failures: [AtomicU64; crate::auth::AuthFailure::ALL.len()],
    /// Requests refused by a rate limit.
    pub rate_limited: AtomicU64,
    /// Connections closed, by close code (`CloseCode::ALL` order).
    pub closed: [AtomicU64; CloseCode::ALL.len()],
    /// Lower-priority updates replaced by newer ones with the same key, and dropped to make room.
    pub conflated: AtomicU64,
    pub dropped: AtomicU64,
    /// Upgrades refused before the answer, by reason.
    pub refused_attempts_per_ip: AtomicU64,
    pub refused_max_connections: AtomicU64,
    pub refused_per_shard: AtomicU64,
    pub refused_per_ip: AtomicU64,
    /// Sockets whose TLS handshake failed or did not finish in time.
    pub tls_handshake_failures: AtomicU64,
    /// Messages sent zstd-compressed, their plain and compressed bytes, times zstd ran
    /// (shared batches run it once for many messages), and those sent with a dictionary.
    pub compressed_messages: AtomicU64,
    pub compressed_plain_bytes: AtomicU64,
    pub compressed_bytes: AtomicU64,
    pub compressions: AtomicU64,
    pub compressed_with_dictionary: AtomicU64,
    /// How long busy connections' writes currently wait for company (adaptive batching), µs.
    pub linger_us: AtomicU64,
    /// 0 = not started, 1 = io_uring, 2 = epoll.
    pub driver: AtomicU8,
    /// Panics caught on this shard, by task (see `supervise`).
    pub panics: supervise::Panics,
    /// Counters by type, command and code, and the latency histograms (see `metrics`).
    pub metrics: crate::metrics::SharedMetrics,
}

impl ShardStats {
    /// Counts one refused upgrade under its reason.
    pub fn count_refusal(&self, refusal: Refusal) {
        let counter = match refusal {
            Refusal::AttemptsPerIp { .. } => &self.refused_attempts_per_ip,
            Refusal::MaxConnections => &self.refused_max_connections,
            Refusal::PerShard => &self.refused_per_shard,
            Refusal::PerIp => &self.refused_per_ip,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Panics caught under `task`; those a session caught in its own timeouts (closing its
    /// connection with 1011) count under `timeouts`.
    pub fn panic_count(&self, task: Task) -> u64 {
        let in_sessions = if task == Task::Timeouts { self.metrics.timeout_panics.load(Ordering::Relaxed) } else { 0 };
        self.panics.get(task) + in_sessions
    }

    pub fn panic_total(&self) -> u64 {
        Task::ALL.iter().map(|&task| self.panic_count(task)).sum()
    }

    pub fn driver_name(&self) -> &'static str {
        match self.driver.load(Ordering::Relaxed) {
            1 => "io_uring",
            2 => "epoll",
            _ => "starting",
        }
    }
}

/// The configuration in force. A reload replaces it whole; shards keep their own copy and
/// look at the generation number to see that it changed, so using it costs one atomic load.
pub struct LiveConfig {
    current: RwLock<Arc<Config>>,
    generation: AtomicU64,
}

impl LiveConfig {
    fn new(config: Config) -> Self {
        Self { current: RwLock::new(Arc::new(config)), generation: AtomicU64::new(0) }
    }

    /// The configuration in force now.
    pub fn get(&self) -> Arc<Config> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes whenever the configuration is replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn replace(&self, config: Config) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// What all shards share: the config, every inbox, every shard's figures.
pub struct Cluster {
    pub config: LiveConfig,
    pub inboxes: Vec<Inbox<ShardMsg>>,
    pub stats: Vec<ShardStats>,
    pub started_at: Instant,
    /// Cleared on shutdown before the listeners stop, so their accept loops end quietly.
    pub accepting: AtomicBool,
    pub draining: AtomicBool,
    pub local_addr: SocketAddr,
    /// Where `/metrics` and `/health` are also served, alone (`metrics_listen`).
    pub metrics_addr: Option<SocketAddr>,
    /// The node's broker: embedded, or Redis.
    pub broker: Arc<dyn BrokerNode>,
    /// Verifies tokens; `None` when auth is disabled.
    pub verifier: Option<Arc<Verifier>>,
    /// Rate-limit buckets per user (`[commands, publishes]`), across every shard.
    pub users: Arc<KeyedBuckets<Arc<str>, 2>>,
    /// Who may open one more connection.
    pub admission: Arc<Admission>,
    /// The certificate when the listener speaks TLS.
    pub tls: Option<ServerCertificate>,
    /// Compression of large outgoing messages, and its dictionaries.
    pub zstd: Arc<ZstdSettings>,
    /// The server API's rate limits per key and its counters.
    pub api: api::ApiShared,
    /// Where the server API is served alone (`api.listen`).
    pub api_addr: Option<SocketAddr>,
}

impl Inboxes for Cluster {
    fn shard_count(&self) -> usize {
        self.inboxes.len()
    }

    fn deliver(&self, to: usize, msg: BrokerMsg) {
        let mut msg = ShardMsg::Broker(msg);
        while let Err(back) = self.inboxes[to].push(msg) {
            msg = back;
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    fn port(&self) -> u16 {
        self.local_addr.port()
    }
}

/// A running server: its shards and the address they listen on.
pub struct Server {
    pub cluster: Arc<Cluster>,
    threads: Vec<JoinHandle<DrainReport>>,
    /// The shards' listening sockets (duplicated descriptors), so that shutdown can stop them
    /// all at once from this thread.
    listeners: Vec<std::net::TcpListener>,
}

/// How a shutdown went for the connections open when it began (and any upgraded during it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections that ended before the timeout: they took what was queued for them and
    /// their `Disconnect`, or left by themselves.
    pub drained: usize,
    /// Connections still open at `shutdown_timeout`, closed with whatever they had not taken.
    pub cut: usize,
}

/// Why a reload was refused. Nothing of it was applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadRefusal {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl Server {
    /// Binds one listener per shard and starts the shards.
    pub fn start(config: Config) -> io::Result<Server> {
        let shards = config.shard_count();
        let tls = match config.tls.enabled() {
            true => Some(
                ServerCertificate::load(&config.tls).map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?,
            ),
            false => None,
        };
        let zstd = Arc::new(
            ZstdSettings::from_config(&config.delivery)
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?,
        );
        let listeners = bind_listeners(config.listen, shards)?;
        let local_addr = listeners[0].local_addr()?;
        let mut metrics_listener = match config.metrics_listen {
            Some(addr) => Some(bind_listeners(addr, 1)?.remove(0)),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().map(std::net::TcpListener::local_addr).transpose()?;
        // Every shard accepts on the API address too: a request is served where it lands.
        let api_listeners = match config.api.listen {
            Some(addr) => bind_listeners(addr, shards)?,
            None => Vec::new(),
        };
        let api_addr = api_listeners.first().map(std::net::TcpListener::local_addr).transpose()?;
        let stoppers = listeners
            .iter()
            .chain(&api_listeners)
            .map(std::net::TcpListener::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        let mut api_listeners = api_listeners.into_iter();
        let broker = crate::broker::node(&config);
        let now_unix = crate::core::unix_us() / 1_000_000;
        let auth =
            Verifier::setup(&config.auth, now_unix).map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        if auth.verifier.is_none() {
            tracing::warn!(
                "auth.mode = \"disabled\": every client may subscribe and publish anywhere; local development only"
            );
        }
        if let Some(token) = &auth.development_token {
            // Only someone at a terminal gets the token; a service's logs never hold one.
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                tracing::warn!(
                    token = %token,
                    "no auth key configured: tokens are signed with a random secret that lasts until this process \
                     stops; this development token (subject `developer`, every channel) is valid for 24h"
                );
            } else {
                tracing::warn!(
                    "no auth key configured (auth.hmac_secret or auth.public_key_files): every client token is refused"
                );
            }
        }
        let users = Arc::new(KeyedBuckets::new(user_limits(&config)));
        let cluster = Arc::new(Cluster {
            verifier: auth.verifier,
            users,
            inboxes: (0..shards).map(|_| Inbox::new(config.delivery.inbox_capacity)).collect(),
            stats: (0..shards).map(|_| ShardStats::default()).collect(),
            admission: Arc::new(Admission::new(&config, shards)),
            tls,
            zstd,
            api: api::ApiShared::new(api::request_limit(&config)),
            api_addr,
            config: LiveConfig::new(config),
            started_at: Instant::now(),
            accepting: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            local_addr,
            metrics_addr,
            broker,
        });
        cluster.broker.start(cluster.clone())?;
        let pin_shards = cluster.config.get().pin_shards;
        let cores = allowed_cores();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::with_capacity(shards);
        for (id, listener) in listeners.into_iter().enumerate() {
            let cluster = cluster.clone();
            let core = pin_shards.then(|| cores[id % cores.len()]);
            let started = started_tx.clone();
            // Shard 0 also serves the metrics address: a scrape is rare and small.
            let metrics_listener = metrics_listener.take();
            let listeners = ShardListeners { main: listener, metrics: metrics_listener, api: api_listeners.next() };
            let thread = std::thread::Builder::new()
                .name(format!("shard-{id}"))
                .spawn(move || run_shard(id, cluster, listeners, core, started))?;
            threads.push(thread);
        }
        drop(started_tx);
        let server = Server { cluster, threads, listeners: stoppers };
        // Nothing runs half-started: every shard is up, or the server stops and says why.
        for _ in 0..shards {
            let failure = match started_rx.recv() {
                Ok(Ok(())) => continue,
                Ok(Err(err)) => err,
                Err(_) => io::Error::other("a shard stopped while starting"),
            };
            server.shutdown();
            return Err(failure);
        }
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.cluster.local_addr
    }

    /// The metrics address, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.cluster.metrics_addr
    }

    /// The server API's own address, when `api.listen` is set.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.cluster.api_addr
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.cluster.config.get()
    }

    /// Puts `loaded` (validated, its files checked) in force as far as a running server can
    /// (SIGHUP): the settings of `config::reload::RELOADABLE` for every connection opened from
    /// now on, shared limits (per user, admission) at once; and loads the TLS certificate and
    /// key again. All or nothing: when the settings do not fit or the certificate does not
    /// load, nothing changes and the reason is returned.
    pub fn reload(&self, loaded: &Config) -> Result<Reload, ReloadRefusal> {
        let reload = Reload::plan(&self.cluster.config.get(), loaded)?;
        let certificate = match &self.cluster.tls {
            Some(tls) => Some(tls.load_again()?),
            None => None,
        };
        self.cluster.users.set_limits(user_limits(&reload.config));
        self.cluster.admission.set_limits(&reload.config);
        self.cluster.api.set_limit(api::request_limit(&reload.config));
        self.cluster.config.replace(reload.config.clone());
        if let (Some(tls), Some(certificate)) = (&self.cluster.tls, certificate) {
            tls.install(certificate);
        }
        Ok(reload)
    }

    /// Stops accepting on every shard, then tells every client to reconnect elsewhere and
    /// gives them up to `shutdown_timeout` to take what is queued for them; waits for the
    /// shards to stop.
    pub fn shutdown(self) -> DrainReport {
        // Every listener stops before any client hears of the shutdown, so none that is told
        // to go elsewhere can come back here. shutdown(2) on a listening socket takes it out
        // of the port at once; its accept loop then fails and ends.
        self.cluster.accepting.store(false, Ordering::SeqCst);
        for listener in &self.listeners {
            if let Err(err) = SockRef::from(listener).shutdown(std::net::Shutdown::Read) {
                tracing::warn!(error = %err, "cannot stop a listener; it goes when its shard stops");
            }
        }
        self.cluster.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + self.cluster.config.get().shutdown_timeout;
        for inbox in &self.cluster.inboxes {
            let mut msg = ShardMsg::Shutdown { deadline };
            while let Err(back) = inbox.push(msg) {
                msg = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.join()
    }

    /// Waits until every shard has stopped.
    pub fn join(self) -> DrainReport {
        let mut total = DrainReport::default();
        for thread in self.threads {
            if let Ok(report) = thread.join() {
                total.drained += report.drained;
                total.cut += report.cut;
            }
        }
        total
    }
}

/// The per-user buckets (`[commands, publishes]`) in force under `config`.
fn user_limits(config: &Config) -> [Bucket; 2] {
    let r = &config.rate_limits;
    if r.enabled {
        [r.user_commands, r.user_publishes]
    } else {
        [Bucket::new(0, 60, 0); 2]
    }
}

type Started = std::sync::mpsc::Sender<io::Result<()>>;

/// The sockets one shard accepts on.
struct ShardListeners {
    main: std::net::TcpListener,
    /// The metrics address (shard 0 only).
    metrics: Option<std::net::TcpListener>,
    api: Option<std::net::TcpListener>,
}

fn run_shard(
    id: usize,
    cluster: Arc<Cluster>,
    listeners: ShardListeners,
    core: Option<usize>,
    started: Started,
) -> DrainReport {
    let (runtime, kind) = match first_runtime(id, cluster.config.get().driver, core) {
        Ok(built) => built,
        Err(err) => {
            refuse(&started, id, "cannot start the shard's runtime", err);
            return DrainReport::default();
        }
    };
    let driver = if runtime.driver_type().is_iouring() { 1 } else { 2 };
    cluster.stats[id].driver.store(driver, Ordering::Relaxed);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.enter(|| {
            let Some(state) = start_shard(id, cluster, listeners, kind, core, &started) else {
                return DrainReport::default();
            };
            let main = async {
                let deadline = inbox_loop(state.clone()).await;
                drain(&state, deadline).await
            };
            event_loop::run(&runtime, &state, main)
        })
    }));
    let report = match run {
        Ok(report) => report,
        Err(panic) => {
            // The shard's work runs under `supervise`; a panic that got out of it all leaves a
            // shard that owns channels and answers nothing. The process stops, so that its
            // service manager starts it again and clients reconnect and recover.
            tracing::error!(
                shard = id,
                panic = crate::core::panic_message(&*panic),
                "the shard stopped with a panic; the server exits (status 70) to be restarted"
            );
            std::process::exit(70);
        }
    };
    tracing::info!(shard = id, drained = report.drained, cut = report.cut, "shard stopped");
    report
}

/// Registers the shard's listeners and starts its accept loops; `None` (after telling
/// `started` why) when a listener cannot be registered.
fn start_shard(
    id: usize,
    cluster: Arc<Cluster>,
    listeners: ShardListeners,
    kind: RuntimeKind,
    core: Option<usize>,
    started: &Started,
) -> Option<Rc<RefCell<ShardState>>> {
    let ShardListeners { main, metrics, api } = listeners;
    let register = |listener, what| TcpListener::from_std(listener).map_err(|err| refuse(started, id, what, err)).ok();
    let listener = register(main, "cannot register the listener")?;
    let metrics_listener = match metrics {
        Some(listener) => Some(register(listener, "cannot register the metrics listener")?),
        None => None,
    };
    let api_listener = match api {
        Some(listener) => Some(register(listener, "cannot register the API listener")?),
        None => None,
    };
    tracing::info!(shard = id, driver = cluster.stats[id].driver_name(), ?kind, core = ?core, "shard started");
    let _ = started.send(Ok(()));
    let state = Rc::new(RefCell::new(ShardState::new(id, cluster)));
    if let Some(listener) = metrics_listener {
        compio::runtime::spawn(metrics_accept_loop(listener, state.clone())).detach();
    }
    if let Some(listener) = api_listener {
        compio::runtime::spawn(api::accept_loop(listener, state.clone())).detach();
    }
    compio::runtime::spawn(accept_loop(listener, state.clone())).detach();
    Some(state)
}

fn refuse(started: &Started, id: usize, what: &str, err: io::Error) {
    tracing::error!(shard = id, error = %err, "{what}");
    let _ = started.send(Err(io::Error::new(err.kind(), format!("shard {id}: {what}: {err}"))));
}

/// Accepts with one multishot accept (io_uring keeps it armed: no submission per connection;
/// the epoll driver accepts one at a time).
async fn accept_loop(listener: TcpListener, state: Rc<RefCell<ShardState>>) {
    use futures_util::StreamExt;
    let mut incoming = listener.incoming();
    while let Some(accepted) = incoming.next().await {
        match accepted.and_then(|stream| stream.peer_addr().map(|peer| (stream, peer))) {
            Ok((stream, peer)) => supervise::spawn(&state, Task::Http, conn::serve(state.clone(), stream, peer)),
            Err(_) if !state.borrow().cluster.accepting.load(Ordering::SeqCst) => return,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning; the backlog waits.
                tracing::warn!(shard = state.borrow().id, error = %err, "accept failed");
                compio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Accepts on the metrics address: each connection gets `/metrics` or `/health`, nothing else.
async fn metrics_accept_loop(listener: TcpListener, state: Rc<RefCell<ShardState>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => supervise::spawn(&state, Task::Http, conn::serve_metrics(state.clone(), stream)),
            Err(err) => {
                tracing::warn!(error = %err, "metrics accept failed");
                compio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Drains the inbox in batches; returns the drain's deadline when told to shut down.
async fn inbox_loop(state: Rc<RefCell<ShardState>>) -> Instant {
    let cluster = state.borrow().cluster.clone();
    let id = state.borrow().id;
    let inbox = &cluster.inboxes[id];
    loop {
        inbox.ready().await;
        let mut shard = state.borrow_mut();
        while let Some(msg) = inbox.pop() {
            if let ShardMsg::Shutdown { deadline } = msg {
                return deadline;
            }
            // A message whose handling panics is lost (and counted); the next ones are handled.
            supervise::catch(&cluster.stats[id].panics, id, Task::Inbox, || shard.handle_msg(msg));
        }
        if shard.has_backlog() && !shard.backlog_flusher_running {
            shard.backlog_flusher_running = true;
            compio::runtime::spawn(backlog_flusher(state.clone())).detach();
        }
    }
}

/// Retries messages for full inboxes until none wait.
async fn backlog_flusher(state: Rc<RefCell<ShardState>>) {
    loop {
        compio::time::sleep(Duration::from_micros(500)).await;
        // After a panic this flusher ends; the inbox loop starts another while a backlog waits.
        let flushing = supervise::on_shard(&state, Task::Backlog, ShardState::flush_backlog);
        if flushing != Some(true) {
            state.borrow_mut().backlog_flusher_running = false;
            return;
        }
    }
}

/// Tells every connection to go elsewhere, after what is already queued for it, and waits
/// until all have ended or `deadline` passed.
async fn drain(state: &Rc<RefCell<ShardState>>, deadline: Instant) -> DrainReport {
    state.borrow_mut().close_all(CloseCode::Shutdown, "server shutting down");
    loop {
        let now = Instant::now();
        if state.borrow().connection_count() == 0 || now >= deadline {
            break;
        }
        compio::time::sleep((deadline - now).min(DRAIN_POLL)).await;
    }
    let shard = state.borrow();
    DrainReport { drained: shard.drained(), cut: shard.connection_count() }
}
