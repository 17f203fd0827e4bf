//! What a debug log line shows of a frame: its kind and the fields that are safe to keep.
//! A token is never among them, only its length. Strings the client chose are logged quoted
//! and escaped, so none can pass for another field or line.

use crate::core::ConnLabel;
use crate::protocol::pb::{self, client_frame::Command, reply, server_frame::Kind};

/// One frame as a log line shows it. `None` fields are left out of the line.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct FrameLog<'a> {
    pub kind: &'static str,
    /// The client's request id (its reply carries it back): with the connection, what ties a
    /// request to its answer and to every line about it.
    pub req_id: Option<u32>,
    pub channel: Option<&'a str>,
    pub sub_id: Option<u32>,
    pub offset: Option<u64>,
    pub code: Option<u32>,
    pub update_type: Option<&'static str>,
    pub payload_bytes: Option<usize>,
    pub token_bytes: Option<usize>,
    pub client_name: Option<&'a str>,
    /// An error's message or a disconnect's reason (the server's own words).
    pub detail: Option<&'a str>,
}

/// Whether frames are logged: checked before building a [`FrameLog`], so nothing is spent on
/// frames while debug is off.
pub(crate) fn enabled() -> bool {
    tracing::enabled!(tracing::Level::DEBUG)
}

impl<'a> FrameLog<'a> {
    /// A frame from the client: request `id` carrying `command`.
    pub fn client(id: u32, command: Option<&'a Command>) -> Self {
        let base = FrameLog { req_id: Some(id), ..FrameLog::default() };
        let Some(command) = command else { return FrameLog { kind: "Unknown", ..base } };
        match command {
            Command::Connect(c) => FrameLog {
                kind: "Connect",
                token_bytes: Some(c.token.len()),
                client_name: (!c.name.is_empty()).then_some(c.name.as_str()),
                ..base
            },
            Command::Subscribe(s) => {
                FrameLog { kind: "Subscribe", channel: Some(&s.channel), offset: s.recover.then_some(s.offset), ..base }
            }
            Command::Unsubscribe(u) => FrameLog { kind: "Unsubscribe", sub_id: Some(u.sub_id), ..base },
            Command::Publish(p) => FrameLog {
                kind: "Publish",
                channel: Some(&p.channel),
                update_type: pb::UpdateType::try_from(p.r#type).ok().map(|t| t.as_str_name()),
                payload_bytes: Some(p.payload.len()),
                ..base
            },
            Command::Ack(a) => FrameLog { kind: "Ack", sub_id: Some(a.sub_id), offset: Some(a.offset), ..base },
            Command::Ping(_) => FrameLog { kind: "Ping", ..base },
            Command::Refresh(r) => FrameLog { kind: "Refresh", token_bytes: Some(r.token.len()), ..base },
            Command::History(h) => {
                FrameLog { kind: "History", channel: Some(&h.channel), offset: Some(h.since), ..base }
            }
        }
    }

    /// A frame to the client.
    pub fn server(frame: &'a pb::ServerFrame) -> Self {
        let Some(kind) = &frame.kind else { return FrameLog { kind: "Unknown", ..FrameLog::default() } };
        match kind {
            Kind::Reply(reply) => Self::reply(reply),
            Kind::Update(u) => {
                FrameLog { kind: "Update", sub_id: Some(u.sub_id), offset: Some(u.offset), ..FrameLog::default() }
            }
            Kind::Pong(_) => FrameLog { kind: "Pong", ..FrameLog::default() },
            Kind::Disconnect(d) => {
                FrameLog { kind: "Disconnect", code: Some(d.code), detail: Some(&d.reason), ..FrameLog::default() }
            }
            Kind::TokenExpiring(_) => FrameLog { kind: "TokenExpiring", ..FrameLog::default() },
        }
    }

    fn reply(reply: &'a pb::Reply) -> Self {
        let base = FrameLog { req_id: Some(reply.id), ..FrameLog::default() };
        let Some(result) = &reply.result else { return FrameLog { kind: "Reply", ..base } };
        match result {
            reply::Result::Error(e) => FrameLog { kind: "Error", code: Some(e.code), detail: Some(&e.message), ..base },
            reply::Result::Connect(_) => FrameLog { kind: "ConnectResult", ..base },
            reply::Result::Subscribe(s) => {
                FrameLog { kind: "SubscribeResult", sub_id: Some(s.sub_id), offset: Some(s.offset), ..base }
            }
            reply::Result::Unsubscribe(u) => FrameLog { kind: "UnsubscribeResult", sub_id: Some(u.sub_id), ..base },
            reply::Result::Publish(p) => FrameLog { kind: "PublishResult", offset: Some(p.offset), ..base },
            reply::Result::History(h) => FrameLog { kind: "HistoryResult", offset: Some(h.offset), ..base },
            reply::Result::Refresh(_) => FrameLog { kind: "RefreshResult", ..base },
        }
    }

    /// Logs the frame at debug as received (`incoming`) or sent on connection `conn`.
    pub fn log(&self, conn: ConnLabel, incoming: bool) {
        macro_rules! frame_line {
            ($message:literal) => {
                tracing::debug!(
                    conn = %conn,
                    kind = %self.kind,
                    req_id = self.req_id,
                    channel = self.channel,
                    sub_id = self.sub_id,
                    offset = self.offset,
                    code = self.code,
                    update_type = self.update_type,
                    payload_bytes = self.payload_bytes,
                    token_bytes = self.token_bytes,
                    client_name = self.client_name,
                    detail = self.detail,
                    $message
                )
            };
        }
        if incoming {
            frame_line!("frame in")
        } else {
            frame_line!("frame out")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_show_only_their_length() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
        let connect = Command::Connect(pb::Connect { token: token.into(), name: "app".into(), ..Default::default() });
        let refresh = Command::Refresh(pb::Refresh { token: token.into() });
        for command in [&connect, &refresh] {
            let log = FrameLog::client(1, Some(command));
            assert_eq!(log.token_bytes, Some(token.len()));
            let shown = format!("{log:?}");
            for part in std::iter::once(token).chain(token.split('.')) {
                assert!(!shown.contains(part), "{part} shown in {shown}");
            }
        }
    }

    #[test]
    fn requests_show_their_id_kind_and_channel() {
        let subscribe = Command::Subscribe(pb::Subscribe { channel: "route:a".into(), ..Default::default() });
        let log = FrameLog::client(7, Some(&subscribe));
        assert_eq!((log.kind, log.req_id, log.channel, log.offset), ("Subscribe", Some(7), Some("route:a"), None));
        let publish = Command::Publish(pb::Publish {
            channel: "route:a".into(),
            r#type: pb::UpdateType::Route as i32,
            payload: vec![0; 12].into(),
            ..Default::default()
        });
        let log = FrameLog::client(8, Some(&publish));
        assert_eq!((log.kind, log.update_type, log.payload_bytes), ("Publish", Some("ROUTE"), Some(12)));
        assert_eq!(FrameLog::client(9, None).kind, "Unknown");
    }

    #[test]
    fn replies_show_the_request_they_answer() {
        let error = pb::ServerFrame {
            kind: Some(Kind::Reply(pb::Reply {
                id: 4,
                result: Some(reply::Result::Error(pb::Error { code: 400, message: "bad".into(), retry_after_ms: 0 })),
            })),
        };
        let log = FrameLog::server(&error);
        assert_eq!((log.kind, log.req_id, log.code, log.detail), ("Error", Some(4), Some(400), Some("bad")));
        let published = pb::ServerFrame {
            kind: Some(Kind::Reply(pb::Reply {
                id: 5,
                result: Some(reply::Result::Publish(pb::PublishResult { epoch: "e".into(), offset: 3 })),
            })),
        };
        let log = FrameLog::server(&published);
        assert_eq!((log.kind, log.req_id, log.offset), ("PublishResult", Some(5), Some(3)));
        let pong = pb::ServerFrame { kind: Some(Kind::Pong(pb::Pong { timestamp_us: 1 })) };
        assert_eq!(FrameLog::server(&pong), FrameLog { kind: "Pong", ..FrameLog::default() });
    }
}
