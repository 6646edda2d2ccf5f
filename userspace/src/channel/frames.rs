//! Control frames sent by userspace on the logging link.
use ft_common::wire::*;
use zerocopy::{IntoBytes, byteorder::network_endian::U16};

/// Builds a payload-less logging-link frame (ack, nack, heartbeat, leave).
pub fn control_frame(
    kind: u8,
    src: [u8; 6],
    dst: [u8; 6],
    session: u64,
    epoch: u64,
    seq: u64,
    aux: u64,
) -> Vec<u8> {
    let mut ft = FtHdr::new(kind, session, epoch, seq);
    ft.aux.set(aux);
    let hdr = LogHdr {
        eth: EthHdr {
            dst,
            src,
            ethertype: U16::new(ETHERTYPE_FT),
        },
        ft,
    };
    let mut v = hdr.as_bytes().to_vec();
    // Pad to the Ethernet minimum so that NICs that pad do not change the length. A nack
    // is padded to a full log frame: the primary's XDP rewrites it in place into the
    // missing entry, and shrinking a frame always works where growing it may not (the
    // driver decides the tailroom).
    let size = if kind == KIND_NACK {
        LOG_OVERHEAD + MAX_FRAME
    } else {
        60
    };
    v.resize(size, 0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_parse_back() {
        let f = control_frame(KIND_NACK, [1; 6], [2; 6], 0x5e55, 9, 77, 0);
        assert_eq!(f.len(), LOG_OVERHEAD + MAX_FRAME);
        assert_eq!(
            control_frame(KIND_ACK, [1; 6], [2; 6], 0x5e55, 9, 77, 0).len(),
            60
        );
        let (h, payload) = parse_log_frame(&f).unwrap();
        assert_eq!(
            (
                h.ft.kind,
                h.ft.session.get(),
                h.ft.epoch.get(),
                h.ft.seq.get()
            ),
            (KIND_NACK, 0x5e55, 9, 77)
        );
        assert!(payload.is_empty());
        assert_eq!(h.eth.src, [1; 6]);
    }
}
