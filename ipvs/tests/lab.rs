//! Runs as root on the host kernel. The build machines' kernel has no IPVS, which is the
//! case `--lb auto` must detect; on a kernel with ip_vs built in or as a module the client must
//! open.

use std::path::Path;

use ipvs::{Client, Error};
use netns::Netns;

#[test]
fn missing_ipvs_is_reported_as_no_ipvs() {
    let dir = std::env::temp_dir().join("ipvs-lab-tests");
    let ns = Netns::create(&dir, &format!("noipvs-{}", std::process::id())).unwrap();
    let res = ns.run(Client::new).unwrap();
    netns::delete(ns.path()).unwrap();
    // ip_vs has module parameters, so /sys/module/ip_vs exists whenever it is loaded or
    // built in. Looked at after the lookup: that makes a kernel with ip_vs as a module load it
    // (request_module "net-pf-16-proto-16-family-IPVS"; seen in the guest after `rmmod ip_vs`).
    if Path::new("/sys/module/ip_vs").exists() {
        assert!(res.is_ok(), "{res:?}");
    } else {
        let err = res.unwrap_err();
        assert!(matches!(err, Error::NoIpvs), "{err:?}");
        assert!(err.to_string().contains("IPVS is not available"));
    }
}
