//! Backup: puts log entries in sequence order, delivers each exactly once, and works out
//! the cumulative ack and which entries to ask for again. Pure logic (no I/O).
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// In order: delivered, plus this many buffered entries after it.
    Delivered(usize),
    /// Ahead of a gap: kept until the gap is repaired.
    Buffered,
    /// Already delivered or already buffered.
    Duplicate,
    /// Too far ahead of the next expected entry to buffer; it will be asked for again.
    TooFar,
}

pub struct Reorder {
    next: u64,
    high: u64,
    pending: BTreeMap<u64, Vec<u8>>,
    /// Missing entry -> (when last asked for, how many times).
    nacked: BTreeMap<u64, (Instant, u32)>,
    max_pending: u64,
}

impl Reorder {
    /// `first` is the first sequence expected (1 on a fresh channel).
    pub fn new(first: u64, max_pending: u64) -> Reorder {
        Reorder {
            next: first,
            high: first - 1,
            pending: BTreeMap::new(),
            nacked: BTreeMap::new(),
            max_pending,
        }
    }

    /// Highest sequence delivered in order (the cumulative ack).
    pub fn acked(&self) -> u64 {
        self.next - 1
    }

    /// Highest sequence known to exist (seen, or announced by a heartbeat).
    pub fn high(&self) -> u64 {
        self.high
    }

    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    pub fn on_log(
        &mut self,
        seq: u64,
        payload: &[u8],
        deliver: &mut impl FnMut(u64, &[u8]),
    ) -> Outcome {
        if seq < self.next || self.pending.contains_key(&seq) {
            return Outcome::Duplicate;
        }
        if seq - self.next > self.max_pending {
            self.high = self.high.max(seq);
            return Outcome::TooFar;
        }
        self.high = self.high.max(seq);
        if seq != self.next {
            self.pending.insert(seq, payload.to_vec());
            return Outcome::Buffered;
        }
        deliver(seq, payload);
        self.next += 1;
        let mut drained = 0;
        while let Some(p) = self.pending.remove(&self.next) {
            deliver(self.next, &p);
            self.next += 1;
            drained += 1;
        }
        // Forget nack timers for what is now delivered.
        self.nacked = self.nacked.split_off(&self.next);
        Outcome::Delivered(drained)
    }

    /// A heartbeat announced that entries up to `last_assigned` exist.
    pub fn on_heartbeat(&mut self, last_assigned: u64) {
        self.high = self.high.max(last_assigned);
    }

    /// Missing entries to ask for now, oldest first, at most `burst`: not received, and
    /// not asked for within `retry * 2^(asks-1)` (exponential backoff, capped at 32x).
    /// Backing off matters: re-asking for every gap at a fixed short interval turns a
    /// loss burst into a nack/retransmit storm that overflows the very queues that lost
    /// the frames (congestion collapse).
    pub fn nacks(&mut self, now: Instant, retry: Duration, burst: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut s = self.next;
        let limit = self.high.min(self.next.saturating_add(self.max_pending));
        while s <= limit && out.len() < burst {
            if !self.pending.contains_key(&s) {
                let (due, asks) = match self.nacked.get(&s) {
                    None => (true, 0),
                    Some(&(t, n)) => (now.duration_since(t) >= retry * (1u32 << n.min(5)) / 2, n),
                };
                if due {
                    out.push(s);
                    self.nacked.insert(s, (now, asks + 1));
                }
            }
            s += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(r: &mut Reorder, seq: u64, got: &mut Vec<u64>) -> Outcome {
        r.on_log(seq, &seq.to_le_bytes(), &mut |s, p| {
            assert_eq!(p, s.to_le_bytes());
            got.push(s)
        })
    }

    #[test]
    fn in_order_and_gap_repair_deliver_exactly_once() {
        let mut r = Reorder::new(1, 1000);
        let mut got = vec![];
        assert_eq!(run(&mut r, 1, &mut got), Outcome::Delivered(0));
        assert_eq!(run(&mut r, 3, &mut got), Outcome::Buffered);
        assert_eq!(run(&mut r, 4, &mut got), Outcome::Buffered);
        assert_eq!(run(&mut r, 3, &mut got), Outcome::Duplicate);
        assert_eq!(r.acked(), 1);
        let t = Instant::now();
        assert_eq!(r.nacks(t, Duration::from_millis(5), 10), vec![2]);
        assert!(
            r.nacks(t, Duration::from_millis(5), 10).is_empty(),
            "not again before retry"
        );
        assert_eq!(
            r.nacks(t + Duration::from_millis(5), Duration::from_millis(5), 10),
            vec![2]
        );
        assert_eq!(run(&mut r, 2, &mut got), Outcome::Delivered(2));
        assert_eq!(run(&mut r, 1, &mut got), Outcome::Duplicate);
        assert_eq!(got, vec![1, 2, 3, 4]);
        assert_eq!(r.acked(), 4);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn heartbeat_reveals_lost_tail() {
        let mut r = Reorder::new(1, 1000);
        let mut got = vec![];
        run(&mut r, 1, &mut got);
        r.on_heartbeat(3);
        assert_eq!(r.nacks(Instant::now(), Duration::ZERO, 10), vec![2, 3]);
    }

    #[test]
    fn far_ahead_is_refused_and_nack_burst_bounded() {
        let mut r = Reorder::new(1, 8);
        let mut got = vec![];
        assert_eq!(run(&mut r, 100, &mut got), Outcome::TooFar);
        let n = r.nacks(Instant::now(), Duration::ZERO, 4);
        assert_eq!(n, vec![1, 2, 3, 4]);
        assert!(got.is_empty());
    }
}
