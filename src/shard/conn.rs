//! The I/O driver of one socket: the TLS handshake when the listener speaks TLS, the HTTP
//! request head, admission of a WebSocket upgrade, then a reader (socket → session) and a
//! writer (session → socket) until the connection ends. All protocol decisions are the
//! session's; this file only moves bytes.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use compio::buf::BufResult;
use compio::io::{AsyncRead, AsyncWriteExt};
use compio::net::TcpStream;
use compio::tls::{TlsAcceptor, TlsStream};

use super::admission::{retry_after_secs, Refusal, Ticket};
use super::routes::{self, Listener, Matched, Route};
use super::state::{Endpoint, ShardState, KEEP_WRITE_BUFFER};
use super::supervise::{self, Task};
use super::transport::{Receive, Transport};
use crate::core::ConnId;
use crate::protocol::http::{self, HeadError, RequestHead};
use crate::protocol::CloseCode;

/// How long a closing connection may take to accept its last bytes.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

// This task lives until the upgrade; the connection's lifetime task (`websocket`) is spawned
// then. The short-lived steps (TLS handshake, request head, answers) run boxed all the same.
pub(super) async fn serve(state: Rc<RefCell<ShardState>>, stream: TcpStream, peer: SocketAddr) {
    // Updates are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    // Read once per accept: a reload affects connections accepted after it.
    let tls = state.borrow().cluster.tls.as_ref().map(|tls| tls.current());
    match tls {
        None => {
            if let Some(upgrade) = Box::pin(serve_http(&state, stream, peer)).await {
                websocket(state, upgrade, fd, peer).await;
            }
        }
        // A TLS connection keeps its session state (kilobytes) anyway: its whole task stays
        // boxed, so plain connections' tasks are not sized for it.
        Some(tls) => Box::pin(serve_tls(state, tls, stream, fd, peer)).await,
    }
}

async fn serve_tls(
    state: Rc<RefCell<ShardState>>,
    tls: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    fd: RawFd,
    peer: SocketAddr,
) {
    let Some(stream) = accept_tls(&state, tls, stream, peer).await else { return };
    if let Some(upgrade) = serve_http(&state, stream, peer).await {
        websocket(state, upgrade, fd, peer).await;
    }
}

async fn accept_tls(
    state: &Rc<RefCell<ShardState>>,
    tls: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    let timeout = state.borrow_mut().config().limits.handshake_timeout;
    let failed = match compio::time::timeout(timeout, TlsAcceptor::from(tls).accept(stream)).await {
        Ok(Ok(stream)) => return Some(stream),
        failed => failed,
    };
    let shard = state.borrow();
    shard.cluster.stats[shard.id].tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
    match failed {
        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
        _ => tracing::debug!(%peer, "TLS handshake not finished in time"),
    }
    None
}

/// An admitted WebSocket upgrade, not answered yet.
struct Upgrade<S> {
    stream: S,
    key: String,
    /// What the client sent after its request head.
    early: Vec<u8>,
    ticket: Ticket,
    endpoint: Endpoint,
}

/// Reads the request head and answers it: plain HTTP or a refusal here, the WebSocket upgrade
/// by handing it back.
async fn serve_http<S: Transport>(
    state: &Rc<RefCell<ShardState>>,
    mut stream: S,
    peer: SocketAddr,
) -> Option<Upgrade<S>> {
    let config = state.borrow_mut().config();
    let limits = &config.limits;
    let mut head_bytes = Vec::new();
    let head = compio::time::timeout(
        limits.handshake_timeout,
        read_head(&mut stream, &mut head_bytes, limits.max_request_header_bytes, limits.max_request_headers),
    )
    .await;
    let (head, consumed) = match head {
        Ok(Ok(Some(parsed))) => parsed,
        Ok(Ok(None)) => return None,
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "refused request head");
            state.borrow().cluster.stats[state.borrow().id]
                .bad_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            respond_and_close(stream, http::error_response(err.status(), &err.to_string())).await;
            return None;
        }
        Err(_) => {
            respond_and_close(stream, http::error_response(408, "request head not received in time")).await;
            return None;
        }
    };
    let listener =
        Listener::Main { echo: config.testing.echo_endpoint, api: state.borrow().cluster.api_addr.is_none() };
    let Matched { route, method, target } = routes::route(listener, &head.path);
    let response = match route {
        Route::WebSocket(endpoint) => match head.websocket_key {
            Some(key) => match admit(state, peer) {
                Ok(ticket) => {
                    // Only what followed the head stays; the head's buffer is not kept for the
                    // connection's lifetime.
                    let early = head_bytes.split_off(consumed);
                    return Some(Upgrade { stream, key, early, ticket, endpoint });
                }
                Err(refusal) => refusal_response(refusal),
            },
            None => {
                let problem = head.upgrade_problem.unwrap_or("not a WebSocket upgrade");
                http::error_response(400, problem)
            }
        },
        Route::Page(page) => super::http::page(state, &head, page, method, target),
        Route::Api(route) => {
            let early = head_bytes.split_off(consumed);
            Box::pin(super::api::serve(state, stream, &head, early, route, method, target)).await;
            return None;
        }
        Route::NotFound(message) => http::error_response(404, message),
    };
    respond_and_close(stream, response).await;
    None
}

/// A request on an address of its own (`metrics_listen`: `/metrics` and `/health` only).
pub(super) fn serve_metrics(state: Rc<RefCell<ShardState>>, stream: TcpStream) -> impl Future<Output = ()> {
    serve_request(state, stream, Listener::Metrics)
}

/// The one request of a connection to a listener without WebSockets (`api.listen`,
/// `metrics_listen`): its head read, routed and answered.
pub(super) async fn serve_request(state: Rc<RefCell<ShardState>>, mut stream: TcpStream, listener: Listener) {
    let limits = state.borrow_mut().config().limits.clone();
    let mut head_bytes = Vec::new();
    let read = read_head(&mut stream, &mut head_bytes, limits.max_request_header_bytes, limits.max_request_headers);
    let response = match compio::time::timeout(limits.handshake_timeout, read).await {
        Ok(Ok(Some((head, consumed)))) => {
            let Matched { route, method, target } = routes::route(listener, &head.path);
            match route {
                Route::Api(route) => {
                    let early = head_bytes.split_off(consumed);
                    return super::api::serve(&state, stream, &head, early, route, method, target).await;
                }
                Route::Page(page) => super::http::page(&state, &head, page, method, target),
                Route::NotFound(message) => http::error_response(404, message),
                // Never: the table has upgrades on the main port only.
                Route::WebSocket(_) => http::error_response(404, listener.not_found()),
            }
        }
        Ok(Ok(None)) => return,
        Ok(Err(err)) => http::error_response(err.status(), &err.to_string()),
        Err(_) => http::error_response(408, "request head not received in time"),
    };
    respond_and_close(stream, response).await;
}

/// Admission of one upgrade; a refusal is counted on this shard and logged.
fn admit(state: &Rc<RefCell<ShardState>>, peer: SocketAddr) -> Result<Ticket, Refusal> {
    let shard = state.borrow();
    let admitted = shard.cluster.admission.admit(peer.ip(), shard.id, Instant::now());
    if let Err(refusal) = admitted {
        shard.cluster.stats[shard.id].count_refusal(refusal);
        tracing::debug!(%peer, ?refusal, "upgrade refused");
    }
    admitted
}

fn refusal_response(refusal: Refusal) -> Vec<u8> {
    match refusal {
        Refusal::AttemptsPerIp { retry_after } => {
            http::retry_after_response(refusal.status(), retry_after_secs(retry_after), &refusal.message())
        }
        _ => http::error_response(refusal.status(), &refusal.message()),
    }
}

/// Reads until a complete request head (`Ok(None)`: the peer left first).
pub(super) async fn read_head<S: AsyncRead>(
    stream: &mut S,
    bytes: &mut Vec<u8>,
    max_bytes: usize,
    max_headers: usize,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut chunk = Vec::with_capacity(1024);
    loop {
        let BufResult(result, returned) = stream.read(chunk).await;
        chunk = returned;
        match result {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
        if let Some(parsed) = http::parse_head(bytes, max_bytes, max_headers)? {
            return Ok(Some(parsed));
        }
    }
}

pub(super) async fn respond_and_close<S: Transport>(mut stream: S, response: Vec<u8>) {
    if let BufResult(Ok(()), _) = stream.write_all(response).await {
        let _ = stream.flush().await;
    }
    let _ = stream.shutdown().await;
}

async fn websocket<S: Transport>(state: Rc<RefCell<ShardState>>, upgrade: Upgrade<S>, fd: RawFd, peer: SocketAddr) {
    let Upgrade { mut stream, key, early, ticket, endpoint } = upgrade;
    let answered = Box::pin(async {
        let BufResult(written, _) = stream.write_all(http::upgrade_response(&key)).await;
        written.is_ok() && stream.flush().await.is_ok()
    })
    .await;
    drop(key);
    if !answered {
        return;
    }
    let Ok((reader, writer)) = stream.into_halves() else { return };
    let id = {
        let mut shard = state.borrow_mut();
        let id = shard.add_conn(endpoint);
        if let Some(conn) = shard.conn(id) {
            tracing::debug!(conn = %conn.session.client_id(), %peer, "connection upgraded");
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            shard.remember_peer(id, peer);
        }
        id
    };
    if !early.is_empty()
        && supervise::on_shard(&state, Task::Connection, |shard| shard.on_bytes(id, &early, None)).is_none()
    {
        close_after_panic(&state, id, fd);
    }
    drop(early);
    // The connection's lifetime tasks, fresh: none of this task's HTTP and upgrade states
    // stays (idle memory), and the writer holds no write future while parked (each write is
    // boxed). Reader and writer joined in one task saved ~0.1 KB a connection more but cost
    // a quarter of request/reply throughput (84k vs 58k replies per CPU-second): each side's
    // wake-ups polled the other.
    let direct = reader.direct_fd();
    compio::runtime::spawn(write_loop::<S>(state.clone(), writer, fd, direct, id, ticket)).detach();
    compio::runtime::spawn(read_loop(state, reader, fd, id)).detach();
}

/// Logs why the connection ended, with the peer's address when it was upgraded while debug
/// lines were on (only then is the address kept: idle connections stay small).
fn log_close(state: &Rc<RefCell<ShardState>>, id: ConnId) {
    let mut shard = state.borrow_mut();
    let peer = shard.forget_peer(id).map_or_else(String::new, |peer| peer.to_string());
    let Some(conn) = shard.conn(id) else { return };
    let conn_id = conn.session.client_id();
    match conn.session.close_reason() {
        Some((code, detail)) => {
            tracing::debug!(conn = %conn_id, %peer, code = code.code(), reason = code.label(), detail, "connection closed")
        }
        None => tracing::debug!(conn = %conn_id, %peer, "connection closed by peer"),
    }
}

/// Feeds the session until it closes or the peer leaves, then logs why the connection ended.
// Not an `async fn`: its arguments would be stored twice in the future (as arguments, then as
// locals), and the future lives as long as the connection (116 bytes an idle connection).
#[allow(clippy::manual_async_fn)]
fn read_loop<R: Receive>(
    state: Rc<RefCell<ShardState>>,
    mut reader: R,
    fd: RawFd,
    id: ConnId,
) -> impl Future<Output = ()> {
    async move {
        let peer_gone = loop {
            if state.borrow_mut().conn(id).is_none_or(|c| c.session.is_closing()) {
                break false;
            }
            let direct = reader.direct_fd();
            let handle = |bytes: &[u8]| {
                if supervise::on_shard(&state, Task::Connection, |shard| shard.on_bytes(id, bytes, direct)).is_none() {
                    close_after_panic(&state, id, fd);
                }
            };
            if !reader.receive(handle).await {
                break true;
            }
        };
        if peer_gone {
            // Nothing more can reach the peer: fail any write in flight so the writer ends.
            shutdown(fd);
        }
        // Before the writer may forget the connection: the session still says why it closed.
        log_close(&state, id);
        let mut shard = state.borrow_mut();
        if let Some(conn) = shard.conn(id) {
            conn.reader_done = true;
            if let Some(waker) = conn.writer.take() {
                waker.wake();
            }
        }
    }
}

enum Next {
    /// Write `out`, then the shared parts if any (see `ShardState::transmit`).
    Write(Option<Vec<Bytes>>),
    Finish,
}

/// Sends what the session queues until the connection ends; `ticket` holds the connection's
/// admitted place until then.
// Not an `async fn`, for the reason `read_loop` gives (80 bytes).
#[allow(clippy::manual_async_fn)]
fn write_loop<S: Transport>(
    state: Rc<RefCell<ShardState>>,
    mut writer: S::Writer,
    fd: RawFd,
    direct: Option<RawFd>,
    id: ConnId,
    ticket: Ticket,
) -> impl Future<Output = ()> {
    async move {
        let mut out = Vec::new();
        loop {
            // A panic here ends the connection (as a failed write does), not the writer alone.
            let next = poll_fn(|cx| {
                supervise::on_shard(&state, Task::Connection, |shard| next_step(shard, id, direct, &mut out, cx))
                    .unwrap_or(Poll::Ready(Next::Finish))
            })
            .await;
            let shared = match next {
                Next::Finish => break,
                Next::Write(shared) => shared,
            };
            let closing = {
                let mut shard = state.borrow_mut();
                shard.metrics.count_sent(out.len() + shared.iter().flatten().map(Bytes::len).sum::<usize>());
                shard.conn(id).is_none_or(|c| c.session.is_closing())
            };
            // While the shard drains, its deadline bounds every write (`shutdown_timeout`).
            let bounded = closing && !state.borrow().is_draining();
            let written = if let Some(parts) = shared {
                // Shared batches: the first head from `out`, the frames straight from the shard's copy.
                let BufResult(result, (head, _)) = Box::pin(writer.write_vectored_all((out, parts))).await;
                out = head;
                result.is_ok()
            } else if bounded {
                // Boxed: a closing write happens once, and an idle writer should not carry its timer.
                match Box::pin(compio::time::timeout(CLOSE_FLUSH_TIMEOUT, writer.write_all(out))).await {
                    Ok(BufResult(result, returned)) => {
                        out = returned;
                        result.is_ok()
                    }
                    Err(_) => break,
                }
            } else {
                // Boxed like every write: the future a write awaits lives only while it is in
                // flight, not in the state every idle connection keeps.
                let BufResult(result, returned) = Box::pin(writer.write_all(out)).await;
                out = returned;
                result.is_ok()
            };
            if !written {
                break;
            }
            out.clear();
            // A connection going idle gives its buffers back; a busy one keeps moderate ones.
            let Some(idle) = supervise::on_shard(&state, Task::Connection, |shard| shard.went_idle(id)) else { break };
            if idle || out.capacity() > KEEP_WRITE_BUFFER {
                out = Vec::new();
            }
        }
        Box::pin(S::say_goodbye(&mut writer)).await;
        finish(&state, fd, id).await;
        // Held to the end: the admitted place is the connection's until then.
        drop(ticket);
    }
}

/// What the writer of `id` does next: write `out` (filled here), wait, or finish.
fn next_step(
    shard: &mut ShardState,
    id: ConnId,
    direct: Option<RawFd>,
    out: &mut Vec<u8>,
    cx: &mut std::task::Context<'_>,
) -> Poll<Next> {
    let gate = shard.pacing.gate();
    if let Some(left_over) = shard.take_unsent(id) {
        // A direct send's rest goes first (see `ShardState::send_directly`).
        *out = left_over;
        return Poll::Ready(Next::Write(None));
    }
    let Some(conn) = shard.conn(id) else {
        return Poll::Ready(Next::Finish);
    };
    if conn.session.wants_write() {
        if gate.holds(conn.last_write_epoch, conn.is_urgent()) {
            // The shard is busy and this connection wrote within the linger: wait for its
            // next tick.
            conn.writer = Some(cx.waker().clone());
            if !std::mem::replace(&mut conn.paced, true) {
                shard.pacing.wait(id, direct);
            }
            return Poll::Pending;
        }
        conn.last_write_epoch = gate.stamp(id.index);
        return Poll::Ready(Next::Write(shard.transmit(id, out)));
    }
    if conn.session.is_closing() || conn.reader_done {
        return Poll::Ready(Next::Finish);
    }
    conn.writer = Some(cx.waker().clone());
    Poll::Pending
}

/// After a panic while handling `id`'s input: close it with 1011, which its writer sends as
/// any close. Its session may be in any state, so that is caught too; failing it, the socket
/// is shut, which ends the connection as a peer that left.
fn close_after_panic(state: &RefCell<ShardState>, id: ConnId, fd: RawFd) {
    let closed = supervise::on_shard(state, Task::Connection, |shard| {
        if let Some(conn) = shard.conn(id) {
            conn.session.close(CloseCode::InternalError, "internal server error".into());
        }
        shard.drive(id);
    });
    if closed.is_none() {
        shutdown(fd);
    }
}

/// Ends the connection once the writer is done: stop the reader, wait for it, forget the conn.
async fn finish(state: &Rc<RefCell<ShardState>>, fd: RawFd, id: ConnId) {
    shutdown(fd);
    poll_fn(|cx| {
        let mut shard = state.borrow_mut();
        match shard.conn(id) {
            Some(conn) if !conn.reader_done => {
                conn.writer = Some(cx.waker().clone());
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    })
    .await;
    state.borrow_mut().remove_conn(id);
}

/// Shuts the socket down both ways, which completes any read or write in flight on it.
fn shutdown(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor this connection owns (its reader or writer still
    // holds the stream, so it is open); it only changes socket state.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}
