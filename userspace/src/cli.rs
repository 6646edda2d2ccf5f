//! The `ftd` command line's definition (clap): the binary parses it, and `cargo xtask
//! package` renders it as man pages and shell completions.
use std::path::PathBuf;

use clap::{Parser, Subcommand};
/// Where a packaged ftd reads its configuration.
pub const DEFAULT_CONFIG: &str = "/etc/ftd/ftd.toml";

/// Which daemon a command talks to: its control socket, given or read from its config.
#[derive(clap::Args)]
pub struct DaemonAt {
    /// The daemon's config (its api.control_socket is used).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The daemon's control socket, instead of the one its config names.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl DaemonAt {
    pub fn socket(&self) -> Result<PathBuf, crate::config::ConfigError> {
        match &self.socket {
            Some(s) => Ok(s.clone()),
            None => crate::config::Config::control_socket_of(&self.config),
        }
    }
}

#[derive(Parser)]
#[command(
    name = "ftd",
    version,
    about = "Primary/backup fault-tolerance daemon (VMware-FT style)"
)]
pub struct Cli {
    /// Where the log goes: the journal under systemd, text otherwise (auto); or force
    /// text, one JSON object a line, or the journal.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "FTD_LOG_FORMAT"
    )]
    pub log_format: crate::logging::LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    /// Maintenance of this host: it leaves the pair and its daemon stops (exit status 0,
    /// so systemd does not restart it). A paired primary hands the VM to its backup
    /// first (as `switchover`); a backup just leaves. Refused on a node that runs the VM
    /// alone. `systemctl start ftd` rejoins.
    Standby {
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
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell); the
    /// packages install them.
    Completions { shell: clap_complete::Shell },
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
