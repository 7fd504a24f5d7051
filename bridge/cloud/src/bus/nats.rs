use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use async_nats::jetstream::{self, consumer::pull, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;

use crate::events::{emit, FrameFailure, UplinkFrameFailed, UplinkFramePublished};
use futures::StreamExt;
use imn_proto::wire::{self, Kind};
use tokio::sync::mpsc;

use super::{Bus, BusError, DownMessage, Settle, UpMessage};
use crate::auth::{AgentCredential, AgentCredentials};

/// How the NATS bus is set up.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub url: String,
    /// The JetStream stream that holds uplink messages until a backend acks them.
    pub stream: String,
    /// The durable consumer every backend shares.
    pub consumer: String,
    /// The key-value bucket of agent credentials (key: agent id), written by the
    /// backend, read by every bridge.
    pub credentials_bucket: String,
    /// Unacked messages the server lets one consumer have out at once.
    pub max_ack_pending: i64,
    /// Replicas of the uplink stream and the credentials bucket (3 in a 3-node
    /// cluster). None: as they are (1 when this process makes them).
    pub replicas: Option<usize>,
    /// Bridges in external broker mode take downlink messages in this NATS queue
    /// group, so one of them publishes each to the shared broker (every bridge with
    /// its own broker takes every message: only the one holding the agent delivers).
    pub downlink_queue: Option<String>,
}

impl NatsOptions {
    pub fn new(url: &str) -> NatsOptions {
        NatsOptions {
            url: url.to_string(),
            stream: "IMN_UPLINK".into(),
            consumer: "imn-backend".into(),
            credentials_bucket: "imn_agent_credentials".into(),
            max_ack_pending: 20_000,
            replicas: None,
            downlink_queue: None,
        }
    }

    /// The servers of `url`: one URL, or several separated by commas (a cluster's
    /// nodes; the client moves to another when its node goes).
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, BusError> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .map_err(|e| BusError::Nats(format!("{u:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.is_empty() {
                    Err(BusError::Nats("no NATS server given".into()))
                } else {
                    Ok(v)
                }
            })
    }
}

/// Core subject between backends (see [`Bus::publish_peer`]).
const PEER_SUBJECT: &str = "imn.backend.peer";

pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    opts: NatsOptions,
    /// Uplink messages on their way into a frame (see [`frame`]).
    framer: mpsc::Sender<(Kind, String, Bytes)>,
    framer_rx: std::sync::Mutex<Option<mpsc::Receiver<(Kind, String, Bytes)>>>,
    /// Publishes JetStream did not ack (the agent resends: no backend ack came).
    pub publish_failures: Arc<std::sync::atomic::AtomicU64>,
    /// Frames published, and the uplink messages they carried.
    pub frames: Arc<std::sync::atomic::AtomicU64>,
    pub framed_messages: Arc<std::sync::atomic::AtomicU64>,
    credentials: tokio::sync::OnceCell<kv::Store>,
}

/// Frames awaiting JetStream's ack at once. While they are out, uplink messages wait
/// and the next frame takes all of them: under load frames grow, when idle each
/// message goes at once in a frame of its own.
const FRAME_WINDOW: usize = 32;
/// A frame closes at this many messages or bytes.
const FRAME_MESSAGES: usize = 1024;
const FRAME_BYTES: usize = 512 * 1024;
/// Subjects of uplink frames: `imn.v1.frame.{bridge instance}`.
const FRAME_SUBJECT: &str = "imn.v1.frame";

fn nats_err(e: impl std::fmt::Display) -> BusError {
    BusError::Nats(e.to_string())
}

impl NatsBus {
    /// Connects (retrying in the background until the server is there) and makes sure
    /// the uplink stream exists.
    pub async fn connect(opts: NatsOptions) -> Result<NatsBus, BusError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(opts.servers()?)
            .await
            .map_err(nats_err)?;
        let js = jetstream::new(client.clone());
        let (framer, framer_rx) = mpsc::channel(FRAME_MESSAGES * FRAME_WINDOW);
        let bus = NatsBus {
            client,
            js,
            opts,
            framer,
            framer_rx: std::sync::Mutex::new(Some(framer_rx)),
            publish_failures: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            frames: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            framed_messages: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            credentials: tokio::sync::OnceCell::new(),
        };
        bus.ensure_stream().await?;
        Ok(bus)
    }

    /// Packs queued uplink messages into frames and publishes them, at most
    /// [`FRAME_WINDOW`] unacked. Started by the first `publish_up` (a backend never
    /// publishes uplink, and needs no framer).
    fn start_framer(&self) {
        let Some(mut rx) = self
            .framer_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let js = self.js.clone();
        let failures = self.publish_failures.clone();
        let frames = self.frames.clone();
        let framed = self.framed_messages.clone();
        // A random instance id: frames of two bridges never share a subject.
        let instance = {
            let mut b = [0u8; 8];
            let _ = getrandom::getrandom(&mut b);
            u64::from_ne_bytes(b) ^ u64::from(std::process::id())
        };
        let subject = format!("{FRAME_SUBJECT}.{instance:016x}");
        let window = Arc::new(tokio::sync::Semaphore::new(FRAME_WINDOW));
        tokio::spawn(async move {
            let mut next: Option<(Kind, String, Bytes)> = None;
            loop {
                let Ok(permit) = window.clone().acquire_owned().await else {
                    return;
                };
                let first = match next.take() {
                    Some(m) => m,
                    None => match rx.recv().await {
                        Some(m) => m,
                        None => return,
                    },
                };
                let mut buf = frame::Writer::new();
                buf.push(first.0, &first.1, &first.2);
                while buf.messages() < FRAME_MESSAGES && buf.bytes() < FRAME_BYTES {
                    match rx.try_recv() {
                        Ok(m) if buf.fits(&m.1, &m.2, FRAME_BYTES) => buf.push(m.0, &m.1, &m.2),
                        Ok(m) => {
                            next = Some(m);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let n = buf.messages() as u64;
                let ack = match js.publish(subject.clone(), buf.finish()).await {
                    Ok(ack) => ack,
                    Err(e) => {
                        emit(UplinkFrameFailed {
                            failures: &failures,
                            messages: n,
                            failure: FrameFailure::Publish,
                            error: e,
                        });
                        continue;
                    }
                };
                emit(UplinkFramePublished {
                    frames: &frames,
                    framed_messages: &framed,
                    messages: n,
                });
                // The ack is awaited beside the next frames. A frame JetStream refuses
                // is counted and logged; its agents get no backend ack and resend.
                let failures = failures.clone();
                tokio::spawn(async move {
                    if let Err(e) = ack.await {
                        emit(UplinkFrameFailed {
                            failures: &failures,
                            messages: n,
                            failure: FrameFailure::Ack,
                            error: e,
                        });
                    }
                    drop(permit);
                });
            }
        });
    }

    async fn ensure_stream(&self) -> Result<stream::Stream, BusError> {
        // Frames, and single messages on per-kind subjects (older bridges sent those).
        let subjects: Vec<String> = Kind::UPLINK
            .iter()
            .map(|k| format!("imn.v1.{}.*", k.as_str()))
            .chain(std::iter::once(format!("{FRAME_SUBJECT}.*")))
            .collect();
        let mut last = None;
        // The server may still be starting, and a new cluster may still be electing
        // its leaders (a replicated stream takes seconds): try for 30 s.
        for _ in 0..150 {
            match self.try_stream(&subjects).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(nats_err(last.unwrap_or_default()))
    }

    /// One attempt at [`Self::ensure_stream`].
    async fn try_stream(&self, subjects: &[String]) -> Result<stream::Stream, String> {
        let mut s = self
            .js
            .get_or_create_stream(stream::Config {
                name: self.opts.stream.clone(),
                subjects: subjects.to_vec(),
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: Duration::from_secs(120),
                num_replicas: self.opts.replicas.unwrap_or(1),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        // A stream made by an older version lacks the frame subject; one made before
        // the cluster grew has fewer replicas.
        let info = s.info().await.map_err(|e| e.to_string())?;
        let replicas = self.opts.replicas.unwrap_or(info.config.num_replicas);
        if info.config.subjects != subjects || info.config.num_replicas != replicas {
            let mut config = info.config.clone();
            config.subjects = subjects.to_vec();
            config.num_replicas = replicas;
            self.js
                .update_stream(config)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(s)
    }
}

/// Splits a frame into uplink messages that settle it together: acked once every
/// message is acked, nakked (the whole frame comes again) if any is nakked or dropped
/// unsettled. A frame that does not decode is logged and acked: it never will.
/// False when the backend's feed is closed.
async fn unframe(msg: jetstream::Message, tx: &mpsc::Sender<UpMessage>) -> bool {
    let parts = match frame::read(&msg.payload) {
        Ok(parts) => parts,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "dropping an uplink frame that does not decode");
            let _ = msg.ack().await;
            return true;
        }
    };
    let payload = msg.payload.clone();
    let shared = Arc::new(FrameSettle::new(msg, parts.len()));
    for (kind, agent, range) in parts {
        let part = FramePart {
            frame: shared.clone(),
            settled: false,
        };
        let up = UpMessage::new(kind, agent, payload.slice(range), Some(Box::new(part)));
        if tx.send(up).await.is_err() {
            return false;
        }
    }
    true
}

/// The JetStream message of a frame, settled by its last part.
struct FrameSettle<M = jetstream::Message> {
    msg: std::sync::Mutex<Option<M>>,
    left: std::sync::atomic::AtomicUsize,
    failed: std::sync::atomic::AtomicBool,
}

impl<M> FrameSettle<M> {
    fn new(msg: M, parts: usize) -> FrameSettle<M> {
        FrameSettle {
            msg: std::sync::Mutex::new(Some(msg)),
            left: std::sync::atomic::AtomicUsize::new(parts),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// One part is done; the last one settles the frame: ack (true) only if every
    /// part was acked.
    fn done(&self, ok: bool) -> Option<(M, bool)> {
        use std::sync::atomic::Ordering::SeqCst;
        if !ok {
            self.failed.store(true, SeqCst);
        }
        if self.left.fetch_sub(1, SeqCst) != 1 {
            return None;
        }
        let msg = self.msg.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some((msg, !self.failed.load(SeqCst)))
    }
}

async fn settle_frame(msg: jetstream::Message, ok: bool) {
    let r = if ok {
        msg.ack().await
    } else {
        msg.ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
            .await
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "jetstream ack of a frame failed; the frame will come back");
    }
}

struct FramePart {
    frame: Arc<FrameSettle>,
    settled: bool,
}

#[async_trait]
impl Settle for FramePart {
    async fn ack(mut self: Box<Self>) {
        self.settled = true;
        if let Some((msg, ok)) = self.frame.done(true) {
            settle_frame(msg, ok).await;
        }
    }

    async fn nak(mut self: Box<Self>) {
        self.settled = true;
        if let Some((msg, ok)) = self.frame.done(false) {
            settle_frame(msg, ok).await;
        }
    }
}

impl Drop for FramePart {
    fn drop(&mut self) {
        if !self.settled {
            if let Some((msg, ok)) = self.frame.done(false) {
                tokio::spawn(settle_frame(msg, ok));
            }
        }
    }
}

struct NatsSettle(jetstream::Message);

#[async_trait]
impl Settle for NatsSettle {
    async fn ack(self: Box<Self>) {
        if let Err(e) = self.0.ack().await {
            tracing::warn!(error = %e, "jetstream ack failed; the message will come back");
        }
    }

    async fn nak(self: Box<Self>) {
        let _ = self
            .0
            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
            .await;
    }
}

impl NatsBus {
    /// The credentials bucket, made on first use (one value per agent: the current one).
    async fn credentials_bucket(&self) -> Result<&kv::Store, BusError> {
        self.credentials
            .get_or_try_init(|| async {
                let bucket = &self.opts.credentials_bucket;
                let err = |e: &dyn std::fmt::Display| {
                    BusError::Nats(format!("key-value bucket {bucket}: {e}"))
                };
                // The bucket's stream, made by hand: async-nats's create_key_value first
                // asks for the account's info, whose answer from nats-server 2.9 (Debian's)
                // it cannot parse. This is the stream it would make (KV_{bucket} on
                // $KV.{bucket}.>, one value per key, direct get), minus 2.11's markers.
                self.js
                    .get_or_create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        description: Some(
                            "IMN agent credentials: token hash, message key, revoked".into(),
                        ),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        max_messages_per_subject: 1,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: stream::DiscardPolicy::New,
                        num_replicas: self.opts.replicas.unwrap_or(1),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| err(&e))?;
                self.js
                    .get_key_value(bucket.as_str())
                    .await
                    .map_err(|e| err(&e))
            })
            .await
    }
}

/// Applies one bucket entry to the bridge's table, unless an entry as new or newer was
/// applied already (a snapshot read and the change feed overlap). Returns whether it
/// applied. A deleted key, or a value that does not read, revokes the agent: when in
/// doubt the bridge refuses.
fn apply_credential(
    table: &AgentCredentials,
    seen: &mut HashMap<String, u64>,
    entry: kv::Entry,
) -> bool {
    if seen.get(&entry.key).is_some_and(|r| *r >= entry.revision) {
        return false;
    }
    seen.insert(entry.key.clone(), entry.revision);
    if !wire::valid_agent_id(&entry.key) {
        tracing::warn!(key = %entry.key, "credentials bucket: key is not an agent id; ignored");
        return false;
    }
    let revoke = |why: &str| {
        tracing::warn!(agent = %entry.key, why, "credentials bucket: agent treated as revoked");
        if let Some(old) = table.get(&entry.key) {
            table.set(
                &entry.key,
                AgentCredential {
                    revoked: true,
                    ..old
                },
            );
        }
    };
    match entry.operation {
        kv::Operation::Put => match AgentCredential::from_json(&entry.value) {
            Ok(cred) => table.set(&entry.key, cred),
            Err(e) => revoke(&e),
        },
        kv::Operation::Delete | kv::Operation::Purge => revoke("deleted"),
    }
    true
}

/// Reads the whole bucket into `table` after opening the change feed (so nothing
/// falls between the two); returns the feed and how many entries applied.
async fn credentials_snapshot(
    store: &kv::Store,
    table: &AgentCredentials,
    seen: &mut HashMap<String, u64>,
) -> Result<(kv::Watch, usize), BusError> {
    let watch = store.watch_all().await.map_err(nats_err)?;
    let mut keys = store.keys().await.map_err(nats_err)?;
    let mut applied = 0;
    while let Some(key) = keys.next().await {
        let key = key.map_err(nats_err)?;
        if let Some(entry) = store.entry(key).await.map_err(nats_err)? {
            applied += usize::from(apply_credential(table, seen, entry));
        }
    }
    Ok((watch, applied))
}

#[async_trait]
impl Bus for NatsBus {
    async fn put_credential(&self, agent: &str, cred: &AgentCredential) -> Result<(), BusError> {
        let store = self.credentials_bucket().await?;
        store
            .put(agent, Bytes::from(cred.to_json()))
            .await
            .map_err(|e| BusError::Nats(format!("credential of {agent}: {e}")))?;
        Ok(())
    }

    async fn follow_credentials(&self, table: Arc<AgentCredentials>) -> Result<usize, BusError> {
        let store = self.credentials_bucket().await?.clone();
        let mut seen = HashMap::new();
        let (mut watch, applied) = credentials_snapshot(&store, &table, &mut seen).await?;
        tokio::spawn(async move {
            loop {
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(entry) => {
                            apply_credential(&table, &mut seen, entry);
                        }
                        Err(e) => tracing::warn!(error = %e, "credentials feed"),
                    }
                }
                // The feed ended (the server went away): read everything again once
                // it is back. Until then the table keeps what it had.
                tracing::warn!("credentials feed ended; re-reading the bucket");
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    // The bucket may be a new one (a server without persistence came
                    // back), its revisions counting from 1 again: what was seen of the
                    // old one must not hide the new one's entries. The snapshot reads
                    // the latest of every key, so nothing older is applied after it.
                    seen.clear();
                    match credentials_snapshot(&store, &table, &mut seen).await {
                        Ok((w, _)) => {
                            watch = w;
                            break;
                        }
                        Err(e) => tracing::warn!(error = %e, "credentials bucket"),
                    }
                }
            }
        });
        Ok(applied)
    }

    async fn publish_peer(&self, payload: Bytes) -> Result<(), BusError> {
        self.client
            .publish(PEER_SUBJECT, payload)
            .await
            .map_err(nats_err)
    }

    async fn subscribe_peer(&self) -> Result<Option<mpsc::Receiver<Bytes>>, BusError> {
        let mut sub = self
            .client
            .subscribe(PEER_SUBJECT)
            .await
            .map_err(nats_err)?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                // Full: a slow backend misses news it can also read from the store.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(msg.payload) {
                    return;
                }
            }
        });
        Ok(Some(rx))
    }

    async fn publish_up(&self, kind: Kind, agent: &str, payload: Bytes) -> Result<(), BusError> {
        // One JetStream message per uplink message cost nats-server about 200 us of
        // CPU each (a store write, a de-duplication entry, an ack, a delete): frames
        // carry many. The backend dedups by record id, so no message ids are needed.
        self.start_framer();
        self.framer
            .send((kind, agent.to_string(), payload))
            .await
            .map_err(|_| BusError::Closed)
    }

    async fn publish_down_traced(
        &self,
        kind: Kind,
        agent: &str,
        payload: Bytes,
        traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        let subject = wire::subject(kind, agent);
        match traceparent {
            Some(tp) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("traceparent", tp);
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
            }
            None => self.client.publish(subject, payload).await,
        }
        .map_err(nats_err)
    }

    async fn subscribe_up(&self) -> Result<mpsc::Receiver<UpMessage>, BusError> {
        let stream = self.ensure_stream().await?;
        let config = pull::Config {
            durable_name: Some(self.opts.consumer.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: self.opts.max_ack_pending,
            ..Default::default()
        };
        // A replicated consumer that a new cluster is still placing, or that another
        // backend is creating at the same moment, can make the request time out: try
        // for 30 s, as for the stream, rather than exit.
        let mut attempt = 0;
        let consumer = loop {
            match stream
                .get_or_create_consumer(&self.opts.consumer, config.clone())
                .await
            {
                Ok(c) => break c,
                Err(e) if attempt < 150 => {
                    attempt += 1;
                    tracing::debug!(error = %e, "consumer not ready yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(nats_err(e)),
            }
        };
        // A replicated consumer takes pull requests once its group has a leader;
        // a request sent before that is dropped without an answer (seen with a
        // 3-node cluster: one backend of two got nothing until its request expired).
        let mut consumer = consumer;
        for _ in 0..100 {
            match consumer.info().await {
                Ok(info) if info.cluster.as_ref().is_none_or(|c| c.leader.is_some()) => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(async move {
            loop {
                // Pull requests of a few frames at a time: the server fills the oldest
                // request first, so with its default of 200 one backend of several took
                // every frame while the load was light. A frame holds up to 1,024
                // messages, so 32 frames per request still keep a backend busy.
                let mut messages = match consumer
                    .stream()
                    .max_messages_per_batch(32)
                    // A request the server lost (its consumer leader died with a NATS
                    // node) is noticed after two missed heartbeats and made again.
                    .heartbeat(Duration::from_secs(3))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "jetstream consumer; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(item) = messages.next().await {
                    let msg = match item {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "jetstream message error");
                            continue;
                        }
                    };
                    if msg.subject.as_str().starts_with(FRAME_SUBJECT) {
                        if !unframe(msg, &tx).await {
                            return;
                        }
                        continue;
                    }
                    let Some((kind, agent)) =
                        wire::parse_subject(msg.subject.as_str()).map(|(k, a)| (k, a.to_string()))
                    else {
                        let _ = msg.ack().await;
                        continue;
                    };
                    let traceparent = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("traceparent"))
                        .map(|v| v.to_string());
                    let payload = msg.payload.clone();
                    let mut up =
                        UpMessage::new(kind, agent, payload, Some(Box::new(NatsSettle(msg))));
                    up.traceparent = traceparent;
                    if tx.send(up).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn subscribe_down(&self) -> Result<mpsc::Receiver<DownMessage>, BusError> {
        let (tx, rx) = mpsc::channel(4096);
        for kind in Kind::DOWNLINK {
            let subject = format!("imn.v1.{}.*", kind.as_str());
            let mut sub = match &self.opts.downlink_queue {
                Some(group) => self.client.queue_subscribe(subject, group.clone()).await,
                None => self.client.subscribe(subject).await,
            }
            .map_err(nats_err)?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    if let Some((kind, agent)) = wire::parse_subject(msg.subject.as_str()) {
                        let traceparent = msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("traceparent"))
                            .map(|v| v.to_string());
                        let m = DownMessage {
                            kind,
                            agent: agent.to_string(),
                            payload: msg.payload,
                            traceparent,
                        };
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
        Ok(rx)
    }
}

/// Uplink frames on NATS: `IMNF`, version 1, then per message its kind (u8 length,
/// name), agent id (u8 length) and payload (u32 length, big-endian).
mod frame {
    use bytes::{BufMut, Bytes, BytesMut};
    use imn_proto::wire::{self, Kind};

    const MAGIC: &[u8; 5] = b"IMNF\x01";

    pub struct Writer {
        buf: BytesMut,
        n: usize,
    }

    impl Writer {
        pub fn new() -> Writer {
            let mut buf = BytesMut::with_capacity(16 * 1024);
            buf.put_slice(MAGIC);
            Writer { buf, n: 0 }
        }

        pub fn messages(&self) -> usize {
            self.n
        }

        pub fn bytes(&self) -> usize {
            self.buf.len()
        }

        /// Whether one more message keeps the frame within `max` bytes.
        pub fn fits(&self, agent: &str, payload: &[u8], max: usize) -> bool {
            self.buf.len() + 1 + 8 + 1 + agent.len() + 4 + payload.len() <= max
        }

        pub fn push(&mut self, kind: Kind, agent: &str, payload: &[u8]) {
            let k = kind.as_str();
            // Agent ids are at most 64 bytes (wire::valid_agent_id) and MQTT payloads
            // far below 4 GiB: the lengths fit.
            self.buf.put_u8(k.len() as u8);
            self.buf.put_slice(k.as_bytes());
            self.buf.put_u8(agent.len().min(255) as u8);
            self.buf
                .put_slice(&agent.as_bytes()[..agent.len().min(255)]);
            self.buf.put_u32(payload.len() as u32);
            self.buf.put_slice(payload);
            self.n += 1;
        }

        pub fn finish(self) -> Bytes {
            self.buf.freeze()
        }
    }

    /// Each message's kind, agent and the byte range of its payload in `b`.
    pub type Part = (Kind, String, std::ops::Range<usize>);

    pub fn read(b: &[u8]) -> Result<Vec<Part>, String> {
        if !b.starts_with(MAGIC) {
            return Err("frame: does not start with IMNF version 1".into());
        }
        let mut at = MAGIC.len();
        let mut out = Vec::new();
        while at < b.len() {
            let n = out.len() + 1;
            let mut take = |len: usize| -> Result<std::ops::Range<usize>, String> {
                let end = at
                    .checked_add(len)
                    .filter(|&e| e <= b.len())
                    .ok_or_else(|| format!("frame: message {n} is cut short at byte {at}"))?;
                let r = at..end;
                at = end;
                Ok(r)
            };
            let klen = b[take(1)?][0] as usize;
            let kind = std::str::from_utf8(&b[take(klen)?])
                .ok()
                .and_then(Kind::parse)
                .filter(|k| k.is_uplink())
                .ok_or_else(|| format!("frame: message {n}: kind is not an uplink kind"))?;
            let alen = b[take(1)?][0] as usize;
            let agent = std::str::from_utf8(&b[take(alen)?])
                .ok()
                .filter(|a| wire::valid_agent_id(a))
                .ok_or_else(|| format!("frame: message {n}: agent is not a valid agent id"))?
                .to_string();
            let len = &b[take(4)?];
            let plen = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            out.push((kind, agent, take(plen)?));
        }
        if out.is_empty() {
            return Err("frame: holds no messages".into());
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::super::FrameSettle;
        use super::*;

        #[test]
        fn a_frame_is_acked_by_its_last_part_and_nakked_if_any_part_fails() {
            let f = FrameSettle::new("m", 3);
            assert_eq!(f.done(true), None);
            assert_eq!(f.done(true), None);
            assert_eq!(f.done(true), Some(("m", true)));
            let f = FrameSettle::new("m", 3);
            assert_eq!(f.done(true), None);
            assert_eq!(f.done(false), None);
            assert_eq!(
                f.done(true),
                Some(("m", false)),
                "one nak sends the frame again"
            );
            let f = FrameSettle::new("m", 1);
            assert_eq!(f.done(false), Some(("m", false)));
        }

        #[test]
        fn frames_round_trip_and_bad_frames_are_refused() {
            let mut w = Writer::new();
            w.push(Kind::Out, "edge-1", b"{\"batch\":1}");
            w.push(Kind::Heartbeat, "edge-2", b"");
            w.push(Kind::Hello, "e3", &[7u8; 70_000]);
            assert_eq!(w.messages(), 3);
            let f = w.finish();
            let parts = read(&f).unwrap();
            let got: Vec<(Kind, &str, &[u8])> = parts
                .iter()
                .map(|(k, a, r)| (*k, a.as_str(), &f[r.clone()]))
                .collect();
            assert_eq!(got[0], (Kind::Out, "edge-1", &b"{\"batch\":1}"[..]));
            assert_eq!(got[1], (Kind::Heartbeat, "edge-2", &b""[..]));
            assert_eq!(
                (got[2].0, got[2].1, got[2].2.len()),
                (Kind::Hello, "e3", 70_000)
            );
            // A frame cut anywhere but between messages is refused; none panics.
            let ends: Vec<usize> = parts.iter().map(|(_, _, r)| r.end).collect();
            for cut in 0..f.len() {
                match read(&f[..cut]) {
                    Ok(p) => assert_eq!(ends.iter().position(|&e| e == cut), Some(p.len() - 1)),
                    Err(e) => assert!(!ends.contains(&cut), "cut at {cut}: {e}"),
                }
            }
            // A downlink kind, a bad agent id, another magic.
            let mut w = Writer::new();
            w.push(Kind::Ack, "edge-1", b"x");
            assert!(read(&w.finish()).unwrap_err().contains("kind"));
            let mut w = Writer::new();
            w.push(Kind::Out, "no/slash", b"x");
            assert!(read(&w.finish()).unwrap_err().contains("agent"));
            assert!(read(b"IMNF\x02").unwrap_err().contains("version"));
            // Arbitrary bytes after the magic never panic.
            let mut state = 1u64;
            for _ in 0..20_000 {
                let mut b = MAGIC.to_vec();
                for _ in 0..(state % 40) {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    b.push((state >> 56) as u8);
                }
                let _ = read(&b);
            }
        }
    }
}
