//! The benchmark's network: a client namespace with the guest's tap (10.0.0.1 -> guest
//! 10.0.0.2) and, for the reference server, a second namespace behind a veth pair
//! (10.0.1.1 -> 10.0.1.2), so both servers are one virtual link away from the client.
use anyhow::{Context, Result, bail};
use std::process::Command;

pub struct NetNs {
    pub name: String,
    /// The reference server's namespace, if made.
    pub server: Option<String>,
}

fn sh(args: &[&str]) -> Result<String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !o.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

impl NetNs {
    pub fn new(tag: &str) -> Result<NetNs> {
        let name = format!("ftperf-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name])?;
        let ns = NetNs { name, server: None };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        ns.run(&["ip", "tuntap", "add", "dev", "ftap0", "mode", "tap"])?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.ftap0.disable_ipv6=1"])?;
        ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", "ftap0"])?;
        ns.run(&["ip", "link", "set", "ftap0", "up"])?;
        Ok(ns)
    }

    /// Adds the reference server's namespace: veth 10.0.1.1 (client side) <-> 10.0.1.2.
    pub fn add_server(&mut self) -> Result<()> {
        let srv = format!("{}-srv", self.name);
        let _ = Command::new("ip").args(["netns", "del", &srv]).output();
        sh(&["ip", "netns", "add", &srv])?;
        self.server = Some(srv.clone());
        self.run(&[
            "ip", "link", "add", "vcli", "type", "veth", "peer", "name", "vsrv",
        ])?;
        self.run(&["ip", "link", "set", "vsrv", "netns", &srv])?;
        self.run(&["ip", "addr", "add", "10.0.1.1/24", "dev", "vcli"])?;
        self.run(&["ip", "link", "set", "vcli", "up"])?;
        for args in [
            &["ip", "link", "set", "lo", "up"][..],
            &["ip", "addr", "add", "10.0.1.2/24", "dev", "vsrv"],
            &["ip", "link", "set", "vsrv", "up"],
        ] {
            let mut full = vec!["ip", "netns", "exec", &srv];
            full.extend_from_slice(args);
            sh(&full)?;
        }
        Ok(())
    }

    /// Runs a command inside the client namespace (bounded to 10 minutes).
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name, "timeout", "600"];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            let _ = Command::new("ip").args(["netns", "del", s]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
