//! Memory and connection limits of the service, derived from the guest's heap size
//! unless configured. Every per-client and per-key size is bounded, and the budgets
//! below add up to less than the heap, so no client input can exhaust guest memory:
//!
//! | budget | default |
//! |---|---|
//! | sockets: `maxclients` x (RX + TX buffers + state) | a quarter of the heap, at most 10,000 clients |
//! | client query and output buffers (`maxmemory-clients`) | an eighth of the heap |
//! | `maxmemory` (data; write commands get `-OOM` above it) | the rest, less a sixteenth as headroom |

/// smoltcp receive buffer per connection (bytes).
pub const SOCKET_RX: usize = 8 * 1024;
/// smoltcp transmit buffer per connection (bytes).
pub const SOCKET_TX: usize = 16 * 1024;
/// Memory one connection holds before any request: socket buffers, TCP state, client.
pub const SOCKET_COST: u64 = (SOCKET_RX + SOCKET_TX + 1024) as u64;
/// Stop parsing a client's requests while this much of its output is unsent
/// (back-pressure: its TCP window closes instead of memory growing).
pub const OUTPUT_SOFT_LIMIT: usize = 64 * 1024;
/// Connections accepted beyond `maxclients` only to send the error and close.
pub const REJECT_SLOTS: usize = 16;

/// Settings the appliance passes at boot (0 = default).
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    pub maxclients: u32,
    pub maxmemory: u64,
    pub timeout_s: u32,
    pub tcp_keepalive_s: u32,
    pub hz: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub ram_bytes: u64,
    pub heap_bytes: u64,
    pub maxclients: usize,
    pub maxmemory: u64,
    pub maxmemory_clients: u64,
    pub proto_max_bulk_len: usize,
    pub query_buffer_limit: usize,
    /// A client whose pending output exceeds this after a command is disconnected.
    pub output_hard_limit: usize,
    pub timeout_ms: u64,
    pub keepalive_ms: u64,
    pub hz: u32,
}

/// Why a configuration cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitError {
    HeapTooSmall { heap: u64 },
    TooManyClients { asked: u32, max: u64 },
    MaxmemoryTooLarge { asked: u64, max: u64 },
}

impl core::fmt::Display for LimitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LimitError::HeapTooSmall { heap } => write!(
                f,
                "the guest heap ({} MiB) is too small for the service; give the VM more RAM",
                heap >> 20
            ),
            LimitError::TooManyClients { asked, max } => write!(
                f,
                "maxclients {asked} needs more memory than a quarter of the guest heap allows (at most {max}); lower maxclients or give the VM more RAM"
            ),
            LimitError::MaxmemoryTooLarge { asked, max } => write!(
                f,
                "maxmemory {asked} leaves no room for client buffers and sockets (at most {max} with this RAM and maxclients); lower maxmemory or give the VM more RAM"
            ),
        }
    }
}

impl Limits {
    /// Limits for a guest with `ram` bytes of RAM whose heap is `heap` bytes.
    pub fn derive(ram: u64, heap: u64, s: &Settings) -> Result<Limits, LimitError> {
        if heap < 16 << 20 {
            return Err(LimitError::HeapTooSmall { heap });
        }
        let socket_share = heap / 4;
        let max_clients_fit = socket_share / SOCKET_COST;
        let maxclients = if s.maxclients == 0 {
            max_clients_fit.clamp(16, 10_000) as usize
        } else if s.maxclients as u64 > max_clients_fit {
            return Err(LimitError::TooManyClients {
                asked: s.maxclients,
                max: max_clients_fit,
            });
        } else {
            s.maxclients as usize
        };
        let proto_max_bulk_len = (heap / 16).clamp(1 << 20, 512 << 20) as usize;
        let maxmemory_clients = heap / 8;
        let sockets = (maxclients + REJECT_SLOTS) as u64 * SOCKET_COST;
        let headroom = heap / 16;
        let safe = heap.saturating_sub(sockets + maxmemory_clients + headroom);
        let maxmemory = match s.maxmemory {
            0 => safe,
            m if m > safe => {
                return Err(LimitError::MaxmemoryTooLarge {
                    asked: m,
                    max: safe,
                });
            }
            m => m,
        };
        Ok(Limits {
            ram_bytes: ram,
            heap_bytes: heap,
            maxclients,
            maxmemory,
            maxmemory_clients,
            proto_max_bulk_len,
            query_buffer_limit: 2 * proto_max_bulk_len,
            output_hard_limit: (maxmemory_clients / 2) as usize,
            timeout_ms: s.timeout_s as u64 * 1000,
            keepalive_ms: s.tcp_keepalive_s as u64 * 1000,
            hz: if s.hz == 0 { 10 } else { s.hz },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_fit_the_heap() {
        for ram_mib in [64u64, 256, 1024, 2048, 3072] {
            let ram = ram_mib << 20;
            let heap = ram - 0x130_0000;
            let l = Limits::derive(ram, heap, &Settings::default()).unwrap();
            let sockets = (l.maxclients + REJECT_SLOTS) as u64 * SOCKET_COST;
            assert!(
                sockets + l.maxmemory_clients + l.maxmemory < heap,
                "{ram_mib} MiB"
            );
            assert!(
                l.maxmemory > heap / 3,
                "{ram_mib} MiB: maxmemory {}",
                l.maxmemory
            );
            if ram_mib >= 256 {
                assert!(l.maxclients >= 1000, "{ram_mib} MiB: {}", l.maxclients);
            }
        }
    }

    #[test]
    fn unsafe_settings_are_refused() {
        let heap = 47 << 20;
        assert!(matches!(
            Limits::derive(
                64 << 20,
                heap,
                &Settings {
                    maxclients: 5000,
                    ..Default::default()
                }
            ),
            Err(LimitError::TooManyClients { .. })
        ));
        assert!(matches!(
            Limits::derive(
                64 << 20,
                heap,
                &Settings {
                    maxmemory: heap,
                    ..Default::default()
                }
            ),
            Err(LimitError::MaxmemoryTooLarge { .. })
        ));
    }
}
