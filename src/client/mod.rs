//! A client for routopia-realtime (and, in raw mode, for any WebSocket server), on compio.
//!
//! ```no_run
//! # async fn demo() -> Result<(), routopia_realtime::client::ClientError> {
//! use routopia_realtime::client::{Client, ConnectOptions};
//! use routopia_realtime::protocol::pb::UpdateType;
//! let addr = "127.0.0.1:3000".parse().unwrap();
//! let options = ConnectOptions { token: "eyJhbGciOi…".into(), ..ConnectOptions::default() };
//! let (mut client, _info) = Client::connect(addr, options).await?;
//! let sub = client.subscribe("route:42").await?;
//! client.publish("route:42", UpdateType::Route, "leg-1", b"{\"eta\":300}".to_vec()).await?;
//! let update = client.next_update().await?;
//! assert_eq!(update.sub_id, sub.sub_id);
//! # Ok(()) }
//! ```
//!
//! [`Client::split`] gives a [`Sender`] and a [`Receiver`] that can live in separate tasks.
//! [`resilient::ResilientClient`] reconnects, resubscribes and recovers by itself.

pub mod resilient;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use compio::buf::BufResult;
use compio::io::{AsyncRead, AsyncWriteExt};
use compio::net::TcpStream;

use crate::protocol::envelope::{self, Dictionaries, EnvelopeError};
use crate::protocol::pb::{self, client_frame::Command, reply, server_frame::Kind, ClientFrame, ServerFrame};
use crate::protocol::ws::{MessageReader, ServerEvent, WsEndpoint};

/// Largest message the client accepts from a server.
const MAX_INCOMING: usize = 64 * 1024 * 1024;
const READ_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake refused: {0}")]
    Handshake(String),
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("undecodable message from the server: {0}")]
    Decode(#[from] EnvelopeError),
    #[error("server error {}: {}", .0.code, .0.message)]
    Server(pb::Error),
    #[error("disconnected by the server: {} {}", .0.code, .0.reason)]
    Disconnected(pb::Disconnect),
    #[error("connection closed (close code {0:?})")]
    Closed(Option<u16>),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// What `Connect` says about this client.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub token: String,
    pub name: String,
    pub accept_zstd: bool,
    /// Where fresh tokens come from. With it, [`resilient::ResilientClient`] asks for a new
    /// token before every (re)connect and refreshes in-band `refresh_threshold` before expiry.
    pub token_source: Option<TokenSource>,
    /// How long before expiry to refresh. Default 5 minutes.
    pub refresh_threshold: Duration,
    /// The server's zstd dictionaries this client holds (from [`fetch_zstd_dictionaries`]);
    /// their ids go in `Connect`, and compressed messages naming them are decoded.
    pub zstd_dictionaries: Vec<Bytes>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            token: String::new(),
            name: String::new(),
            accept_zstd: false,
            token_source: None,
            refresh_threshold: Duration::from_secs(300),
            zstd_dictionaries: Vec::new(),
        }
    }
}

type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>>>>;

/// A callback that fetches a fresh token (from the app's auth backend).
#[derive(Clone)]
pub struct TokenSource(Rc<dyn Fn() -> TokenFuture>);

impl TokenSource {
    pub fn new<F, Fut>(fetch: F) -> Self
    where
        F: Fn() -> Fut + 'static,
        Fut: Future<Output = Result<String, String>> + 'static,
    {
        Self(Rc::new(move || Box::pin(fetch())))
    }

    pub async fn fetch(&self) -> Result<String, String> {
        (self.0)().await
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource")
    }
}

/// A connection to the server. Requests wait for their reply; frames that arrive meanwhile
/// are kept, in order, for [`Client::next_frame`].
pub struct Client {
    sender: Sender,
    receiver: Receiver,
}

/// The socket's write side, shared by the sender and the receiver (which answers pings).
struct Writer {
    stream: TcpStream,
    ws: WsEndpoint,
}

type SharedWriter = Rc<futures_util::lock::Mutex<Writer>>;

/// The sending half of a connection.
pub struct Sender {
    writer: SharedWriter,
    next_id: u32,
}

/// The receiving half of a connection. It answers the server's pings by itself, so a
/// connection stays alive as long as someone reads it.
pub struct Receiver {
    stream: TcpStream,
    reader: MessageReader,
    buffer: Vec<u8>,
    frames: VecDeque<ServerFrame>,
    writer: SharedWriter,
    pings: u64,
    /// zstd dictionaries named in `Connect`.
    dictionaries: Rc<Dictionaries>,
}

/// Fetches every zstd dictionary the server at `addr` compresses with
/// (`GET /zstd/dictionaries`, then `GET /zstd/dictionaries/{id}` each), for
/// [`ConnectOptions::zstd_dictionaries`].
pub async fn fetch_zstd_dictionaries(addr: SocketAddr) -> Result<Vec<Bytes>, ClientError> {
    let list = http_get(addr, "/zstd/dictionaries").await?;
    let list: serde_json::Value =
        serde_json::from_slice(&list).map_err(|err| ClientError::Unexpected(format!("dictionary list: {err}")))?;
    let ids =
        list["dictionaries"].as_array().map(Vec::as_slice).unwrap_or_default().iter().filter_map(|d| d["id"].as_u64());
    let mut dictionaries = Vec::new();
    for id in ids {
        dictionaries.push(http_get(addr, &format!("/zstd/dictionaries/{id}")).await?);
    }
    Ok(dictionaries)
}

/// A plain HTTP/1.1 GET whose answer must be 200; returns the body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<Bytes, ClientError> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let BufResult(result, _) = stream.write_all(request.into_bytes()).await;
    result?;
    let mut response = Vec::new();
    let mut chunk = Vec::with_capacity(16 * 1024);
    loop {
        chunk.clear();
        let BufResult(result, returned) = stream.read(chunk).await;
        chunk = returned;
        match result? {
            0 => break,
            _ => response.extend_from_slice(&chunk),
        }
        // A server that never stops sending must not grow this without bound.
        if response.len() > MAX_INCOMING {
            return Err(ClientError::Unexpected(format!("GET {path}: response over {MAX_INCOMING} bytes")));
        }
    }
    let split = response.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(at) => (String::from_utf8_lossy(&response[..at]).into_owned(), response[at + 4..].to_vec()),
        None => return Err(ClientError::Unexpected(format!("GET {path}: no complete response"))),
    };
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or_default().to_owned();
        return Err(ClientError::Unexpected(format!("GET {path}: {status}")));
    }
    Ok(body.into())
}

impl Client {
    /// Opens a WebSocket to `path` without speaking the protocol (raw mode, for any server).
    pub async fn connect_raw(addr: SocketAddr, path: &str) -> Result<Client, ClientError> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let leftover = handshake(&mut stream, addr, path).await?;
        let mut reader = MessageReader::new(MAX_INCOMING);
        reader.feed(&leftover);
        let (read_half, write_half) = stream.into_split();
        let writer = Rc::new(futures_util::lock::Mutex::new(Writer {
            stream: write_half,
            ws: WsEndpoint::client(MAX_INCOMING),
        }));
        Ok(Client {
            sender: Sender { writer: writer.clone(), next_id: 1 },
            receiver: Receiver {
                stream: read_half,
                reader,
                buffer: Vec::with_capacity(READ_BUFFER),
                frames: VecDeque::new(),
                writer,
                pings: 0,
                dictionaries: Rc::default(),
            },
        })
    }

    /// Opens a WebSocket to `/ws` and sends `Connect`.
    pub async fn connect(
        addr: SocketAddr,
        options: ConnectOptions,
    ) -> Result<(Client, pb::ConnectResult), ClientError> {
        let mut client = Client::connect_raw(addr, "/ws").await?;
        let mut dictionaries = Dictionaries::default();
        for dictionary in &options.zstd_dictionaries {
            dictionaries.add(dictionary);
        }
        let connect = pb::Connect {
            token: options.token,
            name: options.name,
            version: env!("CARGO_PKG_VERSION").into(),
            accept_zstd: options.accept_zstd,
            zstd_dictionaries: dictionaries.ids(),
        };
        client.receiver.dictionaries = Rc::new(dictionaries);
        match client.request(Command::Connect(connect)).await? {
            reply::Result::Connect(result) => Ok((client, result)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Splits into halves that can be used from separate tasks.
    pub fn split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }

    /// Sends `command` and waits for its reply; an `Error` reply is `ClientError::Server`.
    pub async fn request(&mut self, command: Command) -> Result<reply::Result, ClientError> {
        let id = self.sender.send_command(command).await?;
        self.receiver.reply(id).await
    }

    pub async fn subscribe(&mut self, channel: &str) -> Result<pb::SubscribeResult, ClientError> {
        self.subscribe_with(pb::Subscribe { channel: channel.into(), ..Default::default() }).await
    }

    /// Subscribes and recovers every publication after `epoch`/`offset` (the last one seen).
    pub async fn subscribe_from(
        &mut self,
        channel: &str,
        epoch: &str,
        offset: u64,
    ) -> Result<pb::SubscribeResult, ClientError> {
        let subscribe =
            pb::Subscribe { channel: channel.into(), recover: true, epoch: epoch.into(), offset, ..Default::default() };
        self.subscribe_with(subscribe).await
    }

    /// Subscribes with every field of `Subscribe` under the caller's control.
    pub async fn subscribe_with(&mut self, subscribe: pb::Subscribe) -> Result<pb::SubscribeResult, ClientError> {
        match self.request(Command::Subscribe(subscribe)).await? {
            reply::Result::Subscribe(result) => Ok(result),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn unsubscribe(&mut self, sub_id: u32) -> Result<(), ClientError> {
        match self.request(Command::Unsubscribe(pb::Unsubscribe { sub_id })).await? {
            reply::Result::Unsubscribe(_) => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Acknowledges every update on `sub_id` up to `offset` (no reply unless it fails).
    pub async fn ack(&mut self, sub_id: u32, offset: u64) -> Result<(), ClientError> {
        let frame = ClientFrame { id: 0, command: Some(Command::Ack(pb::Ack { sub_id, offset })) };
        self.send_frames(vec![frame]).await
    }

    /// Replaces the connection's token without reconnecting; returns the new expiry.
    pub async fn refresh(&mut self, token: String) -> Result<pb::RefreshResult, ClientError> {
        match self.request(Command::Refresh(pb::Refresh { token })).await? {
            reply::Result::Refresh(result) => Ok(result),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Pings received from the server (and answered) so far.
    pub fn pings(&self) -> u64 {
        self.receiver.pings()
    }

    /// Up to `limit` publications of `channel` after offset `since`.
    pub async fn history(&mut self, channel: &str, since: u64, limit: u32) -> Result<pb::HistoryResult, ClientError> {
        match self.request(Command::History(pb::History { channel: channel.into(), since, limit })).await? {
            reply::Result::History(result) => Ok(result),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Publishes and returns the offset the update got.
    pub async fn publish(
        &mut self,
        channel: &str,
        update_type: pb::UpdateType,
        key: &str,
        payload: Vec<u8>,
    ) -> Result<pb::PublishResult, ClientError> {
        let publish = pb::Publish {
            channel: channel.into(),
            r#type: update_type as i32,
            key: key.into(),
            confidence: 1.0,
            payload: payload.into(),
        };
        match self.request(Command::Publish(publish)).await? {
            reply::Result::Publish(result) => Ok(result),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The next update, skipping other frames; a `Disconnect` ends it with an error.
    pub async fn next_update(&mut self) -> Result<pb::Update, ClientError> {
        self.receiver.next_update().await
    }

    /// The next frame of any kind.
    pub async fn next_frame(&mut self) -> Result<ServerFrame, ClientError> {
        self.receiver.next_frame().await
    }

    /// Sends frames as one message.
    pub async fn send_frames(&mut self, frames: Vec<ClientFrame>) -> Result<(), ClientError> {
        self.sender.send_frames(frames).await
    }

    /// Sends any bytes as one binary WebSocket message.
    pub async fn send_binary(&mut self, data: Bytes) -> Result<(), ClientError> {
        self.sender.send_binary(data).await
    }

    /// Sends bytes exactly as given, bypassing WebSocket framing (for testing bad input).
    pub async fn send_wire(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.sender.send_wire(bytes).await
    }

    /// The next binary message, undecoded.
    pub async fn next_message(&mut self) -> Result<Bytes, ClientError> {
        self.receiver.next_message().await
    }
}

impl Sender {
    /// Sends one command with a fresh request id and returns the id.
    pub async fn send_command(&mut self, command: Command) -> Result<u32, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        self.send_frames(vec![ClientFrame { id, command: Some(command) }]).await?;
        Ok(id)
    }

    pub async fn send_frames(&mut self, frames: Vec<ClientFrame>) -> Result<(), ClientError> {
        let bytes = envelope::encode::<pb::ClientMessage>(frames, None);
        self.send_binary(bytes.into()).await
    }

    pub async fn send_binary(&mut self, data: Bytes) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().await;
        writer.ws.send_binary(data)?;
        let wire = writer.ws.take_output();
        let BufResult(result, _) = writer.stream.write_all(wire).await;
        Ok(result?)
    }

    pub async fn send_wire(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().await;
        let BufResult(result, _) = writer.stream.write_all(bytes).await;
        Ok(result?)
    }
}

impl Receiver {
    /// Pings received from the server (and answered) so far.
    pub fn pings(&self) -> u64 {
        self.pings
    }

    /// The next binary message, undecoded.
    pub async fn next_message(&mut self) -> Result<Bytes, ClientError> {
        loop {
            match self.reader.next_event()? {
                Some(ServerEvent::Binary(data)) => return Ok(data),
                Some(ServerEvent::Text(_)) => continue,
                Some(ServerEvent::Ping(payload)) => {
                    self.pings += 1;
                    let mut writer = self.writer.lock().await;
                    writer.ws.pong(payload);
                    let wire = writer.ws.take_output();
                    let BufResult(result, _) = writer.stream.write_all(wire).await;
                    result?;
                    continue;
                }
                Some(ServerEvent::Close(code)) => return Err(ClientError::Closed(code)),
                None => {}
            }
            let buffer = std::mem::take(&mut self.buffer);
            let BufResult(result, buffer) = self.stream.read(buffer).await;
            self.buffer = buffer;
            match result? {
                0 => return Err(ClientError::Closed(None)),
                n => self.reader.feed(&self.buffer[..n]),
            }
        }
    }

    /// The next frame of any kind (plain or zstd envelopes alike).
    pub async fn next_frame(&mut self) -> Result<ServerFrame, ClientError> {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(frame);
            }
            let message = self.next_message().await?;
            self.frames.extend(envelope::decode::<pb::ServerMessage>(message, MAX_INCOMING, &self.dictionaries)?);
        }
    }

    /// The next update, skipping pongs and replies; a `Disconnect` ends it with an error.
    pub async fn next_update(&mut self) -> Result<pb::Update, ClientError> {
        loop {
            match self.next_frame().await?.kind {
                Some(Kind::Update(update)) => return Ok(update),
                Some(Kind::Disconnect(disconnect)) => return Err(ClientError::Disconnected(disconnect)),
                _ => continue,
            }
        }
    }

    /// Waits for the reply to request `id`, keeping other frames for later.
    pub async fn reply(&mut self, id: u32) -> Result<reply::Result, ClientError> {
        let mut kept = Vec::new();
        let outcome = loop {
            let frame = match self.next_frame().await {
                Ok(frame) => frame,
                Err(err) => break Err(err),
            };
            match frame.kind {
                Some(Kind::Reply(pb::Reply { id: reply_id, result })) if reply_id == id => {
                    break match result {
                        Some(reply::Result::Error(error)) => Err(ClientError::Server(error)),
                        Some(result) => Ok(result),
                        None => Err(ClientError::Unexpected("empty reply".into())),
                    }
                }
                Some(Kind::Disconnect(disconnect)) => break Err(ClientError::Disconnected(disconnect)),
                _ => kept.push(frame),
            }
        };
        for frame in kept.into_iter().rev() {
            self.frames.push_front(frame);
        }
        outcome
    }
}

/// Performs the HTTP upgrade; returns bytes that arrived after the response head.
async fn handshake(stream: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<Vec<u8>, ClientError> {
    let key = tungstenite::handshake::client::generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    let BufResult(result, _) = stream.write_all(request.into_bytes()).await;
    result?;
    let mut received = Vec::new();
    let mut chunk = Vec::with_capacity(4096);
    loop {
        let BufResult(result, returned) = stream.read(chunk).await;
        chunk = returned;
        match result? {
            0 => return Err(ClientError::Handshake("connection closed during the handshake".into())),
            n => received.extend_from_slice(&chunk[..n]),
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let used = match response.parse(&received) {
            Ok(httparse::Status::Complete(used)) => used,
            Ok(httparse::Status::Partial) if received.len() < 16 * 1024 => continue,
            _ => return Err(ClientError::Handshake("malformed response".into())),
        };
        if response.code != Some(101) {
            let status = response.code.unwrap_or(0);
            let body = String::from_utf8_lossy(&received[used..]).trim().to_owned();
            return Err(ClientError::Handshake(format!("HTTP {status}: {body}")));
        }
        let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let accepted = response
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == expected.as_bytes());
        if !accepted {
            return Err(ClientError::Handshake("wrong Sec-WebSocket-Accept".into()));
        }
        return Ok(received[used..].to_vec());
    }
}
