//! Child processes started inside a namespace, killed on drop.

use anyhow::{Context, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A process started with `ip netns exec <ns> <program> <args>`; stdout+stderr go to
/// `log_path`. SIGKILLed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Mutex<Child>,
    pid: i32,
    name: String,
    ns: String,
    log_path: PathBuf,
}

impl ChildGuard {
    /// Spawns `program args...` inside `ns`, output appended to `log_path`.
    pub fn spawn<I, S>(
        ns: &str,
        program: impl AsRef<OsStr>,
        args: I,
        log_path: &Path,
    ) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("open log {}", log_path.display()))?;
        let log2 = log.try_clone()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {} in {ns}", program.to_string_lossy()))?;
        Ok(ChildGuard {
            pid: child.id() as i32,
            child: Mutex::new(child),
            name: program.to_string_lossy().into_owned(),
            ns: ns.to_string(),
            log_path: log_path.to_path_buf(),
        })
    }

    /// PID (after `ip netns exec` has exec'd, this is the program itself).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Namespace the child runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Path of the stdout/stderr log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn signal(&self, sig: i32) -> Result<()> {
        if !self.is_running() {
            anyhow::bail!("{} (pid {}) is not running", self.name, self.pid);
        }
        // SAFETY: kill() on our own (unreaped, hence not recycled) child pid.
        let rc = unsafe { libc::kill(self.pid, sig) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("kill({}, {sig})", self.pid));
        }
        Ok(())
    }

    /// SIGSTOP.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Sends an arbitrary signal (e.g. `libc::SIGTERM`).
    pub fn send_signal(&self, sig: i32) -> Result<()> {
        self.signal(sig)
    }

    /// SIGKILL and reap. Ok if it already exited.
    pub fn kill(&self) -> Result<()> {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if c.try_wait()?.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// True while the process has not exited.
    pub fn is_running(&self) -> bool {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(c.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit; None if still running.
    pub fn wait_exit(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(st) = c.try_wait()? {
                    return Ok(Some(st));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Current contents of the log file (lossy UTF-8; empty if unreadable).
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the log contains `needle` (or the child exits / `timeout` passes).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_contents().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline || !self.is_running() {
                return self.log_contents().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let c = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
