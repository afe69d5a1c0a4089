//! The client against a real IPVS, checked with ipvsadm. Runs as root inside the QEMU
//! guest kernel (the host kernel has no IPVS), after `modprobe ip_vs`; every test works in
//! a fresh network namespace of its own and removes it.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ipvs::{
    Client, Destination, Error, Family, Forward, Op, Protocol, Service, ServiceFlags, ServiceKey,
    TimeoutChange, Timeouts,
};
use netns::Netns;

/// A network namespace for one test, deleted when the test ends (also on panic).
struct TestNs {
    ns: Netns,
}

impl TestNs {
    fn new(test: &str) -> TestNs {
        let dir: PathBuf = std::env::temp_dir().join("ipvs-guest-tests");
        let name = format!("{test}-{}", std::process::id());
        TestNs {
            ns: Netns::create(&dir, &name).expect("create the test namespace"),
        }
    }

    /// A client whose socket lives in this namespace.
    fn client(&self) -> Client {
        self.ns
            .run(Client::new)
            .expect("enter the test namespace")
            .expect("open the IPVS client")
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .ns
            .output(Command::new(program).args(args))
            .expect("start the command");
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    fn ipvsadm(&self, args: &[&str]) -> String {
        self.run("ipvsadm", args)
    }

    /// `ipvsadm -R` with `rules` on its standard input.
    fn ipvsadm_restore(&self, rules: &str) {
        let mut child = self
            .ns
            .spawn(
                Command::new("ipvsadm")
                    .arg("-R")
                    .stdin(Stdio::piped())
                    .stderr(Stdio::piped()),
            )
            .expect("start ipvsadm -R");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .expect("write the rules");
        let out = child.wait_with_output().expect("wait for ipvsadm -R");
        assert!(
            out.status.success(),
            "ipvsadm -R: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        netns::delete(self.ns.path()).expect("delete the test namespace");
    }
}

type Table = Vec<(Service, Vec<Destination>)>;

fn sorted(mut table: Table) -> Table {
    for (_, dests) in &mut table {
        dests.sort_by_key(|d| d.addr);
    }
    table.sort_by_key(|(s, _)| format!("{:?}", s.key));
    table
}

/// The whole table as the client reads it (settings only, counters left out).
fn read_table(c: &mut Client) -> Table {
    let services = c.services().expect("list services");
    let table = services
        .into_iter()
        .map(|e| {
            let dests = match c.destinations(&e.service.key) {
                Ok(d) => d.into_iter().map(|d| d.destination).collect(),
                Err(e) => panic!("{e}"),
            };
            (e.service, dests)
        })
        .collect();
    sorted(table)
}

/// `ipvsadm -Ln [extra]` as blocks (a service line, then its destination lines) with
/// whitespace collapsed, sorted so that the kernel's and ipvsadm's orders do not matter.
fn ipvsadm_blocks(t: &TestNs, extra: &[&str]) -> Vec<Vec<String>> {
    let out = t.ipvsadm(&[&["-Ln"], extra].concat());
    let mut blocks: Vec<Vec<String>> = Vec::new();
    for line in out.lines().skip(3) {
        let words = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.starts_with("  ->") {
            blocks.last_mut().expect("a service line first").push(words);
        } else {
            blocks.push(vec![words]);
        }
    }
    sort_blocks(blocks)
}

fn sort_blocks(mut blocks: Vec<Vec<String>>) -> Vec<Vec<String>> {
    for b in &mut blocks {
        b[1..].sort();
    }
    blocks.sort();
    blocks
}

fn forward_name(f: Forward) -> &'static str {
    match f {
        Forward::Masq => "Masq",
        Forward::Local => "Local",
        Forward::Tunnel => "Tunnel",
        Forward::DirectRoute => "Route",
    }
}

/// How `ipvsadm -Ln` prints a service (for the flags these tests use).
fn service_line(s: &Service) -> String {
    let mut line = format!("{} {}", s.key, s.scheduler);
    if s.flags.contains(ServiceFlags::PERSISTENT) {
        line += &format!(" persistent {}", s.timeout);
        match s.key.family() {
            Family::Ipv4 if s.netmask != 32 => {
                let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(s.netmask)));
                line += &format!(" mask {mask}");
            }
            Family::Ipv6 if s.netmask != 128 => line += &format!(" mask {}", s.netmask),
            _ => {}
        }
    }
    line
}

/// What `ipvsadm -Ln` should print for `table` (no connections, so 0 active/inactive).
fn expected_blocks(table: &Table) -> Vec<Vec<String>> {
    let blocks =
        table
            .iter()
            .map(|(s, dests)| {
                let mut b = vec![service_line(s)];
                b.extend(dests.iter().map(|d| {
                    format!("-> {} {} {} 0 0", d.addr, forward_name(d.forward), d.weight)
                }));
                b
            })
            .collect();
    sort_blocks(blocks)
}

/// Checks the kernel's table against `table`, both through the client and through ipvsadm.
fn check(t: &TestNs, c: &mut Client, table: &Table) {
    let table = sorted(table.clone());
    assert_eq!(read_table(c), table, "the client's read-back");
    assert_eq!(
        ipvsadm_blocks(t, &[]),
        expected_blocks(&table),
        "ipvsadm -Ln"
    );
}

fn fwm(family: Family, mark: u32) -> ServiceKey {
    ServiceKey::Fwmark { family, mark }
}

fn addr_key(protocol: Protocol, addr: &str) -> ServiceKey {
    ServiceKey::Addr {
        protocol,
        addr: addr.parse().unwrap(),
    }
}

fn dest(addr: &str, forward: Forward, weight: u32) -> Destination {
    Destination::new(addr.parse().unwrap(), forward, weight)
}

fn persistent(key: ServiceKey, scheduler: &str, timeout: u32, netmask: u8) -> Service {
    Service {
        flags: ServiceFlags::PERSISTENT,
        timeout,
        netmask,
        ..Service::new(key, scheduler)
    }
}

fn timeouts_from_ipvsadm(t: &TestNs) -> Timeouts {
    let out = t.ipvsadm(&["-Ln", "--timeout"]);
    let nums: Vec<u32> = out
        .trim()
        .strip_prefix("Timeout (tcp tcpfin udp): ")
        .expect("ipvsadm --timeout line")
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    Timeouts {
        tcp: nums[0],
        tcp_fin: nums[1],
        udp: nums[2],
    }
}

#[test]
fn every_operation_matches_ipvsadm() {
    let t = TestNs::new("ops");
    let mut c = t.client();

    let info = c.info().unwrap();
    let (a, b, p) = info.version;
    assert_eq!(
        t.ipvsadm(&["-Ln"]).lines().next().unwrap(),
        format!(
            "IP Virtual Server version {a}.{b}.{p} (size={})",
            info.conn_table_size
        )
    );
    check(&t, &mut c, &Vec::new());

    let fwm4 = Service::new(fwm(Family::Ipv4, 256), "rr");
    let fwm6 = Service::new(fwm(Family::Ipv6, 257), "lc");
    let tcp4 = persistent(addr_key(Protocol::Tcp, "10.0.0.1:80"), "wrr", 300, 24);
    let udp6 = persistent(addr_key(Protocol::Udp, "[2001:db8::1]:53"), "sh", 60, 64);
    let sctp = Service::new(addr_key(Protocol::Sctp, "10.0.0.2:9000"), "rr");
    let mut table: Table = Vec::new();
    for s in [&fwm4, &fwm6, &tcp4, &udp6, &sctp] {
        c.add_service(s).unwrap();
        table.push((s.clone(), Vec::new()));
    }
    check(&t, &mut c, &table);

    let dests = [
        vec![
            dest("10.255.0.5:0", Forward::Masq, 1),
            dest("10.255.0.6:0", Forward::Masq, 1),
        ],
        vec![dest("[2001:db8::5]:0", Forward::Masq, 3)],
        vec![Destination {
            upper_threshold: 100,
            lower_threshold: 10,
            ..dest("10.0.1.2:80", Forward::DirectRoute, 5)
        }],
        vec![dest("[2001:db8::2]:53", Forward::Tunnel, 2)],
        vec![dest("10.0.1.3:9000", Forward::Masq, 1)],
    ];
    for ((s, ds), want) in table.iter_mut().zip(dests) {
        for d in want {
            c.add_destination(&s.key, &d).unwrap();
            ds.push(d);
        }
    }
    check(&t, &mut c, &table);
    let thresholds = t.ipvsadm(&["-Ln", "--thresholds", "-t", "10.0.0.1:80"]);
    let line = thresholds
        .lines()
        .find(|l| l.contains("10.0.1.2:80"))
        .unwrap();
    // "  -> 10.0.1.2:80   100   10   0   0": upper, lower, active, inactive.
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>()[2..4],
        ["100", "10"]
    );

    // Update services: another scheduler, timeout and netmask; persistence off.
    let tcp4b = persistent(tcp4.key, "rr", 600, 32);
    c.update_service(&tcp4b).unwrap();
    table[2].0 = tcp4b.clone();
    let udp6b = Service::new(udp6.key, "sh");
    c.update_service(&udp6b).unwrap();
    table[3].0 = udp6b;
    check(&t, &mut c, &table);
    assert_eq!(c.get_service(&tcp4.key).unwrap().service, tcp4b);

    // Drain one task (weight 0), change forwarding and thresholds of another.
    let drained = Destination {
        weight: 0,
        ..table[0].1[0]
    };
    c.update_destination(&fwm4.key, &drained).unwrap();
    table[0].1[0] = drained;
    let changed = Destination {
        forward: Forward::Tunnel,
        upper_threshold: 0,
        lower_threshold: 0,
        weight: 9,
        ..table[2].1[0]
    };
    c.update_destination(&tcp4.key, &changed).unwrap();
    table[2].1[0] = changed;
    check(&t, &mut c, &table);

    // Delete a destination, then a whole service.
    let gone = table[0].1.remove(1);
    c.delete_destination(&fwm4.key, gone.addr).unwrap();
    check(&t, &mut c, &table);
    c.delete_service(&sctp.key).unwrap();
    table.pop();
    check(&t, &mut c, &table);

    // Timeouts: None leaves tcpfin as it was.
    let before = c.timeouts().unwrap();
    assert_eq!(before, timeouts_from_ipvsadm(&t));
    c.set_timeouts(&TimeoutChange {
        tcp: NonZeroU32::new(1000),
        tcp_fin: None,
        udp: NonZeroU32::new(45),
    })
    .unwrap();
    let after = Timeouts {
        tcp: 1000,
        tcp_fin: before.tcp_fin,
        udp: 45,
    };
    assert_eq!(timeouts_from_ipvsadm(&t), after);
    assert_eq!(c.timeouts().unwrap(), after);

    c.flush().unwrap();
    check(&t, &mut c, &Vec::new());
}

#[test]
fn counters_match_ipvsadm_stats() {
    let t = TestNs::new("stats");
    t.run("ip", &["addr", "add", "10.0.0.1/32", "dev", "lo"]);
    let mut c = t.client();
    let key = addr_key(Protocol::Tcp, "10.0.0.1:80");
    c.add_service(&Service::new(key, "rr")).unwrap();
    c.add_destination(&key, &dest("127.0.0.1:8080", Forward::Masq, 1))
        .unwrap();
    // Two connections, refused by the empty 127.0.0.1:8080: packets both ways.
    for _ in 0..2 {
        let vip: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let res =
            t.ns.run(|| TcpStream::connect_timeout(&vip, Duration::from_secs(5)))
                .unwrap();
        assert!(res.is_err(), "nothing listens behind the service");
    }
    // The kernel folds per-CPU counters into the totals every 2 s.
    std::thread::sleep(Duration::from_secs(3));

    let svc = c.get_service(&key).unwrap();
    let dests = c.destinations(&key).unwrap();
    assert_eq!(svc.stats.conns, 2);
    assert_eq!(dests[0].stats.conns, 2);
    assert_eq!(dests[0].inactive_conns + dests[0].active_conns, 2);
    let counts = |s: &ipvs::Stats| {
        format!(
            "{} {} {} {} {}",
            s.conns, s.in_packets, s.out_packets, s.in_bytes, s.out_bytes
        )
    };
    let want = vec![vec![
        format!("{key} {}", counts(&svc.stats)),
        format!(
            "-> {} {}",
            dests[0].destination.addr,
            counts(&dests[0].stats)
        ),
    ]];
    assert_eq!(ipvsadm_blocks(&t, &["--stats"]), want);
    // The listing reports the same counters as the single-service query (not the same rates:
    // the kernel's estimator may tick between the two queries).
    assert_eq!(counts(&c.services().unwrap()[0].stats), counts(&svc.stats));
}

#[test]
fn reads_rules_made_by_ipvsadm_exactly() {
    let t = TestNs::new("restore");
    t.ipvsadm_restore(
        "-A -t 10.1.0.1:80 -s wlc
-a -t 10.1.0.1:80 -r 10.1.1.1:8080 -m -w 3
-a -t 10.1.0.1:80 -r 10.1.1.2:8080 -m -w 0 -x 50 -y 5
-A -u 10.1.0.1:53 -s rr -o
-a -u 10.1.0.1:53 -r 10.1.1.3:53 -g -w 1
-A -f 300 -s sh -b sh-fallback,sh-port
-a -f 300 -r 10.1.1.4:0 -i -w 7
-A -f 301 -6 -s rr -p 120 -M 96
-a -f 301 -6 -r [2001:db8::10]:0 -m -w 1
-A -t [2001:db8::1]:443 -s lc -p
-a -t [2001:db8::1]:443 -r [2001:db8::20]:443 -m -w 2
-a -t [2001:db8::1]:443 -r [2001:db8::21]:443 -g -w 65535
-A --sctp-service 10.1.0.2:9000 -s rr -p 30 -M 255.255.0.0
",
    );
    let tcp = addr_key(Protocol::Tcp, "10.1.0.1:80");
    let udp = addr_key(Protocol::Udp, "10.1.0.1:53");
    let tcp6 = addr_key(Protocol::Tcp, "[2001:db8::1]:443");
    let want: Table = vec![
        (
            Service::new(tcp, "wlc"),
            vec![
                dest("10.1.1.1:8080", Forward::Masq, 3),
                Destination {
                    upper_threshold: 50,
                    lower_threshold: 5,
                    ..dest("10.1.1.2:8080", Forward::Masq, 0)
                },
            ],
        ),
        (
            Service {
                flags: ServiceFlags::ONEPACKET,
                ..Service::new(udp, "rr")
            },
            vec![dest("10.1.1.3:53", Forward::DirectRoute, 1)],
        ),
        (
            Service {
                flags: ServiceFlags::SCHED1 | ServiceFlags::SCHED2,
                ..Service::new(fwm(Family::Ipv4, 300), "sh")
            },
            vec![dest("10.1.1.4:0", Forward::Tunnel, 7)],
        ),
        (
            persistent(fwm(Family::Ipv6, 301), "rr", 120, 96),
            vec![dest("[2001:db8::10]:0", Forward::Masq, 1)],
        ),
        (
            // ipvsadm's default persistence timeout (-p without a value) is 360 s.
            persistent(tcp6, "lc", 360, 128),
            vec![
                dest("[2001:db8::20]:443", Forward::Masq, 2),
                dest("[2001:db8::21]:443", Forward::DirectRoute, 65535),
            ],
        ),
        (
            persistent(addr_key(Protocol::Sctp, "10.1.0.2:9000"), "rr", 30, 16),
            Vec::new(),
        ),
    ];
    let mut c = t.client();
    assert_eq!(read_table(&mut c), sorted(want));
}

#[test]
fn ten_thousand_services_with_two_destinations_dump_back_exactly() {
    const N: u32 = 10_000;
    let t = TestNs::new("10k");
    let mut c = t.client();
    let octets = |i: u32| (i >> 8 & 0xff, i & 0xff);
    let table: Table = (0..N)
        .map(|i| {
            let (x, y) = octets(i);
            let (key, port) = if i % 2 == 0 {
                (fwm(Family::Ipv4, 1000 + i), 0)
            } else {
                (addr_key(Protocol::Tcp, &format!("10.1.{x}.{y}:80")), 8080)
            };
            let dests = [16, 17]
                .map(|net| {
                    dest(
                        &format!("172.{net}.{x}.{y}:{port}"),
                        Forward::Masq,
                        i % 5 + 1,
                    )
                })
                .to_vec();
            (Service::new(key, "rr"), dests)
        })
        .collect();
    let ops: Vec<Op> = table
        .iter()
        .flat_map(|(s, ds)| {
            std::iter::once(Op::AddService(s))
                .chain(ds.iter().map(|d| Op::AddDestination(&s.key, d)))
        })
        .collect();
    c.apply(&ops).unwrap();

    let table = sorted(table);
    assert_eq!(read_table(&mut c), table);
    assert_eq!(ipvsadm_blocks(&t, &[]), expected_blocks(&table));
}

#[test]
fn errors_are_typed_and_name_the_object() {
    let t = TestNs::new("errors");
    let mut c = t.client();
    let missing = addr_key(Protocol::Tcp, "10.9.9.9:80");
    let d = dest("10.0.0.2:0", Forward::Masq, 1);

    // A missing service.
    let e = c.get_service(&missing).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotFound {
                errno: libc::ESRCH,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "get service TCP 10.9.9.9:80: No such process (errno 3)"
    );
    let e = c.delete_service(&missing).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    let e = c.add_destination(&missing, &d).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "add destination 10.0.0.2:0 to service TCP 10.9.9.9:80: No such process (errno 3)"
    );
    let e = c.destinations(&missing).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    let e = c.update_service(&Service::new(missing, "rr")).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");

    // Duplicates.
    let key = fwm(Family::Ipv4, 256);
    let svc = Service::new(key, "rr");
    c.add_service(&svc).unwrap();
    let e = c.add_service(&svc).unwrap_err();
    assert!(matches!(e, Error::Exists { .. }), "{e:?}");
    c.add_destination(&key, &d).unwrap();
    let e = c.add_destination(&key, &d).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Exists {
                errno: libc::EEXIST,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "add destination 10.0.0.2:0 to service FWM 256: File exists (errno 17)"
    );

    // A missing destination of an existing service.
    let other = dest("10.0.0.3:0", Forward::Masq, 1);
    let e = c.update_destination(&key, &other).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotFound {
                errno: libc::ENOENT,
                ..
            }
        ),
        "{e:?}"
    );
    let e = c.delete_destination(&key, other.addr).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");

    // An unknown scheduler, on add and on update.
    let bogus = Service::new(addr_key(Protocol::Tcp, "10.0.0.9:80"), "bogus");
    let e = c.add_service(&bogus).unwrap_err();
    assert!(
        matches!(&e, Error::UnknownScheduler { scheduler, errno: libc::ENOENT, .. } if scheduler == "bogus"),
        "{e:?}"
    );
    let e = c.update_service(&Service::new(key, "bogus")).unwrap_err();
    assert!(matches!(e, Error::UnknownScheduler { .. }), "{e:?}");

    // Invalid input is refused before anything is sent.
    let long = Service::new(
        addr_key(Protocol::Tcp, "10.0.0.8:80"),
        "a-very-long-scheduler",
    );
    let e = c
        .apply(&[Op::AddService(&svc), Op::AddService(&long)])
        .unwrap_err();
    assert_eq!(e.failures.len(), 1);
    assert!(matches!(e.failures[0], (1, Error::Invalid { .. })), "{e:?}");

    // A batch carries on past a failure and reports it by index.
    let d2 = dest("10.0.0.4:0", Forward::Masq, 1);
    let e = c
        .apply(&[Op::AddDestination(&key, &d), Op::AddDestination(&key, &d2)])
        .unwrap_err();
    assert_eq!(e.total, 2);
    assert_eq!(e.failures.len(), 1);
    assert!(matches!(e.failures[0], (0, Error::Exists { .. })), "{e:?}");
    let now: Vec<_> = c
        .destinations(&key)
        .unwrap()
        .into_iter()
        .map(|d| d.destination.addr)
        .collect();
    assert_eq!(now.len(), 2);
    assert!(now.contains(&d.addr) && now.contains(&d2.addr));
    assert_eq!(read_table(&mut c).len(), 1, "nothing else was created");
}
