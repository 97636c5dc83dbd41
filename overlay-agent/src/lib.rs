//! The node agent: brings up the eBPF data plane of one node and keeps its maps.
pub mod cli;
pub mod dataplane;
pub mod maps;
pub mod netdev;
pub mod report;
