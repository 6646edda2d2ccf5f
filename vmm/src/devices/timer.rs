//! Timer device: register `REG_TIMER_DEADLINE` (write) arms a one-shot deadline on the
//! device clock (0 disarms). When the host clock passes it (record/free mode) the VMM
//! injects `TIMER_VECTOR` at the next exit and disarms; in replay, timer interrupts come
//! only from the log, at the logged exit.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timer {
    pub deadline: Option<u64>,
}

impl Timer {
    pub fn write(&mut self, v: u64) {
        self.deadline = if v == 0 { None } else { Some(v) };
    }

    /// True (and disarms) if the deadline has passed at device time `now`.
    pub fn take_expired(&mut self, now: u64) -> bool {
        match self.deadline {
            Some(d) if now >= d => {
                self.deadline = None;
                true
            }
            _ => false,
        }
    }
}
