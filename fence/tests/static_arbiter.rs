//! Backend `none` (in memory) keeps the same pairing rules as the real backends.
mod common;

use std::sync::Arc;

use common::pairing_scenario;
use ft_fence::{Arbiter, StaticArbiter};

#[tokio::test]
async fn a_paired_follower_takes_over_at_once_and_races_a_solo_owner() {
    let arb: Arc<dyn Arbiter> = Arc::new(StaticArbiter::new());
    pairing_scenario(arb.clone(), arb.clone(), arb, "vm-pair", 20).await;
}
