//! The service: runs clients' commands against the keyspace, with Redis 7.0's replies,
//! errors, arity checks and out-of-memory refusals.
use crate::client::{Client, CloseReason};
use crate::commands::{self, Flags};
use crate::limits::Limits;
use crate::resp::{self, ArgSource, Parsed};
use crate::store::Keyspace;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// The arguments of one command.
#[derive(Clone, Copy)]
pub struct Argv<'a> {
    base: &'a [u8],
    spans: &'a [(u32, u32)],
}

impl<'a> Argv<'a> {
    pub fn new(base: &'a [u8], spans: &'a [(u32, u32)]) -> Argv<'a> {
        Argv { base, spans }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn get(&self, i: usize) -> &'a [u8] {
        let (o, l) = self.spans[i];
        &self.base[o as usize..(o + l) as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Total argument bytes (what a write may add to memory).
    pub fn bytes(&self) -> usize {
        self.spans.iter().map(|&(_, l)| l as usize).sum()
    }
}

/// Counters reported by INFO.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub total_connections_received: u64,
    pub total_commands_processed: u64,
    pub rejected_connections: u64,
    pub evicted_clients: u64,
    pub client_qbuf_limit_disconnections: u64,
    pub client_output_limit_disconnections: u64,
    pub keyspace_hits: u64,
    pub keyspace_misses: u64,
    pub total_error_replies: u64,
    pub total_net_input_bytes: u64,
    pub total_net_output_bytes: u64,
    pub oom_rejections: u64,
}

/// What the host environment (the guest kernel) knows about memory.
pub trait MemInfo {
    /// Bytes currently allocated from the heap.
    fn used(&self) -> usize;
}

/// Per-command context.
pub struct Ctx<'a> {
    pub out: &'a mut Vec<u8>,
    pub now_ms: u64,
    pub id: u64,
    pub name: &'a mut Option<Box<[u8]>>,
    pub close: &'a mut Option<CloseReason>,
    pub mem: &'a dyn MemInfo,
}

impl Ctx<'_> {
    pub fn ok(&mut self) {
        self.out.extend_from_slice(b"+OK\r\n");
    }
    pub fn int(&mut self, v: i64) {
        resp::int(self.out, v)
    }
    pub fn bulk(&mut self, v: &[u8]) {
        resp::bulk(self.out, v)
    }
    pub fn nil(&mut self) {
        resp::nil(self.out)
    }
    pub fn array(&mut self, n: usize) {
        resp::array(self.out, n)
    }
    pub fn simple(&mut self, s: &[u8]) {
        resp::simple(self.out, s)
    }
    /// An error reply; `msg` starts with the error code (`ERR ...`).
    pub fn err(&mut self, msg: &[u8]) {
        resp::error(self.out, msg)
    }
}

/// Shared error texts.
pub const ERR_NOT_INT: &[u8] = b"ERR value is not an integer or out of range";
pub const ERR_SYNTAX: &[u8] = b"ERR syntax error";
pub const ERR_OOM: &[u8] = b"OOM command not allowed when used memory > 'maxmemory'.";

pub struct Server {
    pub limits: Limits,
    pub keys: Keyspace,
    pub stats: Stats,
    pub port: u16,
    /// 40 hex characters, from the entropy device at boot (logged, so identical on both
    /// replicas).
    pub run_id: [u8; 40],
    pub boot_ms: u64,
    pub connected_clients: usize,
    /// TCP sockets in the network stack (listening, connected and closing).
    pub sockets: usize,
    /// Bytes held by all clients' query and output buffers.
    pub clients_memory: usize,
    pub max_input_buffer: usize,
    pub max_output_buffer: usize,
    pub used_memory_peak: usize,
    /// (time ms, commands processed) samples for `instantaneous_ops_per_sec`.
    ops_samples: [(u64, u64); 16],
    ops_idx: usize,
}

impl Server {
    pub fn new(limits: Limits, port: u16, seed: u64, boot_ms: u64) -> Server {
        let mut run_id = [0u8; 40];
        let mut x = seed | 1;
        for c in run_id.iter_mut() {
            // xorshift64*: only for the id's digits.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let d = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 60) as u8;
            *c = b"0123456789abcdef"[d as usize];
        }
        Server {
            limits,
            keys: Keyspace::default(),
            stats: Stats::default(),
            port,
            run_id,
            boot_ms,
            connected_clients: 0,
            sockets: 0,
            clients_memory: 0,
            max_input_buffer: 0,
            max_output_buffer: 0,
            used_memory_peak: 0,
            ops_samples: [(boot_ms, 0); 16],
            ops_idx: 0,
        }
    }

    /// Runs the complete commands in `c`'s query buffer, until one is incomplete, the
    /// client must close, or its unsent output is over the soft limit. Returns whether
    /// anything was consumed.
    pub fn process(&mut self, c: &mut Client, now_ms: u64, mem: &dyn MemInfo) -> bool {
        if c.query_len() == 0 {
            return false;
        }
        let start = c.qpos;
        while c.close.is_none()
            && c.query_len() > 0
            && c.output_len() <= crate::limits::OUTPUT_SOFT_LIMIT
        {
            let unparsed = &c.query[c.qpos..];
            match c.parser.parse(unparsed, self.limits.proto_max_bulk_len) {
                Ok(Parsed::Incomplete) => {
                    if c.query_len() >= self.limits.query_buffer_limit {
                        c.close = Some(CloseReason::QueryBufferLimit);
                        self.stats.client_qbuf_limit_disconnections += 1;
                    }
                    break;
                }
                Ok(Parsed::Empty(n)) => {
                    c.qpos += n;
                    c.parser.reset();
                }
                Ok(Parsed::Command { len, src }) => {
                    let base: &[u8] = match src {
                        ArgSource::Query => &c.query[c.qpos..c.qpos + len],
                        ArgSource::Inline => &c.parser.inline,
                    };
                    let argv = Argv::new(base, &c.parser.spans);
                    c.last_interaction_ms = now_ms;
                    let mut ctx = Ctx {
                        out: &mut c.out,
                        now_ms,
                        id: c.id,
                        name: &mut c.name,
                        close: &mut c.close,
                        mem,
                    };
                    c.last_cmd = self.call(&argv, &mut ctx);
                    c.qpos += len;
                    c.parser.reset();
                    if c.output_len() > self.limits.output_hard_limit {
                        c.close = Some(CloseReason::OutputLimit);
                        self.stats.client_output_limit_disconnections += 1;
                    }
                }
                Err(e) => {
                    let mut msg = Vec::new();
                    e.message(&mut msg);
                    resp::error(&mut c.out, &msg);
                    self.stats.total_error_replies += 1;
                    c.close = Some(CloseReason::AfterReply);
                    c.qpos = c.query.len();
                    c.parser.reset();
                }
            }
        }
        let progressed = c.qpos != start;
        c.compact_query();
        self.account(c);
        progressed
    }

    /// Updates the total of client buffer memory after `c` changed.
    pub fn account(&mut self, c: &mut Client) {
        let m = c.memory();
        self.clients_memory = self.clients_memory + m - c.accounted;
        c.accounted = m;
        self.max_input_buffer = self.max_input_buffer.max(c.query.capacity());
        self.max_output_buffer = self.max_output_buffer.max(c.out.capacity());
    }

    /// Forgets a client that is gone.
    pub fn client_closed(&mut self, c: &Client) {
        self.clients_memory -= c.accounted;
        self.connected_clients -= 1;
    }

    pub fn client_opened(&mut self) {
        self.connected_clients += 1;
        self.stats.total_connections_received += 1;
    }

    /// Looks up, checks and runs one command. Returns its name (for CLIENT INFO).
    fn call(&mut self, argv: &Argv, ctx: &mut Ctx) -> &'static str {
        self.stats.total_commands_processed += 1;
        let before = ctx.out.len();
        let name = argv.get(0);
        let Some(cmd) = commands::lookup(name) else {
            unknown_command(argv, ctx);
            self.stats.total_error_replies += 1;
            return "NULL";
        };
        let cmd = match (cmd.subcommands.is_empty(), argv.len()) {
            (false, n) if n >= 2 => match commands::lookup_in(cmd.subcommands, argv.get(1)) {
                Some(sub) => sub,
                None => {
                    let mut m = Vec::from(&b"ERR unknown subcommand '"[..]);
                    m.extend(argv.get(1).iter().take(128));
                    m.extend_from_slice(b"'. Try ");
                    m.extend(cmd.name.bytes().map(|b| b.to_ascii_uppercase()));
                    m.extend_from_slice(b" HELP.");
                    ctx.err(&m);
                    self.stats.total_error_replies += 1;
                    return cmd.name;
                }
            },
            _ => cmd,
        };
        let n = argv.len() as i32;
        if (cmd.arity > 0 && n != cmd.arity) || n < -cmd.arity || cmd.handler.is_none() {
            let mut m = Vec::from(&b"ERR wrong number of arguments for '"[..]);
            m.extend_from_slice(cmd.full_name.as_bytes());
            m.extend_from_slice(b"' command");
            ctx.err(&m);
            self.stats.total_error_replies += 1;
            return cmd.name;
        }
        if cmd.flags.contains(Flags::DENYOOM) {
            let used = ctx.mem.used();
            self.used_memory_peak = self.used_memory_peak.max(used);
            if (used + argv.bytes()) as u64 > self.limits.maxmemory {
                ctx.err(ERR_OOM);
                self.stats.oom_rejections += 1;
                self.stats.total_error_replies += 1;
                return cmd.name;
            }
        }
        (cmd.handler.expect("checked"))(self, argv, ctx);
        if ctx.out.get(before) == Some(&b'-') {
            self.stats.total_error_replies += 1;
        }
        cmd.name
    }

    /// Housekeeping between requests: active expiry and lazy freeing, bounded per call.
    /// Returns true if more work is due right away.
    pub fn background(&mut self, now_ms: u64) -> bool {
        const EXPIRE_BUDGET: usize = 256;
        const FREE_BUDGET: usize = 1024;
        let more_expire = self.keys.active_expire(now_ms, EXPIRE_BUDGET) == EXPIRE_BUDGET;
        let more_free = self.keys.lazy_free(FREE_BUDGET);
        more_expire || more_free
    }

    /// Once per tick: samples the command rate.
    pub fn cron(&mut self, now_ms: u64, mem: &dyn MemInfo) {
        self.ops_idx = (self.ops_idx + 1) % self.ops_samples.len();
        self.ops_samples[self.ops_idx] = (now_ms, self.stats.total_commands_processed);
        self.used_memory_peak = self.used_memory_peak.max(mem.used());
    }

    pub fn ops_per_sec(&self) -> u64 {
        let newest = self.ops_samples[self.ops_idx];
        let oldest = self.ops_samples[(self.ops_idx + 1) % self.ops_samples.len()];
        let dt = newest.0.saturating_sub(oldest.0);
        if dt == 0 {
            return 0;
        }
        (newest.1 - oldest.1) * 1000 / dt
    }
}

/// `ERR unknown command 'x', with args beginning with: 'a' 'b' ` (Redis 7.0's text,
/// including the truncation at 128 bytes and at a NUL byte, as C's `%.128s` does).
fn unknown_command(argv: &Argv, ctx: &mut Ctx) {
    fn cstr(b: &[u8], max: usize) -> &[u8] {
        let b = &b[..b.len().min(max)];
        match b.iter().position(|&c| c == 0) {
            Some(z) => &b[..z],
            None => b,
        }
    }
    let mut m = Vec::from(&b"ERR unknown command '"[..]);
    m.extend_from_slice(cstr(argv.get(0), 128));
    m.extend_from_slice(b"', with args beginning with: ");
    let mut args = Vec::new();
    for a in argv.iter().skip(1) {
        if args.len() >= 128 {
            break;
        }
        let room = 128 - args.len();
        args.push(b'\'');
        args.extend_from_slice(cstr(a, room));
        args.extend_from_slice(b"' ");
    }
    m.extend_from_slice(&args);
    ctx.err(&m);
}
