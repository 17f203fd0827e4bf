//! One run: set up every connection, publish open-loop for the window, drain, measure.
//!
//! Everything runs as tasks on one single-threaded compio runtime, so the state they share
//! lives in `Cell`s and `RefCell`s behind an `Rc`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use compio::time::{sleep, sleep_until, timeout, timeout_at};
use hdrhistogram::Histogram;
use routopia_realtime::client::{Client, ClientError, ConnectOptions, Receiver, Sender};
use routopia_realtime::protocol::envelope;
use routopia_realtime::protocol::pb::{self, client_frame::Command, reply, server_frame::Kind};

use crate::payloads;
use crate::procstat;
use crate::report::{Fatal, Report};
use crate::{Mode, RunArgs};

/// Bytes at the head of every payload: intended send time (unix ns, little endian), then the
/// message's sequence number. From byte 16 on, when the payload has room: the actual send time.
pub const PAYLOAD_HEADER: usize = 16;
/// The header with the actual send time, as realistic (JSON) payloads carry it before the JSON.
pub const FULL_HEADER: usize = 24;
/// Distinct realistic payloads the publishers cycle through.
const PAYLOAD_POOL: usize = 256;
/// Largest server message the generator decodes.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Bound on one connection's setup.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Highest latency the histograms hold, microseconds (10 minutes).
const HIST_MAX_US: u64 = 600_000_000;
/// How many distinct examples of each error kind a report keeps.
const EXAMPLES_PER_KIND: usize = 3;

/// Wall-clock time, nanoseconds since the Unix epoch (CLOCK_REALTIME).
pub fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Measuring,
    Done,
}

/// Errors by kind, with a few example messages each.
#[derive(Debug, Default)]
pub struct ErrorLog {
    pub total: u64,
    pub by_kind: BTreeMap<&'static str, (u64, Vec<String>)>,
}

impl ErrorLog {
    pub fn add(&mut self, kind: &'static str, message: String) {
        self.total += 1;
        let entry = self.by_kind.entry(kind).or_default();
        entry.0 += 1;
        if entry.1.len() < EXAMPLES_PER_KIND && !entry.1.contains(&message) {
            entry.1.push(message);
        }
    }
}

/// Per subscriber connection.
struct SubStat {
    channel: usize,
    /// Got through setup (so it is owed every delivery on its channel).
    set_up: Cell<bool>,
    /// Its connection is still open.
    connected: Cell<bool>,
    received: Cell<u64>,
}

/// State shared by every task.
struct Shared {
    phase: Cell<Phase>,
    subs: Vec<SubStat>,
    /// Messages published per channel (successfully written to the socket) in the window.
    sent_per_channel: Vec<Cell<u64>>,
    /// Deliveries counted in the window.
    received: Cell<u64>,
    /// Deliveries that arrived before the window or after it was closed.
    outside_window: Cell<u64>,
    /// Raw mode: broadcasts the publishers received back (not deliveries).
    echoes: Cell<u64>,
    /// Sequence gaps (messages skipped on one connection) and out-of-order arrivals.
    seq_gaps: Cell<u64>,
    seq_backwards: Cell<u64>,
    /// WebSocket messages and their count of updates (routopia batches several).
    messages: Cell<u64>,
    /// Bytes of those messages on the wire: payload (compressed, if it was) plus frame header.
    wire_bytes: Cell<u64>,
    /// Receive time of the last delivery in the window, unix ns.
    last_delivery_ns: Cell<u64>,
    latency: RefCell<Histogram<u64>>,
    errors: RefCell<ErrorLog>,
    /// Compressed batches already decoded, by their bytes (see `decode`).
    decompressed: RefCell<HashMap<Bytes, Rc<Vec<pb::ServerFrame>>>>,
    /// Scratch space of `plain_updates`, shared by all subscribers' readers.
    plain_updates: Cell<Vec<(u64, Range<usize>)>>,
}

/// Decoded compressed batches remembered at once.
const DECOMPRESSED_BATCHES: usize = 256;

impl Shared {
    /// The frames of one server message. The server sends the same compressed batch to every
    /// subscriber of a channel; a phone decompresses only its own, but one generator simulating
    /// a thousand would spend its core decompressing identical bytes, so a batch is decoded
    /// once per generator and counted for every subscriber that got it.
    fn decode(&self, message: Bytes) -> Result<Rc<Vec<pb::ServerFrame>>, envelope::EnvelopeError> {
        use prost::Message as _;
        let outer = pb::ServerMessage::decode(message.clone())?;
        if outer.zstd.is_empty() {
            return Ok(Rc::new(outer.frames));
        }
        if let Some(frames) = self.decompressed.borrow().get(&outer.zstd) {
            return Ok(frames.clone());
        }
        let frames = Rc::new(envelope::decode::<pb::ServerMessage>(message, MAX_MESSAGE, &Default::default())?);
        let mut memo = self.decompressed.borrow_mut();
        if memo.len() >= DECOMPRESSED_BATCHES {
            memo.clear();
        }
        memo.insert(outer.zstd, frames.clone());
        Ok(frames)
    }

    fn error(&self, kind: &'static str, message: String) {
        // What happens once the window is closed (we drop every connection) is not an error.
        if self.phase.get() != Phase::Done {
            self.errors.borrow_mut().add(kind, message);
        }
    }

    fn client_error(&self, context: &str, err: &ClientError) {
        self.error(error_kind(err), format!("{context}: {err}"));
    }

    /// Counts one delivery to subscriber `sub`; `now_ns` is when its message was read.
    fn deliver(&self, sub: usize, payload: &[u8], now_ns: u64) -> Option<u64> {
        let Some(header) = payload.get(..PAYLOAD_HEADER) else {
            self.error("short_payload", format!("a delivery of {} bytes carries no timestamp", payload.len()));
            return None;
        };
        let intended = u64::from_le_bytes(header[..8].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        if self.phase.get() != Phase::Measuring {
            self.outside_window.set(self.outside_window.get() + 1);
            return Some(seq);
        }
        self.received.set(self.received.get() + 1);
        let stat = &self.subs[sub];
        stat.received.set(stat.received.get() + 1);
        let latency_us = (now_ns.saturating_sub(intended) / 1000).clamp(1, HIST_MAX_US);
        // Values are clamped into the histogram's range, so recording cannot fail.
        let _ = self.latency.borrow_mut().record(latency_us);
        Some(seq)
    }

    /// Updates gap statistics for a connection that saw `seq` after `last`.
    fn sequence(&self, last: &mut Option<u64>, seq: u64) {
        if let Some(previous) = *last {
            if seq > previous + 1 {
                self.seq_gaps.set(self.seq_gaps.get() + (seq - previous - 1));
            } else if seq <= previous {
                self.seq_backwards.set(self.seq_backwards.get() + 1);
            }
        }
        *last = Some(seq);
    }
}

#[allow(unreachable_patterns)]
pub(crate) fn error_kind(err: &ClientError) -> &'static str {
    match err {
        ClientError::Io(_) => "io",
        ClientError::Handshake(_) => "handshake",
        ClientError::WebSocket(_) => "websocket",
        ClientError::Decode(_) => "decode",
        ClientError::Server(_) => "server_error",
        ClientError::Disconnected(_) => "disconnect",
        ClientError::Closed(_) => "closed",
        ClientError::Unexpected(_) => "unexpected",
        _ => "other",
    }
}

pub(crate) fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

fn channel_name(args: &RunArgs, channel: usize) -> String {
    format!("{}:{channel}", args.channel_prefix)
}

/// Bytes a server-to-client WebSocket message of `len` payload bytes takes on the wire
/// (unmasked: 2-byte header, plus 2 or 8 bytes of extended length).
pub fn ws_wire_len(len: usize) -> u64 {
    let header = match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    };
    (len + header) as u64
}

/// The payloads publishers cycle through: filler of `--payload` bytes, or realistic JSON of
/// `--payload-kind` after room for the timing header.
pub fn payload_pool(args: &RunArgs) -> Vec<Vec<u8>> {
    match args.payload_kind.json_kind() {
        None => vec![vec![0xA5u8; args.payload]],
        Some(kind) => {
            let mut generator = payloads::Generator::new(args.payload_seed);
            (0..PAYLOAD_POOL)
                .map(|_| {
                    let mut payload = vec![0u8; FULL_HEADER];
                    payload.extend_from_slice(&generator.next(kind));
                    payload
                })
                .collect()
        }
    }
}

/// A payload from `template` stamped with its intended send time, sequence number and (when
/// there is room) the actual send time.
pub fn stamp(template: &[u8], intended_ns: u64, seq: u64) -> Bytes {
    let mut payload = template.to_vec();
    payload[..8].copy_from_slice(&intended_ns.to_le_bytes());
    payload[8..16].copy_from_slice(&seq.to_le_bytes());
    if payload.len() >= FULL_HEADER {
        payload[16..24].copy_from_slice(&unix_ns().to_le_bytes());
    }
    Bytes::from(payload)
}

/// Opens one connection; in routopia mode also sends Connect and, for a subscriber, Subscribe.
pub async fn open(args: &RunArgs, subscribe_to: Option<&str>) -> Result<Client, ClientError> {
    match args.mode {
        Mode::Raw => Client::connect_raw(args.addr, &args.path).await,
        Mode::Routopia => {
            let options = ConnectOptions {
                name: "routopia-loadtest".into(),
                token: args.token.clone(),
                accept_zstd: args.accept_zstd,
                ..ConnectOptions::default()
            };
            let (mut client, _info) = Client::connect(args.addr, options).await?;
            if let Some(channel) = subscribe_to {
                client.subscribe(channel).await?;
            }
            Ok(client)
        }
    }
}

/// Wraps a future and tells, with its output, whether it had to wait (returned `Pending`).
struct Waited<F> {
    future: F,
    waited: bool,
}

impl<F: Future + Unpin> Future for Waited<F> {
    type Output = (F::Output, bool);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.future).poll(cx) {
            Poll::Ready(output) => Poll::Ready((output, self.waited)),
            Poll::Pending => {
                self.waited = true;
                Poll::Pending
            }
        }
    }
}

/// Most messages taken from one read's buffer under one receive timestamp.
const MESSAGES_PER_TIMESTAMP: u32 = 16;

/// Reads a subscriber's connection until it fails or the process ends.
///
/// Messages that were already buffered (from the same socket read) share the receive
/// timestamp of that read: clock reads were a tenth of the generator's CPU when taken per
/// message. The timestamp is refreshed at least every `MESSAGES_PER_TIMESTAMP` messages.
async fn subscriber_reader(shared: Rc<Shared>, mode: Mode, sub: usize, mut receiver: Receiver, check_seq: bool) {
    let mut last_seq = None;
    let mut disconnected = false;
    let mut now_ns = 0;
    let mut stamped = 0;
    loop {
        let next = Waited { future: std::pin::pin!(receiver.next_message()), waited: false };
        let (result, waited) = next.await;
        let message = match result {
            Ok(message) => message,
            Err(err) => {
                if !disconnected {
                    shared.client_error(&format!("subscriber {sub}"), &err);
                }
                break;
            }
        };
        if waited || stamped >= MESSAGES_PER_TIMESTAMP {
            now_ns = unix_ns();
            stamped = 0;
        }
        stamped += 1;
        if shared.phase.get() == Phase::Measuring {
            shared.messages.set(shared.messages.get() + 1);
            shared.wire_bytes.set(shared.wire_bytes.get() + ws_wire_len(message.len()));
        }
        let mut delivered = false;
        match mode {
            Mode::Raw => {
                if let Some(seq) = shared.deliver(sub, &message, now_ns) {
                    delivered = true;
                    if check_seq {
                        shared.sequence(&mut last_seq, seq);
                    }
                }
            }
            Mode::Routopia => {
                let mut scratch = shared.plain_updates.take();
                let plain = plain_updates(&message, &mut scratch).is_some();
                for (offset, payload) in scratch.iter().filter(|_| plain) {
                    delivered |= shared.deliver(sub, &message[payload.clone()], now_ns).is_some();
                    shared.sequence(&mut last_seq, *offset);
                }
                shared.plain_updates.set(scratch);
                if plain {
                    note_last_delivery(&shared, delivered, now_ns);
                    continue;
                }
                let frames = match shared.decode(message) {
                    Ok(frames) => frames,
                    Err(err) => {
                        shared.error("decode", format!("subscriber {sub}: {err}"));
                        continue;
                    }
                };
                for frame in frames.iter() {
                    match &frame.kind {
                        Some(Kind::Update(update)) => {
                            delivered |= shared.deliver(sub, &update.payload, now_ns).is_some();
                            // Offsets are per channel and consecutive, whoever published.
                            shared.sequence(&mut last_seq, update.offset);
                        }
                        Some(Kind::Disconnect(d)) => {
                            disconnected = true;
                            shared.error("disconnect", format!("subscriber {sub}: {} {}", d.code, d.reason));
                        }
                        Some(Kind::Reply(pb::Reply { result: Some(reply::Result::Error(e)), .. })) => {
                            shared.error("server_error", format!("subscriber {sub}: {} {}", e.code, e.message))
                        }
                        _ => {}
                    }
                }
            }
        }
        note_last_delivery(&shared, delivered, now_ns);
    }
    shared.subs[sub].connected.set(false);
}

/// The window's last delivery so far (when this message delivered anything while measuring).
fn note_last_delivery(shared: &Shared, delivered: bool, now_ns: u64) {
    if delivered && shared.phase.get() == Phase::Measuring {
        shared.last_delivery_ns.set(shared.last_delivery_ns.get().max(now_ns));
    }
}

/// The updates of a plain (uncompressed) `ServerMessage` holding only updates, as (offset,
/// payload's byte range in `message`), read straight off the wire. Decoding every message
/// into prost's structs cost the generator most of its core at 10,000 subscribers (it
/// receives millions of updates a second). `None` for anything else (compressed, a reply, a
/// disconnect, bytes it cannot follow): the caller decodes that message in full.
fn plain_updates<'a>(message: &[u8], updates: &'a mut Vec<(u64, Range<usize>)>) -> Option<&'a [(u64, Range<usize>)]> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    // Field numbers of `ServerMessage.frames`, `ServerFrame.update`, `ServerMessage.sub_id`,
    // `Update.offset` and `Update.payload`.
    const FRAMES: u32 = 1;
    const UPDATE: u32 = 2;
    const SUB_ID: u32 = 3;
    const OFFSET: u32 = 2;
    const PAYLOAD: u32 = 7;
    updates.clear();
    let mut rest = message;
    while !rest.is_empty() {
        match decode_key(&mut rest).ok()? {
            // One ServerFrame, which must be an update.
            (FRAMES, WireType::LengthDelimited) => {
                let mut frame = length_delimited(&mut rest)?;
                let (UPDATE, WireType::LengthDelimited) = decode_key(&mut frame).ok()? else { return None };
                let mut update = length_delimited(&mut frame)?;
                if !frame.is_empty() {
                    return None;
                }
                let (mut offset, mut payload) = (0, 0..0);
                while !update.is_empty() {
                    match decode_key(&mut update).ok()? {
                        (OFFSET, WireType::Varint) => offset = decode_varint(&mut update).ok()?,
                        (PAYLOAD, WireType::LengthDelimited) => {
                            let field = length_delimited(&mut update)?;
                            let start = field.as_ptr() as usize - message.as_ptr() as usize;
                            payload = start..start + field.len();
                        }
                        (tag, wire_type) => skip_field(wire_type, tag, &mut update, DecodeContext::default()).ok()?,
                    }
                }
                updates.push((offset, payload));
            }
            (SUB_ID, WireType::Varint) => {
                decode_varint(&mut rest).ok()?;
            }
            _ => return None,
        }
    }
    Some(updates)
}

/// The next length-delimited field's bytes, advancing `rest` past them.
fn length_delimited<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(prost::encoding::decode_varint(rest).ok()?).ok()?;
    let field = rest.get(..len)?;
    *rest = &rest[len..];
    Some(field)
}

/// Reads a publisher's connection: errors in routopia mode, broadcasts echoed back in raw mode.
async fn publisher_reader(shared: Rc<Shared>, mode: Mode, publisher: usize, mut receiver: Receiver) {
    loop {
        let message = match receiver.next_message().await {
            Ok(message) => message,
            Err(err) => {
                shared.client_error(&format!("publisher {publisher}"), &err);
                return;
            }
        };
        match mode {
            Mode::Raw => {
                if shared.phase.get() == Phase::Measuring {
                    shared.echoes.set(shared.echoes.get() + 1);
                }
            }
            Mode::Routopia => {
                match envelope::decode::<pb::ServerMessage>(message, MAX_MESSAGE, &Default::default()) {
                    Err(err) => shared.error("decode", format!("publisher {publisher}: {err}")),
                    Ok(frames) => {
                        for frame in frames {
                            match frame.kind {
                                Some(Kind::Disconnect(d)) => shared
                                    .error("disconnect", format!("publisher {publisher}: {} {}", d.code, d.reason)),
                                Some(Kind::Reply(pb::Reply { result: Some(reply::Result::Error(e)), .. })) => shared
                                    .error("server_error", format!("publisher {publisher}: {} {}", e.code, e.message)),
                                _ => {}
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The schedule every publisher follows: message k is due at `start + k / rate`.
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    start_unix_ns: u64,
    rate: f64,
    /// Messages due within the window.
    total: u64,
    /// After this, nothing more is sent.
    hard_stop: Instant,
}

impl Schedule {
    fn due(&self, k: u64) -> Duration {
        Duration::from_secs_f64(k as f64 / self.rate)
    }
}

/// What a publisher did; histograms in microseconds.
pub struct PublisherStats {
    pub sent: u64,
    /// How late each send started against its schedule.
    pub lag: Histogram<u64>,
    /// When the publisher slept until a send was due: how late it woke (the generator's own
    /// scheduling delay: busy reader tasks on the same core).
    pub wake: Histogram<u64>,
    /// How long each write took to be accepted (the server not reading: TCP backpressure).
    pub write: Histogram<u64>,
    pub final_lag_us: u64,
}

impl PublisherStats {
    fn new() -> Self {
        Self { sent: 0, lag: histogram(), wake: histogram(), write: histogram(), final_lag_us: 0 }
    }

    fn merge(&mut self, other: &PublisherStats) {
        self.sent += other.sent;
        // Same bounds everywhere: adding cannot fail.
        let _ = self.lag.add(&other.lag);
        let _ = self.wake.add(&other.wake);
        let _ = self.write.add(&other.write);
        self.final_lag_us = self.final_lag_us.max(other.final_lag_us);
    }
}

pub(crate) fn record(h: &mut Histogram<u64>, us: u64) {
    // Clamped into the histogram's range, so recording cannot fail.
    let _ = h.record(us.clamp(1, HIST_MAX_US));
}

async fn publisher(
    shared: Rc<Shared>,
    args: Rc<RunArgs>,
    index: usize,
    mut sender: Sender,
    schedule: Schedule,
    pool: Rc<Vec<Vec<u8>>>,
) -> PublisherStats {
    let mut outcome = PublisherStats::new();
    let channels: Vec<String> = (0..args.channels).map(|c| channel_name(&args, c)).collect();
    let mut k = index as u64;
    while k < schedule.total {
        let offset = schedule.due(k);
        let intended = schedule.start + offset;
        let slept = intended > Instant::now();
        if slept {
            sleep_until(intended).await;
        }
        let now = Instant::now();
        if now >= schedule.hard_stop {
            break;
        }
        let lag_us = now.saturating_duration_since(intended).as_micros() as u64;
        record(&mut outcome.lag, lag_us);
        if slept {
            record(&mut outcome.wake, lag_us);
        }
        outcome.final_lag_us = lag_us;
        let intended_ns = schedule.start_unix_ns + offset.as_nanos() as u64;
        let data = stamp(&pool[(k % pool.len() as u64) as usize], intended_ns, k);
        let channel = (k % args.channels as u64) as usize;
        let send = async {
            match args.mode {
                Mode::Raw => sender.send_binary(data).await,
                Mode::Routopia => {
                    let publish = pb::Publish {
                        channel: channels[channel].clone(),
                        r#type: pb::UpdateType::Route as i32,
                        key: String::new(),
                        confidence: 1.0,
                        payload: data,
                    };
                    // id 0: fire and forget, the server only answers errors.
                    let frame = pb::ClientFrame { id: 0, command: Some(Command::Publish(publish)) };
                    sender.send_frames(vec![frame]).await
                }
            }
        };
        let result = timeout_at(schedule.hard_stop, send).await;
        record(&mut outcome.write, now.elapsed().as_micros() as u64);
        match result {
            Ok(Ok(())) => {
                outcome.sent += 1;
                let count = &shared.sent_per_channel[channel];
                count.set(count.get() + 1);
            }
            Ok(Err(err)) => {
                shared.client_error(&format!("publisher {index} send"), &err);
                break;
            }
            Err(_) => {
                shared.error(
                    "publisher_stalled",
                    format!("publisher {index}: a write did not finish before the drain deadline"),
                );
                break;
            }
        }
        k += args.publishers as u64;
    }
    outcome
}

/// Sets up one subscriber and starts its reader; returns the sending half (kept open).
async fn setup_subscriber(shared: Rc<Shared>, args: Rc<RunArgs>, sub: usize) -> Result<Sender, String> {
    let channel = channel_name(&args, shared.subs[sub].channel);
    let client = match timeout(CONNECT_TIMEOUT, open(&args, Some(&channel))).await {
        Ok(Ok(client)) => client,
        Ok(Err(err)) => return Err(format!("subscriber {sub}: {err}")),
        Err(_) => return Err(format!("subscriber {sub}: setup took more than {CONNECT_TIMEOUT:?}")),
    };
    let (sender, receiver) = client.split();
    shared.subs[sub].set_up.set(true);
    shared.subs[sub].connected.set(true);
    let check_seq = args.mode == Mode::Routopia || args.publishers == 1;
    compio::runtime::spawn(subscriber_reader(shared.clone(), args.mode, sub, receiver, check_seq)).detach();
    Ok(sender)
}

pub async fn run(args: RunArgs) -> Result<Report, Fatal> {
    let args = Rc::new(args);
    let shared = Rc::new(Shared {
        phase: Cell::new(Phase::Setup),
        subs: (0..args.subscribers)
            .map(|i| SubStat {
                channel: i % args.channels,
                set_up: Cell::new(false),
                connected: Cell::new(false),
                received: Cell::new(0),
            })
            .collect(),
        sent_per_channel: (0..args.channels).map(|_| Cell::new(0)).collect(),
        received: Cell::new(0),
        outside_window: Cell::new(0),
        echoes: Cell::new(0),
        seq_gaps: Cell::new(0),
        seq_backwards: Cell::new(0),
        messages: Cell::new(0),
        wire_bytes: Cell::new(0),
        last_delivery_ns: Cell::new(0),
        latency: RefCell::new(histogram()),
        errors: RefCell::new(ErrorLog::default()),
        decompressed: RefCell::new(HashMap::new()),
        plain_updates: Cell::new(Vec::new()),
    });

    // ---- setup: subscribers in batches, then publishers, all bounded in time
    let setup_start = Instant::now();
    let setup_deadline = setup_start + Duration::from_secs_f64(args.setup_timeout);
    let mut keep_open: Vec<Sender> = Vec::with_capacity(args.subscribers);
    let mut setup_failures: Vec<String> = Vec::new();
    let mut next = 0;
    while next < args.subscribers {
        if Instant::now() >= setup_deadline {
            setup_failures.push(format!(
                "setup deadline ({} s) passed with {} of {} subscribers attempted",
                args.setup_timeout, next, args.subscribers
            ));
            break;
        }
        let end = (next + args.connect_batch).min(args.subscribers);
        let handles: Vec<_> = (next..end)
            .map(|sub| compio::runtime::spawn(setup_subscriber(shared.clone(), args.clone(), sub)))
            .collect();
        for handle in handles {
            match timeout_at(setup_deadline.max(Instant::now() + CONNECT_TIMEOUT), handle).await {
                Ok(Ok(Ok(sender))) => keep_open.push(sender),
                Ok(Ok(Err(message))) => setup_failures.push(message),
                Ok(Err(join)) => setup_failures.push(format!("a setup task ended abnormally: {join:?}")),
                Err(_) => setup_failures.push("a setup task outlived the setup deadline".into()),
            }
        }
        next = end;
    }
    let connected = shared.subs.iter().filter(|s| s.set_up.get()).count();
    if connected == 0 {
        return Err(Fatal::new(
            format!(
                "no subscriber could connect to {} ({} failures; first: {})",
                args.addr,
                setup_failures.len(),
                setup_failures.first().map(String::as_str).unwrap_or("-")
            ),
            setup_failures.len(),
        ));
    }
    let mut publisher_senders = Vec::with_capacity(args.publishers);
    for index in 0..args.publishers {
        let client = match timeout(CONNECT_TIMEOUT, open(&args, None)).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                return Err(Fatal::new(format!("publisher {index} could not connect: {err}"), setup_failures.len()))
            }
            Err(_) => {
                return Err(Fatal::new(
                    format!("publisher {index} setup took more than {CONNECT_TIMEOUT:?}"),
                    setup_failures.len(),
                ))
            }
        };
        let (sender, receiver) = client.split();
        compio::runtime::spawn(publisher_reader(shared.clone(), args.mode, index, receiver)).detach();
        publisher_senders.push(sender);
    }
    let setup_seconds = setup_start.elapsed().as_secs_f64();
    for failure in &setup_failures {
        shared.errors.borrow_mut().add("setup", failure.clone());
    }
    sleep(Duration::from_millis(args.settle_ms)).await;
    // Connections that died during the settle pause are already counted as errors.
    let subscribers_at_start = shared.subs.iter().filter(|s| s.connected.get()).count();

    // ---- the window
    let pool = Rc::new(payload_pool(&args));
    let payload_bytes_mean = pool.iter().map(Vec::len).sum::<usize>() as f64 / pool.len() as f64;
    let self_cpu_start = procstat::self_cpu_seconds();
    let server_cpu_start = args.server_pid.and_then(procstat::process_cpu_seconds);
    let self_wait_start = procstat::wait_seconds(None);
    let server_wait_start = args.server_pid.and_then(|pid| procstat::wait_seconds(Some(pid)));
    let start = Instant::now() + Duration::from_millis(1);
    let window = Duration::from_secs_f64(args.duration);
    let drain = Duration::from_secs_f64(args.drain_timeout);
    let schedule = Schedule {
        start,
        start_unix_ns: unix_ns() + 1_000_000,
        rate: args.rate,
        total: (args.rate * args.duration).ceil() as u64,
        hard_stop: start + window + drain,
    };
    shared.phase.set(Phase::Measuring);
    let handles: Vec<_> = publisher_senders
        .into_iter()
        .enumerate()
        .map(|(index, sender)| {
            compio::runtime::spawn(publisher(shared.clone(), args.clone(), index, sender, schedule, pool.clone()))
        })
        .collect();
    let mut publishers = PublisherStats::new();
    for handle in handles {
        // Publishers stop by themselves at the hard stop; the margin only guards against a bug.
        match timeout_at(schedule.hard_stop + Duration::from_secs(1), handle).await {
            Ok(Ok(outcome)) => publishers.merge(&outcome),
            Ok(Err(join)) => shared.error("publisher_task", format!("a publisher task ended abnormally: {join:?}")),
            Err(_) => shared.error("publisher_task", "a publisher task did not stop at the hard stop".into()),
        }
    }
    let published_at = Instant::now();

    // ---- drain: wait for what is still in flight to the connections still open
    let all_delivered = |shared: &Shared| {
        shared
            .subs
            .iter()
            .filter(|s| s.connected.get())
            .all(|s| s.received.get() >= shared.sent_per_channel[s.channel].get())
    };
    let drain_deadline = (published_at + drain).min(schedule.hard_stop.max(published_at));
    while Instant::now() < drain_deadline && !all_delivered(&shared) {
        sleep(Duration::from_millis(2)).await;
    }
    shared.phase.set(Phase::Done);
    let end = Instant::now();
    // The subscribers' sending halves stayed open until here so that no connection closed early.
    drop(keep_open);
    let self_cpu_end = procstat::self_cpu_seconds();
    let server_cpu_end = args.server_pid.and_then(procstat::process_cpu_seconds);
    let self_wait_end = procstat::wait_seconds(None);
    let server_wait_end = args.server_pid.and_then(|pid| procstat::wait_seconds(Some(pid)));
    let server_rss = args.server_pid.and_then(procstat::process_rss_bytes);

    // ---- the numbers
    let mut expected = 0;
    let mut lost = 0;
    let mut extra = 0;
    let mut short_subscribers = 0;
    for sub in &shared.subs {
        // Subscribers that never connected are setup errors, not loss.
        if !sub.set_up.get() {
            continue;
        }
        let want = shared.sent_per_channel[sub.channel].get();
        let got = sub.received.get();
        expected += want;
        if got < want {
            lost += want - got;
            short_subscribers += 1;
        } else {
            extra += got - want;
        }
    }
    let last_delivery = Duration::from_nanos(shared.last_delivery_ns.get().saturating_sub(schedule.start_unix_ns));
    let publish_time = published_at.saturating_duration_since(start);
    let measured = last_delivery.max(publish_time.min(window));
    let errors = std::mem::take(&mut *shared.errors.borrow_mut());
    let latency = shared.latency.borrow().clone();
    Ok(Report {
        label: args.label.clone().unwrap_or_else(|| format!("{:?}", args.mode).to_lowercase()),
        args: (*args).clone(),
        setup_seconds,
        subscribers_connected: connected,
        subscribers_at_start,
        subscribers_at_end: shared.subs.iter().filter(|s| s.connected.get()).count(),
        scheduled: schedule.total,
        expected,
        received: shared.received.get(),
        lost,
        extra,
        short_subscribers,
        outside_window: shared.outside_window.get(),
        echoes: shared.echoes.get(),
        messages: shared.messages.get(),
        wire_bytes: shared.wire_bytes.get(),
        payload_bytes_mean,
        seq_gaps: shared.seq_gaps.get(),
        seq_backwards: shared.seq_backwards.get(),
        window_seconds: window.as_secs_f64(),
        publish_seconds: publish_time.as_secs_f64(),
        measured_seconds: measured.as_secs_f64(),
        elapsed_seconds: end.saturating_duration_since(start).as_secs_f64(),
        latency,
        publishers,
        errors,
        generator_cpu_seconds: match (self_cpu_start, self_cpu_end) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        generator_wait_seconds: self_wait_start.zip(self_wait_end).map(|(a, b)| (b - a).max(0.0)),
        server_wait_seconds: server_wait_start.zip(server_wait_end).map(|(a, b)| (b - a).max(0.0)),
        server_cpu: match (server_cpu_start, server_cpu_end) {
            (Some((a, _)), Some((b, threads))) if b >= a => Some((b - a, threads)),
            _ => None,
        },
        server_rss_bytes: server_rss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn update(offset: u64, payload: &[u8]) -> pb::ServerFrame {
        pb::ServerFrame {
            kind: Some(Kind::Update(pb::Update {
                sub_id: 4,
                offset,
                r#type: 1,
                key: "stop-9".into(),
                confidence: 0.5,
                timestamp_us: 1_800_000_000_000_000,
                payload: payload.to_vec().into(),
                skipped: 2,
            })),
        }
    }

    /// Offsets and payloads as prost decodes them, for comparison.
    fn decoded(message: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let frames = pb::ServerMessage::decode(message).unwrap().frames;
        frames
            .into_iter()
            .map(|frame| match frame.kind {
                Some(Kind::Update(update)) => (update.offset, update.payload.to_vec()),
                other => panic!("not an update: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn plain_updates_read_what_prost_decodes() {
        let frames = vec![update(7, b"first payload"), update(8, b""), update(u64::MAX, &[0xff; 300])];
        let message = pb::ServerMessage { frames, sub_id: 3, ..Default::default() }.encode_to_vec();
        let mut scratch = Vec::new();
        let read: Vec<(u64, Vec<u8>)> = plain_updates(&message, &mut scratch)
            .expect("a plain batch of updates")
            .iter()
            .map(|(offset, payload)| (*offset, message[payload.clone()].to_vec()))
            .collect();
        assert_eq!(read, decoded(&message));
    }

    #[test]
    fn anything_but_plain_updates_goes_to_the_full_decoder() {
        let pong = pb::ServerFrame { kind: Some(Kind::Pong(pb::Pong { timestamp_us: 1 })) };
        let with_pong = pb::ServerMessage { frames: vec![update(1, b"x"), pong], ..Default::default() }.encode_to_vec();
        assert!(plain_updates(&with_pong, &mut Vec::new()).is_none());
        let compressed = pb::ServerMessage { zstd: vec![1, 2, 3].into(), ..Default::default() }.encode_to_vec();
        assert!(plain_updates(&compressed, &mut Vec::new()).is_none());
        let whole = pb::ServerMessage { frames: vec![update(1, b"xyz")], ..Default::default() }.encode_to_vec();
        assert!(plain_updates(&whole[..whole.len() - 1], &mut Vec::new()).is_none(), "a cut message");
    }
}
