//! Guest tier (root, QEMU guest kernel with IPVS): the lab and IPVS work on the guest's kernel,
//! and the routing mesh end to end with the IPVS load balancer.

/// The guest kernel has IPVS: the routing mesh balances with it.
const LB: &str = "ipvs";
#[path = "shared/discovery.rs"]
mod discovery;
#[path = "guest/encrypted.rs"]
mod encrypted;
#[path = "shared/mesh.rs"]
mod mesh;
#[path = "shared/rolling.rs"]
mod rolling;
#[path = "shared/vip.rs"]
mod vip;

use std::process::Command;

use integration::lab::{Lab, LabConfig};

#[test]
fn ipvs_services_live_in_their_namespace() {
    let lab = Lab::up(LabConfig {
        nodes: 1,
        ..LabConfig::default()
    })
    .unwrap();
    let add = [
        vec!["ipvsadm", "-A", "-f", "256", "-s", "rr"],
        vec![
            "ipvsadm",
            "-a",
            "-f",
            "256",
            "-r",
            "10.255.0.5",
            "-m",
            "-w",
            "1",
        ],
        vec![
            "ipvsadm",
            "-a",
            "-f",
            "256",
            "-r",
            "10.255.0.6",
            "-m",
            "-w",
            "1",
        ],
    ];
    for args in &add {
        lab.check("node1", args).unwrap();
    }
    let table = lab.check("node1", &["ipvsadm", "-Ln"]).unwrap();
    let lines: Vec<String> = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(lines.contains(&"FWM 256 rr".to_string()), "{table}");
    assert!(
        lines.contains(&"-> 10.255.0.5:0 Masq 1 0 0".to_string()),
        "{table}"
    );
    assert!(
        lines.contains(&"-> 10.255.0.6:0 Masq 1 0 0".to_string()),
        "{table}"
    );
    // The root namespace's table is another one.
    let root = Command::new("ipvsadm").arg("-Ln").output().unwrap();
    assert!(!String::from_utf8_lossy(&root.stdout).contains("FWM  256"));
}

#[test]
fn the_lab_works_on_the_guest_kernel() {
    let lab = Lab::up(LabConfig::default()).unwrap();
    for target in ["192.168.56.12", "192.168.56.13"] {
        let out = lab.exec("node1", &["ping", "-c1", "-W3", target]).unwrap();
        assert!(out.status.success(), "node1 cannot reach {target}");
    }
}

#[test]
fn ipvsadm_in_ingress_sbox_shows_the_service() {
    let mut c = integration::cluster::Cluster::up(2, LB).unwrap();
    c.lab
        .add_host("client", "192.168.56.100".parse().unwrap())
        .unwrap();
    let tasks = c.hello_service("web", 3, &["-p", "80:8080"]).unwrap();
    let svc: proto::api::ServiceInfo = c.json(&["service", "inspect", "web"]).unwrap();
    let mark = svc.fwmark.unwrap();
    let mut want: Vec<String> = tasks
        .iter()
        .map(|t| format!("-> {}:0 Masq 1", mesh::ingress_ip(t)))
        .collect();
    want.sort();
    for node in ["node1", "node2"] {
        let sbox = c.state_dir(node).join("netns/ingress_sbox");
        let table = c
            .wait_for(
                integration::cluster::CONVERGE_TIMEOUT,
                "IPVS in ingress_sbox",
                |_| {
                    let ns = netns::Netns::open(&sbox).ok()?;
                    let out = ns.output(Command::new("ipvsadm").arg("-Ln")).ok()?;
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    let mut got: Vec<String> = text
                        .lines()
                        .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
                        .filter(|l| l.starts_with("->") && !l.starts_with("-> RemoteAddress"))
                        .collect();
                    got.sort();
                    (got == want).then_some(text)
                },
            )
            .unwrap();
        let header = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .any(|l| l == format!("FWM {mark} rr"));
        assert!(header, "{node}: no `FWM {mark} rr`:\n{table}");
        let ns = netns::Netns::open(&sbox).unwrap();
        for (key, value) in [
            ("net.ipv4.vs.conntrack", "1"),
            ("net.ipv4.vs.expire_nodest_conn", "1"),
            ("net.ipv4.vs.expire_quiescent_template", "1"),
            // 1 from kernel 5.9 (the guest's is 6.1): see `firewall::sbox_sysctls`.
            ("net.ipv4.vs.conn_reuse_mode", "1"),
        ] {
            assert_eq!(ns.read_sysctl(key).unwrap(), value, "{node}: {key}");
        }
    }
}
