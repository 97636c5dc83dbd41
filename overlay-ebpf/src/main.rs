//! The data plane: TC egress encapsulation on the overlay device, and decapsulation on the
//! underlay interface as TC ingress or native XDP, and a socket guard in the node's network
//! namespace. See each hook's file for what it sees.
#![no_std]
#![no_main]

mod drops;
mod guard;
mod ingress;
mod maps;
mod monitor;
mod packet;
mod tc_egress;

/// Read once per packet by the `upgrade-variant` build only, so that its programs differ.
#[cfg(feature = "upgrade-variant")]
#[unsafe(no_mangle)]
static UPGRADE_VARIANT: u32 = 2;

#[cfg(feature = "upgrade-variant")]
#[inline(always)]
pub fn upgrade_variant_mark() {
    let _ = unsafe { core::ptr::read_volatile(&UPGRADE_VARIANT) };
}

#[cfg(not(feature = "upgrade-variant"))]
#[inline(always)]
pub fn upgrade_variant_mark() {}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// When the last error line was logged (ns since boot), shared by all CPUs: a racy update
/// costs at most a second line.
#[unsafe(no_mangle)]
static mut LAST_ERROR_LOG_NS: u64 = 0;

/// At most one error line a second, whatever the packet rate (every program of the object
/// shares the budget).
#[inline(always)]
pub fn log_allowed() -> bool {
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() };
    let p = &raw mut LAST_ERROR_LOG_NS;
    let last = unsafe { core::ptr::read_volatile(p) };
    if last != 0 && now.wrapping_sub(last) < 1_000_000_000 {
        return false;
    }
    unsafe { core::ptr::write_volatile(p, now) };
    true
}
