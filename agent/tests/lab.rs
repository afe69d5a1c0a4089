//! Lab tier (root, host kernel): the real `mesh-agent` binary in a throwaway node namespace,
//! against a fake manager played by this test (see `support`). It builds the overlay and runs
//! the tasks; after a crash it adopts them without breaking an established TCP connection
//! between two tasks, puts back what was deleted and removes what is stale; tasks that leave
//! are stopped and the overlay sandbox goes with the last of them. Service VIPs are balanced
//! by the nftables load balancer in the client task's namespace.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use netns::Netns;
use proto::model::TaskState;
use vxlan::{LinkKind, RemotePeer, Sandbox};

use support::vip;
use support::*;

#[test]
fn agent_builds_adopts_repairs_and_tears_down() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "lab tests build namespaces: run them as root"
    );
    let (a_ip, b_ip) = (Ipv4Addr::new(10, 0, 9, 2), Ipv4Addr::new(10, 0, 9, 3));
    let (a, b) = (task("a", a_ip), task("b", b_ip));
    let mut lab = Lab::new();
    lab.start_agent();
    let mut m = lab.accept();
    m.send(&assignment(1, vec![a.clone(), b.clone()]));
    let pid_a = m.wait_status(&lab, "a", TaskState::Running).expect("a pid");
    let pid_b = m.wait_status(&lab, "b", TaskState::Running).expect("b pid");
    m.wait_applied(&lab, 1);

    let seen = lab.sandbox();
    let br = seen.link("br0").expect("br0");
    assert_eq!(br.addrs, ["10.0.9.1/24".parse().unwrap()]);
    let vx = seen.link("vxlan0").expect("vxlan0");
    assert!(
        matches!(vx.kind, LinkKind::Vxlan(v) if v.vni == 4096 && v.port == 4789 && v.underlay_elsewhere)
    );
    assert_eq!((vx.mtu, vx.master.as_deref()), (1450, Some("br0")));
    assert!(has_remote_fdb(&seen), "{seen:?}");
    assert_eq!(seen.endpoints().count(), 2);

    // A TCP connection from task b to task a, across the sandbox's bridge.
    let listener = lab
        .ns(&a.name)
        .run(|| TcpListener::bind(SocketAddr::from((a_ip, 7000))))
        .unwrap()
        .unwrap();
    let mut client = lab
        .ns(&b.name)
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((a_ip, 7000)), Duration::from_secs(3)))
        .unwrap()
        .expect("connect from b to a over the overlay");
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(b_ip));
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    echo(&mut client, &mut server, b"before");

    // Crash; meanwhile a peer entry is deleted and a stale namespace appears.
    lab.crash_agent();
    drop(m);
    Sandbox::open(&lab.netns_dir(), SANDBOX)
        .unwrap()
        .remove_peer("vxlan0", &RemotePeer::new(REMOTE.0, REMOTE.1))
        .unwrap();
    assert!(!has_remote_fdb(&lab.sandbox()));
    Netns::create(&lab.netns_dir(), "web.9.stale").unwrap();

    lab.start_agent();
    let mut m = lab.accept();
    // Before any new assignment: the tasks are adopted with the same processes.
    assert_eq!(m.wait_status(&lab, "a", TaskState::Running), Some(pid_a));
    assert_eq!(m.wait_status(&lab, "b", TaskState::Running), Some(pid_b));
    m.send(&assignment(1, vec![a.clone(), b.clone()]));
    m.wait_applied(&lab, 1);
    lab.eventually("the peer entry comes back", || {
        has_remote_fdb(&lab.sandbox())
    });
    lab.eventually("the stale namespace goes", || {
        !lab.namespaces().contains(&"web.9.stale".to_string())
    });
    echo(&mut client, &mut server, b"after the restart");
    echo(&mut server, &mut client, b"and back");

    // b leaves: stopped, then its namespace and endpoint go; a keeps running.
    m.send(&assignment(2, vec![a.clone()]));
    m.wait_status(&lab, "b", TaskState::Shutdown);
    lab.eventually("b's namespace goes", || !lab.namespaces().contains(&b.name));
    lab.eventually("b's endpoint goes", || {
        lab.sandbox().endpoints().count() == 1
    });
    assert!(Path::new(&format!("/proc/{pid_a}")).exists());
    assert!(
        !Path::new(&format!("/proc/{pid_b}/ns")).exists() || {
            // A zombie of an exited task stays until its parent (the crashed agent's parent) reaps it.
            std::fs::read_to_string(format!("/proc/{pid_b}/stat")).is_ok_and(|s| s.contains(") Z"))
        }
    );

    // The last task leaves: the overlay sandbox goes with it.
    m.send(&assignment(3, vec![]));
    m.wait_status(&lab, "a", TaskState::Shutdown);
    lab.eventually("every namespace goes", || lab.namespaces().is_empty());
}

/// nftables: the client's own namespace balances a VIP over the service's tasks (the tasks see
/// the client's address); a task that leaves the list leaves the balancing with the applied
/// revision; a VIP without tasks refuses; no lb_ namespace is made.
#[test]
fn vips_are_balanced_in_the_client_namespace_with_nftables() {
    assert!(nix::unistd::geteuid().is_root(), "lab tests need root");
    let mut lab = Lab::new();
    lab.start_agent_with(&["--lb", "nftables"]);
    let mut m = lab.accept();
    vip::start(&lab, &mut m);
    let _servers = vip::Servers::start(&lab);
    vip::check_balancing(&lab, vip::CLIENT);
    assert!(!lab.namespaces().contains(&vip::LB_NETNS.to_string()));
    vip::check_removal(&lab, &mut m);
}
