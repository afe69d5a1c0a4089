//! meshnet's test lab.
//!
//! - [`lab`]: N nodes as network namespaces on one underlay bridge (192.168.56.0/24, like
//!   Vagrant's host-only network), torn down whatever happens.
//! - [`guest`]: runs commands inside a QEMU guest kernel (virtme-ng) that has IPVS, in one boot.
//! - [`http`]: one request from inside a namespace, for load loops.
//!
//! Both are used by the `lab` binary, the lab and guest test tiers, the demo and the benchmarks.

pub mod cluster;
pub mod guest;
pub mod http;
pub mod lab;
mod teardown;

pub use lab::{Lab, LabConfig, Node};
