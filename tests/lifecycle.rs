//! The process's life as a service sees it: SIGTERM drains (listeners stop first, queued
//! updates before `Disconnect` 4000, exit 0), SIGHUP reloads the config file (or refuses it
//! whole), and systemd's readiness notifications.

mod common;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::rc::Rc;
use std::time::Duration;

use common::{payload, within, Notifications, TestServer};
use routopia_realtime::client::{Client, ClientError};
use routopia_realtime::protocol::pb::UpdateType;

/// A server whose clients may queue far more than the kernel's socket buffers hold, and that
/// does not give up on a client that stops reading for a while.
const ROOMY: [(&str, &str); 3] = [
    ("ROUTOPIA_LIMITS__MAX_OUTBOX_BYTES", "134217728"),
    ("ROUTOPIA_HEARTBEAT__TIMEOUT", "10m"),
    ("ROUTOPIA_HISTORY__SIZE", "10"),
];

/// Updates of 30 KB: 1,300 of them (39 MB) are more than a loopback connection's socket
/// buffers take while its reader waits, so most stay queued in the server.
const BIG_UPDATES: u64 = 1300;

fn big_payload(n: u64) -> Vec<u8> {
    let mut bytes = payload(n);
    bytes.resize(30_000, b'.');
    bytes
}

/// Publishes [`BIG_UPDATES`] updates on `channel`, each answered before the next.
async fn publish_big_updates(publisher: &mut Client, channel: &str) {
    for n in 1..=BIG_UPDATES {
        let result = publisher.publish(channel, UpdateType::Route, "leg", big_payload(n)).await.unwrap();
        assert_eq!(result.offset, n);
    }
}

/// Whether a new TCP connection to `server` is refused.
fn refuses_connections(server: &TestServer) -> bool {
    match std::net::TcpStream::connect(server.addr) {
        Ok(_) => false,
        // Interrupted: see `common::Retrying`, a compio test's completions interrupt blocking
        // calls. Reset: the attempt reached a listener's queue just as the listener stopped.
        Err(err) if matches!(err.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionReset) => {
            false
        }
        Err(err) => {
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
            true
        }
    }
}

#[compio::test]
async fn sigterm_under_load_disconnects_every_client_with_4000_after_its_updates_and_exits_zero() {
    // The timeout is a bound against a hang; every client here reads, so none is cut.
    let mut server = TestServer::start(2, &[("ROUTOPIA_SHUTDOWN_TIMEOUT", "60s")]);
    const SUBSCRIBERS: usize = 60;
    let channels: Vec<String> = (0..4).map(|i| format!("route:drain-{i}")).collect();
    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut client = server.client().await;
        let result = client.subscribe(&channels[i % channels.len()]).await.unwrap();
        assert_eq!(result.offset, 0);
        subscribers.push(client);
    }
    let per_shard: Vec<u64> =
        server.health()["per_shard"].as_array().unwrap().iter().map(|s| s["connections"].as_u64().unwrap()).collect();
    assert!(per_shard.iter().all(|&n| n > 0), "connections on every shard: {per_shard:?}");

    let receiving = Rc::new(Cell::new(0usize));
    let mut readers = Vec::new();
    for mut client in subscribers {
        let receiving = receiving.clone();
        readers.push(compio::runtime::spawn(async move {
            let mut offsets = Vec::new();
            let disconnect = loop {
                match client.next_update().await {
                    Ok(update) => {
                        if offsets.is_empty() {
                            receiving.set(receiving.get() + 1);
                        }
                        assert_eq!(update.payload.as_ref(), payload(update.offset).as_slice());
                        offsets.push(update.offset);
                    }
                    Err(ClientError::Disconnected(disconnect)) => break disconnect,
                    Err(err) => panic!("expected updates then Disconnect, got {err}"),
                }
            };
            let close = client.next_message().await;
            (offsets, disconnect, close)
        }));
    }
    let mut publisher = server.client().await;
    let publishing = compio::runtime::spawn(async move {
        // Round robin over the channels: publication n is the (n / 4 + 1)th of its channel.
        for n in 0u64.. {
            let channel = format!("route:drain-{}", n % 4);
            match publisher.publish(&channel, UpdateType::Route, "leg", payload(n / 4 + 1)).await {
                Ok(result) => assert_eq!(result.offset, n / 4 + 1),
                Err(ClientError::Disconnected(disconnect)) => return (n, disconnect),
                Err(err) => panic!("the publisher expected Disconnect, got {err}"),
            }
        }
        unreachable!("publishing ends with the Disconnect")
    });
    within("every subscriber receiving", async {
        while receiving.get() < SUBSCRIBERS {
            compio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    server.signal(libc::SIGTERM);
    let status = server.exited().await;
    assert!(status.success(), "{status:?}");
    for reader in readers {
        let (offsets, disconnect, close) = within("a subscriber's drain", reader).await.unwrap();
        assert_eq!((disconnect.code, disconnect.reconnect), (4000, true), "{disconnect:?}");
        assert!(matches!(close, Err(ClientError::Closed(Some(4000)))), "{close:?}");
        let expected: Vec<u64> = (1..=offsets.len() as u64).collect();
        assert_eq!(offsets, expected, "every update up to the Disconnect, in order, none missing");
    }
    let (published, disconnect) = within("the publisher's drain", publishing).await.unwrap();
    assert!(published > 1);
    assert_eq!((disconnect.code, disconnect.reconnect), (4000, true));
}

#[compio::test]
async fn a_client_behind_on_reading_gets_everything_queued_then_disconnect_while_no_one_else_gets_in() {
    let mut env = ROOMY.to_vec();
    env.push(("ROUTOPIA_SHUTDOWN_TIMEOUT", "60s"));
    let mut server = TestServer::start(2, &env);
    let mut behind = server.client().await;
    behind.subscribe("route:behind").await.unwrap();
    let mut publisher = server.client().await;
    // `behind` reads nothing meanwhile: most of this waits in its queue on the server.
    publish_big_updates(&mut publisher, "route:behind").await;

    server.signal(libc::SIGTERM);
    // The listeners stop first, while `behind`'s queue still holds the drain open.
    within("the listeners to stop", async {
        while !refuses_connections(&server) {
            compio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(server.is_running(), "the drain waits for the client that is behind");

    for n in 1..=BIG_UPDATES {
        let update = within("a queued update", behind.next_update()).await.unwrap();
        assert_eq!(update.offset, n, "queued updates arrive in order, none dropped");
        assert_eq!(update.payload.as_ref(), big_payload(n).as_slice());
    }
    match within("the disconnect", behind.next_update()).await {
        Err(ClientError::Disconnected(d)) => assert_eq!((d.code, d.reconnect), (4000, true), "{d:?}"),
        other => panic!("expected Disconnect 4000 after the queued updates, got {other:?}"),
    }
    let status = server.exited().await;
    assert!(status.success(), "{status:?}");
}

#[compio::test]
async fn a_client_that_takes_nothing_is_cut_at_the_shutdown_timeout_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let mut env = ROOMY.to_vec();
    env.extend([("ROUTOPIA_SHUTDOWN_TIMEOUT", "1s"), ("RUST_LOG", "info"), ("ROUTOPIA_LOG_FORMAT", "json")]);
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = TestServer::start_with("127.0.0.1:0", 2, &[], &env, log);
    let mut stuck = server.client().await;
    stuck.subscribe("route:stuck").await.unwrap();
    let mut publisher = server.client().await;
    publish_big_updates(&mut publisher, "route:stuck").await;

    server.signal(libc::SIGTERM);
    let status = server.exited().await;
    assert!(status.success(), "{status:?}");
    let stopped = log_lines(&log_path)
        .into_iter()
        .find(|line| line["message"] == "stopped")
        .unwrap_or_else(|| panic!("no `stopped` line in {}", std::fs::read_to_string(&log_path).unwrap()));
    assert_eq!(stopped["cut_at_timeout"], 1, "{stopped}");
    assert_eq!(stopped["drained"], 1, "the publisher took its Disconnect: {stopped}");
    drop(stuck);
}

fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

/// A config file the test rewrites, and the server started with `--config` on it, reporting
/// to a notification socket so the test knows when a reload was handled.
struct Reloadable {
    server: TestServer,
    notifications: Notifications,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Reloadable {
    fn start(text: &str) -> Reloadable {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, text).unwrap();
        let notifications = Notifications::bind();
        let args = ["--config", file.to_str().unwrap()];
        let env = [("NOTIFY_SOCKET", notifications.path())];
        let server = TestServer::start_with("127.0.0.1:0", 2, &args, &env, Stdio::inherit());
        notifications.wait_for("READY=1");
        Reloadable { server, notifications, file, _dir: dir }
    }

    /// Replaces the file (by a rename, as an editor or a deployment does) and sends SIGHUP;
    /// returns the status the server reported once it handled it.
    fn reload(&self, text: &str) -> String {
        let next = self.file.with_extension("next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &self.file).unwrap();
        self.reload_as_is()
    }

    fn reload_as_is(&self) -> String {
        self.server.signal(libc::SIGHUP);
        self.notifications.wait_for("RELOADING=1");
        let ready = self.notifications.wait_for("READY=1");
        ready.lines().find_map(|line| line.strip_prefix("STATUS=")).unwrap_or_default().to_owned()
    }

    fn limits(&self) -> serde_json::Value {
        let (status, body) = self.server.http_get("/config/limits");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

/// Publishes a payload of `size` bytes; returns the error code when it is refused.
async fn publish_sized(client: &mut Client, size: usize) -> Option<u32> {
    match client.publish("route:sized", UpdateType::Route, "leg", vec![b'x'; size]).await {
        Ok(_) => None,
        Err(ClientError::Server(error)) => Some(error.code),
        Err(err) => panic!("{err}"),
    }
}

#[compio::test]
async fn sighup_applies_a_changed_file_to_new_connections_and_reports_what_needs_a_restart() {
    let running = Reloadable::start("[limits]\nmax_payload_size = 4000\n[delivery]\ncompression_threshold = 1024\n");
    let mut before = running.server.client().await;
    assert_eq!(publish_sized(&mut before, 3000).await, None);

    let status = running.reload("[limits]\nmax_payload_size = 2000\n[delivery]\ncompression_threshold = 512\n");
    assert_eq!(status, "configuration reloaded");
    let limits = running.limits();
    assert_eq!(limits["limits"]["max_payload_size"], 2000, "{limits}");
    assert_eq!(limits["delivery"]["compression_threshold"], 1024, "needs a restart, so not applied: {limits}");

    let mut after = running.server.client().await;
    assert_eq!(publish_sized(&mut after, 3000).await, Some(413), "a new connection has the new limit");
    assert_eq!(publish_sized(&mut after, 2000).await, None);
    assert_eq!(publish_sized(&mut before, 3000).await, None, "an open connection keeps the limits it was told");
}

#[compio::test]
async fn sighup_with_a_bad_file_changes_nothing() {
    let good = "[limits]\nmax_payload_size = 2000\n";
    let running = Reloadable::start(good);
    let refusals = [
        ("a syntax error", "[limits]\nmax_payload_size = = 9000\n"),
        ("an invalid value", "[limits]\nmax_payload_size = 9000\nmax_message_size = 12\n"),
        ("an unknown setting", "[limits]\nmax_payload_size = 9000\nmax_payload_sise = 9000\n"),
        ("a missing certificate", "[limits]\nmax_payload_size = 9000\n[tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n"),
    ];
    for (what, text) in refusals {
        let status = running.reload(text);
        assert!(status.starts_with("reload refused"), "{what}: {status}");
        assert_eq!(running.limits()["limits"]["max_payload_size"], 2000, "{what}");
        let mut client = running.server.client().await;
        assert_eq!(publish_sized(&mut client, 3000).await, Some(413), "{what}: the old limit still holds");
    }
    std::fs::remove_file(&running.file).unwrap();
    let status = running.reload_as_is();
    assert!(status.starts_with("reload refused"), "a missing file: {status}");

    // Still running, and a good file is taken again.
    let status = running.reload("[limits]\nmax_payload_size = 9000\n");
    assert_eq!(status, "configuration reloaded");
    let mut client = running.server.client().await;
    assert_eq!(publish_sized(&mut client, 3000).await, None);
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let notifications = Notifications::bind();
    let mut server = TestServer::start(1, &[("NOTIFY_SOCKET", notifications.path())]);
    let ready = notifications.wait_for("READY=1");
    assert!(ready.contains(&format!("STATUS=listening on {}", server.addr)), "{ready:?}");

    server.signal(libc::SIGHUP);
    let reloading = notifications.next();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading:?}");
    let monotonic_usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(monotonic_usec > 0);
    let ready = notifications.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");

    server.signal(libc::SIGTERM);
    let stopping = notifications.next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = server.wait();
    assert!(status.success(), "{status:?}");
}
