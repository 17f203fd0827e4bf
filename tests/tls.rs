//! `wss://`: the real binary with a certificate made at test time, a rustls client over a
//! blocking socket, WebSocket through tungstenite, and certificate reloads on SIGHUP.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http_request, TestServer, BIN};
use routopia_realtime::protocol::envelope;
use routopia_realtime::protocol::pb::{self, client_frame::Command as Cmd, reply, server_frame::Kind};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

type TlsSocket = StreamOwned<ClientConnection, TcpStream>;

/// A self-signed certificate for `localhost` and its key, as PEM and DER.
struct Identity {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
}

impl Identity {
    fn new(common_name: &str) -> Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let cert = params.self_signed(&key).unwrap();
        Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem(), cert_der: cert.der().clone() }
    }
}

/// The certificate and key files the server reads, in a directory removed at the end.
struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    fn new(identity: &Identity) -> TlsFiles {
        let files = TlsFiles { dir: tempfile::tempdir().unwrap() };
        files.install(identity);
        files
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// Replaces both files; each by a rename, so the server never reads half a file.
    fn install(&self, identity: &Identity) {
        write_atomically(&self.cert(), &identity.cert_pem);
        write_atomically(&self.key(), &identity.key_pem);
    }

    fn start_server(&self) -> TestServer {
        let cert = self.cert().display().to_string();
        let key = self.key().display().to_string();
        TestServer::start(
            2,
            &[
                ("ROUTOPIA_TLS__CERT_FILE", &cert),
                ("ROUTOPIA_TLS__KEY_FILE", &key),
                // Upgraded test connections send no `Connect`; keep them open meanwhile.
                ("ROUTOPIA_LIMITS__CONNECT_TIMEOUT", "10m"),
            ],
        )
    }
}

fn write_atomically(path: &Path, contents: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// A client that trusts exactly the given certificates.
fn client_config(trusted: &[&Identity]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for identity in trusted {
        roots.add(identity.cert_der.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A completed TLS handshake with the server.
fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> TlsSocket {
    tls_over(TcpStream::connect(addr).unwrap(), config)
}

fn tls_over(tcp: TcpStream, config: &Arc<ClientConfig>) -> TlsSocket {
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let connection = ClientConnection::new(config.clone(), name).unwrap();
    let mut socket = StreamOwned::new(connection, tcp);
    while socket.conn.is_handshaking() {
        socket.conn.complete_io(&mut socket.sock).expect("TLS handshake");
    }
    socket
}

/// The certificate the server presented on `socket`.
fn presented(socket: &TlsSocket) -> CertificateDer<'static> {
    socket.conn.peer_certificates().expect("a server certificate")[0].clone().into_owned()
}

/// `GET /health` over TLS, read until the server's `close_notify`.
fn tls_health(addr: SocketAddr, config: &Arc<ClientConfig>) -> serde_json::Value {
    let mut socket = tls_connect(addr, config);
    socket.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).expect("response ended by close_notify");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap()
}

/// Polls `/health` over TLS until `check` holds (a bound against hangs, not a speed check).
fn wait_for_tls_health(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = tls_health(addr, config);
        if check(&health) {
            return;
        }
        assert!(Instant::now() < deadline, "health never showed {what}: {health}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A WebSocket over TLS, upgraded through tungstenite's client handshake.
fn wss_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> tungstenite::WebSocket<TlsSocket> {
    wss_over(tls_connect(addr, config))
}

fn wss_over(socket: TlsSocket) -> tungstenite::WebSocket<TlsSocket> {
    let request = "wss://localhost/ws".into_client_request().unwrap();
    let (websocket, response) = tungstenite::client(request, socket).expect("WebSocket upgrade over TLS");
    assert_eq!(response.status(), 101);
    websocket
}

/// Sends a WebSocket ping and waits for the server's pong carrying the same bytes.
fn ping_pong(websocket: &mut tungstenite::WebSocket<TlsSocket>, token: &'static [u8]) {
    websocket.send(Message::Ping(token.into())).expect("ping");
    loop {
        match websocket.read().expect("a frame from the server") {
            Message::Pong(payload) if payload.as_ref() == token => return,
            Message::Pong(_) | Message::Binary(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

#[test]
fn wss_upgrade_and_health_over_tls() {
    let identity = Identity::new("routopia test");
    let files = TlsFiles::new(&identity);
    let server = files.start_server();
    let config = client_config(&[&identity]);
    let health = tls_health(server.addr, &config);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["tls"]["enabled"], true);
    let mut websocket = wss_connect(server.addr, &config);
    assert_eq!(presented(websocket.get_ref()), identity.cert_der);
    ping_pong(&mut websocket, b"over tls");
    websocket.close(None).unwrap();
    loop {
        match websocket.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(err) => panic!("the close handshake ended badly: {err}"),
        }
    }
    wait_for_tls_health(server.addr, &config, "the connection gone", |h| h["connections"] == 0);
}

#[test]
fn a_connection_keeps_reading_while_its_writes_wait() {
    let identity = Identity::new("routopia test");
    let files = TlsFiles::new(&identity);
    let server = files.start_server();
    let config = client_config(&[&identity]);
    // A small receive buffer on the client fills quickly, so the server's writes wait on the
    // socket while its reader must go on taking pings.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut websocket = wss_over(tls_over(socket.into(), &config));
    const PINGS: usize = 3000;
    let payload = |n: usize| format!("{n:0>120}").into_bytes();
    for n in 0..PINGS {
        websocket.send(Message::Ping(payload(n).into())).expect("ping");
    }
    for n in 0..PINGS {
        match websocket.read().expect("a pong") {
            Message::Pong(got) => assert_eq!(got.as_ref(), payload(n), "pong {n} in order"),
            other => panic!("expected pong {n}, got {other:?}"),
        }
    }
    assert_eq!(tls_health(server.addr, &config)["connections"], 1);
}

#[test]
fn plain_http_to_the_tls_port_fails_cleanly() {
    let identity = Identity::new("routopia test");
    let files = TlsFiles::new(&identity);
    let server = files.start_server();
    let (status, body) = http_request(server.addr, "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_ne!(status, 200, "a plain-text request must not be answered as HTTP: {body}");
    assert!(!body.contains("status"), "{body}");
    let config = client_config(&[&identity]);
    wait_for_tls_health(server.addr, &config, "the failed handshake counted", |h| {
        h["tls"]["handshake_failures"] == 1 && h["status"] == "ok"
    });
}

#[test]
fn sighup_gives_new_connections_the_new_certificate_and_keeps_open_ones() {
    let old = Identity::new("routopia before reload");
    let new = Identity::new("routopia after reload");
    let files = TlsFiles::new(&old);
    let server = files.start_server();
    let config = client_config(&[&old, &new]);
    let mut before = wss_connect(server.addr, &config);
    assert_eq!(presented(before.get_ref()), old.cert_der);

    files.install(&new);
    server.signal(libc::SIGHUP);
    wait_for_tls_health(server.addr, &config, "one reload", |h| h["tls"]["reloads"] == 1);

    let mut after = wss_connect(server.addr, &config);
    assert_eq!(presented(after.get_ref()), new.cert_der);
    ping_pong(&mut after, b"new");
    // The connection opened before the reload is still served, on its old session.
    ping_pong(&mut before, b"old");
    assert_eq!(presented(before.get_ref()), old.cert_der);
}

#[test]
fn sighup_with_a_broken_certificate_keeps_the_old_one() {
    let identity = Identity::new("routopia test");
    let files = TlsFiles::new(&identity);
    let server = files.start_server();
    let config = client_config(&[&identity]);
    let mut open = wss_connect(server.addr, &config);

    write_atomically(&files.cert(), "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n");
    server.signal(libc::SIGHUP);
    wait_for_tls_health(server.addr, &config, "a refused reload", |h| {
        h["tls"]["reload_failures"] == 1 && h["tls"]["reloads"] == 0
    });

    let fresh = tls_connect(server.addr, &config);
    assert_eq!(presented(&fresh), identity.cert_der);
    ping_pong(&mut open, b"still here");
}

#[test]
fn a_bad_certificate_at_start_is_refused_with_exit_2_naming_the_file() {
    let identity = Identity::new("routopia test");
    let files = TlsFiles::new(&identity);
    write_atomically(&files.key(), "no key in here\n");
    let output = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
        .env("ROUTOPIA_TLS__CERT_FILE", files.cert())
        .env("ROUTOPIA_TLS__KEY_FILE", files.key())
        .stdin(Stdio::null())
        .output()
        .expect("run the server");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&files.key().display().to_string()), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing may start: {}", String::from_utf8_lossy(&output.stdout));
}

/// Sends `frames` as one `ClientMessage` over a WebSocket.
fn send_frames(websocket: &mut tungstenite::WebSocket<TlsSocket>, frames: Vec<pb::ClientFrame>) {
    let message = envelope::encode::<pb::ClientMessage>(frames, None);
    websocket.send(Message::Binary(message.into())).expect("send");
}

/// The frames of the next binary message from the server.
fn next_frames(websocket: &mut tungstenite::WebSocket<TlsSocket>) -> Vec<pb::ServerFrame> {
    loop {
        if let Message::Binary(data) = websocket.read().expect("a message from the server") {
            return envelope::decode::<pb::ServerMessage>(data, 1 << 24, &Default::default())
                .expect("a server message");
        }
    }
}

#[test]
fn pub_sub_over_wss_with_tokens() {
    let identity = Identity::new("routopia test");
    let files = TlsFiles::new(&identity);
    let server = files.start_server();
    let config = client_config(&[&identity]);
    let connect = |user: &str| pb::ClientFrame {
        id: 1,
        command: Some(Cmd::Connect(pb::Connect { token: common::token(user), ..Default::default() })),
    };
    let mut phone = wss_connect(server.addr, &config);
    let subscribe = pb::Subscribe { channel: "route:42".into(), ..Default::default() };
    send_frames(
        &mut phone,
        vec![connect("phone"), pb::ClientFrame { id: 2, command: Some(Cmd::Subscribe(subscribe)) }],
    );
    let sub_id = loop {
        let reply = next_frames(&mut phone).into_iter().find_map(|frame| match frame.kind {
            Some(Kind::Reply(pb::Reply { id: 2, result: Some(reply::Result::Subscribe(result)) })) => {
                Some(result.sub_id)
            }
            Some(Kind::Reply(pb::Reply { result: Some(reply::Result::Error(error)), .. })) => panic!("{error:?}"),
            _ => None,
        });
        if let Some(sub_id) = reply {
            break sub_id;
        }
    };
    let mut backend = wss_connect(server.addr, &config);
    let publishes = (1..=3u8).map(|n| pb::ClientFrame {
        id: 10 + u32::from(n),
        command: Some(Cmd::Publish(pb::Publish {
            channel: "route:42".into(),
            r#type: pb::UpdateType::Route as i32,
            key: "leg".into(),
            payload: vec![n; 3].into(),
            ..Default::default()
        })),
    });
    send_frames(&mut backend, std::iter::once(connect("backend")).chain(publishes).collect());
    let mut offsets = Vec::new();
    while offsets.len() < 3 {
        for frame in next_frames(&mut phone) {
            if let Some(Kind::Update(update)) = frame.kind {
                assert_eq!(update.sub_id, sub_id);
                assert_eq!(update.payload.as_ref(), [update.offset as u8; 3]);
                offsets.push(update.offset);
            }
        }
    }
    assert_eq!(offsets, vec![1, 2, 3]);
}
