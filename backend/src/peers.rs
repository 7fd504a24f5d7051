//! News between backends that share a bus and a store. The uplink is a work queue:
//! each message reaches one backend. What the others must also know goes to every
//! backend on a core NATS subject (at most once; each backend can also read it back
//! from the store, so a lost message only delays):
//!
//! - an agent's hello, heartbeat and status, so every backend's registry knows who is
//!   online (and dispatches to it at once) and which connection sessions are open;
//! - results stored, so result streams (SSE) on every backend read what is new, and
//!   `?wait` callers wake whichever backend stored the result;
//! - credential changes, so a token made or revoked on one backend is honoured on all.

use std::sync::Arc;

use bytes::Bytes;
use imn_proto::wire::{Heartbeat, Hello};
use serde::{Deserialize, Serialize};

use crate::service::Backend;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum PeerEvent {
    Hello {
        agent: String,
        at_ms: i64,
        hello: Box<Hello>,
    },
    Heartbeat {
        agent: String,
        at_ms: i64,
        hb: Heartbeat,
    },
    Status {
        agent: String,
        at_ms: i64,
        online: bool,
    },
    /// Batches were stored; these requests finished with them.
    Stored {
        finished: Vec<String>,
    },
    Credentials,
}

#[derive(Debug, Serialize, Deserialize)]
struct PeerMessage {
    /// The sending backend's instance id: a backend skips its own news.
    from: u64,
    #[serde(flatten)]
    ev: PeerEvent,
}

impl Backend {
    /// Tells the other backends (a no-op on the in-process bus).
    pub async fn tell_peers(&self, ev: PeerEvent) {
        let msg = PeerMessage {
            from: self.instance,
            ev,
        };
        let Ok(bytes) = serde_json::to_vec(&msg) else {
            return;
        };
        if let Err(e) = self.bus.publish_peer(Bytes::from(bytes)).await {
            tracing::debug!(error = %e, "cannot tell the other backends");
        }
    }

    /// Applies other backends' news until the feed ends.
    pub(crate) async fn follow_peers(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<Bytes>) {
        while let Some(payload) = rx.recv().await {
            let msg: PeerMessage = match serde_json::from_slice(&payload) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping a peer message that does not decode");
                    continue;
                }
            };
            if msg.from == self.instance {
                continue;
            }
            match msg.ev {
                PeerEvent::Hello {
                    agent,
                    at_ms,
                    hello,
                } => {
                    self.registry.hello(&agent, *hello, None, at_ms);
                    self.session_known(&agent, true);
                }
                PeerEvent::Heartbeat { agent, at_ms, hb } => {
                    self.registry.heartbeat(&agent, hb, at_ms);
                    self.session_known(&agent, true);
                }
                PeerEvent::Status {
                    agent,
                    at_ms,
                    online,
                } => {
                    self.registry.status(&agent, online, at_ms);
                    self.session_known(&agent, online);
                }
                PeerEvent::Stored { finished } => {
                    self.feed.records_stored();
                    for id in finished {
                        self.finished(&id);
                    }
                }
                PeerEvent::Credentials => {
                    if let Err(e) = self.security.reload(self.store.as_ref()).await {
                        tracing::warn!(error = %e, "cannot reload credentials another backend changed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_messages_round_trip() {
        let m = PeerMessage {
            from: 7,
            ev: PeerEvent::Stored {
                finished: vec!["r1".into()],
            },
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"from":7,"ev":"stored","finished":["r1"]}"#);
        let back: PeerMessage = serde_json::from_str(&s).unwrap();
        assert!(matches!(back.ev, PeerEvent::Stored { finished } if finished == ["r1"]));
        assert!(serde_json::from_str::<PeerMessage>(r#"{"from":1,"ev":"nope"}"#).is_err());
    }
}
