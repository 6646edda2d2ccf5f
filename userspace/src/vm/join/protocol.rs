//! The join protocol: line-delimited JSON over TCP on the logging link, both sides
//! proving the channel key.
//!
//! 1. The live node greets every connection with a [`Challenge`] (16 random bytes).
//! 2. The joining backup says [`Hello`]: its node, the epoch it follows, its VM
//!    configuration hash, a challenge of its own, and an HMAC-SHA256 under the channel
//!    key (`[channel] key_file`) of the live node's challenge and the hello. A hello
//!    whose MAC does not verify is refused before anything is decided or told.
//! 3. The live node answers a [`Reply`] (`transfer`, `follow-from-boot`, `retry` or
//!    `refused` with the reason; see `policy`) and names the session its log frames
//!    carry, MACed over the joiner's challenge: the joiner takes state only from a node
//!    with the key, and follows that session only (its XDP drops frames of any other,
//!    so a replay of an earlier run's frames cannot capture it).
//! 4. On `transfer`, both sides run a Noise handshake under a key derived from the
//!    channel key and bound to the two challenges (`secure`); inside it the VMM's state
//!    streams over (`ft_vmm::transfer`), the live node's cut information ([`CutInfo`])
//!    ends it, and the joiner's [`Confirm`] says it holds it all.
use std::{
    io::{BufRead, Write},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::channel::auth::{ChannelKey, fill_random, hex};

/// Not a join request that can be answered (malformed, over-long, a dead connection).
#[derive(Debug)]
pub(super) struct BadRequest(pub String);

/// 2: challenge-response under the channel key. 3: the reply names the session; the
/// transfer runs inside a Noise session.
pub const JOIN_VERSION: u32 = 3;
/// Longest hello or reply line.
const MAX_LINE: u64 = 4096;
/// Random bytes of a challenge.
const NONCE_LEN: usize = 16;
/// Labels of the two MACs (so that one can never pass for the other).
const HELLO_MAC: &str = "ft-join-hello";
const REPLY_MAC: &str = "ft-join-reply";

/// The primary's first line on every connection.
#[derive(Serialize, Deserialize, Debug)]
pub struct Challenge {
    pub version: u32,
    /// Hex, NONCE_LEN fresh random bytes.
    pub nonce: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    pub version: u32,
    pub node: String,
    pub epoch: u64,
    pub config_hash: u64,
    /// The joiner's challenge to the primary (hex): the reply's MAC covers it.
    #[serde(default)]
    pub nonce: String,
    /// HMAC-SHA256 (hex) under the channel key of the primary's challenge and this
    /// hello ([`Hello::mac`]).
    #[serde(default)]
    pub mac: String,
}

impl Hello {
    /// This hello with its MAC in answer to `challenge` (the primary's nonce).
    pub fn signed(mut self, key: &ChannelKey, challenge: &str) -> Hello {
        self.mac = self.compute_mac(key, challenge);
        self
    }

    /// The MAC of this hello in answer to `challenge`.
    fn compute_mac(&self, key: &ChannelKey, challenge: &str) -> String {
        let parts = self.mac_parts(challenge);
        key.mac_hex(HELLO_MAC, &parts.each_ref().map(|p| p.as_slice()))
    }

    fn mac_valid(&self, key: &ChannelKey, challenge: &str) -> bool {
        let parts = self.mac_parts(challenge);
        key.verify_hex(
            HELLO_MAC,
            &parts.each_ref().map(|p| p.as_slice()),
            &self.mac,
        )
    }

    fn mac_parts(&self, challenge: &str) -> [Vec<u8>; 6] {
        [
            challenge.as_bytes().to_vec(),
            self.version.to_be_bytes().to_vec(),
            self.node.as_bytes().to_vec(),
            self.epoch.to_be_bytes().to_vec(),
            self.config_hash.to_be_bytes().to_vec(),
            self.nonce.as_bytes().to_vec(),
        ]
    }
}

pub(super) fn new_nonce() -> String {
    let mut n = [0u8; NONCE_LEN];
    fill_random(&mut n);
    hex(&n)
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    Transfer,
    FollowFromBoot,
    Retry,
    Refused,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Reply {
    pub answer: Answer,
    pub reason: String,
    /// The session of the live node's log frames (0 in a refusal).
    #[serde(default)]
    pub session: u64,
    /// HMAC-SHA256 (hex) of the joiner's challenge, the primary's, the answer and the
    /// session; empty when the hello was not authenticated (a refusal).
    #[serde(default)]
    pub mac: String,
}

impl Reply {
    fn mac_parts(&self, hello_nonce: &str, challenge: &str) -> [Vec<u8>; 5] {
        [
            hello_nonce.as_bytes().to_vec(),
            challenge.as_bytes().to_vec(),
            serde_json::to_vec(&self.answer).unwrap_or_default(),
            self.reason.as_bytes().to_vec(),
            self.session.to_be_bytes().to_vec(),
        ]
    }

    fn sign(mut self, key: &ChannelKey, hello_nonce: &str, challenge: &str) -> Reply {
        let parts = self.mac_parts(hello_nonce, challenge);
        self.mac = key.mac_hex(REPLY_MAC, &parts.each_ref().map(|p| p.as_slice()));
        self
    }

    fn mac_valid(&self, key: &ChannelKey, hello_nonce: &str, challenge: &str) -> bool {
        let parts = self.mac_parts(hello_nonce, challenge);
        key.verify_hex(
            REPLY_MAC,
            &parts.each_ref().map(|p| p.as_slice()),
            &self.mac,
        )
    }
}

/// The joining backup's last word: it holds the whole state.
#[derive(Serialize, Deserialize, Debug)]
pub struct Confirm {
    pub received: bool,
}

/// How long the primary waits for `Confirm` after the stop phase (the backup only reads
/// the rest of the stream and the machine state by then).
pub(super) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// What the primary's hook says at the cut.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutInfo {
    /// First input-stream sequence of the new log.
    pub input_start: u64,
    /// First VMM-stream sequence of the new log.
    pub vm_start: u64,
    pub epoch: u64,
    /// The primary's session (its log frames carry it; acks must name it).
    pub session: u64,
}

pub(super) fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut s = String::new();
    let n = std::io::Read::take(&mut *r, MAX_LINE).read_line(&mut s)?;
    if n == 0 || !s.ends_with('\n') {
        return Err(std::io::Error::other(
            "the peer closed the join connection or sent an over-long line",
        ));
    }
    Ok(s)
}

pub(super) fn send_line(w: &mut impl Write, v: &impl Serialize) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    b.push(b'\n');
    w.write_all(&b)
}

/// Why a hello without the right MAC is refused.
pub(super) const UNAUTHENTICATED: &str = "the join request is not authenticated: the joining host does \
     not hold this node's channel key (both hosts need the same [channel] key_file)";

/// What binds a transfer's Noise session to one handshake (its prologue): both
/// challenges.
pub(super) fn binding(challenge: &str, hello_nonce: &str) -> Vec<u8> {
    format!("ft-join v{JOIN_VERSION} {challenge} {hello_nonce}").into_bytes()
}

/// An authenticated hello and what it was answered.
pub(super) struct Answered {
    pub hello: Hello,
    pub answer: Answer,
    pub reason: String,
    /// See [`binding`].
    pub binding: Vec<u8>,
    /// The key the hello proved (one of the node's keys during a rotation): the reply
    /// and the transfer's session are under it.
    pub key: ChannelKey,
}

/// The primary's half of the handshake: its challenge, the backup's hello, the answer
/// (`decide`, for an authenticated hello of this version) naming `session`, MACed under
/// the one of `keys` the hello proved. None: the hello proved none of them; it was
/// refused (to be counted).
pub(super) fn serve_handshake(
    keys: &[ChannelKey],
    session: u64,
    w: &mut impl Write,
    r: &mut impl BufRead,
    decide: impl FnOnce(&Hello) -> (Answer, String),
) -> Result<Option<Answered>, BadRequest> {
    let bad = BadRequest;
    let challenge = new_nonce();
    send_line(
        w,
        &Challenge {
            version: JOIN_VERSION,
            nonce: challenge.clone(),
        },
    )
    .map_err(|e| bad(e.to_string()))?;
    let line = read_line(r).map_err(|e| bad(e.to_string()))?;
    let hello: Hello =
        serde_json::from_str(&line).map_err(|e| bad(format!("not a join hello: {e}")))?;
    // The key the hello proves, if any (one MAC check per key held).
    let proved = keys.iter().find(|k| hello.mac_valid(k, &challenge));
    let (answer, reason) = if hello.version != JOIN_VERSION {
        version_refusal(hello.version)
    } else if proved.is_none() {
        // Nothing about this node is told to a host without the key, nothing is sent.
        let reply = Reply {
            answer: Answer::Refused,
            reason: UNAUTHENTICATED.into(),
            session: 0,
            mac: String::new(),
        };
        send_line(w, &reply).map_err(|e| bad(e.to_string()))?;
        return Ok(None);
    } else {
        decide(&hello)
    };
    // A refusal by version is answered under the first key (nothing was proved).
    let key = proved.or(keys.first()).cloned().unwrap_or_default();
    let reply = Reply {
        answer,
        reason: reason.clone(),
        session,
        mac: String::new(),
    }
    .sign(&key, &hello.nonce, &challenge);
    send_line(w, &reply).map_err(|e| bad(e.to_string()))?;
    let binding = binding(&challenge, &hello.nonce);
    Ok(Some(Answered {
        hello,
        answer,
        reason,
        binding,
        key,
    }))
}

/// What the joining backup's handshake got.
pub(super) enum Asked {
    /// The primary's authenticated answer, and the binding of a transfer's session.
    Reply(Reply, Vec<u8>),
    /// The connection broke before an answer: ask again.
    Retry(String),
}

/// The joining backup's half of the handshake: reads the primary's challenge, says
/// hello with its MAC, and returns the answer if the primary proved the key too. A
/// refusal is reported as an error whether or not it is authenticated (it only stops
/// the join).
pub(super) fn ask(
    key: &ChannelKey,
    w: &mut impl Write,
    r: &mut impl BufRead,
    node: &str,
    epoch: u64,
    config_hash: u64,
) -> Result<Asked, String> {
    let challenge: Challenge = match read_line(r).map(|l| serde_json::from_str(&l)) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(format!(
                "the primary's join greeting is malformed ({e}): run the same ft version on both hosts"
            ));
        }
        Err(e) => return Ok(Asked::Retry(e.to_string())),
    };
    if challenge.version != JOIN_VERSION {
        return Err(format!(
            "the primary speaks join protocol version {}, this node {JOIN_VERSION}: run the same ft version on both hosts",
            challenge.version
        ));
    }
    let mut hello = Hello {
        version: JOIN_VERSION,
        node: node.into(),
        epoch,
        config_hash,
        nonce: new_nonce(),
        mac: String::new(),
    };
    hello.mac = hello.compute_mac(key, &challenge.nonce);
    // A connection that breaks is asked again (the live node's daemon may just restart).
    if let Err(e) = send_line(w, &hello) {
        return Ok(Asked::Retry(format!("join hello: {e}")));
    }
    let reply: Reply = match read_line(r).map(|l| serde_json::from_str(&l)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("the primary's join answer is malformed: {e}")),
        Err(e) => return Ok(Asked::Retry(e.to_string())),
    };
    if !reply.mac_valid(key, &hello.nonce, &challenge.nonce) {
        // Nothing an unauthenticated answer says is believed, a refusal neither (a host
        // on the link must not be able to stop a joiner for good): asked again, and the
        // reason shown (a node with another key_file refuses this way every time).
        return Ok(Asked::Retry(format!(
            "the live node's answer is not authenticated ({:?}: {}): it does not hold this \
             node's channel key (both hosts need the same [channel] key_file); not taking \
             state from it",
            reply.answer, reply.reason
        )));
    }
    if reply.answer == Answer::Refused {
        return Err(format!("the primary refused the join: {}", reply.reason));
    }
    let binding = binding(&challenge.nonce, &hello.nonce);
    Ok(Asked::Reply(reply, binding))
}

pub(super) fn version_refusal(version: u32) -> (Answer, String) {
    (
        Answer::Refused,
        format!(
            "join protocol version {version} (this primary speaks {JOIN_VERSION}): run the same ft version on both hosts"
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::{io::BufReader, os::unix::net::UnixStream};

    use super::*;

    fn key(b: u8) -> ChannelKey {
        ChannelKey::from_bytes([b; 16])
    }

    /// What the primary's handshake got: the authenticated hello and answer, None when
    /// refused as unauthenticated, or the bad request.
    type Served = Result<Option<(Hello, Answer, String, u64)>, String>;

    /// Runs the primary's handshake on one end of a socket pair (answering `transfer`)
    /// and `client` on the other; returns what both got.
    fn handshake<T: Send + 'static>(
        primary_key: ChannelKey,
        client: impl FnOnce(&mut UnixStream, &mut BufReader<UnixStream>) -> T + Send + 'static,
    ) -> (Served, T) {
        let (a, b) = UnixStream::pair().unwrap();
        let c = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = BufReader::new(b);
            client(&mut w, &mut r)
        });
        let mut w = a.try_clone().unwrap();
        let mut r = BufReader::new(a);
        let served = serve_handshake(&[primary_key], 0x5e55, &mut w, &mut r, |h| {
            assert_eq!(h.node, "host-b");
            (Answer::Transfer, String::new())
        })
        .map(|a| a.map(|a| (a.hello, a.answer, a.reason, a.binding.len() as u64)))
        .map_err(|BadRequest(e)| e);
        drop((w, r));
        (served, c.join().unwrap())
    }

    fn ask_as(
        k: ChannelKey,
    ) -> impl FnOnce(&mut UnixStream, &mut BufReader<UnixStream>) -> Result<Asked, String> {
        move |w, r| ask(&k, w, r, "host-b", 7, 0x1234)
    }

    #[test]
    fn a_backup_with_the_key_is_answered_and_checks_the_answer() {
        let (served, asked) = handshake(key(1), ask_as(key(1)));
        let (hello, answer, _, binding_len) = served.unwrap().expect("authenticated");
        assert_eq!((hello.epoch, hello.config_hash), (7, 0x1234));
        assert_eq!(answer, Answer::Transfer);
        match asked.unwrap() {
            Asked::Reply(r, binding) => {
                assert_eq!((r.answer, r.session), (Answer::Transfer, 0x5e55));
                assert_eq!(binding.len() as u64, binding_len);
            }
            Asked::Retry(e) => panic!("retry: {e}"),
        }
    }

    #[test]
    fn a_hello_without_the_key_is_refused_before_anything_is_decided() {
        // Another key.
        let (served, asked) = handshake(key(1), ask_as(key(2)));
        assert!(served.unwrap().is_none(), "refused as unauthenticated");
        // The joiner cannot verify that refusal (the keys differ): it asks again, and
        // says why.
        match asked {
            Ok(Asked::Retry(e)) => assert!(
                e.contains("not authenticated") && e.contains("key_file"),
                "{e}"
            ),
            other => panic!("{:?}", other.map(|_| "an answer")),
        }
        // No MAC at all (the version-1 hello of an intruder, with this version).
        let (served, reply) = handshake(key(1), |w, r| {
            let _challenge = read_line(r).unwrap();
            w.write_all(b"{\"version\":3,\"node\":\"host-b\",\"epoch\":7,\"config_hash\":4660}\n")
                .unwrap();
            read_line(r).unwrap()
        });
        assert!(served.unwrap().is_none());
        assert!(
            reply.contains("refused") && reply.contains("not authenticated"),
            "{reply}"
        );
        // A MAC made for another challenge (a replayed hello).
        let (served, _) = handshake(key(1), |w, r| {
            let _challenge = read_line(r).unwrap();
            let mut h = Hello {
                version: JOIN_VERSION,
                node: "host-b".into(),
                epoch: 7,
                config_hash: 0x1234,
                nonce: new_nonce(),
                mac: String::new(),
            };
            h.mac = h.compute_mac(&key(1), "an earlier challenge");
            send_line(w, &h).unwrap();
            read_line(r)
        });
        assert!(served.unwrap().is_none(), "a replayed hello is refused");
    }

    #[test]
    fn an_old_version_is_refused_by_name_and_garbage_is_a_bad_request() {
        let (served, reply) = handshake(key(1), |w, r| {
            let _challenge = read_line(r).unwrap();
            w.write_all(b"{\"version\":1,\"node\":\"x\",\"epoch\":7,\"config_hash\":1}\n")
                .unwrap();
            read_line(r).unwrap()
        });
        let (_, answer, reason, _) = served.unwrap().expect("answered");
        assert_eq!(answer, Answer::Refused);
        assert!(reason.contains("join protocol version 1"), "{reason}");
        assert!(reply.contains("join protocol version 1"), "{reply}");
        let (served, _) = handshake(key(1), |w, r| {
            let _challenge = read_line(r).unwrap();
            w.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        });
        assert!(served.unwrap_err().contains("not a join hello"));
    }

    #[test]
    fn a_reply_with_another_session_or_answer_does_not_verify() {
        let signed = || {
            Reply {
                answer: Answer::FollowFromBoot,
                reason: "from boot".into(),
                session: 0x5e55,
                mac: String::new(),
            }
            .sign(&key(1), "hello-nonce", "challenge")
        };
        assert!(signed().mac_valid(&key(1), "hello-nonce", "challenge"));
        let mut r = signed();
        r.session = 0x0bad;
        assert!(!r.mac_valid(&key(1), "hello-nonce", "challenge"));
        let mut r = signed();
        r.answer = Answer::Transfer;
        assert!(!r.mac_valid(&key(1), "hello-nonce", "challenge"));
        assert!(!signed().mac_valid(&key(1), "hello-nonce", "another challenge"));
    }

    #[test]
    fn a_joiner_takes_no_state_from_a_primary_without_the_key() {
        // A fake primary: answers `transfer` with a MAC under another key.
        let (a, b) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            let mut w = a.try_clone().unwrap();
            let mut r = BufReader::new(a);
            let challenge = new_nonce();
            send_line(
                &mut w,
                &Challenge {
                    version: JOIN_VERSION,
                    nonce: challenge.clone(),
                },
            )
            .unwrap();
            let hello: Hello = serde_json::from_str(&read_line(&mut r).unwrap()).unwrap();
            let reply = Reply {
                answer: Answer::Transfer,
                reason: String::new(),
                session: 1,
                mac: String::new(),
            }
            .sign(&key(9), &hello.nonce, &challenge);
            send_line(&mut w, &reply).unwrap();
        });
        let mut w = b.try_clone().unwrap();
        let mut r = BufReader::new(b);
        match ask(&key(1), &mut w, &mut r, "host-b", 7, 1) {
            Ok(Asked::Retry(e)) => assert!(e.contains("not authenticated"), "{e}"),
            other => panic!(
                "took an unauthenticated transfer: {:?}",
                other.map(|_| "an answer")
            ),
        }
        fake.join().unwrap();
    }
}
