//! The kernel's own drops on the node's devices: what happens past our programs (the vxlan
//! device's own drops, gro_cells and backlog overflow, rp_filter, a firewall rule, conntrack
//! INVALID), seen from the `kfree_skb` tracepoint.
//!
//! The program (overlay-ebpf's `drops.rs`) reads kernel structures at offsets the agent finds
//! in the running kernel's BTF (/sys/kernel/btf/vmlinux, parsed with the `btf-rs` crate:
//! layouts and reason numbers differ between kernels and builds), counts per (reason,
//! device) in `KERNEL_DROPS` and reports to a listening monitor. The reasons' names come from
//! the same BTF (`enum skb_drop_reason`, from 5.17; older kernels give no reason: 0).
//!
//! The tracepoint is attached while the agent runs (not pinned: nothing of it outlives the
//! agent but the counters). It is observability: where it cannot be had (no BTF, a kernel
//! without the tracepoint, a verifier refusal), the data plane runs without it and says so.

use std::{collections::BTreeMap, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, MapData, PerCpuHashMap},
    programs::RawTracePoint,
    Ebpf,
};
use btf_rs::{Btf, Type};
use overlay_common::{map_names, prog_names, DropTraceConfig, KernelDropKey};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const REASON_PREFIX: &str = "SKB_DROP_REASON_";
/// Drops our own programs make (TC_ACT_SHOT) and count themselves.
const OWN_REASONS: [&str; 2] = ["TC_INGRESS", "TC_EGRESS"];

/// The running kernel's BTF.
pub struct KernelBtf(Btf);

impl KernelBtf {
    pub fn load() -> Result<Self> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Btf::from_file(path).map(Self).map_err(|e| anyhow::anyhow!("reading the kernel's BTF ({}): {e}", path.display()))
    }

    /// Follow typedefs and qualifiers to the type they name.
    fn strip(&self, mut t: Type) -> Result<Type> {
        for _ in 0..16 {
            t = match &t {
                Type::Typedef(x) => self.0.resolve_chained_type(x),
                Type::Const(x) | Type::Volatile(x) | Type::Restrict(x) => self.0.resolve_chained_type(x),
                Type::TypeTag(x) => self.0.resolve_chained_type(x),
                _ => return Ok(t),
            }
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        bail!("a chain of more than 16 typedefs and qualifiers")
    }

    /// Member `name` of a struct or union, looking through anonymous members: its offset in
    /// bits from the start of `s`, and its type.
    fn member(&self, s: &btf_rs::Struct, name: &str, depth: u32) -> Option<(u32, Type)> {
        if depth > 8 {
            return None;
        }
        for m in &s.members {
            let mname = self.0.resolve_name(m).unwrap_or_default();
            let Ok(t) = self.0.resolve_chained_type(m).map_err(|e| anyhow::anyhow!("{e}")).and_then(|t| self.strip(t)) else {
                continue;
            };
            if mname == name {
                return Some((m.bit_offset(), t));
            }
            if mname.is_empty() {
                if let Type::Struct(inner) | Type::Union(inner) = &t {
                    if let Some((off, found)) = self.member(inner, name, depth + 1) {
                        return Some((m.bit_offset() + off, found));
                    }
                }
            }
        }
        None
    }

    /// The byte offset of `path` (members separated by dots) in `struct name`.
    pub fn offset_of(&self, name: &str, path: &str) -> Result<u32> {
        let types = self.0.resolve_types_by_name(name).map_err(|e| anyhow::anyhow!("struct {name}: {e}"))?;
        let mut current = types
            .into_iter()
            .find(|t| matches!(t, Type::Struct(_)))
            .with_context(|| format!("the kernel's BTF has no struct {name}"))?;
        let mut bits = 0u32;
        for part in path.split('.') {
            let (Type::Struct(s) | Type::Union(s)) = &current else {
                bail!("{name}.{path}: {part} is not inside a struct");
            };
            let (off, t) = self.member(s, part, 0).with_context(|| format!("struct {name} has no member {path}"))?;
            bits += off;
            current = t;
        }
        if bits % 8 != 0 {
            bail!("{name}.{path} is a bitfield");
        }
        Ok(bits / 8)
    }

    /// `enum skb_drop_reason`'s values and names (without `SKB_DROP_REASON_`); empty before
    /// 5.17, whose tracepoint gives no reason.
    pub fn drop_reasons(&self) -> BTreeMap<u32, String> {
        let Ok(types) = self.0.resolve_types_by_name("skb_drop_reason") else { return BTreeMap::new() };
        let Some(Type::Enum(e)) = types.into_iter().find(|t| matches!(t, Type::Enum(_))) else { return BTreeMap::new() };
        e.members
            .iter()
            .filter_map(|m| {
                let name = self.0.resolve_name(m).ok()?;
                Some((m.val(), name.strip_prefix(REASON_PREFIX).unwrap_or(&name).to_string()))
            })
            .collect()
    }

    /// The tracepoint program's configuration for watching `ifindexes` in this process's
    /// network namespace.
    pub fn trace_config(&self, ifindexes: &[u32]) -> Result<DropTraceConfig> {
        let reasons = self.drop_reasons();
        let mut skip = [u32::MAX; 4];
        for (slot, own) in skip.iter_mut().zip(OWN_REASONS) {
            if let Some((v, _)) = reasons.iter().find(|(_, n)| n.as_str() == own) {
                *slot = *v;
            }
        }
        let mut ifindex = [0u32; 4];
        for (slot, i) in ifindex.iter_mut().zip(ifindexes) {
            *slot = *i;
        }
        // Without network namespaces (CONFIG_NET_NS off) `possible_net_t` is empty.
        let (nd_net, inum) = match (self.offset_of("net_device", "nd_net.net"), self.offset_of("net", "ns.inum")) {
            (Ok(a), Ok(b)) => (a, b),
            _ => (DropTraceConfig::NO_OFFSET, DropTraceConfig::NO_OFFSET),
        };
        let netns_inum = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino() as u32).context("this process's network namespace")?;
        Ok(DropTraceConfig {
            enabled: 1,
            netns_inum,
            ifindex,
            skip_reason: skip,
            off_skb_dev: self.offset_of("sk_buff", "dev")?,
            off_skb_head: self.offset_of("sk_buff", "head")?,
            off_skb_network_header: self.offset_of("sk_buff", "network_header")?,
            off_skb_len: self.offset_of("sk_buff", "len")?,
            off_dev_ifindex: self.offset_of("net_device", "ifindex")?,
            off_dev_nd_net: nd_net,
            off_net_inum: inum,
            _pad: 0,
        })
    }
}

/// Whether the kernel's drops are traced, and with which program (or why not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropTrace {
    /// Attached: `with_reasons` from 5.17, none before.
    Traced { with_reasons: bool },
    Off(String),
}

impl std::fmt::Display for DropTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DropTrace::Traced { with_reasons: true } => write!(f, "traced (kfree_skb, with reasons)"),
            DropTrace::Traced { with_reasons: false } => write!(f, "traced (kfree_skb; this kernel gives no reasons)"),
            DropTrace::Off(why) => write!(f, "not traced: {why}"),
        }
    }
}

/// Configure and attach the `kfree_skb` program for the devices `ifindexes`: the variant
/// with reasons where the kernel's tracepoint has them, else the one without.
pub fn attach(ebpf: &mut Ebpf, ifindexes: &[u32]) -> DropTrace {
    match try_attach(ebpf, ifindexes) {
        Ok(t) => t,
        Err(e) => DropTrace::Off(format!("{e:#}")),
    }
}

fn try_attach(ebpf: &mut Ebpf, ifindexes: &[u32]) -> Result<DropTrace> {
    let btf = KernelBtf::load()?;
    let cfg = btf.trace_config(ifindexes)?;
    {
        let map = ebpf.map_mut(map_names::DROP_TRACE).context("the programs have no DROP_TRACE map")?;
        let mut a: Array<&mut MapData, DropTraceConfig> = Array::try_from(map)?;
        a.set(0, cfg, 0).context("writing DROP_TRACE")?;
    }
    let mut last = None;
    for (name, with_reasons) in [(prog_names::KFREE_SKB_REASON, true), (prog_names::KFREE_SKB_PLAIN, false)] {
        let prog: &mut RawTracePoint = ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
        // The variant with reasons reads the tracepoint's third argument, which kernels
        // before 5.17 do not have: attaching it fails there.
        match prog.attach("kfree_skb") {
            Ok(_) => return Ok(DropTrace::Traced { with_reasons }),
            Err(e) => {
                last = Some(anyhow::Error::new(e).context(format!("attaching {name} to kfree_skb")));
                let _ = prog.unload();
            }
        }
    }
    Err(last.expect("two attempts"))
}

/// Whether a `kfree_skb` program of ours counts into the `KERNEL_DROPS` pinned in `dir`
/// (programs of other nodes on the same host count into their own).
pub fn traced(dir: &Path) -> bool {
    let Ok(map) = aya::maps::MapInfo::from_pin(dir.join(map_names::KERNEL_DROPS)) else { return false };
    let id = map.id();
    aya::programs::loaded_programs().filter_map(|p| p.ok()).any(|p| {
        // The kernel keeps 15 characters of a program's name.
        p.name_as_str().is_some_and(|n| n.starts_with("kfree_skb_")) && p.map_ids().ok().flatten().is_some_and(|ids| ids.contains(&id))
    })
}

/// The node's kernel drop counts, summed over CPUs: (reason, ifindex) -> packets.
pub fn counts(dir: &Path) -> Result<BTreeMap<KernelDropKey, u64>> {
    let path = dir.join(map_names::KERNEL_DROPS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map: PerCpuHashMap<MapData, KernelDropKey, u64> = PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))?;
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (k, per_cpu) = entry?;
        out.insert(k, per_cpu.iter().sum());
    }
    Ok(out)
}

/// The devices the tracer watches (from the pinned `DROP_TRACE`), by slot from 1.
pub fn watched(dir: &Path) -> Result<[u32; 4]> {
    let path = dir.join(map_names::DROP_TRACE);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let a: Array<MapData, DropTraceConfig> = Array::try_from(aya::maps::Map::Array(data))?;
    Ok(a.get(&0, 0)?.ifindex)
}

/// The running kernel's drop reasons, read once (empty where it has no BTF or no reasons).
pub fn reasons() -> &'static BTreeMap<u32, String> {
    static REASONS: std::sync::OnceLock<BTreeMap<u32, String>> = std::sync::OnceLock::new();
    REASONS.get_or_init(|| KernelBtf::load().map(|b| b.drop_reasons()).unwrap_or_default())
}

/// A reason's name as the running kernel calls it (its number where the kernel's BTF does
/// not say).
pub fn reason_name(reasons: &BTreeMap<u32, String>, reason: u32) -> String {
    match reasons.get(&reason) {
        Some(n) => n.clone(),
        None if reasons.is_empty() && reason == 0 => "UNKNOWN".to_string(),
        None => format!("reason-{reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's kernel has BTF (the data plane needs it): the offsets the program reads
    /// are found, and the reasons decoded, as the kernel's own headers define them.
    #[test]
    fn offsets_and_reasons_come_from_the_running_kernel() {
        let btf = KernelBtf::load().expect("the kernel's BTF");
        // `len` sits after the list/rbtree heads, the socket and the device pointers in every
        // kernel since 5.10; `dev` lies inside an anonymous union of an anonymous struct.
        let dev = btf.offset_of("sk_buff", "dev").unwrap();
        let len = btf.offset_of("sk_buff", "len").unwrap();
        assert!(dev > 0 && dev < len && dev % 8 == 0, "dev {dev}, len {len}");
        assert!(btf.offset_of("net_device", "ifindex").unwrap() > 0);
        assert!(btf.offset_of("net", "ns.inum").is_ok());
        assert!(btf.offset_of("sk_buff", "no_such_member").is_err());
        assert!(btf.offset_of("no_such_struct", "dev").is_err());
        let reasons = btf.drop_reasons();
        let value = |name: &str| reasons.iter().find(|(_, n)| n.as_str() == name).map(|(v, _)| *v);
        let (no_socket, netfilter) = (value("NO_SOCKET").expect("NO_SOCKET"), value("NETFILTER_DROP").expect("NETFILTER_DROP"));
        assert_ne!(no_socket, netfilter);
        let cfg = btf.trace_config(&[7, 9]).unwrap();
        assert_eq!((cfg.enabled, cfg.ifindex), (1, [7, 9, 0, 0]));
        assert_eq!(cfg.off_skb_dev, dev);
        assert!(cfg.skip_reason.iter().any(|r| reasons.get(r).is_some_and(|n| n == "TC_INGRESS")), "{:?}", cfg.skip_reason);
        assert_eq!(reason_name(&reasons, no_socket), "NO_SOCKET");
        assert_eq!(reason_name(&reasons, 1 << 30), format!("reason-{}", 1 << 30));
        assert_eq!(reason_name(&BTreeMap::new(), 0), "UNKNOWN");
    }
}
