//! Bounds-checked, fixed-size reads from a packet, the same way for TC (`bpf_skb_load_bytes`,
//! which also reads non-linear data) and XDP (direct access checked against `data_end`), so
//! that the decap decision in `ingress.rs` is written once for both hooks.

use aya_ebpf::programs::{TcContext, XdpContext};

/// How far into a frame XDP reads (a page: an XDP frame without fragments is at most that).
pub const XDP_MAX_READ_OFF: usize = 4096;

pub trait Packet {
    /// Length of the frame from the Ethernet header on.
    fn len(&self) -> usize;
    /// `N` bytes at `off`, or `None` if the frame is shorter.
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
    /// Whether the frame is a GRO/GSO aggregate (lengths set by the kernel, not the wire).
    fn merged(&self) -> bool;
    /// As `read`, for a constant offset within the headers: read in place where the bytes
    /// are in the linear part (TC; XDP always), which saves a helper call per read.
    fn read_head<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.read(off)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.load::<[u8; N]>(off).ok()
    }
    #[inline(always)]
    fn read_head<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let (start, end) = (self.data(), self.data_end());
        if start + off + N <= end {
            // SAFETY: bounds checked against data_end just above.
            return Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) });
        }
        self.read(off)
    }
    #[inline(always)]
    fn merged(&self) -> bool {
        // SAFETY: the context's skb pointer is valid for the program's run.
        unsafe { (*self.skb.skb).gso_size != 0 }
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        // Keep the offset provably bounded for the verifier. The deepest a header can start
        // for the checks is an IPv6 extension-header chain's end; a frame to our address whose
        // headers lie past this is dropped as unreadable by the caller, never passed.
        if off > XDP_MAX_READ_OFF {
            return None;
        }
        let start = self.data() + off;
        if start + N > self.data_end() {
            return None;
        }
        Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
    }
    #[inline(always)]
    fn merged(&self) -> bool {
        false // XDP runs before GRO, on frames as they came off the wire
    }
}
