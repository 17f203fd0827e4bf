//! Bytes in: WebSocket frames read into messages, messages decoded into the frames of the
//! protocol (each then served by `commands`), or echoed back on the echo endpoint.

use crate::core::Now;
use crate::outbox::OutItem;
use crate::protocol::client_frames;
use crate::protocol::envelope::{self, Dictionaries, EnvelopeError};
use crate::protocol::pb::{self, ClientMessage};
use crate::protocol::ws::{binary_header_len, write_data_header, WsEvent};
use crate::protocol::CloseCode;

use super::{Phase, Session};

thread_local! {
    /// The frames of the message being handled: one vector per shard thread, not one per
    /// message.
    static DECODED_FRAMES: std::cell::Cell<Vec<pb::ClientFrame>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Frames' room `DECODED_FRAMES` keeps between messages; a larger message's is given back.
const DECODED_FRAMES_KEEP: usize = 64;

impl Session {
    /// Feeds bytes read from the socket and processes every complete message in them.
    pub fn handle_bytes(&mut self, now: Now, bytes: &[u8]) {
        if self.is_closing() {
            return;
        }
        self.last_heard = now.instant;
        if let Some(messages) = self.ws.whole_binary_messages(bytes) {
            messages.unmask_each(|data| {
                self.handle_binary(now, data);
                !self.is_closing()
            });
            return;
        }
        self.ws.feed(bytes);
        while !self.is_closing() {
            let event = self.ws.next_event();
            // Pongs (and close replies) tungstenite wrote while reading go out ahead of what
            // the message makes the session send: the peer sees answers in the order it asked.
            self.collect_ws_output();
            match event {
                Ok(None) => break,
                Ok(Some(WsEvent::Binary(data))) => self.handle_binary(now, &data),
                Ok(Some(WsEvent::Text(text))) if self.phase == Phase::Echo => self.send_back(true, &text),
                Ok(Some(WsEvent::Text(_))) => self
                    .close(CloseCode::UnsupportedData, "text messages are not supported: send binary protobuf".into()),
                Ok(Some(WsEvent::Closed(_))) => {
                    // Answer the client's close; nothing else follows.
                    self.ws.flush();
                    self.phase = Phase::Closing(CloseCode::Normal);
                    self.close_detail = Some("closed by client".into());
                }
                Err(tungstenite::Error::Capacity(err)) => self.close(CloseCode::MessageTooBig, err.to_string()),
                Err(tungstenite::Error::Protocol(err)) => self.close(CloseCode::ProtocolError, err.to_string()),
                Err(tungstenite::Error::Utf8(err)) => {
                    self.close(CloseCode::InvalidPayload, format!("text that is not UTF-8: {err}"))
                }
                Err(err) => self.close(CloseCode::ProtocolError, err.to_string()),
            }
        }
        self.collect_ws_output();
        // Given back at once, not later: the next connection's messages reuse the memory, so
        // a burst of connects does not leave every connection's buffers resident.
        self.ws.release_if_idle();
    }

    /// A whole binary message: echoed back on the echo endpoint, else a protocol message.
    fn handle_binary(&mut self, now: Now, data: &[u8]) {
        if self.phase == Phase::Echo {
            self.send_back(false, data)
        } else {
            self.handle_message(now, data)
        }
    }

    /// Decodes a protocol message into its frames and serves each in turn (see `commands`).
    fn handle_message(&mut self, now: Now, data: &[u8]) {
        crate::core::with_scratch(&DECODED_FRAMES, DECODED_FRAMES_KEEP, |frames| {
            let decoded = if client_frames::decode_common(data, frames) {
                Ok(())
            } else {
                envelope::decode_into::<ClientMessage>(
                    frames,
                    data,
                    self.limits.max_message_size,
                    &Dictionaries::default(),
                )
            };
            match decoded {
                Ok(()) if frames.len() > self.limits.max_frames_per_message => {
                    let limit = self.limits.max_frames_per_message;
                    self.close(
                        CloseCode::TooManyFrames,
                        format!("{} frames in one message, the limit is {limit}", frames.len()),
                    )
                }
                Ok(()) => {
                    for frame in frames.drain(..) {
                        if self.is_closing() {
                            break;
                        }
                        self.handle_frame(now, frame);
                    }
                }
                Err(err @ EnvelopeError::TooLarge { .. }) => self.close(CloseCode::MessageTooBig, err.to_string()),
                Err(err) => self.close(CloseCode::BadMessage, err.to_string()),
            }
        })
    }

    /// Sends a message of the echo endpoint back, unchanged (limited by the outbox like any
    /// other queued bytes).
    fn send_back(&mut self, text: bool, data: &[u8]) {
        let mut frame = Vec::with_capacity(binary_header_len(data.len()) + data.len());
        write_data_header(&mut frame, text, data.len());
        frame.extend_from_slice(data);
        self.enqueue(OutItem::Raw(frame));
    }
}
