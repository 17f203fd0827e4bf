//! The server API's bodies: requests decoded from protobuf (the messages of
//! `proto/realtime.proto`) or JSON with the same field names (payloads base64), answers
//! encoded the way the request asked.

use base64::Engine as _;
use prost::Message;
use serde::Deserialize;

use crate::protocol::{http, pb};

pub const PROTOBUF: &str = "application/x-protobuf";
pub const JSON: &str = "application/json";

/// How a body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Protobuf,
}

impl Format {
    /// The format a `Content-Type` names, if the API speaks it.
    pub fn of_content_type(content_type: &str) -> Option<Format> {
        match content_type {
            PROTOBUF | "application/protobuf" | "application/vnd.google.protobuf" => Some(Format::Protobuf),
            JSON => Some(Format::Json),
            _ => None,
        }
    }

    /// The format of a GET's answer: protobuf when `Accept` asks for it, else JSON.
    pub fn of_accept(accept: Option<&str>) -> Format {
        let wants_protobuf = accept.is_some_and(|accept| {
            accept
                .split(',')
                .filter_map(|t| t.split(';').next())
                .any(|t| Format::of_content_type(t.trim()) == Some(Format::Protobuf))
        });
        if wants_protobuf {
            Format::Protobuf
        } else {
            Format::Json
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => JSON,
            Format::Protobuf => PROTOBUF,
        }
    }
}

/// A body that does not decode; the message says what is wrong.
pub type Malformed = String;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPublish {
    channel: String,
    #[serde(rename = "type")]
    update_type: JsonUpdateType,
    #[serde(default)]
    key: String,
    #[serde(default)]
    confidence: f32,
    /// base64 (standard alphabet, padded).
    #[serde(default)]
    payload: String,
}

/// `"ROUTE"` or `1`.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonUpdateType {
    Name(String),
    Number(i32),
}

impl JsonPublish {
    fn into_publish(self, index: Option<usize>) -> Result<pb::Publish, Malformed> {
        let payload =
            base64::engine::general_purpose::STANDARD.decode(self.payload.as_bytes()).map_err(|err| match index {
                Some(index) => format!("publications[{index}].payload is not base64: {err}"),
                None => format!("payload is not base64: {err}"),
            })?;
        let update_type = match self.update_type {
            // An unknown name becomes UNSPECIFIED, refused like any publication of no type.
            JsonUpdateType::Name(name) => pb::UpdateType::from_str_name(&name).map_or(0, |t| t as i32),
            JsonUpdateType::Number(number) => number,
        };
        Ok(pb::Publish {
            channel: self.channel,
            r#type: update_type,
            key: self.key,
            confidence: self.confidence,
            payload: payload.into(),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBatch {
    publications: Vec<JsonPublish>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct JsonDisconnect {
    code: u32,
    reason: String,
}

fn json_error(err: serde_json::Error) -> Malformed {
    format!("malformed JSON: {err}")
}

fn protobuf_error(what: &str, err: prost::DecodeError) -> Malformed {
    format!("malformed protobuf `{what}`: {err}")
}

pub fn decode_publish(format: Format, body: &[u8]) -> Result<pb::Publish, Malformed> {
    match format {
        Format::Protobuf => pb::Publish::decode(body).map_err(|err| protobuf_error("Publish", err)),
        Format::Json => serde_json::from_slice::<JsonPublish>(body).map_err(json_error)?.into_publish(None),
    }
}

pub fn decode_batch(format: Format, body: &[u8]) -> Result<Vec<pb::Publish>, Malformed> {
    match format {
        Format::Protobuf => {
            pb::PublishBatch::decode(body).map(|b| b.publications).map_err(|err| protobuf_error("PublishBatch", err))
        }
        Format::Json => {
            let batch: JsonBatch = serde_json::from_slice(body).map_err(json_error)?;
            batch.publications.into_iter().enumerate().map(|(index, p)| p.into_publish(Some(index))).collect()
        }
    }
}

/// An empty body asks for the defaults.
pub fn decode_disconnect(format: Format, body: &[u8]) -> Result<pb::DisconnectRequest, Malformed> {
    if body.is_empty() {
        return Ok(pb::DisconnectRequest::default());
    }
    match format {
        Format::Protobuf => pb::DisconnectRequest::decode(body).map_err(|err| protobuf_error("DisconnectRequest", err)),
        Format::Json => {
            let request: JsonDisconnect = serde_json::from_slice(body).map_err(json_error)?;
            Ok(pb::DisconnectRequest { code: request.code, reason: request.reason })
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn type_name(update_type: i32) -> &'static str {
    pb::UpdateType::try_from(update_type).map_or("UPDATE_TYPE_UNSPECIFIED", |t| t.as_str_name())
}

/// An answer of the API, ready to encode either way.
pub trait Answer: Message + Sized {
    fn to_json(&self) -> serde_json::Value;

    fn encode_as(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Protobuf => self.encode_to_vec(),
            // A line, so that curl's output ends where a terminal expects.
            Format::Json => format!("{}\n", self.to_json()).into_bytes(),
        }
    }
}

impl Answer for pb::Error {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl Answer for pb::PublishResult {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"epoch": self.epoch, "offset": self.offset})
    }
}

impl Answer for pb::PublishBatchResult {
    fn to_json(&self) -> serde_json::Value {
        let results: Vec<serde_json::Value> = self
            .results
            .iter()
            .map(|item| match &item.outcome {
                Some(pb::publish_outcome::Outcome::Published(published)) => published.to_json(),
                Some(pb::publish_outcome::Outcome::Error(error)) => error.to_json(),
                None => serde_json::Value::Null,
            })
            .collect();
        serde_json::json!({"results": results})
    }
}

impl Answer for pb::ChannelList {
    fn to_json(&self) -> serde_json::Value {
        let channels: Vec<serde_json::Value> = self
            .channels
            .iter()
            .map(|c| {
                serde_json::json!({"channel": c.channel, "subscribers": c.subscribers, "epoch": c.epoch, "offset": c.offset})
            })
            .collect();
        serde_json::json!({"channels": channels, "next_after": self.next_after})
    }
}

impl Answer for pb::HistoryResult {
    fn to_json(&self) -> serde_json::Value {
        let publications: Vec<serde_json::Value> = self
            .publications
            .iter()
            .map(|p| {
                serde_json::json!({
                    "offset": p.offset,
                    "type": type_name(p.r#type),
                    "key": p.key,
                    "confidence": p.confidence,
                    "timestamp_us": p.timestamp_us,
                    "payload": base64(&p.payload),
                })
            })
            .collect();
        serde_json::json!({
            "epoch": self.epoch,
            "offset": self.offset,
            "publications": publications,
            "truncated": self.truncated,
        })
    }
}

impl Answer for pb::ClientSubscriptions {
    fn to_json(&self) -> serde_json::Value {
        let subscriptions: Vec<serde_json::Value> = self
            .subscriptions
            .iter()
            .map(|s| serde_json::json!({"sub_id": s.sub_id, "channel": s.channel, "active": s.active}))
            .collect();
        serde_json::json!({"client_id": self.client_id, "subscriptions": subscriptions})
    }
}

impl Answer for pb::DisconnectResult {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"client_id": self.client_id})
    }
}

/// An answer: status, body, and `Retry-After` for 429.
pub(super) struct Reply {
    pub(super) status: u16,
    format: Format,
    body: Vec<u8>,
    pub(super) retry_after: Option<u64>,
}

impl Reply {
    pub(super) fn ok(format: Format, answer: &impl Answer) -> Reply {
        Reply { status: 200, format, body: answer.encode_as(format), retry_after: None }
    }

    pub(super) fn error(status: u16, format: Format, message: impl Into<String>) -> Reply {
        let error = pb::Error { code: u32::from(status), message: message.into(), retry_after_ms: 0 };
        Reply { status, format, body: error.encode_as(format), retry_after: None }
    }

    pub(super) fn into_bytes(self) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_publish_takes_type_names_or_numbers_and_base64_payloads() {
        let body = br#"{"channel": "route:42", "type": "ROUTE", "key": "k", "confidence": 0.5, "payload": "aGk="}"#;
        let publish = decode_publish(Format::Json, body).unwrap();
        assert_eq!((publish.channel.as_str(), publish.r#type, publish.payload.as_ref()), ("route:42", 1, &b"hi"[..]));
        let numbered = decode_publish(Format::Json, br#"{"channel": "poi:x", "type": 5}"#).unwrap();
        assert_eq!(numbered.r#type, 5);
        let unknown = decode_publish(Format::Json, br#"{"channel": "poi:x", "type": "BOAT"}"#).unwrap();
        assert_eq!(unknown.r#type, 0, "refused later, with the other checks of a publication");
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let missing = decode_publish(Format::Json, br#"{"type": "ROUTE"}"#).unwrap_err();
        assert!(missing.contains("missing field `channel`"), "{missing}");
        let payload = decode_publish(Format::Json, br#"{"channel": "a", "type": 1, "payload": "%%"}"#).unwrap_err();
        assert!(payload.contains("payload is not base64"), "{payload}");
        let item = br#"{"publications": [{"channel": "a", "type": 1}, {"channel": "a", "type": 1, "payload": "!"}]}"#;
        assert!(decode_batch(Format::Json, item).unwrap_err().contains("publications[1].payload"));
        let protobuf = decode_publish(Format::Protobuf, b"\xff\xff\xff").unwrap_err();
        assert!(protobuf.contains("malformed protobuf `Publish`"), "{protobuf}");
        assert!(decode_publish(Format::Json, b"{").unwrap_err().starts_with("malformed JSON"));
    }

    #[test]
    fn accept_picks_protobuf_only_when_asked() {
        assert_eq!(Format::of_accept(None), Format::Json);
        assert_eq!(Format::of_accept(Some("*/*")), Format::Json);
        assert_eq!(Format::of_accept(Some("text/html, application/x-protobuf;q=0.9")), Format::Protobuf);
        assert_eq!(Format::of_content_type("application/json"), Some(Format::Json));
        assert_eq!(Format::of_content_type("text/plain"), None);
    }
}
