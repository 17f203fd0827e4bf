//! The same code runs on epoll where io_uring is not wanted or not available.

mod common;

use common::{payload, within, TestServer};
use routopia_realtime::protocol::pb::UpdateType;

#[compio::test]
async fn epoll_driver_serves_pubsub_and_says_so() {
    let server = TestServer::start(2, &[("ROUTOPIA_DRIVER", "epoll")]);
    let health = server.health();
    assert_eq!(health["driver"], "epoll");
    let mut subscriber = server.client().await;
    let mut publisher = server.client().await;
    subscriber.subscribe("weather:oslo").await.unwrap();
    for n in 1..=10 {
        publisher.publish("weather:oslo", UpdateType::Weather, "w", payload(n)).await.unwrap();
    }
    for n in 1..=10 {
        assert_eq!(within("update", subscriber.next_update()).await.unwrap().offset, n);
    }
}
