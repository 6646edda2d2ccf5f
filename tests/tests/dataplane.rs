//! End-to-end tests of the data plane on the namespace testbed: real kernel, real XDP/tc,
//! real daemons. Run as root after `cargo build --bins`.
use std::time::Duration;

use ft_testbed::{Appliance, ApplianceOptions, Testbed, TestbedOptions, UdpClient, names::*};

const T: Duration = Duration::from_secs(2);

fn standin_state(vm_ns: &str) -> String {
    let c = UdpClient::new(vm_ns, ([127, 0, 0, 1], STANDIN_PORT).into()).unwrap();
    c.request("STATE", T)
        .unwrap()
        .expect("stand-in answers STATE on loopback")
}

#[test]
fn request_reply_replicated_to_backup() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    let app = Appliance::start(&tb, &ApplianceOptions::default()).unwrap();
    let c = tb.vm_client().unwrap();
    assert_eq!(c.request("SET k 41", T).unwrap().as_deref(), Some("OK"));
    assert_eq!(c.request("INCR k", T).unwrap().as_deref(), Some("42"));
    assert_eq!(c.request("GET k", T).unwrap().as_deref(), Some("42"));
    // The backup's replica received the same inputs in the same order.
    assert!(Appliance::wait_until(T, || standin_state(&tb.a.vm_ns)
        == standin_state(&tb.b.vm_ns)));
    assert!(app.counter('a', "log_duplicated_frames_total") >= 3);
    assert!(app.counter('a', "output_released_frames_total") >= 3);
    assert!(app.counter('b', "log_received_frames_total") >= 3);
    assert!(
        app.counter('b', "vm_output_suppressed") >= 3,
        "backup replica replied, suppressed"
    );
}
