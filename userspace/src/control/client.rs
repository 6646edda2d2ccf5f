//! The client side of the control socket: `ftd status`, `ftd switchover`.
use std::{
    io::{Read, Write},
    path::Path,
    time::Duration,
};

use serde_json::Value;

use super::protocol::{Envelope, Request, Response};
use super::report::join_line;

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach ftd at {path} ({source}); is the daemon running with this api.control_socket?"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("ftd at {path} did not answer ({source})")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "ftd at {path} answered something that is not a control response ({err}); is it of this build?"
    )]
    Garbled { path: String, err: String },
    #[error("ftd refused the request: {0}")]
    Daemon(String),
}

/// One request, one answer.
pub fn request(path: &Path, req: Request) -> Result<Response, ClientError> {
    let p = || path.display().to_string();
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| ClientError::Connect { path: p(), source })?;
    let io = |source| ClientError::Io { path: p(), source };
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(&Envelope::new(req)).expect("a request serializes");
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(io)?;
    serde_json::from_slice(&buf).map_err(|e| ClientError::Garbled {
        path: p(),
        err: e.to_string(),
    })
}

/// The daemon's status document.
pub fn query(path: &Path) -> Result<Value, ClientError> {
    match request(path, Request::Status)? {
        Response::Status { status } => Ok(status),
        Response::Error { error } => Err(ClientError::Daemon(error)),
        other => Err(ClientError::Garbled {
            path: path.display().to_string(),
            err: format!("{other:?} to a status request"),
        }),
    }
}

/// `ftd status --follow-join`: the node's running join (state transfer to or from its
/// peer) until it ends or `limit` passes; a progress bar on a terminal, a line a second
/// otherwise (a log or a pipe).
pub fn follow_join(socket: &Path, limit: Duration) -> anyhow::Result<()> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bar = if tty {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes} ({bytes_per_sec})",
        )?
        .progress_chars("=> "),
    );
    let t0 = std::time::Instant::now();
    let mut last_line = None::<std::time::Instant>;
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    loop {
        let v = query(socket)?;
        let j = &v["vm"]["join"];
        let mut phase = j["phase"].as_str().unwrap_or("");
        // A join that ended before we looked is not the one to follow.
        let old = j["started_unix_ms"].as_u64().is_some_and(|s| s < since);
        if old && (phase == "done" || phase == "failed") {
            phase = "";
        }
        let msg = match phase {
            "done" | "failed" => {
                bar.finish_and_clear();
                println!("{}", join_line(j));
                return Ok(());
            }
            "" => "waiting for a join".to_string(),
            _ => {
                let sent = j["bytes_sent"].as_u64().unwrap_or(0);
                let total = j["ram_pages"].as_u64().unwrap_or(0) * 4096;
                bar.set_length(total.max(sent));
                bar.set_position(sent);
                format!(
                    "{phase}, {} pages dirty last round, ~{:.1} s left",
                    j["dirty_pages_last_round"],
                    j["remaining_s"].as_f64().unwrap_or(0.0)
                )
            }
        };
        if tty {
            bar.set_message(msg);
        } else if last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_line = Some(std::time::Instant::now());
            let sent = j["bytes_sent"].as_u64().unwrap_or(0) >> 20;
            println!(
                "{:.1} s: {msg}, {sent} MiB sent",
                t0.elapsed().as_secs_f64()
            );
        }
        if t0.elapsed() > limit {
            bar.abandon();
            anyhow::bail!("no join ended within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ftd standby`: asks the daemon to leave the pair and stop (a paired primary hands
/// its VM over first), and waits until it has stopped (at most 2 minutes).
pub fn standby(socket: &Path) -> anyhow::Result<()> {
    match request(socket, Request::Standby)? {
        Response::Accepted { what } => println!("{what}"),
        Response::Refused { why } => anyhow::bail!("standby refused: {why}"),
        Response::Error { error } => anyhow::bail!("{error}"),
        other => anyhow::bail!("unexpected answer to standby: {other:?}"),
    }
    let t0 = std::time::Instant::now();
    while query(socket).is_ok() {
        if t0.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("ftd did not stop within 2 minutes: see its log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "standby: ftd stopped after {:.1} s; `systemctl start ftd` (or ftd run) rejoins the pair",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `ftd switchover`, on the primary: asks the daemon to hand its VM to the in-sync
/// backup (it refuses, saying why, unless it is the paired primary of a following
/// backup with its VM recording), and follows it until it runs again as a backup in
/// sync with the new primary.
pub fn switchover(socket: &Path) -> anyhow::Result<()> {
    match request(socket, Request::Switchover)? {
        Response::Accepted { .. } => {}
        Response::Refused { why } => anyhow::bail!("switchover refused: {why}"),
        Response::Error { error } => anyhow::bail!("{error}"),
        other => anyhow::bail!("unexpected answer to a switchover: {other:?}"),
    }
    println!("switchover: the VM goes to the backup; this node then rejoins as backup");
    let t0 = std::time::Instant::now();
    let mut said_backup = false;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if t0.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("this node did not rejoin as backup within 2 minutes: see ftd's log");
        }
        // The daemon restarts in between: the socket is gone for a moment.
        let Ok(v) = query(socket) else { continue };
        if v["role"] == "primary" && t0.elapsed() > Duration::from_secs(5) {
            anyhow::bail!("the daemon is still primary: it refused (see its log)");
        }
        if v["role"] == "backup" && !said_backup {
            said_backup = true;
            println!("switchover: running as backup, joining the new primary");
        }
        let vm = &v["vm"];
        if v["role"] == "backup"
            && vm["phase"] == "replaying"
            && vm["checkpoints_verified"].as_u64().unwrap_or(0) > 0
        {
            println!(
                "switchover: done in {:.1} s; this node is the backup, in sync ({})",
                t0.elapsed().as_secs_f64(),
                join_line(&vm["join"])
            );
            return Ok(());
        }
        if v["halted"] == true {
            anyhow::bail!(
                "this node halted as backup: {}",
                vm["error"].as_str().unwrap_or("see ftd's log")
            );
        }
    }
}
