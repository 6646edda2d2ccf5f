//! Requests to a running VMM from other threads, and the vCPU thread's signal kick.
use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Asynchronous requests to a running VMM (from any thread, a signal handler's helper
/// thread, or the daemon's control plane).
pub struct Control {
    stop: AtomicBool,
    go_live: AtomicBool,
    /// The guest waits at its next exit until resumed (see [`Control::pause`]).
    pause: AtomicBool,
    /// The vCPU thread is waiting in a pause right now.
    paused: Arc<AtomicBool>,
    /// Work for the vCPU thread at its next guest exit (a transfer's stop phase).
    exit_work: std::sync::Mutex<Option<ExitWork>>,
    exit_work_pending: Arc<AtomicBool>,
    pub(super) wake: OwnedFd,
    pub(super) vcpu: Arc<VcpuThread>,
}

/// Work run on the vCPU thread, stopped at a guest exit, with the VMM (see
/// [`Control::run_at_next_exit`]).
pub type ExitWork = Box<dyn FnOnce(&mut super::Vmm) + Send>;

/// The thread inside `Vmm::run`, for signal kicks. `pthread_kill` is only called with
/// `lock` held and `tid` non-zero, and `Vmm::run` clears `tid` under the same lock before
/// it returns, so a kick can never reach another thread that reused the pthread id (a
/// stray EINTR in another VMM's run loop).
pub(super) struct VcpuThread {
    lock: std::sync::Mutex<()>,
    /// pthread id of the thread inside `Vmm::run`, 0 if none.
    tid: std::sync::atomic::AtomicU64,
}

impl VcpuThread {
    /// Sends the kick signal if a thread is inside `Vmm::run`; false if none is.
    pub(super) fn kick(&self) -> bool {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let tid = self.tid.load(Ordering::SeqCst);
        if tid == 0 {
            return false;
        }
        // SAFETY: `tid` is the pthread id of a thread that is inside `Vmm::run` (it clears
        // `tid` under `lock`, which we hold, before leaving), so the thread is alive; the
        // handler is a no-op.
        unsafe { libc::pthread_kill(tid as libc::pthread_t, KICK_SIGNAL) };
        true
    }

    pub(super) fn set(&self, tid: u64) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.tid.store(tid, Ordering::SeqCst);
    }
}

/// Signal used to kick the vCPU thread out of KVM_RUN (a guest spinning without exits
/// never returns to the VMM otherwise). Its handler does nothing.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR2;

extern "C" fn on_kick(_: libc::c_int) {}

pub(super) fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler that does nothing (async-signal-safe); no SA_RESTART
        // so KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut());
        }
    });
}

impl Control {
    pub fn new() -> Arc<Control> {
        // SAFETY: eventfd(2) with valid flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(
            fd >= 0,
            "eventfd failed: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Arc::new(Control {
            stop: AtomicBool::new(false),
            go_live: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            paused: Arc::new(AtomicBool::new(false)),
            exit_work: std::sync::Mutex::new(None),
            exit_work_pending: Arc::new(AtomicBool::new(false)),
            wake,
            vcpu: Arc::new(VcpuThread {
                lock: std::sync::Mutex::new(()),
                tid: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Stops the VMM at the next exit (a recording VMM writes END first).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
        // Interrupt KVM_RUN too, repeatedly until the run loop has returned (a single
        // signal could land just before the thread enters KVM_RUN).
        let vcpu = self.vcpu.clone();
        if vcpu.kick() {
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    std::thread::sleep(Duration::from_millis(10));
                    if !vcpu.kick() {
                        break;
                    }
                }
            });
        }
    }

    /// Replay: consume every entry the log source still delivers, then continue as a
    /// free-running primary with output enabled, without restarting the guest.
    ///
    /// The VMM goes live when its source reports the end (`Recv::End`: closed and
    /// drained), never on a transient "nothing yet", so the caller must close the source
    /// — drop the [`crate::vmlog::ChannelSink`] / sender, close the socket — when it
    /// decides to go live (before or after this call), after putting every input frame it
    /// received into the frame store. A frame reference whose frame is still missing then
    /// ends the replay there: the VMM goes live at that exit.
    pub fn request_go_live(&self) {
        self.go_live.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Pauses the guest at its next guest exit (kicking it out of KVM_RUN or an idle
    /// wait): the vCPU thread waits there, the guest runs no instruction and takes no
    /// input, until [`Control::resume`] or a stop. Nothing is logged for the pause
    /// itself: a recording guest only sees a later clock at its next read, which is
    /// logged as every clock read is, so replay is unaffected. [`Control::is_paused`]
    /// tells when the vCPU thread has stopped.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        self.kick();
        let vcpu = self.vcpu.clone();
        if vcpu.kick() {
            // Repeat (bounded) until the thread waits in the pause: one signal could land
            // just before it enters KVM_RUN.
            let paused = self.paused.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    std::thread::sleep(Duration::from_millis(1));
                    if paused.load(Ordering::SeqCst) || !vcpu.kick() {
                        break;
                    }
                }
            });
        }
    }

    /// Lets a paused guest go on at the exit where it waits.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
        self.kick();
    }

    /// A pause was asked for and not resumed.
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// The vCPU thread waits in a pause now (it stopped at a guest exit).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub(super) fn set_paused(&self, p: bool) {
        self.paused.store(p, Ordering::SeqCst);
    }

    /// Runs `work` on the vCPU thread at its next guest exit (at the top of the run loop,
    /// where a snapshot between runs would be taken), kicking it out of KVM_RUN or an
    /// idle wait. False if other work is queued already.
    pub fn run_at_next_exit(&self, work: ExitWork) -> bool {
        {
            let mut g = self.exit_work.lock().unwrap_or_else(|e| e.into_inner());
            if g.is_some() {
                return false;
            }
            *g = Some(work);
            self.exit_work_pending.store(true, Ordering::SeqCst);
        }
        self.kick();
        let vcpu = self.vcpu.clone();
        if vcpu.kick() {
            // A single signal could land just before the thread enters KVM_RUN: repeat
            // (bounded) until the work was taken.
            let me = self.exit_work_pending.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    std::thread::sleep(Duration::from_millis(1));
                    if !me.load(Ordering::SeqCst) || !vcpu.kick() {
                        break;
                    }
                }
            });
        }
        true
    }

    /// Withdraws queued exit work that has not started (it is dropped unrun).
    pub fn cancel_exit_work(&self) {
        let mut g = self.exit_work.lock().unwrap_or_else(|e| e.into_inner());
        *g = None;
        self.exit_work_pending.store(false, Ordering::SeqCst);
    }

    pub(super) fn exit_work_pending(&self) -> bool {
        self.exit_work_pending.load(Ordering::SeqCst)
    }

    pub(super) fn take_exit_work(&self) -> Option<ExitWork> {
        let mut g = self.exit_work.lock().unwrap_or_else(|e| e.into_inner());
        self.exit_work_pending.store(false, Ordering::SeqCst);
        g.take()
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn go_live_requested(&self) -> bool {
        self.go_live.load(Ordering::SeqCst)
    }

    pub(super) fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to our eventfd.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }

    /// Waits at most `ms` for a request's kick (the eventfd), then clears it.
    pub(super) fn wait_for_kick(&self, ms: i32) {
        let mut fds = [libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll(2) on one initialised pollfd we own.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        self.drain();
    }

    pub(super) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from our non-blocking eventfd.
        unsafe {
            libc::read(
                self.wake.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
    }
}

pub(super) fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET and sched_setaffinity(0 = this thread)
    // only read/write the local set.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(Error::Config(format!(
            "cannot pin the vCPU thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
