//! Encrypted overlays on the host kernel, which has no IPsec ESP: nodes say so, and the
//! manager keeps encrypted networks' tasks off them (the guest tier checks the encryption).

use integration::cluster::{bin, Cluster};
use proto::api::{NetworkDetail, NodeInfo};
use proto::model::TaskState;
use std::time::Duration;

#[test]
fn encrypted_networks_wait_for_nodes_that_can_do_esp() {
    let c = Cluster::up(2, super::LB).unwrap();
    c.encrypted_network_create("sec", "10.0.41.0/24").unwrap();
    c.network_create("plain", "10.0.42.0/24").unwrap();
    let sec: NetworkDetail = c.json(&["network", "inspect", "sec"]).unwrap();
    assert!(sec.network.encrypted);
    let plain: NetworkDetail = c.json(&["network", "inspect", "plain"]).unwrap();
    assert!(!plain.network.encrypted);
    let pretty = c
        .meshctl_ok(&["network", "inspect", "--pretty", "sec"])
        .unwrap();
    assert!(pretty.contains("Encrypted:\ttrue"), "{pretty}");

    // An unknown option is refused and creates nothing.
    let out = c
        .meshctl(&["network", "create", "--opt", "mtu=1400", "other"])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unsupported network option mtu: only encrypted is supported"),
        "{stderr}"
    );
    assert!(!c
        .meshctl(&["network", "inspect", "other"])
        .unwrap()
        .status
        .success());

    // Each agent asked its kernel, and node inspect says why the node cannot encrypt.
    for node in ["node1", "node2"] {
        let info: NodeInfo = c.json(&["node", "inspect", node]).unwrap();
        let why = info.node.no_encryption.unwrap_or_default();
        eprintln!("{node}: {why}");
        assert!(
            why.starts_with("its kernel cannot do IPsec ESP (")
                && why.ends_with("tasks of encrypted networks are not placed here"),
            "{node}: {why}"
        );
    }

    // A service on the encrypted network waits, saying why; one on the plain network runs.
    let hello = bin("hello-server").display().to_string();
    c.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "secure",
        "--network",
        "sec",
        "--detach",
        "--",
        &hello,
    ])
    .unwrap();
    c.hello_service("open", 2, &["--network", "plain"]).unwrap();
    let error = c
        .wait_for(Duration::from_secs(10), "secure's task error", |c| {
            let tasks = c.tasks("secure").ok()?;
            let t = tasks.first()?;
            (t.state == TaskState::Pending && t.node.is_none())
                .then(|| t.error.clone())
                .flatten()
        })
        .unwrap();
    assert_eq!(
        error,
        "no suitable node (the service is on an encrypted network and 2 nodes cannot do IPsec ESP)"
    );
    // No key ring reached the agents (they carry no encrypted network), nor any ESP table.
    for node in ["node1", "node2"] {
        let tables = c.lab.check(node, &["nft", "list", "tables"]).unwrap();
        assert!(!tables.contains("meshnet_esp"), "{node}: {tables}");
    }
}
