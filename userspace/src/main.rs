//! The `ftd` command line: `run`, `status`, `switchover`, `check-config`, `keygen`.

use clap::Parser;
use ftd::{
    cli::{Cli, Cmd},
    control::report::Level,
    daemon::Exit,
    role::start::Bootstrap,
};

/// sysexits.h: a configuration error (systemd's `RestartPreventExitStatus=78` keeps a
/// service manager from restarting a node that refuses for a reason a restart does not
/// change).
const EX_CONFIG: i32 = 78;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ftd::logging::init(cli.log_format);
    match cli.cmd {
        Cmd::Run {
            config,
            role,
            bootstrap,
            force,
        } => {
            // A config that does not load is not fixed by a restart (status 78: systemd
            // does not restart it, RestartPreventExitStatus=78).
            let mut cfg = match ftd::config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("refused: {e}; exiting with status 78 (EX_CONFIG)");
                    std::process::exit(EX_CONFIG);
                }
            };
            if let Some(r) = role {
                cfg.node.role = match r.as_str() {
                    "auto" => ftd::config::Role::Auto,
                    "primary" => ftd::config::Role::Primary,
                    "backup" => ftd::config::Role::Backup,
                    _ => ftd::config::Role::Solo,
                };
                cfg.validate()?;
            }
            let bootstrap = match (bootstrap, force) {
                (false, _) => Bootstrap::No,
                (true, false) => Bootstrap::First,
                (true, true) => Bootstrap::Force,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let exit = rt.block_on(ftd::daemon::run(cfg, bootstrap))?;
            // A thread that does not end (a join stuck in a read) must not keep a halted
            // daemon from exiting.
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
            match exit {
                Exit::Stopped => Ok(()),
                Exit::Switchover => {
                    use std::os::unix::process::CommandExt;
                    tracing::info!("switchover: starting again (it joins the new primary)");
                    let exe = std::env::current_exe()?;
                    let err = std::process::Command::new(exe)
                        .arg("run")
                        .arg("--config")
                        .arg(&config)
                        .args(["--role", "auto"])
                        .exec();
                    anyhow::bail!("cannot start again after the switchover: {err}");
                }
                Exit::Halted(why) => {
                    tracing::error!(
                        "halted: {why}; exiting with status 1 (started again, this node joins the live one)"
                    );
                    std::process::exit(1);
                }
                Exit::Refused(why) => {
                    tracing::error!("refused: {why}; exiting with status 78 (EX_CONFIG)");
                    std::process::exit(EX_CONFIG);
                }
            }
        }
        Cmd::Switchover { at } => ftd::control::client::switchover(&at.socket()?),
        Cmd::Standby { at } => ftd::control::client::standby(&at.socket()?),
        Cmd::Status {
            at,
            follow_join: true,
            ..
        } => ftd::control::client::follow_join(&at.socket()?, std::time::Duration::from_secs(600)),
        Cmd::Status {
            at,
            json,
            check,
            watch,
            ..
        } => {
            let socket = match at.socket() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("ftd status: {e:#}");
                    std::process::exit(Level::Unknown.exit_code());
                }
            };
            std::process::exit(status(&socket, json, check, watch).exit_code())
        }
        Cmd::Keygen { file, rotate: true } => {
            let (old, new) = ftd::channel::keys::rotate(&file)?;
            println!(
                "{}: new channel key (id {new}) written, the old one (id {old}) kept as {}; \
                 copy both files to the peer host, then run `systemctl reload ftd` (SIGHUP) \
                 on both hosts within [channel] key_overlap_s; `ftd status` shows the rotation",
                file.display(),
                ftd::channel::keys::prev_path(&file).display()
            );
            Ok(())
        }
        Cmd::Keygen {
            file,
            rotate: false,
        } => {
            ftd::channel::auth::ChannelKey::generate(&file)?;
            println!(
                "{}: new channel key written; copy this file to the peer host and set \
                 [channel] key_file to it on both",
                file.display()
            );
            Ok(())
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ftd", &mut std::io::stdout());
            Ok(())
        }
        Cmd::CheckConfig { file, host } => {
            let cfg = ftd::config::Config::load(&file)?;
            println!(
                "{}: ok (node {}, role {:?})",
                file.display(),
                cfg.node.name,
                cfg.node.role
            );
            if host {
                let findings = ftd::preflight::host(&cfg);
                exit_with_findings(&findings);
            }
            Ok(())
        }
        Cmd::Preflight {
            config,
            peer_config,
        } => {
            let cfg = ftd::config::Config::load(&config)?;
            println!("preflight of {} ({}):", cfg.node.name, config.display());
            let mut findings = ftd::preflight::host(&cfg);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            findings.extend(rt.block_on(ftd::preflight::network(&cfg)));
            if let Some(p) = peer_config {
                let peer = ftd::config::Config::load(&p)?;
                findings.extend(ftd::preflight::compare(&cfg, &peer));
            }
            exit_with_findings(&findings);
            Ok(())
        }
    }
}

/// `ftd status`: prints the status (once, or every `watch` seconds) and returns its
/// health level, the command's exit status.
fn status(socket: &std::path::Path, json: bool, check: bool, watch: Option<f64>) -> Level {
    use ftd::control::{client, report};
    loop {
        let level = match client::query(socket) {
            Err(e) if check => {
                println!("FT UNKNOWN - {e}");
                Level::Unknown
            }
            Err(e) => {
                eprintln!("ftd status: {e}");
                Level::Unknown
            }
            Ok(mut v) => {
                // The arbiter's record, asked by the daemon (it holds the credentials).
                match client::request(socket, ftd::control::protocol::Request::Arbiter) {
                    Ok(ftd::control::protocol::Response::Arbiter { arbiter }) => {
                        v["arbiter"] = arbiter
                    }
                    Ok(other) => v["arbiter"] = serde_json::json!({"error": format!("{other:?}")}),
                    Err(e) => v["arbiter"] = serde_json::json!({"error": e.to_string()}),
                }
                let (level, line) = report::check_line(&v);
                if check {
                    println!("{line}");
                } else if json {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                } else {
                    if watch.is_some() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                        // Clear the screen and go home, as watch(1) does.
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", report::summary(&v));
                    println!("{line}");
                }
                level
            }
        };
        let Some(every) = watch else { return level };
        std::thread::sleep(std::time::Duration::from_secs_f64(every.max(0.2)));
    }
}

/// Prints findings and a verdict; exits with status 1 if any failed.
fn exit_with_findings(findings: &[ftd::preflight::Finding]) {
    use ftd::preflight::Verdict;
    for f in findings {
        println!("  {f}");
    }
    let n = |v| findings.iter().filter(|f| f.verdict == v).count();
    let (fail, warn) = (n(Verdict::Fail), n(Verdict::Warn));
    if fail > 0 {
        println!("{fail} failed, {warn} warnings: fix what failed before `ftd run`");
        std::process::exit(1);
    }
    println!("ready ({warn} warnings)");
}
