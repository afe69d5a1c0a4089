//! Root tests on the host kernel: two nodes built from namespaces on an underlay bridge,
//! an overlay sandbox on each made by this crate, real traffic between task namespaces.
//!
//! Each test works in its own directory `/run/meshnet-test-vxlan-<pid>-<n>/`; everything
//! it makes is in namespaces bound there, removed by [`Lab`]'s `Drop`, also on panic.
//! Nothing touches the root namespace's links, routes, addresses or firewall.

use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use netns::Netns;
use vxlan::{
    overlay_mtu, underlay_mtu, BridgeConfig, EndpointConfig, FdbOwner, LinkKind, MacAddr,
    NeighEntry, PeerAction, RemotePeer, RouteEntry, Sandbox, VxlanConfig, VxlanState,
};

const VNI: u32 = 4096;
/// Not 1500, so the MTU must really come from the underlay interface.
const UNDERLAY_MTU: u32 = 1400;

/// A scratch directory of namespaces; dropping it kills their processes and deletes them.
struct Lab {
    dir: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/run/meshnet-test-vxlan-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Lab { dir }
    }

    fn ns(&self, name: &str) -> Netns {
        Netns::create(&self.dir, name).unwrap()
    }

    /// The underlay: a bridge in namespace `ul`.
    fn underlay(&self) -> Netns {
        let ul = self.ns("ul");
        ip(&ul, &["link", "add", "ulbr", "type", "bridge"]);
        ip(&ul, &["link", "set", "ulbr", "up"]);
        ul
    }

    /// A node namespace with `eth0` at 192.168.56.`last` on the underlay bridge.
    fn node(&self, ul: &Netns, last: u8) -> Netns {
        let node = self.ns(&format!("n{last}"));
        let mtu = UNDERLAY_MTU.to_string();
        let path = node.path().to_str().unwrap().to_string();
        let port = format!("u{last}");
        ip(
            ul,
            &[
                "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu",
                &mtu, "netns", &path,
            ],
        );
        ip(ul, &["link", "set", &port, "master", "ulbr", "up"]);
        ip(
            &node,
            &[
                "addr",
                "add",
                &format!("192.168.56.{last}/24"),
                "dev",
                "eth0",
            ],
        );
        ip(&node, &["link", "set", "eth0", "up"]);
        node
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for path in netns::list(&self.dir).unwrap_or_default() {
            if let Ok(ns) = Netns::open(&path) {
                for pid in ns.pids().unwrap_or_default() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = netns::delete(&path);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn run(ns: &Netns, prog: &str, args: &[&str]) -> Output {
    ns.output(Command::new(prog).args(args))
        .unwrap_or_else(|e| panic!("{prog} {args:?}: {e}"))
}

/// Runs a command in `ns` that must succeed, and returns its stdout.
fn cmd(ns: &Netns, prog: &str, args: &[&str]) -> String {
    let out = run(ns, prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ip(ns: &Netns, args: &[&str]) -> String {
    cmd(ns, "ip", args)
}

fn pings(from: &Netns, to: Ipv4Addr) -> bool {
    run(
        from,
        "busybox",
        &["ping", "-c", "2", "-w", "4", &to.to_string()],
    )
    .status
    .success()
}

fn gateway(last: u8) -> ipnet::Ipv4Net {
    format!("10.0.0.{last}/24").parse().unwrap()
}

fn vtep(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 56, last)
}

/// One node's overlay: its sandbox and one task with an endpoint at 10.0.0.`task`.
struct Side {
    node: Netns,
    sandbox: Sandbox,
    task: Netns,
    endpoint: EndpointConfig,
    mtu: u32,
}

fn side(lab: &Lab, ul: &Netns, node_last: u8, task_last: u8) -> Side {
    let node = lab.node(ul, node_last);
    let mtu = overlay_mtu(underlay_mtu(&node, vtep(node_last).into()).unwrap(), None).unwrap();
    let sandbox = Sandbox::open_or_create(&lab.dir, &format!("1-sbox{node_last}")).unwrap();
    sandbox
        .ensure_bridge(&BridgeConfig::new(gateway(1), mtu))
        .unwrap();
    sandbox
        .ensure_vxlan(&node, &VxlanConfig::new(VNI, mtu))
        .unwrap();
    let task = lab.ns(&format!("task{node_last}"));
    let endpoint = EndpointConfig::new("eth0", gateway(task_last), mtu);
    sandbox.ensure_endpoint(&task, &endpoint).unwrap();
    Side {
        node,
        sandbox,
        task,
        endpoint,
        mtu,
    }
}

/// Counts VXLAN packets leaving and entering a node's underlay namespace.
fn count_vxlan_udp(node: &Netns) {
    cmd(node, "nft", &["add table inet vxcount"]);
    for (chain, hook) in [("out", "output"), ("in", "input")] {
        cmd(
            node,
            "nft",
            &[&format!(
                "add chain inet vxcount {chain} {{ type filter hook {hook} priority 0; }}"
            )],
        );
        cmd(
            node,
            "nft",
            &[&format!(
                "add rule inet vxcount {chain} udp dport 4789 counter"
            )],
        );
    }
}

fn vxlan_packets(node: &Netns, chain: &str) -> u64 {
    let out = cmd(node, "nft", &["list", "chain", "inet", "vxcount", chain]);
    let words: Vec<&str> = out.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "packets").unwrap();
    words[at + 1].parse().unwrap()
}

fn self_fdb(sandbox: &Sandbox) -> Vec<(MacAddr, Option<Ipv4Addr>, bool)> {
    sandbox
        .observe()
        .unwrap()
        .fdb
        .iter()
        .filter(|e| e.owner == FdbOwner::Device)
        .map(|e| (e.mac, e.dst, e.permanent))
        .collect()
}

#[test]
fn two_nodes_talk_over_the_overlay() {
    let lab = Lab::new();
    let ul = lab.underlay();
    let a = side(&lab, &ul, 11, 2);
    let b = side(&lab, &ul, 12, 3);
    assert_eq!(a.mtu, UNDERLAY_MTU - 50);
    count_vxlan_udp(&a.node);
    count_vxlan_udp(&b.node);

    let to_b = RemotePeer::new(b.endpoint.addr.addr(), vtep(12));
    let to_a = RemotePeer::new(a.endpoint.addr.addr(), vtep(11));
    assert!(!pings(&a.task, to_b.ip), "no peer entries yet, no path");
    assert_eq!(a.sandbox.sync_peers("vxlan0", &[to_b]).unwrap().len(), 2);
    assert_eq!(b.sandbox.sync_peers("vxlan0", &[to_a]).unwrap().len(), 2);

    assert!(pings(&a.task, to_b.ip), "node 11 task reaches node 12 task");
    assert!(pings(&b.task, to_a.ip), "node 12 task reaches node 11 task");
    for node in [&a.node, &b.node] {
        assert!(
            vxlan_packets(node, "out") > 0,
            "VXLAN UDP 4789 leaves {}",
            node.name()
        );
        assert!(
            vxlan_packets(node, "in") > 0,
            "VXLAN UDP 4789 enters {}",
            node.name()
        );
    }

    // The device as `ip` sees it.
    let details = ip(a.sandbox.netns(), &["-d", "link", "show", "vxlan0"]);
    for want in [
        "vxlan id 4096 ",
        "dstport 4789 ",
        "nolearning ",
        "proxy ",
        &format!("mtu {} ", UNDERLAY_MTU - 50),
        "master br0 ",
        ",UP,",
    ] {
        assert!(details.contains(want), "{want:?} in {details}");
    }
    assert!(
        !ip(&a.node, &["-o", "link", "show"]).contains("vx-"),
        "no temporary device left in the node namespace"
    );

    // Listing returns exactly what was programmed.
    let seen = a.sandbox.observe().unwrap();
    let br0 = seen.link("br0").unwrap();
    assert_eq!(br0.kind, LinkKind::Bridge);
    assert_eq!(br0.addrs, vec![gateway(1)]);
    assert!(br0.up);
    let vx = seen.link("vxlan0").unwrap();
    assert_eq!(
        vx.kind,
        LinkKind::Vxlan(VxlanState {
            vni: VNI,
            port: 4789,
            learning: false,
            proxy: true,
            underlay_elsewhere: true,
        })
    );
    assert_eq!(
        (vx.mtu, vx.master.as_deref(), vx.up),
        (a.mtu, Some("br0"), true)
    );
    let endpoints: Vec<_> = seen.endpoints().collect();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].name, "veth0a000002");
    assert_eq!(
        (endpoints[0].mtu, endpoints[0].master.as_deref()),
        (a.mtu, Some("br0"))
    );
    assert_eq!(
        seen.neighs,
        vec![NeighEntry {
            dev: "vxlan0".into(),
            ip: to_b.ip,
            mac: Some(to_b.mac),
            permanent: true,
        }]
    );
    assert_eq!(self_fdb(&a.sandbox), vec![(to_b.mac, Some(vtep(12)), true)]);
    let task_link = ip(&a.task, &["-o", "addr", "show", "dev", "eth0"]);
    assert!(task_link.contains("inet 10.0.0.2/24 "), "{task_link}");
    let task_mac = ip(&a.task, &["link", "show", "eth0"]);
    assert!(
        task_mac.contains("link/ether 02:42:0a:00:00:02 "),
        "{task_mac}"
    );
    assert!(task_mac.contains(&format!("mtu {} ", a.mtu)), "{task_mac}");

    // Applying everything again changes nothing and duplicates nothing.
    a.sandbox
        .ensure_bridge(&BridgeConfig::new(gateway(1), a.mtu))
        .unwrap();
    a.sandbox
        .ensure_vxlan(&a.node, &VxlanConfig::new(VNI, a.mtu))
        .unwrap();
    a.sandbox.ensure_endpoint(&a.task, &a.endpoint).unwrap();
    a.sandbox.add_peer("vxlan0", &to_b).unwrap();
    assert_eq!(a.sandbox.sync_peers("vxlan0", &[to_b]).unwrap(), vec![]);
    let again = a.sandbox.observe().unwrap();
    assert_eq!(again, seen, "nothing was recreated (same indexes) or added");
    let fdb = cmd(
        a.sandbox.netns(),
        "bridge",
        &["fdb", "show", "dev", "vxlan0"],
    );
    assert_eq!(
        fdb.lines().filter(|l| l.contains(" dst ")).count(),
        1,
        "{fdb}"
    );
    let neigh = ip(a.sandbox.netns(), &["neigh", "show", "dev", "vxlan0"]);
    assert_eq!(neigh.lines().count(), 1, "{neigh}");
    assert!(neigh.contains("PERMANENT"), "{neigh}");

    // Removing the peer removes both of its entries, and the path.
    a.sandbox.remove_peer("vxlan0", &to_b).unwrap();
    let gone = a.sandbox.observe().unwrap();
    assert!(gone.neighs.is_empty(), "{:?}", gone.neighs);
    assert!(self_fdb(&a.sandbox).is_empty());
    assert!(!cmd(
        a.sandbox.netns(),
        "bridge",
        &["fdb", "show", "dev", "vxlan0"]
    )
    .contains(" dst "));
    assert!(!pings(&a.task, to_b.ip));
    a.sandbox.remove_peer("vxlan0", &to_b).unwrap();

    // A moved endpoint (new VTEP) is replaced in place; moving back restores the path.
    assert_eq!(a.sandbox.sync_peers("vxlan0", &[to_b]).unwrap().len(), 2);
    let moved = RemotePeer {
        vtep: vtep(99),
        ..to_b
    };
    assert_eq!(
        a.sandbox.sync_peers("vxlan0", &[moved]).unwrap(),
        vec![PeerAction::AddFdb {
            mac: to_b.mac,
            vtep: vtep(99)
        }]
    );
    assert_eq!(self_fdb(&a.sandbox), vec![(to_b.mac, Some(vtep(99)), true)]);
    a.sandbox.sync_peers("vxlan0", &[to_b]).unwrap();
    assert!(pings(&a.task, to_b.ip));

    // Syncing to nothing leaves no entry at all.
    a.sandbox.sync_peers("vxlan0", &[]).unwrap();
    let empty = a.sandbox.observe().unwrap();
    assert!(empty.neighs.is_empty());
    assert!(
        empty
            .fdb
            .iter()
            .all(|e| e.owner == FdbOwner::Bridge && e.permanent),
        "{:?}",
        empty.fdb
    );
}

#[test]
fn reconciliation_repairs_drift_and_deletes_cleanly() {
    let lab = Lab::new();
    let ul = lab.underlay();
    let a = side(&lab, &ul, 11, 2);
    let sb = a.sandbox.netns();
    let vx_index = |s: &Sandbox| s.observe().unwrap().link("vxlan0").unwrap().index;

    // A vxlan0 made inside the sandbox has its socket there: replaced by one from the node.
    ip(sb, &["link", "del", "vxlan0"]);
    ip(
        sb,
        &[
            "link",
            "add",
            "vxlan0",
            "type",
            "vxlan",
            "id",
            "4096",
            "dstport",
            "4789",
            "nolearning",
            "proxy",
        ],
    );
    let wrong = vx_index(&a.sandbox);
    a.sandbox
        .ensure_vxlan(&a.node, &VxlanConfig::new(VNI, a.mtu))
        .unwrap();
    let seen = a.sandbox.observe().unwrap();
    let vx = seen.link("vxlan0").unwrap();
    assert_ne!(vx.index, wrong);
    assert!(matches!(vx.kind, LinkKind::Vxlan(s) if s.underlay_elsewhere && s.vni == VNI));
    assert_eq!(vx.master.as_deref(), Some("br0"));

    // A deleted device comes back; a stale temporary one in the node is cleared first.
    ip(sb, &["link", "del", "vxlan0"]);
    ip(
        &a.node,
        &[
            "link",
            "add",
            "vx-001000-dead",
            "type",
            "vxlan",
            "id",
            "4096",
            "dstport",
            "4789",
        ],
    );
    a.sandbox
        .ensure_vxlan(&a.node, &VxlanConfig::new(VNI, a.mtu))
        .unwrap();
    assert!(a.sandbox.observe().unwrap().link("vxlan0").is_some());
    assert!(!ip(&a.node, &["-o", "link", "show"]).contains("vx-"));

    // The same VNI cannot be taken twice in one node: a clear EEXIST, nothing changed.
    let other = Sandbox::open_or_create(&lab.dir, "1-other").unwrap();
    other
        .ensure_bridge(&BridgeConfig::new(gateway(1), a.mtu))
        .unwrap();
    let err = other
        .ensure_vxlan(&a.node, &VxlanConfig::new(VNI, a.mtu))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(17), "{err}");
    assert!(err.to_string().contains("create vxlan vx-001000-"), "{err}");
    assert!(other.observe().unwrap().link("vxlan0").is_none());
    assert!(!ip(&a.node, &["-o", "link", "show"]).contains("vx-"));

    // Stale entries made by hand go; the desired one is added.
    let peer = RemotePeer::new(Ipv4Addr::new(10, 0, 0, 3), vtep(12));
    ip(
        sb,
        &[
            "neigh",
            "add",
            "10.0.0.9",
            "lladdr",
            "02:42:0a:00:00:09",
            "dev",
            "vxlan0",
            "nud",
            "permanent",
        ],
    );
    cmd(
        sb,
        "bridge",
        &[
            "fdb",
            "add",
            "02:42:0a:00:00:09",
            "dev",
            "vxlan0",
            "dst",
            "192.168.56.13",
            "self",
            "permanent",
        ],
    );
    cmd(
        sb,
        "bridge",
        &[
            "fdb",
            "append",
            "02:42:0a:00:00:03",
            "dev",
            "vxlan0",
            "dst",
            "192.168.56.14",
            "self",
            "permanent",
        ],
    );
    cmd(
        sb,
        "bridge",
        &[
            "fdb",
            "append",
            "02:42:0a:00:00:03",
            "dev",
            "vxlan0",
            "dst",
            "192.168.56.15",
            "self",
            "permanent",
        ],
    );
    assert!(!a.sandbox.sync_peers("vxlan0", &[peer]).unwrap().is_empty());
    let seen = a.sandbox.observe().unwrap();
    assert_eq!(seen.neighs.len(), 1);
    assert_eq!(seen.neighs[0].ip, peer.ip);
    assert_eq!(self_fdb(&a.sandbox), vec![(peer.mac, Some(vtep(12)), true)]);

    // Endpoint drift: an extra address goes, a deleted pair comes back.
    ip(&a.task, &["addr", "add", "10.0.0.77/24", "dev", "eth0"]);
    a.sandbox.ensure_endpoint(&a.task, &a.endpoint).unwrap();
    let addrs = ip(&a.task, &["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert_eq!(addrs.lines().count(), 1, "{addrs}");
    ip(sb, &["link", "del", &a.endpoint.host_ifname]);
    a.sandbox.ensure_endpoint(&a.task, &a.endpoint).unwrap();
    assert!(ip(&a.task, &["-o", "addr", "show", "dev", "eth0"]).contains("inet 10.0.0.2/24 "));
    assert_eq!(a.sandbox.observe().unwrap().endpoints().count(), 1);

    // Removing the endpoint removes both ends.
    a.sandbox.remove_endpoint(&a.endpoint.host_ifname).unwrap();
    a.sandbox.remove_endpoint(&a.endpoint.host_ifname).unwrap();
    assert_eq!(a.sandbox.observe().unwrap().endpoints().count(), 0);
    assert!(!run(&a.task, "ip", &["link", "show", "eth0"])
        .status
        .success());

    // Errors name the operation, the object and the sandbox.
    let err = a.sandbox.apply_peers("vxlan7", &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "program peers on vxlan7 in 1-sbox11: link vxlan7 does not exist"
    );

    let err = underlay_mtu(&a.node, Ipv4Addr::new(192, 168, 56, 200).into()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "find the MTU of the interface holding 192.168.56.200 in n11: \
         an interface with address 192.168.56.200 does not exist"
    );

    // Deleting the sandbox frees its VNI in the node even while a process still holds
    // the namespace; deleting it again is fine.
    let mut holder = a
        .sandbox
        .netns()
        .spawn(Command::new("sleep").arg("60"))
        .unwrap();
    let path = a.sandbox.netns().path().to_path_buf();
    a.sandbox.delete().unwrap();
    assert!(!path.exists());
    other
        .ensure_vxlan(&a.node, &VxlanConfig::new(VNI, a.mtu))
        .unwrap();
    vxlan::delete_sandbox(&lab.dir, "1-sbox11").unwrap();
    vxlan::delete_sandbox(&lab.dir, "1-other").unwrap();
    assert!(!lab.dir.join("1-other").exists());
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn a_default_route_is_set_replaced_and_observed() {
    let lab = Lab::new();
    let ul = lab.underlay();
    let a = side(&lab, &ul, 11, 2);
    let task = Sandbox::open(&lab.dir, "task11").unwrap();
    let default = |gw: &str| RouteEntry {
        dst: "0.0.0.0/0".parse().unwrap(),
        gateway: Some(gw.parse().unwrap()),
        dev: Some("eth0".into()),
    };
    let subnet = RouteEntry {
        dst: "10.0.0.0/24".parse().unwrap(),
        gateway: None,
        dev: Some("eth0".into()),
    };
    assert_eq!(
        task.observe().unwrap().routes,
        std::slice::from_ref(&subnet)
    );

    task.ensure_default_route("eth0", "10.0.0.1".parse().unwrap())
        .unwrap();
    task.ensure_default_route("eth0", "10.0.0.1".parse().unwrap())
        .unwrap();
    assert_eq!(
        task.observe().unwrap().routes,
        [default("10.0.0.1"), subnet.clone()]
    );
    assert_eq!(
        ip(&a.task, &["-4", "route", "show", "default"]).trim(),
        "default via 10.0.0.1 dev eth0 proto static"
    );
    // Another gateway replaces it: still one default route.
    task.ensure_default_route("eth0", "10.0.0.9".parse().unwrap())
        .unwrap();
    assert_eq!(
        task.observe().unwrap().routes,
        [default("10.0.0.9"), subnet]
    );
    let err = task
        .ensure_default_route("eth9", "10.0.0.1".parse().unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("eth9"), "{err}");
}
