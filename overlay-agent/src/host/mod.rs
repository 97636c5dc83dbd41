//! The host around the overlay: links, addresses, routes and forwarding entries over netlink
//! (`netdev`), flannel's iptables chains, the subnet file and docker's options, and the
//! health and metrics endpoints.
pub mod docker_opts;
pub mod health;
pub mod iptables;
pub mod nftables;
pub mod netdev;
pub mod subnet_file;
pub mod tc;
pub mod cni;
pub mod wireguard;
