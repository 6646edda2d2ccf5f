//! Primary: answers the backup's `VMNACK`s from the VMM stream's store (the input stream
//! is repaired in the kernel), and hears its `LEAVE`. XDP verified their tags before it
//! passed them up; they are verified here again, so nothing that reaches this socket by
//! another path (a frame the data plane did not see) is believed without the key.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use ft_common::wire::*;
use tracing::{debug, warn};

use super::keys::ChannelKeys;
use crate::{
    netif::{Interface, NetifError, RawSocket},
    vm::sink::{VmLogStats, VmLogStore},
};

/// What the backup said when it left.
pub type OnLeave = Box<dyn Fn(u64) + Send>;

pub fn run(
    iface: &Interface,
    keys: &ChannelKeys,
    store: Arc<VmLogStore>,
    stats: Arc<VmLogStats>,
    on_leave: OnLeave,
    stop: Arc<AtomicBool>,
) -> Result<(), NetifError> {
    let sock = RawSocket::open_rx(iface, ETHERTYPE_FT)?;
    let mut buf = vec![0u8; 4096];
    while !stop.load(Relaxed) {
        let Ok(Some(n)) = sock.recv(&mut buf, Duration::from_millis(50)) else {
            continue;
        };
        // XDP checked peer, session, epoch and tag before passing the frame up.
        let Ok((hdr, payload)) = parse_log_frame(&buf[..n]) else {
            continue;
        };
        if kind_is_tagged(hdr.ft.kind)
            && !keys
                .by_id(hdr.ft.key_id)
                .is_some_and(|k| tag_valid(&k.sip(), &hdr.ft, payload))
        {
            stats.bad_tags.fetch_add(1, Relaxed);
            warn!(
                kind = hdr.ft.kind,
                "a backup frame with a wrong or missing tag ignored"
            );
            continue;
        }
        match hdr.ft.kind {
            KIND_VMNACK => {
                let seq = hdr.ft.seq.get();
                match store.get(seq) {
                    Some(f) => match sock.send(&f) {
                        Ok(()) => {
                            stats.retransmits.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            stats.send_errors.fetch_add(1, Relaxed);
                            debug!("VMLOG {seq} retransmission failed: {e}");
                        }
                    },
                    None => debug!("VMNACK for {seq}: not in the store (acked meanwhile)"),
                }
            }
            KIND_LEAVE => {
                warn!(reason = hdr.ft.aux.get(), "the backup left the log");
                on_leave(hdr.ft.aux.get());
            }
            _ => {}
        }
    }
    Ok(())
}
