//! One function per endpoint of the server API, each talking to the shards: what a request
//! needs from other shards (channel owners, the Redis bridge, a client's shard) travels as
//! [`ApiMsg`]s and comes back to this shard's [`Waiters`](super::Waiters), which the request
//! awaits. [`handle_msg`] is the other side: an `ApiMsg` acted on where it was sent.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;

use super::codec::Reply;
use super::codec::{self, Format};
use super::waiters::{Answer, ApiMsg};
use super::ANSWER_TIMEOUT;
use crate::broker::accept_publish;
use crate::config::Config;
use crate::core::ConnId;
use crate::core::{unix_us, validate_channel};
use crate::protocol::{pb, CloseCode, ErrorCode};
use crate::shard::state::ShardState;
use crate::shard::ShardMsg;

/// Channels per page of `GET /api/channels` unless `limit` says otherwise, and at most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Publications per page of history unless `limit` says otherwise, and at most (as `History`).
const DEFAULT_HISTORY: usize = 100;
const MAX_HISTORY: usize = 1000;

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

pub(super) async fn publish(state: &Rc<RefCell<ShardState>>, body: &[u8], config: &Config, format: Format) -> Reply {
    let publish = match codec::decode_publish(format, body) {
        Ok(publish) => publish,
        Err(message) => return Reply::error(400, format, message),
    };
    let cluster = state.borrow().cluster.clone();
    let (channel, update) =
        match accept_publish(publish, unix_us(), config.limits.max_channel_length, config.limits.max_payload_size) {
            Ok(accepted) => accepted,
            Err(refused) => {
                cluster.api.count_refused(1);
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
            cluster.api.count_published(1);
            let result = pb::PublishResult { epoch: position.epoch.to_string(), offset: position.offset };
            Reply::ok(format, &result)
        }
        Some([Answer::Published(Err(code))]) => {
            cluster.api.count_refused(1);
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
pub(super) async fn publish_batch(
    state: &Rc<RefCell<ShardState>>,
    body: &[u8],
    config: &Config,
    format: Format,
) -> Reply {
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
    cluster.api.count_published(published);
    cluster.api.count_refused(refused);
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

pub(super) async fn channels(state: &Rc<RefCell<ShardState>>, query: &str, format: Format) -> Reply {
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

pub(super) async fn history(
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

pub(super) async fn subscriptions(state: &Rc<RefCell<ShardState>>, client_id: &str, format: Format) -> Reply {
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

pub(super) async fn disconnect(state: &Rc<RefCell<ShardState>>, client_id: &str, body: &[u8], format: Format) -> Reply {
    let request = match codec::decode_disconnect(format, body) {
        Ok(request) => request,
        Err(message) => return Reply::error(400, format, message),
    };
    let code = match request.code {
        0 => CloseCode::Shutdown,
        number => match CloseCode::ALL.iter().find(|c| u32::from(c.code()) == number) {
            Some(&code) => code,
            None => {
                let message = format!("close code {number} is not one of the close codes of docs/protocol.md");
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
pub(in crate::shard) fn handle_msg(shard: &mut ShardState, msg: ApiMsg) {
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
