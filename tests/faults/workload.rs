//! The clients of a fault run: publishers that log every acknowledgement, and subscribers
//! that log every reply, update and disconnect, reconnecting (to any node) and asking to
//! recover from the last update they saw, as an app would.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use compio::time::{sleep, timeout};
use routopia_realtime::client::{Client, ClientError};
use routopia_realtime::protocol::pb::{self, server_frame::Kind, UpdateType};

use super::checker::{History, Seen};
use crate::common::options;

/// Per (subscriber, channel): the (epoch, offset) it stands at while subscribed.
type Positions = HashMap<(usize, String), Option<(String, u64)>>;

/// What the clients share: the log, the nodes, and when to stop.
#[derive(Clone)]
pub struct Clients {
    pub history: Rc<RefCell<History>>,
    /// The nodes publishers use, in turn.
    pub publish_to: Rc<Vec<SocketAddr>>,
    /// The nodes subscribers use, in turn.
    pub subscribe_to: Rc<Vec<SocketAddr>>,
    pub channels: Rc<Vec<String>>,
    /// Publishers stop when set.
    pub stop_publishing: Rc<Cell<bool>>,
    /// Per (subscriber, channel): where it stands while subscribed (None between connections).
    pub positions: Rc<RefCell<Positions>>,
}

impl Clients {
    pub fn new(nodes: Vec<SocketAddr>, channels: Vec<String>) -> Clients {
        Self::with_roles(nodes.clone(), nodes, channels)
    }

    /// Publishers on `publish_to`, subscribers on `subscribe_to`.
    pub fn with_roles(publish_to: Vec<SocketAddr>, subscribe_to: Vec<SocketAddr>, channels: Vec<String>) -> Clients {
        Clients {
            history: Rc::default(),
            publish_to: Rc::new(publish_to),
            subscribe_to: Rc::new(subscribe_to),
            channels: Rc::new(channels),
            stop_publishing: Rc::default(),
            positions: Rc::default(),
        }
    }

    /// Publishes round the channels every `every` through publishing node `id` (the next
    /// one when that fails), logging each acknowledgement, until told to stop.
    pub async fn publisher(self, id: usize, every: Duration) {
        let mut n = 0u64;
        let mut attempt = id;
        while !self.stop_publishing.get() {
            let node = self.publish_to[attempt % self.publish_to.len()];
            attempt += 1;
            let Ok(Ok((mut client, _))) =
                timeout(Duration::from_secs(2), Client::connect(node, options("publisher"))).await
            else {
                sleep(Duration::from_millis(50)).await;
                continue;
            };
            while !self.stop_publishing.get() {
                n += 1;
                let channel = &self.channels[n as usize % self.channels.len()];
                let payload = format!("p{id}-{n}").into_bytes();
                match timeout(
                    Duration::from_secs(5),
                    client.publish(channel, UpdateType::Traffic, "k", payload.clone()),
                )
                .await
                {
                    Ok(Ok(result)) => {
                        let mut history = self.history.borrow_mut();
                        let acks = history.acknowledged.entry(channel.clone()).or_default();
                        acks.push((result.epoch, result.offset, payload));
                    }
                    // Redis away: 503 at once, the connection stays.
                    Ok(Err(ClientError::Server(_))) => sleep(Duration::from_millis(20)).await,
                    _ => break,
                }
                sleep(every).await;
            }
        }
    }

    /// Subscribes to every channel through subscribing node `id` (the next one when that fails),
    /// logging what it sees, until its task is dropped.
    pub async fn subscriber(self, id: usize) {
        let mut attempt = id;
        // The last (epoch, offset) seen per channel, to recover from.
        let mut last: HashMap<String, (String, u64)> = HashMap::new();
        loop {
            let node = self.subscribe_to[attempt % self.subscribe_to.len()];
            attempt += 1;
            let Ok(Ok((mut client, _))) =
                timeout(Duration::from_secs(2), Client::connect(node, options(&format!("subscriber-{id}")))).await
            else {
                sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut subscriptions: HashMap<u32, String> = HashMap::new();
            // Some(code) once the connection ended (None: without a Disconnect).
            let mut ended = None;
            for channel in self.channels.iter() {
                let asked = last.get(channel).cloned();
                let subscribe = pb::Subscribe {
                    channel: channel.clone(),
                    recover: asked.is_some(),
                    epoch: asked.as_ref().map(|(epoch, _)| epoch.clone()).unwrap_or_default(),
                    offset: asked.as_ref().map_or(0, |(_, offset)| *offset),
                    // Odd subscribers ask for acknowledged delivery and acknowledge each update.
                    ack: id % 2 == 1,
                };
                match timeout(Duration::from_secs(5), client.subscribe_with(subscribe)).await {
                    Ok(Ok(result)) => {
                        let at = match &asked {
                            Some(asked) if result.recovered => asked.clone(),
                            _ => (result.epoch.clone(), result.offset),
                        };
                        let seen = Seen::Subscribed {
                            epoch: result.epoch,
                            offset: result.offset,
                            asked,
                            recovered: result.recovered,
                        };
                        self.log(id, channel, seen);
                        self.positions.borrow_mut().insert((id, channel.clone()), Some(at.clone()));
                        last.insert(channel.clone(), at);
                        subscriptions.insert(result.sub_id, channel.clone());
                    }
                    _ => {
                        ended = Some(None);
                        break;
                    }
                }
            }
            // Never a read under a timeout: one cancelled mid-frame would lose its bytes.
            // The task is dropped (cancelled) when the run ends.
            while ended.is_none() {
                match client.next_frame().await {
                    Ok(pb::ServerFrame { kind: Some(Kind::Update(update)) }) => {
                        let Some(channel) = subscriptions.get(&update.sub_id) else { continue };
                        if id % 2 == 1 && client.ack(update.sub_id, update.offset).await.is_err() {
                            ended = Some(None);
                        }
                        let seen = Seen::Update {
                            offset: update.offset,
                            skipped: update.skipped,
                            payload: update.payload.to_vec(),
                        };
                        self.log(id, channel, seen);
                        let at = last.get_mut(channel).expect("subscribed");
                        at.1 = update.offset;
                        self.positions.borrow_mut().insert((id, channel.clone()), Some(at.clone()));
                    }
                    Ok(pb::ServerFrame { kind: Some(Kind::Disconnect(disconnect)) }) => {
                        ended = Some(Some(disconnect.code))
                    }
                    Ok(_) => {}
                    Err(ClientError::Disconnected(disconnect)) => ended = Some(Some(disconnect.code)),
                    Err(ClientError::Closed(code)) => ended = Some(code.map(u32::from)),
                    Err(_) => ended = Some(None),
                }
            }
            for channel in subscriptions.values() {
                self.log(id, channel, Seen::Ended { code: ended.flatten() });
                self.positions.borrow_mut().insert((id, channel.clone()), None);
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self, subscriber: usize, channel: &str, seen: Seen) {
        self.history.borrow_mut().seen.entry((subscriber, channel.to_owned())).or_default().push(seen);
    }

    /// Whether every subscriber stands at `finals` on every channel.
    pub fn caught_up(&self, subscribers: usize, finals: &HashMap<String, (String, u64)>) -> bool {
        let positions = self.positions.borrow();
        (0..subscribers).all(|id| {
            self.channels
                .iter()
                .all(|channel| positions.get(&(id, channel.clone())).cloned().flatten() == finals.get(channel).cloned())
        })
    }
}
