//! Introspection: INFO, CONFIG GET, COMMAND (COUNT, DOCS, INFO, LIST) and HELP texts.
use crate::commands::{COMMANDS, Command, lookup};
use crate::num::{push_human, push_u64};
use crate::resp;
use crate::server::{Argv, Ctx, Server};
use alloc::vec::Vec;

/// Version reported to clients: the Redis release whose behaviour the service follows.
pub const REDIS_VERSION: &str = "7.0.15";

fn line(out: &mut Vec<u8>, k: &str, v: &[u8]) {
    out.extend_from_slice(k.as_bytes());
    out.push(b':');
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
}

fn num(out: &mut Vec<u8>, k: &str, v: u64) {
    out.extend_from_slice(k.as_bytes());
    out.push(b':');
    push_u64(out, v);
    out.extend_from_slice(b"\r\n");
}

fn human(out: &mut Vec<u8>, k: &str, v: u64) {
    out.extend_from_slice(k.as_bytes());
    out.push(b':');
    push_human(out, v);
    out.extend_from_slice(b"\r\n");
}

const SECTIONS: [&str; 6] = [
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "keyspace",
];

fn section(s: &Server, c: &Ctx, name: &str, out: &mut Vec<u8>) {
    let now = c.now_ms;
    match name {
        "server" => {
            out.extend_from_slice(b"# Server\r\n");
            line(out, "redis_version", REDIS_VERSION.as_bytes());
            line(out, "redis_mode", b"standalone");
            line(out, "os", b"ft-guest (KVM, ring 3, fault-tolerant VM)");
            num(out, "arch_bits", 64);
            line(out, "multiplexing_api", b"smoltcp");
            num(out, "process_id", 1);
            line(out, "run_id", &s.run_id);
            num(out, "tcp_port", s.port as u64);
            let up = now.saturating_sub(s.boot_ms) / 1000;
            num(out, "uptime_in_seconds", up);
            num(out, "uptime_in_days", up / 86400);
            num(out, "hz", s.limits.hz as u64);
            line(out, "executable", b"/ft-guest");
            line(out, "config_file", b"");
        }
        "clients" => {
            out.extend_from_slice(b"# Clients\r\n");
            num(out, "connected_clients", s.connected_clients as u64);
            num(out, "cluster_connections", 0);
            num(out, "maxclients", s.limits.maxclients as u64);
            num(
                out,
                "client_recent_max_input_buffer",
                s.max_input_buffer as u64,
            );
            num(
                out,
                "client_recent_max_output_buffer",
                s.max_output_buffer as u64,
            );
            num(out, "blocked_clients", 0);
            num(out, "tracking_clients", 0);
            num(out, "clients_in_timeout_table", 0);
            num(out, "tcp_sockets", s.sockets as u64);
        }
        "memory" => {
            out.extend_from_slice(b"# Memory\r\n");
            let used = c.mem.used() as u64;
            num(out, "used_memory", used);
            human(out, "used_memory_human", used);
            let peak = (s.used_memory_peak as u64).max(used);
            num(out, "used_memory_peak", peak);
            human(out, "used_memory_peak_human", peak);
            num(out, "used_memory_dataset", s.keys.dataset_bytes() as u64);
            num(out, "total_system_memory", s.limits.ram_bytes);
            human(out, "total_system_memory_human", s.limits.ram_bytes);
            num(out, "maxmemory", s.limits.maxmemory);
            human(out, "maxmemory_human", s.limits.maxmemory);
            line(out, "maxmemory_policy", b"noeviction");
            num(out, "maxmemory_clients", s.limits.maxmemory_clients);
            num(out, "mem_clients_normal", s.clients_memory as u64);
            num(out, "heap_size", s.limits.heap_bytes);
            line(out, "mem_allocator", b"talc");
            num(
                out,
                "lazyfree_pending_objects",
                s.keys.lazyfree_pending() as u64,
            );
        }
        "persistence" => {
            out.extend_from_slice(b"# Persistence\r\n");
            num(out, "loading", 0);
            num(out, "rdb_changes_since_last_save", 0);
            line(out, "aof_enabled", b"0");
            line(
                out,
                "ft_replication",
                b"inputs replicated to a backup VM (record/replay); no disk persistence",
            );
        }
        "stats" => {
            let st = &s.stats;
            out.extend_from_slice(b"# Stats\r\n");
            num(
                out,
                "total_connections_received",
                st.total_connections_received,
            );
            num(out, "total_commands_processed", st.total_commands_processed);
            num(out, "instantaneous_ops_per_sec", s.ops_per_sec());
            num(out, "total_net_input_bytes", st.total_net_input_bytes);
            num(out, "total_net_output_bytes", st.total_net_output_bytes);
            num(out, "rejected_connections", st.rejected_connections);
            num(out, "expired_keys", s.keys.expired_keys);
            num(out, "evicted_keys", 0);
            num(out, "evicted_clients", st.evicted_clients);
            num(out, "keyspace_hits", st.keyspace_hits);
            num(out, "keyspace_misses", st.keyspace_misses);
            num(out, "total_error_replies", st.total_error_replies);
            num(out, "oom_rejected_commands", st.oom_rejections);
            num(
                out,
                "client_query_buffer_limit_disconnections",
                st.client_qbuf_limit_disconnections,
            );
            num(
                out,
                "client_output_buffer_limit_disconnections",
                st.client_output_limit_disconnections,
            );
        }
        "keyspace" => {
            out.extend_from_slice(b"# Keyspace\r\n");
            if !s.keys.is_empty() {
                let (sum, n) = s.keys.ttl_sum(now);
                out.extend_from_slice(b"db0:keys=");
                push_u64(out, s.keys.len() as u64);
                out.extend_from_slice(b",expires=");
                push_u64(out, s.keys.expires_len() as u64);
                out.extend_from_slice(b",avg_ttl=");
                push_u64(out, if n == 0 { 0 } else { (sum / n as u128) as u64 });
                out.extend_from_slice(b"\r\n");
            }
        }
        _ => {}
    }
}

pub fn info(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let mut wanted: Vec<&str> = Vec::new();
    if a.len() == 1 {
        wanted.extend(SECTIONS);
    }
    for arg in a.iter().skip(1) {
        if ["all", "everything", "default"]
            .iter()
            .any(|w| arg.eq_ignore_ascii_case(w.as_bytes()))
        {
            wanted = SECTIONS.to_vec();
            break;
        }
        if let Some(name) = SECTIONS
            .iter()
            .find(|n| arg.eq_ignore_ascii_case(n.as_bytes()))
            && !wanted.contains(name)
        {
            wanted.push(name);
        }
    }
    let mut body = Vec::new();
    for name in SECTIONS.iter().filter(|n| wanted.contains(n)) {
        if !body.is_empty() {
            body.extend_from_slice(b"\r\n");
        }
        let mut sec = Vec::new();
        section(s, c, name, &mut sec);
        body.extend_from_slice(&sec);
    }
    c.bulk(&body);
}

// ------------------------------------------------------------------ CONFIG GET

pub fn config_get(s: &mut Server, a: &Argv, c: &mut Ctx) {
    let l = &s.limits;
    let n = |v: u64| {
        let mut b = Vec::new();
        push_u64(&mut b, v);
        b
    };
    let params: [(&str, Vec<u8>); 13] = [
        ("maxmemory", n(l.maxmemory)),
        ("maxclients", n(l.maxclients as u64)),
        ("timeout", n(l.timeout_ms / 1000)),
        ("tcp-keepalive", n(l.keepalive_ms / 1000)),
        ("hz", n(l.hz as u64)),
        ("proto-max-bulk-len", n(l.proto_max_bulk_len as u64)),
        ("client-query-buffer-limit", n(l.query_buffer_limit as u64)),
        ("maxmemory-clients", n(l.maxmemory_clients)),
        ("maxmemory-policy", b"noeviction".to_vec()),
        ("save", Vec::new()),
        ("appendonly", b"no".to_vec()),
        ("databases", b"1".to_vec()),
        ("port", n(s.port as u64)),
    ];
    let mut body = Vec::new();
    let mut count = 0;
    for (name, value) in &params {
        if a.iter()
            .skip(2)
            .any(|p| crate::glob::matches(p, name.as_bytes(), true))
        {
            resp::bulk(&mut body, name.as_bytes());
            resp::bulk(&mut body, value);
            count += 2;
        }
    }
    c.array(count);
    c.out.extend_from_slice(&body);
}

// ------------------------------------------------------------------ COMMAND

fn command_entry(out: &mut Vec<u8>, cmd: &Command) {
    resp::array(out, 10);
    resp::bulk(out, cmd.full_name.as_bytes());
    resp::int(out, cmd.arity as i64);
    let flags: Vec<&str> = cmd.flags.names().collect();
    resp::array(out, flags.len());
    for f in flags {
        resp::simple(out, f.as_bytes());
    }
    resp::int(out, cmd.first_key as i64);
    resp::int(out, cmd.last_key as i64);
    resp::int(out, cmd.step as i64);
    resp::array(out, cmd.acl.len());
    for a in cmd.acl {
        resp::simple(out, a.as_bytes());
    }
    resp::array(out, cmd.tips.len());
    for t in cmd.tips {
        resp::bulk(out, t.as_bytes());
    }
    match &cmd.key_spec {
        None => resp::array(out, 0),
        Some(k) => {
            resp::array(out, 1);
            resp::array(out, if k.notes.is_some() { 8 } else { 6 });
            if let Some(n) = k.notes {
                resp::bulk(out, b"notes");
                resp::bulk(out, n.as_bytes());
            }
            resp::bulk(out, b"flags");
            resp::array(out, k.flags.len());
            for f in k.flags {
                resp::simple(out, f.as_bytes());
            }
            resp::bulk(out, b"begin_search");
            resp::array(out, 4);
            resp::bulk(out, b"type");
            resp::bulk(out, b"index");
            resp::bulk(out, b"spec");
            resp::array(out, 2);
            resp::bulk(out, b"index");
            resp::int(out, cmd.first_key as i64);
            resp::bulk(out, b"find_keys");
            resp::array(out, 4);
            resp::bulk(out, b"type");
            resp::bulk(out, b"range");
            resp::bulk(out, b"spec");
            resp::array(out, 6);
            resp::bulk(out, b"lastkey");
            resp::int(out, k.last_key as i64);
            resp::bulk(out, b"keystep");
            resp::int(out, k.key_step as i64);
            resp::bulk(out, b"limit");
            resp::int(out, 0);
        }
    }
    resp::array(out, cmd.subcommands.len());
    for sub in cmd.subcommands {
        command_entry(out, sub);
    }
}

/// COMMAND: information about every command.
pub fn command(_s: &mut Server, _a: &Argv, c: &mut Ctx) {
    c.array(COMMANDS.len());
    for cmd in COMMANDS {
        command_entry(c.out, cmd);
    }
}

pub fn command_count(_s: &mut Server, _a: &Argv, c: &mut Ctx) {
    c.int(COMMANDS.len() as i64);
}

pub fn command_list(_s: &mut Server, a: &Argv, c: &mut Ctx) {
    if a.len() > 2 {
        c.err(b"ERR syntax error");
        return;
    }
    c.array(COMMANDS.len());
    for cmd in COMMANDS {
        c.bulk(cmd.name.as_bytes());
    }
}

pub fn command_info(_s: &mut Server, a: &Argv, c: &mut Ctx) {
    if a.len() == 2 {
        return command(_s, a, c);
    }
    c.array(a.len() - 2);
    for name in a.iter().skip(2) {
        match lookup(name) {
            Some(cmd) => command_entry(c.out, cmd),
            None => c.nil(),
        }
    }
}

fn docs_entry(out: &mut Vec<u8>, cmd: &Command) {
    resp::bulk(out, cmd.name.as_bytes());
    let subs = !cmd.subcommands.is_empty();
    resp::array(out, if subs { 10 } else { 8 });
    for (k, v) in [
        ("summary", cmd.summary),
        ("since", cmd.since),
        ("group", cmd.group),
        ("complexity", cmd.complexity),
    ] {
        resp::bulk(out, k.as_bytes());
        resp::bulk(out, v.as_bytes());
    }
    if subs {
        resp::bulk(out, b"subcommands");
        resp::array(out, 2 * cmd.subcommands.len());
        for sub in cmd.subcommands {
            let mut full = Vec::new();
            full.extend_from_slice(sub.full_name.as_bytes());
            resp::bulk(out, &full);
            resp::array(out, 8);
            for (k, v) in [
                ("summary", sub.summary),
                ("since", sub.since),
                ("group", sub.group),
                ("complexity", sub.complexity),
            ] {
                resp::bulk(out, k.as_bytes());
                resp::bulk(out, v.as_bytes());
            }
        }
    }
}

/// COMMAND DOCS [name ...]: summary, version, group and complexity (what redis-cli's
/// help and hints use).
pub fn command_docs(_s: &mut Server, a: &Argv, c: &mut Ctx) {
    let mut body = Vec::new();
    let mut n = 0;
    if a.len() == 2 {
        for cmd in COMMANDS {
            docs_entry(&mut body, cmd);
            n += 1;
        }
    } else {
        for name in a.iter().skip(2) {
            if let Some(cmd) = lookup(name) {
                docs_entry(&mut body, cmd);
                n += 1;
            }
        }
    }
    c.array(2 * n);
    c.out.extend_from_slice(&body);
}

/// `<CONTAINER> HELP`.
pub fn help(_s: &mut Server, a: &Argv, c: &mut Ctx) {
    let container = a.get(0);
    let Some(cmd) = lookup(container) else {
        return;
    };
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut head = Vec::new();
    head.extend(container.iter().map(|b| b.to_ascii_uppercase()));
    head.extend_from_slice(b" <subcommand> [<arg> [value] [opt] ...]. Subcommands are:");
    lines.push(head);
    for sub in cmd.subcommands {
        lines.push(sub.name.bytes().map(|b| b.to_ascii_uppercase()).collect());
        let mut d = Vec::from(&b"    "[..]);
        d.extend_from_slice(sub.summary.as_bytes());
        lines.push(d);
    }
    c.array(lines.len());
    for l in lines {
        c.simple(&l);
    }
}
