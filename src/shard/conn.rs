//! The I/O driver of one socket: read the HTTP request head, answer plain HTTP or upgrade to
//! WebSocket, then run a reader (socket → session) and a writer (session → socket) until the
//! connection ends. All protocol decisions are the session's; this file only moves bytes.

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use compio::buf::BufResult;
use compio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use compio::net::TcpStream;

use super::state::ShardState;
use crate::protocol::http::{self, HeadError, RequestHead};
use crate::protocol::CloseCode;
use crate::router::ConnId;

/// A connection's receive buffer starts small (most clients send little, and an idle
/// connection should hold little) and doubles while reads fill it, up to the largest, so a
/// busy publisher's commands are taken in large batches (which makes fan-out batches large).
const READ_BUFFER: usize = 2048;
const MAX_READ_BUFFER: usize = 256 * 1024;
/// A write buffer that grew past this is released once sent, so idle connections stay small.
const KEEP_WRITE_BUFFER: usize = 64 * 1024;
/// How long a closing connection may take to accept its last bytes.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn serve(state: Rc<RefCell<ShardState>>, mut stream: TcpStream, peer: SocketAddr) {
    // Updates are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let config = state.borrow().cluster.config.clone();
    let limits = &config.limits;
    let mut head_bytes = Vec::new();
    let head = compio::time::timeout(
        limits.handshake_timeout,
        read_head(&mut stream, &mut head_bytes, limits.max_request_header_bytes, limits.max_request_headers),
    )
    .await;
    let (head, consumed) = match head {
        Ok(Ok(Some(parsed))) => parsed,
        Ok(Ok(None)) => return,
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "refused request head");
            state.borrow().cluster.stats[state.borrow().id]
                .bad_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return respond_and_close(stream, http::error_response(err.status(), &err.to_string())).await;
        }
        Err(_) => {
            return respond_and_close(stream, http::error_response(408, "request head not received in time")).await
        }
    };
    match head.path.as_str() {
        "/ws" => match head.websocket_key.clone() {
            Some(key) => {
                // Only what followed the head stays; the head's buffer is not kept for the
                // connection's lifetime.
                let early = head_bytes.split_off(consumed);
                drop(head_bytes);
                websocket(state, stream, peer, &key, &early).await
            }
            None => {
                let problem = head.upgrade_problem.unwrap_or("not a WebSocket upgrade");
                respond_and_close(stream, http::error_response(400, problem)).await
            }
        },
        "/health" => respond_and_close(stream, health(&state, &head)).await,
        _ => respond_and_close(stream, http::error_response(404, "no such path; try /ws or /health")).await,
    }
}

fn health(state: &Rc<RefCell<ShardState>>, head: &RequestHead) -> Vec<u8> {
    if head.method != "GET" {
        return http::error_response(405, "use GET");
    }
    let body = super::http::health_json(&state.borrow().cluster);
    http::response(200, "application/json", body.as_bytes())
}

/// Reads until a complete request head (`Ok(None)`: the peer left first).
async fn read_head(
    stream: &mut TcpStream,
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

async fn respond_and_close(mut stream: TcpStream, response: Vec<u8>) {
    let _ = stream.write_all(response).await;
    let _ = stream.shutdown().await;
}

async fn websocket(state: Rc<RefCell<ShardState>>, mut stream: TcpStream, peer: SocketAddr, key: &str, early: &[u8]) {
    let BufResult(written, _) = stream.write_all(http::upgrade_response(key)).await;
    if written.is_err() {
        return;
    }
    let id = {
        let mut shard = state.borrow_mut();
        let over_limit = shard.connection_count() >= shard.cluster.config.limits.max_connections_per_shard;
        let id = shard.add_conn();
        if let Some(conn) = shard.conn(id) {
            if over_limit {
                conn.session.close(CloseCode::ConnectionLimit, "this server holds all the connections it may".into());
            }
            tracing::debug!(client = %conn.session.client_id(), %peer, "connection upgraded");
        }
        if !early.is_empty() {
            shard.on_bytes(id, early);
        }
        id
    };
    let (reader, writer) = stream.into_split();
    compio::runtime::spawn(write_loop(state.clone(), writer, id)).detach();
    read_loop(&state, reader, id).await;
}

async fn read_loop(state: &Rc<RefCell<ShardState>>, mut reader: TcpStream, id: ConnId) {
    let mut buffer = Vec::with_capacity(READ_BUFFER);
    let peer_gone = loop {
        if state.borrow_mut().conn(id).is_none_or(|c| c.session.is_closing()) {
            break false;
        }
        let BufResult(result, returned) = reader.read(buffer).await;
        buffer = returned;
        match result {
            Ok(0) | Err(_) => break true,
            Ok(n) => {
                state.borrow_mut().on_bytes(id, &buffer[..n]);
                if n == buffer.capacity() && n < MAX_READ_BUFFER {
                    buffer = Vec::with_capacity(n * 2);
                } else if n < READ_BUFFER / 2 && buffer.capacity() > READ_BUFFER {
                    buffer = Vec::with_capacity(READ_BUFFER);
                }
            }
        }
    };
    if peer_gone {
        // Nothing more can reach the peer: fail any write in flight so the writer ends.
        shutdown(&reader);
    }
    let mut shard = state.borrow_mut();
    if let Some(conn) = shard.conn(id) {
        conn.reader_done = true;
        if let Some(waker) = conn.writer.take() {
            waker.wake();
        }
    }
}

enum Next {
    Write,
    Finish,
}

async fn write_loop(state: Rc<RefCell<ShardState>>, mut writer: TcpStream, id: ConnId) {
    let mut out = Vec::new();
    loop {
        let next = poll_fn(|cx| {
            let mut shard = state.borrow_mut();
            let Some(conn) = shard.conn(id) else {
                return Poll::Ready(Next::Finish);
            };
            if conn.session.wants_write() {
                conn.session.poll_transmit(&mut out);
                return Poll::Ready(Next::Write);
            }
            if conn.session.is_closing() || conn.reader_done {
                return Poll::Ready(Next::Finish);
            }
            conn.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if let Next::Finish = next {
            break;
        }
        let closing = state.borrow_mut().conn(id).is_none_or(|c| c.session.is_closing());
        let written = if closing {
            match compio::time::timeout(CLOSE_FLUSH_TIMEOUT, writer.write_all(out)).await {
                Ok(BufResult(result, returned)) => {
                    out = returned;
                    result.is_ok()
                }
                Err(_) => break,
            }
        } else {
            let BufResult(result, returned) = writer.write_all(out).await;
            out = returned;
            result.is_ok()
        };
        if !written {
            break;
        }
        out.clear();
        // A connection going idle gives its buffer back; a busy one keeps a moderate one.
        let idle = state.borrow_mut().conn(id).is_none_or(|c| !c.session.wants_write());
        if idle || out.capacity() > KEEP_WRITE_BUFFER {
            out = Vec::new();
        }
    }
    finish(&state, &writer, id).await;
}

/// Ends the connection once the writer is done: stop the reader, wait for it, forget the conn.
async fn finish(state: &Rc<RefCell<ShardState>>, socket: &TcpStream, id: ConnId) {
    shutdown(socket);
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
    let mut shard = state.borrow_mut();
    if let Some(conn) = shard.conn(id) {
        match conn.session.close_reason() {
            Some((code, detail)) => {
                tracing::debug!(client = %conn.session.client_id(), code = code.code(), reason = code.label(), detail, "connection closed")
            }
            None => {
                tracing::debug!(client = %conn.session.client_id(), "connection closed by peer")
            }
        }
    }
    shard.remove_conn(id);
}

/// Shuts the socket down both ways, which completes any read or write in flight on it.
fn shutdown(socket: &TcpStream) {
    // SAFETY: shutdown(2) on a descriptor this connection owns; it only changes socket state.
    unsafe {
        libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR);
    }
}
