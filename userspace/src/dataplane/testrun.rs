//! Running the data plane's programs with `BPF_PROG_RUN` (`BPF_PROG_TEST_RUN`), attached
//! to nothing: for benchmarks (`perf/kernel`) and tests.
//!
//! [`TestPlane::load`] loads an eBPF object (normally [`super::EBPF_OBJECT`]) the way
//! `DataPlane::start` does: the same map sizes set at load, every program loaded and
//! verified, the release continuation in `RELEASE_MORE`. [`TestPlane::configure`] writes
//! `CONFIG` and the dynamic maps as a node of a given role has them; the frame builders
//! make the frames such a node receives (client frames, the VM's output, log frames from
//! the primary, tagged frames from the backup). [`TestPlane::run`] runs one program with
//! `repeat`, [`TestPlane::run_live`] with `BPF_F_TEST_XDP_LIVE_FRAMES`.
//!
//! Maps that a newer or older object may not have (`LOG_RING`, `KACK`) are optional, so
//! a caller that only runs a program and reports what it returned keeps working while
//! the programs change.
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, MapData, MapError, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        Program, ProgramError, SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, Xdp,
    },
};
use ft_common::{
    maps::{Config as MapConfig, *},
    siphash::SipKey,
    wire::*,
};
use zerocopy::{IntoBytes, byteorder::network_endian::U16};

/// XDP actions and tc verdicts, as the programs return them.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// Name of a program's return value (XDP or tc).
pub fn action_name(xdp: bool, v: u32) -> String {
    let n = if xdp {
        ["ABORTED", "DROP", "PASS", "TX", "REDIRECT"].get(v as usize)
    } else {
        match v {
            0 => Some(&"TC_OK"),
            2 => Some(&"TC_SHOT"),
            7 => Some(&"TC_REDIRECT"),
            _ => None,
        }
    };
    n.map_or_else(|| format!("ret {v}"), |s| s.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    #[error("loading the eBPF object failed (is this root, with BPF enabled?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0} is not in the eBPF object")]
    NoProgram(String),
    #[error("program {name}: {source}")]
    Program { name: String, source: ProgramError },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("BPF map {0} is not in the eBPF object")]
    NoMap(&'static str),
    #[error("{0}")]
    Invalid(String),
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> TestRunError {
    move |source| TestRunError::Map { name, source }
}

/// The node under test: who it is on the logging link and how it is configured. MACs are
/// seen from this node: frames it receives on the logging link go from `peer_log_mac` to
/// `own_log_mac`.
#[derive(Clone, Debug)]
pub struct TestNode {
    pub role: u32,
    pub epoch: u64,
    pub session: u64,
    pub own_log_mac: [u8; 6],
    pub peer_log_mac: [u8; 6],
    pub vm_mac: [u8; 6],
    pub vm_ipv4: [u8; 4],
    pub client_mac: [u8; 6],
    pub client_ipv4: [u8; 4],
    /// The channel key, derived once into the log frames' MAC key (its `sip` is the
    /// tags' key).
    pub key: MacKey,
    /// `CFG_*` flags.
    pub flags: u32,
    /// Most log entries in flight (`Config.window`); `None`: `retx_slots - RETX_MARGIN`.
    pub window: Option<u64>,
    pub client_ifindex: u32,
    pub log_ifindex: u32,
    pub vm_ifindex: u32,
    pub kack_interval_ns: u64,
}

impl TestNode {
    /// A node of `role` with the output rule on, kernel acks on (interval 0), every
    /// interface the loopback (ifindex 1) and a fixed key, epoch and session.
    pub fn new(role: u32) -> TestNode {
        TestNode {
            role,
            epoch: 7,
            session: 0x5e55_1011_2233_4455,
            own_log_mac: [0x02, 0, 0, 0, 0, 0xaa],
            peer_log_mac: [0x02, 0, 0, 0, 0, 0xbb],
            vm_mac: [0x02, 0xf7, 0, 0, 0, 0x64],
            vm_ipv4: [10, 0, 0, 100],
            client_mac: [0x02, 0xc1, 0, 0, 0, 1],
            client_ipv4: [10, 0, 0, 1],
            key: MacKey::derive(&SipKey::from_bytes(b"ft-testrun-key!!")),
            flags: CFG_HOLD_OUTPUT | CFG_KERNEL_ACKS,
            window: None,
            client_ifindex: 1,
            log_ifindex: 1,
            vm_ifindex: 1,
            kack_interval_ns: 0,
        }
    }

    pub fn node_state(&self) -> NodeState {
        NodeState {
            epoch: self.epoch,
            lease_deadline_ns: u64::MAX,
            role: self.role,
            _pad: 0,
        }
    }

    fn eth(&self, dst: [u8; 6], src: [u8; 6], ethertype: u16) -> EthHdr {
        EthHdr {
            dst,
            src,
            ethertype: U16::new(ethertype),
        }
    }

    /// An IPv4/UDP frame of exactly `len` bytes (at least 42) from `src` to `dst`.
    fn udp(&self, dst: [u8; 6], src: [u8; 6], ips: ([u8; 4], [u8; 4]), len: usize) -> Vec<u8> {
        let len = len.max(ETH_HLEN + 28);
        let ip_len = (len - ETH_HLEN) as u16;
        let mut f = self.eth(dst, src, ETHERTYPE_IPV4).as_bytes().to_vec();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&ip_len.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&ips.0);
        f.extend_from_slice(&ips.1);
        f.extend_from_slice(&[0x9c, 0x40, 0x18, 0xeb]);
        f.extend_from_slice(&(ip_len - 20).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend((f.len()..len).map(|i| i as u8));
        f
    }

    /// A client's frame for the VM of `len` bytes (Ethernet header included).
    pub fn client_frame(&self, len: usize) -> Vec<u8> {
        let ips = (self.client_ipv4, self.vm_ipv4);
        self.udp(self.vm_mac, self.client_mac, ips, len)
    }

    /// A header of this node's run, naming its key (`key_id`, `key_adv`).
    pub fn hdr(&self, kind: u8, seq: u64) -> FtHdr {
        let mut ft = FtHdr::new(kind, self.session, self.epoch, seq);
        ft.key_id = key_id(&self.key.sip);
        ft.key_adv = ft.key_id;
        ft
    }

    /// A frame the VM emits for a client, `len` bytes.
    pub fn vm_frame(&self, len: usize) -> Vec<u8> {
        let ips = (self.vm_ipv4, self.client_ipv4);
        self.udp(self.client_mac, self.vm_mac, ips, len)
    }

    /// A frame from the primary carrying `payload`, as this (backup) node receives it: a
    /// LOG or VMLOG frame with its MAC in `aux` (the `aux` given is not used), or a
    /// HEARTBEAT with `aux` and its tag (the payload given is not used).
    pub fn primary_frame(&self, kind: u8, seq: u64, aux: u64, payload: &[u8]) -> Vec<u8> {
        if kind_is_tagged(kind) {
            return self.tagged_frame(kind, seq, aux);
        }
        let mut ft = self.hdr(kind, seq);
        ft.len.set(payload.len() as u16);
        ft.aux.set(payload_mac(&self.key, &ft, payload));
        let hdr = LogHdr {
            eth: self.eth(self.own_log_mac, self.peer_log_mac, ETHERTYPE_FT),
            ft,
        };
        let mut f = hdr.as_bytes().to_vec();
        f.extend_from_slice(payload);
        f.resize(f.len().max(60), 0);
        f
    }

    /// The LOG frame of input frame `seq`, a client frame of `len` bytes.
    pub fn log_frame(&self, seq: u64, len: usize) -> Vec<u8> {
        self.primary_frame(KIND_LOG, seq, 0, &self.client_frame(len))
    }

    /// A VMLOG frame `seq` with `len` payload bytes (the backup's XDP does not parse it).
    pub fn vmlog_frame(&self, seq: u64, len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        self.primary_frame(KIND_VMLOG, seq, 0, &payload)
    }

    /// A tagged frame from the backup (ACK, NACK, VMNACK, LEAVE), as its daemon builds it
    /// and this (primary) node receives it.
    pub fn backup_frame(&self, kind: u8, seq: u64, aux: u64) -> Vec<u8> {
        self.tagged_frame(kind, seq, aux)
    }

    /// A control frame (`kind_is_tagged`) with `aux` and its tag, as either side's daemon
    /// builds it (`channel::frames::control_frame`): already above the Ethernet minimum,
    /// and a NACK padded to a full log frame.
    fn tagged_frame(&self, kind: u8, seq: u64, aux: u64) -> Vec<u8> {
        const { assert!(TAGGED_HLEN >= 60) };
        let mut ft = self.hdr(kind, seq);
        ft.aux.set(aux);
        ft.len.set(TAG_LEN as u16);
        let mut f = TaggedHdr {
            eth: self.eth(self.own_log_mac, self.peer_log_mac, ETHERTYPE_FT),
            ft,
            tag: frame_tag(&self.key.sip, &ft).into(),
        }
        .as_bytes()
        .to_vec();
        if kind == KIND_NACK {
            f.resize(LOG_OVERHEAD + MAX_FRAME, 0);
        }
        f
    }

    /// The cumulative ack of both streams (input `seq`, VMM stream `vm_seq`).
    pub fn ack_frame(&self, seq: u64, vm_seq: u64) -> Vec<u8> {
        self.backup_frame(KIND_ACK, seq, vm_seq)
    }
}

/// One `BPF_PROG_TEST_RUN`: what the program returned (the last run), the kernel's mean
/// duration of one run in ns, and the frame after the last run.
#[derive(Clone, Debug)]
pub struct RunOutput {
    pub action: u32,
    pub duration_ns: u64,
    pub data_out: Vec<u8>,
}

/// `struct xdp_md` as `ctx_in` of an XDP test run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, zerocopy::Immutable)]
pub struct XdpMd {
    pub data: u32,
    pub data_end: u32,
    pub data_meta: u32,
    pub ingress_ifindex: u32,
    pub rx_queue_index: u32,
    pub egress_ifindex: u32,
}

/// The loaded object, attached to nothing, and its maps.
pub struct TestPlane {
    ebpf: Ebpf,
    pub retx_slots: u32,
    pub hold_slots: u32,
    pub config: Array<MapData, MapConfig>,
    pub node: Array<MapData, NodeState>,
    pub seq: Array<MapData, SeqState>,
    pub chan: Array<MapData, ChanState>,
    pub hold_ctl: Array<MapData, HoldCtl>,
    pub counters: PerCpuArray<MapData, u64>,
    pub kack: Option<Array<MapData, KernelAck>>,
    /// `KEYS` (absent in objects older than wire v4 key rotation).
    pub keys: Option<Array<MapData, KeyRing>>,
    pub log_ring: Option<RingBuf<MapData>>,
}

impl TestPlane {
    /// Loads `object` as `DataPlane::start` does (RETX and HOLD sized at load, every
    /// program loaded, `ft_release_more` in `RELEASE_MORE`), attaching nothing.
    pub fn load(object: &[u8], retx_slots: u32, hold_slots: u32) -> Result<Self, TestRunError> {
        if !retx_slots.is_power_of_two() || !hold_slots.is_power_of_two() {
            return Err(TestRunError::Invalid(format!(
                "retx_slots {retx_slots} and hold_slots {hold_slots} must be powers of two"
            )));
        }
        if hold_slots > HOLD_RELEASE_MAX {
            return Err(TestRunError::Invalid(format!(
                "hold_slots {hold_slots} exceeds {HOLD_RELEASE_MAX}"
            )));
        }
        super::raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("RETX", retx_slots)
            .map_max_entries("HOLD", hold_slots)
            .load(object)?;
        for name in CORE_PROGRAMS {
            load_program(&mut ebpf, name)?;
        }
        let more: &SchedClassifier = program(&ebpf, "ft_release_more")?
            .try_into()
            .map_err(prog_err("ft_release_more"))?;
        let more = more
            .fd()
            .map_err(prog_err("ft_release_more"))?
            .try_clone()
            .map_err(|e| TestRunError::Invalid(format!("ft_release_more fd: {e}")))?;
        let map = ebpf
            .map_mut("RELEASE_MORE")
            .ok_or(TestRunError::NoMap("RELEASE_MORE"))?;
        ProgramArray::try_from(map)
            .map_err(map_err("RELEASE_MORE"))?
            .set(0, &more, 0)
            .map_err(map_err("RELEASE_MORE"))?;
        macro_rules! take {
            ($name:literal) => {
                ebpf.take_map($name)
                    .ok_or(TestRunError::NoMap($name))?
                    .try_into()
                    .map_err(map_err($name))?
            };
        }
        let kack = match ebpf.take_map("KACK") {
            Some(m) => Some(m.try_into().map_err(map_err("KACK"))?),
            None => None,
        };
        let keys = match ebpf.take_map("KEYS") {
            Some(m) => Some(m.try_into().map_err(map_err("KEYS"))?),
            None => None,
        };
        let log_ring = match ebpf.take_map("LOG_RING") {
            Some(m) => Some(m.try_into().map_err(map_err("LOG_RING"))?),
            None => None,
        };
        Ok(TestPlane {
            retx_slots,
            hold_slots,
            config: take!("CONFIG"),
            node: take!("NODE"),
            seq: take!("SEQ"),
            chan: take!("CHAN"),
            hold_ctl: take!("HOLD_CTL"),
            counters: take!("COUNTERS"),
            kack,
            keys,
            log_ring,
            ebpf,
        })
    }

    /// Loads (verifies) another program of the object, e.g. `ft_pass`, to attach it.
    pub fn load_program(&mut self, name: &str) -> Result<(), TestRunError> {
        load_program(&mut self.ebpf, name)
    }

    /// The loaded object (to attach its programs, e.g. on a test's own interfaces).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The `CONFIG` value for `n`.
    pub fn map_config(&self, n: &TestNode) -> MapConfig {
        MapConfig {
            retx_mask: self.retx_slots as u64 - 1,
            hold_mask: self.hold_slots as u64 - 1,
            window: n
                .window
                .unwrap_or((self.retx_slots as u64).saturating_sub(RETX_MARGIN)),
            flags: n.flags,
            client_ifindex: n.client_ifindex,
            log_ifindex: n.log_ifindex,
            vm_ifindex: n.vm_ifindex,
            vm_ipv4: n.vm_ipv4,
            vm_mac: n.vm_mac,
            own_log_mac: n.own_log_mac,
            peer_log_mac: n.peer_log_mac,
            _pad: [0; 2],
            session: n.session,
            kack_interval_ns: n.kack_interval_ns,
        }
    }

    /// Writes `CONFIG` and `NODE` for `n` and resets `SEQ`, `CHAN`, `HOLD_CTL` and `KACK`
    /// to a fresh node's: nothing logged, held or acked. A backup follows `n.session`
    /// and its kernel may ack from the first frame of each stream on.
    pub fn configure(&mut self, n: &TestNode) -> Result<(), TestRunError> {
        let cfg = self.map_config(n);
        self.config.set(0, cfg, 0).map_err(map_err("CONFIG"))?;
        self.node
            .set(0, n.node_state(), 0)
            .map_err(map_err("NODE"))?;
        let backup = n.role == ROLE_BACKUP;
        let chan = ChanState {
            peer_session: if backup { n.session } else { 0 },
            ..Default::default()
        };
        self.set_state(SeqState::default(), chan, HoldCtl::default())?;
        if let Some(k) = &mut self.keys {
            k.set(0, KeyRing::single(&n.key, key_id(&n.key.sip)), 0)
                .map_err(map_err("KEYS"))?;
        }
        self.set_kack(KernelAck::default())
    }

    pub fn set_state(&mut self, s: SeqState, c: ChanState, h: HoldCtl) -> Result<(), TestRunError> {
        self.seq.set(0, s, 0).map_err(map_err("SEQ"))?;
        self.chan.set(0, c, 0).map_err(map_err("CHAN"))?;
        self.hold_ctl.set(0, h, 0).map_err(map_err("HOLD_CTL"))
    }

    pub fn set_seq(&mut self, s: SeqState) -> Result<(), TestRunError> {
        self.seq.set(0, s, 0).map_err(map_err("SEQ"))
    }

    pub fn set_chan(&mut self, c: ChanState) -> Result<(), TestRunError> {
        self.chan.set(0, c, 0).map_err(map_err("CHAN"))
    }

    pub fn set_hold_ctl(&mut self, h: HoldCtl) -> Result<(), TestRunError> {
        self.hold_ctl.set(0, h, 0).map_err(map_err("HOLD_CTL"))
    }

    /// Sets `KACK` if the object has it.
    pub fn set_kack(&mut self, k: KernelAck) -> Result<(), TestRunError> {
        match &mut self.kack {
            Some(m) => m.set(0, k, 0).map_err(map_err("KACK")),
            None => Ok(()),
        }
    }

    pub fn seq_state(&self) -> Result<SeqState, TestRunError> {
        self.seq.get(&0, 0).map_err(map_err("SEQ"))
    }

    pub fn hold_state(&self) -> Result<HoldCtl, TestRunError> {
        self.hold_ctl.get(&0, 0).map_err(map_err("HOLD_CTL"))
    }

    /// Sums of the per-CPU counters (indices `ft_common::maps::C_*`).
    pub fn counters(&self) -> Result<Vec<u64>, TestRunError> {
        (0..COUNTER_SLOTS)
            .map(|i| {
                Ok(self
                    .counters
                    .get(&i, 0)
                    .map_err(map_err("COUNTERS"))?
                    .iter()
                    .sum())
            })
            .collect()
    }

    /// Drops every `LOG_RING` record (what the backup's daemon would drain); returns how
    /// many there were.
    pub fn drain_log_ring(&mut self) -> usize {
        let Some(ring) = &mut self.log_ring else {
            return 0;
        };
        let mut n = 0;
        while ring.next().is_some() {
            n += 1;
        }
        n
    }

    /// Fills the duplication devmap `FANOUT`: key 1 the VM side (with `ft_strip` when
    /// `strip`), key 2 the logging NIC.
    pub fn set_fanout(
        &mut self,
        vm_ifindex: u32,
        log_ifindex: u32,
        strip: bool,
    ) -> Result<(), TestRunError> {
        let strip_fd = if strip {
            let p: &Xdp = program(&self.ebpf, "ft_strip")?
                .try_into()
                .map_err(prog_err("ft_strip"))?;
            let fd = p.fd().map_err(prog_err("ft_strip"))?;
            Some(
                fd.try_clone()
                    .map_err(|e| TestRunError::Invalid(format!("ft_strip fd: {e}")))?,
            )
        } else {
            None
        };
        let map = self
            .ebpf
            .map_mut("FANOUT")
            .ok_or(TestRunError::NoMap("FANOUT"))?;
        let mut fanout = DevMapHash::try_from(map).map_err(map_err("FANOUT"))?;
        let err = |e| TestRunError::Invalid(format!("filling FANOUT: {e}"));
        fanout
            .insert(1, vm_ifindex, strip_fd.as_ref(), 0)
            .map_err(err)?;
        fanout.insert(2, log_ifindex, None, 0).map_err(err)
    }

    /// Runs `prog` `repeat` times on `data` (the kernel keeps the frame between runs: a
    /// program that rewrites it sees its own output on the next run).
    pub fn run(&self, prog: &str, data: &[u8], repeat: u32) -> Result<RunOutput, TestRunError> {
        let mut out = vec![0u8; data.len().max(2048) + 512];
        let opts = TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..TestRunOptions::new()
        };
        let r = self.test_run(prog, opts)?;
        out.truncate(r.data_size_out as usize);
        Ok(RunOutput {
            action: r.return_value,
            duration_ns: r.duration.as_nanos() as u64,
            data_out: out,
        })
    }

    /// Runs XDP `prog` on `repeat` live frames made from `data` (`BPF_F_TEST_XDP_LIVE_FRAMES`:
    /// redirects and `XDP_TX` really transmit), `batch_size` frames per batch, as if
    /// received on `ingress_ifindex` queue 0. Returns the kernel's mean ns per frame.
    pub fn run_live(
        &self,
        prog: &str,
        data: &[u8],
        repeat: u32,
        ingress_ifindex: u32,
        batch_size: u32,
    ) -> Result<u64, TestRunError> {
        let md = XdpMd {
            data_end: data.len() as u32,
            ingress_ifindex,
            ..Default::default()
        };
        let opts = TestRunOptions {
            data_in: Some(data),
            ctx_in: Some(md.as_bytes()),
            repeat: repeat.max(1),
            attrs: TestRunAttrs::new().xdp_live_frames(batch_size),
            ..TestRunOptions::new()
        };
        Ok(self.test_run(prog, opts)?.duration.as_nanos() as u64)
    }

    /// True if `prog` is an XDP program (false: tc).
    pub fn is_xdp(&self, prog: &str) -> Result<bool, TestRunError> {
        Ok(matches!(program(&self.ebpf, prog)?, Program::Xdp(_)))
    }

    fn test_run(
        &self,
        prog: &str,
        opts: TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, TestRunError> {
        let r = match program(&self.ebpf, prog)? {
            Program::Xdp(p) => p.test_run(opts),
            Program::SchedClassifier(p) => p.test_run(opts),
            _ => return Err(TestRunError::Invalid(format!("{prog} is not XDP or tc"))),
        };
        r.map_err(prog_err(prog))
    }
}

/// The programs `DataPlane::start` loads.
const CORE_PROGRAMS: [&str; 7] = [
    "ft_client_rx",
    "ft_log_rx",
    "ft_strip",
    "ft_log_tc",
    "ft_vm_tc",
    "ft_client_egress",
    "ft_release_more",
];

fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<(), TestRunError> {
    let r = match ebpf.program_mut(name) {
        Some(Program::Xdp(p)) => p.load(),
        Some(Program::SchedClassifier(p)) => p.load(),
        Some(_) => return Err(TestRunError::Invalid(format!("{name} is not XDP or tc"))),
        None => return Err(TestRunError::NoProgram(name.to_string())),
    };
    r.map_err(prog_err(name))
}

fn program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Program, TestRunError> {
    ebpf.program(name)
        .ok_or_else(|| TestRunError::NoProgram(name.to_string()))
}

fn prog_err(name: &str) -> impl Fn(ProgramError) -> TestRunError + '_ {
    move |source| TestRunError::Program {
        name: name.to_string(),
        source,
    }
}
