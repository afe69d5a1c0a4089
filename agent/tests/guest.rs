//! Guest tier (root, QEMU guest kernel with IPVS): the real `mesh-agent` with `--lb ipvs`
//! against the fake manager of `support`. Service VIPs are balanced the way Swarm does it:
//! a load-balancer namespace per network, `lb_<network>`, holding the VIPs, with one FWM
//! service per VIP and a masq destination per task.

mod support;

use std::net::Ipv4Addr;
use std::process::Command;

use netns::Netns;
use support::vip;
use support::*;

/// `ipvsadm -Ln` in `ns`, one line per entry with single spaces.
fn ipvsadm(ns: &Netns) -> Vec<String> {
    let out = ns.output(Command::new("ipvsadm").arg("-Ln")).unwrap();
    assert!(out.status.success(), "ipvsadm: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The destinations of `FWM <mark>` with their weights, as `ipvsadm -Ln` lists them.
fn dests(table: &[String], mark: u32) -> Vec<String> {
    table
        .iter()
        .skip_while(|l| *l != &format!("FWM {mark} rr"))
        .skip(1)
        .take_while(|l| l.starts_with("->"))
        .map(|l| l.split(' ').take(4).collect::<Vec<_>>().join(" "))
        .collect()
}

fn masq(ips: &[Ipv4Addr], weight: u32) -> Vec<String> {
    ips.iter()
        .map(|ip| format!("-> {ip}:0 Masq {weight}"))
        .collect()
}

fn addrs(ns: &Netns) -> String {
    let out = ns
        .output(Command::new("ip").args(["-4", "-o", "addr", "show", "dev", "eth0"]))
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vips_are_balanced_by_ipvs_in_the_lb_namespace() {
    assert!(nix::unistd::geteuid().is_root(), "guest tests need root");
    let mut lab = Lab::new();
    lab.start_agent_with(&["--lb", "ipvs", "--drain-seconds", "1"]);
    let mut m = lab.accept();
    vip::start(&lab, &mut m);

    // lb_backend: eth0 with the node's lb address and each VIP as a /32; one FWM service per
    // VIP (none for the dnsrr service), a Masq line per task; Swarm's sysctls.
    let lb = lab.ns(vip::LB_NETNS);
    let eth0 = addrs(&lb);
    for a in ["10.0.9.250/24", "10.0.9.100/32", "10.0.9.101/32"] {
        assert!(eth0.contains(&format!("inet {a} ")), "{a} missing:\n{eth0}");
    }
    let table = ipvsadm(&lb);
    let fwm: Vec<&String> = table.iter().filter(|l| l.starts_with("FWM")).collect();
    assert_eq!(fwm, ["FWM 300 rr", "FWM 301 rr"], "{table:#?}");
    assert_eq!(
        dests(&table, vip::API_MARK),
        masq(&[vip::A1, vip::A2, vip::GHOST], 1)
    );
    assert!(dests(&table, 301).is_empty());
    for (key, value) in [
        ("net.ipv4.vs.conntrack", "1"),
        ("net.ipv4.vs.expire_nodest_conn", "1"),
        ("net.ipv4.vs.expire_quiescent_template", "1"),
        // 1 from kernel 5.9 (the guest's is 6.1): see `firewall::sbox_sysctls`.
        ("net.ipv4.vs.conn_reuse_mode", "1"),
    ] {
        assert_eq!(lb.read_sysctl(key).unwrap(), value, "{key}");
    }

    // Traffic: round robin, the tasks see the lb address (SNAT), the idle VIP refuses.
    let _servers = vip::Servers::start(&lab);
    vip::check_balancing(&lab, vip::LB_ADDR);

    // A VIP alias and an IPVS service deleted by hand come back.
    let run = |args: &[&str]| {
        let out = lb.output(Command::new(args[0]).args(&args[1..])).unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    run(&["ip", "addr", "del", "10.0.9.100/32", "dev", "eth0"]);
    run(&["ipvsadm", "-D", "-f", "300"]);
    lab.eventually("the VIP and its IPVS service come back", || {
        addrs(&lb).contains("inet 10.0.9.100/32 ") && dests(&ipvsadm(&lb), vip::API_MARK).len() == 3
    });

    // a2 and the ghost leave the list: weight 0 at once (no new connection), then gone.
    vip::check_removal(&lab, &mut m);
    lab.eventually("drained destinations are deleted", || {
        dests(&ipvsadm(&lb), vip::API_MARK) == masq(&[vip::A1], 1)
    });

    // The network leaves the node with its last task: lb_backend goes.
    m.send(&assignment(3, vec![]));
    m.wait_applied(&lab, 3);
    lab.eventually("lb_backend goes", || {
        !lab.namespaces().contains(&vip::LB_NETNS.to_string())
    });
}
