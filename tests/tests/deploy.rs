//! What an operator deploys beside the binaries, checked with the tools that consume it:
//! the Prometheus alert rules (promtool: syntax, and their unit tests), the Grafana
//! dashboard's queries (promtool parses each as a recording rule), and the systemd
//! units (`systemd-analyze verify`, and the sandbox's exposure score offline).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a tool; its output when it succeeds, a failure with its output otherwise.
fn tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} ({e}): scripts/bootstrap.sh installs it (Debian's prometheus and systemd packages)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = root().join("deploy/prometheus");
    let out = tool(
        Command::new("promtool")
            .args(["check", "rules", "ft-alerts.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS: 10 rules found"), "{out}");
    let out = tool(
        Command::new("promtool")
            .args(["test", "rules", "ft-alerts.test.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every query of the dashboard parses as PromQL (Grafana's variables replaced by what
/// they expand to), and every panel has one.
#[test]
fn the_dashboards_queries_are_valid_promql() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/ft-appliance.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:panel{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    assert!(n >= 20, "{n} queries");
    let file = std::env::temp_dir().join(format!("ft-dashboard-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let out = tool(Command::new("promtool").args(["check", "rules"]).arg(&file));
    let _ = std::fs::remove_file(&file);
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
}

/// The units load (`systemd-analyze verify`, with ExecStart pointed at the built
/// binaries) and keep their sandbox (`systemd-analyze security --offline`: an exposure
/// score above the threshold fails, e.g. after a hardening line is dropped).
#[test]
fn the_systemd_units_verify_and_stay_sandboxed() {
    let dir = std::env::temp_dir().join(format!("ft-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bins = ft_testbed::ftd_bin().unwrap();
    let bin_dir = bins.parent().unwrap();
    // (unit, most exposure allowed: systemd-analyze's score x 10, today's score: raise the
    // sandbox, never the threshold)
    for (unit, threshold) in [("ftd.service", 38), ("ft-arbiter.service", 14)] {
        let text = std::fs::read_to_string(root().join("configs/systemd").join(unit))
            .unwrap()
            .replace("/usr/bin/", &format!("{}/", bin_dir.display()));
        let path = dir.join(unit);
        std::fs::write(&path, text).unwrap();
        tool(Command::new("systemd-analyze").arg("verify").arg(&path));
        let out = tool(
            Command::new("systemd-analyze")
                .args(["security", "--offline=true"])
                .arg(format!("--threshold={threshold}"))
                .arg(&path),
        );
        assert!(out.contains("Overall exposure level"), "{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every `ftd` and `ft-arbiter` command the deployment guide and the README show parses
/// with the command lines of this build: a renamed flag or subcommand fails here, not
/// in an operator's terminal.
#[test]
fn every_command_in_the_guide_and_the_readme_parses() {
    use clap::Parser;
    let mut checked = 0;
    for doc in ["docs/deploy.md", "README.md"] {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        let mut in_code = false;
        let mut pending = String::new();
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if !in_code {
                continue;
            }
            // Comments end a line; a trailing backslash continues it.
            let code = line.split(" #").next().unwrap().trim();
            if let Some(head) = code.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            let full = std::mem::take(&mut pending) + code;
            for cmd in full.split("&&").map(str::trim) {
                let words: Vec<&str> = cmd.split_whitespace().collect();
                let parsed = match words.first() {
                    Some(&"ftd") => ftd::cli::Cli::try_parse_from(&words).map(|_| ()),
                    Some(&"ft-arbiter") => ft_fence::cli::Args::try_parse_from(&words).map(|_| ()),
                    _ => continue,
                };
                if let Err(e) = parsed {
                    panic!("{doc}: `{cmd}` does not parse:\n{e}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} commands found");
}
