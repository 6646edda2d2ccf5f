//! Control frames sent by userspace on the logging link.
use ft_common::wire::*;
use zerocopy::IntoBytes;

use super::keys::ChannelKeys;

/// Builds a control frame (ack, nack, VMNACK, leave, heartbeat) with header `ft`. The
/// control kinds (`kind_is_tagged`: all of these) get `len` = `TAG_LEN` and their tag
/// under the key `keys` sends under (named in `key_id`, the newest held in `key_adv`)
/// as the payload.
pub fn control_frame(keys: &ChannelKeys, src: [u8; 6], dst: [u8; 6], mut ft: FtHdr) -> Vec<u8> {
    let tagged = kind_is_tagged(ft.kind);
    let sender = keys.sender();
    let key = sender.key;
    (ft.key_id, ft.key_adv) = (sender.id, sender.adv);
    if tagged {
        ft.len.set(TAG_LEN as u16);
    }
    let eth = EthHdr::ft(dst, src);
    let mut v = if tagged {
        TaggedHdr {
            eth,
            ft,
            tag: key.tag(&ft).into(),
        }
        .as_bytes()
        .to_vec()
    } else {
        LogHdr { eth, ft }.as_bytes().to_vec()
    };
    // Pad to the Ethernet minimum so that NICs that pad do not change the length. A nack
    // is padded to a full log frame: the primary's XDP rewrites it in place into the
    // missing entry, and shrinking a frame always works where growing it may not (the
    // driver decides the tailroom).
    let size = if ft.kind == KIND_NACK {
        LOG_OVERHEAD + MAX_FRAME
    } else {
        60
    };
    v.resize(size.max(v.len()), 0);
    v
}

/// A control frame's header: `kind`, `session`, `epoch`, `seq` and `aux`.
pub fn hdr(kind: u8, session: u64, epoch: u64, seq: u64, aux: u64) -> FtHdr {
    let mut ft = FtHdr::new(kind, session, epoch, seq);
    ft.aux.set(aux);
    ft
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::auth::ChannelKey;

    fn key() -> ChannelKey {
        ChannelKey::from_bytes([3; 16])
    }

    fn keys() -> ChannelKeys {
        ChannelKeys::single(key())
    }

    #[test]
    fn control_frames_parse_back_with_their_tags() {
        let f = control_frame(&keys(), [1; 6], [2; 6], hdr(KIND_NACK, 0x5e55, 9, 77, 0));
        assert_eq!(f.len(), LOG_OVERHEAD + MAX_FRAME);
        let ack = control_frame(&keys(), [1; 6], [2; 6], hdr(KIND_ACK, 0x5e55, 9, 77, 5));
        assert_eq!(ack.len(), TAGGED_HLEN);
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
        assert_eq!(h.eth.src, [1; 6]);
        assert!(tag_valid(&key().sip(), &h.ft, payload));
        assert_eq!(h.ft.key_id, ft_common::wire::key_id(&key().sip()));
        assert_eq!(h.ft.key_adv, h.ft.key_id);
        let (h, payload) = parse_log_frame(&ack).unwrap();
        assert_eq!(h.ft.aux.get(), 5);
        assert!(tag_valid(&key().sip(), &h.ft, payload));
        assert!(!tag_valid(
            &ChannelKey::from_bytes([4; 16]).sip(),
            &h.ft,
            payload
        ));
        // Heartbeats (the primary's) are tagged too.
        let hb = control_frame(&keys(), [1; 6], [2; 6], hdr(KIND_HEARTBEAT, 1, 9, 77, 5));
        assert_eq!(hb.len(), TAGGED_HLEN);
        let (h, payload) = parse_log_frame(&hb).unwrap();
        assert_eq!((h.ft.kind, h.ft.aux.get()), (KIND_HEARTBEAT, 5));
        assert!(tag_valid(&key().sip(), &h.ft, payload));
    }
}
