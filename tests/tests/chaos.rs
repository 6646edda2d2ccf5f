//! The chaos suite's CI run: a short fault schedule with a fixed seed (the same every
//! run), checked like the long runs of `cargo xtask chaos` (see `ft_testbed::chaos`).
use ft_testbed::chaos::{ChaosOptions, run};

/// The seed of CI's run; `cargo xtask chaos --faults 8 --seed 11` replays it.
const SEED: u64 = 11;

#[test]
fn chaos_short_run_with_a_fixed_seed() {
    let dir = std::env::temp_dir().join("ft-chaos-ci");
    let o = ChaosOptions::new(8, SEED, dir);
    let report = run(&o, &mut |line| eprintln!("{line}")).unwrap();
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    assert!(
        report.failovers() > 0,
        "the schedule caused no failover: {report}"
    );
}
