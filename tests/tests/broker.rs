//! The embedded broker routes by subscription filter. Its router is patched
//! (`bridge/vendor/rumqttd/IMN-PATCH.md`) to find exact filters by lookup instead of
//! matching every filter against every topic; these tests check that routing is still
//! right whichever comes first, the topic or the subscription.

use std::time::Duration;

use imn_tests::Up;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

/// A connected client whose received publishes arrive as (topic, payload).
async fn client(port: u16, id: &str) -> (AsyncClient, mpsc::UnboundedReceiver<(String, String)>) {
    let mut mo = MqttOptions::new(id, "127.0.0.1", port);
    mo.set_keep_alive(Duration::from_secs(30));
    let (c, mut el): (AsyncClient, EventLoop) = AsyncClient::new(mo, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic, String::from_utf8_lossy(&p.payload).into_owned()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(T, ready.recv())
        .await
        .expect("connack");
    (c, rx)
}

async fn subscribe(c: &AsyncClient, filter: &str) {
    c.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    // rumqttc gives no handle to the SubAck here; give the router a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

async fn publish(c: &AsyncClient, topic: &str, text: &str) {
    c.publish(topic, QoS::AtLeastOnce, false, text.as_bytes().to_vec())
        .await
        .expect("publish");
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("a message within 10 s")
        .expect("client running")
}

async fn nothing_within(rx: &mut mpsc::UnboundedReceiver<(String, String)>, d: Duration) {
    if let Ok(Some(m)) = tokio::time::timeout(d, rx.recv()).await {
        panic!("unexpected message {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_and_wildcard_filters_route_whichever_comes_first() {
    let up = Up::start(0, &[]).await;
    let port = up.mqtt_port;
    let (publisher, _) = client(port, "pub").await;

    // 1. An exact filter on a topic nobody has published to yet.
    let (a, mut a_rx) = client(port, "sub-a").await;
    subscribe(&a, "t/one").await;
    publish(&publisher, "t/one", "1").await;
    assert_eq!(next(&mut a_rx).await, ("t/one".into(), "1".into()));

    // 2. A topic already routed through a wildcard filter, then an exact subscriber:
    //    the exact filter joins the topic's list.
    let (w, mut w_rx) = client(port, "sub-w").await;
    subscribe(&w, "t/+").await;
    publish(&publisher, "t/two", "2").await;
    assert_eq!(next(&mut w_rx).await, ("t/two".into(), "2".into()));
    let (b, mut b_rx) = client(port, "sub-b").await;
    subscribe(&b, "t/two").await;
    publish(&publisher, "t/two", "3").await;
    assert_eq!(next(&mut b_rx).await, ("t/two".into(), "3".into()));
    assert_eq!(next(&mut w_rx).await, ("t/two".into(), "3".into()));

    // 3. A wildcard filter made after the topics exist still sees them.
    let (h, mut h_rx) = client(port, "sub-h").await;
    subscribe(&h, "t/#").await;
    publish(&publisher, "t/one", "4").await;
    assert_eq!(next(&mut h_rx).await, ("t/one".into(), "4".into()));
    assert_eq!(next(&mut a_rx).await, ("t/one".into(), "4".into()));

    // Exact subscribers see only their own topic.
    publish(&publisher, "t/three", "5").await;
    assert_eq!(next(&mut h_rx).await, ("t/three".into(), "5".into()));
    nothing_within(&mut a_rx, Duration::from_millis(500)).await;
    nothing_within(&mut b_rx, Duration::from_millis(100)).await;
}
