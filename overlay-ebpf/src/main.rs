//! The data plane: TC egress encapsulation on the overlay device, and decapsulation on the
//! underlay interface as TC ingress or native XDP. See each hook's file for what it sees.
#![no_std]
#![no_main]

mod ingress;
mod maps;
mod packet;
mod tc_egress;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
