//! Malformed input is dropped and counted, never a crash: the REAL data-plane programs run
//! with `BPF_PROG_RUN` (`BPF_PROG_TEST_RUN`) on valid frames, on random bytes and on
//! mutations of the valid frames.
//!
//! The programs are the eBPF object `ftd` embeds ([`ftd::dataplane::EBPF_OBJECT`]), loaded
//! the way `DataPlane::start` loads it (same map sizes set at load, every program loaded
//! and verified, the release continuation in `RELEASE_MORE`) but attached to nothing: each
//! test configures `CONFIG`/`NODE`/`SEQ`/`CHAN` as a primary, solo, standby or backup node
//! would have them (session, epoch, role, lease, MACs, tag key; a primary with 200 logged
//! input frames in `RETX` and 200 output frames held behind its acks) and hands frames to
//! one program with aya's `TestRun` (the `BPF_PROG_TEST_RUN` command, `repeat` = 1). Each
//! test moves its thread into a private network namespace with its loopback up, so the
//! hold ring's `bpf_clone_redirect` (to `client_ifindex` = that loopback) really emits and
//! nothing reaches the host's network.
//!
//! Every case is checked against a model of what the program must do with that exact
//! frame in that exact state, written from the checks the data plane promises
//! (ARCHITECTURE.md, `ft_common::wire`): the returned action, every counter of
//! `COUNTERS`, `SEQ`, the hold ring's head and tail, and `NODE`/`CONFIG`/`CHAN` (which
//! no program may change), plus the frame that comes out where it matters (a repaired
//! NACK, a log frame, a released frame, a held copy). In particular:
//!
//! - (a) every run returns the action the model names, so never `XDP_ABORTED`, and the
//!   syscall never fails, except where the kernel refuses to inject a frame at all
//!   (`EINVAL`, the program does not run; checked): shorter than an Ethernet header, and
//!   for tc programs an IPv4 or IPv6 frame shorter than its IP header;
//! - (b) a frame that is not exactly a valid one of its kind never advances `SEQ.acked`
//!   or `SEQ.vm_acked`, never releases held output, never assigns a sequence number,
//!   never stamps the peer as alive; a valid frame does exactly what its content says
//!   (an ack advances the acks to its values and releases exactly the held frames they
//!   cover, in ring order, the whole ring by one ack through the tail call);
//! - (c) every frame that is dropped is counted: exactly one `ft_drops_total` counter
//!   moves, by one, and it is one of the reasons that apply to the frame (where several
//!   checks fail, any of them: the test does not fix the order of the checks; the
//!   single-fault cases in `logging_link_each_check_drops_with_its_reason` do).
//!
//! Programs and frames: `ft_log_rx` (XDP, logging NIC) with ACK, NACK, VMNACK, LEAVE,
//! HEARTBEAT, LOG and VMLOG frames as primary (also solo and standby) and as backup, and
//! `ft_log_tc` on whatever `ft_log_rx` passes up (the ack path that releases output);
//! `ft_client_rx` (XDP, client NIC) with client frames in every role; `ft_vm_tc` (tc,
//! VM side: the hold ring) with frames from the VM; `ft_client_egress` (the fence guard).
//! About 13 500 cases: random ones (proptest, fixed seed and counts; `PROPTEST_RNG_SEED`
//! picks others) and every truncation length of the seeds; a few seconds in all.
//!
//! The model names one outcome per frame (apart from the order of failing header
//! checks, (c)), except where it depends on what the test cannot fix: a NACK too short
//! to grow depends on the driver's tailroom. The backup's `len` checks are exact: a
//! heartbeat whose `len` is not 0, and a LOG or VMLOG frame whose `len` is above
//! `MAX_FRAME` or past the frame's end, are dropped as `malformed` before anything counts
//! them as received or stamps the primary alive
//! (`logging_link_each_check_drops_with_its_reason` has each as a single fault).
//!
//! The backup's log receive is checked whole: a valid LOG, VMLOG or heartbeat frame is
//! copied into `LOG_RING` (the test drains the ring after every case and compares each
//! record with the frame), and an in-order LOG or VMLOG frame (its sequence right after
//! the stream's `KACK` field, the primary's session known) raises `KACK` and comes out as
//! the tagged cumulative ack of both streams (`XDP_TX`); any other buffered frame is
//! consumed (`XDP_DROP`, no drop counted: it is buffered, not lost). No frame ever puts a
//! record in the ring that is not exactly a valid frame, and nothing else moves `KACK`.
//!
//! Not reachable this way: `ft_strip` (a devmap program: the kernel refuses to test-run
//! those), the redirects themselves (without `BPF_F_TEST_XDP_LIVE_FRAMES` a test run
//! returns `XDP_REDIRECT` and sends nothing), a full `LOG_RING` (8 MiB), and several
//! CPUs racing on the maps.
//!
//! `FT_TEST_EBPF_OBJECT=<file>` runs the tests against another build of ebpf/programs,
//! e.g. one with a check broken on purpose, without rebuilding ftd.
use std::{cell::RefCell, collections::BTreeMap, ops::Range, process::Command};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapError, PerCpuArray, ProgramArray, RingBuf},
    programs::{Program, ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use ft_common::{
    maps::{Config as MapConfig, *},
    siphash::SipKey,
    wire::*,
};
use ftd::dataplane::EBPF_OBJECT;
use proptest::{
    collection::vec,
    prelude::*,
    sample::select,
    test_runner::{Config as PtConfig, RngSeed, TestCaseError, TestRunner},
};
use zerocopy::{FromBytes, IntoBytes, byteorder::network_endian::U16};

// ---- the node under test ----------------------------------------------------------------

const EPOCH: u64 = 7;
const SESSION: u64 = 0x5e55_1011_2233_4455;
/// This node's logging-NIC MAC and the peer's: frames under test come from PEER to OWN.
const OWN: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];
const VM_MAC: [u8; 6] = [0x02, 0xf7, 0, 0, 0, 0x64];
const VM_IP: [u8; 4] = [10, 0, 0, 100];
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 1];
const CLIENT_IP: [u8; 4] = [10, 0, 0, 1];
/// The smallest sizes ftd accepts: a 1024-entry store (window 512) and a hold ring larger
/// than one program run releases (192), so a full release needs the tail call.
const RETX_SLOTS: u32 = 1024;
const HOLD_SLOTS: u32 = 256;
/// The loopback of the test's private namespace: where released frames go.
const LO_IFINDEX: u32 = 1;

const ETHERTYPE_IPV6: u16 = 0x86dd;

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

fn config() -> MapConfig {
    MapConfig {
        retx_mask: RETX_SLOTS as u64 - 1,
        hold_mask: HOLD_SLOTS as u64 - 1,
        window: RETX_SLOTS as u64 - RETX_MARGIN,
        flags: CFG_HOLD_OUTPUT | CFG_KERNEL_ACKS,
        client_ifindex: LO_IFINDEX,
        log_ifindex: LO_IFINDEX,
        vm_ifindex: LO_IFINDEX,
        vm_ipv4: VM_IP,
        vm_mac: VM_MAC,
        own_log_mac: OWN,
        peer_log_mac: PEER,
        session: SESSION,
        ..Default::default()
    }
}

fn node(role: u32) -> NodeState {
    NodeState {
        epoch: EPOCH,
        lease_deadline_ns: u64::MAX,
        role,
        _pad: 0,
    }
}

// ---- the backup's tagged frames: the only place that knows the tag -------------------

/// The channel key both nodes share (`[channel] key_file`).
fn tag_key() -> SipKey {
    SipKey::from_bytes(b"bpf-prog-run-key")
}

/// The log frames' MAC key of [`tag_key`] (derived once).
fn mac_key() -> &'static MacKey {
    static K: std::sync::OnceLock<MacKey> = std::sync::OnceLock::new();
    K.get_or_init(|| MacKey::derive(&tag_key()))
}

/// Its id (`wire::key_id`): every frame names it (`key_id`) and advertises it as the
/// newest held (`key_adv`).
fn kid() -> u8 {
    key_id(&tag_key())
}

/// A header naming the key (what every sender makes).
fn hdr(kind: u8, session: u64, epoch: u64, seq: u64) -> FtHdr {
    let mut ft = FtHdr::new(kind, session, epoch, seq);
    ft.key_id = kid();
    ft.key_adv = kid();
    ft
}

/// A frame the backup sends to the primary (ACK, NACK, VMNACK, LEAVE), as its daemon
/// builds it (`channel::frames::control_frame`): headers, `len` = the tag's length, the
/// tag (keyed SipHash of the header), then padding (a NACK to a full log frame, so the
/// primary's repair only shrinks it).
fn backup_frame(kind: u8, session: u64, epoch: u64, seq: u64, aux: u64) -> Vec<u8> {
    let mut ft = hdr(kind, session, epoch, seq);
    ft.aux.set(aux);
    ft.len.set(TAG_LEN as u16);
    let mut f = TaggedHdr {
        eth: eth(OWN, PEER, ETHERTYPE_FT),
        ft,
        tag: frame_tag(&tag_key(), &ft).into(),
    }
    .as_bytes()
    .to_vec();
    if kind == KIND_NACK {
        f.resize(LOG_OVERHEAD + MAX_FRAME, 0);
    }
    f
}

/// Re-signs a frame after its header was changed: what a peer with the key (a buggy or
/// stale one) would send. Tests the checks behind the tag: a control frame gets the tag
/// of its new header; a LOG or VMLOG frame the MAC of its new header and payload (if its
/// `len` bytes are in the frame).
fn sign(f: &mut [u8]) {
    if f.len() < LOG_OVERHEAD {
        return;
    }
    let mut ft = FtHdr::read_from_bytes(&f[ETH_HLEN..LOG_OVERHEAD]).expect("header bytes");
    if matches!(ft.kind, KIND_LOG | KIND_VMLOG) {
        let len = ft.len.get() as usize;
        if f.len() >= LOG_OVERHEAD + len {
            ft.aux.set(payload_mac(
                mac_key(),
                &ft,
                &f[LOG_OVERHEAD..LOG_OVERHEAD + len],
            ));
            f[ETH_HLEN..LOG_OVERHEAD].copy_from_slice(ft.as_bytes());
        }
    } else if f.len() >= TAGGED_HLEN {
        f[LOG_OVERHEAD..TAGGED_HLEN].copy_from_slice(&frame_tag(&tag_key(), &ft).to_be_bytes());
    }
}

/// The primary accepts a backup frame only with the right tag (`wire::tag_valid`).
/// It is checked with the key its header names: one the node does not hold fails.
fn tag_ok(f: &[u8], ft: &FtHdr) -> bool {
    ft.key_id == kid()
        && f.len() >= TAGGED_HLEN
        && tag_valid(&tag_key(), ft, &f[LOG_OVERHEAD..TAGGED_HLEN])
}

// ---- other frames ------------------------------------------------------------------------

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> EthHdr {
    EthHdr {
        dst,
        src,
        ethertype: U16::new(ethertype),
    }
}

/// A frame from the primary with `payload`, padded to 60 bytes, as its sender makes it:
/// a LOG or VMLOG frame with its MAC in `aux` (the `aux` given is not used), or a
/// HEARTBEAT with `aux` and its tag as the payload (when `payload` is empty; with a
/// payload, that payload instead of the tag: a malformed one).
fn primary_frame(kind: u8, seq: u64, aux: u64, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut ft = hdr(kind, SESSION, EPOCH, seq);
    ft.aux.set(aux);
    ft.flags = flags;
    let tag;
    let payload = if kind == KIND_HEARTBEAT && payload.is_empty() {
        ft.len.set(TAG_LEN as u16);
        tag = frame_tag(&tag_key(), &ft).to_be_bytes();
        &tag[..]
    } else {
        ft.len.set(payload.len() as u16);
        if matches!(kind, KIND_LOG | KIND_VMLOG) {
            ft.aux.set(payload_mac(mac_key(), &ft, payload));
        }
        payload
    };
    let mut f = LogHdr {
        eth: eth(OWN, PEER, ETHERTYPE_FT),
        ft,
    }
    .as_bytes()
    .to_vec();
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

/// A LOG or VMLOG frame carries the right MAC for its header and its `len` payload bytes
/// (`wire::payload_mac_valid`); the caller checked that `len` is within the frame.
fn mac_ok(f: &[u8], ft: &FtHdr) -> bool {
    let len = ft.len.get() as usize;
    ft.key_id == kid()
        && f.len() >= LOG_OVERHEAD + len
        && payload_mac_valid(mac_key(), ft, &f[LOG_OVERHEAD..LOG_OVERHEAD + len])
}

/// An IPv4/UDP frame from `src` to `dst` with `n` payload bytes (content `tag`).
fn udp_frame(dst: [u8; 6], src: [u8; 6], tag: u64, n: usize) -> Vec<u8> {
    let mut f = eth(dst, src, ETHERTYPE_IPV4).as_bytes().to_vec();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&((20 + 8 + n) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17]);
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&CLIENT_IP);
    f.extend_from_slice(&VM_IP);
    f.extend_from_slice(&[0x9c, 0x40, 0x18, 0xeb]);
    f.extend_from_slice(&((8 + n) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..n).map(|i| (tag as usize).wrapping_add(i) as u8));
    f
}

/// An ARP request (broadcast) for `ip`.
fn arp_request(ip: [u8; 4]) -> Vec<u8> {
    let mut f = eth([0xff; 6], CLIENT_MAC, ETHERTYPE_ARP)
        .as_bytes()
        .to_vec();
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&CLIENT_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

// ---- loading and running -----------------------------------------------------------------

/// Moves this thread into a new network namespace whose loopback is up: the programs'
/// test runs and their `bpf_clone_redirect`s happen there, away from the host's NICs.
fn enter_private_netns() {
    // SAFETY: unshare(2) touches no memory of ours; CLONE_NEWNET moves only the calling
    // thread (a test's own thread) into a new network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    // A child process starts in the namespace of the thread that spawns it.
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("run ip");
    assert!(st.success(), "ip link set lo up");
}

/// The object under test: the one `ftd` embeds, or the file named by
/// `FT_TEST_EBPF_OBJECT` (to check that these tests catch a deliberately broken program
/// without rebuilding ftd: build ebpf/programs elsewhere, as userspace/build.rs does).
/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn object() -> Vec<u8> {
    match std::env::var_os("FT_TEST_EBPF_OBJECT") {
        Some(path) => std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}")),
        None => EBPF_OBJECT.to_vec(),
    }
}

/// The daemon's maps as one node has them before a case (the programs' inputs).
#[derive(Clone, Copy, Debug, PartialEq)]
struct State {
    node: NodeState,
    seq: SeqState,
    chan: ChanState,
    ctl: HoldCtl,
    kack: KernelAck,
}

/// Everything a case may change, read back from the maps.
#[derive(Clone, Debug)]
struct Snap {
    st: State,
    cfg: MapConfig,
    counters: Vec<u64>,
    /// The frames of the `LOG_RING` records submitted since the last snapshot.
    ring: Vec<Vec<u8>>,
}

/// The loaded object and its maps.
struct Plane {
    ebpf: Ebpf,
    config: Array<MapData, MapConfig>,
    node: Array<MapData, NodeState>,
    seq: Array<MapData, SeqState>,
    chan: Array<MapData, ChanState>,
    hold_ctl: Array<MapData, HoldCtl>,
    hold: Array<MapData, HoldSlot>,
    retx: Array<MapData, RetxSlot>,
    counters: PerCpuArray<MapData, u64>,
    kack: Array<MapData, KernelAck>,
    keys: Array<MapData, KeyRing>,
    ring: RefCell<RingBuf<MapData>>,
}

impl Plane {
    /// Loads the object as `DataPlane::start` does, attaching nothing.
    fn load() -> Plane {
        enter_private_netns();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("RETX", RETX_SLOTS)
            .map_max_entries("HOLD", HOLD_SLOTS)
            .load(&object())
            .expect("load the eBPF object ftd embeds (as root)");
        for name in ["ft_client_rx", "ft_log_rx", "ft_strip"] {
            let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        for name in [
            "ft_log_tc",
            "ft_vm_tc",
            "ft_client_egress",
            "ft_release_more",
        ] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        let more: &SchedClassifier = ebpf.program("ft_release_more").unwrap().try_into().unwrap();
        let more = more.fd().unwrap().try_clone().unwrap();
        ProgramArray::try_from(ebpf.map_mut("RELEASE_MORE").unwrap())
            .unwrap()
            .set(0, &more, 0)
            .unwrap();
        macro_rules! take {
            ($name:literal) => {
                ebpf.take_map($name).expect($name).try_into().expect($name)
            };
        }
        let mut p = Plane {
            config: take!("CONFIG"),
            node: take!("NODE"),
            seq: take!("SEQ"),
            chan: take!("CHAN"),
            hold_ctl: take!("HOLD_CTL"),
            hold: take!("HOLD"),
            retx: take!("RETX"),
            counters: take!("COUNTERS"),
            kack: take!("KACK"),
            keys: take!("KEYS"),
            ring: RefCell::new(take!("LOG_RING")),
            ebpf,
        };
        p.config.set(0, config(), 0).unwrap();
        p.keys.set(0, KeyRing::single(mac_key(), kid()), 0).unwrap();
        p
    }

    /// One `BPF_PROG_TEST_RUN` of `prog` on `data`: the action and the frame after it.
    fn run(&self, prog: &str, data: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; 8192];
        let opts = TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            repeat: 1,
            ..TestRunOptions::new()
        };
        let r = match self.ebpf.program(prog).expect("program in the object") {
            Program::Xdp(p) => p.test_run(opts)?,
            Program::SchedClassifier(p) => p.test_run(opts)?,
            _ => unreachable!("{prog} is XDP or tc"),
        };
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Frames the kernel does not inject: shorter than an Ethernet header, or (tc: the
    /// skb test run reads the IP header for its socket) an IPv4 or IPv6 frame shorter
    /// than its IP header. True if `f` is one; then the run is refused with EINVAL and
    /// changes nothing.
    fn refused(&self, prog: &str, f: &[u8]) -> bool {
        let tc = matches!(self.ebpf.program(prog), Some(Program::SchedClassifier(_)));
        let min = match (tc, f.get(12..14).map(|b| be16(b, 0))) {
            (true, Some(ETHERTYPE_IPV4)) => ETH_HLEN + 20,
            (true, Some(ETHERTYPE_IPV6)) => ETH_HLEN + 40,
            _ => ETH_HLEN,
        };
        if f.len() >= min {
            return false;
        }
        let before = self.snap().unwrap();
        let err = self.run(prog, f).expect_err("a runt frame is refused");
        assert!(
            matches!(&err, ProgramError::SyscallError(e)
                if e.io_error.raw_os_error() == Some(libc::EINVAL)),
            "{prog}, {} bytes: {err:?}",
            f.len()
        );
        let after = self.snap().unwrap();
        assert_eq!((after.st, after.counters), (before.st, before.counters));
        true
    }

    fn put(&mut self, st: &State) -> Result<(), MapError> {
        self.node.set(0, st.node, 0)?;
        self.seq.set(0, st.seq, 0)?;
        self.chan.set(0, st.chan, 0)?;
        self.kack.set(0, st.kack, 0)?;
        self.hold_ctl.set(0, st.ctl, 0)
    }

    fn state(&self) -> Result<State, MapError> {
        Ok(State {
            node: self.node.get(&0, 0)?,
            seq: self.seq.get(&0, 0)?,
            chan: self.chan.get(&0, 0)?,
            ctl: self.hold_ctl.get(&0, 0)?,
            kack: self.kack.get(&0, 0)?,
        })
    }

    /// Drains `LOG_RING`: the frame of each record (`LogRec`: len, padding, frame).
    fn drain_ring(&self) -> Vec<Vec<u8>> {
        let mut ring = self.ring.borrow_mut();
        let mut out = Vec::new();
        while let Some(rec) = ring.next() {
            let len = u32::from_ne_bytes(rec[..4].try_into().unwrap()) as usize;
            assert!(
                rec.len() >= LOG_REC_HDR + len,
                "record of {} bytes claims a {len}-byte frame",
                rec.len()
            );
            out.push(rec[LOG_REC_HDR..LOG_REC_HDR + len].to_vec());
        }
        out
    }

    fn snap(&self) -> Result<Snap, MapError> {
        Ok(Snap {
            st: self.state()?,
            cfg: self.config.get(&0, 0)?,
            counters: self.counters()?,
            ring: self.drain_ring(),
        })
    }

    /// Sums of the per-CPU counters.
    fn counters(&self) -> Result<Vec<u64>, MapError> {
        (0..COUNTER_SLOTS)
            .map(|i| Ok(self.counters.get(&i, 0)?.iter().sum()))
            .collect()
    }

    fn hold_slot(&self, idx: u64) -> Result<HoldSlot, MapError> {
        self.hold.get(&((idx & (HOLD_SLOTS as u64 - 1)) as u32), 0)
    }

    fn retx_slot(&self, seq: u64) -> Result<RetxSlot, MapError> {
        self.retx.get(&((seq & (RETX_SLOTS as u64 - 1)) as u32), 0)
    }
}

// ---- expectations ------------------------------------------------------------------------

/// What one case must do, relative to the state before it.
#[derive(Clone, Debug)]
struct Expect {
    /// Label (statistics, messages).
    what: String,
    action: u32,
    /// `ft_log_tc`'s verdict on a frame `ft_log_rx` passed up (the stack's next hook).
    tc: Option<u32>,
    /// Dropped: exactly one of these `ft_drops_total` counters moves, by one. Empty: none.
    drop: Vec<u32>,
    /// Other counters that move, by how much (every other counter stays).
    counts: Vec<(u32, u64)>,
    /// `SEQ` afterwards (`last_peer_ns`: see `peer_touched`).
    seq: SeqState,
    /// `SEQ.last_peer_ns` is stamped (a valid frame from the peer).
    peer_touched: bool,
    /// Hold-ring frames released (head advance) and held (tail advance).
    released: u64,
    held: u64,
    /// The frame that comes out (None: not checked).
    out: Option<Vec<u8>>,
    /// `KACK` afterwards.
    kack: KernelAck,
    /// The frames copied into `LOG_RING`, in order.
    ring: Vec<Vec<u8>>,
}

impl Expect {
    fn new(what: impl Into<String>, b: &State, action: u32) -> Expect {
        Expect {
            what: what.into(),
            action,
            tc: None,
            drop: vec![],
            counts: vec![],
            seq: b.seq,
            peer_touched: false,
            released: 0,
            held: 0,
            out: None,
            kack: b.kack,
            ring: vec![],
        }
    }

    fn dropped(what: impl Into<String>, b: &State, action: u32, reasons: &[u32]) -> Expect {
        Expect {
            drop: reasons.to_vec(),
            ..Expect::new(what, b, action)
        }
    }

    fn count(mut self, idx: u32, n: u64) -> Expect {
        if n > 0 {
            self.counts.push((idx, n));
        }
        self
    }
}

fn counter_name(i: u32) -> String {
    match COUNTER_INFO.iter().find(|c| c.0 == i) {
        Some((_, m, "")) => m.to_string(),
        Some((_, m, l)) => format!("{m}{{{l}}}"),
        None => format!("counter {i}"),
    }
}

fn is_drop(i: u32) -> bool {
    COUNTER_INFO
        .iter()
        .any(|c| c.0 == i && c.1 == "ft_drops_total")
}

/// The observed result of one case.
struct Obs {
    action: u32,
    tc: Option<u32>,
    /// The frame passed up could not be injected at tc (`Plane::refused`).
    tc_refused: bool,
    out: Vec<u8>,
    before: Snap,
    after: Snap,
}

fn check(e: &Expect, o: &Obs) -> Result<(), String> {
    let mut errs = Vec::new();
    let (b, a) = (&o.before, &o.after);
    if o.action != e.action {
        errs.push(format!("action {} (expected {})", o.action, e.action));
    }
    if o.tc != e.tc && !o.tc_refused {
        errs.push(format!("ft_log_tc {:?} (expected {:?})", o.tc, e.tc));
    }
    if a.st.node != b.st.node || a.cfg != b.cfg || a.st.chan != b.st.chan {
        errs.push("NODE, CONFIG or CHAN changed".into());
    }
    let (sa, se) = (a.st.seq, e.seq);
    if (sa.last_seq, sa.acked, sa.vm_acked) != (se.last_seq, se.acked, se.vm_acked) {
        errs.push(format!(
            "SEQ last/acked/vm_acked {}/{}/{} (expected {}/{}/{})",
            sa.last_seq, sa.acked, sa.vm_acked, se.last_seq, se.acked, se.vm_acked
        ));
    }
    if (sa.last_peer_ns != b.st.seq.last_peer_ns) != e.peer_touched {
        errs.push(format!(
            "last_peer_ns {} -> {} (expected {})",
            b.st.seq.last_peer_ns,
            sa.last_peer_ns,
            if e.peer_touched {
                "stamped"
            } else {
                "unchanged"
            }
        ));
    }
    // KACK: the sequences exactly; a send stamp moves exactly when the model sends (the
    // model marks a send by changing the stamp; the kernel writes the time).
    let (ka, ke, kb) = (a.st.kack, e.kack, b.st.kack);
    if (ka.input, ka.vm) != (ke.input, ke.vm)
        || (ka.input_tx_ns != kb.input_tx_ns) != (ke.input_tx_ns != kb.input_tx_ns)
        || (ka.vm_tx_ns != kb.vm_tx_ns) != (ke.vm_tx_ns != kb.vm_tx_ns)
    {
        errs.push(format!("KACK {ka:?} (expected {ke:?}, before {kb:?})"));
    }
    if a.ring != e.ring {
        let got: Vec<String> = a.ring.iter().map(|f| hex(f)).collect();
        let want: Vec<String> = e.ring.iter().map(|f| hex(f)).collect();
        errs.push(format!("LOG_RING records {got:?} (expected {want:?})"));
    }
    let released = a.st.ctl.head.wrapping_sub(b.st.ctl.head);
    let held = a.st.ctl.tail.wrapping_sub(b.st.ctl.tail);
    if (released, held) != (e.released, e.held) || a.st.ctl.lock != 0 {
        errs.push(format!(
            "hold ring released {released} held {held} lock {} (expected {} and {})",
            a.st.ctl.lock, e.released, e.held
        ));
    }
    let mut drops = Vec::new();
    for i in 0..COUNTER_SLOTS {
        let d = a.counters[i as usize].wrapping_sub(b.counters[i as usize]);
        if is_drop(i) {
            if d != 0 {
                drops.push((i, d));
            }
            continue;
        }
        let want: u64 = e.counts.iter().filter(|c| c.0 == i).map(|c| c.1).sum();
        if d != want {
            errs.push(format!("{} +{d} (expected +{want})", counter_name(i)));
        }
    }
    let drops_ok = match drops.as_slice() {
        [] => e.drop.is_empty(),
        [(i, 1)] => e.drop.contains(i),
        _ => false,
    };
    if !drops_ok {
        let got: Vec<String> = drops
            .iter()
            .map(|(i, d)| format!("{} +{d}", counter_name(*i)))
            .collect();
        let want: Vec<String> = e.drop.iter().map(|i| counter_name(*i)).collect();
        errs.push(format!("drops {got:?} (expected one of {want:?})"));
    }
    if let Some(out) = &e.out
        && *out != o.out
    {
        errs.push(format!("frame out {} (expected {})", hex(&o.out), hex(out)));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!("[{}] {}", e.what, errs.join("; ")))
    }
}

/// Ok with the matching expectation's label if any alternative matches.
fn check_any(es: &[Expect], o: &Obs) -> Result<String, String> {
    let mut why = Vec::new();
    for e in es {
        match check(e, o) {
            Ok(()) => return Ok(e.what.clone()),
            Err(m) => why.push(m),
        }
    }
    Err(why.join("\n  or "))
}

fn hex(b: &[u8]) -> String {
    let s: String = b.iter().take(80).map(|x| format!("{x:02x}")).collect();
    if b.len() > 80 {
        format!("{s}.. ({} bytes)", b.len())
    } else {
        s
    }
}

// ---- the scene: a node's state and what it holds -------------------------------------------

/// A node before a case: its maps, the dependencies of its held frames, its stored
/// input frames.
struct Scene {
    st: State,
    cfg: MapConfig,
    /// Dependencies (input, VMM stream) of each hold-ring slot, by slot.
    deps: Vec<(u64, u64)>,
    /// Contents of each hold-ring slot (the frames held there last).
    slots: Vec<Vec<u8>>,
    /// Input frames in `RETX`, by sequence.
    retx: BTreeMap<u64, Vec<u8>>,
}

impl Scene {
    fn slot(idx: u64) -> usize {
        (idx & (HOLD_SLOTS as u64 - 1)) as usize
    }

    /// One release pass (`hold::release`) in state `st` with `seq`: the frames it
    /// releases and the counters it moves. `extra`: a frame just enqueued at `tail`.
    fn release(
        &self,
        st: &State,
        seq: &SeqState,
        extra: Option<(u64, u64)>,
    ) -> (u64, Vec<(u32, u64)>) {
        // The scenes' leases are static (valid) or long expired.
        if st.node.lease_deadline_ns != u64::MAX {
            return (0, vec![(C_FENCED_HOLD, 1)]);
        }
        let gate = st.node.role == ROLE_PRIMARY && self.cfg.flags & CFG_HOLD_OUTPUT != 0;
        let tail = st.ctl.tail + u64::from(extra.is_some());
        let mut n = 0;
        for idx in st.ctl.head..tail {
            let dep = match extra {
                Some(d) if idx == st.ctl.tail => d,
                _ => self.deps[Scene::slot(idx)],
            };
            if gate && (dep.0 > seq.acked || dep.1 > seq.vm_acked) {
                break;
            }
            n += 1;
        }
        let counts = if n > 0 {
            vec![(C_HOLD_RELEASED, n)]
        } else {
            vec![]
        };
        (n, counts)
    }
}

// ---- the model of ft_log_rx (and ft_log_tc behind it) ----------------------------------------

/// Frames on the logging NIC that the stack passes on to `ft_log_tc`: its verdict and
/// what it releases.
fn log_tc_expect(sc: &Scene, e: Expect, f: &[u8]) -> Expect {
    let st = &sc.st;
    let live = st.node.role == ROLE_PRIMARY || st.node.role == ROLE_SOLO;
    if live && be16(f, 12) == ETHERTYPE_FT && f.len() > ETH_HLEN + 2 && f[ETH_HLEN + 2] == KIND_ACK
    {
        let (n, counts) = sc.release(st, &e.seq, None);
        let mut e = Expect {
            tc: Some(TC_ACT_SHOT),
            released: n,
            ..e
        };
        e.counts.extend(counts);
        if n > 0 {
            e.what += &format!(", releases {n}");
        }
        return e;
    }
    Expect {
        tc: Some(TC_ACT_OK),
        ..e
    }
}

/// Every outcome `ft_log_rx` may have on `f` in scene `sc` (usually one).
fn log_rx_expect(sc: &Scene, f: &[u8]) -> Vec<Expect> {
    let st = &sc.st;
    let cfg = &sc.cfg;
    if be16(f, 12) != ETHERTYPE_FT {
        let e = Expect {
            out: Some(f.to_vec()),
            ..Expect::new("not ours: passed", st, XDP_PASS)
        };
        return vec![log_tc_expect(sc, e, f)];
    }
    let Ok((h, _)) = LogHdr::ref_from_prefix(f) else {
        return vec![Expect::dropped(
            "truncated header",
            st,
            XDP_DROP,
            &[C_DROP_MALFORMED],
        )];
    };
    let ft = &h.ft;
    let kind = ft.kind;
    let role = st.node.role;
    let mut fails = Vec::new();
    if ft.magic != FT_MAGIC || ft.version != FT_VERSION {
        fails.push(C_DROP_MALFORMED);
    }
    if h.eth.src != cfg.peer_log_mac || h.eth.dst != cfg.own_log_mac {
        fails.push(C_DROP_BAD_PEER);
    }
    if ft.epoch.get() != st.node.epoch {
        fails.push(C_DROP_BAD_EPOCH);
    }
    match role {
        ROLE_PRIMARY | ROLE_SOLO => {
            if ft.session.get() != cfg.session {
                fails.push(C_DROP_BAD_SESSION);
            }
            if kind_is_tagged(kind) && !tag_ok(f, ft) {
                fails.push(C_DROP_BAD_MAC);
            }
        }
        ROLE_BACKUP => {
            let peer = st.chan.peer_session;
            if peer != 0 && ft.session.get() != peer {
                fails.push(C_DROP_BAD_SESSION);
            }
        }
        _ => fails.push(C_DROP_NOT_REPLICATING),
    }
    if !fails.is_empty() {
        return vec![Expect::dropped("bad header", st, XDP_DROP, &fails)];
    }
    let seq = ft.seq.get();
    let aux = ft.aux.get();
    let payload_room = (f.len() - LOG_OVERHEAD) as u64;
    let len = u64::from(ft.len.get());
    let passed = |what: &str, counter: u32| {
        let e = Expect {
            out: Some(f.to_vec()),
            ..Expect::new(what, st, XDP_PASS).count(counter, 1)
        };
        log_tc_expect(sc, e, f)
    };
    // Backup: a valid frame is copied into LOG_RING (headers and `len` payload bytes,
    // not the padding) and counted as received. The next in order of its stream (`kack`:
    // the stream's KACK sequence and send-stamp fields, None for a heartbeat), with the
    // session known and kernel acks on, raises the field and comes out as the tagged ack
    // of both streams, unless the stream's last ack was sent within the interval (read on
    // the same clock, CLOCK_MONOTONIC; the scenes keep stamps seconds away from the
    // interval's end); any other is consumed.
    type Field = fn(&mut KernelAck) -> &mut u64;
    let ack_out = |k: &KernelAck| {
        let mut ft = hdr(
            KIND_ACK,
            st.chan.peer_session,
            st.node.epoch,
            k.input & !KACK_STOP,
        );
        ft.aux.set(k.vm & !KACK_STOP);
        ft.len.set(TAG_LEN as u16);
        TaggedHdr {
            eth: eth(cfg.peer_log_mac, cfg.own_log_mac, ETHERTYPE_FT),
            ft,
            tag: frame_tag(&tag_key(), &ft).into(),
        }
        .as_bytes()
        .to_vec()
    };
    // The primary's daemon is heard (SEQ.last_peer_ns) from heartbeats and VMLOG
    // frames only: input log frames come from its XDP, which goes on while it is frozen.
    let to_daemon = |what: &str, counters: &[u32], kack: Option<(Field, Field)>| {
        let heard = what != "log received";
        let mut e = Expect {
            peer_touched: heard,
            ring: vec![f[..LOG_OVERHEAD + len as usize].to_vec()],
            ..Expect::new(what, st, XDP_DROP)
        };
        for c in counters {
            e = e.count(*c, 1);
        }
        let kernel_acks = st.chan.peer_session != 0 && cfg.flags & CFG_KERNEL_ACKS != 0;
        let Some((field, stamp)) = kack else {
            // A heartbeat: sends the acks as they are (flushes deferred ones), unless
            // stopped.
            if !kernel_acks || (st.kack.input | st.kack.vm) & KACK_STOP != 0 {
                return e;
            }
            return Expect {
                what: format!("{what}, acked"),
                action: XDP_TX,
                out: Some(ack_out(&st.kack)),
                ..e.count(C_KACK_SENT, 1)
            };
        };
        let mut k = st.kack;
        if !kernel_acks || *field(&mut k) != seq.wrapping_sub(1) {
            return e;
        }
        *field(&mut k) = seq;
        if monotonic_ns().wrapping_sub(*stamp(&mut k)) < cfg.kack_interval_ns {
            return Expect {
                what: format!("{what}, deferred"),
                kack: k,
                ..e.count(C_KACK_DEFERRED, 1)
            };
        }
        *stamp(&mut k) = !*stamp(&mut k);
        Expect {
            what: format!("{what}, acked"),
            action: XDP_TX,
            kack: k,
            out: Some(ack_out(&k)),
            ..e.count(C_KACK_SENT, 1)
        }
    };
    let unexpected = || Expect::dropped("unexpected kind", st, XDP_DROP, &[C_DROP_UNEXPECTED_KIND]);
    match role {
        ROLE_PRIMARY | ROLE_SOLO => match kind {
            KIND_ACK if role == ROLE_PRIMARY => {
                if seq > st.seq.last_seq || aux > st.chan.vm_last {
                    return vec![Expect::dropped(
                        "ack beyond",
                        st,
                        XDP_DROP,
                        &[C_DROP_ACK_BEYOND],
                    )];
                }
                let mut e = Expect {
                    peer_touched: true,
                    out: Some(f.to_vec()),
                    ..Expect::new("ack", st, XDP_PASS)
                };
                e.seq.acked = st.seq.acked.max(seq);
                e.seq.vm_acked = st.seq.vm_acked.max(aux);
                let advanced = e.seq.acked > st.seq.acked || e.seq.vm_acked > st.seq.vm_acked;
                let e = if advanced {
                    e.count(C_ACK_RX, 1)
                } else {
                    Expect {
                        what: "stale ack".into(),
                        ..e.count(C_ACK_STALE, 1)
                    }
                };
                vec![log_tc_expect(sc, e, f)]
            }
            KIND_NACK if role == ROLE_PRIMARY => {
                let drop = |what: &str, r: u32| {
                    Expect::dropped(what, st, XDP_DROP, &[r]).count(C_NACK_RX, 1)
                };
                if seq == 0 || seq > st.seq.last_seq || seq <= st.seq.acked {
                    return vec![drop("nack out of range", C_DROP_NACK_INVALID)];
                }
                let Some(stored) = sc.retx.get(&seq) else {
                    return vec![drop("nack not in store", C_DROP_RETX_MISS)];
                };
                let mut ft = hdr(KIND_LOG, cfg.session, st.node.epoch, seq);
                ft.flags = FLAG_RETRANSMIT;
                ft.len.set(stored.len() as u16);
                // The MAC the entry was first sent with (it does not cover the flag).
                ft.aux.set(payload_mac(mac_key(), &ft, stored));
                let mut out = LogHdr {
                    eth: eth(cfg.peer_log_mac, cfg.own_log_mac, ETHERTYPE_FT),
                    ft,
                }
                .as_bytes()
                .to_vec();
                out.extend_from_slice(stored);
                let mut es = vec![Expect {
                    out: Some(out),
                    ..Expect::new("nack repaired", st, XDP_TX)
                        .count(C_NACK_RX, 1)
                        .count(C_RETX_SENT, 1)
                }];
                if f.len() < LOG_OVERHEAD + stored.len() {
                    // Growing the frame depends on the driver's tailroom.
                    es.push(drop("nack too short to grow", C_DROP_RETX_ERR));
                }
                es
            }
            KIND_VMNACK => vec![passed("vmnack", C_VMNACK_RX)],
            KIND_LEAVE => vec![passed("leave", C_LEAVE_RX)],
            _ => vec![unexpected()],
        },
        _ => match kind {
            KIND_LOG => {
                if len > payload_room {
                    return vec![Expect::dropped(
                        "log len past end",
                        st,
                        XDP_DROP,
                        &[C_DROP_MALFORMED],
                    )];
                }
                if len > MAX_FRAME as u64 {
                    // The bytes are there, but no primary logs a frame this long (and the
                    // daemon's parser refuses it): malformed, counted, never received.
                    return vec![Expect::dropped(
                        "oversize log",
                        st,
                        XDP_DROP,
                        &[C_DROP_MALFORMED],
                    )];
                }
                if !mac_ok(f, ft) {
                    // Not the primary's entry: never buffered, acked nor a sign of life.
                    return vec![Expect::dropped(
                        "log bad mac",
                        st,
                        XDP_DROP,
                        &[C_DROP_BAD_MAC],
                    )];
                }
                let held = st.chan.delivered.max(st.kack.input & !KACK_STOP);
                if seq <= held {
                    return vec![Expect::dropped(
                        "duplicate log",
                        st,
                        XDP_DROP,
                        &[C_DROP_DUP],
                    )];
                }
                if seq - held > cfg.window + RETX_MARGIN {
                    return vec![Expect::dropped(
                        "log out of window",
                        st,
                        XDP_DROP,
                        &[C_DROP_SEQ_WINDOW],
                    )];
                }
                let mut cs = vec![C_LOG_RX];
                if ft.flags & FLAG_RETRANSMIT != 0 {
                    cs.push(C_LOG_RX_RETRANSMIT);
                }
                vec![to_daemon(
                    "log received",
                    &cs,
                    Some((|k| &mut k.input, |k| &mut k.input_tx_ns)),
                )]
            }
            KIND_VMLOG => {
                if len > payload_room {
                    return vec![Expect::dropped(
                        "vmlog len past end",
                        st,
                        XDP_DROP,
                        &[C_DROP_MALFORMED],
                    )];
                }
                if len > MAX_FRAME as u64 {
                    // As for LOG.
                    return vec![Expect::dropped(
                        "oversize vmlog",
                        st,
                        XDP_DROP,
                        &[C_DROP_MALFORMED],
                    )];
                }
                if !mac_ok(f, ft) {
                    return vec![Expect::dropped(
                        "vmlog bad mac",
                        st,
                        XDP_DROP,
                        &[C_DROP_BAD_MAC],
                    )];
                }
                if seq <= st.kack.vm & !KACK_STOP {
                    // A repaired entry sent again: the primary's daemon is alive.
                    return vec![Expect {
                        peer_touched: true,
                        ..Expect::dropped("duplicate vmlog", st, XDP_DROP, &[C_DROP_DUP])
                    }];
                }
                vec![to_daemon(
                    "vmlog received",
                    &[C_VMLOG_RX],
                    Some((|k| &mut k.vm, |k| &mut k.vm_tx_ns)),
                )]
            }
            KIND_HEARTBEAT => {
                if !tag_ok(f, ft) {
                    // A heartbeat carries only its tag: one without the right tag (or with
                    // any other len) never counts as received nor stamps the primary alive.
                    return vec![Expect::dropped(
                        "heartbeat bad tag",
                        st,
                        XDP_DROP,
                        &[C_DROP_BAD_MAC],
                    )];
                }
                vec![to_daemon("heartbeat received", &[C_HEARTBEAT_RX], None)]
            }
            _ => vec![unexpected()],
        },
    }
}

// ---- scenes ----------------------------------------------------------------------------------

/// A client frame numbered `s` (distinct contents).
fn client_frame(s: u64) -> Vec<u8> {
    udp_frame(VM_MAC, CLIENT_MAC, s, 18 + (s % 1000) as usize * 7 % 200)
}

/// A frame the VM emits, numbered `i`.
fn vm_frame(i: u64) -> Vec<u8> {
    udp_frame(CLIENT_MAC, VM_MAC, i, 10 + (i as usize * 13) % 300)
}

fn empty_state(role: u32) -> State {
    State {
        node: node(role),
        seq: SeqState::default(),
        chan: ChanState::default(),
        ctl: HoldCtl::default(),
        kack: KernelAck::default(),
    }
}

/// A paired primary: 200 client frames logged by `ft_client_rx` (so `RETX` holds them),
/// 200 output frames held by `ft_vm_tc` with three dependencies ((120, 30) x 100,
/// (150, 45) x 50, (200, 50) x 50), then acks at 100 (input) and 40 (VMM stream) of 200
/// and 50 sent. Entry 190 is missing from the store (its copy failed).
fn primary_scene(p: &mut Plane) -> Scene {
    let mut st = empty_state(ROLE_PRIMARY);
    p.put(&st).unwrap();
    let mut retx = BTreeMap::new();
    for s in 1..=200 {
        let f = client_frame(s);
        let (action, _) = p.run("ft_client_rx", &f).unwrap();
        assert_eq!(action, XDP_REDIRECT, "client frame {s}");
        retx.insert(s, f);
    }
    assert_eq!(p.state().unwrap().seq.last_seq, 200);
    let mut deps = vec![(0, 0); HOLD_SLOTS as usize];
    let mut slots = vec![Vec::new(); HOLD_SLOTS as usize];
    let mut i = 0;
    for (n, last, vm_last) in [(100, 120, 30), (50, 150, 45), (50, 200, 50)] {
        let mut now = p.state().unwrap();
        now.seq.last_seq = last;
        now.seq.acked = 100;
        now.chan.vm_last = vm_last;
        p.put(&now).unwrap();
        for _ in 0..n {
            let f = vm_frame(i);
            assert_eq!(p.run("ft_vm_tc", &f).unwrap().0, TC_ACT_SHOT);
            deps[i as usize] = (last, vm_last);
            slots[i as usize] = f;
            i += 1;
        }
    }
    st.ctl = p.state().unwrap().ctl;
    assert_eq!((st.ctl.head, st.ctl.tail), (0, 200), "200 frames held");
    let mut gone = p.retx_slot(190).unwrap();
    gone.seq = 0;
    p.retx.set(190, gone, 0).unwrap();
    retx.remove(&190);
    st.seq = SeqState {
        last_seq: 200,
        acked: 100,
        vm_acked: 40,
        last_peer_ns: 0,
    };
    st.chan.vm_last = 50;
    p.put(&st).unwrap();
    Scene {
        st,
        cfg: config(),
        deps,
        slots,
        retx,
    }
}

/// A backup following session SESSION that has stored input frames up to 100 and holds
/// both streams in order up to 100 and 2 (the kernel's acks).
fn backup_scene(p: &mut Plane) -> Scene {
    let mut st = empty_state(ROLE_BACKUP);
    st.chan.delivered = 100;
    st.chan.peer_session = SESSION;
    st.kack = KernelAck {
        input: 100,
        vm: 2,
        ..Default::default()
    };
    p.put(&st).unwrap();
    Scene {
        st,
        cfg: config(),
        deps: vec![(0, 0); HOLD_SLOTS as usize],
        slots: vec![Vec::new(); HOLD_SLOTS as usize],
        retx: BTreeMap::new(),
    }
}

/// Valid frames the primary receives, and frames only a backup receives (unexpected on
/// a primary), each a valid frame of its kind for the scenes above.
fn primary_seeds() -> Vec<Vec<u8>> {
    vec![
        backup_frame(KIND_ACK, SESSION, EPOCH, 150, 45),
        backup_frame(KIND_ACK, SESSION, EPOCH, 200, 50),
        backup_frame(KIND_ACK, SESSION, EPOCH, 120, 50),
        backup_frame(KIND_ACK, SESSION, EPOCH, 100, 40),
        backup_frame(KIND_ACK, SESSION, EPOCH, 150, 44),
        backup_frame(KIND_NACK, SESSION, EPOCH, 150, 0),
        backup_frame(KIND_NACK, SESSION, EPOCH, 101, 0),
        backup_frame(KIND_NACK, SESSION, EPOCH, 190, 0),
        backup_frame(KIND_VMNACK, SESSION, EPOCH, 45, 0),
        backup_frame(KIND_LEAVE, SESSION, EPOCH, 0, LEAVE_DIVERGED),
    ]
}

/// Properly tagged frames just past the primary's limits (the acked entry, one beyond
/// the last sequence or VMM entry sent) and just inside them: the random cases start
/// from these too, so an off-by-one in a bound shows.
fn primary_edges() -> Vec<Vec<u8>> {
    vec![
        backup_frame(KIND_NACK, SESSION, EPOCH, 100, 0),
        backup_frame(KIND_NACK, SESSION, EPOCH, 200, 0),
        backup_frame(KIND_NACK, SESSION, EPOCH, 201, 0),
        backup_frame(KIND_ACK, SESSION, EPOCH, 201, 50),
        backup_frame(KIND_ACK, SESSION, EPOCH, 200, 51),
        backup_frame(KIND_ACK, SESSION, EPOCH, 200, 49),
    ]
}

/// The same for the backup: the entry it already has, the last and first sequence past
/// its window; LOG and VMLOG frames of the largest `len` (`MAX_FRAME`, with bytes after
/// the payload) and one larger (bytes present); a heartbeat with a one-byte payload.
fn backup_edges() -> Vec<Vec<u8>> {
    let window = config().window + RETX_MARGIN;
    let mut es: Vec<Vec<u8>> = [100, 100 + window, 101 + window]
        .into_iter()
        .map(|s| primary_frame(KIND_LOG, s, 0, 0, &client_frame(s)))
        .collect();
    es.push(padded(
        primary_frame(KIND_LOG, 102, 0, 0, &largest_client_frame(102)),
        8,
    ));
    es.push(padded(
        primary_frame(KIND_VMLOG, 4, 0, 0, &[0x22; MAX_FRAME]),
        8,
    ));
    es.push(primary_frame(
        KIND_LOG,
        103,
        0,
        0,
        &padded(largest_client_frame(103), 1),
    ));
    es.push(primary_frame(KIND_VMLOG, 5, 0, 0, &[0x33; MAX_FRAME + 1]));
    es.push(primary_frame(KIND_HEARTBEAT, 201, 51, 0, &[0]));
    es
}

/// A client frame of `MAX_FRAME` bytes, numbered `s`.
fn largest_client_frame(s: u64) -> Vec<u8> {
    let f = udp_frame(VM_MAC, CLIENT_MAC, s, MAX_FRAME - 42);
    assert_eq!(f.len(), MAX_FRAME);
    f
}

/// `f` with `n` zero bytes appended (after its payload: padding, not counted in `len`).
fn padded(mut f: Vec<u8>, n: usize) -> Vec<u8> {
    f.resize(f.len() + n, 0);
    f
}

fn backup_seeds() -> Vec<Vec<u8>> {
    vec![
        primary_frame(KIND_LOG, 101, 0, 0, &client_frame(101)),
        primary_frame(KIND_LOG, 150, 0, FLAG_RETRANSMIT, &client_frame(150)),
        primary_frame(KIND_VMLOG, 3, 0, 0, &[0x11; 96]),
        primary_frame(KIND_HEARTBEAT, 200, 50, 0, &[]),
    ]
}

// ---- mutations ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Field {
    Dst,
    Src,
    EtherType,
    Magic,
    Version,
    Kind,
    Flags,
    Len,
    Reserved,
    Session,
    Epoch,
    Seq,
    Aux,
    Tag,
}

const FIELDS: [Field; 14] = [
    Field::Dst,
    Field::Src,
    Field::EtherType,
    Field::Magic,
    Field::Version,
    Field::Kind,
    Field::Flags,
    Field::Len,
    Field::Reserved,
    Field::Session,
    Field::Epoch,
    Field::Seq,
    Field::Aux,
    Field::Tag,
];

impl Field {
    fn range(self) -> Range<usize> {
        match self {
            Field::Dst => 0..6,
            Field::Src => 6..12,
            Field::EtherType => 12..14,
            Field::Magic => 14..15,
            Field::Version => 15..16,
            Field::Kind => 16..17,
            Field::Flags => 17..18,
            Field::Len => 18..20,
            Field::Reserved => 20..22,
            Field::Session => 22..30,
            Field::Epoch => 30..38,
            Field::Seq => 38..46,
            Field::Aux => 46..54,
            Field::Tag => 54..62,
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    /// Cut to a length of at least 14 bytes.
    Truncate(usize),
    FlipBit(usize, u8),
    /// Flip a bit of the headers and tag (the first 62 bytes).
    FlipHeaderBit(usize, u8),
    SetByte(usize, u8),
    /// Set a field to an interesting value; `resign`: then sign the header again (a
    /// sender with the key).
    Field(Field, u64, bool),
    Append(Vec<u8>),
    /// Replace the frame by random bytes; with `depth` 1.. a logging-link EtherType, 2..
    /// also magic and version, 3 also this link's MACs, epoch and session.
    Random(Vec<u8>, u8),
}

fn mac_choice(v: u64) -> [u8; 6] {
    match v % 4 {
        0 => OWN,
        1 => PEER,
        2 => [0xff; 6],
        _ => {
            let b = v.to_be_bytes();
            [b[2], b[3], b[4], b[5], b[6], b[7]]
        }
    }
}

impl Mutation {
    fn apply(&self, f: &mut Vec<u8>) {
        match self {
            Mutation::Truncate(x) => {
                if f.len() > ETH_HLEN {
                    let n = ETH_HLEN + x % (f.len() - ETH_HLEN);
                    f.truncate(n);
                }
            }
            Mutation::FlipBit(i, bit) => {
                let n = f.len();
                f[i % n] ^= 1 << bit;
            }
            Mutation::FlipHeaderBit(i, bit) => {
                let n = f.len().min(TAGGED_HLEN);
                f[i % n] ^= 1 << bit;
            }
            Mutation::SetByte(i, v) => {
                let n = f.len();
                f[i % n] = *v;
            }
            Mutation::Field(field, v, resign) => {
                let r = field.range();
                if f.len() < r.end {
                    return;
                }
                let v = *v;
                let bytes: Vec<u8> = match field {
                    Field::Dst | Field::Src => mac_choice(v).to_vec(),
                    Field::EtherType => match v % 4 {
                        0 => ETHERTYPE_FT,
                        1 => ETHERTYPE_IPV4,
                        2 => ETHERTYPE_ARP,
                        _ => (v >> 2) as u16,
                    }
                    .to_be_bytes()
                    .to_vec(),
                    Field::Len => {
                        let exact = f.len().saturating_sub(LOG_OVERHEAD) as u64;
                        match v % 8 {
                            0 => 0,
                            1 => TAG_LEN as u16,
                            2 => exact as u16,
                            3 => exact as u16 + 1,
                            4 => exact.saturating_sub(1) as u16,
                            5 => MAX_FRAME as u16 + 1,
                            6 => u16::MAX,
                            _ => (v >> 3) as u16,
                        }
                        .to_be_bytes()
                        .to_vec()
                    }
                    Field::Reserved => (v as u16).to_be_bytes().to_vec(),
                    Field::Magic | Field::Version | Field::Kind | Field::Flags => vec![v as u8],
                    Field::Session => match v % 4 {
                        0 => SESSION,
                        1 => SESSION ^ 1,
                        2 => 0,
                        _ => v,
                    }
                    .to_be_bytes()
                    .to_vec(),
                    Field::Epoch | Field::Seq | Field::Aux | Field::Tag => v.to_be_bytes().to_vec(),
                };
                f[r].copy_from_slice(&bytes);
                if *resign && *field != Field::Tag {
                    sign(f);
                }
            }
            Mutation::Append(b) => f.extend_from_slice(b),
            Mutation::Random(b, depth) => {
                f.clone_from(b);
                if *depth >= 1 {
                    f[12..14].copy_from_slice(&ETHERTYPE_FT.to_be_bytes());
                }
                if *depth >= 2 && f.len() >= 16 {
                    f[14] = FT_MAGIC;
                    f[15] = FT_VERSION;
                }
                if *depth >= 3 && f.len() >= LOG_OVERHEAD {
                    f[0..6].copy_from_slice(&OWN);
                    f[6..12].copy_from_slice(&PEER);
                    f[22..30].copy_from_slice(&SESSION.to_be_bytes());
                    f[30..38].copy_from_slice(&EPOCH.to_be_bytes());
                }
            }
        }
    }
}

/// Values that sit on the programs' boundaries (sequences around the scenes' acks and
/// last sequences, the epoch, the extremes) and anything.
fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0u64..16,
        1 => 95u64..=105,
        1 => 115u64..=125,
        1 => 145u64..=155,
        1 => 195u64..=205,
        1 => Just(u64::MAX),
        1 => Just(1u64 << 63),
        2 => any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        3 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipHeaderBit(i, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        6 => (select(FIELDS.to_vec()), value(), any::<bool>())
            .prop_map(|(f, v, s)| Mutation::Field(f, v, s)),
        1 => vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
        2 => (vec(any::<u8>(), ETH_HLEN..1700), 0u8..4).prop_map(|(b, d)| Mutation::Random(b, d)),
    ]
}

fn mutate(seed: &[u8], ms: &[Mutation]) -> Vec<u8> {
    let mut f = seed.to_vec();
    for m in ms {
        m.apply(&mut f);
    }
    f
}

/// `cases` cases from a fixed seed (the same cases every run, so the coverage checks are
/// stable); `PROPTEST_RNG_SEED` picks other ones.
fn runner(cases: u32) -> TestRunner {
    let base = PtConfig::default();
    let rng_seed = match std::env::var_os("PROPTEST_RNG_SEED") {
        Some(_) => base.rng_seed,
        None => RngSeed::Fixed(0x00f7_0011),
    };
    TestRunner::new(PtConfig {
        cases,
        rng_seed,
        failure_persistence: None,
        ..base
    })
}

// ---- the cases -----------------------------------------------------------------------------

/// Labels of the outcomes seen, to show what the random cases reached.
#[derive(Default)]
struct Seen(BTreeMap<String, u64>);

impl Seen {
    fn add(&mut self, what: String) {
        *self.0.entry(what).or_default() += 1;
    }

    fn require(&self, test: &str, labels: &[&str]) {
        eprintln!("{test}: {:?}", self.0);
        for l in labels {
            assert!(
                self.0.keys().any(|k| k.starts_with(l)),
                "{test}: no case reached `{l}`: {:?}",
                self.0
            );
        }
    }
}

/// Runs `f` through `ft_log_rx` (and, when passed up, `ft_log_tc`) in scene `sc` and
/// checks the outcome against the model.
fn link_case(p: &mut Plane, sc: &Scene, f: &[u8]) -> Result<String, String> {
    p.put(&sc.st).unwrap();
    if p.refused("ft_log_rx", f) {
        return Ok("runt refused".into());
    }
    let before = p.snap().unwrap();
    let (action, out) = p
        .run("ft_log_rx", f)
        .map_err(|e| format!("ft_log_rx test run failed: {e:?}"))?;
    // A frame passed up goes on to tc ingress (unless the kernel cannot inject it there).
    let tc_refused = action == XDP_PASS && p.refused("ft_log_tc", &out);
    let tc = if action == XDP_PASS && !tc_refused {
        let (v, _) = p
            .run("ft_log_tc", &out)
            .map_err(|e| format!("ft_log_tc test run failed: {e:?}"))?;
        Some(v)
    } else {
        None
    };
    if ![XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT].contains(&action) {
        return Err(format!(
            "ft_log_rx returned {action} (XDP_ABORTED = {XDP_ABORTED})"
        ));
    }
    let after = p.snap().unwrap();
    let o = Obs {
        action,
        tc,
        tc_refused,
        out,
        before,
        after,
    };
    check_any(&log_rx_expect(sc, f), &o).map_err(|e| format!("frame {}:\n  {e}", hex(f)))
}

/// The scene for role `role`: the primary's for primary, solo and standby (same maps,
/// another role), the backup's for a backup.
fn with_role(sc: &Scene, role: u32) -> Scene {
    let mut st = sc.st;
    st.node.role = role;
    Scene {
        st,
        cfg: sc.cfg,
        deps: sc.deps.clone(),
        slots: sc.slots.clone(),
        retx: sc.retx.clone(),
    }
}

/// (a)-(c) on the primary's logging NIC: acks, nacks, VMNACKs and LEAVEs, valid and
/// mutated in every way (bit flips, truncation, wrong ethertype, magic, version, kind,
/// len, session, epoch, huge and boundary sequences, wrong MACs, with and without a
/// valid tag for the changed header), the primary's own kinds and random bytes; also as
/// solo and standby.
#[test]
fn logging_link_primary_drops_and_counts_malformed_frames() {
    let mut p = Plane::load();
    let primary = primary_scene(&mut p);
    let scenes = [
        with_role(&primary, ROLE_SOLO),
        with_role(&primary, ROLE_STANDBY),
        primary,
    ];
    let mut seeds = primary_seeds();
    seeds.extend(primary_edges());
    seeds.extend(backup_seeds());
    let p = RefCell::new(p);
    let seen = RefCell::new(Seen::default());
    let strategy = (
        0..seeds.len(),
        vec(mutation(), 0..4),
        prop_oneof![6 => Just(2usize), 1 => Just(0usize), 1 => Just(1usize)],
    );
    runner(3000)
        .run(&strategy, |(i, ms, s)| {
            let f = mutate(&seeds[i], &ms);
            let what =
                link_case(&mut p.borrow_mut(), &scenes[s], &f).map_err(TestCaseError::fail)?;
            seen.borrow_mut()
                .add(format!("{} {what}", role_name(scenes[s].st.node.role)));
            Ok(())
        })
        .unwrap();
    seen.borrow().require(
        "primary",
        &[
            "primary ack, releases",
            "primary stale ack",
            "primary nack repaired",
            "primary nack out of range",
            "primary nack not in store",
            "primary vmnack",
            "primary leave",
            "primary bad header",
            "primary ack beyond",
            "primary unexpected kind",
            "primary truncated header",
            "primary not ours",
            "solo vmnack",
            "solo unexpected kind",
            "standby bad header",
        ],
    );
}

/// (a)-(c) on the backup's logging NIC: log, VMLOG and heartbeat frames, valid and
/// mutated, the backup's own kinds, random bytes.
#[test]
fn logging_link_backup_drops_and_counts_malformed_frames() {
    let mut p = Plane::load();
    let sc = backup_scene(&mut p);
    let mut seeds = backup_seeds();
    seeds.extend(backup_edges());
    seeds.extend(primary_seeds());
    let p = RefCell::new(p);
    let seen = RefCell::new(Seen::default());
    runner(2000)
        .run(&(0..seeds.len(), vec(mutation(), 0..4)), |(i, ms)| {
            let f = mutate(&seeds[i], &ms);
            let what = link_case(&mut p.borrow_mut(), &sc, &f).map_err(TestCaseError::fail)?;
            seen.borrow_mut().add(what);
            Ok(())
        })
        .unwrap();
    seen.borrow().require(
        "backup",
        &[
            "log received",
            "log received, acked",
            "vmlog received",
            "vmlog received, acked",
            "heartbeat received, acked",
            "heartbeat bad tag",
            "log bad mac",
            "vmlog bad mac",
            "oversize log",
            "oversize vmlog",
            "log len past end",
            "duplicate log",
            "log out of window",
            "vmlog len past end",
            "bad header",
            "unexpected kind",
            "truncated header",
            "not ours",
        ],
    );
}

/// Every seed cut at every length from 0 to its full length (and grown by a byte), as
/// primary and as backup: below 14 bytes the kernel refuses to run the program, from 14
/// on every cut is dropped and counted unless it is still a valid frame. (The other
/// role's seeds, which are the wrong kind there at any length, and two of the three
/// full-size NACKs, whose padding is meaningless, are cut at every length through the
/// tag and at their full length only.)
#[test]
fn logging_link_truncation_at_every_length() {
    let mut p = Plane::load();
    let primary = primary_scene(&mut p);
    let mut bp = Plane::load();
    let backup = backup_scene(&mut bp);
    let (ps, bs) = (primary_seeds(), backup_seeds());
    let mut runs = 0;
    for (plane, sc, own, other) in [(&mut p, &primary, &ps, &bs), (&mut bp, &backup, &bs, &ps)] {
        // Every length: the role's own seeds, but of the NACKs only the first.
        let first_nack = own.iter().position(|f| f[ETH_HLEN + 2] == KIND_NACK);
        let seeds = own
            .iter()
            .enumerate()
            .map(|(i, f)| (f, f[ETH_HLEN + 2] != KIND_NACK || Some(i) == first_nack))
            .chain(other.iter().map(|f| (f, false)));
        for (seed, all) in seeds {
            for n in 0..=seed.len() + 1 {
                if !all && n > TAGGED_HLEN + 1 && n < seed.len() {
                    continue;
                }
                let mut f = seed.clone();
                f.resize(n, 0);
                if let Err(e) = link_case(plane, sc, &f) {
                    panic!("{} cut to {n}: {e}", role_name(sc.st.node.role));
                }
                runs += 1;
            }
        }
    }
    eprintln!("truncations: {runs} runs");
}

/// One valid frame of each kind changed in one field and signed again (what a backup
/// with the key but a wrong view would send): each is dropped with its own reason and
/// changes nothing; the valid frames do what they say. Exact reasons, no alternatives.
#[test]
fn logging_link_each_check_drops_with_its_reason() {
    let mut p = Plane::load();
    let sc = primary_scene(&mut p);
    let st = sc.st;
    let resigned = |mut f: Vec<u8>, field: Field, v: u64| {
        Mutation::Field(field, v, true).apply(&mut f);
        f
    };
    // Changed in one field, not signed again (a forger without the key).
    let mutated = |mut f: Vec<u8>, field: Field, v: u64| {
        f[field.range()].copy_from_slice(&v.to_be_bytes()[8 - field.range().len()..]);
        f
    };
    let ack = || backup_frame(KIND_ACK, SESSION, EPOCH, 150, 45);
    let nack = || backup_frame(KIND_NACK, SESSION, EPOCH, 150, 0);
    let mut cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "ack of another epoch",
            backup_frame(KIND_ACK, SESSION, EPOCH + 1, 150, 45),
            C_DROP_BAD_EPOCH,
        ),
        (
            "ack of epoch 0",
            backup_frame(KIND_ACK, SESSION, 0, 150, 45),
            C_DROP_BAD_EPOCH,
        ),
        (
            "ack of another session",
            backup_frame(KIND_ACK, SESSION ^ 1, EPOCH, 150, 45),
            C_DROP_BAD_SESSION,
        ),
        (
            "ack of session 0",
            backup_frame(KIND_ACK, 0, EPOCH, 150, 45),
            C_DROP_BAD_SESSION,
        ),
        (
            "ack beyond last_seq",
            backup_frame(KIND_ACK, SESSION, EPOCH, 201, 45),
            C_DROP_ACK_BEYOND,
        ),
        (
            "ack with huge seq",
            backup_frame(KIND_ACK, SESSION, EPOCH, u64::MAX, 45),
            C_DROP_ACK_BEYOND,
        ),
        (
            "ack beyond vm_last",
            backup_frame(KIND_ACK, SESSION, EPOCH, 150, 51),
            C_DROP_ACK_BEYOND,
        ),
        (
            "nack of seq 0",
            backup_frame(KIND_NACK, SESSION, EPOCH, 0, 0),
            C_DROP_NACK_INVALID,
        ),
        (
            "nack of an acked entry",
            backup_frame(KIND_NACK, SESSION, EPOCH, 100, 0),
            C_DROP_NACK_INVALID,
        ),
        (
            "nack beyond last_seq",
            backup_frame(KIND_NACK, SESSION, EPOCH, 201, 0),
            C_DROP_NACK_INVALID,
        ),
        (
            "nack with huge seq",
            backup_frame(KIND_NACK, SESSION, EPOCH, u64::MAX, 0),
            C_DROP_NACK_INVALID,
        ),
        (
            "nack of a lost store entry",
            backup_frame(KIND_NACK, SESSION, EPOCH, 190, 0),
            C_DROP_RETX_MISS,
        ),
        (
            "nack of another epoch",
            backup_frame(KIND_NACK, SESSION, EPOCH - 1, 150, 0),
            C_DROP_BAD_EPOCH,
        ),
        (
            "vmnack of another session",
            backup_frame(KIND_VMNACK, 1, EPOCH, 45, 0),
            C_DROP_BAD_SESSION,
        ),
        (
            "leave of another epoch",
            backup_frame(KIND_LEAVE, SESSION, EPOCH + 1, 0, 1),
            C_DROP_BAD_EPOCH,
        ),
        (
            "ack with version 3",
            resigned(ack(), Field::Version, 3),
            C_DROP_MALFORMED,
        ),
        (
            "ack with version 5",
            resigned(ack(), Field::Version, 5),
            C_DROP_MALFORMED,
        ),
        (
            "ack with a bad magic",
            resigned(ack(), Field::Magic, 0xf6),
            C_DROP_MALFORMED,
        ),
        (
            "ack from another MAC",
            resigned(ack(), Field::Src, 3),
            C_DROP_BAD_PEER,
        ),
        (
            "ack from our own MAC",
            resigned(ack(), Field::Src, 0),
            C_DROP_BAD_PEER,
        ),
        (
            "ack to broadcast",
            resigned(ack(), Field::Dst, 2),
            C_DROP_BAD_PEER,
        ),
        (
            "nack turned into a heartbeat",
            resigned(nack(), Field::Kind, u64::from(KIND_HEARTBEAT)),
            C_DROP_UNEXPECTED_KIND,
        ),
        (
            "ack turned into a log frame",
            resigned(ack(), Field::Kind, u64::from(KIND_LOG)),
            C_DROP_UNEXPECTED_KIND,
        ),
        (
            "ack of kind 0",
            resigned(ack(), Field::Kind, 0),
            C_DROP_UNEXPECTED_KIND,
        ),
        (
            "ack of kind 255",
            resigned(ack(), Field::Kind, 255),
            C_DROP_UNEXPECTED_KIND,
        ),
        (
            "ack without its tag",
            ack()[..LOG_OVERHEAD].to_vec(),
            C_DROP_BAD_MAC,
        ),
        (
            "ack with half its tag",
            ack()[..LOG_OVERHEAD + 4].to_vec(),
            C_DROP_BAD_MAC,
        ),
        (
            "ack with a wrong tag",
            resigned(ack(), Field::Tag, 0x1234),
            C_DROP_BAD_MAC,
        ),
        (
            "ack with len 0",
            resigned(ack(), Field::Len, 0),
            C_DROP_BAD_MAC,
        ),
        (
            "ack with len 0xffff",
            resigned(ack(), Field::Len, 6),
            C_DROP_BAD_MAC,
        ),
        (
            "ack with its seq changed, old tag",
            {
                let mut f = ack();
                f[45] ^= 0x40;
                f
            },
            C_DROP_BAD_MAC,
        ),
        (
            "ack signed with another key",
            {
                let mut f = ack();
                let ft = FtHdr::read_from_bytes(&f[ETH_HLEN..LOG_OVERHEAD]).unwrap();
                let other = SipKey::from_bytes(b"another-key-0000");
                f[LOG_OVERHEAD..TAGGED_HLEN].copy_from_slice(&frame_tag(&other, &ft).to_be_bytes());
                f
            },
            C_DROP_BAD_MAC,
        ),
        (
            "nack turned into an ack, old tag",
            {
                let mut f = nack();
                f[ETH_HLEN + 2] = KIND_ACK;
                f
            },
            C_DROP_BAD_MAC,
        ),
    ];
    // The log stream's frames (the primary's own kinds) arriving on a primary: wrong kind.
    for f in backup_seeds() {
        cases.push((
            "a log-stream frame on the primary",
            f,
            C_DROP_UNEXPECTED_KIND,
        ));
    }
    for (what, f, reason) in &cases {
        p.put(&st).unwrap();
        let before = p.snap().unwrap();
        let (action, _) = p.run("ft_log_rx", f).unwrap();
        let after = p.snap().unwrap();
        assert_eq!(action, XDP_DROP, "{what}");
        assert_eq!(after.st, before.st, "{what}: state changed");
        for i in 0..COUNTER_SLOTS {
            let d = after.counters[i as usize] - before.counters[i as usize];
            let want = u64::from(i == *reason)
                + u64::from(
                    i == C_NACK_RX
                        && f[ETH_HLEN + 2] == KIND_NACK
                        && [C_DROP_NACK_INVALID, C_DROP_RETX_MISS].contains(reason),
                );
            assert_eq!(d, want, "{what}: {} moved by {d}", counter_name(i));
        }
        // And the model agrees.
        link_case(&mut p, &sc, f).unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    // Positive controls: the checks above drop only what they must.
    // An ack of everything releases all 200 held frames in one trigger (192 in the first
    // program run, the rest after the tail call), the last one left in the carrier.
    p.put(&st).unwrap();
    let full = backup_frame(KIND_ACK, SESSION, EPOCH, 200, 50);
    assert_eq!(p.run("ft_log_rx", &full).unwrap().0, XDP_PASS);
    let s = p.state().unwrap();
    assert_eq!((s.seq.acked, s.seq.vm_acked), (200, 50));
    let (v, out) = p.run("ft_log_tc", &full).unwrap();
    assert_eq!(v, TC_ACT_SHOT);
    assert_eq!(p.state().unwrap().ctl.head, 200, "the whole ring released");
    assert_eq!(
        out, sc.slots[199],
        "released in ring order, the last frame last"
    );
    // A partial ack releases the covered prefix only: input 150 covers 150 frames, but
    // the VMM ack 44 only the first 100 (the next 50 depend on VMM entry 45).
    p.put(&st).unwrap();
    let partial = backup_frame(KIND_ACK, SESSION, EPOCH, 150, 44);
    assert_eq!(p.run("ft_log_rx", &partial).unwrap().0, XDP_PASS);
    p.run("ft_log_tc", &partial).unwrap();
    assert_eq!(p.state().unwrap().ctl.head, 100);
    // A nack is answered in place with the stored frame.
    p.put(&st).unwrap();
    let (v, out) = p.run("ft_log_rx", &nack()).unwrap();
    assert_eq!(v, XDP_TX);
    let (h, payload) = parse_log_frame(&out).unwrap();
    assert_eq!(
        (h.ft.kind, h.ft.seq.get(), h.ft.flags),
        (KIND_LOG, 150, FLAG_RETRANSMIT)
    );
    assert_eq!((h.eth.dst, h.eth.src), (PEER, OWN));
    assert_eq!(payload, client_frame(150).as_slice());
    link_case(&mut p, &sc, &nack()).unwrap();

    // The backup: its own reasons.
    let mut bp = Plane::load();
    let bsc = backup_scene(&mut bp);
    let log = |seq: u64| primary_frame(KIND_LOG, seq, 0, 0, &client_frame(seq));
    let heartbeat = || primary_frame(KIND_HEARTBEAT, 200, 50, 0, &[]);
    let bcases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "log of another epoch",
            resigned(log(101), Field::Epoch, EPOCH + 1),
            C_DROP_BAD_EPOCH,
        ),
        (
            "log of another session",
            resigned(log(101), Field::Session, 1),
            C_DROP_BAD_SESSION,
        ),
        ("log already delivered", log(100), C_DROP_DUP),
        ("log of seq 0", log(0), C_DROP_DUP),
        (
            "log beyond the window",
            log(100 + 1024 + 1),
            C_DROP_SEQ_WINDOW,
        ),
        ("log with huge seq", log(u64::MAX), C_DROP_SEQ_WINDOW),
        (
            "log with len past the end",
            resigned(log(101), Field::Len, 3),
            C_DROP_MALFORMED,
        ),
        (
            "log with len 0xffff",
            resigned(log(101), Field::Len, 6),
            C_DROP_MALFORMED,
        ),
        (
            "log from another MAC",
            resigned(log(101), Field::Src, 3),
            C_DROP_BAD_PEER,
        ),
        (
            "vmlog with len past the end",
            resigned(primary_frame(KIND_VMLOG, 3, 0, 0, &[1; 40]), Field::Len, 3),
            C_DROP_MALFORMED,
        ),
        (
            "log with len MAX_FRAME + 1, bytes present",
            primary_frame(KIND_LOG, 101, 0, 0, &padded(largest_client_frame(101), 1)),
            C_DROP_MALFORMED,
        ),
        (
            "vmlog with len MAX_FRAME + 1, bytes present",
            primary_frame(KIND_VMLOG, 3, 0, 0, &[1; MAX_FRAME + 1]),
            C_DROP_MALFORMED,
        ),
        (
            "heartbeat with another payload than its tag",
            primary_frame(KIND_HEARTBEAT, 200, 50, 0, &[0; 6]),
            C_DROP_BAD_MAC,
        ),
        (
            "heartbeat with len past the end",
            resigned(heartbeat(), Field::Len, 3),
            C_DROP_BAD_MAC,
        ),
        (
            "heartbeat with len 0xffff",
            resigned(heartbeat(), Field::Len, 6),
            C_DROP_BAD_MAC,
        ),
        (
            "heartbeat with a forged tag",
            mutated(heartbeat(), Field::Tag, 0x5eed),
            C_DROP_BAD_MAC,
        ),
        (
            "heartbeat replayed at another seq",
            mutated(heartbeat(), Field::Seq, 201),
            C_DROP_BAD_MAC,
        ),
        (
            "log with a forged mac",
            mutated(log(101), Field::Aux, 0x5eed),
            C_DROP_BAD_MAC,
        ),
        (
            "log with its payload altered",
            {
                let mut f = log(101);
                f[LOG_OVERHEAD + 30] ^= 1;
                f
            },
            C_DROP_BAD_MAC,
        ),
        (
            "log replayed at the next seq",
            mutated(log(100), Field::Seq, 101),
            C_DROP_BAD_MAC,
        ),
        (
            "log signed with another key",
            {
                let mut f = log(101);
                let ft = FtHdr::read_from_bytes(&f[ETH_HLEN..LOG_OVERHEAD]).unwrap();
                let len = ft.len.get() as usize;
                let other = SipKey::from_bytes(b"a-forgers-key-00");
                let m = payload_mac(
                    &MacKey::derive(&other),
                    &ft,
                    &f[LOG_OVERHEAD..LOG_OVERHEAD + len],
                );
                f[Field::Aux.range()].copy_from_slice(&m.to_be_bytes());
                f
            },
            C_DROP_BAD_MAC,
        ),
        (
            "vmlog with a forged mac",
            mutated(primary_frame(KIND_VMLOG, 3, 0, 0, &[1; 40]), Field::Aux, 7),
            C_DROP_BAD_MAC,
        ),
        (
            "an ack on the backup",
            backup_frame(KIND_ACK, SESSION, EPOCH, 150, 45),
            C_DROP_UNEXPECTED_KIND,
        ),
    ];
    for (what, f, reason) in &bcases {
        bp.put(&bsc.st).unwrap();
        let before = bp.snap().unwrap();
        let (action, _) = bp.run("ft_log_rx", f).unwrap();
        let after = bp.snap().unwrap();
        assert_eq!(action, XDP_DROP, "{what}");
        assert_eq!(after.st, before.st, "{what}: state changed");
        for i in 0..COUNTER_SLOTS {
            let d = after.counters[i as usize] - before.counters[i as usize];
            assert_eq!(
                d,
                u64::from(i == *reason),
                "{what}: {} moved by {d}",
                counter_name(i)
            );
        }
        link_case(&mut bp, &bsc, f).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // A valid log frame is received (then dropped only for want of an AF_XDP socket).
    bp.put(&bsc.st).unwrap();
    let before = bp.snap().unwrap();
    bp.run("ft_log_rx", &log(101)).unwrap();
    let after = bp.snap().unwrap();
    assert_eq!(
        after.counters[C_LOG_RX as usize],
        before.counters[C_LOG_RX as usize] + 1
    );
    // Key rotation: a frame under a key the node does not hold (its id named, its MAC
    // right under it) is refused; once the node holds that key too, a frame under
    // either key is received, and the newest key the peer advertises is recorded; when
    // the old key is forgotten, frames under it are refused again.
    let new_key = SipKey::from_bytes(b"the-rotated-key!");
    let under = |k: &SipKey, seq: u64, adv: u8| {
        let mut f = log(seq);
        let mut ft = FtHdr::read_from_bytes(&f[ETH_HLEN..LOG_OVERHEAD]).unwrap();
        (ft.key_id, ft.key_adv) = (key_id(k), adv);
        let len = ft.len.get() as usize;
        ft.aux.set(payload_mac(
            &MacKey::derive(k),
            &ft,
            &f[LOG_OVERHEAD..LOG_OVERHEAD + len],
        ));
        f[ETH_HLEN..LOG_OVERHEAD].copy_from_slice(ft.as_bytes());
        f
    };
    let received = |bp: &mut Plane, f: &[u8]| {
        bp.put(&bsc.st).unwrap();
        let before = bp.snap().unwrap();
        bp.run("ft_log_rx", f).unwrap();
        let after = bp.snap().unwrap();
        let d = |c: u32| after.counters[c as usize] - before.counters[c as usize];
        match (d(C_LOG_RX), d(C_DROP_BAD_MAC)) {
            (1, 0) => true,
            (0, 1) => false,
            other => panic!("neither received nor dropped as bad_mac: {other:?}"),
        }
    };
    assert_ne!(key_id(&new_key), kid());
    assert!(!received(&mut bp, &under(&new_key, 101, key_id(&new_key))));
    let mut two = KeyRing::single(mac_key(), kid());
    two.slots[1] = KeySlot::new(&MacKey::derive(&new_key), key_id(&new_key));
    two.newest = key_id(&new_key) as u64;
    bp.keys.set(0, two, 0).unwrap();
    assert!(received(&mut bp, &under(&tag_key(), 101, kid())));
    assert_eq!(bp.keys.get(&0, 0).unwrap().peer_newest, kid() as u64);
    assert!(received(&mut bp, &under(&new_key, 101, key_id(&new_key))));
    assert_eq!(
        bp.keys.get(&0, 0).unwrap().peer_newest,
        key_id(&new_key) as u64
    );
    // The advert of a frame that does not verify is not believed.
    let mut forged = under(&new_key, 101, 0x77);
    forged[LOG_OVERHEAD + 3] ^= 1;
    assert!(!received(&mut bp, &forged));
    assert_eq!(
        bp.keys.get(&0, 0).unwrap().peer_newest,
        key_id(&new_key) as u64
    );
    let mut only_new = KeyRing::single(&MacKey::derive(&new_key), key_id(&new_key));
    only_new.peer_newest = key_id(&new_key) as u64;
    bp.keys.set(0, only_new, 0).unwrap();
    assert!(!received(&mut bp, &under(&tag_key(), 101, kid())));
    assert!(received(&mut bp, &under(&new_key, 101, key_id(&new_key))));
    bp.keys
        .set(0, KeyRing::single(mac_key(), kid()), 0)
        .unwrap();
    // The length checks drop only what they must: the largest frames (len = MAX_FRAME,
    // with or without padding after them) and a heartbeat (len 0) are received.
    for (f, what) in [
        (
            primary_frame(KIND_LOG, 101, 0, 0, &largest_client_frame(101)),
            "log received, acked",
        ),
        (
            padded(
                primary_frame(KIND_LOG, 101, 0, 0, &largest_client_frame(101)),
                8,
            ),
            "log received, acked",
        ),
        (
            primary_frame(KIND_LOG, 102, 0, 0, &largest_client_frame(102)),
            "log received",
        ),
        (
            primary_frame(KIND_VMLOG, 3, 0, 0, &[1; MAX_FRAME]),
            "vmlog received, acked",
        ),
        (
            primary_frame(KIND_VMLOG, 2, 0, 0, &[1; 8]),
            "duplicate vmlog",
        ),
        (heartbeat(), "heartbeat received, acked"),
    ] {
        assert_eq!(link_case(&mut bp, &bsc, &f).as_deref(), Ok(what));
    }
    // A backup that does not know the session yet accepts any, and acks none itself
    // (an ack would name a session the daemon did not choose).
    let mut fresh = backup_scene(&mut bp);
    fresh.st.chan.peer_session = 0;
    assert_eq!(
        link_case(&mut bp, &fresh, &resigned(log(101), Field::Session, 1)).as_deref(),
        Ok("log received")
    );
    // Stopped kernel acks (take-over, failure): buffered, never acked, even in order.
    let mut stopped = backup_scene(&mut bp);
    stopped.st.kack.input |= KACK_STOP;
    stopped.st.kack.vm |= KACK_STOP;
    assert_eq!(
        link_case(&mut bp, &stopped, &log(101)).as_deref(),
        Ok("log received")
    );
    assert_eq!(
        link_case(
            &mut bp,
            &stopped,
            &primary_frame(KIND_VMLOG, 3, 0, 0, &[1; 8])
        )
        .as_deref(),
        Ok("vmlog received")
    );
    assert_eq!(
        link_case(&mut bp, &stopped, &log(100)).as_deref(),
        Ok("duplicate log")
    );
    assert_eq!(
        link_case(&mut bp, &stopped, &heartbeat()).as_deref(),
        Ok("heartbeat received")
    );
    // Batching: an in-order frame within the interval of the stream's last ack sent is
    // confirmed in KACK but not sent; the other stream's stamp does not matter.
    let mut batching = backup_scene(&mut bp);
    batching.cfg.kack_interval_ns = 10_000_000_000;
    bp.config.set(0, batching.cfg, 0).unwrap();
    batching.st.kack.input_tx_ns = monotonic_ns();
    batching.st.kack.vm_tx_ns = monotonic_ns() - 20_000_000_000;
    assert_eq!(
        link_case(&mut bp, &batching, &log(101)).as_deref(),
        Ok("log received, deferred")
    );
    assert_eq!(
        link_case(
            &mut bp,
            &batching,
            &primary_frame(KIND_VMLOG, 3, 0, 0, &[1; 8])
        )
        .as_deref(),
        Ok("vmlog received, acked")
    );
    // The window is relative to what is buffered (KACK), not to what the daemon took from
    // the ring: a frame a window ahead of `delivered` but not of KACK is taken.
    let mut lagging = backup_scene(&mut bp);
    let window = config().window + RETX_MARGIN;
    lagging.st.kack.input = 100 + window;
    assert_eq!(
        link_case(&mut bp, &lagging, &log(101 + window)).as_deref(),
        Ok("log received, acked")
    );
    // Kernel acks off (generic XDP, or the benchmark's baseline): buffered, never acked.
    let mut off = backup_scene(&mut bp);
    off.cfg.flags &= !CFG_KERNEL_ACKS;
    bp.config.set(0, off.cfg, 0).unwrap();
    assert_eq!(
        link_case(&mut bp, &off, &log(101)).as_deref(),
        Ok("log received")
    );
    bp.config.set(0, config(), 0).unwrap();
}

// ---- ft_client_rx ----------------------------------------------------------------------------

fn client_rx_expect(sc: &Scene, f: &[u8]) -> Vec<Expect> {
    let st = &sc.st;
    let cfg = &sc.cfg;
    let et = be16(f, 12);
    if et == ETHERTYPE_FT {
        return vec![Expect::dropped(
            "ft frame on the client nic",
            st,
            XDP_DROP,
            &[C_DROP_CLIENT_FT],
        )];
    }
    let for_vm = f[0..6] == cfg.vm_mac
        || (et == ETHERTYPE_ARP && f.len() >= ETH_HLEN + 28 && f[38..42] == cfg.vm_ipv4);
    if !for_vm {
        return vec![Expect {
            out: Some(f.to_vec()),
            ..Expect::new("not for the vm", st, XDP_PASS)
        }];
    }
    let e = |what: &str, action: u32, drop: &[u32]| {
        Expect::dropped(what, st, action, drop).count(C_CLIENT_RX_VM, 1)
    };
    match st.node.role {
        ROLE_PRIMARY => {
            if f.len() > MAX_FRAME {
                return vec![e("oversize", XDP_DROP, &[C_DROP_OVERSIZE])];
            }
            if st.seq.last_seq.wrapping_sub(st.seq.acked) >= cfg.window {
                return vec![e("window full", XDP_DROP, &[C_DROP_WINDOW_FULL])];
            }
            let s = st.seq.last_seq + 1;
            let mut ft = hdr(KIND_LOG, cfg.session, st.node.epoch, s);
            ft.len.set(f.len() as u16);
            ft.aux.set(payload_mac(mac_key(), &ft, f));
            let mut out = LogHdr {
                eth: eth(cfg.peer_log_mac, cfg.own_log_mac, ETHERTYPE_FT),
                ft,
            }
            .as_bytes()
            .to_vec();
            out.extend_from_slice(f);
            let mut x = Expect {
                out: Some(out),
                ..e("logged", XDP_REDIRECT, &[])
                    .count(C_DUP_FRAMES, 1)
                    .count(C_DUP_BYTES, f.len() as u64)
            };
            x.seq.last_seq = s;
            vec![x]
        }
        ROLE_SOLO => vec![Expect {
            out: Some(f.to_vec()),
            ..e("solo delivered", XDP_REDIRECT, &[]).count(C_SOLO_DELIVERED, 1)
        }],
        ROLE_BACKUP => vec![e("backup drops", XDP_DROP, &[C_DROP_BACKUP_CLIENT_IN])],
        _ => vec![e("standby drops", XDP_DROP, &[C_DROP_STANDBY])],
    }
}

/// (a)-(c) on the client NIC: frames for the VM are logged (sequence, store, log header)
/// exactly once and only while the window has room, delivered (solo) or dropped and
/// counted (backup, standby); logging-link frames, oversize frames and a full window are
/// dropped and counted; frames for others pass untouched. Random bytes and mutations.
#[test]
fn client_rx_logs_valid_frames_and_counts_the_rest() {
    let p = Plane::load();
    let mut base = empty_state(ROLE_PRIMARY);
    base.seq = SeqState {
        last_seq: 300,
        acked: 290,
        vm_acked: 0,
        last_peer_ns: 0,
    };
    let scene = |st: State| Scene {
        st,
        cfg: config(),
        deps: vec![],
        slots: vec![],
        retx: BTreeMap::new(),
    };
    let mut full = base;
    full.seq.last_seq = 290 + config().window;
    let scenes: Vec<Scene> = [
        (base, ROLE_PRIMARY),
        (full, ROLE_PRIMARY),
        (base, ROLE_SOLO),
        (base, ROLE_BACKUP),
        (base, ROLE_STANDBY),
    ]
    .into_iter()
    .map(|(mut st, role)| {
        st.node.role = role;
        scene(st)
    })
    .collect();
    let mut big = udp_frame(VM_MAC, CLIENT_MAC, 9, MAX_FRAME - 42);
    assert_eq!(big.len(), MAX_FRAME);
    let seeds = vec![
        client_frame(1),
        udp_frame(VM_MAC, CLIENT_MAC, 2, 0),
        arp_request(VM_IP),
        arp_request([10, 0, 0, 99]),
        udp_frame([0xff; 6], CLIENT_MAC, 3, 30),
        udp_frame(CLIENT_MAC, VM_MAC, 4, 30),
        big.clone(),
        {
            big.push(0);
            big
        },
        backup_frame(KIND_ACK, SESSION, EPOCH, 150, 45),
        primary_frame(KIND_LOG, 5, 0, 0, &client_frame(5)),
    ];
    let p = RefCell::new(p);
    let seen = RefCell::new(Seen::default());
    let strategy = (
        0..seeds.len(),
        vec(mutation(), 0..3),
        prop_oneof![6 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize), 1 => Just(3usize), 1 => Just(4usize)],
    );
    runner(2000)
        .run(&strategy, |(i, ms, s)| {
            let mut p = p.borrow_mut();
            let sc = &scenes[s];
            let f = mutate(&seeds[i], &ms);
            p.put(&sc.st).unwrap();
            if p.refused("ft_client_rx", &f) {
                return Ok(());
            }
            let before = p.snap().unwrap();
            let (action, out) = p
                .run("ft_client_rx", &f)
                .map_err(|e| TestCaseError::fail(format!("test run failed: {e:?}")))?;
            let after = p.snap().unwrap();
            let o = Obs {
                action,
                tc: None,
                tc_refused: false,
                out,
                before,
                after,
            };
            let what = check_any(&client_rx_expect(sc, &f), &o).map_err(|e| {
                TestCaseError::fail(format!(
                    "{} frame {}:\n  {e}",
                    role_name(sc.st.node.role),
                    hex(&f)
                ))
            })?;
            if what == "logged" {
                // Stored for repair, exactly as received.
                let slot = p.retx_slot(o.after.st.seq.last_seq).unwrap();
                prop_assert_eq!(slot.seq, o.after.st.seq.last_seq);
                prop_assert_eq!(&slot.data[..slot.len as usize], f.as_slice());
            }
            seen.borrow_mut()
                .add(format!("{} {what}", role_name(sc.st.node.role)));
            Ok(())
        })
        .unwrap();
    seen.borrow().require(
        "client",
        &[
            "primary logged",
            "primary oversize",
            "primary window full",
            "primary ft frame",
            "primary not for the vm",
            "solo solo delivered",
            "backup backup drops",
            "standby standby drops",
        ],
    );
}

// ---- ft_vm_tc: the hold ring ---------------------------------------------------------------

fn vm_tc_expect(sc: &Scene, f: &[u8]) -> Vec<Expect> {
    let st = &sc.st;
    let role = st.node.role;
    if role != ROLE_PRIMARY && role != ROLE_SOLO {
        return vec![Expect::dropped(
            "suppressed",
            st,
            TC_ACT_SHOT,
            &[C_VM_OUT_SUPPRESSED],
        )];
    }
    let release = |e: Expect, extra: Option<(u64, u64)>| {
        let (n, counts) = sc.release(st, &st.seq, extra);
        let mut e = Expect { released: n, ..e };
        e.counts.extend(counts);
        if n > 0 {
            let last = st.ctl.head + n - 1;
            e.out = Some(if extra.is_some() && last == st.ctl.tail {
                f.to_vec()
            } else {
                sc.slots[Scene::slot(last)].clone()
            });
            e.what += ", released";
        }
        e
    };
    if be16(f, 12) == ETHERTYPE_FT {
        let e = Expect {
            out: Some(f.to_vec()),
            ..Expect::new("kick", st, TC_ACT_SHOT).count(C_RELEASE_KICK, 1)
        };
        return vec![release(e, None)];
    }
    if f.len() > MAX_FRAME {
        return vec![Expect::dropped(
            "oversize",
            st,
            TC_ACT_SHOT,
            &[C_DROP_OVERSIZE],
        )];
    }
    if st.ctl.tail - st.ctl.head > sc.cfg.hold_mask {
        return vec![Expect::dropped(
            "ring full",
            st,
            TC_ACT_SHOT,
            &[C_DROP_HOLD_FULL],
        )];
    }
    let e = Expect {
        held: 1,
        out: Some(f.to_vec()),
        ..Expect::new("held", st, TC_ACT_SHOT).count(C_HOLD_ENQ, 1)
    };
    vec![release(e, Some((st.seq.last_seq, st.chan.vm_last)))]
}

/// (a)-(c) on the VM side: every frame the VM emits is held (copied intact into the
/// ring with its dependencies) or dropped and counted (oversize, ring full, suppressed on
/// a backup or standby), and released only when both acks cover it and the lease is
/// valid (solo: at once); a logging-link frame from the VM is only a release pass, never
/// held or emitted. Random bytes and mutations, in several ring and ack states.
#[test]
fn vm_tc_holds_until_acked_and_counts_the_rest() {
    let mut p = Plane::load();
    let mut st = empty_state(ROLE_PRIMARY);
    st.seq = SeqState {
        last_seq: 200,
        acked: 100,
        vm_acked: 40,
        last_peer_ns: 0,
    };
    st.chan.vm_last = 50;
    p.put(&st).unwrap();
    // Fill the ring: 256 frames, each depending on (200, 50).
    let mut slots = vec![Vec::new(); HOLD_SLOTS as usize];
    for i in 0..HOLD_SLOTS as u64 {
        let f = vm_frame(i);
        assert_eq!(p.run("ft_vm_tc", &f).unwrap().0, TC_ACT_SHOT);
        slots[i as usize] = f;
    }
    let s = p.state().unwrap();
    assert_eq!((s.ctl.head, s.ctl.tail), (0, HOLD_SLOTS as u64));
    let ring = |head: u64, tail: u64| HoldCtl {
        head,
        tail,
        lock: 0,
        kick: 0,
    };
    let mut covered = st;
    covered.seq.acked = 200;
    covered.seq.vm_acked = 50;
    let mut no_lease = covered;
    no_lease.node.lease_deadline_ns = 1;
    let mut variants = vec![];
    for (mut v, role, ctl) in [
        (st, ROLE_PRIMARY, ring(0, 0)),
        (st, ROLE_PRIMARY, ring(0, 3)),
        (st, ROLE_PRIMARY, ring(0, HOLD_SLOTS as u64)),
        (covered, ROLE_PRIMARY, ring(0, 0)),
        (covered, ROLE_PRIMARY, ring(0, 5)),
        (no_lease, ROLE_PRIMARY, ring(0, 5)),
        (st, ROLE_SOLO, ring(0, 4)),
        (st, ROLE_BACKUP, ring(0, 4)),
        (st, ROLE_STANDBY, ring(0, 0)),
    ] {
        v.node.role = role;
        v.ctl = ctl;
        variants.push(v);
    }
    let seeds = [
        vm_frame(1000),
        udp_frame(CLIENT_MAC, VM_MAC, 7, 0),
        udp_frame(CLIENT_MAC, VM_MAC, 8, MAX_FRAME - 42),
        udp_frame(CLIENT_MAC, VM_MAC, 8, MAX_FRAME - 41),
        arp_request(CLIENT_IP),
        primary_frame(KIND_HEARTBEAT, 0, 0, 0, &[]),
        backup_frame(KIND_ACK, SESSION, EPOCH, 200, 50),
    ];
    let p = RefCell::new(p);
    let slots = RefCell::new(slots);
    let seen = RefCell::new(Seen::default());
    runner(1500)
        .run(
            &(0..seeds.len(), vec(mutation(), 0..3), 0..variants.len()),
            |(i, ms, v)| {
                let mut p = p.borrow_mut();
                let f = mutate(&seeds[i], &ms);
                let st = variants[v];
                p.put(&st).unwrap();
                if p.refused("ft_vm_tc", &f) {
                    return Ok(());
                }
                let sc = Scene {
                    st,
                    cfg: config(),
                    deps: vec![(200, 50); HOLD_SLOTS as usize],
                    slots: slots.borrow().clone(),
                    retx: BTreeMap::new(),
                };
                p.put(&st).unwrap();
                let before = p.snap().unwrap();
                let (action, out) = p
                    .run("ft_vm_tc", &f)
                    .map_err(|e| TestCaseError::fail(format!("test run failed: {e:?}")))?;
                let after = p.snap().unwrap();
                let held = after.st.ctl.tail != before.st.ctl.tail;
                let o = Obs {
                    action,
                    tc: None,
                    tc_refused: false,
                    out,
                    before,
                    after,
                };
                let what = check_any(&vm_tc_expect(&sc, &f), &o).map_err(|e| {
                    TestCaseError::fail(format!(
                        "{} frame {}:\n  {e}",
                        role_name(st.node.role),
                        hex(&f)
                    ))
                })?;
                if held {
                    // Copied intact, with the dependencies of that moment.
                    let slot = p.hold_slot(st.ctl.tail).unwrap();
                    prop_assert_eq!(&slot.data[..slot.len as usize], f.as_slice());
                    prop_assert_eq!(
                        (slot.dep, slot.dep_vm, slot.ready),
                        (200, 50, st.ctl.tail + 1)
                    );
                    slots.borrow_mut()[Scene::slot(st.ctl.tail)] = f;
                }
                seen.borrow_mut()
                    .add(format!("{} {what}", role_name(st.node.role)));
                Ok(())
            },
        )
        .unwrap();
    seen.borrow().require(
        "vm",
        &[
            "primary held",
            "primary held, released",
            "primary kick",
            "primary kick, released",
            "primary oversize",
            "primary ring full",
            "solo held, released",
            "backup suppressed",
            "standby suppressed",
        ],
    );
}

// ---- ft_client_egress: the fence guard -----------------------------------------------------

/// Anything with the VM's source MAC leaves the client NIC only from a live node with a
/// valid lease; everything else with it is dropped and counted; other frames pass.
#[test]
fn client_egress_fences_the_vm_mac() {
    let mut p = Plane::load();
    let seeds = [
        vm_frame(1),
        udp_frame(VM_MAC, CLIENT_MAC, 2, 10),
        arp_request(VM_IP),
        backup_frame(KIND_ACK, SESSION, EPOCH, 1, 1),
    ];
    let p = RefCell::new(&mut p);
    let seen = RefCell::new(Seen::default());
    runner(1000)
        .run(
            &(
                0..seeds.len(),
                vec(mutation(), 0..3),
                0u32..4,
                prop_oneof![Just(0u64), Just(1), Just(u64::MAX)],
            ),
            |(i, ms, role, lease)| {
                let mut p = p.borrow_mut();
                let f = mutate(&seeds[i], &ms);
                let mut st = empty_state(role);
                st.node.lease_deadline_ns = lease;
                p.put(&st).unwrap();
                if p.refused("ft_client_egress", &f) {
                    return Ok(());
                }
                let before = p.snap().unwrap();
                let (action, out) = p
                    .run("ft_client_egress", &f)
                    .map_err(|e| TestCaseError::fail(format!("test run failed: {e:?}")))?;
                let after = p.snap().unwrap();
                let live = role == ROLE_PRIMARY || role == ROLE_SOLO;
                let e = if f[6..12] != VM_MAC || (live && lease == u64::MAX) {
                    Expect::new("passes", &st, TC_ACT_OK)
                } else {
                    Expect::dropped("fenced", &st, TC_ACT_SHOT, &[C_DROP_FENCED_EGRESS])
                };
                let o = Obs {
                    action,
                    tc: None,
                    tc_refused: false,
                    out,
                    before,
                    after,
                };
                let what = check_any(&[e], &o).map_err(TestCaseError::fail)?;
                seen.borrow_mut().add(what);
                Ok(())
            },
        )
        .unwrap();
    seen.borrow().require("egress", &["passes", "fenced"]);
}
