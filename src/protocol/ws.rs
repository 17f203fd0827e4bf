//! WebSocket framing without I/O. tungstenite parses, unmasks, reassembles and validates what
//! arrives (and answers pings and closes); it reads from and writes to [`MemStream`], which the
//! connection's I/O driver fills from the socket and empties into its outbox. Data the server
//! sends bypasses tungstenite: [`write_binary_header`] frames pre-encoded batches directly.

use std::io::{self, Cursor, Read, Write};

use bytes::{Buf, Bytes, BytesMut};
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::frame::coding::{CloseCode as WsCloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// An in-memory duplex byte stream: `input` is what the peer sent, `output` what tungstenite
/// wants to send. Reads of an empty input are `WouldBlock`, so tungstenite yields.
#[derive(Debug, Default)]
pub struct MemStream {
    input: Vec<u8>,
    read_pos: usize,
    output: Vec<u8>,
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = &self.input[self.read_pos..];
        if available.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.read_pos += n;
        if self.read_pos == self.input.len() {
            // Everything fed was taken: an idle connection keeps no input buffer at all.
            self.input = Vec::new();
            self.read_pos = 0;
        }
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One side of a WebSocket connection, fed bytes and drained of bytes by its owner.
pub struct WsEndpoint {
    ws: WebSocket<MemStream>,
}

/// What the WebSocket layer made of the bytes fed so far.
#[derive(Debug)]
pub enum WsEvent {
    Binary(Bytes),
    /// A text message, its UTF-8 already validated.
    Text(Bytes),
    /// The peer sent a close frame (tungstenite has queued the reply).
    Closed(Option<u16>),
}

impl WsEndpoint {
    /// A server-side endpoint that accepts messages up to `max_message_size` bytes.
    pub fn server(max_message_size: usize) -> Self {
        Self::new(Role::Server, max_message_size)
    }

    /// A client-side endpoint (masks what it sends).
    pub fn client(max_message_size: usize) -> Self {
        Self::new(Role::Client, max_message_size)
    }

    fn new(role: Role, max_message_size: usize) -> Self {
        let config = WebSocketConfig::default()
            .read_buffer_size(512)
            .write_buffer_size(0)
            .max_message_size(Some(max_message_size))
            .max_frame_size(Some(max_message_size));
        Self { ws: WebSocket::from_raw_socket(MemStream::default(), role, Some(config)) }
    }

    /// Appends bytes received from the peer.
    pub fn feed(&mut self, bytes: &[u8]) {
        let stream = self.ws.get_mut();
        stream.input.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. Pings and pongs are
    /// handled inside (a ping's pong lands in the output).
    pub fn next_event(&mut self) -> Result<Option<WsEvent>, tungstenite::Error> {
        loop {
            match self.ws.read() {
                Ok(Message::Binary(data)) => return Ok(Some(WsEvent::Binary(data))),
                Ok(Message::Text(text)) => return Ok(Some(WsEvent::Text(text.into()))),
                Ok(Message::Close(frame)) => return Ok(Some(WsEvent::Closed(frame.map(|f| u16::from(f.code))))),
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(err) => return Err(err),
            }
        }
    }

    /// Sends a binary message through tungstenite (clients: it masks).
    pub fn send_binary(&mut self, data: Bytes) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::Binary(data))
    }

    /// Sends a ping; the peer answers with a pong carrying the same payload.
    pub fn ping(&mut self, payload: Bytes) {
        // Writing into memory cannot fail; an error only says the connection is closing.
        let _ = self.ws.send(Message::Ping(payload));
    }

    /// Sends a pong (a client answering the server's ping).
    pub fn pong(&mut self, payload: Bytes) {
        let _ = self.ws.send(Message::Pong(payload));
    }

    /// Starts the closing handshake with `code` and `reason`.
    pub fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: WsCloseCode::from(code), reason: reason.to_owned().into() };
        // An error here means a close is already under way, which is what we want anyway.
        let _ = self.ws.close(Some(frame));
        let _ = self.ws.flush();
    }

    /// Writes replies tungstenite holds back until its next call (the answer to a close).
    pub fn flush(&mut self) {
        // Writing into memory cannot fail; an error only says the connection already closed.
        let _ = self.ws.flush();
    }

    /// Bytes tungstenite queued for the peer (control frames; a client's messages).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.ws.get_mut().output)
    }

    pub fn has_output(&self) -> bool {
        !self.ws.get_ref().output.is_empty()
    }
}

/// Appends the header of an unmasked, final, binary frame of `len` payload bytes.
pub fn write_binary_header(out: &mut Vec<u8>, len: usize) {
    write_data_header(out, false, len);
}

/// Appends the header of an unmasked, final data frame of `len` payload bytes: text or binary.
pub fn write_data_header(out: &mut Vec<u8>, text: bool, len: usize) {
    out.push(if text { 0x81 } else { 0x82 });
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Size of the header `write_binary_header` writes.
pub fn binary_header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    }
}

/// Reads what a server sends: its frames are unmasked, so each payload is sliced out of the
/// receive buffer without another copy. Clients (and the load generator) use it; the server's
/// inbound side keeps tungstenite's full validation.
#[derive(Debug)]
pub struct MessageReader {
    pending: BytesMut,
    /// A fragmented message being reassembled: whether it is binary, and its bytes so far.
    partial: Option<(bool, BytesMut)>,
    max_message_size: usize,
}

/// One complete message (or control frame) from a server.
#[derive(Debug, PartialEq)]
pub enum ServerEvent {
    Binary(Bytes),
    Text(Bytes),
    Ping(Bytes),
    Close(Option<u16>),
}

impl MessageReader {
    pub fn new(max_message_size: usize) -> Self {
        Self { pending: BytesMut::new(), partial: None, max_message_size }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete message; `Ok(None)` (consuming nothing) while more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<ServerEvent>, tungstenite::Error> {
        loop {
            let mut cursor = Cursor::new(&self.pending[..]);
            let Some((header, len)) = FrameHeader::parse(&mut cursor)? else { return Ok(None) };
            let header_len = cursor.position() as usize;
            if len > self.max_message_size as u64 {
                return Err(tungstenite::Error::Capacity(CapacityError::MessageTooLong {
                    size: len as usize,
                    max_size: self.max_message_size,
                }));
            }
            if self.pending.len() < header_len + len as usize {
                return Ok(None);
            }
            self.pending.advance(header_len);
            let mut payload = self.pending.split_to(len as usize);
            if let Some(mask) = header.mask {
                for (i, byte) in payload.iter_mut().enumerate() {
                    *byte ^= mask[i % 4];
                }
            }
            match header.opcode {
                OpCode::Control(Control::Close) => {
                    let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Ok(Some(ServerEvent::Close(code)));
                }
                OpCode::Control(Control::Ping) => return Ok(Some(ServerEvent::Ping(payload.freeze()))),
                OpCode::Control(_) => continue,
                OpCode::Data(Data::Continue) => {
                    let Some((binary, mut so_far)) = self.partial.take() else {
                        return Err(tungstenite::Error::Protocol(ProtocolError::UnexpectedContinueFrame));
                    };
                    if so_far.len() + payload.len() > self.max_message_size {
                        return Err(tungstenite::Error::Capacity(CapacityError::MessageTooLong {
                            size: so_far.len() + payload.len(),
                            max_size: self.max_message_size,
                        }));
                    }
                    so_far.extend_from_slice(&payload);
                    if !header.is_final {
                        self.partial = Some((binary, so_far));
                        continue;
                    }
                    return Ok(Some(Self::data(binary, so_far.freeze())));
                }
                OpCode::Data(kind @ (Data::Binary | Data::Text)) => {
                    let binary = kind == Data::Binary;
                    if !header.is_final {
                        self.partial = Some((binary, payload));
                        continue;
                    }
                    return Ok(Some(Self::data(binary, payload.freeze())));
                }
                OpCode::Data(Data::Reserved(_)) => {
                    return Err(tungstenite::Error::Protocol(ProtocolError::UnknownDataFrameType(0)))
                }
            }
        }
    }

    fn data(binary: bool, payload: Bytes) -> ServerEvent {
        if binary {
            ServerEvent::Binary(payload)
        } else {
            ServerEvent::Text(payload)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_written_by_hand_parse_on_a_client() {
        let mut client = WsEndpoint::client(1 << 20);
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![7u8; len];
            let mut wire = Vec::new();
            write_binary_header(&mut wire, len);
            assert_eq!(wire.len(), binary_header_len(len));
            wire.extend_from_slice(&payload);
            client.feed(&wire);
            match client.next_event().unwrap() {
                Some(WsEvent::Binary(data)) => assert_eq!(data.as_ref(), payload.as_slice()),
                other => panic!("expected binary, got {other:?}"),
            }
        }
    }

    #[test]
    fn client_messages_reach_the_server_in_pieces() {
        let mut client = WsEndpoint::client(1 << 20);
        let mut server = WsEndpoint::server(1 << 20);
        client.send_binary(Bytes::from_static(b"hello routopia")).unwrap();
        let wire = client.take_output();
        for byte in &wire[..wire.len() - 1] {
            server.feed(std::slice::from_ref(byte));
            assert!(server.next_event().unwrap().is_none());
        }
        server.feed(&wire[wire.len() - 1..]);
        match server.next_event().unwrap() {
            Some(WsEvent::Binary(data)) => assert_eq!(data.as_ref(), b"hello routopia"),
            other => panic!("expected binary, got {other:?}"),
        }
    }

    #[test]
    fn an_endpoint_keeps_no_input_buffer_once_its_input_is_taken() {
        let mut client = WsEndpoint::client(1 << 20);
        let mut server = WsEndpoint::server(1 << 20);
        client.send_binary(Bytes::from(vec![5u8; 3000])).unwrap();
        let wire = client.take_output();
        server.feed(&wire[..100]);
        assert!(server.next_event().unwrap().is_none());
        server.feed(&wire[100..]);
        assert!(matches!(server.next_event().unwrap(), Some(WsEvent::Binary(data)) if data.len() == 3000));
        assert!(server.next_event().unwrap().is_none());
        assert_eq!(server.ws.get_ref().input.capacity(), 0, "nothing is held between messages");
    }

    #[test]
    fn oversized_message_is_a_capacity_error() {
        let mut client = WsEndpoint::client(1 << 20);
        let mut server = WsEndpoint::server(1024);
        client.send_binary(Bytes::from(vec![0u8; 2000])).unwrap();
        server.feed(&client.take_output());
        let err = server.next_event().unwrap_err();
        assert!(matches!(err, tungstenite::Error::Capacity(_)), "{err}");
    }

    #[test]
    fn message_reader_reassembles_fragments_and_reports_close() {
        let mut reader = MessageReader::new(1 << 20);
        // "he" (binary, not final) + "llo" (continuation, final), a ping, then close 4000.
        let wire =
            [&[0x02, 0x02][..], b"he", &[0x80, 0x03], b"llo", &[0x89, 0x01, b'p'], &[0x88, 0x02, 0x0f, 0xa0]].concat();
        for byte in &wire[..wire.len() - 1] {
            reader.feed(std::slice::from_ref(byte));
        }
        assert_eq!(reader.next_event().unwrap(), Some(ServerEvent::Binary(Bytes::from_static(b"hello"))));
        assert_eq!(reader.next_event().unwrap(), Some(ServerEvent::Ping(Bytes::from_static(b"p"))));
        assert_eq!(reader.next_event().unwrap(), None, "the close frame is still incomplete");
        reader.feed(&wire[wire.len() - 1..]);
        assert_eq!(reader.next_event().unwrap(), Some(ServerEvent::Close(Some(4000))));
    }

    #[test]
    fn message_reader_refuses_oversized_frames() {
        let mut reader = MessageReader::new(100);
        let mut wire = Vec::new();
        write_binary_header(&mut wire, 200);
        reader.feed(&wire);
        assert!(matches!(reader.next_event(), Err(tungstenite::Error::Capacity(_))));
    }
}
