//! Starts the real `routopia-realtime` binary on port 0 and talks to it over real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use routopia_realtime::client::{Client, ClientError, ConnectOptions};
use routopia_realtime::protocol::pb::{self, server_frame::Kind};

pub const BIN: &str = env!("CARGO_BIN_EXE_routopia-realtime");

/// A running server process, stopped when dropped.
pub struct TestServer {
    child: Child,
    pub addr: SocketAddr,
    /// The address serving only `/metrics` and `/health`, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// The server API's own address, when `api.listen` is set.
    pub api_addr: Option<SocketAddr>,
}

impl TestServer {
    /// Starts the binary with `shards` shards and extra `ROUTOPIA_*` environment.
    pub fn start(shards: usize, env: &[(&str, &str)]) -> TestServer {
        Self::start_at("127.0.0.1:0", shards, env)
    }

    /// Starts the binary listening on `listen` (e.g. the address of a server that stopped).
    /// Tokens signed with [`SECRET`] are accepted; rate limits are off unless `env` turns them
    /// on (tests that are not about them publish far faster than a phone would).
    pub fn start_at(listen: &str, shards: usize, env: &[(&str, &str)]) -> TestServer {
        Self::start_with(listen, shards, &[], env, Stdio::inherit())
    }

    /// Starts the binary like [`TestServer::start`] with extra `serve` flags, writing what it
    /// logs (its stderr) to the file `log`.
    pub fn start_logging_to(log: &Path, shards: usize, env: &[(&str, &str)], flags: &[&str]) -> TestServer {
        let file = std::fs::File::create(log).expect("create the log file");
        Self::start_with("127.0.0.1:0", shards, flags, env, file)
    }

    /// Starts the binary with more arguments (e.g. `--config FILE`), its log going to `stderr`.
    pub fn start_with(
        listen: &str,
        shards: usize,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: impl Into<Stdio>,
    ) -> TestServer {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", listen, "--shards", &shards.to_string()])
            .args(args)
            .env("RUST_LOG", "warn")
            .env("ROUTOPIA_AUTH__HMAC_SECRET", SECRET)
            .env("ROUTOPIA_RATE_LIMITS__ENABLED", "false")
            // Tests open many connections from one address in a burst; the ones about admission
            // set the attempts limit themselves (later `env` wins).
            .env("ROUTOPIA_RATE_LIMITS__CONNECTION_ATTEMPTS_PER_IP__REQUESTS", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start routopia-realtime");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stdout = BufReader::new(stdout);
        let (mut metrics_addr, mut api_addr) = (None, None);
        let addr = loop {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read the listening line");
            if let Some(metrics) = line.trim().strip_prefix("metrics on ") {
                metrics_addr = Some(metrics.parse().expect("address in the metrics line"));
                continue;
            }
            if let Some(api) = line.trim().strip_prefix("api on ") {
                api_addr = Some(api.parse().expect("address in the api line"));
                continue;
            }
            break line
                .trim()
                .strip_prefix("listening on ")
                .unwrap_or_else(|| panic!("unexpected line: {line:?}"))
                .parse()
                .expect("address in the listening line");
        };
        TestServer { child, addr, metrics_addr, api_addr }
    }

    /// Resident memory of the server process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("read /proc status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status");
        kib * 1024
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.child.wait().expect("wait for the server")
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("look at the server process").is_none()
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for the server")
    }

    /// Waits for the process to exit without blocking the thread, so the test's clients go on
    /// reading meanwhile (bounded by [`within`]).
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        within("the server's exit", async {
            loop {
                if let Some(status) = self.child.try_wait().expect("look at the server process") {
                    return status;
                }
                compio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the server process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// A connected protocol client, as user `tester`, allowed every channel.
    pub async fn client(&self) -> Client {
        let (client, _) = Client::connect(self.addr, options("tester")).await.expect("connect");
        client
    }

    /// `GET path` over a plain socket; returns (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_request(self.addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
    }

    /// `/health` as JSON.
    pub fn health(&self) -> serde_json::Value {
        let (status, body) = self.http_get("/health");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("health is JSON")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One scrape of `/metrics`: every line checked against the text format, then parsed.
pub struct Metrics {
    pub text: String,
    pub scrape: prometheus_parse::Scrape,
}

impl Metrics {
    pub fn fetch(addr: SocketAddr) -> Metrics {
        let (status, text) = http_request(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(status, 200, "{text}");
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            match prometheus_parse::LineInfo::parse(line) {
                prometheus_parse::LineInfo::Sample { value, .. } => {
                    let parsed = value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value);
                    assert!(parsed, "not a number in {line:?}");
                }
                _ => panic!("not a sample line: {line:?}"),
            }
        }
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parse /metrics");
        Metrics { text, scrape }
    }

    /// The counter or gauge `name` with exactly these `labels` (among others), if present.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.sample(name, labels).and_then(|sample| match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => Some(v),
            prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
    }

    /// `value`, 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// The buckets of histogram `name` with these labels: (upper bound, cumulative count).
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        match self.sample(name, labels).map(|s| &s.value) {
            Some(prometheus_parse::Value::Histogram(buckets)) => {
                buckets.iter().map(|b| (b.less_than, b.count)).collect()
            }
            _ => Vec::new(),
        }
    }

    fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Option<&prometheus_parse::Sample> {
        self.scrape.samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    }
}

/// Scrapes `addr` until `check` holds (shards publish their figures every tick).
pub fn wait_for_metrics(addr: SocketAddr, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
    for _ in 0..3000 {
        let metrics = Metrics::fetch(addr);
        if check(&metrics) {
            return metrics;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("/metrics never showed {what}:\n{}", Metrics::fetch(addr).text);
}

/// The HS256 secret every test server accepts.
pub const SECRET: &str = "routopia-test-secret-0123456789abcdef";

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Signs `claims` with [`SECRET`] (HS256).
pub fn sign(claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("sign a token")
}

/// A token for `user`, valid for an hour, allowed every channel.
pub fn token(user: &str) -> String {
    sign(serde_json::json!({"sub": user, "exp": unix_now() + 3600, "subscribe": ["*"], "publish": ["*"]}))
}

/// Connect options carrying a token for `user` (also the client's name).
pub fn options(user: &str) -> ConnectOptions {
    ConnectOptions { token: token(user), name: user.into(), ..ConnectOptions::default() }
}

/// Sends `request` as written and reads the response until the server closes.
pub fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(request.as_bytes()).expect("write request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A payload that names its publication, so receivers can check what they got.
pub fn payload(n: u64) -> Vec<u8> {
    format!("update-{n}").into_bytes()
}

/// Awaits `future`, failing the test if it hangs (a bound against deadlock, not a speed check).
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match compio::time::timeout(Duration::from_secs(60), future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not finish within 60 s"),
    }
}

/// A real `redis-server` on its own port, stopped when dropped.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts `redis-server` without persistence on a free loopback port.
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Self::start_on(port)
    }

    /// Starts `redis-server` on `port` (e.g. again, after `stop`).
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &["--save", "", "--appendonly", "no"])
    }

    /// Starts `redis-server` on `port` with more arguments (persistence, its directory).
    pub fn start_with(port: u16, args: &[&str]) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        let server = RedisServer { child, port };
        for _ in 0..500 {
            if server.ping() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {port} did not answer PING");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }

    /// Sends one command (binary-safe) and returns the raw reply's first line.
    pub fn command(&self, args: &[&[u8]]) -> String {
        redis_command(self.port, args)
    }

    /// Kills the server (its data is gone: no persistence).
    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

/// Sends one command (binary-safe) to the Redis on `port` and returns the raw reply's first line.
pub fn redis_command(port: u16, args: &[&[u8]]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg);
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
        reply.push(byte[0]);
    }
    String::from_utf8_lossy(&reply).trim().to_owned()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `/health` until `check` holds (a bound against hangs, not a speed check).
pub fn wait_for_health(server: &TestServer, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    for _ in 0..3000 {
        if check(&server.health()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("health never showed {what}: {}", server.health());
}

/// Reads until a `Disconnect` frame with `code`, then checks the close frame carries it too.
pub async fn expect_disconnect(client: &mut Client, code: u16) -> pb::Disconnect {
    let disconnect = loop {
        match within("disconnect frame", client.next_frame()).await {
            Ok(pb::ServerFrame { kind: Some(Kind::Disconnect(d)) }) => break d,
            Ok(_) => continue,
            Err(err) => panic!("expected a Disconnect frame with {code}, got {err}"),
        }
    };
    assert_eq!(disconnect.code, code as u32, "{disconnect:?}");
    assert!(!disconnect.reason.is_empty());
    match within("close frame", client.next_message()).await {
        Err(ClientError::Closed(Some(close))) => assert_eq!(close, code),
        other => panic!("expected close {code}, got {other:?}"),
    }
    disconnect
}

/// A blocking stream that retries reads and writes interrupted by `EINTR`. Inside a compio
/// test the thread's io_uring completions interrupt blocking socket calls that have a timeout,
/// which the kernel then does not restart.
pub struct Retrying<S>(pub S);

impl<S: Read> Read for Retrying<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                result => return result,
            }
        }
    }
}

impl<S: Write> Write for Retrying<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                result => return result,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A socket standing in for systemd's notification socket: start a server with
/// `("NOTIFY_SOCKET", notifications.path())` and read what it reports.
pub struct Notifications {
    socket: std::os::unix::net::UnixDatagram,
    path: String,
    _dir: tempfile::TempDir,
}

impl Notifications {
    pub fn bind() -> Notifications {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind the notification socket");
        socket.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        Notifications { socket, path: path.display().to_string(), _dir: dir }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The next notification (one datagram: `KEY=value` lines).
    pub fn next(&self) -> String {
        let mut buffer = [0u8; 4096];
        loop {
            match self.socket.recv(&mut buffer) {
                Ok(n) => return String::from_utf8_lossy(&buffer[..n]).into_owned(),
                // See `Retrying`: a compio test's completions interrupt blocking calls.
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => panic!("no notification within 60 s: {err}"),
            }
        }
    }

    /// Reads notifications until one has the line `line`, and returns that one.
    pub fn wait_for(&self, line: &str) -> String {
        loop {
            let message = self.next();
            if message.lines().any(|l| l == line) {
                return message;
            }
        }
    }
}
