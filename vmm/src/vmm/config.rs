//! Static configuration of a VMM: the guest's machine and network identity, the
//! service settings passed to it, the replay policy, and the configuration hash that
//! logs and snapshots carry.
use super::Mode;
use crate::abi::*;
use crate::error::{Error, Result};
use crate::hash::hash_words;
use crate::vstate::cpuid;
use std::time::Duration;

/// Static configuration of a VMM.
#[derive(Clone, Debug)]
pub struct VmmConfig {
    pub mode: Mode,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    pub prefix_len: u8,
    pub gateway: [u8; 4],
    pub port: u16,
    /// Record: emit a CHECKPOINT entry every this many exits (0: never).
    pub checkpoint_interval: u64,
    /// `run` returns [`super::RunOutcome::ExitLimit`] once this many exits have happened.
    pub max_exits: Option<u64>,
    /// Inbound frames carry the data plane's 46-byte `LogHdr` (log by sequence number).
    pub tagged_input: bool,
    /// Keep a copy of every output frame (tests).
    pub capture_tx: bool,
    pub console_echo: bool,
    /// Replay: when the log ends, go live instead of stopping (END) or failing (truncated).
    pub go_live_at_end: bool,
    /// Replay: when the log ends, wait for a go-live (or stop) request instead of
    /// stopping (END) or failing (truncated). For a backup fed by a live stream.
    pub wait_for_go_live: bool,
    /// Replay: how long an RX_FRAME_REF waits for its frame to appear in the frame store
    /// before the replay fails with `FrameMissing` (`None`: until the store is closed).
    /// Stop and go-live requests end the wait at any time. Must be well above the
    /// daemon's failover decision time (peer timeout + lease), or a backup whose primary
    /// died with frames in flight fails instead of going live.
    pub frame_wait_timeout: Option<Duration>,
    /// Replay: after delivering frame (epoch, seq) the VMM evicts every frame of the
    /// store at or below (epoch, seq - this) and all older epochs; delivered frames are
    /// removed at once. Allows input frames to reach the primary's VM up to this many
    /// sequence numbers out of order. 0 = evict everything up to the frame delivered.
    pub frame_reorder_window: u64,
    /// Pin the vCPU thread (the thread calling `run`) to this host CPU. Use the same
    /// index on primary and backup hosts.
    pub pin_cpu: Option<usize>,
    /// Guest RAM in bytes: [`RAM_MIN`]..=[`RAM_MAX`], a multiple of [`RAM_ALIGN`].
    pub ram_size: u64,
    /// Settings of the guest's service, passed in `BootInfo` (part of the config hash).
    pub service: ServiceConfig,
}

/// Settings of the guest's RESP service. Zero means "the guest's default" (derived from
/// its heap size where it depends on memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceConfig {
    pub maxclients: u32,
    pub maxmemory: u64,
    /// Close clients idle for this many seconds (0 = never).
    pub timeout_s: u32,
    /// TCP keep-alive interval in seconds (0 = off).
    pub tcp_keepalive_s: u32,
    /// Housekeeping ticks per second (0 = 10).
    pub hz: u32,
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            mode: Mode::Free,
            mac: [0x02, 0x00, 0x00, 0x00, 0x00, 0x02],
            ip: [10, 0, 0, 2],
            prefix_len: 24,
            gateway: [0; 4],
            port: 6379,
            checkpoint_interval: 1000,
            max_exits: None,
            tagged_input: false,
            capture_tx: false,
            console_echo: false,
            go_live_at_end: false,
            wait_for_go_live: false,
            frame_wait_timeout: Some(Duration::from_secs(30)),
            frame_reorder_window: 1024,
            pin_cpu: None,
            ram_size: RAM_DEFAULT,
            service: ServiceConfig {
                tcp_keepalive_s: 60,
                ..Default::default()
            },
        }
    }
}

impl VmmConfig {
    /// Checks the settings the guest cannot use; the message says what to change.
    pub fn validate(&self) -> Result<()> {
        let r = self.ram_size;
        if !(RAM_MIN..=RAM_MAX).contains(&r) || !r.is_multiple_of(RAM_ALIGN) {
            return Err(Error::Config(format!(
                "guest RAM of {r} bytes is not usable: give {} MiB to {} MiB in steps of {} MiB",
                RAM_MIN >> 20,
                RAM_MAX >> 20,
                RAM_ALIGN >> 20
            )));
        }
        self.service_limits()?;
        if self.service.hz > 500 {
            return Err(Error::Config(format!(
                "service hz {} is too high: use 1 to 500 (0 = 10)",
                self.service.hz
            )));
        }
        Ok(())
    }

    /// The service's effective limits with this RAM size and these settings (what the
    /// guest derives at boot), or why the guest could not use them.
    pub fn service_limits(&self) -> Result<ft_guest_service::Limits> {
        let s = ft_guest_service::Settings {
            maxclients: self.service.maxclients,
            maxmemory: self.service.maxmemory,
            timeout_s: self.service.timeout_s,
            tcp_keepalive_s: self.service.tcp_keepalive_s,
            hz: self.service.hz,
        };
        ft_guest_service::Limits::derive(self.ram_size, self.ram_size - HEAP_BASE, &s)
            .map_err(|e| Error::Config(e.to_string()))
    }

    /// The configuration hash of a VMM with this configuration running `guest_elf`
    /// (image, boot information, CPU model): what its log header and its state transfers
    /// carry. Computed without creating a VM.
    pub fn config_hash(&self, guest_elf: &[u8]) -> u64 {
        config_hash(
            crate::image::image_hash(guest_elf),
            &self.boot_info(),
            &cpuid::MODEL,
        )
    }

    pub(crate) fn boot_info(&self) -> BootInfo {
        BootInfo {
            magic: BOOT_MAGIC,
            mac: self.mac,
            prefix_len: self.prefix_len,
            _pad: 0,
            ip: self.ip,
            gateway: self.gateway,
            port: self.port,
            _pad2: [0; 6],
            heap_base: HEAP_BASE,
            heap_end: self.ram_size,
            maxclients: self.service.maxclients,
            timeout_s: self.service.timeout_s,
            tcp_keepalive_s: self.service.tcp_keepalive_s,
            hz: self.service.hz,
            maxmemory: self.service.maxmemory,
        }
    }
}

/// Hash of everything the guest is booted with: the image, the boot info (RAM size,
/// network identity, service settings) and the vCPU model (CPUID table). Carried by the
/// log header and snapshots; a replay or restore with another configuration is refused.
pub(crate) fn config_hash(image_hash: u64, boot: &BootInfo, cpu_model: &[cpuid::Leaf]) -> u64 {
    hash_words(
        &[
            image_hash,
            crate::hash::hash_bytes(boot.as_bytes(), GUEST_ABI_VERSION as u64),
            cpuid::model_hash(cpu_model),
        ],
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hash_covers_the_cpu_model() {
        let boot = VmmConfig::default().boot_info();
        let base = config_hash(1, &boot, &cpuid::MODEL);
        assert_eq!(base, config_hash(1, &boot, &cpuid::MODEL), "stable");
        let mut tsc = cpuid::MODEL;
        tsc[1].edx |= 1 << 4;
        assert_ne!(config_hash(1, &boot, &tsc), base, "a feature bit");
        let mut vendor = cpuid::MODEL;
        vendor[0].ebx ^= 1;
        assert_ne!(config_hash(1, &boot, &vendor), base, "the vendor");
        assert_ne!(config_hash(1, &boot, &cpuid::MODEL[..4]), base, "a leaf");
        assert_ne!(config_hash(2, &boot, &cpuid::MODEL), base, "the image");
    }
}
