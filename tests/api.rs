//! The server API for backends over real HTTP: publishing (alone and in batches) through the
//! same path as WebSocket publishes, inspection, API keys, limits, and its own address.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use base64::Engine as _;
use common::{
    expect_disconnect, options, payload, wait_for_health, wait_for_metrics, within, RedisServer, Retrying, TestServer,
};
use prost::Message;
use routopia_realtime::client::Client;
use routopia_realtime::protocol::pb::{self, UpdateType};

const KEY: &str = "backend-key-0123456789";
const NEW_KEY: &str = "rotated-key-0123456789";

/// One answer of the API.
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `head` (request line and headers, without the blank line) and `body` as written.
fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> Response {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut stream = Retrying(stream);
    let mut request = format!("{head}\r\n\r\n").into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).expect("write the request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read the response");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status");
    Response { status, head, body: response[split + 4..].to_vec() }
}

/// `method path` with `key` as bearer and a body of `content_type`.
fn call(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, content_type: &str, body: &[u8]) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test");
    if let Some(key) = key {
        head.push_str(&format!("\r\nAuthorization: Bearer {key}"));
    }
    if method == "POST" {
        head.push_str(&format!("\r\nContent-Type: {content_type}\r\nContent-Length: {}", body.len()));
    }
    raw(addr, &head, body)
}

fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Response {
    call(addr, "POST", path, Some(KEY), "application/json", body.to_string().as_bytes())
}

fn get(addr: SocketAddr, path: &str) -> Response {
    call(addr, "GET", path, Some(KEY), "", b"")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn publication(channel: &str, n: u64) -> serde_json::Value {
    serde_json::json!({"channel": channel, "type": "ROUTE", "key": "k", "confidence": 0.5, "payload": b64(&payload(n))})
}

fn server(shards: usize, env: &[(&str, &str)]) -> TestServer {
    let mut all = vec![("ROUTOPIA_API__KEYS", "[\"backend-key-0123456789\"]")];
    all.extend_from_slice(env);
    TestServer::start(shards, &all)
}

/// Clients until every shard has one (the kernel spreads connections; bounded attempts).
async fn clients_on_every_shard(server: &TestServer, shards: usize) -> Vec<Client> {
    let mut by_shard: HashMap<String, Client> = HashMap::new();
    for _ in 0..200 {
        let (client, result) = Client::connect(server.addr, options("phone")).await.expect("connect");
        let shard = result.client_id.split('-').next().unwrap().to_owned();
        by_shard.entry(shard).or_insert(client);
        if by_shard.len() == shards {
            return by_shard.into_values().collect();
        }
    }
    panic!("connections never landed on all {shards} shards");
}

#[compio::test]
async fn publish_over_http_reaches_subscribers_on_every_shard_with_the_websocket_offsets() {
    let server = server(3, &[]);
    let mut clients = clients_on_every_shard(&server, 3).await;
    for client in &mut clients {
        client.subscribe("route:42").await.unwrap();
    }
    let json = post_json(server.addr, "/api/publish", &publication("route:42", 1));
    assert_eq!(json.status, 200, "{}", json.text());
    assert_eq!(json.header("content-type"), Some("application/json"));
    let epoch = json.json()["epoch"].as_str().unwrap().to_owned();
    assert_eq!(json.json()["offset"], 1);
    let publish = pb::Publish {
        channel: "route:42".into(),
        r#type: UpdateType::Route as i32,
        key: "k".into(),
        confidence: 1.0,
        payload: payload(2).into(),
    };
    let proto =
        call(server.addr, "POST", "/api/publish", Some(KEY), "application/x-protobuf", &publish.encode_to_vec());
    assert_eq!(proto.status, 200, "{}", proto.text());
    let result = pb::PublishResult::decode(proto.body.as_slice()).unwrap();
    assert_eq!((result.epoch.as_str(), result.offset), (epoch.as_str(), 2));
    // A WebSocket publish continues the same offsets.
    let ws = clients[0].publish("route:42", UpdateType::Route, "k", payload(3)).await.unwrap();
    assert_eq!((ws.epoch.as_str(), ws.offset), (epoch.as_str(), 3));
    for client in &mut clients {
        for n in 1..=3u64 {
            let update = within("update", client.next_update()).await.unwrap();
            assert_eq!((update.offset, update.payload.as_ref()), (n, payload(n).as_slice()));
        }
    }
    wait_for_metrics(server.addr, "API publishes counted with the others", |m| {
        m.get("realtime_updates_published_total", &[("type", "route")]) == 3.0
            && m.get("realtime_api_requests_total", &[("route", "publish"), ("code", "200")]) == 2.0
            && m.get("realtime_api_publications_total", &[("result", "published")]) == 2.0
    });
}

#[compio::test]
async fn a_batch_of_1000_applies_in_order_and_answers_per_item() {
    let server = server(2, &[]);
    let mut subscriber = server.client().await;
    let channels = ["route:a", "route:b", "poi:c"];
    for channel in channels {
        subscriber.subscribe(channel).await.unwrap();
    }
    let items: Vec<serde_json::Value> = (0..1000u64).map(|n| publication(channels[n as usize % 3], n)).collect();
    let started = std::time::Instant::now();
    let response = post_json(server.addr, "/api/publish/batch", &serde_json::json!({"publications": items}));
    eprintln!("batch of 1000 answered in {:?}", started.elapsed());
    assert_eq!(response.status, 200, "{}", response.text());
    let results = response.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 1000);
    for (n, result) in results.iter().enumerate() {
        assert_eq!(result["offset"], (n / 3 + 1) as u64, "item {n}: {result}");
    }
    // Every channel's updates arrive in batch order, and in offset order.
    let mut next: HashMap<u64, u64> = HashMap::new();
    for _ in 0..1000 {
        let update = within("update", subscriber.next_update()).await.unwrap();
        let n: u64 = String::from_utf8_lossy(&update.payload).trim_start_matches("update-").parse().unwrap();
        let channel = n % 3;
        let expected = next.entry(channel).or_insert(channel);
        assert_eq!(n, *expected, "channel {} out of order", channels[channel as usize]);
        assert_eq!(update.offset, n / 3 + 1);
        *expected += 3;
    }
    // Refused items are answered in their place; the rest still apply.
    let mixed = serde_json::json!({"publications": [
        publication("route:a", 1000),
        {"channel": "bad channel", "type": "ROUTE"},
        {"channel": "route:a", "type": "BOAT"},
        publication("route:a", 1001),
    ]});
    let response = post_json(server.addr, "/api/publish/batch", &mixed);
    assert_eq!(response.status, 200, "{}", response.text());
    let results = response.json()["results"].clone();
    assert_eq!(results[0]["offset"], 335);
    assert_eq!(results[1]["error"]["code"], 400);
    assert!(results[1]["error"]["message"].as_str().unwrap().contains("character"), "{results}");
    assert_eq!(results[2]["error"]["code"], 400);
    assert_eq!(results[3]["offset"], 336);
}

#[test]
fn history_pages_are_exact() {
    let server = server(2, &[("ROUTOPIA_HISTORY__SIZE", "30")]);
    let items: Vec<serde_json::Value> = (1..=50u64).map(|n| publication("route:h", n)).collect();
    let batch = pb::PublishBatch {
        publications: items
            .iter()
            .enumerate()
            .map(|(i, _)| pb::Publish {
                channel: "route:h".into(),
                r#type: UpdateType::Route as i32,
                key: format!("k{}", i + 1),
                confidence: 0.5,
                payload: payload(i as u64 + 1).into(),
            })
            .collect(),
    };
    let response =
        call(server.addr, "POST", "/api/publish/batch", Some(KEY), "application/x-protobuf", &batch.encode_to_vec());
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(pb::PublishBatchResult::decode(response.body.as_slice()).unwrap().results.len(), 50);
    let offsets = |page: &serde_json::Value| -> Vec<u64> {
        page["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect()
    };
    let first = get(server.addr, "/api/channels/route:h/history?since=20&limit=10").json();
    assert_eq!(offsets(&first), (21..=30).collect::<Vec<_>>());
    assert_eq!((first["offset"].as_u64(), first["truncated"].as_bool()), (Some(50), Some(false)));
    let item = &first["publications"][0];
    assert_eq!((item["type"].as_str(), item["key"].as_str()), (Some("ROUTE"), Some("k21")));
    assert_eq!(item["payload"].as_str(), Some(b64(&payload(21)).as_str()));
    let next = get(server.addr, "/api/channels/route:h/history?since=30&limit=10").json();
    assert_eq!(offsets(&next), (31..=40).collect::<Vec<_>>());
    let last = get(server.addr, "/api/channels/route%3Ah/history?since=40").json();
    assert_eq!(offsets(&last), (41..=50).collect::<Vec<_>>());
    // Only the latest 30 are kept: a page from 0 says it starts later.
    let old = get(server.addr, "/api/channels/route:h/history?since=0&limit=5").json();
    assert_eq!((offsets(&old), old["truncated"].as_bool()), ((21..=25).collect::<Vec<_>>(), Some(true)));
    let head = "GET /api/channels/route:h/history?since=45 HTTP/1.1\r\nHost: t\r\nAccept: application/x-protobuf";
    let proto = raw(server.addr, &format!("{head}\r\nAuthorization: Bearer {KEY}"), b"");
    let page = pb::HistoryResult::decode(proto.body.as_slice()).unwrap();
    assert_eq!(page.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), [46, 47, 48, 49, 50]);
    assert_eq!(get(server.addr, "/api/channels/bad%20name/history").status, 400);
    assert_eq!(get(server.addr, "/api/channels/route:h/history?since=x").status, 400);
}

#[test]
fn keys_are_enforced_missing_wrong_and_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, format!("[api]\nkeys = [\"{KEY}\", \"{NEW_KEY}\"]\n")).unwrap();
    let config = file.to_str().unwrap();
    let server = TestServer::start_with("127.0.0.1:0", 1, &["--config", config], &[], std::process::Stdio::inherit());
    let publish = publication("route:k", 1).to_string();
    let with =
        |key: Option<&str>| call(server.addr, "POST", "/api/publish", key, "application/json", publish.as_bytes());
    let missing = with(None);
    assert_eq!(missing.status, 401, "{}", missing.text());
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    assert_eq!(raw(server.addr, "GET /api/channels HTTP/1.1\r\nAuthorization: Basic eDp5", b"").status, 401);
    let wrong = with(Some("backend-key-0123456788"));
    assert_eq!(wrong.status, 403, "{}", wrong.text());
    assert!(wrong.json()["error"]["message"].as_str().unwrap().contains("api.keys"));
    assert_eq!(with(Some(KEY)).json()["offset"], 1);
    assert_eq!(with(Some(NEW_KEY)).json()["offset"], 2);
    // The old key is retired by a reload, without a restart.
    std::fs::write(&file, format!("[api]\nkeys = [\"{NEW_KEY}\"]\n")).unwrap();
    server.signal(libc::SIGHUP);
    for attempt in 0.. {
        if call(server.addr, "GET", "/api/channels", Some(KEY), "", b"").status == 403 {
            break;
        }
        assert!(attempt < 500, "the old key still works after the reload");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(with(Some(KEY)).status, 403);
    assert_eq!(with(Some(NEW_KEY)).json()["offset"], 3);
    wait_for_metrics(server.addr, "refusals counted", |m| {
        m.get("realtime_api_requests_total", &[("route", "publish"), ("code", "401")]) == 1.0
            && m.get("realtime_api_requests_total", &[("route", "publish"), ("code", "403")]) >= 2.0
    });
}

#[test]
fn keys_from_the_environment_and_none_configured() {
    // The README's syntax: a list in brackets, keys unquoted.
    let both = format!("[{KEY}, {NEW_KEY}]");
    let server = TestServer::start(1, &[("ROUTOPIA_API__KEYS", &both)]);
    assert_eq!(call(server.addr, "GET", "/api/channels", Some(KEY), "", b"").status, 200);
    assert_eq!(call(server.addr, "GET", "/api/channels", Some(NEW_KEY), "", b"").status, 200);
    let off = TestServer::start(1, &[]);
    let response = call(off.addr, "GET", "/api/channels", Some(KEY), "", b"");
    assert_eq!(response.status, 403);
    assert!(response.text().contains("no API key is configured"), "{}", response.text());
}

#[test]
fn oversize_and_malformed_bodies_are_refused_and_nothing_is_published() {
    let limits = [
        ("ROUTOPIA_API__MAX_BODY_BYTES", "4096"),
        ("ROUTOPIA_API__MAX_BATCH_PUBLICATIONS", "3"),
        ("ROUTOPIA_LIMITS__MAX_PAYLOAD_SIZE", "1024"),
    ];
    let server = server(2, &limits);
    let head = |length: &str| {
        format!(
            "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n{length}"
        )
    };
    let over = raw(server.addr, &head("Content-Length: 4097"), b"");
    assert_eq!(over.status, 413, "{}", over.text());
    assert!(over.text().contains("api.max_body_bytes"));
    let chunked = raw(server.addr, &head("Transfer-Encoding: chunked"), b"5\r\nhello\r\n0\r\n\r\n");
    assert_eq!(chunked.status, 411);
    assert_eq!(raw(server.addr, &head("X-No-Length: 1"), b"").status, 411);
    let bad_json =
        call(server.addr, "POST", "/api/publish", Some(KEY), "application/json", b"{\"channel\": \"route:m\",");
    assert_eq!(bad_json.status, 400);
    assert!(bad_json.text().contains("malformed JSON"), "{}", bad_json.text());
    let no_type = post_json(server.addr, "/api/publish", &serde_json::json!({"channel": "route:m"}));
    assert!(no_type.text().contains("missing field `type`"), "{}", no_type.text());
    let bad_proto = call(server.addr, "POST", "/api/publish", Some(KEY), "application/x-protobuf", b"\x0a\xff\xff");
    assert_eq!(bad_proto.status, 400);
    let error = pb::Error::decode(bad_proto.body.as_slice()).expect("errors answer in the request's encoding");
    assert!(error.message.contains("malformed protobuf"), "{error:?}");
    assert_eq!(call(server.addr, "POST", "/api/publish", Some(KEY), "text/plain", b"hi").status, 415);
    let big = serde_json::json!({"channel": "route:m", "type": "ROUTE", "payload": b64(&[0; 2000])});
    let too_big = call(server.addr, "POST", "/api/publish", Some(KEY), "application/json", big.to_string().as_bytes());
    assert_eq!(too_big.status, 413, "{}", too_big.text());
    assert!(too_big.text().contains("payload of 2000 bytes"), "{}", too_big.text());
    let four: Vec<_> = (1..=4).map(|n| publication("route:m", n)).collect();
    let batch = post_json(server.addr, "/api/publish/batch", &serde_json::json!({"publications": four}));
    assert_eq!(batch.status, 413, "{}", batch.text());
    let bad_item = serde_json::json!({"publications": [publication("route:m", 1), {"channel": "route:m", "type": 1, "payload": "%"}]});
    assert_eq!(post_json(server.addr, "/api/publish/batch", &bad_item).status, 400);
    // None of them reached the channel: the next publication is its first.
    assert_eq!(get(server.addr, "/api/channels/route:m/history").json()["offset"], 0);
    assert_eq!(post_json(server.addr, "/api/publish", &publication("route:m", 1)).json()["offset"], 1);
    // Routes and methods.
    assert_eq!(get(server.addr, "/api/nowhere").status, 404);
    assert_eq!(get(server.addr, "/api/publish").status, 405);
}

#[test]
fn a_body_framed_two_ways_is_refused_with_400_and_nothing_is_published() {
    let server = server(1, &[]);
    let body = publication("route:framing", 1).to_string();
    let head = |framing: &str| {
        format!(
            "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n{framing}"
        )
    };
    let length = body.len();
    for framing in [
        format!("Content-Length: {length}\r\nContent-Length: 5"),
        format!("Content-Length: {length}, 5"),
        format!("Transfer-Encoding: chunked\r\nContent-Length: {length}"),
    ] {
        let refused = raw(server.addr, &head(&framing), body.as_bytes());
        assert_eq!(refused.status, 400, "{framing}: {}", refused.text());
        assert!(refused.text().contains("ambiguous body length"), "{}", refused.text());
        assert_eq!(refused.header("Connection"), Some("close"));
    }
    // The same length twice is one length (RFC 9110 §8.6).
    let twice =
        raw(server.addr, &head(&format!("Content-Length: {length}\r\nContent-Length: {length}")), body.as_bytes());
    assert_eq!(twice.json()["offset"], 1, "{}", twice.text());
    wait_for_metrics(server.addr, "three refused heads", |m| m.get("realtime_http_bad_requests_total", &[]) == 3.0);
}

#[compio::test]
async fn channels_list_with_subscribers_by_prefix_and_pages() {
    let server = server(2, &[]);
    let mut clients = Vec::new();
    for n in 0..5 {
        let mut client = server.client().await;
        for m in 0..=n {
            client.subscribe(&format!("weather:{m}")).await.unwrap();
        }
        client.subscribe("poi:x").await.unwrap();
        clients.push(client);
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..10 {
        let page = get(server.addr, &format!("/api/channels?prefix=weather%3A&limit=2&after={after}")).json();
        for channel in page["channels"].as_array().unwrap() {
            seen.push((channel["channel"].as_str().unwrap().to_owned(), channel["subscribers"].as_u64().unwrap()));
        }
        after = page["next_after"].as_str().unwrap().to_owned();
        if after.is_empty() {
            break;
        }
    }
    let expected: Vec<(String, u64)> = (0..5).map(|m| (format!("weather:{m}"), 5 - m)).collect();
    assert_eq!(seen, expected);
    let all = get(server.addr, "/api/channels").json();
    assert_eq!(all["channels"].as_array().unwrap().len(), 6);
    assert_eq!(all["channels"][0]["channel"], "poi:x");
    assert_eq!(all["channels"][0]["subscribers"], 5);
}

#[compio::test]
async fn subscriptions_of_a_client_and_disconnecting_it_with_a_code() {
    let server = server(2, &[]);
    let (mut client, connected) = Client::connect(server.addr, options("driver")).await.unwrap();
    let first = client.subscribe("route:d1").await.unwrap();
    client.subscribe("weather:paris").await.unwrap();
    let id = connected.client_id;
    let list = get(server.addr, &format!("/api/clients/{id}/subscriptions")).json();
    assert_eq!(list["client_id"], id.as_str());
    let subscriptions = list["subscriptions"].as_array().unwrap();
    assert_eq!(subscriptions.len(), 2);
    assert_eq!(
        (subscriptions[0]["channel"].as_str(), subscriptions[0]["sub_id"].as_u64()),
        (Some("route:d1"), Some(u64::from(first.sub_id)))
    );
    assert_eq!(subscriptions[0]["active"], true);
    let body = serde_json::json!({"code": 4000, "reason": "maintenance of this node"});
    let response = post_json(server.addr, &format!("/api/clients/{id}/disconnect"), &body);
    assert_eq!(response.status, 200, "{}", response.text());
    let disconnect = expect_disconnect(&mut client, 4000).await;
    assert_eq!(disconnect.reason, "maintenance of this node");
    assert!(disconnect.reconnect);
    wait_for_health(&server, "the client gone", |h| h["connections"] == 0);
    assert_eq!(get(server.addr, &format!("/api/clients/{id}/subscriptions")).status, 404);
    assert_eq!(post_json(server.addr, &format!("/api/clients/{id}/disconnect"), &body).status, 404);
    assert_eq!(post_json(server.addr, "/api/clients/0-0-1/disconnect", &serde_json::json!({"code": 1234})).status, 400);
    assert_eq!(get(server.addr, "/api/clients/not-an-id/subscriptions").status, 404);
}

#[test]
fn the_api_on_its_own_address_only_and_rate_limited_per_key() {
    let env = [
        ("ROUTOPIA_API__LISTEN", "127.0.0.1:0"),
        ("ROUTOPIA_RATE_LIMITS__ENABLED", "true"),
        ("ROUTOPIA_RATE_LIMITS__API_REQUESTS", "{requests = 1, window = \"1m\", burst = 2}"),
    ];
    let server = server(2, &env);
    let api = server.api_addr.expect("the API address is printed");
    let main = get(server.addr, "/api/channels");
    assert_eq!(main.status, 404, "{}", main.text());
    assert!(main.text().contains("api.listen"));
    assert_eq!(call(api, "GET", "/health", None, "", b"").status, 404);
    assert_eq!(get(api, "/api/channels").status, 200);
    assert_eq!(get(api, "/api/channels").status, 200);
    let limited = get(api, "/api/channels");
    assert_eq!(limited.status, 429, "{}", limited.text());
    let retry_after: u64 = limited.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
}

#[compio::test]
async fn with_redis_an_http_publish_reaches_subscribers_on_another_node() {
    let redis = RedisServer::start();
    let node = || {
        let server = server(2, &[("ROUTOPIA_BROKER", &redis.url())]);
        wait_for_health(&server, "Redis connected", |h| h["broker"]["connected"] == true);
        server
    };
    let (a, b) = (node(), node());
    let mut on_b = b.client().await;
    let subscribed = on_b.subscribe("traffic:a7").await.unwrap();
    let items: Vec<_> = (1..=20u64)
        .map(|n| serde_json::json!({"channel": "traffic:a7", "type": "TRAFFIC", "payload": b64(&payload(n))}))
        .collect();
    let response = post_json(a.addr, "/api/publish/batch", &serde_json::json!({"publications": items}));
    assert_eq!(response.status, 200, "{}", response.text());
    for (n, result) in response.json()["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            (result["offset"].as_u64(), result["epoch"].as_str()),
            (Some(n as u64 + 1), Some(subscribed.epoch.as_str()))
        );
    }
    let single = serde_json::json!({"channel": "traffic:a7", "type": "TRAFFIC", "payload": b64(&payload(21))});
    assert_eq!(post_json(b.addr, "/api/publish", &single).json()["offset"], 21);
    for n in 1..=21u64 {
        let update = within("update from the other node", on_b.next_update()).await.unwrap();
        assert_eq!((update.offset, update.payload.as_ref()), (n, payload(n).as_slice()));
    }
    let history = get(b.addr, "/api/channels/traffic:a7/history?since=18").json();
    let offsets: Vec<u64> =
        history["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, [19, 20, 21]);
}
