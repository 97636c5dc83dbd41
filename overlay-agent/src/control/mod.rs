//! The control plane: flannel's network config, this node's subnet lease in etcd (claim,
//! reuse, renewal), the routes the other nodes' leases ask for, and the daemon that drives
//! them. Decisions take no I/O: acquisition is a state machine that names each step
//! (`lease::acquire`), route decisions are pure functions (`reconcile::on_event`,
//! `reconcile::desired_routes`, `lease::manager::choose`), renewal runs on tokio's clock
//! (`lease::keeper`, tested on paused time); `daemon` is the driver that performs the I/O.
pub mod config;
pub mod daemon;
pub mod lease;
pub mod reconcile;
