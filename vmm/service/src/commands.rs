//! The command table (names, arity, flags, key positions, documentation) and the
//! handlers. Replies and error texts follow Redis 7.0 exactly; the tests compare them
//! with a real redis-server.
use crate::client::CloseReason;
use crate::num::{parse_i64, push_i64};
use crate::server::{Argv, Ctx, ERR_NOT_INT, ERR_SYNTAX, Server};
use alloc::vec::Vec;

/// Command flags (a subset of Redis's, as reported by COMMAND INFO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags(u16);

impl Flags {
    pub const WRITE: Flags = Flags(1);
    pub const READONLY: Flags = Flags(2);
    pub const DENYOOM: Flags = Flags(4);
    pub const ADMIN: Flags = Flags(8);
    pub const NOSCRIPT: Flags = Flags(16);
    pub const LOADING: Flags = Flags(32);
    pub const STALE: Flags = Flags(64);
    pub const FAST: Flags = Flags(128);
    pub const NO_AUTH: Flags = Flags(256);
    pub const ALLOW_BUSY: Flags = Flags(512);
    pub const NONE: Flags = Flags(0);

    pub const fn or(self, o: Flags) -> Flags {
        Flags(self.0 | o.0)
    }
    pub fn contains(self, o: Flags) -> bool {
        self.0 & o.0 == o.0
    }
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        const N: [&str; 10] = [
            "write",
            "readonly",
            "denyoom",
            "admin",
            "noscript",
            "loading",
            "stale",
            "fast",
            "no_auth",
            "allow_busy",
        ];
        (0..N.len())
            .filter(move |i| self.0 & (1 << i) != 0)
            .map(|i| N[i])
    }
}

pub type Handler = fn(&mut Server, &Argv, &mut Ctx);

pub struct Command {
    /// Lower case, as COMMAND reports it.
    pub name: &'static str,
    /// `container|sub` for subcommands (used in arity errors).
    pub full_name: &'static str,
    /// Exact argument count including the name if positive, minimum if negative.
    pub arity: i32,
    pub flags: Flags,
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    pub acl: &'static [&'static str],
    pub group: &'static str,
    pub since: &'static str,
    pub summary: &'static str,
    pub complexity: &'static str,
    /// None for a container that needs a subcommand.
    pub handler: Option<Handler>,
    pub subcommands: &'static [Command],
    /// Command tips (COMMAND INFO).
    pub tips: &'static [&'static str],
    /// One key specification: notes, flags, and the range's last key and step (COMMAND
    /// INFO; the begin index is `first_key`).
    pub key_spec: Option<KeySpec>,
}

#[derive(Clone, Copy)]
pub struct KeySpec {
    pub notes: Option<&'static str>,
    pub flags: &'static [&'static str],
    pub last_key: i32,
    pub key_step: i32,
}

impl Command {
    const fn tips(mut self, t: &'static [&'static str]) -> Command {
        self.tips = t;
        self
    }
    const fn spec(
        mut self,
        flags: &'static [&'static str],
        last_key: i32,
        key_step: i32,
    ) -> Command {
        self.key_spec = Some(KeySpec {
            notes: None,
            flags,
            last_key,
            key_step,
        });
        self
    }
    const fn note(mut self, n: &'static str) -> Command {
        if let Some(k) = self.key_spec.as_mut() {
            k.notes = Some(n);
        }
        self
    }
}

const W: Flags = Flags::WRITE;
const R: Flags = Flags::READONLY;
const F: Flags = Flags::FAST;
const DOOM: Flags = Flags::DENYOOM;
const LS: Flags = Flags::LOADING.or(Flags::STALE);

#[allow(clippy::too_many_arguments)]
const fn cmd(
    name: &'static str,
    full_name: &'static str,
    arity: i32,
    flags: Flags,
    keys: (i32, i32, i32),
    acl: &'static [&'static str],
    group: &'static str,
    since: &'static str,
    summary: &'static str,
    complexity: &'static str,
    handler: Option<Handler>,
    subcommands: &'static [Command],
) -> Command {
    Command {
        name,
        full_name,
        arity,
        flags,
        first_key: keys.0,
        last_key: keys.1,
        step: keys.2,
        acl,
        group,
        since,
        summary,
        complexity,
        handler,
        subcommands,
        tips: &[],
        key_spec: None,
    }
}

const NOKEY: (i32, i32, i32) = (0, 0, 0);
const KEY1: (i32, i32, i32) = (1, 1, 1);
const O1: &str = "O(1)";

pub static COMMANDS: &[Command] = &[
    cmd("get", "get", 2, R.or(F), KEY1, &["@read", "@string", "@fast"], "string", "1.0.0", "Returns the string value of a key.", O1, Some(get), &[]).spec(&["RO", "access"], 0, 1),
    cmd("set", "set", -3, W.or(DOOM), KEY1, &["@write", "@string", "@slow"], "string", "1.0.0", "Sets the string value of a key, ignoring its type. The key is created if it doesn't exist.", O1, Some(set), &[]).spec(&["RW", "access", "update", "variable_flags"], 0, 1).note("RW and ACCESS due to the optional `GET` argument"),
    cmd("setnx", "setnx", 3, W.or(DOOM).or(F), KEY1, &["@write", "@string", "@fast"], "string", "1.0.0", "Set the string value of a key only when the key doesn't exist.", O1, Some(setnx), &[]).spec(&["OW", "insert"], 0, 1),
    cmd("setex", "setex", 4, W.or(DOOM), KEY1, &["@write", "@string", "@slow"], "string", "2.0.0", "Sets the string value and expiration time of a key. Creates the key if it doesn't exist.", O1, Some(setex), &[]).spec(&["OW", "update"], 0, 1),
    cmd("psetex", "psetex", 4, W.or(DOOM), KEY1, &["@write", "@string", "@slow"], "string", "2.6.0", "Sets both string value and expiration time in milliseconds of a key. The key is created if it doesn't exist.", O1, Some(psetex), &[]).spec(&["OW", "update"], 0, 1),
    cmd("getdel", "getdel", 2, W.or(F), KEY1, &["@write", "@string", "@fast"], "string", "6.2.0", "Returns the string value of a key after deleting the key.", O1, Some(getdel), &[]).spec(&["RW", "access", "delete"], 0, 1),
    cmd("mget", "mget", -2, R.or(F), (1, -1, 1), &["@read", "@string", "@fast"], "string", "1.0.0", "Atomically returns the string values of one or more keys.", "O(N) where N is the number of keys to retrieve.", Some(mget), &[]).tips(&["request_policy:multi_shard"]).spec(&["RO", "access"], -1, 1),
    cmd("mset", "mset", -3, W.or(DOOM), (1, -1, 2), &["@write", "@string", "@slow"], "string", "1.0.1", "Atomically creates or modifies the string values of one or more keys.", "O(N) where N is the number of keys to set.", Some(mset), &[]).tips(&["request_policy:multi_shard", "response_policy:all_succeeded"]).spec(&["OW", "update"], -1, 2),
    cmd("incr", "incr", 2, W.or(DOOM).or(F), KEY1, &["@write", "@string", "@fast"], "string", "1.0.0", "Increments the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.", O1, Some(incr), &[]).spec(&["RW", "access", "update"], 0, 1),
    cmd("decr", "decr", 2, W.or(DOOM).or(F), KEY1, &["@write", "@string", "@fast"], "string", "1.0.0", "Decrements the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.", O1, Some(decr), &[]).spec(&["RW", "access", "update"], 0, 1),
    cmd("incrby", "incrby", 3, W.or(DOOM).or(F), KEY1, &["@write", "@string", "@fast"], "string", "1.0.0", "Increments the integer value of a key by a number. Uses 0 as initial value if the key doesn't exist.", O1, Some(incrby), &[]).spec(&["RW", "access", "update"], 0, 1),
    cmd("decrby", "decrby", 3, W.or(DOOM).or(F), KEY1, &["@write", "@string", "@fast"], "string", "1.0.0", "Decrements a number from the integer value of a key. Uses 0 as initial value if the key doesn't exist.", O1, Some(decrby), &[]).spec(&["RW", "access", "update"], 0, 1),
    cmd("append", "append", 3, W.or(DOOM).or(F), KEY1, &["@write", "@string", "@fast"], "string", "2.0.0", "Appends a string to the value of a key. Creates the key if it doesn't exist.", O1, Some(append), &[]).spec(&["RW", "insert"], 0, 1),
    cmd("strlen", "strlen", 2, R.or(F), KEY1, &["@read", "@string", "@fast"], "string", "2.2.0", "Returns the length of a string value.", O1, Some(strlen), &[]).spec(&["RO"], 0, 1),
    cmd("del", "del", -2, W, (1, -1, 1), &["@keyspace", "@write", "@slow"], "generic", "1.0.0", "Deletes one or more keys.", "O(N) where N is the number of keys that will be removed.", Some(del), &[]).tips(&["request_policy:multi_shard", "response_policy:agg_sum"]).spec(&["RM", "delete"], -1, 1),
    cmd("unlink", "unlink", -2, W.or(F), (1, -1, 1), &["@keyspace", "@write", "@fast"], "generic", "4.0.0", "Asynchronously deletes one or more keys.", "O(1) for each key removed regardless of its size.", Some(del), &[]).tips(&["request_policy:multi_shard", "response_policy:agg_sum"]).spec(&["RM", "delete"], -1, 1),
    cmd("exists", "exists", -2, R.or(F), (1, -1, 1), &["@keyspace", "@read", "@fast"], "generic", "1.0.0", "Determines whether one or more keys exist.", "O(N) where N is the number of keys to check.", Some(exists), &[]).tips(&["request_policy:multi_shard", "response_policy:agg_sum"]).spec(&["RO"], -1, 1),
    cmd("type", "type", 2, R.or(F), KEY1, &["@keyspace", "@read", "@fast"], "generic", "1.0.0", "Determines the type of value stored at a key.", O1, Some(type_), &[]).spec(&["RO"], 0, 1),
    cmd("keys", "keys", 2, R, NOKEY, &["@keyspace", "@read", "@slow", "@dangerous"], "generic", "1.0.0", "Returns all key names that match a pattern.", "O(N) with N being the number of keys in the database.", Some(keys), &[]).tips(&["request_policy:all_shards", "nondeterministic_output_order"]),
    cmd("expire", "expire", -3, W.or(F), KEY1, &["@keyspace", "@write", "@fast"], "generic", "1.0.0", "Sets the expiration time of a key in seconds.", O1, Some(expire), &[]).spec(&["RW", "update"], 0, 1),
    cmd("pexpire", "pexpire", -3, W.or(F), KEY1, &["@keyspace", "@write", "@fast"], "generic", "2.6.0", "Sets the expiration time of a key in milliseconds.", O1, Some(pexpire), &[]).spec(&["RW", "update"], 0, 1),
    cmd("ttl", "ttl", 2, R.or(F), KEY1, &["@keyspace", "@read", "@fast"], "generic", "1.0.0", "Returns the expiration time in seconds of a key.", O1, Some(ttl), &[]).tips(&["nondeterministic_output"]).spec(&["RO", "access"], 0, 1),
    cmd("pttl", "pttl", 2, R.or(F), KEY1, &["@keyspace", "@read", "@fast"], "generic", "2.6.0", "Returns the expiration time in milliseconds of a key.", O1, Some(pttl), &[]).tips(&["nondeterministic_output"]).spec(&["RO", "access"], 0, 1),
    cmd("persist", "persist", 2, W.or(F), KEY1, &["@keyspace", "@write", "@fast"], "generic", "2.2.0", "Removes the expiration time of a key.", O1, Some(persist), &[]).spec(&["RW", "update"], 0, 1),
    cmd("dbsize", "dbsize", 1, R.or(F), NOKEY, &["@keyspace", "@read", "@fast"], "server", "1.0.0", "Returns the number of keys in the database.", O1, Some(dbsize), &[]).tips(&["request_policy:all_shards", "response_policy:agg_sum"]),
    cmd("flushall", "flushall", -1, W, NOKEY, &["@keyspace", "@write", "@slow", "@dangerous"], "server", "1.0.0", "Removes all keys from all databases.", "O(N) where N is the total number of keys in all databases", Some(flush), &[]).tips(&["request_policy:all_shards", "response_policy:all_succeeded"]),
    cmd("flushdb", "flushdb", -1, W, NOKEY, &["@keyspace", "@write", "@slow", "@dangerous"], "server", "1.0.0", "Remove all keys from the current database.", "O(N) where N is the number of keys in the selected database", Some(flush), &[]).tips(&["request_policy:all_shards", "response_policy:all_succeeded"]),
    cmd("select", "select", 2, LS.or(F), NOKEY, &["@fast", "@connection"], "connection", "1.0.0", "Changes the selected database.", O1, Some(select), &[]),
    cmd("ping", "ping", -1, F, NOKEY, &["@fast", "@connection"], "connection", "1.0.0", "Returns the server's liveliness response.", O1, Some(ping), &[]).tips(&["request_policy:all_shards", "response_policy:all_succeeded"]),
    cmd("echo", "echo", 2, LS.or(F), NOKEY, &["@fast", "@connection"], "connection", "1.0.0", "Returns the given string.", O1, Some(echo), &[]),
    cmd("quit", "quit", -1, Flags::NOSCRIPT.or(LS).or(F).or(Flags::NO_AUTH).or(Flags::ALLOW_BUSY), NOKEY, &["@fast", "@connection"], "connection", "1.0.0", "Closes the connection.", O1, Some(quit), &[]),
    cmd("info", "info", -1, LS, NOKEY, &["@slow", "@dangerous"], "server", "1.0.0", "Returns information and statistics about the server.", O1, Some(crate::info::info), &[]).tips(&["nondeterministic_output", "request_policy:all_shards", "response_policy:special"]),
    cmd("config", "config", -2, Flags::NONE, NOKEY, &["@slow"], "server", "2.0.0", "A container for server configuration commands.", "Depends on subcommand.", None, CONFIG_SUB),
    cmd("command", "command", -1, LS, NOKEY, &["@slow", "@connection"], "server", "2.8.13", "Returns detailed information about all commands.", "O(N) where N is the total number of Redis commands", Some(crate::info::command), COMMAND_SUB).tips(&["nondeterministic_output_order"]),
    cmd("client", "client", -2, Flags::NONE, NOKEY, &["@slow"], "connection", "2.4.0", "A container for client connection commands.", "Depends on subcommand.", None, CLIENT_SUB),
];

const ADM: Flags = Flags::ADMIN.or(Flags::NOSCRIPT).or(LS);

static CONFIG_SUB: &[Command] = &[
    cmd(
        "get",
        "config|get",
        -3,
        ADM,
        NOKEY,
        &["@admin", "@slow", "@dangerous"],
        "server",
        "2.0.0",
        "Returns the effective values of configuration parameters.",
        "O(N) when N is the number of configuration parameters provided",
        Some(crate::info::config_get),
        &[],
    ),
    cmd(
        "set",
        "config|set",
        -4,
        ADM,
        NOKEY,
        &["@admin", "@slow", "@dangerous"],
        "server",
        "2.0.0",
        "Sets configuration parameters in-flight.",
        "O(N) when N is the number of configuration parameters provided",
        Some(config_set),
        &[],
    )
    .tips(&["request_policy:all_nodes", "response_policy:all_succeeded"]),
    cmd(
        "resetstat",
        "config|resetstat",
        2,
        ADM,
        NOKEY,
        &["@admin", "@slow", "@dangerous"],
        "server",
        "2.0.0",
        "Resets the server's statistics.",
        O1,
        Some(config_resetstat),
        &[],
    ),
    cmd(
        "help",
        "config|help",
        2,
        LS,
        NOKEY,
        &["@slow"],
        "server",
        "5.0.0",
        "Returns helpful text about the different subcommands.",
        O1,
        Some(crate::info::help),
        &[],
    ),
];

static COMMAND_SUB: &[Command] = &[
    cmd(
        "count",
        "command|count",
        2,
        LS,
        NOKEY,
        &["@slow", "@connection"],
        "server",
        "2.8.13",
        "Returns a count of commands.",
        O1,
        Some(crate::info::command_count),
        &[],
    ),
    cmd(
        "docs",
        "command|docs",
        -2,
        LS,
        NOKEY,
        &["@slow", "@connection"],
        "server",
        "7.0.0",
        "Returns documentary information about one, multiple or all commands.",
        "O(N) where N is the number of commands to look up",
        Some(crate::info::command_docs),
        &[],
    )
    .tips(&["nondeterministic_output_order"]),
    cmd(
        "info",
        "command|info",
        -2,
        LS,
        NOKEY,
        &["@slow", "@connection"],
        "server",
        "2.8.13",
        "Returns information about one, multiple or all commands.",
        "O(N) where N is the number of commands to look up",
        Some(crate::info::command_info),
        &[],
    )
    .tips(&["nondeterministic_output_order"]),
    cmd(
        "list",
        "command|list",
        -2,
        LS,
        NOKEY,
        &["@slow", "@connection"],
        "server",
        "7.0.0",
        "Returns a list of command names.",
        "O(N) where N is the total number of Redis commands",
        Some(crate::info::command_list),
        &[],
    )
    .tips(&["nondeterministic_output_order"]),
    cmd(
        "help",
        "command|help",
        2,
        LS,
        NOKEY,
        &["@slow", "@connection"],
        "server",
        "5.0.0",
        "Returns helpful text about the different subcommands.",
        O1,
        Some(crate::info::help),
        &[],
    ),
];

static CLIENT_SUB: &[Command] = &[
    cmd(
        "id",
        "client|id",
        2,
        Flags::NOSCRIPT.or(LS),
        NOKEY,
        &["@slow", "@connection"],
        "connection",
        "5.0.0",
        "Returns the unique client ID of the connection.",
        O1,
        Some(client_id),
        &[],
    ),
    cmd(
        "getname",
        "client|getname",
        2,
        Flags::NOSCRIPT.or(LS),
        NOKEY,
        &["@slow", "@connection"],
        "connection",
        "2.6.9",
        "Returns the name of the connection.",
        O1,
        Some(client_getname),
        &[],
    ),
    cmd(
        "setname",
        "client|setname",
        3,
        Flags::NOSCRIPT.or(LS),
        NOKEY,
        &["@slow", "@connection"],
        "connection",
        "2.6.9",
        "Sets the connection name.",
        O1,
        Some(client_setname),
        &[],
    ),
    cmd(
        "help",
        "client|help",
        2,
        LS,
        NOKEY,
        &["@slow", "@connection"],
        "connection",
        "5.0.0",
        "Returns helpful text about the different subcommands.",
        O1,
        Some(crate::info::help),
        &[],
    ),
];

/// Case-insensitive lookup of a top-level command.
pub fn lookup(name: &[u8]) -> Option<&'static Command> {
    lookup_in(COMMANDS, name)
}

pub fn lookup_in(table: &'static [Command], name: &[u8]) -> Option<&'static Command> {
    table
        .iter()
        .find(|c| c.name.as_bytes().eq_ignore_ascii_case(name))
}

// ------------------------------------------------------------------ strings

fn get(s: &mut Server, a: &Argv, c: &mut Ctx) {
    match s.keys.get(a.get(1), c.now_ms) {
        Some(e) => {
            s.stats.keyspace_hits += 1;
            crate::resp::bulk(c.out, &e.value);
        }
        None => {
            s.stats.keyspace_misses += 1;
            c.nil();
        }
    }
}

/// Parses an expire argument as Redis's `getExpireMillisecondsOrReply` does and returns
/// the absolute device-clock deadline in ms.
fn expire_at(c: &mut Ctx, arg: &[u8], seconds: bool, cmd: &str) -> Option<u64> {
    let Some(v) = parse_i64(arg) else {
        c.err(ERR_NOT_INT);
        return None;
    };
    let ms = if seconds {
        v.checked_mul(1000)
    } else {
        Some(v)
    };
    let at = match ms {
        Some(ms) if ms > 0 => ms.checked_add(c.now_ms as i64).filter(|t| *t > 0),
        _ => None,
    };
    match at {
        Some(t) => Some(t as u64),
        None => {
            invalid_expire(c, cmd);
            None
        }
    }
}

fn invalid_expire(c: &mut Ctx, cmd: &str) {
    let mut m = Vec::from(&b"ERR invalid expire time in '"[..]);
    m.extend_from_slice(cmd.as_bytes());
    m.extend_from_slice(b"' command");
    c.err(&m);
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

fn set(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let (mut nx, mut xx, mut get, mut keepttl) = (false, false, false, false);
    let mut expire: Option<(&[u8], bool)> = None;
    let mut j = 3;
    while j < a.len() {
        let opt = a.get(j);
        let next = (j + 1 < a.len()).then(|| a.get(j + 1));
        let (ex, px) = (
            matches!(expire, Some((_, true))),
            matches!(expire, Some((_, false))),
        );
        if eq(opt, "nx") && !xx {
            nx = true;
        } else if eq(opt, "xx") && !nx {
            xx = true;
        } else if eq(opt, "get") {
            get = true;
        } else if eq(opt, "keepttl") && expire.is_none() {
            keepttl = true;
        } else if eq(opt, "ex")
            && !keepttl
            && !px
            && let Some(n) = next
        {
            expire = Some((n, true));
            j += 1;
        } else if eq(opt, "px")
            && !keepttl
            && !ex
            && let Some(n) = next
        {
            expire = Some((n, false));
            j += 1;
        } else if (eq(opt, "exat") || eq(opt, "pxat"))
            && !keepttl
            && expire.is_none()
            && next.is_some()
        {
            c.err(b"ERR EXAT and PXAT need wall-clock time, which this service does not have; use EX or PX");
            return;
        } else {
            c.err(ERR_SYNTAX);
            return;
        }
        j += 1;
    }
    let at = match expire {
        Some((arg, secs)) => match expire_at(c, arg, secs, "set") {
            Some(t) => Some(t),
            None => return,
        },
        None => None,
    };
    set_generic(s, c, a.get(1), a.get(2), at, nx, xx, get, keepttl);
}

#[allow(clippy::too_many_arguments)]
fn set_generic(
    s: &mut Server,
    c: &mut Ctx,
    key: &[u8],
    val: &[u8],
    at: Option<u64>,
    nx: bool,
    xx: bool,
    get: bool,
    keepttl: bool,
) {
    let old = s.keys.get(key, c.now_ms);
    let found = old.is_some();
    if get {
        match old {
            Some(e) => crate::resp::bulk(c.out, &e.value),
            None => c.nil(),
        }
    }
    if (nx && found) || (xx && !found) {
        if !get {
            c.nil();
        }
        return;
    }
    let mut v = Vec::new();
    if v.try_reserve_exact(val.len()).is_err() {
        c.err(crate::server::ERR_OOM);
        return;
    }
    v.extend_from_slice(val);
    s.keys.set(key, v, keepttl, c.now_ms);
    if let Some(t) = at {
        s.keys.set_expire(key, t);
    }
    if !get {
        c.ok();
    }
}

fn setnx(s: &mut Server, a: &Argv, c: &mut Ctx) {
    if s.keys.contains(a.get(1), c.now_ms) {
        c.int(0);
    } else {
        s.keys.set(a.get(1), a.get(2).to_vec(), false, c.now_ms);
        c.int(1);
    }
}

fn setex(s: &mut Server, a: &Argv, c: &mut Ctx) {
    if let Some(t) = expire_at(c, a.get(2), true, "setex") {
        set_generic(
            s,
            c,
            a.get(1),
            a.get(3),
            Some(t),
            false,
            false,
            false,
            false,
        );
    }
}

fn psetex(s: &mut Server, a: &Argv, c: &mut Ctx) {
    if let Some(t) = expire_at(c, a.get(2), false, "psetex") {
        set_generic(
            s,
            c,
            a.get(1),
            a.get(3),
            Some(t),
            false,
            false,
            false,
            false,
        );
    }
}

fn getdel(s: &mut Server, a: &Argv, c: &mut Ctx) {
    get(s, a, c);
    s.keys.delete(a.get(1), c.now_ms);
}

fn mget(s: &mut Server, a: &Argv, c: &mut Ctx) {
    c.array(a.len() - 1);
    for k in a.iter().skip(1) {
        match s.keys.get(k, c.now_ms) {
            Some(e) => {
                s.stats.keyspace_hits += 1;
                crate::resp::bulk(c.out, &e.value);
            }
            None => {
                s.stats.keyspace_misses += 1;
                c.nil();
            }
        }
    }
}

fn mset(s: &mut Server, a: &Argv, c: &mut Ctx) {
    if a.len().is_multiple_of(2) {
        c.err(b"ERR wrong number of arguments for 'mset' command");
        return;
    }
    for i in (1..a.len()).step_by(2) {
        s.keys.set(a.get(i), a.get(i + 1).to_vec(), false, c.now_ms);
    }
    c.ok();
}

fn incr_by(s: &mut Server, c: &mut Ctx, key: &[u8], by: i64) {
    let now = c.now_ms;
    let cur = match s.keys.get(key, now) {
        None => 0,
        Some(e) => match parse_i64(&e.value) {
            Some(v) => v,
            None => {
                c.err(ERR_NOT_INT);
                return;
            }
        },
    };
    let Some(v) = cur.checked_add(by) else {
        c.err(b"ERR increment or decrement would overflow");
        return;
    };
    let mut digits = Vec::with_capacity(20);
    push_i64(&mut digits, v);
    match s.keys.get_mut(key, now) {
        Some(e) => {
            let old = e.value.capacity();
            e.value = digits;
            let new = e.value.capacity();
            s.keys.value_resized(old, new);
        }
        None => {
            s.keys.set(key, digits, false, now);
        }
    }
    c.int(v);
}

fn incr(s: &mut Server, a: &Argv, c: &mut Ctx) {
    incr_by(s, c, a.get(1), 1)
}

fn decr(s: &mut Server, a: &Argv, c: &mut Ctx) {
    incr_by(s, c, a.get(1), -1)
}

fn incrby(s: &mut Server, a: &Argv, c: &mut Ctx) {
    match parse_i64(a.get(2)) {
        Some(by) => incr_by(s, c, a.get(1), by),
        None => c.err(ERR_NOT_INT),
    }
}

fn decrby(s: &mut Server, a: &Argv, c: &mut Ctx) {
    match parse_i64(a.get(2)) {
        Some(i64::MIN) => c.err(b"ERR decrement would overflow"),
        Some(by) => incr_by(s, c, a.get(1), -by),
        None => c.err(ERR_NOT_INT),
    }
}

fn append(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let (key, add) = (a.get(1), a.get(2));
    let max = s.limits.proto_max_bulk_len;
    let now = c.now_ms;
    let Some(e) = s.keys.get_mut(key, now) else {
        s.keys.set(key, add.to_vec(), false, now);
        c.int(add.len() as i64);
        return;
    };
    if e.value.len() + add.len() > max {
        c.err(b"ERR string exceeds maximum allowed size (proto-max-bulk-len)");
        return;
    }
    let old = e.value.capacity();
    if e.value.try_reserve(add.len()).is_err() {
        c.err(crate::server::ERR_OOM);
        return;
    }
    e.value.extend_from_slice(add);
    let (len, new) = (e.value.len(), e.value.capacity());
    s.keys.value_resized(old, new);
    c.int(len as i64);
}

fn strlen(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let n = s.keys.get(a.get(1), c.now_ms).map_or(0, |e| e.value.len());
    c.int(n as i64);
}

// ------------------------------------------------------------------ keyspace

fn del(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let n = a
        .iter()
        .skip(1)
        .filter(|k| s.keys.delete(k, c.now_ms))
        .count();
    c.int(n as i64);
}

fn exists(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let n = a
        .iter()
        .skip(1)
        .filter(|k| s.keys.contains(k, c.now_ms))
        .count();
    c.int(n as i64);
}

fn type_(s: &mut Server, a: &Argv, c: &mut Ctx) {
    if s.keys.contains(a.get(1), c.now_ms) {
        c.simple(b"string");
    } else {
        c.simple(b"none");
    }
}

fn keys(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let mut body = Vec::new();
    let mut n = 0;
    s.keys.keys(a.get(1), c.now_ms, |k| {
        n += 1;
        crate::resp::bulk(&mut body, k);
    });
    c.array(n);
    c.out.extend_from_slice(&body);
}

fn expire_generic(s: &mut Server, a: &Argv, c: &mut Ctx, seconds: bool) {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in a.iter().skip(3) {
        if eq(opt, "nx") {
            nx = true;
        } else if eq(opt, "xx") {
            xx = true;
        } else if eq(opt, "gt") {
            gt = true;
        } else if eq(opt, "lt") {
            lt = true;
        } else {
            let mut m = Vec::from(&b"ERR Unsupported option "[..]);
            m.extend_from_slice(opt);
            c.err(&m);
            return;
        }
    }
    if nx && (xx || gt || lt) {
        c.err(b"ERR NX and XX, GT or LT options at the same time are not compatible");
        return;
    }
    if gt && lt {
        c.err(b"ERR GT and LT options at the same time are not compatible");
        return;
    }
    let name = if seconds { "expire" } else { "pexpire" };
    let Some(v) = parse_i64(a.get(2)) else {
        c.err(ERR_NOT_INT);
        return;
    };
    let when = if seconds {
        if !(i64::MIN / 1000..=i64::MAX / 1000).contains(&v) {
            invalid_expire(c, name);
            return;
        }
        v * 1000
    } else {
        v
    };
    let Some(when) = when.checked_add(c.now_ms as i64) else {
        invalid_expire(c, name);
        return;
    };
    let key = a.get(1);
    let Some(e) = s.keys.get(key, c.now_ms) else {
        c.int(0);
        return;
    };
    let cur = if e.expire_ms == 0 {
        -1
    } else {
        e.expire_ms as i64
    };
    if (nx && cur != -1)
        || (xx && cur == -1)
        || (gt && (when <= cur || cur == -1))
        || (lt && cur != -1 && when >= cur)
    {
        c.int(0);
        return;
    }
    if when <= c.now_ms as i64 {
        s.keys.delete(key, c.now_ms);
    } else {
        s.keys.set_expire(key, when as u64);
    }
    c.int(1);
}

fn expire(s: &mut Server, a: &Argv, c: &mut Ctx) {
    expire_generic(s, a, c, true)
}

fn pexpire(s: &mut Server, a: &Argv, c: &mut Ctx) {
    expire_generic(s, a, c, false)
}

fn ttl_generic(s: &mut Server, a: &Argv, c: &mut Ctx, ms: bool) {
    let now = c.now_ms;
    match s.keys.get(a.get(1), now) {
        None => c.int(-2),
        Some(e) if e.expire_ms == 0 => c.int(-1),
        Some(e) => {
            let t = e.expire_ms.saturating_sub(now) as i64;
            c.int(if ms { t } else { (t + 500) / 1000 });
        }
    }
}

fn ttl(s: &mut Server, a: &Argv, c: &mut Ctx) {
    ttl_generic(s, a, c, false)
}

fn pttl(s: &mut Server, a: &Argv, c: &mut Ctx) {
    ttl_generic(s, a, c, true)
}

fn persist(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let r = s.keys.persist(a.get(1), c.now_ms);
    c.int(r as i64);
}

fn dbsize(s: &mut Server, _a: &Argv, c: &mut Ctx) {
    c.int(s.keys.len() as i64);
}

fn flush(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let ok = a.len() == 1 || (a.len() == 2 && (eq(a.get(1), "sync") || eq(a.get(1), "async")));
    if !ok {
        c.err(ERR_SYNTAX);
        return;
    }
    s.keys.flush();
    c.ok();
}

// ------------------------------------------------------------------ connection

fn select(_s: &mut Server, a: &Argv, c: &mut Ctx) {
    match parse_i64(a.get(1)) {
        None => c.err(ERR_NOT_INT),
        Some(v) if v < i32::MIN as i64 || v > i32::MAX as i64 => {
            c.err(b"ERR value is out of range, value must between -2147483648 and 2147483647")
        }
        Some(0) => c.ok(),
        Some(_) => c.err(b"ERR DB index is out of range"),
    }
}

fn ping(_s: &mut Server, a: &Argv, c: &mut Ctx) {
    match a.len() {
        1 => c.simple(b"PONG"),
        2 => c.bulk(a.get(1)),
        _ => c.err(b"ERR wrong number of arguments for 'ping' command"),
    }
}

fn echo(_s: &mut Server, a: &Argv, c: &mut Ctx) {
    c.bulk(a.get(1));
}

fn quit(_s: &mut Server, _a: &Argv, c: &mut Ctx) {
    c.ok();
    *c.close = Some(CloseReason::AfterReply);
}

fn config_set(_s: &mut Server, _a: &Argv, c: &mut Ctx) {
    c.err(b"ERR CONFIG SET is not supported: settings come from the appliance configuration (ftd), the same on both replicas");
}

fn config_resetstat(s: &mut Server, _a: &Argv, c: &mut Ctx) {
    s.stats = Default::default();
    s.keys.expired_keys = 0;
    s.max_input_buffer = 0;
    s.max_output_buffer = 0;
    c.ok();
}

fn client_id(_s: &mut Server, _a: &Argv, c: &mut Ctx) {
    c.int(c.id as i64);
}

fn client_getname(_s: &mut Server, _a: &Argv, c: &mut Ctx) {
    match c.name.clone() {
        Some(n) => c.bulk(&n),
        None => c.nil(),
    }
}

fn client_setname(_s: &mut Server, a: &Argv, c: &mut Ctx) {
    let n = a.get(2);
    if n.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        c.err(b"ERR Client names cannot contain spaces, newlines or special characters.");
        return;
    }
    *c.name = (!n.is_empty()).then(|| n.into());
    c.ok();
}
