//! WebSocket conformance over raw frames: the echo endpoint (`testing.echo_endpoint`, what the
//! Autobahn suite of `tests/autobahn/run.sh` drives) and what the suite found, checked on the
//! endpoint it was found on and on `/ws`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{token, TestServer};
use prost::Message;
use routopia_realtime::protocol::pb::{self, client_frame::Command, server_frame::Kind};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
const FIN: u8 = 0x80;

fn echo_server() -> TestServer {
    TestServer::start(1, &[("ROUTOPIA_TESTING__ECHO_ENDPOINT", "true")])
}

/// A masked client frame: `first` is the FIN bit and opcode.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        len if len < 126 => out.push(0x80 | len as u8),
        len if len <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A close frame with `code` and `reason` bytes (which need not be UTF-8).
fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    frame(FIN | CLOSE, &[&code.to_be_bytes()[..], reason].concat())
}

/// One server frame: opcode, FIN, payload.
#[derive(PartialEq)]
struct ServerFrame {
    opcode: u8,
    fin: bool,
    payload: Vec<u8>,
}

impl std::fmt::Debug for ServerFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.payload[..self.payload.len().min(40)];
        write!(f, "frame opcode {:#x} fin {} {} bytes {:02x?}", self.opcode, self.fin, self.payload.len(), shown)
    }
}

impl ServerFrame {
    fn close_code(&self) -> Option<u16> {
        (self.opcode == CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A WebSocket spoken frame by frame over a blocking socket.
struct RawWs {
    stream: TcpStream,
}

impl RawWs {
    /// Upgrades on `path`; `Err` holds the status line of a refusal.
    fn open(addr: SocketAddr, path: &str) -> Result<RawWs, String> {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).expect("send the upgrade");
        // Byte by byte, so nothing after the head is taken from the frames that follow.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status = head.lines().next().unwrap_or_default().to_owned();
        if status.starts_with("HTTP/1.1 101") {
            Ok(RawWs { stream })
        } else {
            Err(status)
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send frames");
    }

    /// The next frame, `None` once the server closed the TCP connection.
    fn next_frame(&mut self) -> Option<ServerFrame> {
        let mut head = [0u8; 2];
        if self.stream.read_exact(&mut head).is_err() {
            return None;
        }
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] & 0x7f {
            126 => {
                let mut len = [0u8; 2];
                self.stream.read_exact(&mut len).expect("length");
                u16::from_be_bytes(len) as usize
            }
            127 => {
                let mut len = [0u8; 8];
                self.stream.read_exact(&mut len).expect("length");
                u64::from_be_bytes(len) as usize
            }
            len => len as usize,
        };
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).expect("payload");
        Some(ServerFrame { opcode: head[0] & 0x0f, fin: head[0] & FIN != 0, payload })
    }

    /// Expects the close frame with `code` next, then the end of the TCP connection.
    fn expect_close(&mut self, code: u16) {
        let close = self.next_frame().expect("a close frame");
        assert_eq!(close.close_code(), Some(code), "{close:?}");
        assert_eq!(self.next_frame(), None, "the server drops the connection after its close");
    }

    /// Sends `Connect` on `/ws` and reads its answer.
    fn connect(&mut self) {
        let connect = pb::Connect { token: token("tester"), name: "raw".into(), ..Default::default() };
        self.send_command(1, Command::Connect(connect));
        let answer = self.next_frame().expect("the answer to Connect");
        assert_eq!(answer.opcode, BINARY, "{answer:?}");
    }

    fn send_command(&mut self, id: u32, command: Command) {
        self.send(&command_message(id, command));
    }
}

/// A binary frame carrying one command.
fn command_message(id: u32, command: Command) -> Vec<u8> {
    let message =
        pb::ClientMessage { frames: vec![pb::ClientFrame { id, command: Some(command) }], ..Default::default() };
    frame(FIN | BINARY, &message.encode_to_vec())
}

fn server_frames(payload: &[u8]) -> Vec<pb::ServerFrame> {
    pb::ServerMessage::decode(payload).expect("a ServerMessage").frames
}

#[test]
fn echo_path_is_not_found_unless_enabled() {
    let server = TestServer::start(1, &[]);
    let refused = RawWs::open(server.addr, "/echo").err().expect("no echo endpoint by default");
    assert!(refused.starts_with("HTTP/1.1 404"), "{refused}");
    let (status, _) = server.http_get("/echo");
    assert_eq!(status, 404);
}

#[test]
fn echo_sends_text_and_binary_back_whole() {
    let server = echo_server();
    let mut ws = RawWs::open(server.addr, "/echo").expect("upgrade on /echo");
    let text = "Grüße, Zürich → Köln".as_bytes();
    ws.send(&[frame(TEXT, &text[..8]), frame(FIN, &text[8..])].concat());
    assert_eq!(ws.next_frame(), Some(ServerFrame { opcode: TEXT, fin: true, payload: text.to_vec() }));
    let binary: Vec<u8> = (0..65_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(&frame(FIN | BINARY, &binary));
    assert_eq!(ws.next_frame(), Some(ServerFrame { opcode: BINARY, fin: true, payload: binary }));
    ws.send(&frame(FIN | BINARY, b""));
    assert_eq!(ws.next_frame(), Some(ServerFrame { opcode: BINARY, fin: true, payload: Vec::new() }));
    ws.send(&close_frame(1000, b"done"));
    ws.expect_close(1000);
}

#[test]
fn echo_keeps_the_message_size_limit_of_ws() {
    let server = echo_server();
    let mut ws = RawWs::open(server.addr, "/echo").expect("upgrade on /echo");
    ws.send(&frame(FIN | BINARY, &vec![0u8; 64 * 1024 + 1]));
    // No `Disconnect` frame first: the echo endpoint speaks no protocol.
    ws.expect_close(1009);
}

// Found by Autobahn 5.6–5.8, 5.19, 5.20: a pong was queued after the echo of a message whose
// last fragment came after the ping, so the client saw the answers out of order.
#[test]
fn pong_precedes_the_echo_of_a_message_finished_after_the_ping() {
    let server = echo_server();
    let mut ws = RawWs::open(server.addr, "/echo").expect("upgrade on /echo");
    ws.send(&[frame(TEXT, b"frag"), frame(FIN | PING, b"ping!"), frame(FIN, b"ment")].concat());
    assert_eq!(ws.next_frame(), Some(ServerFrame { opcode: PONG, fin: true, payload: b"ping!".to_vec() }));
    assert_eq!(ws.next_frame(), Some(ServerFrame { opcode: TEXT, fin: true, payload: b"fragment".to_vec() }));
}

// The same finding on `/ws`: the pong goes out before the reply to a command that came after
// the ping.
#[test]
fn pong_precedes_the_reply_to_a_command_sent_after_the_ping_on_ws() {
    let server = TestServer::start(1, &[]);
    let mut ws = RawWs::open(server.addr, "/ws").expect("upgrade on /ws");
    ws.connect();
    let ping_command = command_message(2, Command::Ping(pb::Ping { timestamp_us: 7 }));
    ws.send(&[frame(FIN | PING, b"hello"), ping_command].concat());
    assert_eq!(ws.next_frame(), Some(ServerFrame { opcode: PONG, fin: true, payload: b"hello".to_vec() }));
    let reply = ws.next_frame().expect("the protocol's Pong");
    assert!(
        matches!(
            server_frames(&reply.payload)[..],
            [pb::ServerFrame { kind: Some(Kind::Pong(pb::Pong { timestamp_us: 7 })) }]
        ),
        "{reply:?}"
    );
}

// Found by Autobahn 6.3–6.21: text that is not UTF-8 closed with 1002 (protocol error); RFC
// 6455 7.4.1 names 1007 for it.
#[test]
fn invalid_utf8_text_closes_the_echo_endpoint_with_1007() {
    let server = echo_server();
    let mut ws = RawWs::open(server.addr, "/echo").expect("upgrade on /echo");
    ws.send(&frame(FIN | TEXT, b"valid so far \xed\xa0\x80 then a surrogate"));
    ws.expect_close(1007);
}

// The same finding on `/ws`, where text is refused anyway: a close frame whose reason is not
// UTF-8 is answered with 1007 (the `Disconnect` frame says so too).
#[test]
fn invalid_utf8_close_reason_closes_ws_with_1007() {
    let server = TestServer::start(1, &[]);
    let mut ws = RawWs::open(server.addr, "/ws").expect("upgrade on /ws");
    ws.connect();
    ws.send(&close_frame(1000, b"bye \xff\xfe"));
    let disconnect = ws.next_frame().expect("a Disconnect frame");
    match &server_frames(&disconnect.payload)[..] {
        [pb::ServerFrame { kind: Some(Kind::Disconnect(d)) }] => assert_eq!(d.code, 1007, "{d:?}"),
        other => panic!("expected a Disconnect, got {other:?}"),
    }
    ws.expect_close(1007);
}
