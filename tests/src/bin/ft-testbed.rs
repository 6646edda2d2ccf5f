//! Manual helper: `ft-testbed up [--no-standins] [--hold SECS]` builds a testbed, prints
//! its layout and keeps it until SIGINT/SIGTERM or SECS (default 3600) elapse, then tears
//! it down. `ft-testbed cleanup` removes namespaces left by dead processes.

use ft_testbed::{Testbed, TestbedOptions, cleanup_stale};

fn wait_signal(secs: u64) {
    // SAFETY: sigset operations on a local, initialised sigset; blocking SIGINT/SIGTERM
    // in this (only) thread so sigtimedwait can collect them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let ts = libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("cleanup") => {
            for n in cleanup_stale() {
                println!("removed {n}");
            }
        }
        Some("up") => {
            let mut opts = TestbedOptions::default();
            let mut hold = 3600u64;
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--no-standins" => opts.start_standins = false,
                    "--quiet-standins" => opts.quiet_standins = true,
                    "--hold" => {
                        hold = it
                            .next()
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| anyhow::anyhow!("--hold SECS"))?
                    }
                    o => anyhow::bail!("unknown option {o}"),
                }
            }
            opts.keep_logs = true;
            let tb = Testbed::new(opts)?;
            print!("{}", tb.describe());
            println!("holding for up to {hold} s; Ctrl-C to tear down");
            wait_signal(hold);
            drop(tb);
            println!("torn down");
        }
        _ => {
            eprintln!(
                "usage: ft-testbed up [--no-standins] [--quiet-standins] [--hold SECS] | ft-testbed cleanup"
            );
            std::process::exit(2);
        }
    }
    Ok(())
}
