//! Checks of a chaos history.
//!
//! - **Linearizability** of every rotating key, by stateright's `LinearizabilityTester`
//!   against a sequential register with INCR. Linearizability is local (a history is
//!   linearizable iff each object's is), so keys are checked one by one. Calls whose
//!   outcome is unknown stay in flight forever: the tester may place them anywhere after
//!   their invocation, or nowhere. Calls that failed with an error reply did not happen.
//! - **The counter**: INCR replies of `ctr` are unique, and increase in real-time order
//!   (a reply received before another call was sent is smaller).
//! - **No acknowledged write lost** is part of linearizability: the history of every
//!   key ends with a read made after the run ([`super::history::final_reads`]).
use std::collections::BTreeMap;

use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

use super::history::{COUNTER_KEY, Call, Op, Outcome, Ret};

/// The sequential specification of one key: absent or an integer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Register(Option<i64>);

impl SequentialSpec for Register {
    type Op = Op;
    type Ret = Ret;

    fn invoke(&mut self, op: &Op) -> Ret {
        match *op {
            Op::Get => Ret::Value(self.0),
            Op::Set(v) => {
                self.0 = Some(v);
                Ret::Ok
            }
            Op::Incr => {
                let n = self.0.unwrap_or(0) + 1;
                self.0 = Some(n);
                Ret::Int(n)
            }
        }
    }
}

/// The verdict on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyVerdict {
    Linearizable,
    NotLinearizable,
}

/// Checks one key's calls (any order); `Err` if the history is malformed.
pub fn check_key(calls: &[&Call]) -> Result<KeyVerdict, String> {
    // Events in real-time order; at equal times invocations first (treating the two
    // calls as concurrent, never inventing an order that was not observed).
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(calls.len() * 2);
    for (i, c) in calls.iter().enumerate() {
        match c.outcome {
            Outcome::Failed(_) => continue,
            Outcome::Ok(_) => {
                events.push((c.invoked_ns, 0, i));
                events.push((c.returned_ns, 1, i));
            }
            Outcome::Unknown(_) => events.push((c.invoked_ns, 0, i)),
        }
    }
    events.sort_unstable();
    let mut t = LinearizabilityTester::<u64, Register>::new(Register::default());
    for (_, kind, i) in events {
        let c = calls[i];
        if kind == 0 {
            t.on_invoke(c.thread, c.op)?;
        } else if let Outcome::Ok(r) = c.outcome {
            t.on_return(c.thread, r)?;
        }
    }
    Ok(if t.is_consistent() {
        KeyVerdict::Linearizable
    } else {
        KeyVerdict::NotLinearizable
    })
}

/// The outcome of the linearizability check of all rotating keys.
#[derive(Clone, Debug, Default)]
pub struct LinReport {
    pub keys: usize,
    /// Keys whose history is not linearizable, with their calls' count.
    pub violations: Vec<(String, usize)>,
    pub errors: Vec<String>,
}

impl LinReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.errors.is_empty()
    }
}

/// Checks every rotating key (the counter is checked by [`check_counter`]).
pub fn check_keys(calls: &[Call]) -> LinReport {
    let mut by_key: BTreeMap<&str, Vec<&Call>> = BTreeMap::new();
    for c in calls.iter().filter(|c| c.key != COUNTER_KEY) {
        by_key.entry(c.key.as_str()).or_default().push(c);
    }
    let keys: Vec<(&str, Vec<&Call>)> = by_key.into_iter().collect();
    // Keys are independent: check them on every core.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = keys.len().div_ceil(workers).max(1);
    let parts: Vec<LinReport> = std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    let mut r = LinReport::default();
                    for (k, cs) in part {
                        match check_key(cs) {
                            Ok(KeyVerdict::Linearizable) => {}
                            Ok(KeyVerdict::NotLinearizable) => {
                                r.violations.push((k.to_string(), cs.len()))
                            }
                            Err(e) => r.errors.push(format!("{k}: {e}")),
                        }
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a checker thread panicked"))
            .collect()
    });
    let mut r = LinReport {
        keys: keys.len(),
        ..Default::default()
    };
    for p in parts {
        r.violations.extend(p.violations);
        r.errors.extend(p.errors);
    }
    r
}

/// INCR replies of the counter: unique, and increasing in real-time order. The first
/// problem found, if any.
pub fn check_counter(calls: &[Call]) -> Result<usize, String> {
    let mut got: Vec<(u64, u64, i64)> = calls
        .iter()
        .filter(|c| c.key == COUNTER_KEY)
        .filter_map(|c| match c.outcome {
            Outcome::Ok(Ret::Int(v)) => Some((c.invoked_ns, c.returned_ns, v)),
            _ => None,
        })
        .collect();
    let mut values: Vec<i64> = got.iter().map(|g| g.2).collect();
    values.sort_unstable();
    if let Some(w) = values.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("INCR {COUNTER_KEY} answered {} twice", w[0]));
    }
    // Every reply received before a call was sent must be smaller than its reply.
    got.sort_unstable_by_key(|g| g.1);
    let mut prefix_max = Vec::with_capacity(got.len());
    let mut m = i64::MIN;
    for g in &got {
        m = m.max(g.2);
        prefix_max.push(m);
    }
    for &(sent, _, v) in &got {
        let k = got.partition_point(|g| g.1 < sent);
        if k > 0 && prefix_max[k - 1] >= v {
            return Err(format!(
                "INCR {COUNTER_KEY} answered {v} to a call sent after {} had been answered",
                prefix_max[k - 1]
            ));
        }
    }
    Ok(got.len())
}

/// The longest stretch of the run (ns) in which no call was answered, with where it
/// began; between `from_ns` and `to_ns`.
pub fn longest_gap(calls: &[Call], from_ns: u64, to_ns: u64) -> (u64, u64) {
    let mut done: Vec<u64> = calls
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Ok(_)))
        .map(|c| c.returned_ns)
        .filter(|t| (from_ns..=to_ns).contains(t))
        .collect();
    done.sort_unstable();
    let mut best = (0, from_ns);
    let mut prev = from_ns;
    for t in done.into_iter().chain(std::iter::once(to_ns)) {
        if t - prev > best.0 {
            best = (t - prev, prev);
        }
        prev = t;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(thread: u64, key: &str, op: Op, t: (u64, u64), outcome: Outcome) -> Call {
        Call {
            client: thread as usize,
            thread,
            key: key.into(),
            op,
            invoked_ns: t.0,
            returned_ns: t.1,
            outcome,
        }
    }

    #[test]
    fn a_stale_read_after_a_write_is_not_linearizable() {
        let h = [
            call(1, "k", Op::Set(5), (0, 10), Outcome::Ok(Ret::Ok)),
            call(2, "k", Op::Get, (20, 30), Outcome::Ok(Ret::Value(None))),
        ];
        assert_eq!(check_keys(&h).violations.len(), 1);
        // Overlapping, the same read is fine.
        let h = [
            call(1, "k", Op::Set(5), (0, 25), Outcome::Ok(Ret::Ok)),
            call(2, "k", Op::Get, (20, 30), Outcome::Ok(Ret::Value(None))),
        ];
        assert!(check_keys(&h).ok());
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught_by_the_final_read() {
        let h = [
            call(1, "k", Op::Incr, (0, 10), Outcome::Ok(Ret::Int(1))),
            call(2, "k", Op::Incr, (12, 20), Outcome::Ok(Ret::Int(2))),
            call(
                9,
                "k",
                Op::Get,
                (100, 110),
                Outcome::Ok(Ret::Value(Some(1))),
            ),
        ];
        assert_eq!(check_keys(&h).violations, vec![("k".to_string(), 3)]);
    }

    #[test]
    fn an_unknown_call_may_or_may_not_have_happened() {
        for seen in [Some(1), None] {
            let h = [
                call(
                    1,
                    "k",
                    Op::Incr,
                    (0, 50),
                    Outcome::Unknown("timeout".into()),
                ),
                call(2, "k", Op::Get, (100, 110), Outcome::Ok(Ret::Value(seen))),
            ];
            assert!(check_keys(&h).ok(), "{seen:?}");
        }
        // But it cannot have happened twice.
        let h = [
            call(
                1,
                "k",
                Op::Incr,
                (0, 50),
                Outcome::Unknown("timeout".into()),
            ),
            call(
                2,
                "k",
                Op::Get,
                (100, 110),
                Outcome::Ok(Ret::Value(Some(2))),
            ),
        ];
        assert!(!check_keys(&h).ok());
        // A failed call did not happen.
        let h = [
            call(1, "k", Op::Set(3), (0, 5), Outcome::Failed("-ERR".into())),
            call(2, "k", Op::Get, (10, 20), Outcome::Ok(Ret::Value(Some(3)))),
        ];
        assert!(!check_keys(&h).ok());
    }

    #[test]
    fn counter_replies_must_be_unique_and_ordered() {
        let ok = |v| Outcome::Ok(Ret::Int(v));
        let h = [
            call(1, COUNTER_KEY, Op::Incr, (0, 10), ok(1)),
            call(2, COUNTER_KEY, Op::Incr, (5, 15), ok(2)),
        ];
        assert_eq!(check_counter(&h), Ok(2));
        let h = [
            call(1, COUNTER_KEY, Op::Incr, (0, 10), ok(2)),
            call(2, COUNTER_KEY, Op::Incr, (20, 30), ok(1)),
        ];
        assert!(check_counter(&h).is_err());
        let h = [
            call(1, COUNTER_KEY, Op::Incr, (0, 10), ok(1)),
            call(2, COUNTER_KEY, Op::Incr, (5, 30), ok(1)),
        ];
        assert!(check_counter(&h).is_err());
    }

    #[test]
    fn gaps() {
        let ok = Outcome::Ok(Ret::Ok);
        let h = [
            call(1, "k", Op::Set(1), (0, 10), ok.clone()),
            call(1, "k", Op::Set(1), (10, 15), ok.clone()),
            call(1, "k", Op::Set(1), (15, 90), ok),
        ];
        assert_eq!(longest_gap(&h, 0, 100), (75, 15));
    }
}
