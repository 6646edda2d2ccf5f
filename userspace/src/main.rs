//! The `ftd` command line: `run`, `status`, `switchover`, `check-config`, `keygen`.
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ftd::{control::report::Level, daemon::Exit, role::start::Bootstrap};

/// sysexits.h: a configuration error (systemd's `RestartPreventExitStatus=78` keeps a
/// service manager from restarting a node that refuses for a reason a restart does not
/// change).
const EX_CONFIG: i32 = 78;

/// Where a packaged ftd reads its configuration.
const DEFAULT_CONFIG: &str = "/etc/ftd/ftd.toml";

/// Which daemon a command talks to: its control socket, given or read from its config.
#[derive(clap::Args)]
struct DaemonAt {
    /// The daemon's config (its api.control_socket is used).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The daemon's control socket, instead of the one its config names.
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl DaemonAt {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        match &self.socket {
            Some(s) => Ok(s.clone()),
            None => Ok(ftd::config::Config::control_socket_of(&self.config)?),
        }
    }
}

#[derive(Parser)]
#[command(
    name = "ftd",
    version,
    about = "Primary/backup fault-tolerance daemon (VMware-FT style)"
)]
struct Cli {
    /// Where the log goes: the journal under systemd, text otherwise (auto); or force
    /// text, one JSON object a line, or the journal.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    log_format: ftd::logging::LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the data plane and run this node until SIGINT/SIGTERM. A node never boots
    /// the guest while the arbiter records that a VM of this pair has lived: it joins
    /// the live node as its backup, or waits (`ftd status` says for what).
    ///
    /// Exit status: 0 after a stop; 1 when the node halted (fail-stop: a service manager
    /// should start it again, it then joins the live node) or failed to start; 78
    /// (EX_CONFIG) when it refuses to run for a reason a restart does not change.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Start in this way instead of the config's node.role (`ftd switchover` starts
        /// the old primary again as `auto` this way).
        #[arg(long, value_parser = ["auto", "primary", "backup", "solo"])]
        role: Option<String>,
        /// The pair's first start: boot the guest image on this node if no VM of this
        /// pair has ever run (epoch 0 at the arbiter); otherwise ignored (the node joins
        /// the live one).
        #[arg(long)]
        bootstrap: bool,
        /// With --bootstrap: boot a fresh VM although the arbiter records an earlier one,
        /// because no node holds it any more (both hosts lost it). Everything the old
        /// VM held is lost. Refused while any node holds a lease.
        #[arg(long, requires = "bootstrap")]
        force: bool,
    },
    /// Planned switchover, run on the primary: its VM is handed to the in-sync backup
    /// (graceful stop: the backup gets the whole log and goes live), then this node's ftd
    /// starts again as backup and joins the new primary by state transfer.
    Switchover {
        #[command(flatten)]
        at: DaemonAt,
    },
    /// Print the status of a running daemon: a summary, or everything as JSON.
    ///
    /// Exit status (the Nagios plugin convention): 0 the pair is protected; 1 WARNING:
    /// unprotected, the peer silent, a join running, the arbiter not answering; 2
    /// CRITICAL: halted, fenced, or the replicas diverged; 3 UNKNOWN: the daemon could
    /// not be asked.
    Status {
        #[command(flatten)]
        at: DaemonAt,
        /// The whole status as JSON (for scripts).
        #[arg(long)]
        json: bool,
        /// One line and the exit status, for monitoring (Nagios, Icinga, a systemd timer).
        #[arg(long, conflicts_with_all = ["json", "watch"])]
        check: bool,
        /// Show the status again every SECONDS (default 2) until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2",
              conflicts_with = "json")]
        watch: Option<f64>,
        /// Follow the running join (re-protection by state transfer) until it ends (at
        /// most 10 minutes): a progress bar on a terminal, a line a second otherwise.
        #[arg(long, conflicts_with_all = ["json", "check", "watch"])]
        follow_join: bool,
    },
    /// Validate a config file and print what is wrong with it.
    CheckConfig {
        #[arg(default_value = DEFAULT_CONFIG)]
        file: PathBuf,
        /// Check this host too (NICs, MTU, XDP support, /dev/kvm, key files): what the
        /// unit runs before every start. Exit status 1 if anything would fail.
        #[arg(long)]
        host: bool,
    },
    /// Everything this host and its network need before `ftd run`, at once, each with
    /// its fix: the config, the NICs (present, up, MTU, native XDP), /dev/kvm, the key
    /// files, the arbiter (it answers, with this node's credentials) and the peer over
    /// the logging link; with --peer-config, both hosts' configs held against each other.
    /// Exit status 1 if anything would fail.
    Preflight {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The other host's config (copied here): the VM, the key and the settings that
        /// must match, and the addresses that must mirror.
        #[arg(long)]
        peer_config: Option<PathBuf>,
    },
    /// Write a new channel key (16 random bytes, mode 0600) for `[channel] key_file`;
    /// copy the same file to the peer host. Never overwrites an existing file, except
    /// with --rotate.
    Keygen {
        /// Where to write it, e.g. /etc/ftd/channel.key.
        file: PathBuf,
        /// Key rotation without downtime: the key in FILE moves to FILE.prev and a new
        /// one replaces it. Copy both files to the peer, then `systemctl reload ftd` (SIGHUP)
        /// on both hosts: each sends under the new key once the other holds it, and
        /// refuses the old one `[channel] key_overlap_s` after this command.
        #[arg(long)]
        rotate: bool,
    },
}

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
            let mut cfg = ftd::config::Config::load(&config)?;
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
                let peer = ftd::preflight::load_peer(&p)?;
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
