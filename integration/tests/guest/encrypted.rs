//! Encrypted overlays on the guest kernel, which has ESP: traffic of an encrypted network
//! crosses the underlay as ESP only, a plain network beside it stays VXLAN in clear, big
//! transfers fit the lowered MTU, hand-deleted states come back, foreign ones stay, and key
//! rotations under a request loop lose nothing.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::cluster::{Cluster, ClusterOptions};
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

/// The VNI a tcpdump line shows VXLAN of, if any.
fn vni_of(line: &str) -> Option<u32> {
    let rest = line.split("vni ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// tcpdump on the underlay bridge (the wire between the nodes), as text once stopped.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(c: &Cluster) -> Capture {
        let file = c.lab.root().join("underlay.pcap");
        let mut cmd = Command::new("tcpdump");
        // Every port of the underlay bridge (a bridge's own device misses what it forwards).
        cmd.args(["-i", "any", "-U", "-nn", "-s", "128", "-w"])
            .arg(&file)
            .args(["udp port 4789 or ip proto 50"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = c.lab.underlay().spawn(&mut cmd).unwrap();
        // tcpdump needs a moment to open the device.
        std::thread::sleep(Duration::from_secs(2));
        Capture { child, file }
    }

    fn stop(mut self) -> String {
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
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
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
    for node in ["node1", "node2"] {
        let info: NodeInfo = c.json(&["node", "inspect", node]).unwrap();
        assert_eq!(info.node.no_encryption, None, "{node} cannot encrypt");
    }
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
    let text = capture.stop();
    let esp = text.lines().filter(|l| l.contains(": ESP(spi=")).count();
    let sec_clear = text.lines().filter(|l| vni_of(l) == Some(sec_vni)).count();
    let plain_clear = text
        .lines()
        .filter(|l| vni_of(l) == Some(plain_vni))
        .count();
    eprintln!("capture: {esp} ESP packets, VXLAN in clear: {sec_clear} of vni {sec_vni} (encrypted), {plain_clear} of vni {plain_vni} (plain)");
    assert!(esp > 1000, "too few ESP packets ({esp}):\n{}", head(&text));
    assert_eq!(
        sec_clear,
        0,
        "VXLAN of the encrypted network in clear:\n{}",
        head(&text)
    );
    assert!(
        plain_clear > 50,
        "the plain network's VXLAN is not in clear:\n{}",
        head(&text)
    );

    // States deleted by hand come back within the reconcile interval (a rotation may have
    // added a key meanwhile: as many or more); a foreign state is left alone.
    let foreign = ("192.0.2.2".to_string(), "0x00000077".to_string());
    let ours = spis(&c, "node1");
    assert!(
        ours.len() >= 4,
        "in and out for each of at least 2 keys: {ours:?}"
    );
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

    // Rotations every 12 s under a steady loop of requests: none fails, the SPIs move on.
    let before = spis(&c, "node2");
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
}

/// The capture's first lines other than ESP, for a failing assertion's message.
fn head(text: &str) -> String {
    let other: Vec<&str> = text.lines().filter(|l| !l.contains(": ESP(")).collect();
    format!(
        "{} lines, {} not ESP; first of those:\n{}",
        text.lines().count(),
        other.len(),
        other
            .iter()
            .take(20)
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    )
}
