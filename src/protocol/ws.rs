//! WebSocket framing without I/O. tungstenite parses, unmasks, reassembles and validates what
//! arrives (and answers pings and closes); it reads from and writes to [`MemStream`], which the
//! connection's I/O driver fills from the socket and empties into its outbox. Data the server
//! sends bypasses tungstenite: [`write_binary_header`] frames pre-encoded batches directly.

use std::cell::Cell;
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
///
/// tungstenite's state (its read buffer, about 0.8 KB in all) exists only while there is
/// something in flight: between messages a quiet connection gives it back
/// ([`release_if_idle`](Self::release_if_idle)) and a fresh one is made when bytes come.
pub struct WsEndpoint {
    ws: Option<Box<WebSocket<MemStream>>>,
    role: Role,
    max_message_size: usize,
    /// Where the bytes fed so far end in the frame stream.
    boundary: FrameBoundary,
    /// A close was sent or received: tungstenite's state matters to the end.
    closing: bool,
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
        Self { ws: None, role, max_message_size, boundary: FrameBoundary::default(), closing: false }
    }

    fn ws(&mut self) -> &mut WebSocket<MemStream> {
        let (role, max_message_size) = (self.role, self.max_message_size);
        self.ws.get_or_insert_with(|| {
            let config = WebSocketConfig::default()
                .read_buffer_size(512)
                .write_buffer_size(0)
                .max_message_size(Some(max_message_size))
                .max_frame_size(Some(max_message_size));
            Box::new(WebSocket::from_raw_socket(MemStream::default(), role, Some(config)))
        })
    }

    /// The messages in `bytes` when it is nothing but whole ones, each a single masked binary
    /// frame (nearly every read of a client's requests), and tungstenite holds nothing: they
    /// are taken as they are, without building tungstenite's state for them and giving it
    /// back. `None` leaves everything to `feed`, which judges what is unusual (fragments,
    /// control frames, reserved bits, lengths not in their shortest form, too large).
    pub fn whole_binary_messages<'a>(&self, bytes: &'a [u8]) -> Option<WholeBinaryMessages<'a>> {
        if self.ws.is_some() || self.closing || self.role != Role::Server {
            return None;
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            let (header, _, len) = whole_binary_frame(rest, self.max_message_size)?;
            rest = &rest[header + len..];
        }
        Some(WholeBinaryMessages { rest: bytes })
    }

    /// Appends bytes received from the peer.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.boundary.advance(bytes);
        self.ws().get_mut().input.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. Pings and pongs are
    /// handled inside (a ping's pong lands in the output).
    pub fn next_event(&mut self) -> Result<Option<WsEvent>, tungstenite::Error> {
        let Some(ws) = self.ws.as_mut() else { return Ok(None) };
        loop {
            match ws.read() {
                Ok(Message::Binary(data)) => return Ok(Some(WsEvent::Binary(data))),
                Ok(Message::Text(text)) => return Ok(Some(WsEvent::Text(text.into()))),
                Ok(Message::Close(frame)) => {
                    self.closing = true;
                    return Ok(Some(WsEvent::Closed(frame.map(|f| u16::from(f.code)))));
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(err) => {
                    self.closing = true;
                    return Err(err);
                }
            }
        }
    }

    /// Sends a binary message through tungstenite (clients: it masks).
    pub fn send_binary(&mut self, data: Bytes) -> Result<(), tungstenite::Error> {
        self.ws().send(Message::Binary(data))
    }

    /// Sends a ping; the peer answers with a pong carrying the same payload.
    pub fn ping(&mut self, payload: Bytes) {
        // Writing into memory cannot fail; an error only says the connection is closing.
        let _ = self.ws().send(Message::Ping(payload));
    }

    /// Sends a pong (a client answering the server's ping).
    pub fn pong(&mut self, payload: Bytes) {
        let _ = self.ws().send(Message::Pong(payload));
    }

    /// Starts the closing handshake with `code` and `reason`.
    pub fn close(&mut self, code: u16, reason: &str) {
        self.closing = true;
        let frame = CloseFrame { code: WsCloseCode::from(code), reason: reason.to_owned().into() };
        let ws = self.ws();
        // An error here means a close is already under way, which is what we want anyway.
        let _ = ws.close(Some(frame));
        let _ = ws.flush();
    }

    /// Writes replies tungstenite holds back until its next call (the answer to a close).
    pub fn flush(&mut self) {
        if let Some(ws) = self.ws.as_mut() {
            // Writing into memory cannot fail; an error only says the connection already closed.
            let _ = ws.flush();
        }
    }

    /// Bytes tungstenite queued for the peer (control frames; a client's messages).
    pub fn take_output(&mut self) -> Vec<u8> {
        self.ws.as_mut().map(|ws| std::mem::take(&mut ws.get_mut().output)).unwrap_or_default()
    }

    pub fn has_output(&self) -> bool {
        self.ws.as_ref().is_some_and(|ws| !ws.get_ref().output.is_empty())
    }

    /// Gives tungstenite's state back when it holds nothing: every byte fed was a whole frame
    /// outside a fragmented message and has been read, nothing waits to be sent, and no close
    /// is under way. A fresh endpoint then reads the next message exactly as this one would.
    pub fn release_if_idle(&mut self) {
        if self.closing || !self.boundary.between_messages() {
            return;
        }
        let Some(ws) = self.ws.as_mut() else { return };
        // A pong tungstenite still holds back would be lost: let it out first.
        let _ = ws.flush();
        let stream = ws.get_ref();
        if stream.input.is_empty() && stream.output.is_empty() {
            self.ws = None;
        }
    }
}

/// The messages `WsEndpoint::whole_binary_messages` found.
pub struct WholeBinaryMessages<'a> {
    rest: &'a [u8],
}

/// Capacity the unmasking buffer keeps between reads; a larger message's is given back.
const UNMASKED_KEEP: usize = 64 * 1024;

thread_local! {
    /// Where messages are unmasked, one at a time: one buffer per shard thread, not an
    /// allocation per message.
    static UNMASKED: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

impl WholeBinaryMessages<'_> {
    /// Hands each message, unmasked, to `handle`, until it returns false.
    pub fn unmask_each(mut self, mut handle: impl FnMut(&[u8]) -> bool) {
        crate::core::with_scratch(&UNMASKED, UNMASKED_KEEP, |unmasked| {
            while let Some((header, mask, len)) = whole_binary_frame(self.rest, usize::MAX) {
                unmasked.clear();
                unmasked.extend_from_slice(&self.rest[header..header + len]);
                unmask(unmasked, mask);
                self.rest = &self.rest[header + len..];
                if !handle(unmasked) {
                    break;
                }
            }
        })
    }
}

/// The header length, mask and payload length of the frame `bytes` starts with, when it is
/// whole and a complete message: FIN, no reserved bits, binary, masked, its length in the
/// shortest form and at most `max_len`.
/// This recognises that one shape byte by byte and leaves every other header to tungstenite:
/// `FrameHeader::parse` (through an `io::Read` cursor and a `memcpy` call for the mask) was
/// 0.9 % of a shard answering publishes. The `ws_whole_frames` fuzz target holds the two to
/// the same reading.
fn whole_binary_frame(bytes: &[u8], max_len: usize) -> Option<(usize, [u8; 4], usize)> {
    const FIN_BINARY: u8 = 0x82;
    const MASKED: u8 = 0x80;
    let [FIN_BINARY, second, ..] = *bytes else { return None };
    if second & MASKED == 0 {
        return None;
    }
    let (len, len_bytes) = match second & !MASKED {
        126 => (u64::from(u16::from_be_bytes(*bytes.get(2..4)?.first_chunk()?)), 2),
        127 => (u64::from_be_bytes(*bytes.get(2..10)?.first_chunk()?), 8),
        short => (u64::from(short), 0),
    };
    let shortest = match len_bytes {
        2 => len >= 126,
        8 => len > u64::from(u16::MAX),
        _ => true,
    };
    let header_len = 2 + len_bytes + 4;
    let mask = *bytes.get(2 + len_bytes..header_len)?.first_chunk()?;
    let len = usize::try_from(len).ok().filter(|&len| shortest && len <= max_len)?;
    (bytes.len() >= header_len.checked_add(len)?).then_some((header_len, mask, len))
}

/// XORs a client frame's payload with its mask, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7]]);
        chunk.copy_from_slice(&(word ^ wide).to_ne_bytes());
    }
    for (byte, key) in chunks.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

/// The longest frame header: 2 bytes, a 64-bit length, a mask.
const MAX_FRAME_HEADER: usize = 14;

/// Follows the frame headers in the bytes fed, skipping payloads, to tell whether they end
/// between two messages. The stream is only followed, never judged: tungstenite validates it,
/// and a header it cannot make sense of leaves the tracker `lost` (never between messages).
#[derive(Debug, Default)]
struct FrameBoundary {
    header: [u8; MAX_FRAME_HEADER],
    header_len: u8,
    payload_left: u64,
    /// A data frame without FIN came and its final continuation has not.
    fragmented: bool,
    lost: bool,
}

impl FrameBoundary {
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if self.payload_left > 0 {
                let skipped = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= skipped;
                bytes = &bytes[skipped as usize..];
                continue;
            }
            let start = usize::from(self.header_len);
            let taken = bytes.len().min(MAX_FRAME_HEADER - start);
            self.header[start..start + taken].copy_from_slice(&bytes[..taken]);
            let mut cursor = Cursor::new(&self.header[..start + taken]);
            match FrameHeader::parse(&mut cursor) {
                Ok(Some((header, payload_len))) => {
                    let used = cursor.position() as usize - start;
                    bytes = &bytes[used..];
                    self.header_len = 0;
                    self.payload_left = payload_len;
                    // Control frames may come between fragments and change nothing.
                    if let OpCode::Data(_) = header.opcode {
                        self.fragmented = !header.is_final;
                    }
                }
                Ok(None) => {
                    self.header_len = (start + taken) as u8;
                    bytes = &bytes[taken..];
                }
                Err(_) => self.lost = true,
            }
        }
    }

    fn between_messages(&self) -> bool {
        !self.lost && !self.fragmented && self.header_len == 0 && self.payload_left == 0
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
                unmask(&mut payload, mask);
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
        assert_eq!(server.ws.as_ref().unwrap().get_ref().input.capacity(), 0, "nothing is held between messages");
    }

    /// A client frame masked with a zero key (so the payload reads as it is).
    fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first_byte];
        match payload.len() {
            len @ 0..126 => frame.push(0x80 | len as u8),
            len @ 126..65536 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(payload);
        frame
    }

    fn drain(server: &mut WsEndpoint) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        while let Some(event) = server.next_event().unwrap() {
            match event {
                WsEvent::Binary(data) => messages.push(data.to_vec()),
                other => panic!("expected binary, got {other:?}"),
            }
        }
        messages
    }

    #[test]
    fn a_quiet_endpoint_gives_tungstenite_back_only_between_messages() {
        let mut server = WsEndpoint::server(1 << 20);
        server.release_if_idle();
        assert!(server.ws.is_none(), "nothing is made before bytes come");

        // A fragmented message: held while its final fragment is missing, a ping in between.
        server.feed(&masked_frame(0x02, b"he"));
        server.feed(&masked_frame(0x89, b"p"));
        assert!(drain(&mut server).is_empty());
        server.release_if_idle();
        assert!(server.ws.is_some(), "a fragmented message is under way");
        assert!(server.has_output(), "the ping's pong");
        server.take_output();
        server.feed(&masked_frame(0x80, b"llo"));
        assert_eq!(drain(&mut server), vec![b"hello".to_vec()]);
        server.release_if_idle();
        assert!(server.ws.is_none(), "between messages with nothing to send");

        // Frames cut inside their headers and payloads, with 16- and 64-bit lengths.
        let large = vec![9u8; 70_000];
        let wire = [masked_frame(0x82, &[1; 300]), masked_frame(0x82, &large)].concat();
        for cut in [1, 3, 306, 310, 400] {
            let mut server = WsEndpoint::server(1 << 20);
            server.feed(&wire[..cut]);
            let first = drain(&mut server);
            server.release_if_idle();
            assert!(server.ws.is_some(), "cut at {cut}: a frame is incomplete");
            server.feed(&wire[cut..]);
            let rest = drain(&mut server);
            assert_eq!([first, rest].concat(), vec![vec![1; 300], large.clone()], "cut at {cut}");
            server.release_if_idle();
            assert!(server.ws.is_none(), "cut at {cut}: all read");
            // A fresh tungstenite reads the next message as the old one would have.
            server.feed(&masked_frame(0x82, b"again"));
            assert_eq!(drain(&mut server), vec![b"again".to_vec()]);
        }
    }

    #[test]
    fn whole_binary_frames_are_taken_without_tungstenite() {
        let mut client = WsEndpoint::client(1 << 20);
        let server = WsEndpoint::server(1 << 20);
        let mut payloads: Vec<Bytes> = (0..=17u8).map(|len| Bytes::from((0..len).collect::<Vec<u8>>())).collect();
        payloads.extend([Bytes::from(vec![3u8; 300]), Bytes::from(vec![4u8; 70_000])]);
        for payload in &payloads {
            client.send_binary(payload.clone()).unwrap();
        }
        // The client masks each frame with a random key.
        let wire = client.take_output();
        let mut messages = Vec::new();
        server.whole_binary_messages(&wire).expect("only whole binary frames").unmask_each(|message| {
            messages.push(Bytes::copy_from_slice(message));
            true
        });
        assert_eq!(messages, payloads);
        assert!(server.ws.is_none(), "tungstenite was not needed");

        let mut handled = 0;
        server.whole_binary_messages(&wire).unwrap().unmask_each(|_| {
            handled += 1;
            handled < 3
        });
        assert_eq!(handled, 3, "the handler stops the rest");

        let at_the_limit = masked_frame(0x82, &[0; 1024]);
        assert!(WsEndpoint::server(1024).whole_binary_messages(&at_the_limit).is_some());
    }

    #[test]
    fn anything_unusual_is_left_to_tungstenite() {
        let whole = masked_frame(0x82, b"ok");
        let long_form = |len_bytes: &[u8], payload_len: usize| {
            let second = if len_bytes.len() == 2 { 0x80 | 126 } else { 0x80 | 127 };
            [&[0x82, second][..], len_bytes, &[0; 4], &vec![0; payload_len]].concat()
        };
        let cases = [
            ("cut short", whole[..whole.len() - 1].to_vec()),
            ("a whole frame, then part of one", [whole.clone(), whole[..3].to_vec()].concat()),
            ("not final", masked_frame(0x02, b"ok")),
            ("text", masked_frame(0x81, b"ok")),
            ("a reserved bit", masked_frame(0xc2, b"ok")),
            ("a ping", masked_frame(0x89, b"ok")),
            ("a close", masked_frame(0x88, &[0x03, 0xe8])),
            ("unmasked", vec![0x82, 0x02, b'o', b'k']),
            ("a 16-bit length for 2 bytes", long_form(&[0, 2], 2)),
            ("a 64-bit length for 300 bytes", long_form(&300u64.to_be_bytes(), 300)),
            ("over the limit", masked_frame(0x82, &[0; 1025])),
            ("a whole frame, then a ping", [whole.clone(), masked_frame(0x89, b"p")].concat()),
        ];
        let server = WsEndpoint::server(1024);
        for (what, wire) in cases {
            assert!(server.whole_binary_messages(&wire).is_none(), "{what}");
        }
        let mut midway = WsEndpoint::server(1024);
        midway.feed(&whole[..3]);
        assert!(midway.whole_binary_messages(&whole).is_none(), "tungstenite holds part of a message");
        assert!(WsEndpoint::client(1024).whole_binary_messages(&whole).is_none(), "a client reads unmasked frames");
    }

    #[test]
    fn a_closing_endpoint_keeps_its_state() {
        let mut server = WsEndpoint::server(1 << 20);
        server.feed(&masked_frame(0x88, &[0x03, 0xe8]));
        assert!(matches!(server.next_event().unwrap(), Some(WsEvent::Closed(Some(1000)))));
        server.flush();
        server.take_output();
        server.release_if_idle();
        assert!(server.ws.is_some(), "the close handshake is tungstenite's to finish");
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
