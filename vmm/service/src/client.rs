//! Per-connection state: query buffer and parser, pending output, name and timestamps.
use crate::limits::{Limits, OUTPUT_SOFT_LIMIT};
use crate::resp::Parser;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Why a client must be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// QUIT, a protocol error, or a rejection: close once the pending output is sent.
    AfterReply,
    /// The query buffer filled without a complete command.
    QueryBufferLimit,
    /// The output of one command exceeded the output hard limit.
    OutputLimit,
}

pub struct Client {
    pub id: u64,
    pub addr: [u8; 4],
    pub port: u16,
    pub(crate) query: Vec<u8>,
    /// Start of the unprocessed part of `query`.
    pub(crate) qpos: usize,
    pub(crate) parser: Parser,
    pub(crate) out: Vec<u8>,
    /// Start of the unsent part of `out`.
    pub(crate) opos: usize,
    pub(crate) name: Option<Box<[u8]>>,
    pub created_ms: u64,
    /// Last time a command was received (device clock, ms).
    pub last_interaction_ms: u64,
    pub close: Option<CloseReason>,
    /// Memory of this client as last accounted in the server's total.
    pub(crate) accounted: usize,
    pub(crate) last_cmd: &'static str,
}

impl Client {
    pub fn new(id: u64, addr: [u8; 4], port: u16, now_ms: u64) -> Client {
        Client {
            id,
            addr,
            port,
            query: Vec::new(),
            qpos: 0,
            parser: Parser::default(),
            out: Vec::new(),
            opos: 0,
            name: None,
            created_ms: now_ms,
            last_interaction_ms: now_ms,
            close: None,
            accounted: 0,
            last_cmd: "NULL",
        }
    }

    /// Unprocessed query bytes.
    pub fn query_len(&self) -> usize {
        self.query.len() - self.qpos
    }

    /// Unsent output bytes.
    pub fn output_len(&self) -> usize {
        self.out.len() - self.opos
    }

    /// How many more request bytes this client may hand in now: none while it must close
    /// or while its unsent output is over the soft limit (back-pressure), otherwise up to
    /// the query buffer limit.
    pub fn input_room(&self, l: &Limits) -> usize {
        if self.close.is_some() || self.output_len() > OUTPUT_SOFT_LIMIT {
            return 0;
        }
        l.query_buffer_limit.saturating_sub(self.query_len())
    }

    /// Appends received bytes (at most [`Client::input_room`]).
    pub fn feed(&mut self, data: &[u8]) {
        self.query.extend_from_slice(data);
    }

    pub fn pending_output(&self) -> &[u8] {
        &self.out[self.opos..]
    }

    /// Marks `n` output bytes as sent.
    pub fn output_sent(&mut self, n: usize) {
        self.opos += n;
        if self.opos == self.out.len() {
            self.out.clear();
            self.opos = 0;
            if self.out.capacity() > 4 * OUTPUT_SOFT_LIMIT {
                self.out = Vec::new();
            }
        } else if self.opos > self.out.len() / 2 && self.opos > 4096 {
            self.out.drain(..self.opos);
            self.opos = 0;
        }
    }

    /// Queues an error reply and closes after it (e.g. too many clients).
    pub fn reject(&mut self, msg: &[u8]) {
        crate::resp::error(&mut self.out, msg);
        self.close = Some(CloseReason::AfterReply);
    }

    /// This client's memory as last counted in [`crate::Server::clients_memory`].
    pub fn accounted_memory(&self) -> usize {
        self.accounted
    }

    /// Bytes of heap this client holds in its buffers.
    pub fn memory(&self) -> usize {
        self.query.capacity()
            + self.out.capacity()
            + self.parser.spans.capacity() * 8
            + self.parser.inline.capacity()
    }

    pub(crate) fn compact_query(&mut self) {
        if self.qpos == self.query.len() {
            self.query.clear();
            self.qpos = 0;
            if self.query.capacity() > 64 * 1024 {
                self.query = Vec::new();
            }
        } else if self.qpos > 0 && (self.qpos > self.query.len() / 2 || self.qpos > 64 * 1024) {
            self.query.drain(..self.qpos);
            self.qpos = 0;
        }
    }
}
