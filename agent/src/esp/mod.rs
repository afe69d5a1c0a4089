//! Encrypted overlays: IPsec ESP in transport mode over the VXLAN packets between nodes, as in
//! Swarm (reference/swarm-cluster.md §6), planned purely from the assignment and what the
//! kernel holds, applied through XFRM netlink ([`xfrm`]) and one nftables table of our own.
//!
//! - States: for every peer node that shares an encrypted network with this node, and every key
//!   of the cluster's ring, one inbound and one outbound `rfc4106(gcm(aes))` state (ICV 128
//!   bits). Their SPIs are derived from (source, destination, key tag), so both ends compute the
//!   same ones without any negotiation. Ours carry reqid [`REQID`]; no other state is touched.
//! - Policies: one outbound policy per peer, selecting UDP from us to the peer's VXLAN port
//!   *with our mark* ([`ESP_MARK`]), whose template names the SPI of the send key. Swapping the
//!   send key is one atomic policy update; both keys' states exist meanwhile.
//! - Per network, not per node pair: an XFRM selector sees addresses, protocol and ports, never
//!   the VNI, so the `meshnet_esp` table marks in `output` (a `route` chain, so the kernel looks
//!   the route and the policy up again) the VXLAN packets whose VNI belongs to an encrypted
//!   network, drops in `postrouting` the ones of such a VNI about to leave without a transform
//!   (`rt ipsec missing`: no policy or no state yet, so nothing of an encrypted network ever
//!   leaves in clear), and drops in `input` the ones of such a VNI that did not come out of ESP
//!   (`meta ipsec missing`). A plain network between the same nodes stays plain VXLAN.
//! - No inbound policy: one would match every VXLAN packet from the peer, plain networks' too;
//!   the input rule does that job per VNI instead.
//! - The ingress network is encrypted like the others when the manager runs with
//!   `--ingress-encrypted`: its VNI is marked and guarded, its peers get states and policies.
//! - Keys live in memory only (the saved assignment has none). An agent restarted without its
//!   manager has no keys: it leaves the states and policies as they are, which keeps the
//!   encrypted traffic flowing as last programmed.

pub mod xfrm;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use firewall::Content;
use proto::agent::{Assignment, EncryptionKeys, EspSupport, ESP_KEY_BYTES};
use tracing::info;

/// Owner tag of our states and templates: "mesh".
pub const REQID: u32 = 0x6d65_7368;
/// The mark of VXLAN packets of encrypted networks: the top byte, above every service fwmark
/// (those stay below 2^24), so the two never mix.
pub const ESP_MARK: u32 = 0x4d00_0000;
pub const ESP_MARK_MASK: u32 = 0xff00_0000;
pub const AEAD_NAME: &str = "rfc4106(gcm(aes))";
pub const AEAD_ICV_BITS: u32 = 128;
/// The nftables table that marks and filters VXLAN of encrypted networks.
pub const TABLE: &str = "meshnet_esp";

/// Bytes ESP adds to a VXLAN packet in transport mode, at most: ESP header (SPI, sequence) 8,
/// the GCM IV 8, padding to a 4-byte boundary up to 3, pad length and next header 2, ICV 16.
pub const ESP_OVERHEAD: u32 = 8 + 8 + 3 + 2 + 16;

/// An ESP state, as the kernel names it (destination and SPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SaId {
    pub dst: Ipv4Addr,
    pub spi: u32,
}

/// A transport-mode ESP state of ours. Its Debug form hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Sa {
    pub id: SaId,
    pub src: Ipv4Addr,
    pub key: [u8; ESP_KEY_BYTES],
}

impl fmt::Debug for Sa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} spi 0x{:08x}",
            self.src, self.id.dst, self.id.spi
        )
    }
}

/// The outbound policy towards one peer: its VXLAN packets with our mark go in the state with
/// this SPI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutPolicy {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub port: u16,
    pub spi: u32,
}

/// What the node holds of ours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub states: Vec<Sa>,
    pub policies: Vec<OutPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EspAction {
    AddSa(Sa),
    DeleteSa(SaId),
    SetPolicy(OutPolicy),
    DeletePolicy(OutPolicy),
}

/// What the node should hold: the states and policies, and the VNIs to mark and guard.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    pub states: Vec<Sa>,
    pub policies: Vec<OutPolicy>,
    pub vnis: BTreeSet<u32>,
}

/// The SPI of the state from `src` to `dst` with key `tag`: FNV-1a over the three, the same on
/// both ends; kept clear of 0-255, which RFC 4303 reserves.
pub fn spi(src: Ipv4Addr, dst: Ipv4Addr, tag: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in src
        .octets()
        .into_iter()
        .chain(tag.to_be_bytes())
        .chain(dst.octets())
    {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    if h < 256 {
        h + 256
    } else {
        h
    }
}

/// The desired ESP state of this node, or None when it must be left as it is: an encrypted
/// network without keys (an agent restarted while its manager is away keeps what it had).
pub fn desired(a: &Assignment, local: Ipv4Addr, port: u16) -> Result<Option<Desired>, EspError> {
    // The ingress network too, when `mesh-manager --ingress-encrypted` made it so.
    let encrypted: Vec<_> = a
        .networks
        .iter()
        .chain(a.ingress.as_ref().map(|i| &i.network))
        .filter(|n| n.encrypted)
        .collect();
    if encrypted.is_empty() {
        return Ok(Some(Desired::default()));
    }
    let Some(keys) = &a.encryption else {
        return Ok(None);
    };
    let send = keys
        .keys
        .iter()
        .find(|k| k.tag == keys.send)
        .ok_or(EspError::NoSendKey(keys.send))?;
    let peers: BTreeSet<Ipv4Addr> = encrypted
        .iter()
        .flat_map(|n| &n.peers)
        .filter_map(|p| match p.vtep {
            IpAddr::V4(v) if v != local => Some(v),
            _ => None,
        })
        .collect();
    Ok(Some(Desired {
        states: states(local, &peers, keys),
        policies: peers
            .iter()
            .map(|&dst| OutPolicy {
                src: local,
                dst,
                port,
                spi: spi(local, dst, send.tag),
            })
            .collect(),
        vnis: encrypted.iter().map(|n| n.vni).collect(),
    }))
}

fn states(local: Ipv4Addr, peers: &BTreeSet<Ipv4Addr>, keys: &EncryptionKeys) -> Vec<Sa> {
    let mut out = Vec::new();
    for &peer in peers {
        for k in &keys.keys {
            for (src, dst) in [(peer, local), (local, peer)] {
                out.push(Sa {
                    id: SaId {
                        dst,
                        spi: spi(src, dst, k.tag),
                    },
                    src,
                    key: k.secret,
                });
            }
        }
    }
    out
}

/// Actions from what is to what should be, in an order that never leaves a packet without a
/// state: new states, then policies (which may switch to a new state), then stale policies,
/// then stale states. A state that differs (source or key changed behind our back) is deleted
/// and added again: the kernel cannot replace a key in place.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<EspAction> {
    let have: BTreeMap<SaId, &Sa> = observed.states.iter().map(|s| (s.id, s)).collect();
    let want: BTreeSet<SaId> = desired.states.iter().map(|s| s.id).collect();
    let mut actions = Vec::new();
    for sa in &desired.states {
        match have.get(&sa.id) {
            Some(h) if *h == sa => {}
            Some(_) => {
                actions.push(EspAction::DeleteSa(sa.id));
                actions.push(EspAction::AddSa(sa.clone()));
            }
            None => actions.push(EspAction::AddSa(sa.clone())),
        }
    }
    let key = |p: &OutPolicy| (p.src, p.dst, p.port);
    let pols: BTreeMap<_, &OutPolicy> = observed.policies.iter().map(|p| (key(p), p)).collect();
    for p in &desired.policies {
        if pols.get(&key(p)) != Some(&p) {
            actions.push(EspAction::SetPolicy(p.clone()));
        }
    }
    let wanted: BTreeSet<_> = desired.policies.iter().map(key).collect();
    for p in &observed.policies {
        if !wanted.contains(&key(p)) {
            actions.push(EspAction::DeletePolicy(p.clone()));
        }
    }
    for s in &observed.states {
        if !want.contains(&s.id) {
            actions.push(EspAction::DeleteSa(s.id));
        }
    }
    actions
}

/// The `meshnet_esp` table, whole, as one `nft -f` script that replaces it atomically (the
/// empty declaration lets the delete succeed on a first run). None of it without encrypted
/// VNIs: then the script only removes the table.
pub fn nft_script(vnis: &BTreeSet<u32>, port: u16) -> String {
    let mut s = format!("table ip {TABLE} {{\n}}\ndelete table ip {TABLE}\n");
    if vnis.is_empty() {
        return s;
    }
    let set = vnis
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    // @th,96,24: the VNI, after the 8-byte UDP header and the VXLAN flags and reserved bytes.
    s += &format!(
        "table ip {TABLE} {{
\tchain mark-encrypted {{
\t\ttype route hook output priority mangle; policy accept;
\t\tudp dport {port} @th,96,24 {{ {set} }} meta mark set meta mark & 0x{keep:08x} | 0x{ESP_MARK:08x}
\t}}
\tchain never-send-cleartext {{
\t\ttype filter hook postrouting priority filter; policy accept;
\t\tudp dport {port} @th,96,24 {{ {set} }} rt ipsec missing counter drop
\t}}
\tchain drop-cleartext {{
\t\ttype filter hook input priority filter; policy accept;
\t\tudp dport {port} @th,96,24 {{ {set} }} meta ipsec missing counter drop
\t}}
}}
",
        keep = !ESP_MARK_MASK
    );
    s
}

/// What the node's kernel, or `nft`, refused, or the assignment got wrong.
#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error("the send key {0} is not in the key ring")]
    NoSendKey(u32),
    /// An action of a sync that failed (its Debug form hides the key).
    #[error("{action:?}: {source}")]
    Action {
        action: EspAction,
        #[source]
        source: Box<EspError>,
    },
    #[error(transparent)]
    Xfrm(#[from] xfrm::XfrmError),
    #[error("run nft for table {TABLE}: {0}")]
    NftSpawn(std::io::Error),
    #[error("write the rules of table {TABLE} to nft: {0}")]
    NftWrite(std::io::Error),
    #[error("apply table {TABLE}: nft: {0}")]
    Nft(String),
    #[error("list table {TABLE}: nft: {0}")]
    NftList(String),
    #[error("make a namespace to list table {TABLE} as it should be: {0}")]
    Scratch(nix::Error),
    #[error("list table {TABLE} as it should be: the thread panicked")]
    ScratchPanicked,
    #[error("list table {TABLE} as it should be: nft applied it but lists none")]
    ScratchEmpty,
    #[error("parse the listing of table {TABLE}: {0}")]
    Listing(String),
}

/// How the node's `meshnet_esp` table differed from what it should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableDrift {
    Missing,
    /// There while no encrypted network wants it.
    Unwanted,
    /// A listing that could not be read (the error): no proof that the table is right.
    Unreadable(String),
    /// What differs, one item each (`chain drop-cleartext rule 1 missing: …`).
    Differs(Vec<String>),
}

impl fmt::Display for TableDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableDrift::Missing => write!(f, "table ip {TABLE} missing"),
            TableDrift::Unwanted => write!(f, "table ip {TABLE} there, no network encrypted"),
            TableDrift::Unreadable(e) => write!(f, "unreadable listing ({e})"),
            TableDrift::Differs(items) => f.write_str(&items.join("; ")),
        }
    }
}

/// The content of a `nft -j list table ip meshnet_esp`, its counters zeroed (traffic moves
/// them; a counter is ours, its value is not).
fn listed_content(json: &str) -> Result<Content, EspError> {
    let mut v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| EspError::Listing(format!("not JSON: {e}")))?;
    let rules = v
        .get_mut("nftables")
        .and_then(serde_json::Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(|item| item.pointer_mut("/rule/expr")?.as_array_mut());
    for expr in rules {
        for statement in expr {
            if let Some(counter) = statement.get_mut("counter").and_then(|c| c.as_object_mut()) {
                for n in counter.values_mut() {
                    *n = 0.into();
                }
            }
        }
    }
    Content::from_listing(&v.to_string()).map_err(|e| match e {
        firewall::Error::Listing(why) => EspError::Listing(why),
        other => EspError::Listing(other.to_string()),
    })
}

/// How `listed` (the node's listing, `None` without the table) differs from `want` (the
/// content the script gives, `None` when no table is wanted); `None` when it does not.
fn table_drift(want: Option<&Content>, listed: Option<&str>) -> Option<TableDrift> {
    match (want, listed) {
        (None, None) => None,
        (None, Some(_)) => Some(TableDrift::Unwanted),
        (Some(_), None) => Some(TableDrift::Missing),
        (Some(want), Some(json)) => match listed_content(json) {
            Ok(got) => {
                let differences = want.differences(&got);
                (!differences.is_empty()).then_some(TableDrift::Differs(differences))
            }
            Err(e) => Some(TableDrift::Unreadable(e.to_string())),
        },
    }
}

/// The node's kernel state, behind a narrow trait (the real one is [`xfrm::XfrmSocket`] plus
/// `nft`), so the sync is tested without root.
pub trait EspKernel {
    fn observe(&mut self) -> Result<Observed, EspError>;
    fn apply(&mut self, action: &EspAction) -> Result<(), EspError>;
    fn nft(&mut self, script: &str) -> Result<(), EspError>;
    /// `nft -j list table ip meshnet_esp` in the node's namespace; `None` without the table.
    fn list(&mut self) -> Result<Option<String>, EspError>;
    /// What the table lists once `script` is applied: the same nft and kernel print it there
    /// as they would in the node's namespace, whatever they make of the script (nft rewrites
    /// some expressions).
    fn reference(&mut self, script: &str) -> Result<String, EspError>;
    /// The node namespace's nf_tables generation, `None` if it cannot be read.
    fn generation(&mut self) -> Option<u32>;
}

impl EspKernel for xfrm::XfrmSocket {
    fn observe(&mut self) -> Result<Observed, EspError> {
        Ok(Observed {
            states: self.states()?,
            policies: self.policies()?,
        })
    }

    fn apply(&mut self, action: &EspAction) -> Result<(), EspError> {
        Ok(match action {
            EspAction::AddSa(sa) => self.add_sa(sa),
            EspAction::DeleteSa(id) => self.delete_sa(id),
            EspAction::SetPolicy(p) => self.set_policy(p),
            EspAction::DeletePolicy(p) => self.delete_policy(p),
        }?)
    }

    fn nft(&mut self, script: &str) -> Result<(), EspError> {
        run_nft(script)
    }

    fn list(&mut self) -> Result<Option<String>, EspError> {
        list_table()
    }

    /// Applied and listed in a throwaway namespace, on a thread of its own (the `nft`
    /// processes it spawns are in that namespace too), so nothing of the node is touched.
    fn reference(&mut self, script: &str) -> Result<String, EspError> {
        let script = script.to_string();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(EspError::Scratch)?;
            run_nft(&script)?;
            list_table()?.ok_or(EspError::ScratchEmpty)
        })
        .join()
        .map_err(|_| EspError::ScratchPanicked)?
    }

    fn generation(&mut self) -> Option<u32> {
        netns::Netns::current()
            .ok()
            .and_then(|ns| firewall::generation(&ns).ok())
    }
}

/// `nft -f -` in the agent's own (the node's) namespace.
fn run_nft(script: &str) -> Result<(), EspError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(EspError::NftSpawn)?;
    // Written, then the pipe closed, before waiting; nft exits (and is reaped) either way.
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().map_err(EspError::NftSpawn)?;
    if !out.status.success() {
        return Err(EspError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    if let Some(Err(e)) = written {
        return Err(EspError::NftWrite(e));
    }
    Ok(())
}

/// `nft -j list table ip meshnet_esp` in the calling thread's namespace; `None` without it.
fn list_table() -> Result<Option<String>, EspError> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "table", "ip", TABLE])
        .output()
        .map_err(EspError::NftSpawn)?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No such file or directory") {
        return Ok(None);
    }
    Err(EspError::NftList(stderr.trim().to_string()))
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Descriptions of what changed (no key material).
    pub applied: Vec<String>,
    /// The table had drifted from what was last applied and was rebuilt: how it differed.
    pub repaired: Option<TableDrift>,
    pub errors: Vec<EspError>,
}

/// What [`EspSync`] did to the table.
#[derive(Debug, PartialEq, Eq)]
enum TableSynced {
    Unchanged,
    Applied,
    Repaired(TableDrift),
}

/// Keeps the node's ESP states, policies and table as `desired` says. The table is compared
/// with what it should be (its listing against the script's, see [`EspKernel::reference`])
/// when nothing is known of it yet (a start: a right table is kept, no transaction), and on a
/// `recheck` if the node's nf_tables generation moved since it was last known right (asking
/// the generation spares an `nft` process per pass); it is replaced whole, atomically, when
/// the script changes or the table differs.
pub struct EspSync {
    local: Ipv4Addr,
    port: u16,
    /// The script last applied, or found in force.
    last_script: Option<String>,
    /// A script's content as the kernel lists it, made the first time it is compared.
    reference: Option<(String, Content)>,
    /// The generation at which the table was last known right.
    checked_at: Option<u32>,
}

impl EspSync {
    pub fn new(local: Ipv4Addr, port: u16) -> EspSync {
        EspSync {
            local,
            port,
            last_script: None,
            reference: None,
            checked_at: None,
        }
    }

    pub fn sync(&mut self, k: &mut dyn EspKernel, a: &Assignment, recheck: bool) -> SyncReport {
        let mut report = SyncReport::default();
        let desired = match desired(a, self.local, self.port) {
            Ok(Some(d)) => d,
            // No keys in memory: what the kernel holds stays.
            Ok(None) => return report,
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        };
        // The table first: from then on a packet of an encrypted network leaves in ESP or not
        // at all, whatever the states and policies are yet.
        match self.sync_table(k, &desired.vnis, recheck) {
            Ok(TableSynced::Unchanged) => {}
            Ok(TableSynced::Applied) => report
                .applied
                .push(format!("table {TABLE}: encrypted VNIs {:?}", desired.vnis)),
            Ok(TableSynced::Repaired(how)) => report.repaired = Some(how),
            Err(e) => report.errors.push(e),
        }
        let observed = match k.observe() {
            Ok(o) => o,
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        };
        for action in plan(&desired, &observed) {
            match k.apply(&action) {
                Ok(()) => report.applied.push(format!("{action:?}")),
                Err(e) => report.errors.push(EspError::Action {
                    action,
                    source: Box::new(e),
                }),
            }
        }
        report
    }

    fn sync_table(
        &mut self,
        k: &mut dyn EspKernel,
        vnis: &BTreeSet<u32>,
        recheck: bool,
    ) -> Result<TableSynced, EspError> {
        let script = nft_script(vnis, self.port);
        let known = self.last_script.as_deref();
        if known.is_some_and(|last| last != script) {
            // The script replaces the table whole: right after it, the table is right.
            let before = k.generation();
            k.nft(&script)?;
            self.checked_at = crate::lb::right_after_own_write(before, k.generation());
            self.last_script = Some(script);
            return Ok(TableSynced::Applied);
        }
        // Read before listing: a change made after it moves the generation past it.
        let before = k.generation();
        if known.is_some() && (!recheck || (before.is_some() && before == self.checked_at)) {
            return Ok(TableSynced::Unchanged);
        }
        let want = if vnis.is_empty() {
            None
        } else {
            Some(self.reference(k, &script)?)
        };
        let Some(drift) = table_drift(want.as_ref(), k.list()?.as_deref()) else {
            self.checked_at = before;
            self.last_script = Some(script);
            return Ok(TableSynced::Unchanged);
        };
        k.nft(&script)?;
        self.checked_at = crate::lb::right_after_own_write(before, k.generation());
        let first = self.last_script.replace(script).is_none();
        if !first {
            return Ok(TableSynced::Repaired(drift));
        }
        // What a start finds may be an older desired state: applied, not a repair.
        if !matches!(drift, TableDrift::Missing | TableDrift::Unwanted) {
            info!(differed = %drift, "table ip {TABLE} rebuilt");
        }
        Ok(TableSynced::Applied)
    }

    /// The content `script` gives, as the kernel lists it: made once per script.
    fn reference(&mut self, k: &mut dyn EspKernel, script: &str) -> Result<Content, EspError> {
        if let Some((s, content)) = &self.reference {
            if s == script {
                return Ok(content.clone());
            }
        }
        let content = listed_content(&k.reference(script)?)?;
        self.reference = Some((script.to_string(), content.clone()));
        Ok(content)
    }
}

/// Why the kernel cannot do ESP, as the probe found it; sent to the manager as the node's
/// `no_encryption` reason.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("make a namespace to probe in: {0}")]
    Namespace(nix::Error),
    #[error("add an {AEAD_NAME} state: {0}")]
    AddState(std::io::Error),
    /// Opening the socket, or an answer that could not be read.
    #[error(transparent)]
    Xfrm(#[from] xfrm::XfrmError),
    #[error("the probe panicked")]
    Panicked,
}

/// Whether this kernel can do what encrypted overlays need: adds (and drops with it) one
/// `rfc4106(gcm(aes))` transport state in a throwaway network namespace, on a thread of its
/// own, so nothing of the node is touched.
pub fn probe() -> EspSupport {
    let run = || -> Result<(), ProbeError> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(ProbeError::Namespace)?;
        let mut sock = xfrm::XfrmSocket::open()?;
        let sa = Sa {
            id: SaId {
                dst: Ipv4Addr::new(192, 0, 2, 2),
                spi: 0x100,
            },
            src: Ipv4Addr::new(192, 0, 2, 1),
            key: [0; ESP_KEY_BYTES],
        };
        sock.add_sa(&sa).map_err(|e| match e {
            xfrm::XfrmError::Io { source, .. } => ProbeError::AddState(source),
            other => ProbeError::Xfrm(other),
        })
    };
    let outcome = std::thread::spawn(run)
        .join()
        .unwrap_or(Err(ProbeError::Panicked));
    match outcome {
        Ok(()) => EspSupport::Supported,
        Err(e) => EspSupport::Unsupported {
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::{EspKey, NetworkSpec, Peer};

    const N1: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 11);
    const N2: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 12);
    const N3: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 13);

    fn net(id: &str, vni: u32, encrypted: bool, vteps: &[Ipv4Addr]) -> NetworkSpec {
        NetworkSpec {
            id: id.into(),
            name: id.into(),
            subnet: "10.0.9.0/24".parse().unwrap(),
            gateway: "10.0.9.1/24".parse().unwrap(),
            vni,
            peers: vteps
                .iter()
                .enumerate()
                .map(|(i, v)| Peer {
                    ip: Ipv4Addr::new(10, 0, 9, 10 + i as u8),
                    mac: String::new(),
                    vtep: IpAddr::V4(*v),
                })
                .collect(),
            lb_addr: None,
            draining: vec![],
            services: vec![],
            encrypted,
        }
    }

    fn keys(tags: &[u32], send: u32) -> EncryptionKeys {
        EncryptionKeys {
            keys: tags
                .iter()
                .map(|&t| EspKey {
                    tag: t,
                    secret: [t as u8; ESP_KEY_BYTES],
                })
                .collect(),
            send,
        }
    }

    fn assignment(networks: Vec<NetworkSpec>, enc: Option<EncryptionKeys>) -> Assignment {
        Assignment {
            networks,
            encryption: enc,
            ..Assignment::default()
        }
    }

    #[test]
    fn both_ends_derive_the_same_spis_and_each_direction_differs() {
        assert_eq!(spi(N1, N2, 1), spi(N1, N2, 1));
        assert_ne!(spi(N1, N2, 1), spi(N2, N1, 1));
        assert_ne!(spi(N1, N2, 1), spi(N1, N2, 2));
        assert_ne!(spi(N1, N2, 1), spi(N3, N2, 1));
        assert!(spi(N1, N2, 1) >= 256);
    }

    #[test]
    fn only_peers_of_encrypted_networks_get_states_and_policies() {
        let a = assignment(
            vec![
                net("sec", 4097, true, &[N2, N1]),
                net("plain", 4098, false, &[N3]),
            ],
            Some(keys(&[1, 2], 1)),
        );
        let d = desired(&a, N1, 4789).unwrap().unwrap();
        assert_eq!(d.vnis, BTreeSet::from([4097]));
        // N2 only (never ourselves): in and out for each of the two keys.
        assert_eq!(d.states.len(), 4);
        assert!(d
            .states
            .iter()
            .all(|s| (s.src == N2 && s.id.dst == N1) || (s.src == N1 && s.id.dst == N2)));
        assert_eq!(
            d.policies,
            vec![OutPolicy {
                src: N1,
                dst: N2,
                port: 4789,
                spi: spi(N1, N2, 1),
            }]
        );
        // No encrypted network: nothing of ours should exist.
        let plain = assignment(vec![net("plain", 4098, false, &[N3])], None);
        assert_eq!(desired(&plain, N1, 4789).unwrap(), Some(Desired::default()));
        // Encrypted but no keys (restarted without the manager): hands off.
        let keyless = assignment(vec![net("sec", 4097, true, &[N2])], None);
        assert_eq!(desired(&keyless, N1, 4789).unwrap(), None);
        let bad = assignment(vec![net("sec", 4097, true, &[N2])], Some(keys(&[1], 9)));
        assert_eq!(
            desired(&bad, N1, 4789).unwrap_err().to_string(),
            "the send key 9 is not in the key ring"
        );
    }

    #[test]
    fn an_encrypted_ingress_network_is_carried_in_esp_like_any_other() {
        let ingress = |encrypted: bool| {
            Some(Box::new(proto::agent::IngressSpec {
                network: net("ingress", 4096, encrypted, &[N2, N3]),
                sbox_addr: "10.255.0.2/16".parse().unwrap(),
            }))
        };
        let mut a = assignment(
            vec![
                net("sec", 4097, true, &[N2]),
                net("plain", 4098, false, &[N3]),
            ],
            Some(keys(&[1], 1)),
        );
        a.ingress = ingress(true);
        let d = desired(&a, N1, 4789).unwrap().unwrap();
        assert_eq!(d.vnis, BTreeSet::from([4096, 4097]));
        let dsts: Vec<Ipv4Addr> = d.policies.iter().map(|p| p.dst).collect();
        assert_eq!(dsts, [N2, N3]);
        assert_eq!(d.states.len(), 4);
        // Alone, without any encrypted user network.
        a.networks = vec![net("plain", 4098, false, &[N3])];
        let d = desired(&a, N1, 4789).unwrap().unwrap();
        assert_eq!(d.vnis, BTreeSet::from([4096]));
        assert_eq!(d.policies.len(), 2);
        // A plain ingress stays plain.
        a.ingress = ingress(false);
        assert_eq!(desired(&a, N1, 4789).unwrap(), Some(Desired::default()));
    }

    #[test]
    fn rotation_adds_states_before_switching_the_policy_and_removes_the_old_last() {
        let before = assignment(vec![net("sec", 4097, true, &[N2])], Some(keys(&[1, 2], 1)));
        let d1 = desired(&before, N1, 4789).unwrap().unwrap();
        let observed = Observed {
            states: d1.states.clone(),
            policies: d1.policies.clone(),
        };
        assert!(plan(&d1, &observed).is_empty());
        let after = assignment(vec![net("sec", 4097, true, &[N2])], Some(keys(&[2, 3], 2)));
        let d2 = desired(&after, N1, 4789).unwrap().unwrap();
        let actions = plan(&d2, &observed);
        let kinds: Vec<&str> = actions
            .iter()
            .map(|a| match a {
                EspAction::AddSa(_) => "add",
                EspAction::SetPolicy(_) => "policy",
                EspAction::DeletePolicy(_) => "unpolicy",
                EspAction::DeleteSa(_) => "delete",
            })
            .collect();
        assert_eq!(kinds, ["add", "add", "policy", "delete", "delete"]);
        assert_eq!(
            actions[2],
            EspAction::SetPolicy(OutPolicy {
                src: N1,
                dst: N2,
                port: 4789,
                spi: spi(N1, N2, 2),
            })
        );
        assert!(actions[3..]
            .iter()
            .all(|a| matches!(a, EspAction::DeleteSa(id) if id.spi == spi(N1, N2, 1) || id.spi == spi(N2, N1, 1))));
    }

    #[test]
    fn drift_is_repaired_and_a_changed_key_is_replaced() {
        let a = assignment(vec![net("sec", 4097, true, &[N2])], Some(keys(&[1], 1)));
        let d = desired(&a, N1, 4789).unwrap().unwrap();
        let mut tampered = d.states[0].clone();
        tampered.key = [0xee; ESP_KEY_BYTES];
        let stale_policy = OutPolicy {
            src: N1,
            dst: N3,
            port: 4789,
            spi: 77,
        };
        let observed = Observed {
            // One state deleted by hand, the other with another key; a policy to a gone peer.
            states: vec![tampered],
            policies: vec![stale_policy.clone()],
        };
        let actions = plan(&d, &observed);
        assert_eq!(
            actions,
            vec![
                EspAction::DeleteSa(d.states[0].id),
                EspAction::AddSa(d.states[0].clone()),
                EspAction::AddSa(d.states[1].clone()),
                EspAction::SetPolicy(d.policies[0].clone()),
                EspAction::DeletePolicy(stale_policy),
            ]
        );
    }

    #[test]
    fn keys_never_show_in_debug_forms() {
        let a = assignment(
            vec![net("sec", 4097, true, &[N2])],
            Some(keys(&[0xab], 0xab)),
        );
        let d = desired(&a, N1, 4789).unwrap().unwrap();
        let shown = format!("{:?} {:?}", d, plan(&d, &Observed::default()));
        assert!(
            !shown.contains("171") && !shown.to_lowercase().contains("abab"),
            "{shown}"
        );
        assert!(!format!("{a:?}").contains("171, 171"));
    }

    #[test]
    fn the_table_marks_and_guards_only_encrypted_vnis() {
        let s = nft_script(&BTreeSet::from([4097, 4099]), 4789);
        assert!(s.starts_with("table ip meshnet_esp {\n}\ndelete table ip meshnet_esp\n"));
        assert!(s.contains(
            "udp dport 4789 @th,96,24 { 4097, 4099 } meta mark set meta mark & 0x00ffffff | 0x4d000000"
        ));
        assert!(
            s.contains("udp dport 4789 @th,96,24 { 4097, 4099 } meta ipsec missing counter drop")
        );
        assert!(s.contains("udp dport 4789 @th,96,24 { 4097, 4099 } rt ipsec missing counter drop"));
        assert!(s.contains("type route hook output priority mangle"));
        assert_eq!(
            nft_script(&BTreeSet::new(), 4789),
            "table ip meshnet_esp {\n}\ndelete table ip meshnet_esp\n"
        );
    }

    /// A kernel in memory that applies actions as the real one would.
    #[derive(Default)]
    struct Fake {
        held: Observed,
        scripts: Vec<String>,
        /// The table's listing, `None` without it.
        table: Option<String>,
        lists: usize,
        references: usize,
        /// nf_tables' generation: every script moves it, as anyone else's change would.
        generation: u32,
    }

    /// What the fake lists for a script: none for one that only deletes the table, else one
    /// rule holding the script, with a counter that traffic moves.
    fn listing(script: &str, packets: u64) -> Option<String> {
        if script == nft_script(&BTreeSet::new(), 4789) {
            return None;
        }
        let json = serde_json::json!({"nftables": [
            {"chain": {"family": "ip", "table": TABLE, "name": "c", "handle": 1}},
            {"rule": {"family": "ip", "table": TABLE, "chain": "c", "handle": 2, "expr": [
                {"script": script}, {"counter": {"packets": packets, "bytes": packets * 100}}
            ]}}
        ]});
        Some(json.to_string())
    }

    impl EspKernel for Fake {
        fn observe(&mut self) -> Result<Observed, EspError> {
            Ok(self.held.clone())
        }
        fn apply(&mut self, action: &EspAction) -> Result<(), EspError> {
            let h = &mut self.held;
            match action {
                EspAction::AddSa(sa) => {
                    if h.states.iter().any(|s| s.id == sa.id) {
                        return Err(EspError::Xfrm(xfrm::XfrmError::Io {
                            op: "add SA".into(),
                            source: std::io::Error::from_raw_os_error(libc::EEXIST),
                        }));
                    }
                    h.states.push(sa.clone());
                }
                EspAction::DeleteSa(id) => h.states.retain(|s| s.id != *id),
                EspAction::SetPolicy(p) => {
                    h.policies
                        .retain(|q| (q.src, q.dst, q.port) != (p.src, p.dst, p.port));
                    h.policies.push(p.clone());
                }
                EspAction::DeletePolicy(p) => h.policies.retain(|q| q != p),
            }
            Ok(())
        }
        fn nft(&mut self, script: &str) -> Result<(), EspError> {
            self.scripts.push(script.to_string());
            self.table = listing(script, 0);
            self.generation += 1;
            Ok(())
        }
        fn list(&mut self) -> Result<Option<String>, EspError> {
            self.lists += 1;
            Ok(self.table.clone())
        }
        fn reference(&mut self, script: &str) -> Result<String, EspError> {
            self.references += 1;
            Ok(listing(script, 0).expect("a table that is wanted"))
        }
        fn generation(&mut self) -> Option<u32> {
            Some(self.generation)
        }
    }

    /// A sync that found nothing to do.
    fn assert_quiet(r: SyncReport) {
        assert!(
            r.applied.is_empty() && r.repaired.is_none() && r.errors.is_empty(),
            "{r:?}"
        );
    }

    fn secure() -> Assignment {
        assignment(
            vec![net("sec", 4097, true, &[N2, N3])],
            Some(keys(&[1, 2], 1)),
        )
    }

    /// A node as an agent left it: states, policies and table right, the table's counters
    /// moved by traffic since.
    fn built() -> Fake {
        let mut k = Fake::default();
        let r = EspSync::new(N1, 4789).sync(&mut k, &secure(), false);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(k.held.states.len(), 8);
        assert_eq!(k.held.policies.len(), 2);
        assert_eq!(k.scripts.len(), 1);
        k.table = listing(&k.scripts[0], 1234);
        (k.lists, k.references) = (0, 0);
        k
    }

    #[test]
    fn a_restart_over_a_right_node_changes_nothing() {
        let mut k = built();
        let (held, generation) = (k.held.clone(), k.generation);
        let mut restarted = EspSync::new(N1, 4789);
        assert_quiet(restarted.sync(&mut k, &secure(), false));
        // The table listed once, against the script's own listing; nothing written.
        assert_eq!((k.lists, k.references, k.scripts.len()), (1, 1, 1));
        assert_eq!((&k.held, k.generation), (&held, generation));
        // Known right at that generation: later rechecks do not list it again.
        assert_quiet(restarted.sync(&mut k, &secure(), true));
        assert_eq!(k.lists, 1);
    }

    #[test]
    fn a_restart_rebuilds_a_missing_or_differing_table_as_applied_not_repaired() {
        for table in [None, listing(&nft_script(&BTreeSet::from([4099]), 4789), 0)] {
            let mut k = built();
            k.table = table;
            let r = EspSync::new(N1, 4789).sync(&mut k, &secure(), false);
            assert_eq!(r.applied, ["table meshnet_esp: encrypted VNIs {4097}"]);
            assert!(r.repaired.is_none() && r.errors.is_empty(), "{r:?}");
            assert_eq!(k.scripts.len(), 2);
            assert_eq!(k.table, listing(&k.scripts[0], 0));
        }
    }

    #[test]
    fn a_table_changed_behind_our_back_is_found_on_recheck_and_rebuilt() {
        let mut k = built();
        let mut s = EspSync::new(N1, 4789);
        assert_quiet(s.sync(&mut k, &secure(), false));
        // Someone else's transaction that left the table right: listed once, kept.
        k.generation += 1;
        assert_quiet(s.sync(&mut k, &secure(), true));
        assert_eq!((k.lists, k.scripts.len()), (2, 1));
        // Edited: found only on a recheck (a pass that is asked for something else does not
        // list), rebuilt, and said how it differed.
        k.table = listing(&nft_script(&BTreeSet::from([4099]), 4789), 0);
        k.generation += 1;
        assert_quiet(s.sync(&mut k, &secure(), false));
        let r = s.sync(&mut k, &secure(), true);
        let how = r.repaired.as_ref().expect("a repair").to_string();
        assert!(how.starts_with("chain c rule 1 differs"), "{how}");
        assert!(r.applied.is_empty() && r.errors.is_empty(), "{r:?}");
        assert_eq!(k.scripts.len(), 2);
        assert_eq!(k.table, listing(&k.scripts[0], 0));
        // Our rebuild was the only transaction since: right at its generation, not listed.
        assert_quiet(s.sync(&mut k, &secure(), true));
        assert_eq!(k.lists, 3);
        // Deleted.
        k.table = None;
        k.generation += 1;
        let r = s.sync(&mut k, &secure(), true);
        assert_eq!(r.repaired, Some(TableDrift::Missing));
        assert_eq!(k.references, 1, "one reference listing per script");
    }

    #[test]
    fn sync_follows_the_networks_and_keeps_state_without_keys() {
        let mut k = built();
        let mut s = EspSync::new(N1, 4789);
        s.sync(&mut k, &secure(), false);
        // Another encrypted network: the table is replaced, without being listed first.
        let mut two = secure();
        two.networks.push(net("sec2", 4099, true, &[N2]));
        let r = s.sync(&mut k, &two, false);
        assert_eq!(
            r.applied,
            vec!["table meshnet_esp: encrypted VNIs {4097, 4099}".to_string()]
        );
        assert_eq!((k.lists, k.scripts.len()), (1, 2));
        // The saved assignment after a restart has no keys: nothing is removed.
        let keyless = Assignment {
            encryption: None,
            ..two.clone()
        };
        let mut restarted = EspSync::new(N1, 4789);
        assert_quiet(restarted.sync(&mut k, &keyless, true));
        assert_eq!(k.held.states.len(), 8);
        // The encrypted networks leave the node: everything of ours goes, the table too.
        let r = s.sync(&mut k, &assignment(vec![], None), false);
        assert!(r.errors.is_empty());
        assert_eq!(k.held, Observed::default());
        assert_eq!(k.table, None);
        // A start without encrypted networks over a node without the table writes nothing;
        // one that finds the table removes it.
        let scripts = k.scripts.len();
        let mut plain = EspSync::new(N1, 4789);
        assert_quiet(plain.sync(&mut k, &assignment(vec![], None), false));
        assert_eq!(k.scripts.len(), scripts);
        k.table = listing(&k.scripts[0], 0);
        let r = EspSync::new(N1, 4789).sync(&mut k, &assignment(vec![], None), false);
        assert_eq!(
            r.applied,
            vec!["table meshnet_esp: encrypted VNIs {}".to_string()]
        );
        assert_eq!(k.table, None);
    }

    /// `nft -j list table ip meshnet_esp` (nft 1.0.6) after [`nft_script`] of VNI 4097,
    /// one chain of it.
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "meshnet_esp", "handle": 2}}, {"chain": {"family": "ip", "table": "meshnet_esp", "name": "drop-cleartext", "handle": 3, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}, {"rule": {"family": "ip", "table": "meshnet_esp", "chain": "drop-cleartext", "handle": 9, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 4789}}, {"match": {"op": "==", "left": {"payload": {"base": "th", "offset": 96, "len": 24}}, "right": {"set": [4097]}}}, {"match": {"op": "==", "left": {"meta": {"key": "ipsec"}}, "right": false}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}]}"#;

    #[test]
    fn listings_compare_by_content_whatever_the_counters_say() {
        let want = listed_content(LISTED).unwrap();
        let counted = LISTED.replace(
            r#""packets": 0, "bytes": 0"#,
            r#""packets": 812, "bytes": 98304"#,
        );
        let handles = LISTED.replace(r#""handle": 9"#, r#""handle": 40"#);
        for same in [&counted, &handles] {
            assert_ne!(same, LISTED);
            assert_eq!(table_drift(Some(&want), Some(same)), None);
        }
        let edited = LISTED.replace(r#""set": [4097]"#, r#""set": [4098]"#);
        let Some(TableDrift::Differs(items)) = table_drift(Some(&want), Some(&edited)) else {
            panic!("an edited set compared equal");
        };
        assert_eq!(items.len(), 1);
        assert!(
            items[0].starts_with("chain drop-cleartext rule 1 differs"),
            "{items:?}"
        );
        let flushed = LISTED.replace(r#"{"rule""#, r#"{"ignored""#);
        assert!(table_drift(Some(&want), Some(&flushed))
            .unwrap()
            .to_string()
            .contains("chain drop-cleartext rule 1 missing"));
        assert_eq!(
            table_drift(Some(&want), Some("nft said nothing")).map(|d| d.to_string()),
            Some("unreadable listing (parse the listing of table meshnet_esp: not JSON: expected ident at line 1 column 2)".into())
        );
        assert_eq!(table_drift(None, Some(LISTED)), Some(TableDrift::Unwanted));
        assert_eq!(table_drift(Some(&want), None), Some(TableDrift::Missing));
        assert_eq!(table_drift(None, None), None);
    }
}
