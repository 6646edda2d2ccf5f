//! `cargo xtask plots`: draws every committed plot again from the committed results, by
//! running each benchmark with `--replot perf/results/<name>` (no measuring, no root).
use std::path::Path;

use anyhow::{Context, Result, bail};

/// (results directory under perf/results, the benchmark's package and binary).
const BENCHMARKS: [(&str, &str); 5] = [
    ("dataplane", "ft-perf-dataplane"),
    ("kernel", "ft-perf-kernel"),
    ("failover", "ft-perf-failover"),
    ("reprotect", "ft-perf-reprotect"),
    ("vmm", "ft-perf-vmm"),
];

pub fn run(root: &Path) -> Result<()> {
    let mut done = Vec::new();
    for (name, pkg) in BENCHMARKS {
        let dir = root.join("perf/results").join(name);
        if !dir.join("results.json").is_file() {
            eprintln!(
                "plots: skipping {name}: {} has no results.json",
                dir.display()
            );
            continue;
        }
        let mut cmd = crate::cargo();
        cmd.args([
            "run",
            "--release",
            "-p",
            pkg,
            "--bin",
            pkg,
            "--",
            "--replot",
        ])
        .arg(&dir);
        crate::run(&mut cmd)
            .with_context(|| format!("redrawing the {name} plots from {}", dir.display()))?;
        done.push(name);
    }
    if done.is_empty() {
        bail!(
            "no results under {} to draw",
            root.join("perf/results").display()
        );
    }
    eprintln!("plots: redrew {}", done.join(", "));
    Ok(())
}
