//! zstd through the real binary: large messages reach clients that accept zstd compressed once
//! for all of them, others get them plain, small ones stay plain, and a dictionary trained with
//! `train-dict` is served, named in the connect result and used only for clients holding it.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::{options, within, TestServer, BIN};
use prost::Message as _;
use routopia_realtime::client::{fetch_zstd_dictionaries, Client, ConnectOptions, Receiver};
use routopia_realtime::protocol::envelope::{self, Dictionaries};
use routopia_realtime::protocol::pb::{self, server_frame::Kind, UpdateType};
use zstd::zstd_safe;

/// A plausible ROUTE payload: repetitive enough to compress as real ones do.
fn route_payload(n: u64, steps: usize) -> Vec<u8> {
    let streets = ["Main St", "Harbour Rd", "A10 ring", "Elm Avenue", "Station Sq", "Bridge Ln"];
    let steps: Vec<String> = (0..steps)
        .map(|i| {
            format!(
                r#"{{"instruction":"turn {} onto {}","distance_m":{},"duration_s":{}}}"#,
                if (i + n as usize).is_multiple_of(2) { "left" } else { "right" },
                streets[(i * 7 + n as usize) % streets.len()],
                120 + (i * 37 + n as usize) % 900,
                15 + (i * 11) % 120
            )
        })
        .collect();
    format!(
        r#"{{"route_id":"r-{n}","eta_s":{},"distance_m":{},"traffic_delay_s":{},"steps":[{}]}}"#,
        600 + n % 300,
        5000 + n * 17 % 4000,
        n % 90,
        steps.join(",")
    )
    .into_bytes()
}

async fn zstd_client(server: &TestServer, dictionaries: Vec<Bytes>) -> (Client, pb::ConnectResult) {
    let options = ConnectOptions { accept_zstd: true, zstd_dictionaries: dictionaries, ..options("zstd") };
    Client::connect(server.addr, options).await.expect("connect")
}

/// The next WebSocket message, undecoded, and the updates in it as a client decodes them.
async fn next_raw(receiver: &mut Receiver, dictionaries: &Dictionaries) -> (pb::ServerMessage, Vec<pb::Update>) {
    let bytes = within("a message", receiver.next_message()).await.expect("a message");
    let outer = pb::ServerMessage::decode(bytes.clone()).expect("a ServerMessage");
    let updates = envelope::decode::<pb::ServerMessage>(bytes, 1 << 20, dictionaries)
        .expect("decodes")
        .into_iter()
        .filter_map(|frame| match frame.kind {
            Some(Kind::Update(update)) => Some(update),
            _ => None,
        })
        .collect();
    (outer, updates)
}

fn compression_figure(server: &TestServer, name: &str) -> u64 {
    server.health()["compression"][name].as_u64().unwrap_or_else(|| panic!("compression.{name} in /health"))
}

#[compio::test]
async fn large_messages_are_compressed_once_for_every_subscriber_that_accepts_zstd() {
    let server = TestServer::start(1, &[]);
    let mut receivers = Vec::new();
    for _ in 0..3 {
        let (mut client, _) = zstd_client(&server, Vec::new()).await;
        let sub_id = client.subscribe("route:7").await.unwrap().sub_id;
        receivers.push((client.split().1, sub_id, true));
    }
    let mut plain = server.client().await;
    let plain_sub = plain.subscribe("route:7").await.unwrap().sub_id;
    receivers.push((plain.split().1, plain_sub, false));
    let mut publisher = server.client().await;
    let large = route_payload(1, 40);
    assert!(large.len() > 2048);
    publisher.publish("route:7", UpdateType::Route, "r-1", large.clone()).await.unwrap();

    for (receiver, sub_id, accepts) in &mut receivers {
        let (outer, updates) = next_raw(receiver, &Dictionaries::default()).await;
        assert_eq!(!outer.zstd.is_empty(), *accepts, "compressed exactly for clients that accept zstd");
        if *accepts {
            assert!(outer.frames.is_empty());
            assert_eq!(outer.sub_id, *sub_id, "a shared batch names the subscription in the envelope");
            assert!(outer.zstd.len() < large.len() / 2, "{} bytes compressed", outer.zstd.len());
        }
        assert_eq!(updates.len(), 1);
        assert_eq!((updates[0].sub_id, updates[0].offset), (*sub_id, 1));
        assert_eq!(updates[0].payload.as_ref(), large.as_slice());
    }
    assert_eq!(compression_figure(&server, "messages"), 3);
    assert_eq!(compression_figure(&server, "compressions"), 1, "one shard compressed the batch once");
    assert!(compression_figure(&server, "compressed_bytes") < compression_figure(&server, "plain_bytes"));

    // Below the threshold nothing is compressed, whoever accepts it.
    publisher.publish("route:7", UpdateType::Route, "r-2", b"eta 640 s".to_vec()).await.unwrap();
    for (receiver, sub_id, _) in &mut receivers {
        let (outer, updates) = next_raw(receiver, &Dictionaries::default()).await;
        assert!(outer.zstd.is_empty());
        assert_eq!((updates[0].sub_id, updates[0].offset), (*sub_id, 2));
    }
    assert_eq!(compression_figure(&server, "messages"), 3);
}

#[compio::test]
async fn a_batch_of_one_channel_is_encoded_once_and_names_each_subscription_in_the_envelope() {
    let server = TestServer::start(1, &[]);
    let mut receivers = Vec::new();
    for _ in 0..3 {
        let mut client = server.client().await;
        let sub_id = client.subscribe("traffic:ring").await.unwrap().sub_id;
        receivers.push((client.split().1, sub_id));
    }
    // Five publications in one message reach every outbox before any writer runs.
    let mut publisher = server.client().await;
    let frames = (1..=5u8)
        .map(|n| pb::ClientFrame {
            id: 0,
            command: Some(pb::client_frame::Command::Publish(pb::Publish {
                channel: "traffic:ring".into(),
                r#type: UpdateType::Traffic as i32,
                key: format!("segment-{n}"),
                confidence: 1.0,
                payload: vec![n; 40].into(),
            })),
        })
        .collect();
    publisher.send_frames(frames).await.unwrap();
    let mut shared_bytes = Vec::new();
    for (receiver, sub_id) in &mut receivers {
        let bytes = within("a message", receiver.next_message()).await.unwrap();
        let outer = pb::ServerMessage::decode(bytes.clone()).unwrap();
        assert_eq!(outer.sub_id, *sub_id, "the envelope names the subscription");
        assert!(outer.frames.iter().all(|f| matches!(&f.kind, Some(Kind::Update(u)) if u.sub_id == 0)));
        let updates = envelope::decode::<pb::ServerMessage>(bytes, 1 << 20, &Dictionaries::default()).unwrap();
        let seen: Vec<(u32, u64)> = updates
            .iter()
            .filter_map(|f| match &f.kind {
                Some(Kind::Update(u)) => Some((u.sub_id, u.offset)),
                _ => None,
            })
            .collect();
        assert_eq!(seen, (1..=5).map(|n| (*sub_id, n)).collect::<Vec<_>>());
        shared_bytes.push(pb::ServerMessage { sub_id: 0, ..outer }.encode_to_vec());
    }
    assert!(shared_bytes.windows(2).all(|w| w[0] == w[1]), "every subscriber got the same frames");
}

#[compio::test]
async fn a_trained_dictionary_is_served_announced_and_used_for_clients_that_hold_it() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    std::fs::create_dir(&samples).unwrap();
    for n in 0..400u64 {
        std::fs::write(samples.join(format!("{n:04}.json")), route_payload(n, 3 + n as usize % 5)).unwrap();
    }
    let dictionary = dir.path().join("route.dict");
    let trained = Command::new(BIN)
        .args(["train-dict", "--type", "ROUTE", "--out"])
        .arg(&dictionary)
        .arg(&samples)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&trained.stdout);
    assert!(trained.status.success(), "{report}{}", String::from_utf8_lossy(&trained.stderr));
    assert!(report.contains("with the dictionary"), "{report}");
    let id = zstd_safe::get_dict_id_from_dict(&std::fs::read(&dictionary).unwrap()).expect("a zstd dictionary").get();

    let setting = format!("[{{type=\"ROUTE\",file=\"{}\"}}]", dictionary.display());
    // A small threshold: one small ROUTE update is what a dictionary is for.
    let server = TestServer::start(
        1,
        &[("ROUTOPIA_DELIVERY__ZSTD_DICTIONARIES", &setting), ("ROUTOPIA_DELIVERY__COMPRESSION_THRESHOLD", "256")],
    );
    let served = within("dictionaries", fetch_zstd_dictionaries(server.addr)).await.unwrap();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].as_ref(), std::fs::read(&dictionary).unwrap().as_slice());

    let (mut holder, result) = zstd_client(&server, served.clone()).await;
    assert_eq!(result.zstd_dictionaries, [pb::ZstdDictionary { id, r#type: UpdateType::Route as i32, in_use: true }]);
    let (mut other, result) = zstd_client(&server, Vec::new()).await;
    assert!(!result.zstd_dictionaries[0].in_use);
    let holder_sub = holder.subscribe("route:9").await.unwrap().sub_id;
    let other_sub = other.subscribe("route:9").await.unwrap().sub_id;
    let mut holder_dictionaries = Dictionaries::default();
    assert_eq!(holder_dictionaries.add(&served[0]), Some(id));

    let mut publisher = server.client().await;
    let update = route_payload(1000, 6);
    assert!(update.len() > 256);
    publisher.publish("route:9", UpdateType::Route, "r-1000", update.clone()).await.unwrap();

    let (outer, updates) = next_raw(&mut holder.split().1, &holder_dictionaries).await;
    assert_eq!(zstd_safe::get_dict_id_from_frame(&outer.zstd).map(|id| id.get()), Some(id));
    assert_eq!((updates[0].sub_id, updates[0].payload.as_ref()), (holder_sub, update.as_slice()));
    let (outer, updates) = next_raw(&mut other.split().1, &Dictionaries::default()).await;
    assert!(!outer.zstd.is_empty());
    assert_eq!(zstd_safe::get_dict_id_from_frame(&outer.zstd), None, "no dictionary for a client without it");
    assert_eq!((updates[0].sub_id, updates[0].payload.as_ref()), (other_sub, update.as_slice()));
    assert_eq!(compression_figure(&server, "with_dictionary"), 1);
}

#[test]
fn a_file_that_is_not_a_dictionary_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("route.dict");
    std::fs::write(&bogus, b"{\"not\": \"a dictionary\"}").unwrap();
    let setting = format!("[{{type=\"ROUTE\",file=\"{}\"}}]", bogus.display());
    let output = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ROUTOPIA_DELIVERY__ZSTD_DICTIONARIES", &setting)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("delivery.zstd_dictionaries") && stderr.contains("not a zstd dictionary"), "{stderr}");
}
