//! The tc filters on an interface's clsact hooks, as `tc filter show dev X ingress` lists
//! them: for attaching our programs where the kernel has no TCX (a cls_bpf filter in
//! direct-action mode), finding ours by name, and telling operators what else runs there.

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::{
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption},
    RouteNetlinkMessage,
};

use crate::netdev::{request, NetdevError};

/// One filter on a clsact hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The classifier (`bpf`, `u32`, `flower`, `matchall`, ...).
    pub kind: String,
    /// A cls_bpf filter's program name (as its loader gave it) and id.
    pub bpf_name: Option<String>,
    pub prog_id: Option<u32>,
}

/// The filters on `ifindex`'s clsact ingress (`egress` false) or egress hook; none when the
/// interface has no clsact qdisc.
pub fn filters(ifindex: u32, egress: bool) -> Result<Vec<Filter>, NetdevError> {
    let header = TcHeader {
        index: ifindex as i32,
        parent: TcHandle { major: TcHandle::CLSACT.major, minor: if egress { TcHandle::MIN_EGRESS } else { TcHandle::MIN_INGRESS } },
        ..Default::default()
    };
    let msg = TcMessage::from_parts(header, Vec::new());
    let answers = match request("listing tc filters", RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP) {
        Ok(a) => a,
        // No clsact qdisc (nothing attached the legacy way): no filters.
        Err(NetdevError::Netlink { cause, .. }) if matches!(cause.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for m in answers {
        let RouteNetlinkMessage::NewTrafficFilter(m) = m else { continue };
        // The per-priority header entry of a classifier has handle 0: not a filter.
        let handle: u32 = m.header.handle.into();
        if handle == 0 || m.header.index != ifindex as i32 {
            continue;
        }
        let mut f = Filter { priority: (m.header.info >> 16) as u16, handle, kind: String::new(), bpf_name: None, prog_id: None };
        for a in &m.attributes {
            match a {
                TcAttribute::Kind(k) => f.kind = k.clone(),
                TcAttribute::Options(opts) => {
                    for o in opts {
                        match o {
                            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => f.bpf_name = Some(n.clone()),
                            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => f.prog_id = Some(*id),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(f);
    }
    Ok(out)
}
