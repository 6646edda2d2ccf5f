//! The control socket's protocol (`api.control_socket`): one request per connection.
//!
//! The client writes one JSON line, an [`Envelope`] (`{"v":1,"request":"status"}`), and
//! reads one JSON document back, a [`Response`], until the daemon closes the connection.
//! Pure types and parsing: the daemon's side is [`super::serve`], the client's
//! [`super::client`].
//!
//! Versioned so that an `ftd` of another build answers with a clear error instead of a
//! misunderstanding: a daemon answers requests of [`CONTROL_VERSION`] and of every
//! version it still knows (today only this one), and [`Response::Error`] otherwise.
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The control protocol's version.
pub const CONTROL_VERSION: u32 = 1;

/// The longest request line the daemon reads (a request is a few dozen bytes).
pub const MAX_REQUEST: usize = 4096;

/// What a client asks of the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The node's whole status ([`super::status_json`]).
    Status,
    /// Planned switchover, on the paired primary: hand the VM to the in-sync backup
    /// (graceful stop), then start again as its backup.
    Switchover,
    /// Maintenance of this host: it leaves the pair without the VM losing anything and
    /// its daemon stops (exit status 0: a service manager does not restart it). A paired
    /// primary first hands the VM over (as a switchover); a backup just leaves. Refused
    /// where it would stop the VM (a node that runs it alone).
    Standby,
    /// What the arbiter records for this pair's VM: owner, epoch, lease (asked of the
    /// arbiter now, with the daemon's credentials; bounded by 2 s).
    Arbiter,
}

/// A request on the wire: the protocol version beside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

impl Envelope {
    pub fn new(request: Request) -> Self {
        Self {
            v: CONTROL_VERSION,
            request,
        }
    }
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Response {
    Status {
        status: Value,
    },
    Arbiter {
        arbiter: Value,
    },
    /// The daemon does what was asked (a switchover: it follows in the status).
    Accepted {
        what: String,
    },
    /// The daemon will not do it now, and says why.
    Refused {
        why: String,
    },
    /// The request was not understood (malformed, or of another protocol version).
    Error {
        error: String,
    },
}

/// Why a request line is refused before it reaches the daemon's state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request is not a control request ({0}); use the ftd command of this build")]
    Malformed(String),
    #[error(
        "control protocol version {0}, this daemon speaks version {CONTROL_VERSION}: use the ftd command that came with this daemon"
    )]
    Version(u32),
    #[error("the request is longer than {MAX_REQUEST} bytes")]
    TooLong,
}

/// Parses one request line (without its newline).
pub fn parse(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    // The version first, so that a request of a newer protocol is told that, not that
    // it is malformed.
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let v = serde_json::from_slice::<Version>(line)
        .map_err(|e| RequestError::Malformed(e.to_string()))?
        .v;
    if v != CONTROL_VERSION {
        return Err(RequestError::Version(v));
    }
    serde_json::from_slice::<Envelope>(line)
        .map(|e| e.request)
        .map_err(|e| RequestError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Status,
            Request::Switchover,
            Request::Standby,
            Request::Arbiter,
        ] {
            let line = serde_json::to_vec(&Envelope::new(r.clone())).unwrap();
            assert_eq!(parse(&line), Ok(r));
        }
        assert_eq!(
            serde_json::to_string(&Envelope::new(Request::Status)).unwrap(),
            r#"{"v":1,"request":"status"}"#
        );
    }

    #[test]
    fn bad_requests_get_a_reason() {
        assert!(matches!(parse(b""), Err(RequestError::Malformed(_))));
        assert!(matches!(parse(b"status"), Err(RequestError::Malformed(_))));
        assert!(matches!(
            parse(br#"{"v":1,"request":"reboot"}"#),
            Err(RequestError::Malformed(_))
        ));
        assert_eq!(
            parse(br#"{"v":2,"request":"status"}"#),
            Err(RequestError::Version(2))
        );
        assert_eq!(parse(&[b' '; MAX_REQUEST + 1]), Err(RequestError::TooLong));
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            Response::Status {
                status: serde_json::json!({"role": "primary"}),
            },
            Response::Accepted { what: "x".into() },
            Response::Refused { why: "y".into() },
            Response::Error { error: "z".into() },
        ] {
            let s = serde_json::to_vec(&r).unwrap();
            assert_eq!(serde_json::from_slice::<Response>(&s).unwrap(), r);
        }
    }
}
