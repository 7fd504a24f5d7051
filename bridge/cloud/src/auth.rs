//! Who may connect to the bridge, and as whom they may speak.
//!
//! [`AgentCredentials`] is the bridge's copy of the enrolled agents: for each, the hash
//! of its token, its message key and whether it is revoked. The backend owns the
//! enrollment and pushes every change here (in-process under `imn up`). With auth off
//! (the loopback default), everyone may connect and messages need no signature.
//!
//! With auth on, three checks stand between an agent and the backend:
//! 1. the embedded broker's login check ([`AgentCredentials::login`]): client id, user
//!    name and token must belong to one enrolled, unrevoked agent;
//! 2. the embedded broker's topic ACL ([`AgentCredentials::allowed`]): an agent
//!    publishes only its own uplink topics and subscribes only its own downlink ones;
//! 3. the bridge's signature check (in `broker::uplink`): a message on agent B's topic
//!    must be signed with B's message key. This one holds whatever the broker, even one
//!    without an ACL.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::RwLock;

use imn_proto::auth::{self as wauth, MessageKey};
use imn_proto::wire::{self, Kind};
use tokio::sync::mpsc;

pub use crate::events::AclAccess;
use crate::events::{emit, AclDenied, LoginRefused, UplinkNotSigned};

/// One enrolled agent, as the bridge needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentCredential {
    /// [`imn_proto::auth::token_hash`] of its token.
    pub token_hash: String,
    pub message_key: MessageKey,
    pub revoked: bool,
}

impl AgentCredential {
    /// The form the backend shares with separate bridges over the bus (NATS key-value):
    /// JSON `{"token_hash", "message_key" (hex), "revoked"}`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::json!({
            "token_hash": self.token_hash,
            "message_key": wauth::to_hex(&self.message_key),
            "revoked": self.revoked,
        })
        .to_string()
        .into_bytes()
    }

    /// Reads [`AgentCredential::to_json`]; the error names the field at fault.
    pub fn from_json(b: &[u8]) -> Result<AgentCredential, String> {
        let v: serde_json::Value =
            serde_json::from_slice(b).map_err(|e| format!("not JSON: {e}"))?;
        let token_hash = v["token_hash"]
            .as_str()
            .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
            .ok_or("token_hash: must be 64 hex digits")?
            .to_string();
        let message_key = v["message_key"]
            .as_str()
            .and_then(wauth::key_from_hex)
            .ok_or("message_key: must be 64 hex digits")?;
        let revoked = v["revoked"]
            .as_bool()
            .ok_or("revoked: must be true or false")?;
        Ok(AgentCredential {
            token_hash,
            message_key,
            revoked,
        })
    }
}

impl std::fmt::Debug for AgentCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCredential")
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

/// Counters of refused connections and messages.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// Logins refused: unknown id, wrong token, revoked, id and user name differ.
    pub logins_refused: AtomicU64,
    /// Publishes the broker's ACL dropped (another agent's topic, or a downlink topic).
    pub publish_denied: AtomicU64,
    /// Subscriptions the broker's ACL refused.
    pub subscribe_denied: AtomicU64,
    /// Last wills the broker discarded for naming a topic not the agent's own.
    pub will_denied: AtomicU64,
    /// Uplink messages the bridge dropped for a missing or wrong signature, or for a
    /// topic naming an agent that is not enrolled or is revoked.
    pub unsigned_or_forged: AtomicU64,
}

/// The bridge's view of the enrolled agents.
pub struct AgentCredentials {
    enabled: bool,
    agents: RwLock<HashMap<String, AgentCredential>>,
    kick_tx: mpsc::UnboundedSender<String>,
    kick_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    pub stats: AuthStats,
}

impl std::fmt::Debug for AgentCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCredentials")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl AgentCredentials {
    /// Auth off: every client may connect, no signatures are checked.
    pub fn disabled() -> AgentCredentials {
        Self::new(false)
    }

    /// Auth on, with no agent enrolled yet: every client is refused until some are.
    pub fn enabled() -> AgentCredentials {
        Self::new(true)
    }

    fn new(enabled: bool) -> AgentCredentials {
        let (kick_tx, kick_rx) = mpsc::unbounded_channel();
        AgentCredentials {
            enabled,
            agents: RwLock::new(HashMap::new()),
            kick_tx,
            kick_rx: std::sync::Mutex::new(Some(kick_rx)),
            stats: AuthStats::default(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Adds or replaces an agent. A revoked agent, or one whose token changed, is
    /// disconnected: it must log in again with what is current.
    pub fn set(&self, id: &str, cred: AgentCredential) {
        let previous = self
            .agents
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), cred.clone());
        let changed = previous.is_some_and(|p| p.token_hash != cred.token_hash);
        if cred.revoked || changed {
            let _ = self.kick_tx.send(id.to_string());
        }
    }

    /// One agent's credential, if it is known.
    pub fn get(&self, id: &str) -> Option<AgentCredential> {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The receiver of client ids to disconnect; taken once, by the broker's owner.
    pub fn take_kicks(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        self.kick_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Whether an MQTT login may proceed. With auth on: the client id and the user name
    /// are the same enrolled, unrevoked agent id, and the password is its token.
    pub fn login(&self, client_id: &str, username: &str, password: &str) -> bool {
        if !self.enabled {
            return true;
        }
        let ok = client_id == username
            && wire::valid_agent_id(client_id)
            && self
                .agents
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(client_id)
                .is_some_and(|c| !c.revoked && c.token_hash == wauth::token_hash(password));
        if !ok {
            emit(LoginRefused {
                stats: &self.stats,
                client_id,
                username,
            });
        }
        ok
    }

    /// The topic ACL: agent `client_id` publishes (and leaves as its will) only its own
    /// uplink topics, and subscribes only to its own downlink topics. A refusal is
    /// counted (by `access`) and logged.
    pub fn allowed(&self, client_id: &str, topic: &str, access: AclAccess) -> bool {
        let publish = access != AclAccess::Subscribe;
        let ok = match wire::parse_topic(topic) {
            Some((agent, kind)) => agent == client_id && kind.is_uplink() == publish,
            None => false,
        };
        if !ok {
            emit(AclDenied {
                stats: &self.stats,
                client_id,
                topic,
                access,
            });
        }
        ok
    }

    /// The message key of an enrolled, unrevoked agent.
    pub fn message_key(&self, agent: &str) -> Option<MessageKey> {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
            .filter(|c| !c.revoked)
            .map(|c| c.message_key)
    }

    /// Checks an uplink message (auth on) or removes a signature nobody checks (auth
    /// off). `None`: drop it; it was counted and logged.
    pub fn open_uplink<'a>(&self, agent: &str, kind: Kind, payload: &'a [u8]) -> Option<&'a [u8]> {
        if !self.enabled {
            return Some(wauth::strip(payload));
        }
        let topic = wire::topic(agent, kind);
        let verdict = match self.message_key(agent) {
            Some(key) => wauth::verify(&key, &topic, payload).map_err(|e| e.reason()),
            None => Err("agent not enrolled or revoked"),
        };
        match verdict {
            Ok(inner) => Some(inner),
            Err(reason) => {
                emit(UplinkNotSigned {
                    stats: &self.stats,
                    topic: &topic,
                    reason,
                });
                None
            }
        }
    }

    /// Signs a downlink message for its agent, when auth is on and the agent enrolled.
    pub fn seal_downlink(&self, agent: &str, kind: Kind, payload: bytes::Bytes) -> bytes::Bytes {
        if !self.enabled {
            return payload;
        }
        match self.message_key(agent) {
            Some(key) => wauth::sign(&key, &wire::topic(agent, kind), &payload).into(),
            None => payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn cred(token: &str) -> AgentCredential {
        AgentCredential {
            token_hash: wauth::token_hash(token),
            message_key: wauth::message_key(token),
            revoked: false,
        }
    }

    #[test]
    fn credentials_round_trip_as_json_and_bad_ones_name_the_field() {
        let c = AgentCredential {
            revoked: true,
            ..cred("t")
        };
        assert_eq!(AgentCredential::from_json(&c.to_json()), Ok(c));
        for (json, field) in [
            (&b"{"[..], "not JSON"),
            (br#"{"token_hash":"ab","message_key":"00","revoked":false}"#, "token_hash"),
            (
                br#"{"token_hash":"0000000000000000000000000000000000000000000000000000000000000000","message_key":"zz","revoked":false}"#,
                "message_key",
            ),
            (
                br#"{"token_hash":"0000000000000000000000000000000000000000000000000000000000000000","message_key":"0000000000000000000000000000000000000000000000000000000000000000"}"#,
                "revoked",
            ),
        ] {
            let e = AgentCredential::from_json(json).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn login_needs_matching_id_user_and_token() {
        let c = AgentCredentials::enabled();
        c.set("a", cred("ta"));
        assert!(c.login("a", "a", "ta"));
        assert!(!c.login("a", "a", "tb"), "wrong token");
        assert!(!c.login("b", "b", "ta"), "unknown id");
        assert!(!c.login("a", "b", "ta"), "user name differs from client id");
        c.set(
            "a",
            AgentCredential {
                revoked: true,
                ..cred("ta")
            },
        );
        assert!(!c.login("a", "a", "ta"), "revoked");
        assert_eq!(c.stats.logins_refused.load(Ordering::Relaxed), 4);
        assert!(AgentCredentials::disabled().login("x", "", ""));
    }

    #[test]
    fn acl_allows_only_own_topics_in_the_right_direction() {
        use AclAccess::{Publish as Pub, Subscribe as Sub, Will};
        let c = AgentCredentials::enabled();
        assert!(c.allowed("a", "imn/v1/a/out", Pub));
        assert!(c.allowed("a", "imn/v1/a/status", Pub));
        assert!(c.allowed("a", "imn/v1/a/cmd", Sub));
        assert!(!c.allowed("a", "imn/v1/b/out", Pub));
        assert!(!c.allowed("a", "imn/v1/a/cmd", Pub), "publishing a command");
        assert!(!c.allowed("a", "imn/v1/b/cmd", Sub));
        assert!(!c.allowed("a", "imn/v1/+/cmd", Sub), "wildcards");
        assert!(!c.allowed("a", "#", Sub));
        assert!(
            !c.allowed("a", "imn/v1/a/out", Sub),
            "reading its own uplink"
        );
        assert!(c.allowed("a", "imn/v1/a/status", Will));
        assert!(
            !c.allowed("a", "imn/v1/b/status", Will),
            "another agent's will"
        );
        // Each refusal counted once, by what was asked (the event's counter).
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(n(&c.stats.publish_denied), 2);
        assert_eq!(n(&c.stats.subscribe_denied), 4);
        assert_eq!(n(&c.stats.will_denied), 1);
    }

    #[test]
    fn uplink_needs_the_topic_agents_signature_and_revocation_kicks() {
        let c = AgentCredentials::enabled();
        let mut kicks = c.take_kicks().unwrap();
        c.set("a", cred("ta"));
        c.set("b", cred("tb"));
        let inner = b"\x01body";
        let by_a = wauth::sign(&wauth::message_key("ta"), "imn/v1/a/out", inner);
        assert_eq!(c.open_uplink("a", Kind::Out, &by_a), Some(&inner[..]));
        assert_eq!(
            c.open_uplink("b", Kind::Out, &by_a),
            None,
            "A's tag on B's topic"
        );
        assert_eq!(c.open_uplink("a", Kind::Out, inner), None, "unsigned");
        assert_eq!(c.stats.unsigned_or_forged.load(Ordering::Relaxed), 2);
        assert!(kicks.try_recv().is_err(), "nobody kicked yet");
        c.set("a", cred("ta2"));
        assert_eq!(
            kicks.try_recv().ok().as_deref(),
            Some("a"),
            "rotation kicks"
        );
        assert_eq!(
            c.open_uplink("a", Kind::Out, &by_a),
            None,
            "old key after rotation"
        );
        let d = AgentCredentials::disabled();
        assert_eq!(d.open_uplink("a", Kind::Out, &by_a), Some(&inner[..]));
    }
}
