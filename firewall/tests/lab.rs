//! Lab tier (root, host kernel): the rule sets applied in throwaway namespaces, checked with
//! real TCP and UDP traffic.
//!
//! Topology (like reference/ingress-path-nftables.sh, with a plain bridge for the ingress
//! overlay, which is not this crate's business):
//! ```text
//! cl 192.168.56.100 ── node 192.168.56.11, gwbr 172.18.0.1/16 ─┬─ sbox eth1 172.18.0.2
//!                                                              └─ host task 172.18.0.3 (:8081)
//! sbox eth0 10.255.0.2 ── ing/br0 ── b1..b3 10.255.0.11-13 (tcp :8080, udp :5353)
//! ```
//! Published: 80/tcp and 53/udp in ingress mode (redirected in each task to 8080 and 5353),
//! 81/tcp in host mode to the host task's 8081.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use firewall::{
    reconcile, sync, sync_report, synthetic_sbox, Content, Fwmark, Netfilter, NfnlSocket,
    NodeConfig, NodeState, NsNetfilter, PortKey, Ruleset, SboxConfig, SboxService, SboxState,
    Synced, TaskState,
};
use netns::Netns;
use proto::model::LbKind;

static LABS: AtomicU32 = AtomicU32::new(0);
const TIMEOUT: Duration = Duration::from_secs(2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 11);
const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("b1", Ipv4Addr::new(10, 255, 0, 11)),
    ("b2", Ipv4Addr::new(10, 255, 0, 12)),
    ("b3", Ipv4Addr::new(10, 255, 0, 13)),
];
const FOREIGN: &str = "table ip foreign";

/// Namespaces in a directory of their own and the server threads in them; everything goes in
/// `drop`, also when a test panics.
struct Lab {
    dir: PathBuf,
    ns: HashMap<String, Netns>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Lab {
    fn new() -> Lab {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        Lab {
            dir: PathBuf::from(format!("/run/meshnet-test-fw-{}-{n}", std::process::id())),
            ns: HashMap::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    fn add(&mut self, name: &str) {
        let ns = Netns::create(&self.dir, name).unwrap();
        self.ns.insert(name.to_string(), ns);
    }

    fn ns(&self, name: &str) -> &Netns {
        &self.ns[name]
    }

    fn nf(&self, name: &str) -> NsNetfilter<'_> {
        NsNetfilter::new(self.ns(name))
    }

    /// Runs a command inside `name` and returns its stdout; fails the test if it fails.
    fn run(&self, name: &str, program: &str, args: &[&str]) -> String {
        let out = self
            .ns(name)
            .output(Command::new(program).args(args))
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} in {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ip(&self, name: &str, args: &str) {
        self.run(name, "ip", &args.split_whitespace().collect::<Vec<_>>());
    }

    /// A veth pair, `a_if` in `a` and `b_if` in `b`, both up.
    fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) {
        let peer_ns = self.ns(b).path().to_str().unwrap().to_string();
        self.run(
            a,
            "ip",
            &[
                "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &peer_ns,
            ],
        );
        self.ip(a, &format!("link set {a_if} up"));
        self.ip(b, &format!("link set {b_if} up"));
    }

    fn sysctls(&self, name: &str, list: &[(String, String)]) {
        for (k, v) in list {
            self.ns(name).write_sysctl(k, v).unwrap();
        }
    }

    /// Answers each TCP connection with `<identity> <peer IP>\n`, then echoes lines.
    fn tcp_server(&mut self, name: &str, port: u16, identity: &str) {
        self.tcp_server_on(
            name,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            identity,
        );
    }

    /// [`Lab::tcp_server`] bound to one address.
    fn tcp_server_on(&mut self, name: &str, addr: SocketAddrV4, identity: &str) {
        let listener = self
            .ns(name)
            .run(|| TcpListener::bind(addr))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let (stop, identity) = (self.stop.clone(), identity.to_string());
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let hello = format!("{identity} {}\n", peer.ip());
                        std::thread::spawn(move || serve(stream, &hello));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }

    /// Answers each datagram with `<identity>`.
    fn udp_server(&mut self, name: &str, port: u16, identity: &str) {
        let socket = self
            .ns(name)
            .run(|| UdpSocket::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (stop, identity) = (self.stop.clone(), identity.to_string());
        self.threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(identity.as_bytes(), from);
                }
            }
        }));
    }

    fn list(&self, name: &str, table: &str) -> String {
        let args: Vec<&str> = ["list"].into_iter().chain(table.split(' ')).collect();
        self.run(name, "nft", &args)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let names: Vec<String> = self.ns.drain().map(|(n, _)| n).collect();
        for name in names {
            let _ = netns::delete(&self.dir.join(name));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn serve(stream: TcpStream, hello: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    if writer.write_all(hello.as_bytes()).is_err() {
        return;
    }
    for line in BufReader::new(stream).lines() {
        match line {
            Ok(l) if writer.write_all(format!("{l}\n").as_bytes()).is_ok() => {}
            _ => return,
        }
    }
}

/// Connects from `from` and returns the open stream and the server's greeting
/// (`<identity> <peer IP as the server saw it>`).
fn connect(
    lab: &Lab,
    from: &str,
    to: SocketAddr,
) -> std::io::Result<(BufReader<TcpStream>, String)> {
    let stream = lab
        .ns(from)
        .run(|| TcpStream::connect_timeout(&to, TIMEOUT))
        .unwrap()?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok((reader, line.trim_end().to_string()))
}

/// The identity of whoever answers a new TCP connection.
fn who(lab: &Lab, from: &str, to: SocketAddr) -> String {
    let (_, greeting) = connect(lab, from, to).unwrap_or_else(|e| panic!("{from} → {to}: {e}"));
    greeting.split(' ').next().unwrap().to_string()
}

fn udp_socket(lab: &Lab, from: &str) -> UdpSocket {
    let s = lab
        .ns(from)
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

fn udp_ask(socket: &UdpSocket, to: SocketAddr) -> String {
    socket.send_to(b"hi", to).unwrap();
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no UDP answer from {to}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn published(port: u16) -> SocketAddr {
    SocketAddr::from((NODE_IP, port))
}

/// The desired states of the lab's tables.
struct Desired {
    node: NodeState,
    sbox: SboxState,
    tasks: BTreeMap<&'static str, TaskState>,
}

fn mark() -> Fwmark {
    Fwmark::new(256).unwrap()
}

fn sbox_with(backends: &[&str]) -> SboxState {
    let mut sbox = SboxState::new(SboxConfig {
        ingress_iface: "eth0".into(),
        ingress_subnet: "10.255.0.0/16".parse().unwrap(),
        ingress_ip: Ipv4Addr::new(10, 255, 0, 2),
        lb: LbKind::Nftables,
    });
    let backends = BACKENDS
        .iter()
        .filter(|(n, _)| backends.contains(n))
        .map(|(_, ip)| *ip)
        .collect();
    sbox.services.insert(
        mark(),
        SboxService {
            ports: [PortKey::tcp(80), PortKey::udp(53)].into(),
            backends,
            vip: None,
        },
    );
    sbox
}

/// Builds the topology, starts the servers, adds a foreign table in node and sbox, and applies
/// every rule set from scratch.
fn ingress_lab() -> (Lab, Desired) {
    let mut lab = Lab::new();
    for n in ["cl", "node", "sbox", "ing", "host", "b1", "b2", "b3"] {
        lab.add(n);
    }
    lab.veth("cl", "eth0", "node", "eth0");
    lab.ip("cl", "addr add 192.168.56.100/24 dev eth0");
    lab.ip("node", "addr add 192.168.56.11/24 dev eth0");
    lab.ip("node", "link add gwbr type bridge");
    lab.ip("node", "addr add 172.18.0.1/16 dev gwbr");
    lab.ip("node", "link set gwbr up");
    for (task, iface, addr) in [
        ("sbox", "gw-sb", "172.18.0.2"),
        ("host", "gw-h", "172.18.0.3"),
    ] {
        let inner = if task == "sbox" { "eth1" } else { "eth0" };
        lab.veth("node", iface, task, inner);
        lab.ip("node", &format!("link set {iface} master gwbr"));
        lab.ip(task, &format!("addr add {addr}/16 dev {inner}"));
        lab.ip(task, "route add default via 172.18.0.1");
    }
    lab.ip("ing", "link add br0 type bridge");
    lab.ip("ing", "link set br0 up");
    lab.veth("ing", "sb0", "sbox", "eth0");
    lab.ip("ing", "link set sb0 master br0");
    lab.ip("sbox", "addr add 10.255.0.2/16 dev eth0");
    for (name, ip) in BACKENDS {
        let port = format!("p-{name}");
        lab.veth("ing", &port, name, "eth0");
        lab.ip("ing", &format!("link set {port} master br0"));
        lab.ip(name, &format!("addr add {ip}/16 dev eth0"));
        lab.tcp_server(name, 8080, name);
        lab.udp_server(name, 5353, name);
    }
    lab.tcp_server("host", 8081, "host");

    lab.sysctls("node", &firewall::node_sysctls("gwbr"));
    lab.sysctls(
        "sbox",
        &firewall::sbox_sysctls(LbKind::Nftables, &firewall::kernel_release()),
    );
    for ns in ["node", "sbox"] {
        lab.run(ns, "nft", &["add", "table", "ip", "foreign"]);
        lab.run(
            ns,
            "nft",
            &["add chain ip foreign input { type filter hook input priority 0; policy accept; }"],
        );
        lab.run(
            ns,
            "nft",
            &["add rule ip foreign input tcp dport 9 counter"],
        );
    }

    let mut node = NodeState::new(NodeConfig {
        gwbridge: "gwbr".into(),
        gwbridge_subnet: "172.18.0.0/16".parse().unwrap(),
        ingress_sbox_ip: Ipv4Addr::new(172, 18, 0, 2),
    });
    node.ingress_ports
        .extend([PortKey::tcp(80), PortKey::udp(53)]);
    node.host_ports
        .insert(PortKey::tcp(81), "172.18.0.3:8081".parse().unwrap());
    let tasks: BTreeMap<_, _> = BACKENDS
        .iter()
        .map(|(name, ip)| {
            let redirects = [(PortKey::tcp(80), 8080), (PortKey::udp(53), 5353)].into();
            (
                *name,
                TaskState {
                    ingress_ip: Some(*ip),
                    redirects,
                    vips: BTreeMap::new(),
                },
            )
        })
        .collect();
    let desired = Desired {
        node,
        sbox: sbox_with(&["b1", "b2", "b3"]),
        tasks,
    };
    sync(&lab.nf("node"), None, &desired.node).unwrap();
    sync(&lab.nf("sbox"), None, &desired.sbox).unwrap();
    for (name, task) in &desired.tasks {
        sync(&lab.nf(name), None, task).unwrap();
    }
    (lab, desired)
}

/// How the table listed in `nf`'s namespace differs from the full build of `state`.
fn differences<R: Ruleset>(nf: &dyn Netfilter, state: &R) -> Vec<String> {
    let listed = nf.list_table().unwrap().expect("our table exists");
    let built = Content::from_script(&R::render(None, state).unwrap()).unwrap();
    built.differences(&Content::from_listing(&listed).unwrap())
}

/// Connects from local `port` (reused at once) with a 500 ms timeout; true if it connected.
/// Closes with a reset, so the port is free again at once.
fn connect_from_port(port: u16, to: SocketAddrV4) -> bool {
    fn opt<T>(fd: libc::c_int, name: libc::c_int, value: &T) {
        let len = std::mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: `value` is a live T of `len` bytes, as the option expects.
        let r = unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, name, (value as *const T).cast(), len)
        };
        assert_eq!(r, 0, "setsockopt {name}");
    }
    let addr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        opt(fd, libc::SO_REUSEADDR, &1 as &libc::c_int);
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 500_000,
        };
        opt(fd, libc::SO_SNDTIMEO, &timeout);
        let local = addr(Ipv4Addr::UNSPECIFIED, port);
        assert_eq!(
            libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len),
            0,
            "bind {port}"
        );
        let remote = addr(*to.ip(), to.port());
        let connected = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) == 0;
        opt(
            fd,
            libc::SO_LINGER,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        );
        libc::close(fd);
        connected
    }
}

/// A backend that never answered leaves SYN_SENT conntrack entries behind; once it leaves the
/// balancer they go, so a client reusing such a source port reaches a live backend instead of
/// following the stale entry to the gone one (for two minutes, the SYN_SENT timeout).
#[test]
fn a_removed_backend_takes_its_half_open_connections_along() {
    let (lab, desired) = ingress_lab();
    let gone = Ipv4Addr::new(10, 255, 0, 99);
    let mut with_gone = sbox_with(&["b1"]);
    with_gone
        .services
        .get_mut(&mark())
        .unwrap()
        .backends
        .insert(gone);
    sync(&lab.nf("sbox"), Some(&desired.sbox), &with_gone).unwrap();
    let to = SocketAddrV4::new(NODE_IP, 80);
    let half_open =
        |port: u16| -> bool { !lab.ns("cl").run(|| connect_from_port(port, to)).unwrap() };
    // Every other new connection goes to the address nobody holds.
    let port = (41000..41010)
        .find(|&p| half_open(p))
        .expect("one attempt goes nowhere");
    let syn_sent = || {
        lab.run(
            "sbox",
            "conntrack",
            &[
                "-L",
                "-p",
                "tcp",
                "--state",
                "SYN_SENT",
                "--reply-src",
                "10.255.0.99",
            ],
        )
    };
    assert!(
        syn_sent().contains(&format!("dport={port}")),
        "{}",
        syn_sent()
    );
    // While it is there, that source port keeps following it.
    assert!(half_open(port));

    let only_b1 = sbox_with(&["b1"]);
    sync(&lab.nf("sbox"), Some(&with_gone), &only_b1).unwrap();
    assert_eq!(syn_sent(), "");
    assert!(
        !half_open(port),
        "port {port} still follows the gone backend"
    );
}

#[test]
fn routing_mesh_balances_round_robin_and_follows_incremental_updates() {
    let (mut lab, desired) = ingress_lab();
    let foreign_before: Vec<String> = ["node", "sbox"]
        .iter()
        .map(|n| lab.list(n, FOREIGN))
        .collect();
    assert_eq!(
        differences(&lab.nf("node"), &desired.node),
        Vec::<String>::new()
    );
    assert_eq!(
        differences(&lab.nf("sbox"), &desired.sbox),
        Vec::<String>::new()
    );

    // Round robin: every window of three new connections meets every backend once. The
    // backend sees the sandbox's ingress IP (SNAT), so replies come back through this node.
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (_, greeting) = connect(&lab, "cl", published(80)).unwrap();
        let (id, peer) = greeting.split_once(' ').unwrap();
        assert_eq!(peer, "10.255.0.2", "SNAT to the sandbox's ingress IP");
        seen.push(id.to_string());
    }
    for window in seen.chunks(3) {
        let set: BTreeSet<&str> = window.iter().map(String::as_str).collect();
        assert_eq!(set, ["b1", "b2", "b3"].into(), "{seen:?}");
    }

    // UDP: each new flow goes to the next backend.
    let udp: BTreeSet<String> = (0..3)
        .map(|_| udp_ask(&udp_socket(&lab, "cl"), published(53)))
        .collect();
    assert_eq!(udp, ["b1", "b2", "b3"].map(String::from).into());

    // From the node itself: its own address and localhost.
    for addr in ["192.168.56.11:80", "127.0.0.1:80"] {
        let id = who(&lab, "node", addr.parse().unwrap());
        assert!(id.starts_with('b'), "{addr} answered by {id}");
    }

    // Host mode: straight to the local task, client source kept.
    let (_, greeting) = connect(&lab, "cl", published(81)).unwrap();
    assert_eq!(greeting, "host 192.168.56.100");

    // Hold a TCP connection and a UDP flow on b2 (each new one goes to the next backend),
    // then remove b2.
    let mut held = (0..3)
        .map(|_| connect(&lab, "cl", published(80)).unwrap())
        .find(|(_, greeting)| greeting.starts_with("b2 "))
        .expect("b2 answers one of three connections")
        .0;
    let flow = (0..3)
        .map(|_| udp_socket(&lab, "cl"))
        .find(|s| udp_ask(s, published(53)) == "b2")
        .expect("b2 answers one of three flows");
    let without_b2 = sbox_with(&["b1", "b3"]);
    sync(&lab.nf("sbox"), Some(&desired.sbox), &without_b2).unwrap();
    assert_eq!(
        differences(&lab.nf("sbox"), &without_b2),
        Vec::<String>::new()
    );
    let after: BTreeSet<String> = (0..4).map(|_| who(&lab, "cl", published(80))).collect();
    assert_eq!(after, ["b1", "b3"].map(String::from).into());

    // Draining: the established connection to b2 still works.
    held.get_mut().write_all(b"still there\n").unwrap();
    let mut echo = String::new();
    held.read_line(&mut echo).unwrap();
    assert_eq!(echo, "still there\n");
    // The UDP flow's conntrack entry went with b2: its next datagram is balanced afresh.
    let moved = udp_ask(&flow, published(53));
    assert!(
        moved == "b1" || moved == "b3",
        "UDP flow answered by {moved}"
    );

    // b2 comes back.
    sync(&lab.nf("sbox"), Some(&without_b2), &desired.sbox).unwrap();
    let back: BTreeSet<String> = (0..3).map(|_| who(&lab, "cl", published(80))).collect();
    assert_eq!(back, ["b1", "b2", "b3"].map(String::from).into());

    // A task's redirect changes: its chain is flushed and refilled.
    lab.tcp_server("b1", 8082, "b1-alt");
    let mut b1 = desired.tasks["b1"].clone();
    b1.redirects.insert(PortKey::tcp(80), 8082);
    sync(&lab.nf("b1"), Some(&desired.tasks["b1"]), &b1).unwrap();
    let moved: BTreeSet<String> = (0..3).map(|_| who(&lab, "cl", published(80))).collect();
    assert_eq!(moved, ["b1-alt", "b2", "b3"].map(String::from).into());
    sync(&lab.nf("b1"), Some(&b1), &desired.tasks["b1"]).unwrap();
    assert_eq!(
        differences(&lab.nf("b1"), &desired.tasks["b1"]),
        Vec::<String>::new()
    );

    // Unpublishing a port on the node takes it away; publishing brings it back.
    let mut node = desired.node.clone();
    node.ingress_ports.remove(&PortKey::tcp(80));
    sync(&lab.nf("node"), Some(&desired.node), &node).unwrap();
    assert!(connect(&lab, "cl", published(80)).is_err());
    sync(&lab.nf("node"), Some(&node), &desired.node).unwrap();
    assert!(who(&lab, "cl", published(80)).starts_with('b'));

    // Reconciliation: an intact table is left alone; an element deleted or edited behind our
    // back (the count unchanged) is detected and the table rebuilt.
    assert_eq!(reconcile(&lab.nf("sbox"), &desired.sbox).unwrap(), None);
    // Alters the sbox table by hand; reconcile must name the drift and leave it right.
    let repaired = |edit: &str| -> String {
        lab.run("sbox", "nft", &[edit]);
        let drift = reconcile(&lab.nf("sbox"), &desired.sbox)
            .unwrap()
            .expect("a drift")
            .to_string();
        assert_eq!(
            differences(&lab.nf("sbox"), &desired.sbox),
            Vec::<String>::new()
        );
        drift
    };
    let drift = repaired("delete element ip meshnet backends { 256 . 0 }");
    assert!(
        drift.starts_with("map backends: element 256 . 0 : "),
        "{drift}"
    );
    let drift = repaired(
        "delete element ip meshnet backends { 256 . 0 }; \
         add element ip meshnet backends { 256 . 0 : 10.255.0.99 }",
    );
    assert!(
        drift.contains("map backends: element 256 . 0 : 10.255.0.99 extra"),
        "{drift}"
    );
    lab.run("node", "nft", &["delete table ip meshnet"]);
    assert!(reconcile(&lab.nf("node"), &desired.node).unwrap().is_some());
    let ids: BTreeSet<String> = (0..3).map(|_| who(&lab, "cl", published(80))).collect();
    assert_eq!(ids, ["b1", "b2", "b3"].map(String::from).into());

    // Nothing of ours touched the foreign tables.
    let foreign_after: Vec<String> = ["node", "sbox"]
        .iter()
        .map(|n| lab.list(n, FOREIGN))
        .collect();
    assert_eq!(foreign_after, foreign_before);
}

/// The nftables VIP balancer in a client task's own namespace: any port, TCP and UDP, round
/// robin over the service's tasks, the client's address kept; a task that leaves stops getting
/// new connections and flows; a VIP without tasks refuses at once.
#[test]
fn vips_balance_in_the_client_namespace() {
    let (mut lab, _) = ingress_lab();
    lab.add("c");
    lab.veth("ing", "p-c", "c", "eth0");
    lab.ip("ing", "link set p-c master br0");
    lab.ip("c", "addr add 10.255.0.20/16 dev eth0");
    for (name, _) in BACKENDS {
        lab.tcp_server(name, 7000, name);
    }
    let (vip, idle) = (
        Ipv4Addr::new(10, 255, 0, 100),
        Ipv4Addr::new(10, 255, 0, 101),
    );
    let client = |backends: &[Ipv4Addr]| TaskState {
        ingress_ip: None,
        redirects: BTreeMap::new(),
        vips: [
            (vip, backends.iter().copied().collect()),
            (idle, BTreeSet::new()),
        ]
        .into(),
    };
    let all = client(&BACKENDS.map(|(_, ip)| ip));
    sync(&lab.nf("c"), None, &all).unwrap();
    assert_eq!(differences(&lab.nf("c"), &all), Vec::<String>::new());

    for port in [8080, 7000] {
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (_, greeting) = connect(&lab, "c", SocketAddr::from((vip, port))).unwrap();
            let (id, peer) = greeting.split_once(' ').unwrap();
            assert_eq!(peer, "10.255.0.20", "no SNAT: the task sees the client");
            seen.push(id.to_string());
        }
        for window in seen.chunks(3) {
            let set: BTreeSet<&str> = window.iter().map(String::as_str).collect();
            assert_eq!(set, ["b1", "b2", "b3"].into(), "port {port}: {seen:?}");
        }
    }
    let udp: BTreeSet<String> = (0..3)
        .map(|_| udp_ask(&udp_socket(&lab, "c"), SocketAddr::from((vip, 5353))))
        .collect();
    assert_eq!(udp, ["b1", "b2", "b3"].map(String::from).into());

    // No task: refused at once, not a timeout.
    let t0 = Instant::now();
    let err = connect(&lab, "c", SocketAddr::from((idle, 80))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(t0.elapsed() < Duration::from_millis(500));

    // b2 leaves: one chain refilled; its UDP flow moves on; a held TCP connection drains.
    let mut held = (0..3)
        .map(|_| connect(&lab, "c", SocketAddr::from((vip, 7000))).unwrap())
        .find(|(_, g)| g.starts_with("b2 "))
        .expect("b2 answers one of three connections")
        .0;
    let flow = (0..3)
        .map(|_| udp_socket(&lab, "c"))
        .find(|s| udp_ask(s, SocketAddr::from((vip, 5353))) == "b2")
        .expect("b2 answers one of three flows");
    let without_b2 = client(&[BACKENDS[0].1, BACKENDS[2].1]);
    let batch = TaskState::render(Some(&all), &without_b2)
        .unwrap()
        .to_string();
    assert_eq!(batch.lines().count(), 2, "{batch}");
    sync(&lab.nf("c"), Some(&all), &without_b2).unwrap();
    assert_eq!(differences(&lab.nf("c"), &without_b2), Vec::<String>::new());
    let after: BTreeSet<String> = (0..4)
        .map(|_| who(&lab, "c", SocketAddr::from((vip, 7000))))
        .collect();
    assert_eq!(after, ["b1", "b3"].map(String::from).into());
    let moved = udp_ask(&flow, SocketAddr::from((vip, 5353)));
    assert!(
        moved == "b1" || moved == "b3",
        "UDP flow answered by {moved}"
    );
    held.get_mut().write_all(b"still there\n").unwrap();
    let mut echo = String::new();
    held.read_line(&mut echo).unwrap();
    assert_eq!(echo, "still there\n");

    // A VIP chain deleted behind our back is found and rebuilt.
    lab.run("c", "nft", &["flush chain ip meshnet vip-10.255.0.100"]);
    assert!(reconcile(&lab.nf("c"), &without_b2).unwrap().is_some());
    assert!(who(&lab, "c", SocketAddr::from((vip, 7000))).starts_with('b'));
}

/// The ingress VIP of a published service: a task on the ingress network that connects to it,
/// on any port, is balanced over the service's tasks like the published port, through
/// ingress_sbox (which holds the VIP on eth0, as the agent makes it).
#[test]
fn an_ingress_vip_is_balanced_like_the_published_port() {
    let (lab, desired) = ingress_lab();
    let vip = Ipv4Addr::new(10, 255, 0, 3);
    lab.ip("sbox", &format!("addr add {vip}/32 dev eth0"));
    let mut with_vip = desired.sbox.clone();
    with_vip.services.get_mut(&mark()).unwrap().vip = Some(vip);
    sync(&lab.nf("sbox"), Some(&desired.sbox), &with_vip).unwrap();
    assert_eq!(
        differences(&lab.nf("sbox"), &with_vip),
        Vec::<String>::new()
    );
    // The target port straight, and the published port (redirected in each task).
    for port in [8080, 80] {
        let mut seen = BTreeSet::new();
        for _ in 0..3 {
            let (_, greeting) = connect(&lab, "b1", SocketAddr::from((vip, port))).unwrap();
            let (id, peer) = greeting.split_once(' ').unwrap();
            assert_eq!(peer, "10.255.0.2", "SNAT to the sandbox's ingress IP");
            seen.insert(id.to_string());
        }
        assert_eq!(
            seen,
            ["b1", "b2", "b3"].map(String::from).into(),
            "port {port}"
        );
    }
    let udp: BTreeSet<String> = (0..3)
        .map(|_| udp_ask(&udp_socket(&lab, "b2"), SocketAddr::from((vip, 5353))))
        .collect();
    assert_eq!(udp, ["b1", "b2", "b3"].map(String::from).into());
}

/// CVE-2020-8558: the gwbridge has route_localnet=1 (for `localhost:<published>`), so without
/// a guard a neighbour on it that routes 127.0.0.0/8 to the node reaches services bound to the
/// node's 127.0.0.1. The node table's `raw-prerouting` chain drops those packets; the node's
/// own localhost, and `localhost:<published>` through the DNAT, keep working.
#[test]
fn neighbours_on_the_gwbridge_cannot_reach_the_node_localhost() {
    let (mut lab, desired) = ingress_lab();
    // The attacker: a namespace on the gwbridge (172.18.0.9) that sends 127.0.0.0/8 to the node
    // (without its own 127.0.0.1/8, whose local routes would win even with lo down) and accepts
    // replies from 127.0.0.1 (route_localnet on its side too).
    lab.add("nb");
    lab.veth("node", "gw-nb", "nb", "eth0");
    lab.ip("node", "link set gw-nb master gwbr");
    lab.ip("nb", "addr add 172.18.0.9/16 dev eth0");
    lab.ip("nb", "addr del 127.0.0.1/8 dev lo");
    lab.ip("nb", "route add 127.0.0.0/8 via 172.18.0.1 dev eth0");
    let route = lab.run("nb", "ip", &["route", "get", "127.0.0.1"]);
    assert!(
        route.starts_with("127.0.0.1 via 172.18.0.1 dev eth0"),
        "{route}"
    );
    lab.sysctls(
        "nb",
        &[("net/ipv4/conf/eth0/route_localnet".into(), "1".into())],
    );
    // A service that trusts its loopback binding.
    let local = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9000);
    lab.tcp_server_on("node", local, "node-local");
    let local = SocketAddr::V4(local);

    let blocked = |lab: &Lab, why: &str| match connect(lab, "nb", local) {
        Ok((_, greeting)) => panic!("{why}: the neighbour reached {local}: {greeting}"),
        // Dropped: no RST, no ICMP, the SYN goes unanswered.
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{why}: {e}"),
    };
    blocked(&lab, "with the node table applied");
    // The node itself still reaches its localhost, and localhost:<published> (DNATed on the
    // output path, its replies un-NATed after the guard) still reaches the mesh.
    assert_eq!(who(&lab, "node", local), "node-local");
    for _ in 0..3 {
        let id = who(&lab, "node", "127.0.0.1:80".parse().unwrap());
        assert!(id.starts_with('b'), "localhost:80 answered by {id}");
    }
    // Published ports from outside are unaffected.
    assert!(who(&lab, "cl", published(80)).starts_with('b'));

    // The control: without the guard's rule the same neighbour gets through, so it is the rule
    // that stops it here, not this lab's routing. The periodic check puts the rule back.
    lab.run("node", "nft", &["flush chain ip meshnet raw-prerouting"]);
    let (_, greeting) = connect(&lab, "nb", local)
        .unwrap_or_else(|e| panic!("without the guard the neighbour should get through: {e}"));
    assert_eq!(greeting, "node-local 172.18.0.9");
    assert!(reconcile(&lab.nf("node"), &desired.node).unwrap().is_some());
    assert_eq!(
        differences(&lab.nf("node"), &desired.node),
        Vec::<String>::new()
    );
    blocked(&lab, "after the reconcile");
    assert!(lab
        .list("node", "table ip meshnet")
        .contains("ip daddr 127.0.0.0/8 iifname != \"lo\" drop"));
}

#[test]
fn full_rebuild_is_atomic_and_idempotent() {
    let (lab, desired) = ingress_lab();
    let listed = lab.list("sbox", "table ip meshnet");
    let foreign = lab.list("sbox", FOREIGN);
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        // New connections keep arriving while the whole table is rebuilt again and again.
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                match connect(&lab, "cl", published(80)) {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        });
        for _ in 0..30 {
            sync(&lab.nf("sbox"), None, &desired.sbox).unwrap();
            sync(&lab.nf("node"), None, &desired.node).unwrap();
        }
        stop.store(true, Ordering::SeqCst);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    assert!(ok > 0, "the client made no connection");
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed during rebuilds",
        ok + failed
    );
    assert_eq!(
        lab.list("sbox", "table ip meshnet"),
        listed,
        "a rebuild changes nothing"
    );
    assert_eq!(lab.list("sbox", FOREIGN), foreign);
    assert_eq!(reconcile(&lab.nf("sbox"), &desired.sbox).unwrap(), None);
}

/// Median and maximum of the timings.
fn p50_max(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(times[times.len() / 2]), ms(times[times.len() - 1]))
}

/// Adds, then removes, one service (3 backends) on top of `base` (already applied), 20 times.
/// Times render plus apply (the programming latency) of each, and the UDP conntrack cleanup
/// after a removal apart: (add, remove, cleanup) as (p50, max) in ms. Leaves `base` applied.
fn one_service_changes(nf: &NsNetfilter, base: &SboxState) -> [(f64, f64); 3] {
    let (mut adds, mut removes, mut cleanups) = (Vec::new(), Vec::new(), Vec::new());
    let change = |from: &SboxState, to: &SboxState| {
        let start = Instant::now();
        nf.apply(&SboxState::render(Some(from), to).unwrap())
            .unwrap();
        let programmed = start.elapsed();
        let start = Instant::now();
        for ip in SboxState::stale_destinations(from, to) {
            nf.delete_stale_conntrack(ip).unwrap();
        }
        (programmed, start.elapsed())
    };
    for i in 0..20u8 {
        let mut next = base.clone();
        next.services.insert(
            Fwmark::new(100_000 + u32::from(i)).unwrap(),
            SboxService {
                ports: [PortKey::udp(60_000 + u16::from(i))].into(),
                backends: (1..=3).map(|j| Ipv4Addr::new(10, 200, i, j)).collect(),
                vip: None,
            },
        );
        adds.push(change(base, &next).0);
        let (removed, cleanup) = change(&next, base);
        removes.push(removed);
        cleanups.push(cleanup);
    }
    [p50_max(adds), p50_max(removes), p50_max(cleanups)]
}

/// Timings for B4/B5 (printed; a benchmark never fails a test), and correctness at scale.
#[test]
fn programming_ten_thousand_services() {
    let mut lab = Lab::new();
    lab.add("scale");
    let nf = lab.nf("scale");

    // One service on top of an empty table, for the ratio.
    let empty = synthetic_sbox(0, 2);
    nf.apply(&SboxState::render(None, &empty).unwrap()).unwrap();
    let [add0, remove0, _] = one_service_changes(&nf, &empty);
    assert_eq!(reconcile(&nf, &empty).unwrap(), None);

    // Ours: render the changes from the empty table, then one `nft -f -`.
    let state = synthetic_sbox(10_000, 2);
    let start = Instant::now();
    let batch = SboxState::render(Some(&empty), &state).unwrap();
    let rendered = start.elapsed();
    nf.apply(&batch).unwrap();
    let ours = start.elapsed();
    assert_eq!(differences(&nf, &state), Vec::<String>::new());

    // The floor: `nft -f` of the same ruleset as nft itself prints it, into an empty namespace.
    let listed = lab.list("scale", "table ip meshnet");
    lab.run("scale", "nft", &["delete", "table", "ip", "meshnet"]);
    let file = lab.dir.join("ruleset.nft");
    std::fs::write(&file, &listed).unwrap();
    let start = Instant::now();
    lab.run("scale", "nft", &["-f", file.to_str().unwrap()]);
    let floor = start.elapsed();
    std::fs::remove_file(&file).unwrap();

    // A restart: drop and rebuild everything in one transaction over the existing table.
    let start = Instant::now();
    nf.apply(&SboxState::render(None, &state).unwrap()).unwrap();
    let rebuild = start.elapsed();

    let [add, remove, cleanup] = one_service_changes(&nf, &state);
    let start = Instant::now();
    assert_eq!(
        reconcile(&nf, &state).unwrap(),
        None,
        "the table matches after all the updates"
    );
    let check = start.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "B5 10k services x 2 backends from empty: render {:.0} ms, render+apply {:.0} ms, nft -f \
         of the listed ruleset {:.0} ms, R5 {:.2}; full rebuild over the table {:.0} ms",
        ms(rendered),
        ms(ours),
        ms(floor),
        ours.as_secs_f64() / floor.as_secs_f64(),
        ms(rebuild),
    );
    eprintln!(
        "B4 one service (3 backends), p50/max ms: add {:.1}/{:.1} at 10k vs {:.1}/{:.1} at 0 \
         (R4 {:.2}); remove {:.1}/{:.1} vs {:.1}/{:.1} (R4 {:.2}); UDP conntrack cleanup of the \
         3 removed backends {:.1}/{:.1}; reconcile (list + compare) at 10k {:.0} ms",
        add.0,
        add.1,
        add0.0,
        add0.1,
        add.0 / add0.0,
        remove.0,
        remove.1,
        remove0.0,
        remove0.1,
        remove.0 / remove0.0,
        cleanup.0,
        cleanup.1,
        ms(check),
    );
}

#[test]
fn the_nf_tables_generation_moves_with_every_transaction_in_its_namespace_only() {
    let mut lab = Lab::new();
    lab.add("a");
    lab.add("b");
    let (a0, b0) = (
        firewall::generation(lab.ns("a")).unwrap(),
        firewall::generation(lab.ns("b")).unwrap(),
    );
    assert_eq!(
        firewall::generation(lab.ns("a")).unwrap(),
        a0,
        "asking moves nothing"
    );
    lab.run("a", "nft", &["add", "table", "ip", "gen-test"]);
    let a1 = firewall::generation(lab.ns("a")).unwrap();
    assert!(a1 > a0, "{a0} -> {a1}");
    lab.run("a", "nft", &["delete", "table", "ip", "gen-test"]);
    assert!(firewall::generation(lab.ns("a")).unwrap() > a1);
    assert_eq!(firewall::generation(lab.ns("b")).unwrap(), b0);

    // A kept netlink socket tells the same, also after batches of its own.
    let nfnl = NfnlSocket::open(lab.ns("a")).unwrap();
    let a2 = nfnl.generation().unwrap();
    assert_eq!(a2, firewall::generation(lab.ns("a")).unwrap());
    let empty = synthetic_sbox(0, 2);
    sync(&lab.nf("a"), None, &empty).unwrap();
    let one = synthetic_sbox(1, 2);
    let changes = SboxState::changes(&empty, &one).unwrap().unwrap();
    nfnl.apply(&changes).unwrap();
    let a3 = nfnl.generation().unwrap();
    assert!(a3 > a2 + 1, "{a2} -> {a3}");
    assert_eq!(a3, firewall::generation(lab.ns("a")).unwrap());
}

/// `nft -j list table ip meshnet` with every set's elements sorted (a hash set lists its
/// elements in an order of its own) and, with `handles` false, the handles left out.
fn normalized_listing(lab: &Lab, ns: &str, handles: bool) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value, handles: bool) {
        match v {
            serde_json::Value::Object(o) => {
                if !handles {
                    o.remove("handle");
                }
                if let Some(serde_json::Value::Array(elems)) = o.get_mut("elem") {
                    elems.sort_by_key(|e| e.to_string());
                }
                o.values_mut().for_each(|v| walk(v, handles));
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| walk(v, handles)),
            _ => {}
        }
    }
    let json = lab.nf(ns).list_table().unwrap().expect("our table exists");
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    walk(&mut v, handles);
    v
}

fn vip_svc(ports: &[PortKey], backends: &[u8], vip: Option<u8>) -> SboxService {
    SboxService {
        ports: ports.iter().copied().collect(),
        backends: backends
            .iter()
            .map(|b| Ipv4Addr::new(10, 255, 0, *b))
            .collect(),
        vip: vip.map(|v| Ipv4Addr::new(10, 0, 9, v)),
    }
}

/// The same state transitions applied incrementally with `nft -f` in one namespace and over
/// nf_tables netlink (what `sync` does through `NsNetfilter`) in another list exactly the same
/// table, handles included, and the same as a table built from scratch for each state.
#[test]
fn incremental_changes_over_netlink_list_as_with_nft() {
    let mut lab = Lab::new();
    for n in ["txt", "nl", "full"] {
        lab.add(n);
    }
    let m = |v: u32| Fwmark::new(v).unwrap();
    let mut states = Vec::new();
    let mut s = sbox_with(&["b1", "b2"]);
    states.push(("start", s.clone()));
    s.services.insert(
        m(257),
        vip_svc(&[PortKey::udp(5353)], &[20, 21, 22], Some(2)),
    );
    states.push(("add a service", s.clone()));
    s.services.get_mut(&m(256)).unwrap().backends = BACKENDS.iter().map(|(_, ip)| *ip).collect();
    states.push(("add a backend", s.clone()));
    s.services
        .get_mut(&m(257))
        .unwrap()
        .backends
        .remove(&Ipv4Addr::new(10, 255, 0, 21));
    states.push(("remove a backend", s.clone()));
    let svc = s.services.get_mut(&m(256)).unwrap();
    svc.backends.remove(&Ipv4Addr::new(10, 255, 0, 12));
    svc.backends.insert(Ipv4Addr::new(10, 255, 0, 14));
    states.push(("replace a backend", s.clone()));
    s.services
        .get_mut(&m(256))
        .unwrap()
        .ports
        .insert(PortKey::tcp(8080));
    s.services.get_mut(&m(257)).unwrap().ports.clear();
    states.push(("publish and unpublish ports", s.clone()));
    s.services.get_mut(&m(256)).unwrap().vip = Some(Ipv4Addr::new(10, 0, 9, 3));
    s.services.get_mut(&m(257)).unwrap().vip = None;
    states.push(("add and remove VIPs", s.clone()));
    s.services.get_mut(&m(256)).unwrap().vip = None;
    s.services.get_mut(&m(257)).unwrap().vip = Some(Ipv4Addr::new(10, 0, 9, 3));
    states.push(("move a VIP", s.clone()));
    s.services
        .insert(m(258), vip_svc(&[PortKey::tcp(9000)], &[], None));
    states.push(("add a service without backends", s.clone()));
    s.services.get_mut(&m(258)).unwrap().backends = [Ipv4Addr::new(10, 255, 0, 30)].into();
    states.push(("its first backend", s.clone()));
    s.services
        .get_mut(&m(256))
        .unwrap()
        .ports
        .remove(&PortKey::tcp(8080));
    s.services
        .get_mut(&m(258))
        .unwrap()
        .ports
        .insert(PortKey::tcp(8080));
    states.push(("move a port", s.clone()));
    s.services.get_mut(&m(258)).unwrap().backends.clear();
    states.push(("its last backend goes", s.clone()));
    s.services.remove(&m(257));
    states.push(("remove a service", s.clone()));
    s.services.remove(&m(258));
    states.push(("remove a service without backends", s.clone()));

    let (first, rest) = states.split_first().unwrap();
    for ns in ["txt", "nl"] {
        sync(&lab.nf(ns), None, &first.1).unwrap();
    }
    let mut prev = &first.1;
    for (what, next) in rest {
        let changes = SboxState::changes(prev, next)
            .unwrap()
            .expect("incremental");
        assert!(!changes.is_empty(), "{what}: changes nothing");
        lab.nf("txt").apply(&changes.to_batch()).unwrap();
        sync(&lab.nf("nl"), Some(prev), next).unwrap();
        let nl = normalized_listing(&lab, "nl", true);
        assert_eq!(
            nl,
            normalized_listing(&lab, "txt", true),
            "{what}: netlink and nft -f tables differ"
        );
        assert_eq!(
            lab.list("nl", "table ip meshnet"),
            lab.list("txt", "table ip meshnet")
        );
        sync(&lab.nf("full"), None, next).unwrap();
        assert_eq!(
            normalized_listing(&lab, "nl", false),
            normalized_listing(&lab, "full", false),
            "{what}: the incremental table differs from a full build"
        );
        assert_eq!(
            reconcile(&lab.nf("nl"), next).unwrap(),
            None,
            "{what}: drift"
        );
        prev = next;
    }
}

/// A batch that fails changes nothing, and its error names the element at fault; `sync` then
/// rebuilds the table whole.
#[test]
fn a_failed_netlink_batch_changes_nothing_and_names_the_element() {
    let mut lab = Lab::new();
    lab.add("nl");
    let nfnl = OnceLock::new();
    let nf = NsNetfilter::with_nfnl(lab.ns("nl"), &nfnl);
    let applied = sbox_with(&["b1", "b2"]);
    sync(&nf, None, &applied).unwrap();
    let before = lab.list("nl", "table ip meshnet");

    // We believe service 300 is there (it is not) and remove it along with adding 301.
    let mut believed = applied.clone();
    let gone = Fwmark::new(300).unwrap();
    believed
        .services
        .insert(gone, vip_svc(&[PortKey::tcp(9999)], &[], None));
    let mut next = applied.clone();
    next.services.insert(
        Fwmark::new(301).unwrap(),
        vip_svc(&[PortKey::tcp(7000)], &[40], None),
    );
    let changes = SboxState::changes(&believed, &next).unwrap().unwrap();
    let err = nf.apply_changes(&changes).unwrap_err().to_string();
    assert!(
        err.starts_with("delete element ip meshnet published { tcp . 9999 }"),
        "{err}"
    );
    assert!(err.contains("No such file or directory"), "{err}");
    assert_eq!(
        lab.list("nl", "table ip meshnet"),
        before,
        "nothing applied"
    );

    // `sync` rebuilds instead, and says so.
    match sync_report(&nf, Some(&believed), &next).unwrap() {
        Synced::Rebuilt(e) => assert_eq!(e.to_string(), err),
        other => panic!("{other:?}"),
    }
    assert_eq!(reconcile(&nf, &next).unwrap(), None);

    // The same socket goes on with the next batches.
    assert!(matches!(
        sync_report(&nf, Some(&next), &applied).unwrap(),
        Synced::Applied
    ));
    assert_eq!(lab.list("nl", "table ip meshnet"), before);
}

/// 10k services added in one netlink batch (40k commands, elements split over messages that
/// fit, a send buffer grown to the batch): one transaction, and the table is as desired.
#[test]
fn ten_thousand_services_in_one_netlink_batch() {
    let mut lab = Lab::new();
    lab.add("big");
    let nf = lab.nf("big");
    let empty = synthetic_sbox(0, 2);
    sync(&nf, None, &empty).unwrap();
    let gen0 = firewall::generation(lab.ns("big")).unwrap();
    let state = synthetic_sbox(10_000, 2);
    let changes = SboxState::changes(&empty, &state).unwrap().unwrap();
    let start = Instant::now();
    nf.apply_changes(&changes).unwrap();
    eprintln!(
        "10k services x 2 backends over netlink from an empty table: {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(
        firewall::generation(lab.ns("big")).unwrap(),
        gen0 + 1,
        "one transaction"
    );
    assert_eq!(reconcile(&nf, &state).unwrap(), None);
}
