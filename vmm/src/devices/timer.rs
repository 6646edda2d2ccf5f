//! Timer device: register `REG_TIMER_DEADLINE` (write) arms a one-shot deadline on the
//! device clock (0 disarms). Once the host clock has passed it (record/free mode) the VMM
//! injects `TIMER_VECTOR` at the next exit that can take an interrupt, and the injection
//! disarms it; in replay, timer interrupts come only from the log, at the logged exit,
//! and disarm it the same way. The timer is thus armed or not at the same exits on
//! primary and backup (its state changes only at guest writes and logged injections).
#[derive(Debug, Default, Clone, Copy)]
pub struct Timer {
    pub deadline: Option<u64>,
}

impl Timer {
    pub fn write(&mut self, v: u64) {
        self.deadline = if v == 0 { None } else { Some(v) };
    }

    /// True if the timer is armed and its deadline has passed at device time `now`
    /// (the interrupt is due; injecting it disarms the timer).
    pub fn due(&self, now: u64) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}
