//! The server API for backends, over HTTP on the main port or on `api.listen`: publish (one or
//! a batch) through the same path as WebSocket publishes, and look at channels, history and
//! clients. Every request needs a key (`Authorization: Bearer KEY`), is rate limited per key,
//! and is served on the shard that accepted it; what it needs from other shards travels as
//! shard messages and comes back to a table of waiting requests ([`Waiters`]).

mod codec;
mod waiters;

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compio::buf::BufResult;
use compio::io::AsyncWriteExt;
use compio::net::{TcpListener, TcpStream};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::conn::{read_head, respond_and_close};
use super::state::ShardState;
use super::transport::Transport;
use super::ShardMsg;
use crate::broker::accept_publish;
use crate::config::{Bucket, Config};
use crate::core::ConnId;
use crate::core::{unix_us, validate_channel};
use crate::protocol::http::{self, RequestHead};
use crate::protocol::{pb, CloseCode, ErrorCode};
use crate::ratelimit::KeyedBuckets;
use codec::{Answer as _, Format};
pub use waiters::{Answer, ApiMsg, Waiters};

/// The longest a request waits for other shards or Redis before it is answered 504.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Channels per page of `GET /api/channels` unless `limit` says otherwise, and at most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Publications per page of history unless `limit` says otherwise, and at most (as `History`).
const DEFAULT_HISTORY: usize = 100;
const MAX_HISTORY: usize = 1000;

/// The routes, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Publish,
    PublishBatch,
    Channels,
    History,
    Subscriptions,
    Disconnect,
    Unknown,
}

impl Route {
    const ALL: [Route; 7] = [
        Route::Publish,
        Route::PublishBatch,
        Route::Channels,
        Route::History,
        Route::Subscriptions,
        Route::Disconnect,
        Route::Unknown,
    ];

    fn label(self) -> &'static str {
        match self {
            Route::Publish => "publish",
            Route::PublishBatch => "publish_batch",
            Route::Channels => "channels",
            Route::History => "history",
            Route::Subscriptions => "subscriptions",
            Route::Disconnect => "disconnect",
            Route::Unknown => "unknown",
        }
    }

    /// The route `path` names, the method it takes, and what the path holds (a channel or a
    /// client id).
    fn of(path: &str) -> (Route, &'static str, &str) {
        if path == "/api/publish" {
            return (Route::Publish, "POST", "");
        }
        if path == "/api/publish/batch" {
            return (Route::PublishBatch, "POST", "");
        }
        if path == "/api/channels" {
            return (Route::Channels, "GET", "");
        }
        if let Some(channel) = path.strip_prefix("/api/channels/").and_then(|rest| rest.strip_suffix("/history")) {
            return (Route::History, "GET", channel);
        }
        if let Some(rest) = path.strip_prefix("/api/clients/") {
            if let Some(client) = rest.strip_suffix("/subscriptions") {
                return (Route::Subscriptions, "GET", client);
            }
            if let Some(client) = rest.strip_suffix("/disconnect") {
                return (Route::Disconnect, "POST", client);
            }
        }
        (Route::Unknown, "", "")
    }
}

/// HTTP statuses the API answers, as metric labels (anything else counts as `other`).
const STATUSES: [u16; 13] = [200, 400, 401, 403, 404, 405, 411, 413, 415, 429, 500, 503, 504];

/// What every shard shares of the API: the rate limit per key, and the counters.
pub struct ApiShared {
    /// One bucket per key, keyed by the first bytes of the key's digest.
    buckets: KeyedBuckets<u64, 1>,
    /// Requests answered, by route and status (`STATUSES` and `other`).
    requests: [[AtomicU64; STATUSES.len() + 1]; Route::ALL.len()],
    /// Publications (single or batched) that got an offset, and that were refused.
    published: AtomicU64,
    refused: AtomicU64,
}

impl ApiShared {
    pub fn new(limit: [Bucket; 1]) -> Self {
        Self {
            buckets: KeyedBuckets::new(limit),
            requests: Default::default(),
            published: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    pub fn set_limit(&self, limit: [Bucket; 1]) {
        self.buckets.set_limits(limit);
    }

    fn count(&self, route: Route, status: u16) {
        let column = STATUSES.iter().position(|&s| s == status).unwrap_or(STATUSES.len());
        self.requests[route as usize][column].fetch_add(1, Ordering::Relaxed);
    }

    /// `(route, status, count)` of every pair counted at least once.
    pub fn request_counts(&self) -> Vec<(&'static str, String, u64)> {
        let mut counts = Vec::new();
        for route in Route::ALL {
            for (column, counter) in self.requests[route as usize].iter().enumerate() {
                let count = counter.load(Ordering::Relaxed);
                if count > 0 {
                    let status = STATUSES.get(column).map_or_else(|| "other".to_owned(), u16::to_string);
                    counts.push((route.label(), status, count));
                }
            }
        }
        counts
    }

    /// Publications that got an offset, and that were refused.
    pub fn publication_counts(&self) -> (u64, u64) {
        (self.published.load(Ordering::Relaxed), self.refused.load(Ordering::Relaxed))
    }
}

/// The per-key bucket in force under `config` (off with `rate_limits.enabled = false`).
pub fn request_limit(config: &Config) -> [Bucket; 1] {
    if config.rate_limits.enabled {
        [config.rate_limits.api_requests]
    } else {
        [Bucket::new(0, 60, 0)]
    }
}

pub fn is_api_path(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// Accepts on `api.listen`: each connection gets one API request.
pub(super) async fn accept_loop(listener: TcpListener, state: Rc<RefCell<ShardState>>) {
    use futures_util::StreamExt;
    let mut incoming = listener.incoming();
    while let Some(accepted) = incoming.next().await {
        match accepted {
            Ok(stream) => super::supervise::spawn(&state, super::Task::Http, serve_connection(state.clone(), stream)),
            Err(_) if !state.borrow().cluster.accepting.load(Ordering::SeqCst) => return,
            Err(err) => {
                tracing::warn!(error = %err, "API accept failed");
                compio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve_connection(state: Rc<RefCell<ShardState>>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let limits = state.borrow_mut().config().limits.clone();
    let mut head_bytes = Vec::new();
    let read = read_head(&mut stream, &mut head_bytes, limits.max_request_header_bytes, limits.max_request_headers);
    let response = match compio::time::timeout(limits.handshake_timeout, read).await {
        Ok(Ok(Some((head, consumed)))) if is_api_path(&head.path) => {
            return serve(&state, stream, head, head_bytes.split_off(consumed)).await;
        }
        Ok(Ok(Some(_))) => http::error_response(404, "this address serves the API only (/api/…)"),
        Ok(Ok(None)) => return,
        Ok(Err(err)) => http::error_response(err.status(), &err.to_string()),
        Err(_) => http::error_response(408, "request head not received in time"),
    };
    respond_and_close(stream, response).await;
}

/// An answer: status, body, and `Retry-After` for 429.
struct Reply {
    status: u16,
    format: Format,
    body: Vec<u8>,
    retry_after: Option<u64>,
}

impl Reply {
    fn ok(format: Format, answer: &impl codec::Answer) -> Reply {
        Reply { status: 200, format, body: answer.encode_as(format), retry_after: None }
    }

    fn error(status: u16, format: Format, message: impl Into<String>) -> Reply {
        let error = pb::Error { code: u32::from(status), message: message.into(), retry_after_ms: 0 };
        Reply { status, format, body: error.encode_as(format), retry_after: None }
    }

    fn into_bytes(self) -> Vec<u8> {
        let content_type = self.format.content_type();
        match (self.status, self.retry_after) {
            (429, Some(seconds)) => {
                http::response_with_header(429, content_type, Some(("Retry-After", &seconds.to_string())), &self.body)
            }
            (401, _) => http::response_with_header(401, content_type, Some(("WWW-Authenticate", "Bearer")), &self.body),
            (status, _) => http::response(status, content_type, &self.body),
        }
    }
}

/// Serves one API request whose head was read; `early` is what followed the head.
pub(super) async fn serve<S: Transport>(
    state: &Rc<RefCell<ShardState>>,
    mut stream: S,
    head: RequestHead,
    early: Vec<u8>,
) {
    let (route, method, target) = Route::of(&head.path);
    let reply = match handle(state, &mut stream, &head, early, route, method, target).await {
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
    route: Route,
    method: &str,
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
    if let Err(wait) = cluster.api.buckets.take(&key, 0, Instant::now()) {
        let mut reply = Reply::error(429, format, "rate limited (rate_limits.api_requests): retry later");
        reply.retry_after = Some(super::admission::retry_after_secs(wait));
        return Some(reply);
    }
    if route == Route::Unknown {
        return Some(Reply::error(404, format, "no such API route; see the README's \"Server API\""));
    }
    if head.method != method {
        return Some(Reply::error(405, format, format!("use {method}")));
    }
    if method == "GET" {
        let format = Format::of_accept(head.body.accept.as_deref());
        return Some(match route {
            Route::Channels => channels(state, &head.query, format).await,
            Route::History => history(state, target, &head.query, &config, format).await,
            _ => subscriptions(state, target, format).await,
        });
    }
    let format = match head.body.content_type.as_deref().map(Format::of_content_type) {
        Some(Some(format)) => format,
        _ if route == Route::Disconnect && head.body.content_length.is_none_or(|l| l == Ok(0)) => Format::Json,
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
        Route::Publish => publish(state, &body, &config, format).await,
        Route::PublishBatch => publish_batch(state, &body, &config, format).await,
        _ => disconnect(state, target, &body, format).await,
    })
}

/// Which key the request presents: its bucket id, or the status and why not.
fn authenticate(keys: &[String], authorization: Option<&str>) -> Result<u64, (u16, &'static str)> {
    let Some(authorization) = authorization else {
        return Err((401, "send the API key as `Authorization: Bearer KEY`"));
    };
    let presented = match authorization.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
        _ => return Err((401, "send the API key as `Authorization: Bearer KEY`")),
    };
    if keys.is_empty() {
        return Err((403, "no API key is configured (api.keys): the API is off"));
    }
    // Digests have one length whatever the keys', and every key is compared, so the time taken
    // says nothing about how much of a key was right, nor which key matched.
    let presented = Sha256::digest(presented.as_bytes());
    let mut matched = None;
    for key in keys {
        let digest = Sha256::digest(key.as_bytes());
        let equal = bool::from(digest[..].ct_eq(&presented[..]));
        if equal && matched.is_none() {
            matched = Some(u64::from_le_bytes(digest[..8].try_into().unwrap_or_default()));
        }
    }
    matched.ok_or((403, "the API key is not one of api.keys"))
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

/// Waits until every part of request `token` is answered (`None`: not within the timeout).
async fn answers(state: &Rc<RefCell<ShardState>>, token: u32) -> Option<Vec<Answer>> {
    struct Forget<'a>(&'a Rc<RefCell<ShardState>>, u32);
    impl Drop for Forget<'_> {
        fn drop(&mut self) {
            // Answers that come later find nobody and are dropped.
            if let Ok(mut shard) = self.0.try_borrow_mut() {
                shard.api.forget(self.1);
            }
        }
    }
    let _forget = Forget(state, token);
    let all = poll_fn(|cx| state.borrow_mut().api.poll(token, cx));
    compio::time::timeout(ANSWER_TIMEOUT, all).await.ok()
}

fn timed_out(format: Format) -> Reply {
    Reply::error(504, format, "no answer from the shards or the broker in time; retry")
}

fn error_status(code: ErrorCode) -> u16 {
    u16::try_from(code.code()).unwrap_or(500)
}

async fn publish(state: &Rc<RefCell<ShardState>>, body: &[u8], config: &Config, format: Format) -> Reply {
    let publish = match codec::decode_publish(format, body) {
        Ok(publish) => publish,
        Err(message) => return Reply::error(400, format, message),
    };
    let cluster = state.borrow().cluster.clone();
    let (channel, update) =
        match accept_publish(publish, unix_us(), config.limits.max_channel_length, config.limits.max_payload_size) {
            Ok(accepted) => accepted,
            Err(refused) => {
                cluster.api.refused.fetch_add(1, Ordering::Relaxed);
                return Reply::error(error_status(refused.code), format, refused.message);
            }
        };
    let token = {
        let mut shard = state.borrow_mut();
        let token = shard.api.register(1);
        shard.submit_publish(ConnId::api_request(token), 0, channel, update);
        token
    };
    match answers(state, token).await.as_deref() {
        Some([Answer::Published(Ok(position))]) => {
            cluster.api.published.fetch_add(1, Ordering::Relaxed);
            let result = pb::PublishResult { epoch: position.epoch.to_string(), offset: position.offset };
            Reply::ok(format, &result)
        }
        Some([Answer::Published(Err(code))]) => {
            cluster.api.refused.fetch_add(1, Ordering::Relaxed);
            Reply::error(error_status(*code), format, unavailable_message(*code))
        }
        _ => timed_out(format),
    }
}

fn unavailable_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Unavailable => "overloaded or the broker is away; retry later",
        _ => "refused",
    }
}

/// Every valid publication goes to its owner at once, in batch order: one shard's messages
/// to another travel one FIFO inbox (and the Redis bridge starts requests in the order it
/// gets them), so publications of one channel get their offsets in batch order.
async fn publish_batch(state: &Rc<RefCell<ShardState>>, body: &[u8], config: &Config, format: Format) -> Reply {
    let publications = match codec::decode_batch(format, body) {
        Ok(publications) => publications,
        Err(message) => return Reply::error(400, format, message),
    };
    let max = config.api.max_batch_publications;
    if publications.len() > max {
        let message = format!(
            "{} publications in one batch, the limit is {max} (api.max_batch_publications)",
            publications.len()
        );
        return Reply::error(413, format, message);
    }
    let cluster = state.borrow().cluster.clone();
    let now_us = unix_us();
    let mut refusals = Vec::with_capacity(publications.len());
    let token = {
        let mut shard = state.borrow_mut();
        let token = shard.api.register(publications.len());
        for (index, publish) in publications.into_iter().enumerate() {
            let limits = &config.limits;
            match accept_publish(publish, now_us, limits.max_channel_length, limits.max_payload_size) {
                Ok((channel, update)) => {
                    refusals.push(None);
                    shard.submit_publish(ConnId::api_request(token), index as u32, channel, update);
                }
                Err(refused) => {
                    shard.api.answer_token(token, index as u32, Answer::Failed(refused.code));
                    refusals.push(Some(refused.message));
                }
            }
        }
        token
    };
    let Some(answers) = answers(state, token).await else { return timed_out(format) };
    let (mut published, mut refused) = (0, 0);
    let results = answers
        .into_iter()
        .zip(refusals)
        .map(|(answer, refusal)| {
            use pb::publish_outcome::Outcome;
            let outcome = match answer {
                Answer::Published(Ok(position)) => {
                    published += 1;
                    Outcome::Published(pb::PublishResult { epoch: position.epoch.to_string(), offset: position.offset })
                }
                Answer::Published(Err(code)) | Answer::Failed(code) => {
                    refused += 1;
                    let message = refusal.unwrap_or_else(|| unavailable_message(code).to_owned());
                    Outcome::Error(pb::Error { code: code.code(), message, retry_after_ms: 0 })
                }
                _ => Outcome::Error(pb::Error { code: 500, message: "unexpected answer".into(), retry_after_ms: 0 }),
            };
            pb::PublishOutcome { outcome: Some(outcome) }
        })
        .collect();
    cluster.api.published.fetch_add(published, Ordering::Relaxed);
    cluster.api.refused.fetch_add(refused, Ordering::Relaxed);
    Reply::ok(format, &pb::PublishBatchResult { results })
}

/// `name=value` pairs of a query string, percent-decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').filter_map(|pair| pair.split_once('=')).find(|(n, _)| *n == name).map(|(_, v)| percent_decode(v))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A number from the query, `default` when absent.
fn query_number(query: &str, name: &str, default: u64) -> Result<u64, String> {
    match query_value(query, name) {
        None => Ok(default),
        Some(value) => value.parse().map_err(|_| format!("`{name}` must be a whole number, not `{value}`")),
    }
}

async fn channels(state: &Rc<RefCell<ShardState>>, query: &str, format: Format) -> Reply {
    let prefix: Arc<str> = Arc::from(query_value(query, "prefix").unwrap_or_default());
    let after: Arc<str> = Arc::from(query_value(query, "after").unwrap_or_default());
    let limit = match query_number(query, "limit", DEFAULT_PAGE as u64) {
        Ok(0) => DEFAULT_PAGE,
        Ok(limit) => (limit as usize).min(MAX_PAGE),
        Err(message) => return Reply::error(400, format, message),
    };
    let token = {
        let mut shard = state.borrow_mut();
        let shards = shard.cluster.inboxes.len();
        let token = shard.api.register(shards);
        let from = shard.id;
        for to in 0..shards {
            // One more than a page from each, so the merge knows whether another page follows.
            let (prefix, after) = (prefix.clone(), after.clone());
            let msg = ApiMsg::ListChannels { from, token, shard: to, prefix, after, limit: limit + 1 };
            shard.route(to, ShardMsg::Api(msg));
        }
        token
    };
    let Some(answers) = answers(state, token).await else { return timed_out(format) };
    let mut channels: Vec<_> = answers
        .into_iter()
        .flat_map(|answer| match answer {
            Answer::Channels(list) => list,
            _ => Vec::new(),
        })
        .collect();
    channels.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    let next_after = match channels.len() > limit {
        true => {
            channels.truncate(limit);
            channels.last().map(|c| c.name.to_string()).unwrap_or_default()
        }
        false => String::new(),
    };
    let channels = channels
        .into_iter()
        .map(|c| pb::ChannelInfo {
            channel: c.name.to_string(),
            subscribers: c.subscribers,
            epoch: c.position.epoch.to_string(),
            offset: c.position.offset,
        })
        .collect();
    Reply::ok(format, &pb::ChannelList { channels, next_after })
}

async fn history(
    state: &Rc<RefCell<ShardState>>,
    channel: &str,
    query: &str,
    config: &Config,
    format: Format,
) -> Reply {
    let channel = percent_decode(channel);
    if let Err(err) = validate_channel(&channel, config.limits.max_channel_length) {
        return Reply::error(400, format, err.to_string());
    }
    let (since, limit) = match (query_number(query, "since", 0), query_number(query, "limit", 0)) {
        (Ok(since), Ok(0)) => (since, DEFAULT_HISTORY),
        (Ok(since), Ok(limit)) => (since, (limit as usize).min(MAX_HISTORY)),
        (Err(message), _) | (_, Err(message)) => return Reply::error(400, format, message),
    };
    let token = {
        let mut shard = state.borrow_mut();
        let token = shard.api.register(1);
        shard.submit_history(ConnId::api_request(token), 0, Arc::from(channel), since, limit);
        token
    };
    match answers(state, token).await.as_deref() {
        Some([Answer::History(page)]) => Reply::ok(format, &crate::protocol::push::history_result(page)),
        Some([Answer::Failed(code)]) => Reply::error(error_status(*code), format, unavailable_message(*code)),
        _ => timed_out(format),
    }
}

/// A client id, `<shard>-<slot>-<generation>`, as its shard and connection.
fn parse_client(client_id: &str, shards: usize) -> Option<(usize, ConnId)> {
    let mut parts = client_id.split('-');
    let shard: usize = parts.next()?.parse().ok()?;
    let index: u32 = parts.next()?.parse().ok()?;
    let generation: u32 = parts.next()?.parse().ok()?;
    let conn = ConnId { index, generation };
    (parts.next().is_none() && shard < shards && conn.api_token().is_none()).then_some((shard, conn))
}

fn no_such_client(client_id: &str, format: Format) -> Reply {
    Reply::error(404, format, format!("no client `{client_id}` on this node"))
}

/// Sends the shard that holds `client_id` the message `ask` makes of (this shard, the
/// request's token, the client) and waits for its one answer; `Err` is the reply to give
/// when there is no such client or no answer came in time.
async fn ask_client_shard(
    state: &Rc<RefCell<ShardState>>,
    client_id: &str,
    format: Format,
    ask: impl FnOnce(usize, u32, ConnId) -> ApiMsg,
) -> Result<Answer, Reply> {
    let shards = state.borrow().cluster.inboxes.len();
    let Some((to, client)) = parse_client(client_id, shards) else { return Err(no_such_client(client_id, format)) };
    let token = {
        let mut shard = state.borrow_mut();
        let token = shard.api.register(1);
        let from = shard.id;
        shard.route(to, ShardMsg::Api(ask(from, token, client)));
        token
    };
    match answers(state, token).await {
        Some(mut answers) if answers.len() == 1 => Ok(answers.remove(0)),
        Some(_) => Err(no_such_client(client_id, format)),
        None => Err(timed_out(format)),
    }
}

async fn subscriptions(state: &Rc<RefCell<ShardState>>, client_id: &str, format: Format) -> Reply {
    let ask = |from, token, client| ApiMsg::Subscriptions { from, token, client };
    match ask_client_shard(state, client_id, format, ask).await {
        Ok(Answer::Subscriptions(Some(mut list))) => {
            list.sort_unstable_by_key(|&(sub_id, _, _)| sub_id);
            let subscriptions = list
                .into_iter()
                .map(|(sub_id, channel, active)| pb::ClientSubscription {
                    sub_id,
                    channel: channel.to_string(),
                    active,
                })
                .collect();
            Reply::ok(format, &pb::ClientSubscriptions { client_id: client_id.to_owned(), subscriptions })
        }
        Ok(_) => no_such_client(client_id, format),
        Err(reply) => reply,
    }
}

async fn disconnect(state: &Rc<RefCell<ShardState>>, client_id: &str, body: &[u8], format: Format) -> Reply {
    let request = match codec::decode_disconnect(format, body) {
        Ok(request) => request,
        Err(message) => return Reply::error(400, format, message),
    };
    let code = match request.code {
        0 => CloseCode::Shutdown,
        number => match CloseCode::ALL.iter().find(|c| u32::from(c.code()) == number) {
            Some(&code) => code,
            None => {
                let message = format!("close code {number} is not one of the README's close codes");
                return Reply::error(400, format, message);
            }
        },
    };
    let reason = match request.reason.trim() {
        "" => "disconnected by the server API".to_owned(),
        reason => reason.chars().take(120).collect(),
    };
    let ask = |from, token, client| ApiMsg::Disconnect { from, token, client, code, reason };
    match ask_client_shard(state, client_id, format, ask).await {
        Ok(Answer::Disconnected(true)) => Reply::ok(format, &pb::DisconnectResult { client_id: client_id.to_owned() }),
        Ok(_) => no_such_client(client_id, format),
        Err(reply) => reply,
    }
}

/// Acts on a server API message on the shard it was sent to.
pub(super) fn handle_msg(shard: &mut ShardState, msg: ApiMsg) {
    let (from, token, answer) = match msg {
        ApiMsg::ListChannels { from, token, shard: part, prefix, after, limit } => {
            let list = shard.broker().list_channels(&prefix, &after, limit);
            let answer = ApiMsg::Answer { token, part: part as u32, answer: Answer::Channels(list) };
            return shard.route(from, ShardMsg::Api(answer));
        }
        ApiMsg::Subscriptions { from, token, client } => {
            let list = shard.conn(client).map(|c| {
                c.session.subscriptions().map(|(channel, sub_id, active)| (sub_id, channel.clone(), active)).collect()
            });
            (from, token, Answer::Subscriptions(list))
        }
        ApiMsg::Disconnect { from, token, client, code, reason } => {
            let found = match shard.conn(client) {
                Some(conn) => {
                    let label = conn.session.client_id();
                    tracing::info!(conn = %label, code = code.code(), reason = %reason, "disconnected by the server API");
                    conn.session.close(code, reason);
                    true
                }
                None => false,
            };
            if found {
                shard.drive(client);
            }
            (from, token, Answer::Disconnected(found))
        }
        ApiMsg::Answer { token, part, answer } => return shard.api.answer_token(token, part, answer),
    };
    shard.route(from, ShardMsg::Api(ApiMsg::Answer { token, part: 0, answer }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_told_apart_missing_from_wrong() {
        let keys = vec!["old-key-0123456789".to_owned(), "new-key-0123456789".to_owned()];
        assert_eq!(authenticate(&keys, None).unwrap_err().0, 401);
        assert_eq!(authenticate(&keys, Some("Basic abc")).unwrap_err().0, 401);
        assert_eq!(authenticate(&keys, Some("Bearer nope")).unwrap_err().0, 403);
        assert_eq!(authenticate(&[], Some("Bearer old-key-0123456789")).unwrap_err().0, 403);
        let old = authenticate(&keys, Some("Bearer old-key-0123456789")).unwrap();
        let new = authenticate(&keys, Some("bearer new-key-0123456789")).unwrap();
        assert_ne!(old, new, "each key has its own bucket");
    }

    #[test]
    fn routes_and_their_targets() {
        assert_eq!(Route::of("/api/publish"), (Route::Publish, "POST", ""));
        assert_eq!(Route::of("/api/channels/user@x/route-1/history"), (Route::History, "GET", "user@x/route-1"));
        assert_eq!(Route::of("/api/clients/1-2-3/disconnect"), (Route::Disconnect, "POST", "1-2-3"));
        assert_eq!(Route::of("/api/clients/1-2-3/subscriptions").0, Route::Subscriptions);
        assert_eq!(Route::of("/api/nothing").0, Route::Unknown);
    }

    #[test]
    fn client_ids_name_a_shard_and_slot() {
        assert_eq!(parse_client("1-7-3", 2), Some((1, ConnId { index: 7, generation: 3 })));
        assert_eq!(parse_client("2-7-3", 2), None, "no shard 2");
        assert_eq!(parse_client("1-7", 2), None);
        assert_eq!(parse_client("0-4294967295-1", 2), None, "an API request is no client");
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(query_value("prefix=route%3A&limit=5", "prefix").as_deref(), Some("route:"));
        assert_eq!(query_number("limit=5", "limit", 100), Ok(5));
        assert_eq!(query_number("", "limit", 100), Ok(100));
        assert!(query_number("limit=x", "limit", 100).unwrap_err().contains("`limit`"));
    }
}
