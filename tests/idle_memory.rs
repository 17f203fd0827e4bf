//! What an idle connection costs the server: many connections that connected, subscribed and
//! went quiet, and the growth of the server's resident memory they caused.
//!
//! The ignored test is the measurement behind docs/benchmarks.md's idle-memory figures; run it on the
//! release build:
//! `cargo test --release --test idle_memory -- --ignored --nocapture`
//! (`ROUTOPIA_IDLE_CONNECTIONS` sets how many, 10000 by default).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::TestServer;
use routopia_realtime::protocol::envelope;
use routopia_realtime::protocol::pb::{self, client_frame::Command, reply, server_frame::Kind};
use routopia_realtime::protocol::ws::{MessageReader, ServerEvent, WsEndpoint};

/// Connections that sit still for as long as the test takes: no Connect deadline, no pings
/// (nobody answers them), one shard so every connection lands on the measured one.
fn idle_server() -> TestServer {
    let env = [
        ("ROUTOPIA_AUTH__MODE", "disabled"),
        ("ROUTOPIA_LIMITS__MAX_CONNECTIONS_PER_IP", "1000000"),
        ("ROUTOPIA_LIMITS__CONNECT_TIMEOUT", "1h"),
        ("ROUTOPIA_HEARTBEAT__INTERVAL", "1h"),
        ("ROUTOPIA_HEARTBEAT__TIMEOUT", "2h"),
    ];
    TestServer::start(1, &env)
}

/// Upgrades a plain socket; with `channel`, also sends Connect and Subscribe in one message and
/// waits for the Subscribe reply. The socket is then left alone.
fn open_idle(addr: SocketAddr, channel: Option<&str>) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "the server closed during the upgrade");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let Some(channel) = channel else { return stream };

    let connect = pb::Connect { name: "idle".into(), ..Default::default() };
    let subscribe = pb::Subscribe { channel: channel.into(), ..Default::default() };
    let frames = vec![
        pb::ClientFrame { id: 1, command: Some(Command::Connect(connect)) },
        pb::ClientFrame { id: 2, command: Some(Command::Subscribe(subscribe)) },
    ];
    let mut ws = WsEndpoint::client(1 << 20);
    ws.send_binary(envelope::encode::<pb::ClientMessage>(frames, None).into()).unwrap();
    stream.write_all(&ws.take_output()).unwrap();
    let mut reader = MessageReader::new(1 << 20);
    let mut buffer = [0u8; 4096];
    loop {
        while let Some(event) = reader.next_event().unwrap() {
            let ServerEvent::Binary(data) = event else { panic!("unexpected {event:?}") };
            for frame in envelope::decode::<pb::ServerMessage>(data, 1 << 20, &Default::default()).unwrap() {
                let Some(Kind::Reply(pb::Reply { id, result: Some(result) })) = frame.kind else { continue };
                if let reply::Result::Error(error) = result {
                    panic!("request {id} refused: {error:?}");
                }
                if id == 2 {
                    return stream;
                }
            }
        }
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "the server closed before the Subscribe reply");
        reader.feed(&buffer[..n]);
    }
}

/// The server's resident memory once it stopped moving (three equal readings in a row).
fn settled_rss(server: &TestServer) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = server.rss_bytes();
    let mut same = 0;
    while same < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = server.rss_bytes();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Opens `count` idle connections (subscribed to one of 100 channels when `subscribe`) and
/// returns the server's memory growth per connection, in bytes.
fn growth_per_connection(server: &TestServer, count: usize, subscribe: bool) -> (u64, Vec<TcpStream>) {
    // A first batch warms up what every shard allocates once (allocator pages, tables).
    let warm: Vec<TcpStream> = (0..100).map(|i| open_idle(server.addr, subscribe.then_some(&*channel(i)))).collect();
    let before = settled_rss(server);
    let mut open = Vec::with_capacity(count);
    for i in 0..count {
        open.push(open_idle(server.addr, subscribe.then_some(&*channel(i))));
    }
    let after = settled_rss(server);
    open.extend(warm);
    assert_eq!(server.health()["connections"], (count + 100) as u64, "every connection is still open");
    (after.saturating_sub(before) / count as u64, open)
}

fn channel(i: usize) -> String {
    format!("city:{}", i % 100)
}

#[test]
fn an_idle_subscribed_connection_costs_the_server_little_memory() {
    let server = idle_server();
    let (per_connection, _open) = growth_per_connection(&server, 2000, true);
    eprintln!("{per_connection} bytes of server memory per idle subscribed connection");
    // 3.9–4.6 KB on the release build in the 10,000-connection measurement; an unoptimised
    // build keeps larger task states.
    let bound = if cfg!(debug_assertions) { 8192 } else { 6144 };
    assert!(per_connection < bound, "{per_connection} bytes per idle connection");
}

#[test]
#[ignore = "a measurement: run on the release build with --nocapture"]
fn measure_idle_memory() {
    let count: usize = std::env::var("ROUTOPIA_IDLE_CONNECTIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    for subscribe in [false, true] {
        let server = idle_server();
        let (per_connection, open) = growth_per_connection(&server, count, subscribe);
        let what = if subscribe { "Connect + Subscribe" } else { "upgrade only" };
        println!("{count} idle connections, {what}: {per_connection} bytes each");
        drop(open);
    }
}
