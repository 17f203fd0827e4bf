//! A connection's bounded outbound queue. Items wait here while a write is in flight and
//! leave together: runs of frames are packed into one WebSocket message (up to `batch_size`
//! frames each), so a busy connection pays one syscall and one WebSocket header per batch.

use std::collections::VecDeque;
use std::rc::Rc;

use crate::broker::Publication;
use crate::protocol::push::{push_len, write_push};
use crate::protocol::ws::write_binary_header;

/// One thing to send.
#[derive(Debug)]
pub enum OutItem {
    /// An update, shared by every local subscriber of its publication.
    Push { sub_id: u32, publication: Rc<Publication> },
    /// An encoded element of `ServerMessage.frames` (reply, pong, disconnect).
    Frame(Vec<u8>),
    /// Complete WebSocket bytes (control frames written by the WebSocket layer).
    Raw(Vec<u8>),
}

impl OutItem {
    /// Bytes this item adds to a `ServerMessage` (or to the wire, for `Raw`).
    fn len(&self) -> usize {
        match self {
            OutItem::Push { sub_id, publication } => push_len(*sub_id, publication.body.len()),
            OutItem::Frame(bytes) | OutItem::Raw(bytes) => bytes.len(),
        }
    }
}

/// The queue would exceed its byte limit: the connection is a slow consumer.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

#[derive(Debug)]
pub struct Outbox {
    items: VecDeque<OutItem>,
    bytes: usize,
    max_bytes: usize,
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Self {
        Self { items: VecDeque::new(), bytes: 0, max_bytes }
    }

    /// Queues `item` unless that would take the queue over its byte limit.
    pub fn push(&mut self, item: OutItem) -> Result<(), Overflow> {
        let len = item.len();
        if self.bytes + len > self.max_bytes {
            return Err(Overflow);
        }
        self.bytes += len;
        self.items.push_back(item);
        Ok(())
    }

    /// Queues `item` whatever the limit (the last words of a closing connection).
    pub fn push_unbounded(&mut self, item: OutItem) {
        self.bytes += item.len();
        self.items.push_back(item);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes queued.
    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }

    /// Moves everything queued into `out` as wire bytes, packing up to `batch_size` frames per
    /// WebSocket message. Returns the number of frames written.
    pub fn drain_into(&mut self, out: &mut Vec<u8>, batch_size: usize) -> usize {
        let mut frames = 0;
        while let Some(front) = self.items.front() {
            if let OutItem::Raw(_) = front {
                if let Some(OutItem::Raw(bytes)) = self.items.pop_front() {
                    self.bytes -= bytes.len();
                    out.extend_from_slice(&bytes);
                }
                continue;
            }
            let (count, len) = self
                .items
                .iter()
                .take_while(|item| !matches!(item, OutItem::Raw(_)))
                .take(batch_size)
                .fold((0, 0), |(count, len), item| (count + 1, len + item.len()));
            out.reserve(len + 10);
            write_binary_header(out, len);
            for item in self.items.drain(..count) {
                match item {
                    OutItem::Push { sub_id, publication } => write_push(out, sub_id, &publication.body),
                    OutItem::Frame(bytes) => out.extend_from_slice(&bytes),
                    OutItem::Raw(_) => unreachable!("runs stop before raw items"),
                }
            }
            self.bytes -= len;
            frames += count;
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pb::{server_frame::Kind, ServerMessage, Update};
    use crate::protocol::push::encode_update_body;
    use crate::protocol::ws::{WsEndpoint, WsEvent};
    use prost::Message;
    use std::sync::Arc;
    use std::time::Instant;

    fn publication(offset: u64) -> Rc<Publication> {
        let body = encode_update_body(&Update { offset, r#type: 1, ..Default::default() });
        Rc::new(Publication::new(Arc::from("route:1"), offset, 1, body, Instant::now()))
    }

    fn messages(wire: &[u8]) -> Vec<ServerMessage> {
        let mut client = WsEndpoint::client(1 << 20);
        client.feed(wire);
        let mut out = Vec::new();
        while let Some(event) = client.next_event().unwrap() {
            match event {
                WsEvent::Binary(data) => out.push(ServerMessage::decode(data).unwrap()),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    #[test]
    fn frames_are_batched_up_to_batch_size() {
        let mut outbox = Outbox::new(1 << 20);
        for offset in 1..=250 {
            outbox.push(OutItem::Push { sub_id: 3, publication: publication(offset) }).unwrap();
        }
        let mut wire = Vec::new();
        assert_eq!(outbox.drain_into(&mut wire, 100), 250);
        assert!(outbox.is_empty());
        assert_eq!(outbox.queued_bytes(), 0);
        let batches = messages(&wire);
        assert_eq!(batches.iter().map(|m| m.frames.len()).collect::<Vec<_>>(), vec![100, 100, 50]);
        let offsets: Vec<u64> = batches
            .iter()
            .flat_map(|m| &m.frames)
            .map(|f| match &f.kind {
                Some(Kind::Update(u)) => {
                    assert_eq!(u.sub_id, 3);
                    u.offset
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(offsets, (1..=250).collect::<Vec<_>>());
    }

    #[test]
    fn byte_limit_refuses_and_keeps_what_was_queued() {
        let one = push_len(1, publication(1).body.len());
        let mut outbox = Outbox::new(one * 2);
        outbox.push(OutItem::Push { sub_id: 1, publication: publication(1) }).unwrap();
        outbox.push(OutItem::Push { sub_id: 1, publication: publication(2) }).unwrap();
        assert_eq!(outbox.push(OutItem::Push { sub_id: 1, publication: publication(3) }), Err(Overflow));
        assert_eq!(outbox.queued_bytes(), one * 2);
    }
}
