//! The control plane: flannel's network config, this node's subnet lease in etcd (claim,
//! reuse, renewal), the routes the other nodes' leases ask for, and the daemon that drives
//! them. Decisions are pure functions (`lease::manager::choose`, `reconcile::on_event`,
//! `reconcile::desired_routes`) or run on tokio's clock (`lease::keeper`), tested without
//! etcd; `daemon` is the driver that performs their I/O.
pub mod config;
pub mod daemon;
pub mod lease;
pub mod reconcile;
