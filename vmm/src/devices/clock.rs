//! Clock device: register `REG_CLOCK_NS` (read) returns nanoseconds on a monotonic device
//! clock that starts near 0 when the VM first boots. The guest has no other time source
//! (it never executes RDTSC). In record/free mode the value comes from the host's
//! CLOCK_MONOTONIC; in replay it comes from the log; after go-live the clock continues
//! from the last replayed value, so guest time never goes backwards.
use std::time::Instant;

#[derive(Debug)]
pub struct Clock {
    base_ns: u64,
    start: Instant,
    last: u64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            base_ns: 0,
            start: Instant::now(),
            last: 0,
        }
    }

    /// Current device time from the host clock (not returned to the guest by itself).
    pub fn host_now(&self) -> u64 {
        self.base_ns + self.start.elapsed().as_nanos() as u64
    }

    /// A live read: host time, forced strictly monotonic.
    pub fn read_live(&mut self) -> u64 {
        let v = self.host_now().max(self.last + 1);
        self.last = v;
        v
    }

    /// A value delivered from the log.
    pub fn observe(&mut self, v: u64) {
        self.last = v;
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    /// Re-bases the host clock so live time continues from the last delivered value
    /// (go-live, restore).
    pub fn resync(&mut self) {
        self.base_ns = self.last;
        self.start = Instant::now();
    }
}
