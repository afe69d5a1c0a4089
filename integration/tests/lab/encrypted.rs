//! Encrypted overlays on the host kernel, which has no IPsec ESP: nodes say so, the manager
//! keeps encrypted networks' tasks off them, and an encrypted ingress network off them (the
//! guest tier checks the encryption).

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

/// `mesh-manager --ingress-encrypted` on nodes without ESP: none is given the routing mesh
/// (rather than carry its traffic in clear), each says why, the manager logs it, services with
/// an ingress-mode port wait for a node that can encrypt, and host-mode ports still answer.
#[test]
fn an_encrypted_ingress_is_not_given_to_nodes_without_esp() {
    let mut c = Cluster::up_with(2, super::LB, &["--ingress-encrypted"]).unwrap();
    let client_ip = std::net::Ipv4Addr::new(192, 168, 56, 100);
    c.lab.add_host("client", client_ip).unwrap();
    let ingress: NetworkDetail = c.json(&["network", "inspect", "ingress"]).unwrap();
    assert!(ingress.network.encrypted);
    for node in ["node1", "node2"] {
        let info: NodeInfo = c.json(&["node", "inspect", node]).unwrap();
        let why = info.no_routing_mesh.unwrap_or_default();
        eprintln!("{node}: {why}");
        assert!(
            why.starts_with("the ingress network is encrypted (mesh-manager --ingress-encrypted) and this node cannot do IPsec ESP"),
            "{node}: {why}"
        );
        assert!(info.node.no_encryption.is_some());
    }
    let log = std::fs::read_to_string(c.log_path("manager")).unwrap();
    assert!(log.contains("no routing mesh on this node"), "{log}");

    let error = {
        let hello = bin("hello-server").display().to_string();
        c.meshctl_ok(&[
            "service",
            "create",
            "--name",
            "web",
            "--publish",
            "80:8080",
            "--detach",
            "--",
            &hello,
        ])
        .unwrap();
        c.wait_for(Duration::from_secs(10), "web's task error", |c| {
            let tasks = c.tasks("web").ok()?;
            let t = tasks.first()?;
            (t.state == TaskState::Pending && t.node.is_none())
                .then(|| t.error.clone())
                .flatten()
        })
        .unwrap()
    };
    assert_eq!(
        error,
        "no suitable node (the service is on an encrypted network and 2 nodes cannot do IPsec ESP)"
    );

    // Host mode needs no ingress network: it runs, and answers where its task is.
    let tasks = c
        .hello_service(
            "edge",
            1,
            &[
                "--publish",
                "mode=host,published=8081,target=8080,protocol=tcp",
            ],
        )
        .unwrap();
    let node_ip = c.lab.node(tasks[0].node.as_deref().unwrap()).unwrap().ip;
    let url = format!("http://{node_ip}:8081/");
    c.wait_for(Duration::from_secs(20), "the host-mode port", |c| {
        let out = c
            .lab
            .exec("client", &["curl", "-s", "--max-time", "3", &url])
            .ok()?;
        out.status.success().then_some(())
    })
    .unwrap();
    // Neither node has an ESP table: no keys reached them.
    for node in ["node1", "node2"] {
        let tables = c.lab.check(node, &["nft", "list", "tables"]).unwrap();
        assert!(!tables.contains("meshnet_esp"), "{node}: {tables}");
    }
}
