//! Replayed frames: RX_FRAME entries carry the bytes, RX_FRAME_REF entries name a frame
//! in the [`FrameStore`] by (epoch, sequence). A referenced frame that is not there yet
//! is waited for; a go-live request while it is still missing makes the backup go live
//! at this exit (the frame never reached the backup's guest, so nothing it did depends
//! on it); delivered frames are evicted from the store.
use super::*;
use crate::hash::fnv1a;
use crate::vmlog::{FrameKey, FrameWait};
use ft_common::vmlog::{EV_RX_FRAME, EV_RX_FRAME_REF};

/// How long one wait on the store lasts before stop/go-live requests are re-checked.
const FRAME_POLL: Duration = Duration::from_millis(20);

impl Vmm {
    /// Delivers the logged frames of this exit (replay). May go live instead.
    pub(super) fn replay_frames(&mut self) -> Result<()> {
        loop {
            // Looked at, not consumed: a frame that never arrives leaves its entry (and
            // everything after it) unconsumed when the VMM goes live here.
            let Some(e) = self.peek_if(&[EV_RX_FRAME, EV_RX_FRAME_REF])? else {
                return Ok(());
            };
            let reference = (e.kind() == EV_RX_FRAME_REF)
                .then(|| (e.frame_key(), e.hdr.arg.get() as usize, e.hdr.aux.get()));
            if self.nic.rx_free(&self.vm.ram)? == 0 {
                return Err(
                    self.divergence("log delivers a frame but the backup's RX ring is full".into())
                );
            }
            match reference {
                None => {
                    let e = self.take_if(&[EV_RX_FRAME])?.expect("peeked");
                    self.nic.deliver(&mut self.vm.ram, &e.payload)?;
                }
                Some((None, _, _)) => {
                    return Err(Error::BadEntry {
                        exit: self.exits,
                        what: "rx-frame-ref entry without its 8-byte epoch".into(),
                    });
                }
                Some((Some(key), len, hash)) => {
                    let Some(frame) = self.fetch_frame(key)? else {
                        return Ok(()); // went live
                    };
                    if frame.len() != len || fnv1a(&frame, FNV_OFFSET) != hash {
                        return Err(self.divergence(format!(
                            "frame ({key}) from the frame store does not match the logged length/hash"
                        )));
                    }
                    self.take_if(&[EV_RX_FRAME_REF])?.expect("peeked");
                    self.nic.deliver(&mut self.vm.ram, &frame)?;
                    self.evict_frames(key);
                }
            }
            // As on the primary: delivered frames make the NIC interrupt pending.
            if self.nic.irq_enabled {
                self.pending_irqs |= PENDING_NIC;
            }
        }
    }

    /// The referenced frame, waiting for it; `None` if the VMM went live instead.
    fn fetch_frame(&mut self, key: FrameKey) -> Result<Option<Vec<u8>>> {
        let missing = |vmm: &Vmm, reason| Error::FrameMissing {
            key,
            exit: vmm.exits,
            reason,
        };
        let Some(store) = self.frames.clone() else {
            return Err(missing(
                self,
                "no frame store is attached to the replaying VMM",
            ));
        };
        if let Some(f) = store.get(key) {
            return Ok(Some(f));
        }
        self.stats.frame_waits += 1;
        self.publish_live();
        let t0 = Instant::now();
        loop {
            let closed = match store.wait(key, FRAME_POLL) {
                FrameWait::Ready(f) => return Ok(Some(f)),
                FrameWait::NotYet => false,
                FrameWait::Closed => true,
                FrameWait::Never(why) => return Err(missing(self, why)),
            };
            if self.control.stop_requested() {
                return Err(Error::Stopped);
            }
            if self.control.go_live_requested() {
                // The daemon puts every frame it received before it requests go-live:
                // one last look, then this entry and all after it are beyond what can be
                // replayed.
                if let Some(f) = store.get(key) {
                    return Ok(Some(f));
                }
                if self.cfg.console_echo {
                    eprintln!(
                        "ft-vmm: frame ({key}) never arrived; going live at exit {}",
                        self.exits
                    );
                }
                self.go_live()?;
                return Ok(None);
            }
            if closed {
                return Err(missing(self, "the frame store was closed"));
            }
            if self
                .cfg
                .frame_wait_timeout
                .is_some_and(|t| t0.elapsed() >= t)
            {
                return Err(missing(self, "it did not arrive within frame_wait_timeout"));
            }
        }
    }

    /// After delivering `key`: drops it and everything at or below the reorder window.
    fn evict_frames(&self, key: FrameKey) {
        let Some(store) = self.frames.as_ref() else {
            return;
        };
        store.remove(key);
        if let Some(l) = self.live.as_ref() {
            l.last_frame_epoch
                .store(key.epoch, std::sync::atomic::Ordering::Relaxed);
            l.last_frame_seq
                .store(key.seq, std::sync::atomic::Ordering::Relaxed);
        }
        let w = self.cfg.frame_reorder_window;
        if key.seq > w {
            store.evict_through(FrameKey {
                epoch: key.epoch,
                seq: key.seq - w,
            });
        } else if key.epoch > 0 {
            // Still evict every older epoch.
            store.evict_through(FrameKey {
                epoch: key.epoch - 1,
                seq: u64::MAX,
            });
        }
    }
}
