//! The API over the socket: the accept loop of `api.listen`, and one request served (wherever
//! it came in): the key checked and rate limited, the route's method, the body read, then the
//! endpoint's answer written back.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use compio::buf::BufResult;
use compio::io::AsyncWriteExt;
use compio::net::{TcpListener, TcpStream};

use super::codec::{self, Format, Reply};
use super::handlers;
use super::keys::authenticate;
use super::ANSWER_TIMEOUT;
use crate::protocol::http::RequestHead;
use crate::shard::conn::{self, respond_and_close};
use crate::shard::routes::{ApiRoute, Listener};
use crate::shard::state::ShardState;
use crate::shard::supervise::{self, Task};
use crate::shard::transport::Transport;

/// Accepts on `api.listen`: each connection gets one API request.
pub(in crate::shard) async fn accept_loop(listener: TcpListener, state: Rc<RefCell<ShardState>>) {
    use futures_util::StreamExt;
    let mut incoming = listener.incoming();
    while let Some(accepted) = incoming.next().await {
        match accepted {
            Ok(stream) => supervise::spawn(&state, Task::Http, serve_connection(state.clone(), stream)),
            Err(_) if !state.borrow().cluster.accepting.load(Ordering::SeqCst) => return,
            Err(err) => {
                tracing::warn!(error = %err, "API accept failed");
                compio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve_connection(state: Rc<RefCell<ShardState>>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    conn::serve_request(state, stream, Listener::Api).await;
}

/// Serves one API request whose head was read and routed (`method` and `target` as the
/// router gave them); `early` is what followed the head.
pub(in crate::shard) async fn serve<S: Transport>(
    state: &Rc<RefCell<ShardState>>,
    mut stream: S,
    head: &RequestHead,
    early: Vec<u8>,
    route: ApiRoute,
    method: Option<&str>,
    target: &str,
) {
    let reply = match handle(state, &mut stream, head, early, route, method, target).await {
        Some(reply) => reply,
        // The client left before its body was complete.
        None => return,
    };
    let cluster = state.borrow().cluster.clone();
    cluster.api.count(route, reply.status);
    if reply.status >= 400 {
        tracing::debug!(route = route.label(), status = reply.status, "API request refused");
    }
    respond_and_close(stream, reply.into_bytes()).await;
}

async fn handle<S: Transport>(
    state: &Rc<RefCell<ShardState>>,
    stream: &mut S,
    head: &RequestHead,
    early: Vec<u8>,
    route: ApiRoute,
    method: Option<&str>,
    target: &str,
) -> Option<Reply> {
    let config = state.borrow_mut().config();
    // Errors answer in the encoding the request speaks (or asks for).
    let format = head
        .body
        .content_type
        .as_deref()
        .and_then(Format::of_content_type)
        .unwrap_or_else(|| Format::of_accept(head.body.accept.as_deref()));
    let key = match authenticate(&config.api.keys, head.body.authorization.as_deref()) {
        Ok(key) => key,
        Err((status, message)) => return Some(Reply::error(status, format, message)),
    };
    let cluster = state.borrow().cluster.clone();
    if let Err(wait) = cluster.api.take(key) {
        let mut reply = Reply::error(429, format, "rate limited (rate_limits.api_requests): retry later");
        reply.retry_after = Some(crate::shard::admission::retry_after_secs(wait));
        return Some(reply);
    }
    if route == ApiRoute::Unknown {
        return Some(Reply::error(404, format, "no such API route; see docs/protocol.md, \"Server API\""));
    }
    if let Some(method) = method.filter(|&method| head.method != method) {
        return Some(Reply::error(405, format, format!("use {method}")));
    }
    if method == Some("GET") {
        let format = Format::of_accept(head.body.accept.as_deref());
        return Some(match route {
            ApiRoute::Channels => handlers::channels(state, &head.query, format).await,
            ApiRoute::History => handlers::history(state, target, &head.query, &config, format).await,
            _ => handlers::subscriptions(state, target, format).await,
        });
    }
    let format = match head.body.content_type.as_deref().map(Format::of_content_type) {
        Some(Some(format)) => format,
        _ if route == ApiRoute::Disconnect && head.body.content_length.is_none_or(|l| l == Ok(0)) => Format::Json,
        _ => {
            let message = format!("send the body as {} or {}", codec::PROTOBUF, codec::JSON);
            return Some(Reply::error(415, format, message));
        }
    };
    let body = match read_body(stream, head, early, config.api.max_body_bytes, format).await {
        Ok(body) => body?,
        Err(reply) => return Some(reply),
    };
    Some(match route {
        ApiRoute::Publish => handlers::publish(state, &body, &config, format).await,
        ApiRoute::PublishBatch => handlers::publish_batch(state, &body, &config, format).await,
        _ => handlers::disconnect(state, target, &body, format).await,
    })
}

/// Reads the body: `Content-Length` bytes (at most `max`); chunked bodies are refused.
/// `Ok(None)`: the client left first.
async fn read_body<S: Transport>(
    stream: &mut S,
    head: &RequestHead,
    mut body: Vec<u8>,
    max: usize,
    format: Format,
) -> Result<Option<Vec<u8>>, Reply> {
    if head.body.transfer_encoding {
        return Err(Reply::error(411, format, "chunked bodies are not accepted: send Content-Length"));
    }
    let length = match head.body.content_length {
        None => return Err(Reply::error(411, format, "send Content-Length")),
        Some(Err(())) => return Err(Reply::error(400, format, "Content-Length is not a number")),
        Some(Ok(length)) if length > max => {
            let message = format!("body of {length} bytes, the limit is {max} (api.max_body_bytes)");
            return Err(Reply::error(413, format, message));
        }
        Some(Ok(length)) => length,
    };
    if body.len() < length && head.body.expect_continue {
        let BufResult(written, _) = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()).await;
        if written.is_err() {
            return Ok(None);
        }
    }
    // Anything after the body would be a second request; this connection serves one.
    body.truncate(length);
    let read = async {
        let mut chunk = Vec::with_capacity((length - body.len()).min(64 * 1024));
        while body.len() < length {
            let BufResult(result, returned) = stream.read(chunk).await;
            chunk = returned;
            match result {
                Ok(0) | Err(_) => return false,
                Ok(n) => body.extend_from_slice(&chunk[..n.min(length - body.len())]),
            }
        }
        true
    };
    let timeout = ANSWER_TIMEOUT;
    match compio::time::timeout(timeout, read).await {
        Ok(true) => Ok(Some(body)),
        Ok(false) => Ok(None),
        Err(_) => Err(Reply::error(408, format, "body not received in time")),
    }
}
