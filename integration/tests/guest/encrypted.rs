//! Encrypted overlays on the guest kernel, which has ESP: traffic of an encrypted network
//! crosses the underlay as ESP only, a plain network beside it stays VXLAN in clear, big
//! transfers fit the lowered MTU, hand-deleted states come back, foreign ones stay, and key
//! rotations under a request loop lose nothing; with an encrypted ingress network the routing
//! mesh answers on every node and crosses between them as ESP only.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etherparse::{
    EtherType, IpNumber, LaxNetSlice, LaxSlicedPacket, LinuxSllProtocolType, LinuxSllSlice,
    TransportSlice,
};
use integration::cluster::{Cluster, ClusterOptions, RECONCILE_INTERVAL};
use netns::Netns;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::api::{NetworkDetail, NodeInfo, TaskInfo};

/// The underlay's 1500 less VXLAN (50) and ESP at most (37).
const ENCRYPTED_MTU: usize = 1413;

fn service(c: &Cluster, name: &str, net: &str) -> Vec<TaskInfo> {
    let tasks = c.hello_service(name, 2, &["--network", net]).unwrap();
    assert_ne!(tasks[0].node, tasks[1].node, "{name}: one task per node");
    tasks
}

fn ip(t: &TaskInfo) -> Ipv4Addr {
    t.endpoints[0].ip()
}

fn ns(t: &TaskInfo) -> Netns {
    Netns::open(Path::new(t.netns.as_deref().unwrap())).unwrap()
}

/// Sends `payload` over TCP from task `from` to task `to` and returns what arrived.
fn tcp_transfer(from: &TaskInfo, to: &TaskInfo, port: u16, payload: &[u8]) -> Vec<u8> {
    let dst = ip(to);
    let listener = ns(to)
        .run(move || TcpListener::bind((dst, port)))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let mut client = ns(from)
        .run(move || TcpStream::connect_timeout(&(dst, port).into(), Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    client.write_all(payload).unwrap();
    drop(client);
    server.join().unwrap()
}

/// Sends one datagram of `len` bytes from `from` to `to` and returns the size received.
fn udp_datagram(from: &TaskInfo, to: &TaskInfo, port: u16, len: usize) -> std::io::Result<usize> {
    let dst = ip(to);
    let rx = ns(to).run(move || UdpSocket::bind((dst, port))).unwrap()?;
    rx.set_read_timeout(Some(Duration::from_secs(5)))?;
    let tx = ns(from).run(|| UdpSocket::bind("0.0.0.0:0")).unwrap()?;
    tx.send_to(&vec![0x5a; len], (dst, port))?;
    let mut buf = vec![0u8; 65536];
    rx.recv(&mut buf)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// (destination, SPI) of every state in a node's namespace, from `ip xfrm state`, sorted.
fn spis(c: &Cluster, node: &str) -> Vec<(String, String)> {
    let out = c.lab.check(node, &["ip", "xfrm", "state"]).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let mut found: Vec<(String, String)> = lines
        .windows(2)
        .filter_map(|w| {
            let dst = w[0].strip_prefix("src ")?.split(" dst ").nth(1)?.trim();
            let spi = w[1].split("spi ").nth(1)?.split_whitespace().next()?;
            Some((dst.to_string(), spi.to_string()))
        })
        .collect();
    found.sort();
    found
}

/// The VXLAN port: the underlay's UDP port of every overlay.
const VXLAN_PORT: u16 = 4789;
/// pcap's link type of Linux cooked captures (v1), what `tcpdump -i any -y LINUX_SLL` writes.
const LINKTYPE_LINUX_SLL: u32 = 113;

/// What a capture saw between two nodes, read with etherparse.
#[derive(Debug, Default)]
struct Tally {
    /// Records in the file.
    records: usize,
    /// ESP packets between the nodes, and their SPIs.
    esp: usize,
    spis: BTreeSet<u32>,
    /// VXLAN packets in clear between the nodes, by VNI.
    vxlan: BTreeMap<u32, usize>,
    /// Other packets between the nodes (a non-first IP fragment, UDP to another port).
    other: usize,
    /// Records whose link or IP header could not be read; and the first such error.
    unreadable: usize,
    first_error: Option<String>,
}

impl Tally {
    /// Reads a whole pcap file (either byte order, micro- or nanosecond stamps) of link type
    /// Linux cooked v1; a record cut short at the end (a capture stopped mid-write) is left out.
    fn of_pcap(pcap: &[u8], nodes: [Ipv4Addr; 2]) -> Result<Tally, String> {
        let head: [u8; 24] = pcap
            .get(..24)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| format!("a pcap file of {} bytes has no header", pcap.len()))?;
        let magic: [u8; 4] = head[..4].try_into().expect("4 bytes");
        let le = match u32::from_le_bytes(magic) {
            0xa1b2_c3d4 | 0xa1b2_3c4d => true,
            _ if matches!(u32::from_be_bytes(magic), 0xa1b2_c3d4 | 0xa1b2_3c4d) => false,
            other => return Err(format!("not a pcap file (magic 0x{other:08x})")),
        };
        let word = |b: &[u8], at: usize| {
            let w: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
            if le {
                u32::from_le_bytes(w)
            } else {
                u32::from_be_bytes(w)
            }
        };
        // The top bits of the link type field carry FCS flags.
        let linktype = word(&head, 20) & 0x0fff_ffff;
        if linktype != LINKTYPE_LINUX_SLL {
            return Err(format!(
                "pcap link type {linktype}, not Linux cooked ({LINKTYPE_LINUX_SLL})"
            ));
        }
        let mut t = Tally::default();
        let mut at = 24;
        while let Some(rec) = pcap.get(at..at + 16) {
            let len = word(rec, 8) as usize;
            let Some(data) = pcap.get(at + 16..at + 16 + len) else {
                break;
            };
            at += 16 + len;
            t.records += 1;
            t.count(data, nodes);
        }
        Ok(t)
    }

    fn count(&mut self, data: &[u8], nodes: [Ipv4Addr; 2]) {
        let sll = match LinuxSllSlice::from_slice(data) {
            Ok(s) => s,
            Err(e) => return self.unreadable(format!("Linux cooked header: {e}")),
        };
        let LinuxSllProtocolType::EtherType(ether_type) = sll.protocol_type() else {
            return;
        };
        // Lax: the capture keeps only each packet's first bytes.
        let packet = LaxSlicedPacket::from_ether_type(ether_type, sll.payload_slice());
        let Some(LaxNetSlice::Ipv4(ip)) = &packet.net else {
            if ether_type == EtherType::IPV4 {
                self.unreadable(format!("IPv4 header: {:?}", packet.stop_err));
            }
            return;
        };
        let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
        if src == dst || !nodes.contains(&src) || !nodes.contains(&dst) {
            return;
        }
        let payload = ip.payload();
        if payload.ip_number == IpNumber::ENCAPSULATING_SECURITY_PAYLOAD {
            self.esp += 1;
            if let Some(spi) = payload.payload.get(..4) {
                self.spis
                    .insert(u32::from_be_bytes(spi.try_into().expect("4 bytes")));
            }
            return;
        }
        if let Some(TransportSlice::Udp(udp)) = &packet.transport {
            let vxlan = udp.payload();
            // The VXLAN header: flags with I (the VNI is valid), 3 reserved bytes, the VNI, 1
            // reserved byte.
            if udp.destination_port() == VXLAN_PORT && vxlan.len() >= 8 && vxlan[0] & 0x08 != 0 {
                let vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
                *self.vxlan.entry(vni).or_default() += 1;
                return;
            }
        }
        self.other += 1;
    }

    fn unreadable(&mut self, error: String) {
        self.unreadable += 1;
        self.first_error.get_or_insert(error);
    }

    fn vxlan_of(&self, vni: u32) -> usize {
        self.vxlan.get(&vni).copied().unwrap_or(0)
    }
}

/// tcpdump on the underlay bridge (the wire between the nodes), raw packets into a pcap file.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(c: &Cluster) -> Capture {
        let file = c.lab.root().join("underlay.pcap");
        let mut cmd = Command::new("tcpdump");
        // Every port of the underlay bridge (a bridge's own device misses what it forwards),
        // in the cooked v1 format etherparse reads; the first 128 bytes of each packet hold
        // every header up to the VNI.
        cmd.args([
            "-i",
            "any",
            "-y",
            "LINUX_SLL",
            "-U",
            "-nn",
            "-s",
            "128",
            "-w",
        ])
        .arg(&file)
        .args(["udp port 4789 or ip proto 50"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = c.lab.underlay().spawn(&mut cmd).unwrap();
        // tcpdump needs a moment to open the device.
        std::thread::sleep(Duration::from_secs(2));
        Capture { child, file }
    }

    /// Stops the capture and counts what it saw between `nodes`.
    fn stop(mut self, nodes: [Ipv4Addr; 2]) -> Tally {
        // Under emulation tcpdump lags behind the traffic, and it stops without draining what
        // the kernel still holds for it: wait until its file stops growing.
        let size = |f: &Path| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = size(&self.file);
        loop {
            std::thread::sleep(Duration::from_secs(2));
            let now = size(&self.file);
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let _ = self.child.wait();
        let pcap = std::fs::read(&self.file).unwrap();
        Tally::of_pcap(&pcap, nodes).unwrap()
    }
}

/// The two nodes' underlay addresses, once each says it can encrypt and has a routing mesh.
fn esp_nodes(c: &Cluster) -> [Ipv4Addr; 2] {
    let mut addrs = Vec::new();
    for node in ["node1", "node2"] {
        let info: NodeInfo = c.json(&["node", "inspect", node]).unwrap();
        assert_eq!(info.node.no_encryption, None, "{node} cannot encrypt");
        assert_eq!(info.no_routing_mesh, None, "{node} has no routing mesh");
        match info.node.addr {
            IpAddr::V4(a) => addrs.push(a),
            other => panic!("{node} has an IPv6 address {other}"),
        }
    }
    addrs.try_into().unwrap()
}

#[test]
fn an_encrypted_network_crosses_the_underlay_as_esp_only() {
    let c = Cluster::up_opts(
        2,
        crate::LB,
        ClusterOptions {
            manager_args: &["--encryption-key-rotation", "12s"],
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    let nodes = esp_nodes(&c);
    c.encrypted_network_create("sec", "10.0.51.0/24").unwrap();
    c.network_create("plain", "10.0.52.0/24").unwrap();
    let vni = |name: &str| {
        let d: NetworkDetail = c.json(&["network", "inspect", name]).unwrap();
        d.network.vni
    };
    let (sec_vni, plain_vni) = (vni("sec"), vni("plain"));
    let sec = service(&c, "secure", "sec");
    let plain = service(&c, "open", "plain");

    // The tasks' MTU leaves room for ESP: the largest unfragmented packet goes through, one
    // byte more is refused at the source.
    let max = (ENCRYPTED_MTU - 28).to_string();
    let over = (ENCRYPTED_MTU - 27).to_string();
    let target = ip(&sec[1]).to_string();
    c.wait_for(Duration::from_secs(20), "a DF ping of the full MTU", |c| {
        let out = c
            .task_exec(
                &sec[0],
                &["ping", "-M", "do", "-c1", "-W2", "-s", &max, &target],
            )
            .ok()?;
        out.status.success().then_some(())
    })
    .unwrap();
    let out = c
        .task_exec(
            &sec[0],
            &["ping", "-M", "do", "-c1", "-W2", "-s", &over, &target],
        )
        .unwrap();
    assert!(
        !out.status.success(),
        "a packet over the MTU was sent whole"
    );

    let capture = Capture::start(&c);
    // The plain network beside it; then on the encrypted one TCP, a transfer of many
    // full-size segments, both ways, and UDP datagrams beyond the MTU.
    let data = payload(2 << 20);
    assert!(tcp_transfer(&plain[0], &plain[1], 9005, &data[..100_000]) == data[..100_000]);
    assert!(tcp_transfer(&sec[0], &sec[1], 9001, &data) == data);
    assert!(tcp_transfer(&sec[1], &sec[0], 9002, &data) == data);
    assert_eq!(udp_datagram(&sec[0], &sec[1], 9003, 4000).unwrap(), 4000);
    assert_eq!(udp_datagram(&sec[1], &sec[0], 9004, 1200).unwrap(), 1200);
    let t = capture.stop(nodes);
    eprintln!(
        "capture: {} records; between the nodes {} ESP packets (SPIs {:x?}), VXLAN in clear: {} of vni {sec_vni} (encrypted), {} of vni {plain_vni} (plain), all {:?}; {} other, {} unreadable",
        t.records,
        t.esp,
        t.spis,
        t.vxlan_of(sec_vni),
        t.vxlan_of(plain_vni),
        t.vxlan,
        t.other,
        t.unreadable
    );
    assert_eq!(t.unreadable, 0, "unreadable packets: {:?}", t.first_error);
    assert!(t.esp > 1000, "too few ESP packets: {t:?}");
    assert_eq!(
        t.vxlan_of(sec_vni),
        0,
        "VXLAN of the encrypted network in clear: {t:?}"
    );
    // GSO carries the plain network's 100 KB in a few dozen packets or fewer (38 in one CI
    // run), more or fewer with the machine's load; ten are far above what ARP alone would give.
    assert!(
        t.vxlan_of(plain_vni) >= 10,
        "the plain network's VXLAN is not in clear: {t:?}"
    );

    // Once the first rotation is through, two keys stay between rotations (the send key and
    // the one before it), in and out for each: four states towards the one peer; three keys
    // during a rotation.
    let ours = c
        .wait_for(Duration::from_secs(40), "a key rotation", |c| {
            let now = spis(c, "node1");
            (now.len() == 4).then_some(now)
        })
        .unwrap();
    // States deleted by hand come back within the reconcile interval (a rotation may have
    // added a key meanwhile: as many or more, never fewer than between rotations); a foreign
    // state is left alone.
    let foreign = ("192.0.2.2".to_string(), "0x00000077".to_string());
    c.lab
        .check(
            "node1",
            &[
                "ip",
                "xfrm",
                "state",
                "add",
                "src",
                "192.0.2.1",
                "dst",
                "192.0.2.2",
                "proto",
                "esp",
                "spi",
                "0x77",
                "reqid",
                "7",
                "mode",
                "transport",
                "aead",
                "rfc4106(gcm(aes))",
                "0x0102030405060708090a0b0c0d0e0f1011121314",
                "128",
            ],
        )
        .unwrap();
    for (dst, spi) in &ours {
        c.lab
            .check(
                "node1",
                &[
                    "ip", "xfrm", "state", "delete", "dst", dst, "proto", "esp", "spi", spi,
                ],
            )
            .unwrap();
    }
    let t = Instant::now();
    c.wait_for(Duration::from_secs(15), "the ESP states back", |c| {
        let now = spis(c, "node1");
        (now.iter().filter(|s| **s != foreign).count() >= ours.len()).then_some(())
    })
    .unwrap();
    eprintln!("states repaired after {:?}", t.elapsed());
    assert!(spis(&c, "node1").contains(&foreign), "a foreign state went");
    assert!(tcp_transfer(&sec[0], &sec[1], 9006, &data[..100_000]) == data[..100_000]);

    // Rotations every 12 s under a steady loop of requests: none fails, the SPIs move on. Each
    // rotation's steps follow the agents' confirmations: a new key is received with before
    // anybody sends with it, and dropped only after nobody does.
    let before = spis(&c, "node2");
    let log_before = std::fs::metadata(c.log_path("manager")).unwrap().len() as usize;
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(30) {
        let chunk = &data[..20_000];
        assert!(
            tcp_transfer(&sec[0], &sec[1], 9100 + (n % 50) as u16, chunk) == chunk,
            "request {n} failed after {:?}",
            start.elapsed()
        );
        n += 1;
    }
    let after = spis(&c, "node2");
    eprintln!("{n} requests across key rotations, SPIs {before:?} -> {after:?}");
    assert_ne!(before, after, "no rotation happened");
    // The rotations' steps during the loop moved on the agents' confirmations (a step waits
    // for an agent that does not confirm 10 s at most: under emulation an agent may take that
    // long to apply an assignment, which is reported, not failed).
    let log = std::fs::read_to_string(c.log_path("manager")).unwrap();
    let during = log.get(log_before..).unwrap_or_default();
    let confirmed = during.matches("every node applied the last step").count();
    let forced = during.matches("without these nodes' confirmation").count();
    eprintln!("key rotation steps during the loop: {confirmed} confirmed by every node, {forced} taken after the timeout");
    assert!(confirmed >= 2, "{confirmed} steps confirmed:\n{during}");
}

/// `mesh-manager --ingress-encrypted`: the routing mesh answers on every node from every task,
/// and between the nodes its traffic is ESP only, no VXLAN in clear for the ingress VNI.
#[test]
fn an_encrypted_ingress_carries_the_routing_mesh_in_esp_only() {
    let mut c = Cluster::up_opts(
        2,
        crate::LB,
        ClusterOptions {
            manager_args: &["--ingress-encrypted"],
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    c.lab
        .add_host("client", Ipv4Addr::new(192, 168, 56, 100))
        .unwrap();
    let nodes = esp_nodes(&c);
    let ingress: NetworkDetail = c.json(&["network", "inspect", "ingress"]).unwrap();
    assert!(ingress.network.encrypted);
    let ingress_vni = ingress.network.vni;
    let tasks = c
        .hello_service("web", 2, &["--publish", "80:8080"])
        .unwrap();
    assert_ne!(tasks[0].node, tasks[1].node, "one task per node");
    // Which node each answer comes from, by the task's ingress address in it.
    let from: BTreeMap<String, Ipv4Addr> = tasks
        .iter()
        .map(|t| {
            let ip = crate::mesh::ingress_ip(t);
            let node = c.lab.node(t.node.as_deref().unwrap()).unwrap().ip;
            (format!("Hello World! from {ip}\n"), node)
        })
        .collect();
    let get = |c: &Cluster, node: Ipv4Addr| -> Option<String> {
        let url = format!("http://{node}:80/");
        let out = c
            .lab
            .exec("client", &["curl", "-s", "--max-time", "5", &url])
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Both nodes answer from both tasks once the mesh is programmed.
    for node in nodes {
        c.wait_for(
            Duration::from_secs(60),
            "the routing mesh from both tasks",
            |c| {
                let seen: BTreeSet<String> = (0..4).filter_map(|_| get(c, node)).collect();
                (seen.len() == 2 && seen.iter().all(|a| from.contains_key(a))).then_some(())
            },
        )
        .unwrap();
    }

    let capture = Capture::start(&c);
    let (mut answered, mut crossed) = (0, 0);
    for node in nodes {
        let mut seen = BTreeSet::new();
        for i in 0..20 {
            let answer = get(&c, node).unwrap_or_else(|| panic!("request {i} to {node} failed"));
            let task_node = from
                .get(&answer)
                .unwrap_or_else(|| panic!("{node} answered {answer:?}"));
            answered += 1;
            crossed += usize::from(*task_node != node);
            seen.insert(answer);
        }
        assert_eq!(seen.len(), 2, "{node} answered from {seen:?}");
    }
    let t = capture.stop(nodes);
    eprintln!(
        "{answered} requests answered, {crossed} by the other node's task; capture: {} records; between the nodes {} ESP packets (SPIs {:x?}), VXLAN in clear: {} of the ingress vni {ingress_vni}, all {:?}; {} other, {} unreadable",
        t.records,
        t.esp,
        t.spis,
        t.vxlan_of(ingress_vni),
        t.vxlan,
        t.other,
        t.unreadable
    );
    assert_eq!(t.unreadable, 0, "unreadable packets: {:?}", t.first_error);
    assert!(
        crossed >= 10,
        "only {crossed} requests crossed to the other node"
    );
    // Each crossing request is at least SYN, SYN-ACK, ACK, the request and the answer.
    assert!(t.esp >= 5 * crossed, "too few ESP packets: {t:?}");
    assert_eq!(t.vxlan_of(ingress_vni), 0, "ingress VXLAN in clear: {t:?}");
    assert!(t.vxlan.is_empty(), "VXLAN in clear: {t:?}");

    // An agent restarted over a right node changes nothing of ESP: the table keeps its rule
    // handles (a rebuild gives new ones) and every state and policy its time of addition.
    let node = tasks[0].node.clone().unwrap();
    let esp_objects = |c: &Cluster| {
        let show = |args: &[&str]| {
            let out = c.lab.exec(&node, args).unwrap();
            assert!(out.status.success(), "{args:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let table = show(&["nft", "-a", "list", "table", "ip", "meshnet_esp"]);
        // Only the times of addition: traffic moves the counters and the times of use.
        let added: Vec<String> = [
            show(&["ip", "-s", "xfrm", "state"]),
            show(&["ip", "-s", "xfrm", "policy"]),
        ]
        .iter()
        .flat_map(|s| s.lines())
        .filter(|l| l.trim_start().starts_with("add ") || !l.starts_with(['\t', ' ']))
        .map(|l| l.split(" use ").next().unwrap_or(l).to_string())
        .collect();
        (table, added)
    };
    let before = esp_objects(&c);
    assert!(before.0.contains("# handle"), "{}", before.0);
    let log = c.log_path(&format!("agent-{node}"));
    let offset = std::fs::metadata(&log).unwrap().len() as usize;
    c.kill_agent(&node, Signal::SIGKILL);
    // Past the second, so that a state added anew would show another time.
    std::thread::sleep(Duration::from_millis(1100));
    c.start_agent(&node).unwrap();
    // The manager's assignment received (keys included: the saved one has none) and applied;
    // then a few reconcile intervals, so that passes with the keys have run whatever pass
    // over the saved assignment was under way when it came.
    c.wait_for(
        Duration::from_secs(60),
        "the manager's assignment applied",
        |_| {
            let text = std::fs::read_to_string(&log).ok()?;
            let rest = text.get(offset..)?;
            let received = rest.find("assignment received")?;
            rest[received..]
                .contains("assignment applied")
                .then_some(())
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(5 * RECONCILE_INTERVAL));
    assert_eq!(esp_objects(&c), before, "the restart changed ESP objects");
    for node in nodes {
        assert!(get(&c, node).is_some_and(|a| from.contains_key(&a)));
    }
}

/// The capture's reader, on packets made here (no root, no guest): ESP and VXLAN by VNI
/// between the two nodes, cut as tcpdump's snap length cuts them, in either byte order.
#[test]
fn a_capture_is_tallied_by_esp_and_vni_between_the_nodes() {
    use etherparse::{LinuxSllPacketType, PacketBuilder};

    let (n1, n2, other) = (
        Ipv4Addr::new(192, 168, 56, 11),
        Ipv4Addr::new(192, 168, 56, 12),
        Ipv4Addr::new(192, 168, 56, 99),
    );
    let sll =
        || PacketBuilder::linux_sll(LinuxSllPacketType::OUTGOING, 6, [2, 0, 0, 0, 0, 1, 0, 0]);
    let vxlan = |src: Ipv4Addr, dst: Ipv4Addr, port: u16, vni: u32| {
        let mut payload = vec![0x08, 0, 0, 0];
        payload.extend_from_slice(&(vni << 8).to_be_bytes());
        // An inner Ethernet frame's worth, past the snap length.
        payload.extend_from_slice(&[0xab; 1400]);
        let mut out = Vec::new();
        sll()
            .ipv4(src.octets(), dst.octets(), 64)
            .udp(40000, port)
            .write(&mut out, &payload)
            .unwrap();
        out
    };
    let esp = |src: Ipv4Addr, dst: Ipv4Addr, spi: u32| {
        let mut payload = spi.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0xcd; 1400]);
        let mut out = Vec::new();
        sll()
            .ipv4(src.octets(), dst.octets(), 64)
            .write(&mut out, IpNumber::ENCAPSULATING_SECURITY_PAYLOAD, &payload)
            .unwrap();
        out
    };
    let packets = [
        esp(n1, n2, 0x1234_5678),
        esp(n2, n1, 0x9abc_def0),
        esp(n1, n2, 0x1234_5678),
        vxlan(n1, n2, VXLAN_PORT, 4097),
        vxlan(n2, n1, VXLAN_PORT, 4097),
        vxlan(n1, n2, VXLAN_PORT, 4098),
        // Not between the two nodes: left out.
        vxlan(n1, other, VXLAN_PORT, 4096),
        esp(other, n2, 0x1111_1111),
        // Between them but neither.
        vxlan(n1, n2, 53, 4096),
    ];
    let pcap = |le: bool, snap: usize| {
        let w = |v: u32| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let h = |v: u16| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let mut f = Vec::new();
        f.extend_from_slice(&w(0xa1b2_c3d4));
        f.extend_from_slice(&h(2));
        f.extend_from_slice(&h(4));
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&w(snap as u32));
        f.extend_from_slice(&w(LINKTYPE_LINUX_SLL));
        for (i, p) in packets.iter().enumerate() {
            let cut = &p[..p.len().min(snap)];
            for v in [i as u32, 0, cut.len() as u32, p.len() as u32] {
                f.extend_from_slice(&w(v));
            }
            f.extend_from_slice(cut);
        }
        f
    };
    for (le, snap) in [(true, 128), (false, 128), (true, 65535)] {
        let mut file = pcap(le, snap);
        // A record cut short by a capture stopped mid-write is not counted.
        file.extend_from_slice(&pcap(le, snap)[24..60]);
        let t = Tally::of_pcap(&file, [n1, n2]).unwrap();
        assert_eq!(t.records, packets.len(), "{t:?}");
        assert_eq!(t.unreadable, 0, "{t:?}");
        assert_eq!(t.esp, 3, "{t:?}");
        assert_eq!(t.spis, BTreeSet::from([0x1234_5678, 0x9abc_def0]), "{t:?}");
        assert_eq!(t.vxlan, BTreeMap::from([(4097, 2), (4098, 1)]), "{t:?}");
        assert_eq!((t.vxlan_of(4096), t.other), (0, 1), "{t:?}");
    }
    let mut ethernet = pcap(true, 128);
    ethernet[20] = 1;
    assert_eq!(
        Tally::of_pcap(&ethernet, [n1, n2]).unwrap_err(),
        "pcap link type 1, not Linux cooked (113)"
    );
    assert!(Tally::of_pcap(b"not a capture at all, no", [n1, n2]).is_err());
}
