//! Guest tier (root, QEMU guest kernel with IPVS): the lab and IPVS work on the guest's kernel.

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
