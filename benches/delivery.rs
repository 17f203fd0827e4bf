//! Costs on the delivery path, without sockets: protocol encode/decode, one update fanned out
//! to 10,000 local subscribers, batching, and zstd at several sizes.
//! Run: `cargo bench --bench delivery` (add `-- fan_out` to pick a group).

use std::hint::black_box;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message;
use routopia_realtime::compression::{SharedBatches, ZstdSettings};
use routopia_realtime::config::Config;
use routopia_realtime::core::Publication;
use routopia_realtime::core::{ConnId, ConnLabel};
use routopia_realtime::outbox::{OutItem, Outbox, Pressure, SharedEncoding};
use routopia_realtime::protocol::envelope;
use routopia_realtime::protocol::pb::{self, client_frame::Command};
use routopia_realtime::protocol::push::encode_update_body;
use routopia_realtime::ratelimit::KeyedBuckets;
use routopia_realtime::session::{Session, SessionLimits};

/// The client id of subscriber `i` (shard 0, slot `i`).
fn label(i: u32) -> ConnLabel {
    ConnLabel { shard: 0, conn: ConnId { index: i, generation: 1 } }
}

fn update(payload: usize) -> pb::Update {
    pb::Update {
        sub_id: 0,
        offset: 1234,
        r#type: pb::UpdateType::Route as i32,
        key: "segment-81".into(),
        confidence: 0.93,
        timestamp_us: 1_800_000_000_000_000,
        payload: Bytes::from(vec![b'x'; payload]),
        skipped: 0,
    }
}

fn publication(payload: usize) -> Rc<Publication> {
    Rc::new(routopia_realtime::protocol::push::publication(
        Arc::from("route:42"),
        1234,
        1,
        encode_update_body(&update(payload)),
        Instant::now(),
    ))
}

fn protocol(c: &mut Criterion) {
    let mut group = c.benchmark_group("protocol");
    let publish = pb::Publish {
        channel: "route:42".into(),
        r#type: 1,
        key: "segment-81".into(),
        confidence: 0.9,
        payload: vec![b'x'; 64].into(),
    };
    let message: Bytes = envelope::encode::<pb::ClientMessage>(
        vec![pb::ClientFrame { id: 9, command: Some(Command::Publish(publish)) }],
        None,
    )
    .into();
    group.bench_function("decode_publish_64B", |b| {
        b.iter(|| envelope::decode::<pb::ClientMessage>(black_box(message.clone()), 65536, &Default::default()))
    });
    let up = update(64);
    group.bench_function("encode_update_body_64B", |b| b.iter(|| encode_update_body(black_box(&up))));
    group.finish();
}

fn fan_out(c: &mut Criterion) {
    let config = Config::default();
    let users = Arc::new(KeyedBuckets::new([config.rate_limits.user_commands, config.rate_limits.user_publishes]));
    let limits = Rc::new(SessionLimits::from_config(&config, None, users));
    let mut sessions: Vec<Session> =
        (0..10_000).map(|i| Session::new(label(i), limits.clone(), Instant::now())).collect();
    let publication = publication(64);
    let mut wire = Vec::with_capacity(4096);
    let now = Instant::now();
    let mut group = c.benchmark_group("fan_out");
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("one_update_to_10k_subscribers_64B", |b| {
        b.iter(|| {
            for session in &mut sessions {
                session.push_update(7, &publication, now);
            }
            for session in &mut sessions {
                wire.clear();
                session.poll_transmit(&mut wire);
                black_box(&wire);
            }
        })
    });
    // At the outbox level, a run of 20 updates to each of 10,000 subscribers: written per
    // subscriber, encoded once by the shard and shared, and shared compressed (64 B payloads,
    // then 2 KiB ROUTE updates).
    let pressure = Pressure { priority_types: 1 << 1 | 1 << 2, conflate_above: 1 << 18 };
    let mut outboxes: Vec<Outbox> = (0..10_000).map(|_| Outbox::new(1 << 20, pressure)).collect();
    let settings = Arc::new(ZstdSettings { threshold: 1024, level: 1, dictionaries: Vec::new() });
    let mut batches = SharedBatches::new(settings);
    group.throughput(Throughput::Elements(20 * 10_000));
    for (payload, run) in [
        ("64B", (0..20).map(|_| crate::publication(64)).collect::<Vec<_>>()),
        ("2KiB_route", (0..20).map(|_| publication_with(route_like_payload(2048))).collect()),
    ] {
        // `shared_timed`: as `shared`, with every update counted and timed as the server does.
        let metrics = routopia_realtime::metrics::LocalMetrics::default();
        for (name, sharing, zstd, timed) in [
            ("own", false, false, false),
            ("shared", true, false, false),
            ("shared_timed", true, false, true),
            ("shared_zstd", true, true, false),
        ] {
            group.bench_function(format!("20_updates_{payload}_to_10k_subscribers_{name}"), |b| {
                b.iter(|| {
                    for outbox in &mut outboxes {
                        for publication in &run {
                            let _ = outbox.push(OutItem::Push { sub_id: 7, publication: publication.clone() });
                        }
                    }
                    for outbox in &mut outboxes {
                        wire.clear();
                        let observed = timed.then(|| (&metrics, std::time::Instant::now()));
                        let sharing =
                            sharing.then_some(SharedEncoding { batches: &mut batches, zstd, held: 0, observed });
                        outbox.poll_transmit(&mut wire, 100, sharing);
                        black_box(&wire);
                    }
                    batches.forget_shared();
                })
            });
        }
    }
    group.finish();
}

/// A JSON ROUTE update of about `len` bytes, structured like a real one (steps with streets).
fn route_like_payload(len: usize) -> Vec<u8> {
    let streets = ["Main St", "Harbour Rd", "A10 ring", "Elm Avenue", "Station Sq", "Bridge Ln"];
    let mut json = String::from(r#"{"route_id":"r-81","eta_s":642,"distance_m":8120,"steps":["#);
    let mut i = 0;
    while json.len() < len {
        json.push_str(&format!(
            r#"{{"instruction":"turn {} onto {}","distance_m":{}}},"#,
            ["left", "right"][i % 2],
            streets[(i * 7) % streets.len()],
            120 + (i * 37) % 900
        ));
        i += 1;
    }
    json.push_str("{}]}");
    json.into_bytes()
}

fn publication_with(payload: Vec<u8>) -> Rc<Publication> {
    let update = pb::Update { payload: payload.into(), ..update(0) };
    Rc::new(routopia_realtime::protocol::push::publication(
        Arc::from("route:42"),
        1234,
        1,
        encode_update_body(&update),
        Instant::now(),
    ))
}

fn batching(c: &mut Criterion) {
    let publication = publication(64);
    let mut group = c.benchmark_group("batching");
    group.throughput(Throughput::Elements(100));
    for batch_size in [1usize, 10, 100] {
        group.bench_function(format!("drain_100_updates_batch_{batch_size}"), |b| {
            b.iter_batched_ref(
                || {
                    let mut outbox =
                        Outbox::new(1 << 20, Pressure { priority_types: 1 << 1 | 1 << 2, conflate_above: 1 << 18 });
                    for _ in 0..100 {
                        let _ = outbox.push(OutItem::Push { sub_id: 3, publication: publication.clone() });
                    }
                    (outbox, Vec::with_capacity(16 * 1024))
                },
                |(outbox, wire)| outbox.poll_transmit(wire, batch_size, None),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn compression(c: &mut Criterion) {
    let mut group = c.benchmark_group("zstd");
    for payload in [256usize, 1024, 16 * 1024] {
        // Realistic text-like payloads: JSON-ish repeated structure.
        let text: Vec<u8> = (0..payload).map(|i| b"{\"lat\":48.85,\"lon\":2.35,\"eta\":300}"[i % 34]).collect();
        let frames = vec![pb::ServerFrame {
            kind: Some(pb::server_frame::Kind::Update(pb::Update { payload: text.into(), ..update(0) })),
        }];
        let plain = pb::ServerMessage { frames: frames.clone(), zstd: Bytes::new(), sub_id: 0 }.encoded_len();
        let packed = envelope::encode::<pb::ServerMessage>(frames.clone(), Some(3)).len();
        println!("zstd level 3, {payload} B payload: {plain} B plain -> {packed} B");
        group.throughput(Throughput::Bytes(plain as u64));
        group.bench_function(format!("compress_level3_{payload}B"), |b| {
            b.iter(|| envelope::encode::<pb::ServerMessage>(black_box(frames.clone()), Some(3)))
        });
    }
    group.finish();
}

criterion_group!(benches, protocol, fan_out, batching, compression);
criterion_main!(benches);
