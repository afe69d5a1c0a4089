//! # ipvs
//!
//! A synchronous client for the Linux IPVS load balancer over generic netlink (family
//! `"IPVS"`), the same interface `ipvsadm` uses: virtual services (by firewall mark or by
//! protocol, address and port), their destinations, connection timeouts, version info and
//! traffic counters, for IPv4 and IPv6.
//!
//! - **Namespaces.** IPVS tables are per network namespace and a netlink socket stays in
//!   the namespace it was opened in: call [`Client::new`] on a thread inside the target
//!   namespace (for example in `netns::Netns::run`).
//! - **No IPVS.** [`Client::new`] returns [`Error::NoIpvs`] when the kernel has no IPVS
//!   (not built, module not loaded), so a caller can fall back to another load balancer.
//! - **Errors** are typed ([`Error::NotFound`], [`Error::Exists`],
//!   [`Error::UnknownScheduler`], ...), carry the kernel's errno and extended-ack text, and
//!   name the operation: `add destination 10.0.0.2:0 to service FWM 256: File exists (errno 17)`.
//! - **Speed.** [`Client::apply`] sends many changes per system call, each acknowledged;
//!   dumps read whole tables in large chunks.
//!
//! ```no_run
//! use ipvs::{Client, Destination, Family, Forward, Op, Service, ServiceKey};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut ipvs = match Client::new() {
//!     Err(ipvs::Error::NoIpvs) => return Ok(()), // use nftables instead
//!     other => other?,
//! };
//! let key = ServiceKey::Fwmark { family: Family::Ipv4, mark: 256 };
//! let web = Service::new(key, "rr");
//! let task1 = Destination::new("10.255.0.5:0".parse()?, Forward::Masq, 1);
//! let task2 = Destination::new("10.255.0.6:0".parse()?, Forward::Masq, 1);
//! ipvs.apply(&[
//!     Op::AddService(&web),
//!     Op::AddDestination(&key, &task1),
//!     Op::AddDestination(&key, &task2),
//! ])?;
//! // Drain task1: no new connections, established ones finish.
//! ipvs.update_destination(&key, &Destination { weight: 0, ..task1 })?;
//! for d in ipvs.destinations(&key)? {
//!     println!("{} weight {} active {}", d.destination.addr, d.destination.weight, d.active_conns);
//! }
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod types;
mod wire;

#[cfg(test)]
mod tests;

pub use client::{Client, Op, Result};
pub use error::{BatchError, Error};
pub use types::{
    Destination, DestinationEntry, Family, Forward, Info, Protocol, Service, ServiceEntry,
    ServiceFlags, ServiceKey, Stats, TimeoutChange, Timeouts,
};
