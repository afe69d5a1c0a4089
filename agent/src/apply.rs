//! Kernel effects behind the [`Kernel`] trait: reading what the agent owns and applying one
//! planned action. The real implementation, [`NetKernel`], uses the `vxlan` crate (netlink on a
//! dedicated thread inside each namespace) and `netns`, so no thread of the agent, and no tokio
//! worker, ever changes namespace.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use netns::Netns;
use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::warn;
use vxlan::{BridgeConfig, EndpointConfig, MacAddr, Sandbox, VxlanConfig};

use crate::mesh::NodeNets;
use crate::names::{BRIDGE, GWBRIDGE, VXLAN};
use crate::observe::{NsObs, Observed};
use crate::plan::Action;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error(transparent)]
    Overlay(#[from] vxlan::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0:?} is a task action, not a kernel one")]
    NotKernel(Box<Action>),
}

/// Reads and changes the kernel objects the agent owns.
pub trait Kernel: Send + Sync + 'static {
    fn observe(&self) -> Result<Observed, KernelError> {
        self.observe_reusing(&BTreeMap::new())
    }
    /// [`Kernel::observe`], taking the observation of each namespace in `reuse` as it is
    /// where the namespace's inode is still the same, instead of reading it.
    fn observe_reusing(&self, reuse: &BTreeMap<String, NsObs>) -> Result<Observed, KernelError>;
    /// The node's own addresses and routes, which our subnets must not clash with.
    fn node_nets(&self) -> Result<NodeNets, KernelError>;
    /// Applies one kernel action (every [`Action`] but the task ones).
    fn apply(&self, action: &Action) -> Result<(), KernelError>;
}

/// The kernel, through the `vxlan` and `netns` crates.
pub struct NetKernel {
    dir: PathBuf,
    /// The node (underlay) namespace, where VXLAN devices are created.
    node: Netns,
}

impl NetKernel {
    /// `dir` holds the agent's namespace files; `node` is the underlay namespace.
    pub fn new(dir: &Path, node: Netns) -> NetKernel {
        NetKernel {
            dir: dir.to_path_buf(),
            node,
        }
    }

    fn sandbox(&self, name: &str) -> Result<Sandbox, KernelError> {
        Ok(Sandbox::open(&self.dir, name)?)
    }

    /// The node namespace as a sandbox: the gwbridge and the node ends of legs live there.
    fn node_sandbox(&self) -> Result<Sandbox, KernelError> {
        let path = self.node.path();
        let dir = path.parent().unwrap_or(Path::new("/"));
        Ok(Sandbox::open(dir, &self.node.name())?)
    }

    /// A task's leg on the gwbridge and its default route through it.
    fn gw_leg(
        &self,
        task: &str,
        cfg: EndpointConfig,
        gateway: Ipv4Addr,
    ) -> Result<(), KernelError> {
        let ns = Netns::open(&self.dir.join(task))?;
        self.node_sandbox()?.ensure_endpoint(&ns, &cfg)?;
        self.default_route(task, &cfg.ifname, gateway)
    }

    fn default_route(
        &self,
        task: &str,
        ifname: &str,
        gateway: Ipv4Addr,
    ) -> Result<(), KernelError> {
        Ok(self.sandbox(task)?.ensure_default_route(ifname, gateway)?)
    }

    /// Binds the running process's namespace to the task's file again.
    fn rebind(&self, task: &str, pid: u32) -> Result<(), KernelError> {
        let path = self.dir.join(task);
        netns::delete(&path)?;
        let io = |op| {
            let path = path.clone();
            move |source| KernelError::Io { op, path, source }
        };
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)
            .map_err(io("create file for"))?;
        let src = format!("/proc/{pid}/ns/net");
        mount(
            Some(src.as_str()),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| io("bind-mount the task's namespace to")(io::Error::from(e)))
        .inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })
    }

    fn delete_netns(&self, name: &str) -> Result<(), KernelError> {
        if let Ok(ns) = Netns::open(&self.dir.join(name)) {
            // Only what runs inside our own namespace: processes we lost track of in a crash.
            for pid in ns.pids()? {
                warn!(netns = %name, pid, "killing a leftover process in a stale namespace");
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        // Deletes VXLAN devices first: they would hold their VNI while anything holds the netns.
        Ok(vxlan::delete_sandbox(&self.dir, name)?)
    }
}

impl Kernel for NetKernel {
    fn observe_reusing(&self, reuse: &BTreeMap<String, NsObs>) -> Result<Observed, KernelError> {
        let mut out = Observed::default();
        for path in netns::list(&self.dir)? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let sandbox = match Sandbox::open(&self.dir, &name) {
                Ok(s) => s,
                // Deleted between listing and opening: it is simply not there.
                Err(_) if !path.exists() => continue,
                Err(e) => return Err(e.into()),
            };
            let inode = sandbox.netns().inode()?;
            let obs = match reuse.get(&name) {
                Some(kept) if kept.inode == inode => kept.clone(),
                _ => NsObs::new(inode, sandbox.observe()?),
            };
            out.namespaces.insert(name, obs);
        }
        // Of the node's links, only ours: the gwbridge and the `mgw` legs on it.
        let node = self.node_sandbox()?;
        let mut seen = node.observe()?;
        seen.links.retain(|l| {
            l.name == GWBRIDGE
                || (l.name.starts_with("mgw") && matches!(l.kind, vxlan::LinkKind::Veth { .. }))
        });
        seen.neighs.clear();
        seen.fdb.clear();
        seen.routes.clear();
        out.node = NsObs::new(node.netns().inode()?, seen);
        Ok(out)
    }

    fn node_nets(&self) -> Result<NodeNets, KernelError> {
        Ok(NodeNets::new(&self.node_sandbox()?.observe()?))
    }

    fn apply(&self, action: &Action) -> Result<(), KernelError> {
        use Action::*;
        match action {
            DeleteNetns { name } => self.delete_netns(name),
            DeleteLink { netns, link } => Ok(self.sandbox(netns)?.remove_endpoint(link)?),
            CreateNetns { name } => Ok(Netns::open_or_create(&self.dir, name).map(drop)?),
            RebindNetns { task, pid } => self.rebind(task, *pid),
            EnsureBridge {
                sandbox,
                gateway,
                mtu,
            } => Ok(self
                .sandbox(sandbox)?
                .ensure_bridge(&BridgeConfig::new(*gateway, *mtu))?),
            EnsureVxlan {
                sandbox,
                vni,
                port,
                mtu,
            } => {
                let cfg = VxlanConfig {
                    port: *port,
                    ..VxlanConfig::new(*vni, *mtu)
                };
                Ok(self.sandbox(sandbox)?.ensure_vxlan(&self.node, &cfg)?)
            }
            Peers { sandbox, changes } => Ok(self.sandbox(sandbox)?.apply_peers(VXLAN, changes)?),
            EnsureEndpoint {
                sandbox,
                veth,
                task,
                ifname,
                mac,
                addr,
                mtu,
                aliases,
            } => {
                let cfg = EndpointConfig {
                    bridge: BRIDGE.into(),
                    host_ifname: veth.clone(),
                    ifname: ifname.clone(),
                    addr: *addr,
                    mac: *mac,
                    mtu: *mtu,
                    aliases: aliases.clone(),
                };
                let task = Netns::open(&self.dir.join(task))?;
                Ok(self.sandbox(sandbox)?.ensure_endpoint(&task, &cfg)?)
            }
            EnsureGwBridge { gateway, mtu } => {
                let cfg = BridgeConfig {
                    name: GWBRIDGE.into(),
                    ..BridgeConfig::new(*gateway, *mtu)
                };
                Ok(self.node_sandbox()?.ensure_bridge(&cfg)?)
            }
            EnsureGwLeg {
                veth,
                task,
                ifname,
                addr,
                gateway,
                mtu,
            } => {
                let cfg = EndpointConfig {
                    bridge: GWBRIDGE.into(),
                    host_ifname: veth.clone(),
                    ifname: ifname.clone(),
                    addr: *addr,
                    mac: MacAddr::from_ipv4(addr.addr()),
                    mtu: *mtu,
                    aliases: Vec::new(),
                };
                self.gw_leg(task, cfg, *gateway)
            }
            EnsureDefaultRoute {
                task,
                ifname,
                gateway,
            } => self.default_route(task, ifname, *gateway),
            DeleteNodeLink { link } => Ok(self.node_sandbox()?.remove_endpoint(link)?),
            StopTask { .. } | ForgetTask { .. } | StartTask { .. } => {
                Err(KernelError::NotKernel(Box::new(action.clone())))
            }
        }
    }
}

/// An in-memory kernel for tests: applies actions to an [`Observed`] the way the kernel would,
/// including veth pairs dying together and a namespace taking its links with it.
#[cfg(test)]
pub mod fake {
    use std::sync::Mutex;

    use super::*;
    use vxlan::{
        FdbEntry, FdbOwner, LinkKind, LinkState, NeighEntry, PeerAction, RouteEntry, VxlanState,
    };

    #[derive(Default)]
    pub struct FakeKernel {
        pub state: Mutex<Observed>,
        next: Mutex<u64>,
    }

    impl FakeKernel {
        fn next(&self) -> u64 {
            let mut n = self.next.lock().unwrap();
            *n += 1;
            1000 + *n
        }

        fn link(&self, name: &str, kind: LinkKind, mtu: u32) -> LinkState {
            LinkState {
                name: name.into(),
                index: self.next() as u32,
                mtu,
                up: true,
                mac: None,
                master: None,
                addrs: vec![],
                kind,
            }
        }

        /// A veth pair: `outer` in `master`, `inner` with its MAC and address.
        fn veth_pair(
            &self,
            (outer, master): (&str, &str),
            (inner, mac, addr): (&str, MacAddr, ipnet::Ipv4Net),
            mtu: u32,
        ) -> (LinkState, LinkState) {
            let (oi, ii) = (self.next() as u32, self.next() as u32);
            let mut o = self.link(
                outer,
                LinkKind::Veth {
                    peer_index: Some(ii),
                },
                mtu,
            );
            o.index = oi;
            o.master = Some(master.into());
            let mut i = self.link(
                inner,
                LinkKind::Veth {
                    peer_index: Some(oi),
                },
                mtu,
            );
            i.index = ii;
            i.mac = Some(mac);
            i.addrs = vec![addr];
            (o, i)
        }

        fn ns<'a>(st: &'a mut Observed, name: &str) -> Result<&'a mut NsObs, KernelError> {
            st.namespaces
                .get_mut(name)
                .ok_or_else(|| KernelError::Netns(netns::Error::NotANamespace(name.into())))
        }

        /// Removes a link, and its veth peer (found by index) with it.
        pub fn remove_link(&self, ns: &str, name: &str) {
            let mut st = self.state.lock().unwrap();
            let Some(l) = st.namespaces.get_mut(ns).and_then(|n| n.links.remove(name)) else {
                return;
            };
            let n = st.namespaces.get_mut(ns).unwrap();
            // Routes out of a link go with it.
            n.routes.retain(|r| r.dev.as_deref() != Some(name));
            if name == VXLAN {
                n.neighs.clear();
                n.fdb.clear();
            }
            // A bridge's ports lose their master with it.
            for port in n.links.values_mut() {
                if port.master.as_deref() == Some(name) {
                    port.master = None;
                }
            }
            if let LinkKind::Veth {
                peer_index: Some(p),
            } = l.kind
            {
                for n in st.namespaces.values_mut() {
                    remove_index(n, p);
                }
                st.node.links.retain(|_, other| other.index != p);
            }
        }

        /// Removes one of the agent's links in the node namespace, and its veth peer.
        pub fn remove_node_link(&self, name: &str) {
            let mut st = self.state.lock().unwrap();
            if let Some(LinkState {
                kind: LinkKind::Veth {
                    peer_index: Some(p),
                },
                ..
            }) = st.node.links.remove(name)
            {
                for n in st.namespaces.values_mut() {
                    remove_index(n, p);
                }
            }
        }
    }

    /// `ip route replace default via <gateway> dev <ifname>`.
    fn set_default_route(n: &mut NsObs, ifname: &str, gateway: Ipv4Addr) {
        n.routes.retain(|r| r.dst.prefix_len() != 0);
        n.routes.push(RouteEntry {
            dst: ipnet::Ipv4Net::default(),
            gateway: Some(gateway),
            dev: Some(ifname.into()),
        });
    }

    /// Removes the link with `index` from `n`, and the routes out of it.
    fn remove_index(n: &mut NsObs, index: u32) {
        let gone: Vec<String> = n
            .links
            .values()
            .filter(|l| l.index == index)
            .map(|l| l.name.clone())
            .collect();
        n.links.retain(|_, l| l.index != index);
        n.routes
            .retain(|r| !gone.iter().any(|g| r.dev.as_deref() == Some(g)));
    }

    impl Kernel for FakeKernel {
        fn observe_reusing(
            &self,
            reuse: &BTreeMap<String, NsObs>,
        ) -> Result<Observed, KernelError> {
            let mut out = self.state.lock().unwrap().clone();
            for (name, obs) in &mut out.namespaces {
                match reuse.get(name) {
                    Some(kept) if kept.inode == obs.inode => *obs = kept.clone(),
                    _ => {}
                }
            }
            Ok(out)
        }

        /// A node with no addresses or routes of its own: nothing clashes.
        fn node_nets(&self) -> Result<NodeNets, KernelError> {
            Ok(NodeNets::default())
        }

        fn apply(&self, action: &Action) -> Result<(), KernelError> {
            use Action::*;
            let mut st = self.state.lock().unwrap();
            match action {
                DeleteNetns { name } => {
                    let links: Vec<String> = st
                        .namespaces
                        .get(name)
                        .map(|n| n.links.keys().cloned().collect())
                        .unwrap_or_default();
                    drop(st);
                    for l in links {
                        self.remove_link(name, &l);
                    }
                    self.state.lock().unwrap().namespaces.remove(name);
                }
                DeleteLink { netns, link } => {
                    drop(st);
                    self.remove_link(netns, link);
                }
                CreateNetns { name } | RebindNetns { task: name, .. } => {
                    let inode = self.next();
                    st.namespaces.entry(name.clone()).or_default().inode = inode;
                }
                EnsureBridge {
                    sandbox,
                    gateway,
                    mtu,
                } => {
                    let mut br = self.link(BRIDGE, LinkKind::Bridge, *mtu);
                    br.addrs = vec![*gateway];
                    br.mac = Some(MacAddr::from_ipv4(gateway.addr()));
                    let n = Self::ns(&mut st, sandbox)?;
                    n.links.insert(BRIDGE.into(), br);
                }
                EnsureVxlan {
                    sandbox,
                    vni,
                    port,
                    mtu,
                } => {
                    let want = VxlanState {
                        vni: *vni,
                        port: *port,
                        learning: false,
                        proxy: true,
                        underlay_elsewhere: true,
                    };
                    let mut vx = self.link(VXLAN, LinkKind::Vxlan(want), *mtu);
                    vx.master = Some(BRIDGE.into());
                    let n = Self::ns(&mut st, sandbox)?;
                    if !matches!(n.links.get(VXLAN), Some(l) if l.kind == LinkKind::Vxlan(want)) {
                        n.neighs.clear();
                        n.fdb.clear();
                    }
                    n.links.insert(VXLAN.into(), vx);
                }
                Peers { sandbox, changes } => {
                    let n = Self::ns(&mut st, sandbox)?;
                    for c in changes {
                        match *c {
                            PeerAction::DelNeigh { ip } => n.neighs.retain(|e| e.ip != ip),
                            PeerAction::DelFdb { mac, vtep } => {
                                n.fdb.retain(|e| !(e.mac == mac && e.dst == Some(vtep)))
                            }
                            PeerAction::DelBridgeFdb { mac } => n
                                .fdb
                                .retain(|e| !(e.mac == mac && e.owner == FdbOwner::Bridge)),
                            PeerAction::AddFdb { mac, vtep } => {
                                n.fdb.retain(|e| e.mac != mac);
                                n.fdb.push(FdbEntry {
                                    dev: VXLAN.into(),
                                    mac,
                                    dst: Some(vtep),
                                    owner: FdbOwner::Device,
                                    permanent: true,
                                });
                            }
                            PeerAction::AddNeigh { ip, mac } => {
                                n.neighs.retain(|e| e.ip != ip);
                                n.neighs.push(NeighEntry {
                                    dev: VXLAN.into(),
                                    ip,
                                    mac: Some(mac),
                                    permanent: true,
                                });
                            }
                        }
                    }
                }
                EnsureEndpoint {
                    sandbox,
                    veth,
                    task,
                    ifname,
                    mac,
                    addr,
                    mtu,
                    aliases,
                } => {
                    Self::ns(&mut st, task)?;
                    Self::ns(&mut st, sandbox)?;
                    drop(st);
                    self.remove_link(sandbox, veth);
                    self.remove_link(task, ifname);
                    let (outer, mut inner) =
                        self.veth_pair((veth, BRIDGE), (ifname, *mac, *addr), *mtu);
                    inner.addrs.extend(aliases);
                    let mut st = self.state.lock().unwrap();
                    st.namespaces
                        .get_mut(sandbox)
                        .unwrap()
                        .links
                        .insert(veth.clone(), outer);
                    st.namespaces
                        .get_mut(task)
                        .unwrap()
                        .links
                        .insert(ifname.clone(), inner);
                }
                EnsureGwBridge { gateway, mtu } => {
                    let mut br = self.link(GWBRIDGE, LinkKind::Bridge, *mtu);
                    br.addrs = vec![*gateway];
                    br.mac = Some(MacAddr::from_ipv4(gateway.addr()));
                    st.node.links.insert(GWBRIDGE.into(), br);
                }
                EnsureGwLeg {
                    veth,
                    task,
                    ifname,
                    addr,
                    gateway,
                    mtu,
                } => {
                    Self::ns(&mut st, task)?;
                    drop(st);
                    self.remove_node_link(veth);
                    self.remove_link(task, ifname);
                    let mac = MacAddr::from_ipv4(addr.addr());
                    let (outer, inner) =
                        self.veth_pair((veth, GWBRIDGE), (ifname, mac, *addr), *mtu);
                    let mut st = self.state.lock().unwrap();
                    st.node.links.insert(veth.clone(), outer);
                    let n = st.namespaces.get_mut(task).unwrap();
                    n.links.insert(ifname.clone(), inner);
                    set_default_route(n, ifname, *gateway);
                }
                EnsureDefaultRoute {
                    task,
                    ifname,
                    gateway,
                } => {
                    let n = Self::ns(&mut st, task)?;
                    set_default_route(n, ifname, *gateway);
                }
                DeleteNodeLink { link } => {
                    drop(st);
                    self.remove_node_link(link);
                }
                StopTask { .. } | ForgetTask { .. } | StartTask { .. } => {
                    return Err(KernelError::NotKernel(Box::new(action.clone())))
                }
            }
            Ok(())
        }
    }
}
