//! Loading, configuring and attaching the kernel data plane (ebpf/programs), and typed
//! access to its maps. The daemon owns the program links: they detach when it exits.
use std::sync::Mutex;

pub mod keys;
mod mapped;
pub mod testrun;
use mapped::Mapped;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use ft_common::{maps::*, wire::MIN_LOG_MTU};
use tracing::{info, warn};

use crate::{
    config::{Config, XdpAttachMode},
    netif::{Interface, NetifError, UnicastFilterEntry},
};

pub type EbpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ft"));

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error(transparent)]
    Netif(#[from] NetifError),
    #[error(
        "logging NIC {name} has MTU {mtu}; log frames need at least {MIN_LOG_MTU} \
         (run: ip link set dev {name} mtu 2000 — on both ends of the logging link)"
    )]
    LogMtu { name: String, mtu: u32 },
    #[error("loading the eBPF object failed (is this root, with BPF enabled?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error(
        "attaching {name} to {iface} failed: {source}. Is another XDP/tc program attached, \
             or does the driver lack native XDP (try interfaces.xdp_mode = \"skb\")?"
    )]
    Attach {
        name: &'static str,
        iface: String,
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("filling the duplication devmap failed: {0}")]
    DevMap(String),
    #[error(
        "mapping BPF map {name} into the daemon failed: {error}; the kernel needs BPF_F_MMAPABLE array maps (Linux >= 5.5)"
    )]
    Mmap {
        name: &'static str,
        error: std::io::Error,
    },
    #[error("channel.hold_slots = {0} exceeds {1}, the most held frames one trigger can release")]
    HoldRing(u32, u32),
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { name, source }
}

/// The resolved NICs of this node.
#[derive(Clone, Debug)]
pub struct Nics {
    pub client: Interface,
    pub logging: Interface,
    pub vm: Interface,
}

impl Nics {
    pub fn resolve(cfg: &Config) -> Result<Nics, DataPlaneError> {
        let nics = Nics {
            client: Interface::lookup(&cfg.interfaces.client)?,
            logging: Interface::lookup(&cfg.interfaces.logging)?,
            vm: Interface::lookup(&cfg.interfaces.vm)?,
        };
        if (nics.logging.mtu as usize) < MIN_LOG_MTU {
            return Err(DataPlaneError::LogMtu {
                name: nics.logging.name.clone(),
                mtu: nics.logging.mtu,
            });
        }
        Ok(nics)
    }
}

/// A loaded and attached data plane. Dropping it detaches every program.
pub struct DataPlane {
    // Program links live inside `ebpf`; maps used at run time were taken out of it.
    _ebpf: Ebpf,
    logger: Mutex<Option<EbpfLogger>>,
    node: Mutex<Array<MapData, NodeState>>,
    seq: Mapped<SeqState>,
    chan: Mapped<ChanState>,
    hold_ctl: Array<MapData, HoldCtl>,
    counters: PerCpuArray<MapData, u64>,
    hist: PerCpuArray<MapData, u64>,
    /// Backup: the log frames XDP buffered (`LOG_RING`), until the channel takes it.
    log_ring: Mutex<Option<RingBuf<MapData>>>,
    /// Backup: how far each stream is buffered (`KACK`), raised by XDP and the daemon.
    kack: Mapped<KernelAck>,
    /// The daemon stopped the kernel's acks (`kack_stop`): never started again.
    kack_stopped: std::sync::atomic::AtomicBool,
    /// The channel keys the programs check and make frames with (`KEYS`).
    pub keys: keys::KernelKeys,
    pub nics: Nics,
    /// The VM's MAC in the client NIC's unicast filter (removed when this is dropped).
    _vm_mac_filter: UnicastFilterEntry,
}

impl DataPlane {
    /// Loads the programs, writes the configuration and attaches everything.
    /// `session` is this run's random session number (see ft_common::wire).
    pub fn start(cfg: &Config, node: NodeState, session: u64) -> Result<DataPlane, DataPlaneError> {
        raise_memlock();
        if cfg.channel.hold_slots > HOLD_RELEASE_MAX {
            return Err(DataPlaneError::HoldRing(
                cfg.channel.hold_slots,
                HOLD_RELEASE_MAX,
            ));
        }
        let nics = Nics::resolve(cfg)?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("RETX", cfg.channel.retx_slots)
            .map_max_entries("HOLD", cfg.channel.hold_slots)
            .load(EBPF_OBJECT)?;
        // Rare-event warnings from the programs (aya-log), forwarded into tracing.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("eBPF log messages unavailable: {e}");
                None
            }
        };

        let mut flags = 0;
        if cfg.channel.hold_output {
            flags |= CFG_HOLD_OUTPUT;
        } else {
            warn!("channel.hold_output = false: the output rule is OFF (benchmark baseline only)");
        }
        if cfg.vm.tagged() {
            flags |= CFG_VM_TAGGED_INPUT;
        }
        match (cfg.channel.kernel_acks, cfg.interfaces.xdp_mode) {
            (true, crate::config::XdpAttachMode::Driver) => flags |= CFG_KERNEL_ACKS,
            (true, crate::config::XdpAttachMode::Skb) => warn!(
                "interfaces.xdp_mode = \"skb\": the backup's daemon sends every ack (kernel \
                 acks need native XDP); the output rule waits for its wake-up"
            ),
            (false, _) => {
                warn!(
                    "channel.kernel_acks = false: the backup's daemon sends every ack (benchmark baseline)"
                )
            }
        }
        let config = Config_ {
            retx_mask: cfg.channel.retx_slots as u64 - 1,
            hold_mask: cfg.channel.hold_slots as u64 - 1,
            window: cfg.window(),
            flags,
            client_ifindex: nics.client.ifindex,
            log_ifindex: nics.logging.ifindex,
            vm_ifindex: nics.vm.ifindex,
            vm_ipv4: cfg.vm.ipv4.octets(),
            vm_mac: cfg.vm.mac.0,
            own_log_mac: nics.logging.mac,
            peer_log_mac: cfg.interfaces.peer_log_mac.0,
            _pad: [0; 2],
            session,
            kack_interval_ns: cfg.channel.kernel_ack_interval_us * 1000,
        };
        let mut cfg_map: Array<MapData, Config_> =
            Array::try_from(ebpf.take_map("CONFIG").expect("CONFIG map"))
                .map_err(map_err("CONFIG"))?;
        cfg_map.set(0, config, 0).map_err(map_err("CONFIG"))?;
        let mut node_map: Array<MapData, NodeState> =
            Array::try_from(ebpf.take_map("NODE").expect("NODE map")).map_err(map_err("NODE"))?;
        node_map.set(0, node, 0).map_err(map_err("NODE"))?;
        let seq = Mapped::new("SEQ", ebpf.take_map("SEQ").expect("SEQ map"), false)?;
        let chan = Mapped::new("CHAN", ebpf.take_map("CHAN").expect("CHAN map"), true)?;
        let hold_ctl: Array<MapData, HoldCtl> =
            Array::try_from(ebpf.take_map("HOLD_CTL").expect("HOLD_CTL map"))
                .map_err(map_err("HOLD_CTL"))?;
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").expect("COUNTERS map"))
            .map_err(map_err("COUNTERS"))?;
        let hist = PerCpuArray::try_from(ebpf.take_map("HOLD_HIST").expect("HOLD_HIST map"))
            .map_err(map_err("HOLD_HIST"))?;
        let log_ring = RingBuf::try_from(ebpf.take_map("LOG_RING").expect("LOG_RING map"))
            .map_err(map_err("LOG_RING"))?;
        let kack: Mapped<KernelAck> =
            Mapped::new("KACK", ebpf.take_map("KACK").expect("KACK map"), true)?;
        // The channel keys, before any program is attached.
        let keys = keys::KernelKeys::new(ebpf.take_map("KEYS").expect("KEYS map"))?;
        keys.write(&cfg.channel.keys.held());
        // Nothing is acked by the kernel until the daemon knows where the log starts.
        // SAFETY (of the closures): field projections of the mapped value, no reads.
        kack.store(|p| unsafe { &raw const (*p).input }, KACK_STOP);
        kack.store(|p| unsafe { &raw const (*p).vm }, KACK_STOP);

        for name in ["ft_client_rx", "ft_log_rx", "ft_strip"] {
            xdp(&mut ebpf, name)?
                .load()
                .map_err(|source| DataPlaneError::Program { name, source })?;
        }
        for name in [
            "ft_log_tc",
            "ft_vm_tc",
            "ft_client_egress",
            "ft_release_more",
        ] {
            tc(&mut ebpf, name)?
                .load()
                .map_err(|source| DataPlaneError::Program { name, source })?;
        }
        // Where a releaser that filled all its passes continues (tail call).
        let more_fd = tc(&mut ebpf, "ft_release_more")?
            .fd()
            .map_err(|source| DataPlaneError::Program {
                name: "ft_release_more",
                source,
            })?
            .try_clone()
            .map_err(|e| DataPlaneError::DevMap(e.to_string()))?;
        let mut more = aya::maps::ProgramArray::try_from(
            ebpf.map_mut("RELEASE_MORE").expect("RELEASE_MORE map"),
        )
        .map_err(map_err("RELEASE_MORE"))?;
        more.set(0, &more_fd, 0).map_err(map_err("RELEASE_MORE"))?;

        // Duplication fan-out: key 1 = VM side (header stripped unless tagged input),
        // key 2 = logging NIC.
        let strip_fd = xdp(&mut ebpf, "ft_strip")?
            .fd()
            .map_err(|source| DataPlaneError::Program {
                name: "ft_strip",
                source,
            })?
            .try_clone()
            .map_err(|e| DataPlaneError::DevMap(e.to_string()))?;
        let mut fanout = DevMapHash::try_from(ebpf.map_mut("FANOUT").expect("FANOUT map"))
            .map_err(map_err("FANOUT"))?;
        let vm_prog = if cfg.vm.tagged() {
            None
        } else {
            Some(&strip_fd)
        };
        fanout
            .insert(1, nics.vm.ifindex, vm_prog, 0)
            .map_err(|e| DataPlaneError::DevMap(format!("VM side {}: {e}", nics.vm.name)))?;
        fanout
            .insert(2, nics.logging.ifindex, None, 0)
            .map_err(|e| {
                DataPlaneError::DevMap(format!("logging NIC {}: {e}", nics.logging.name))
            })?;

        let mode = match cfg.interfaces.xdp_mode {
            XdpAttachMode::Driver => XdpMode::Driver,
            XdpAttachMode::Skb => XdpMode::Skb,
        };
        // Order matters: guards and the hold path first, then the inputs.
        attach_tc(
            &mut ebpf,
            "ft_client_egress",
            &nics.client.name,
            TcAttachType::Egress,
        )?;
        attach_tc(&mut ebpf, "ft_vm_tc", &nics.vm.name, TcAttachType::Ingress)?;
        attach_tc(
            &mut ebpf,
            "ft_log_tc",
            &nics.logging.name,
            TcAttachType::Ingress,
        )?;
        attach_xdp(&mut ebpf, "ft_log_rx", &nics.logging.name, mode)?;
        attach_xdp(&mut ebpf, "ft_client_rx", &nics.client.name, mode)?;
        // The client NIC must pass frames for the VM's MAC up to XDP.
        let vm_mac_filter = UnicastFilterEntry::add(&nics.client, cfg.vm.mac.0)?;
        info!(
            client = %nics.client.name, logging = %nics.logging.name, vm = %nics.vm.name,
            role = role_name(node.role), epoch = node.epoch, "data plane attached"
        );
        Ok(DataPlane {
            _ebpf: ebpf,
            logger: Mutex::new(logger),
            node: Mutex::new(node_map),
            seq,
            chan,
            hold_ctl,
            counters,
            hist,
            log_ring: Mutex::new(Some(log_ring)),
            kack,
            kack_stopped: Default::default(),
            keys,
            nics,
            _vm_mac_filter: vm_mac_filter,
        })
    }

    /// The eBPF log reader, for the daemon to drive (once).
    pub fn take_logger(&self) -> Option<EbpfLogger> {
        self.logger.lock().unwrap().take()
    }

    pub fn node_state(&self) -> Result<NodeState, DataPlaneError> {
        self.node
            .lock()
            .unwrap()
            .get(&0, 0)
            .map_err(map_err("NODE"))
    }

    /// Changes role/epoch/lease in an order that is safe at every step: the lease
    /// deadline is cleared before the epoch or role changes and set last.
    pub fn set_node_state(&self, new: NodeState) -> Result<(), DataPlaneError> {
        let mut m = self.node.lock().unwrap();
        let cur = m.get(&0, 0).map_err(map_err("NODE"))?;
        if cur.epoch != new.epoch || cur.role != new.role {
            m.set(
                0,
                NodeState {
                    lease_deadline_ns: 0,
                    ..cur
                },
                0,
            )
            .map_err(map_err("NODE"))?;
            m.set(
                0,
                NodeState {
                    lease_deadline_ns: 0,
                    ..new
                },
                0,
            )
            .map_err(map_err("NODE"))?;
        }
        m.set(0, new, 0).map_err(map_err("NODE"))
    }

    /// Updates only the lease deadline (renewals).
    pub fn set_lease_deadline(&self, deadline_ns: u64) -> Result<(), DataPlaneError> {
        let mut m = self.node.lock().unwrap();
        let cur = m.get(&0, 0).map_err(map_err("NODE"))?;
        m.set(
            0,
            NodeState {
                lease_deadline_ns: deadline_ns,
                ..cur
            },
            0,
        )
        .map_err(map_err("NODE"))
    }

    /// The kernel's sequence state (each field read atomically).
    pub fn seq_state(&self) -> SeqState {
        let s = &self.seq;
        SeqState {
            // SAFETY (of the field projections): `p` points to the live mapped value.
            last_seq: s.load(|p| unsafe { &raw const (*p).last_seq }),
            acked: s.load(|p| unsafe { &raw const (*p).acked }),
            vm_acked: s.load(|p| unsafe { &raw const (*p).vm_acked }),
            last_peer_ns: s.load(|p| unsafe { &raw const (*p).last_peer_ns }),
        }
    }

    /// The daemon's channel state as the kernel sees it.
    pub fn chan_state(&self) -> ChanState {
        let c = &self.chan;
        ChanState {
            // SAFETY (of the field projections): `p` points to the live mapped value.
            delivered: c.load(|p| unsafe { &raw const (*p).delivered }),
            vm_last: c.load(|p| unsafe { &raw const (*p).vm_last }),
            peer_session: c.load(|p| unsafe { &raw const (*p).peer_session }),
            _pad: 0,
        }
    }

    /// Backup: the highest contiguous input sequence stored, so XDP drops duplicates early.
    pub fn set_delivered(&self, v: u64) {
        // SAFETY (of the projection): `p` points to the live mapped value.
        self.chan.store(|p| unsafe { &raw const (*p).delivered }, v)
    }

    /// Primary: the highest VMLOG sequence handed to the logging link; call it before the
    /// output that depends on those entries reaches the VM NIC.
    pub fn set_vm_last(&self, v: u64) {
        // SAFETY (of the projection): `p` points to the live mapped value.
        self.chan.store(|p| unsafe { &raw const (*p).vm_last }, v)
    }

    /// Backup: the primary session followed (XDP drops frames of any other).
    pub fn set_peer_session(&self, v: u64) {
        // SAFETY (of the projection): `p` points to the live mapped value.
        self.chan
            .store(|p| unsafe { &raw const (*p).peer_session }, v)
    }

    pub fn hold_ctl(&self) -> Result<HoldCtl, DataPlaneError> {
        self.hold_ctl.get(&0, 0).map_err(map_err("HOLD_CTL"))
    }

    /// Sums of the per-CPU counters, indexed like `COUNTER_INFO`.
    pub fn counters(&self) -> Result<Vec<u64>, DataPlaneError> {
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

    /// `HOLD_HIST` summed over CPUs: the bucket counts, then the sum of the hold times
    /// in ns (`HIST_SUM_SLOT`).
    pub fn hold_histogram(&self) -> Result<Vec<u64>, DataPlaneError> {
        (0..HIST_ENTRIES)
            .map(|i| {
                Ok(self
                    .hist
                    .get(&i, 0)
                    .map_err(map_err("HOLD_HIST"))?
                    .iter()
                    .sum())
            })
            .collect()
    }

    /// Backup: the ring of log frames XDP buffered, for the channel's receive loop (once).
    pub fn take_log_ring(&self) -> Option<RingBuf<MapData>> {
        self.log_ring.lock().unwrap().take()
    }

    /// Backup: the kernel may ack, from the frames after `input` and `vm` on (the last
    /// frame of each stream before where the log starts). No effect once stopped.
    pub fn kack_start(&self, input: u64, vm: u64) {
        if self.kack_stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // SAFETY (of the closures): field projections of the mapped value, no reads.
        self.kack
            .compare_exchange(|p| unsafe { &raw const (*p).input }, KACK_STOP, input);
        self.kack
            .compare_exchange(|p| unsafe { &raw const (*p).vm }, KACK_STOP, vm);
    }

    /// Backup: the daemon holds both streams in order up to `input` and `vm`: raise the
    /// cumulative acks to them. Returns the values before (stop bit cleared), so the
    /// caller knows whether the kernel had acked that far already.
    pub fn kack_raise(&self, input: u64, vm: u64) -> (u64, u64) {
        // SAFETY (of the closures): field projections of the mapped value, no reads.
        let i = self
            .kack
            .fetch_max(|p| unsafe { &raw const (*p).input }, input);
        let v = self.kack.fetch_max(|p| unsafe { &raw const (*p).vm }, vm);
        (i & !KACK_STOP, v & !KACK_STOP)
    }

    /// Backup: the kernel acks nothing more, for good. Returns the last acks sent (stop
    /// bit cleared): every frame up to them is in `LOG_RING` or already in the daemon
    /// (XDP submits a record before it raises the ack), and no ack beyond them can be
    /// sent afterwards (the stop bit makes XDP's compare-and-swap fail).
    pub fn kack_stop(&self) -> (u64, u64) {
        self.kack_stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // SAFETY (of the closures): field projections of the mapped value, no reads.
        let i = self
            .kack
            .fetch_or(|p| unsafe { &raw const (*p).input }, KACK_STOP);
        let v = self
            .kack
            .fetch_or(|p| unsafe { &raw const (*p).vm }, KACK_STOP);
        (i & !KACK_STOP, v & !KACK_STOP)
    }
}

// `Config` is also the daemon's config type; alias the map value.
use ft_common::maps::Config as Config_;

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataPlaneError> {
    ebpf.program_mut(name)
        .expect("program present in the object")
        .try_into()
        .map_err(|source| DataPlaneError::Program { name, source })
}

fn tc<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataPlaneError> {
    ebpf.program_mut(name)
        .expect("program present in the object")
        .try_into()
        .map_err(|source| DataPlaneError::Program { name, source })
}

fn attach_xdp(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    mode: XdpMode,
) -> Result<(), DataPlaneError> {
    xdp(ebpf, name)?
        .attach(iface, mode)
        .map(|_| ())
        .map_err(|source| DataPlaneError::Attach {
            name,
            iface: iface.into(),
            source,
        })
}

fn attach_tc(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    ty: TcAttachType,
) -> Result<(), DataPlaneError> {
    tc(ebpf, name)?
        .attach(iface, ty)
        .map(|_| ())
        .map_err(|source| DataPlaneError::Attach {
            name,
            iface: iface.into(),
            source,
        })
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit call with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("setrlimit(RLIMIT_MEMLOCK) failed; relying on memcg accounting");
    }
}
