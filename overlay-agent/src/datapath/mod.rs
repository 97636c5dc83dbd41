//! The data plane: loading and attaching the eBPF programs (`dataplane`), the pinned maps
//! they share with the agent (`maps`, the only code that writes them), the drop monitor, the
//! operator's tables (`report`), the kernel's own drops (`kernel_drops`), and the userspace TUN forwarder of flannel's udp design.
pub mod attach;
pub mod dataplane;
pub mod degraded;
pub mod ipip;
pub mod ipv6;
pub mod kernel_drops;
pub mod maps;
pub mod monitor;
pub mod report;
pub mod tun;
pub mod wireguard;
