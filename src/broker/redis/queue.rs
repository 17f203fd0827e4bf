//! Publications from backends that hold no WebSocket: encoded `Publish` messages pushed onto
//! the Redis list `<prefix>:queue`. Each item moves atomically to this node's in-flight list
//! (BLMOVE), is published like any other, and only then leaves that list; a node that dies
//! mid-way re-publishes what it had in flight when it starts again (at least once). Items that
//! are not valid publications move to `<prefix>:queue:dead` and are logged.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, AsyncTypedCommands};

use super::job::publish;
use super::known::KnownPositions;
use super::{keys, run_id, Continuity, HistoryPolicy, Link};
use crate::broker::accept_publish;
use crate::metrics::{type_slot, RedisOp};
use crate::protocol::pb;
use crate::protocol::push::encode_update_body;

/// How long one BLMOVE waits for an item before asking again.
const BLOCK: f64 = 1.0;
/// How often the queue's and the dead list's lengths are read (for `/metrics`).
const MEASURE_EVERY: Duration = Duration::from_secs(5);

pub(super) struct Consumer {
    url: String,
    prefix: String,
    queue: String,
    in_flight: String,
    dead: String,
    policy: HistoryPolicy,
    /// For the limits in force (a reload may change them).
    link: Link,
    /// What the bridge knows of each channel's position (see `Continuity`).
    known: Arc<Mutex<KnownPositions>>,
}

impl Consumer {
    pub(super) fn new(url: &str, link: Link, policy: HistoryPolicy, known: Arc<Mutex<KnownPositions>>) -> Self {
        let config = link.inboxes.config();
        let prefix = config.redis.prefix.clone();
        let node_id = if config.redis.node_id.is_empty() {
            format!("{}:{}", host_name(), link.inboxes.port())
        } else {
            config.redis.node_id.clone()
        };
        Self {
            url: url.to_owned(),
            queue: format!("{prefix}:queue"),
            in_flight: format!("{prefix}:queue:processing:{node_id}"),
            dead: format!("{prefix}:queue:dead"),
            prefix,
            policy,
            link,
            known,
        }
    }

    /// Consumes until the process ends, reconnecting with backoff.
    pub(super) async fn run(self) {
        let mut attempt = 0u32;
        loop {
            match self.connect().await {
                Ok(mut connection) => {
                    attempt = 0;
                    if let Err(err) = self.consume(&mut connection).await {
                        tracing::warn!(error = %err, "queue consumer lost Redis");
                    }
                }
                Err(err) => tracing::debug!(error = %err, "queue consumer cannot reach Redis"),
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt.min(6))).min(Duration::from_secs(5))).await;
        }
    }

    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        let client = redis::Client::open(self.url.as_str())?;
        // Its own connection: a blocking BLMOVE must not hold up the bridge's commands.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs_f64(BLOCK + 5.0)));
        client.get_multiplexed_async_connection_with_config(&config).await
    }

    async fn consume(&self, connection: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let continuity = Continuity {
            run_id: Arc::from(run_id(connection).await?),
            trust_restarts: self.link.inboxes.config().redis.trust_restarts,
            known: self.known.clone(),
        };
        // First what this node had in flight when it last stopped.
        let left: Vec<Vec<u8>> =
            redis::cmd("LRANGE").arg(&self.in_flight).arg(0).arg(-1).query_async(connection).await?;
        if !left.is_empty() {
            tracing::info!(items = left.len(), "re-publishing queue items left in flight");
        }
        for item in left {
            self.settle(connection, &item, &continuity).await?;
        }
        let mut measured_at: Option<Instant> = None;
        loop {
            if measured_at.is_none_or(|at| at.elapsed() >= MEASURE_EVERY) {
                measured_at = Some(Instant::now());
                self.measure(connection).await?;
            }
            let item: Option<Vec<u8>> = redis::cmd("BLMOVE")
                .arg(&self.queue)
                .arg(&self.in_flight)
                .arg("LEFT")
                .arg("RIGHT")
                .arg(BLOCK)
                .query_async(connection)
                .await?;
            if let Some(item) = item {
                self.settle(connection, &item, &continuity).await?;
            }
        }
    }

    /// Reads the lengths of the queue and the dead list for `/metrics`.
    async fn measure(&self, connection: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let (queued, dead): (u64, u64) =
            redis::pipe().cmd("LLEN").arg(&self.queue).cmd("LLEN").arg(&self.dead).query_async(connection).await?;
        let metrics = &self.link.metrics;
        metrics.queue_length.store(queued, Ordering::Relaxed);
        metrics.dead_length.store(dead, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes one in-flight item (or moves it to the dead list), then lets it go.
    async fn settle(
        &self,
        connection: &mut MultiplexedConnection,
        item: &[u8],
        continuity: &Continuity,
    ) -> redis::RedisResult<()> {
        match self.decode(item) {
            Ok((channel, update)) => {
                let rest = encode_update_body(&update);
                let started = Instant::now();
                let keys = keys(&self.prefix, &channel);
                let channel = Arc::from(channel);
                let policy = &self.policy;
                let published = publish(connection, &channel, &keys, update.r#type, &rest, policy, continuity).await;
                let metrics = &self.link.metrics;
                metrics.record(RedisOp::Publish, started.elapsed(), published.is_err());
                published?;
                metrics.published[type_slot(update.r#type)].fetch_add(1, Ordering::Relaxed);
                metrics.queue_consumed.fetch_add(1, Ordering::Relaxed);
            }
            Err(reason) => {
                tracing::warn!(reason, "queue item is not a valid publication; moved to the dead list");
                connection.rpush(&self.dead, item).await?;
                self.link.metrics.queue_dead.fetch_add(1, Ordering::Relaxed);
            }
        }
        connection.lrem(&self.in_flight, 1, item).await?;
        Ok(())
    }

    fn decode(&self, item: &[u8]) -> Result<(String, pb::Update), String> {
        let publish = pb::Publish::decode(item).map_err(|err| format!("not a Publish message: {err}"))?;
        let unix_us = crate::core::unix_us();
        let limits = &self.link.inboxes.config().limits;
        accept_publish(publish, unix_us, limits.max_channel_length, limits.max_payload_size)
            .map_err(|refused| refused.message)
    }
}

fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    if ok && end > 0 {
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "node".into()
    }
}
