//! CPU throttling of a process (every thread of it) with a cgroup of its own: a slow
//! host, not a dead one. cgroup v2 (`cpu.max`) where the cpu controller is on the
//! unified hierarchy, else cgroup v1 (`cpu.cfs_quota_us`). The cgroup is removed and the
//! process moved back to its parent on drop.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub struct CpuThrottle {
    dir: PathBuf,
    parent: PathBuf,
    pid: i32,
}

/// Where the cpu controller is mounted, and whether it is cgroup v2.
fn cpu_root() -> Result<(PathBuf, bool)> {
    let v2 = Path::new("/sys/fs/cgroup");
    if std::fs::read_to_string(v2.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"))
    {
        return Ok((v2.to_path_buf(), true));
    }
    let v1 = Path::new("/sys/fs/cgroup/cpu");
    if v1.join("cpu.cfs_quota_us").exists() {
        return Ok((v1.to_path_buf(), false));
    }
    bail!("no cgroup cpu controller (neither cgroup v2 with cpu nor /sys/fs/cgroup/cpu)")
}

impl CpuThrottle {
    /// Limits process `pid` (all its threads) to `percent` of one CPU, in periods of
    /// `period_us`.
    pub fn new(name: &str, pid: i32, percent: u32, period_us: u32) -> Result<CpuThrottle> {
        let (root, v2) = cpu_root()?;
        let dir = root.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let quota = (period_us as u64 * percent as u64 / 100).max(1000);
        let t = CpuThrottle {
            dir,
            parent: root,
            pid,
        };
        let w = |file: &str, v: String| {
            let p = t.dir.join(file);
            std::fs::write(&p, &v).with_context(|| format!("writing {v:?} to {}", p.display()))
        };
        if v2 {
            w("cpu.max", format!("{quota} {period_us}"))?;
        } else {
            w("cpu.cfs_period_us", period_us.to_string())?;
            w("cpu.cfs_quota_us", quota.to_string())?;
        }
        w("cgroup.procs", pid.to_string())?;
        Ok(t)
    }

    /// Times the cgroup's tasks had to wait for their quota (cpu.stat).
    pub fn throttled_periods(&self) -> Result<u64> {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat"))?;
        stat.lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse().ok())
            .context("cpu.stat has no nr_throttled")
    }
}

impl Drop for CpuThrottle {
    fn drop(&mut self) {
        // Move the process back (if it still runs), then remove the empty cgroup.
        let _ = std::fs::write(self.parent.join("cgroup.procs"), self.pid.to_string());
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for p in procs.lines() {
                let _ = std::fs::write(self.parent.join("cgroup.procs"), p);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
