//! Addresses and sizes derived from configuration: MACs, interface names, MTUs.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::Error;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Swarm's endpoint MAC: `02:42:` followed by the four IPv4 bytes
    /// (locally administered, and unique wherever the IP is).
    pub fn from_ipv4(ip: Ipv4Addr) -> MacAddr {
        let [a, b, c, d] = ip.octets();
        MacAddr([0x02, 0x42, a, b, c, d])
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Option<MacAddr> {
        bytes.try_into().ok().map(MacAddr)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error for a string that is not `xx:xx:xx:xx:xx:xx`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes separated by ':'")]
pub struct ParseMacError(String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<MacAddr, ParseMacError> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// Name of an endpoint's veth end inside the sandbox: `veth` + the IPv4 address in hex
/// (12 characters, under IFNAMSIZ). Deterministic, so a restarted agent finds the
/// endpoint it made for a task IP, and unique in a sandbox because task IPs are.
pub fn host_ifname(ip: Ipv4Addr) -> String {
    format!("veth{:08x}", u32::from(ip))
}

/// Bytes VXLAN adds on an IPv4 underlay: inner Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
pub const VXLAN_OVERHEAD: u32 = 50;

/// IPv4 needs at least this MTU (RFC 791).
const MIN_IPV4_MTU: u32 = 68;

/// Overlay MTU for an underlay MTU: `underlay − 50`. `configured` replaces the detected
/// underlay MTU (like Swarm's `com.docker.network.driver.mtu`, also before the 50 go off).
pub fn overlay_mtu(underlay_mtu: u32, configured: Option<u32>) -> Result<u32, Error> {
    let base = configured.unwrap_or(underlay_mtu);
    match base.checked_sub(VXLAN_OVERHEAD) {
        Some(mtu) if mtu >= MIN_IPV4_MTU => Ok(mtu),
        _ => Err(Error::Invalid(format!(
            "underlay MTU {base} leaves no room for an overlay: it needs at least {}",
            MIN_IPV4_MTU + VXLAN_OVERHEAD
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_from_ipv4_is_02_42_and_the_ip_bytes() {
        let mac = MacAddr::from_ipv4(Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(mac, MacAddr([0x02, 0x42, 0x0a, 0x00, 0x00, 0x05]));
        assert_eq!(mac.to_string(), "02:42:0a:00:00:05");
        assert_eq!(
            MacAddr::from_ipv4(Ipv4Addr::new(10, 255, 128, 200)).to_string(),
            "02:42:0a:ff:80:c8"
        );
    }

    #[test]
    fn mac_parses_and_round_trips() {
        let mac: MacAddr = "02:42:0A:ff:00:0a".parse().unwrap();
        assert_eq!(mac.to_string(), "02:42:0a:ff:00:0a");
        for bad in [
            "",
            "02:42:0a:ff:00",
            "02:42:0a:ff:00:0a:01",
            "2:42:0a:ff:00:0a",
            "zz:42:0a:ff:00:0a",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn host_ifname_fits_ifnamsiz() {
        assert_eq!(host_ifname(Ipv4Addr::new(10, 0, 0, 5)), "veth0a000005");
        assert_eq!(host_ifname(Ipv4Addr::new(255, 255, 255, 255)).len(), 12);
    }

    #[test]
    fn overlay_mtu_is_underlay_minus_50() {
        assert_eq!(overlay_mtu(1500, None).unwrap(), 1450);
        assert_eq!(overlay_mtu(9000, None).unwrap(), 8950);
        assert_eq!(overlay_mtu(1400, None).unwrap(), 1350);
        // The configured value replaces the detected one, then loses the overhead too.
        assert_eq!(overlay_mtu(9000, Some(1500)).unwrap(), 1450);
        assert_eq!(overlay_mtu(118, None).unwrap(), 68);
        assert!(overlay_mtu(117, None).is_err());
        assert!(overlay_mtu(0, None).is_err());
    }
}
