//! Wire protocol of the embedded arbiter: frames of `u32` big-endian length + JSON body.
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Protocol version carried in every request and reply (`v`).
pub const PROTO_VERSION: u32 = 1;
/// Largest frame body accepted by either side (bytes). Larger lengths are rejected
/// before anything is read or allocated.
pub const MAX_FRAME: usize = 4096;

/// One request. `id` must increase per node for state-changing ops (see lib docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    pub id: u64,
    pub node: String,
    pub vm: String,
    pub op: Op,
    /// With a shared secret: HMAC-SHA256 (hex) of this request encoded without `mac`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Op {
    TestAndSet {
        expected_epoch: u64,
        lease_ms: u64,
    },
    Renew {
        epoch: u64,
        lease_ms: u64,
    },
    Release {
        epoch: u64,
    },
    /// The owner at `epoch` names its paired follower (see `Arbiter::pair`).
    Pair {
        epoch: u64,
        follower: String,
    },
    Read,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub v: u32,
    /// Id of the request answered (0 if the request could not be parsed).
    pub id: u64,
    pub reply: Reply,
    /// With a shared secret: HMAC-SHA256 (hex) of this response encoded without `mac`
    /// (it names the request's id, so an old reply cannot answer a new request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Reply {
    Won {
        epoch: u64,
        lease_ms: u64,
    },
    Held {
        owner: String,
        epoch: u64,
        remaining_ms: u64,
    },
    Stale {
        owner: Option<String>,
        epoch: u64,
    },
    Renewed {
        epoch: u64,
        lease_ms: u64,
    },
    Fenced {
        owner: Option<String>,
        epoch: u64,
    },
    Released {
        epoch: u64,
    },
    Paired {
        epoch: u64,
        follower: String,
    },
    State {
        owner: Option<String>,
        epoch: u64,
        remaining_ms: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Frame length 0 or above [`MAX_FRAME`]; the connection is closed after the reply.
    FrameTooLarge,
    /// Body is not a valid request (bad JSON, unknown op or field); connection closed.
    BadRequest,
    UnsupportedVersion,
    /// Invalid vm/node name or lease length.
    InvalidArgument,
    /// Request id not above the last one seen from this node (replay or reordering).
    /// `message` holds the last id seen, so an honest client can resynchronise.
    StaleRequestId,
    /// The arbiter could not persist the change; nothing changed.
    Storage,
    /// The request carries no valid MAC of the arbiter's shared secret; connection closed.
    Unauthenticated,
    /// Too many VMs or nodes known.
    Capacity,
}

/// Frame I/O errors.
#[derive(Debug)]
pub enum FrameError {
    Io(std::io::Error),
    /// Length prefix 0 or above [`MAX_FRAME`] (value given).
    BadLength(u32),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Reads one frame body. Rejects bad lengths before reading the body.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let len = r.read_u32().await?;
    if len == 0 || len as usize > MAX_FRAME {
        return Err(FrameError::BadLength(len));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one frame (length prefix + body) and flushes.
pub async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    if body.is_empty() || body.len() > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("frame of {} bytes (max {MAX_FRAME})", body.len()),
        ));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    w.write_all(&out).await?;
    w.flush().await
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("protocol types always serialize")
}

/// A message that can carry a MAC of the shared secret (requests and responses).
pub trait Signed: Serialize + Clone {
    fn mac_mut(&mut self) -> &mut Option<String>;

    /// HMAC-SHA256 of the message encoded without its MAC.
    fn compute_mac(&self, key: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut bare = self.clone();
        *bare.mac_mut() = None;
        let mut m = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key)
            .expect("HMAC takes keys of any length");
        m.update(&encode(&bare));
        m
    }

    /// Sets the MAC for `key`.
    fn sign(&mut self, key: &[u8]) {
        use hmac::Mac;
        let tag = self.compute_mac(key).finalize().into_bytes();
        *self.mac_mut() = Some(tag.iter().map(|b| format!("{b:02x}")).collect());
    }

    /// True if the message carries a valid MAC for `key` (compared in constant time).
    fn verify(&mut self, key: &[u8]) -> bool {
        use hmac::Mac;
        let Some(hex) = self.mac_mut().clone() else {
            return false;
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        let tag: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        self.compute_mac(key).verify_slice(&tag).is_ok()
    }
}

impl Signed for Request {
    fn mac_mut(&mut self) -> &mut Option<String> {
        &mut self.mac
    }
}

impl Signed for Response {
    fn mac_mut(&mut self) -> &mut Option<String> {
        &mut self.mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_strictness() {
        let r = Request {
            v: 1,
            id: 7,
            node: "a".into(),
            vm: "vm".into(),
            op: Op::TestAndSet {
                expected_epoch: 0,
                lease_ms: 3000,
            },
            mac: None,
        };
        let b = encode(&r);
        assert_eq!(serde_json::from_slice::<Request>(&b).unwrap(), r);
        let unknown = br#"{"v":1,"id":1,"node":"a","vm":"b","op":"read","x":1}"#;
        assert!(serde_json::from_slice::<Request>(unknown).is_err());
        let bad_op = br#"{"v":1,"id":1,"node":"a","vm":"b","op":"format_disk"}"#;
        assert!(serde_json::from_slice::<Request>(bad_op).is_err());
        let ok = br#"{"v":1,"id":1,"node":"a","vm":"b","op":"read"}"#;
        assert!(serde_json::from_slice::<Request>(ok).is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any bytes on the wire: a frame within the limits (whose body then parses as a
        /// request or is an error), or an error; never a panic, never an allocation past
        /// the limit.
        #[test]
        fn any_bytes_are_a_bounded_frame_or_an_error(
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut r = &b[..];
            if let Ok(body) = rt.block_on(read_frame(&mut r)) {
                proptest::prop_assert!(!body.is_empty() && body.len() <= MAX_FRAME);
                let _ = serde_json::from_slice::<Request>(&body);
            }
        }

        /// A valid request with bytes flipped parses as some request or is rejected.
        #[test]
        fn mutated_requests_parse_or_are_rejected(
            flips in proptest::collection::vec((0usize..200, proptest::prelude::any::<u8>()), 1..6),
        ) {
            let mut b = encode(&Request {
                v: 1,
                id: 9,
                node: "host-a".into(),
                vm: "vm1".into(),
                op: Op::TestAndSet { expected_epoch: 4, lease_ms: 2000 },
                mac: None,
            });
            for (at, v) in flips {
                let at = at % b.len();
                b[at] ^= v;
            }
            if let Ok(r) = serde_json::from_slice::<Request>(&b) {
                // Whatever parsed is a well-formed request again.
                proptest::prop_assert_eq!(serde_json::from_slice::<Request>(&encode(&r)).unwrap(), r);
            }
        }
    }

    #[test]
    fn macs_bind_the_whole_message_and_the_key() {
        let key = b"0123456789abcdef-secret";
        let mut r = Request {
            v: 1,
            id: 7,
            node: "a".into(),
            vm: "vm".into(),
            op: Op::Read,
            mac: None,
        };
        assert!(!r.clone().verify(key), "unsigned");
        r.sign(key);
        assert!(r.clone().verify(key));
        assert!(!r.clone().verify(b"another secret, same length"));
        let mut changed = r.clone();
        changed.id = 8;
        assert!(!changed.verify(key), "a changed id keeps no valid MAC");
        let mut changed = r.clone();
        changed.op = Op::Release { epoch: 1 };
        assert!(!changed.verify(key));
        let mut garbled = r.clone();
        garbled.mac = Some("zz".repeat(32));
        assert!(!garbled.verify(key));
        // Through the wire and back.
        let mut back: Request = serde_json::from_slice(&encode(&r)).unwrap();
        assert!(back.verify(key));
    }

    #[tokio::test]
    async fn frame_limits() {
        let mut big = Vec::new();
        big.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        let mut r = &big[..];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(FrameError::BadLength(_))
        ));
        let mut trunc = Vec::new();
        trunc.extend_from_slice(&10u32.to_be_bytes());
        trunc.extend_from_slice(b"abc");
        let mut r = &trunc[..];
        assert!(matches!(read_frame(&mut r).await, Err(FrameError::Io(_))));
    }
}
