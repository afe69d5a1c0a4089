//! The executor: `nft` and `conntrack` run as child processes inside a namespace (the calling
//! thread never enters it), behind a narrow trait with a fake for tests.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use netns::Netns;

use crate::changes::Changes;
use crate::content::{Content, Drift};
use crate::nfnl::NfnlSocket;
use crate::render::Batch;
use crate::{Error, Result, Ruleset, TABLE};

/// nft's stderr for a huge failed batch can be huge; errors keep its start.
const STDERR_LIMIT: usize = 4096;

/// What the agent needs from netfilter in one namespace.
pub trait Netfilter {
    /// Applies a batch as one transaction. An empty batch does nothing.
    fn apply(&self, batch: &Batch) -> Result<()>;
    /// Applies incremental changes as one transaction. By default as their `nft` script.
    fn apply_changes(&self, changes: &Changes) -> Result<()> {
        self.apply(&changes.to_batch())
    }
    /// `nft -j list table ip meshnet`, or `None` when our table does not exist.
    fn list_table(&self) -> Result<Option<String>>;
    /// Deletes the conntrack entries of a destination that left the balancer (its DNATed or
    /// balanced address is `backend`) that would otherwise keep sending new traffic to it, and
    /// returns how many went: UDP flows, and TCP connections still waiting for its SYN-ACK
    /// (SYN_SENT), which a client reusing that source port would follow to a gone backend for
    /// two minutes. Other TCP entries stay: established connections drain.
    fn delete_stale_conntrack(&self, backend: Ipv4Addr) -> Result<u64>;
}

/// How [`sync`] went.
#[derive(Debug)]
pub enum Synced {
    /// The change was applied as asked (the whole table when there was no `prev`).
    Applied,
    /// The incremental changes failed, nothing of them applied (the kernel's table was not
    /// what `prev` says: changed behind our back), so the whole table was rebuilt instead.
    /// The error says what did not match.
    Rebuilt(Error),
}

/// Applies the change from `prev` to `next`, then clears the stale conntrack entries of
/// destinations that are gone, so the next datagram or SYN of such a flow is balanced afresh.
/// Element and chain changes go through [`Netfilter::apply_changes`], anything else (a
/// first build, a configuration change) through a full `nft` batch. Should the changes fail
/// ([`Error::Nfnl`]), the table is rebuilt atomically: [`sync_report`] says when.
pub fn sync<R: Ruleset>(nf: &dyn Netfilter, prev: Option<&R>, next: &R) -> Result<()> {
    sync_report(nf, prev, next).map(drop)
}

/// [`sync`], saying whether the changes went as asked or the table was rebuilt instead.
pub fn sync_report<R: Ruleset>(nf: &dyn Netfilter, prev: Option<&R>, next: &R) -> Result<Synced> {
    let mut synced = Synced::Applied;
    match prev.map(|p| R::changes(p, next)).transpose()?.flatten() {
        Some(changes) => match nf.apply_changes(&changes) {
            Ok(()) => {}
            Err(e @ Error::Nfnl { .. }) => {
                nf.apply(&R::render(None, next)?)?;
                synced = Synced::Rebuilt(e);
            }
            Err(e) => return Err(e),
        },
        None => nf.apply(&R::render(prev, next)?)?,
    }
    if let Some(prev) = prev {
        for ip in R::stale_destinations(prev, next) {
            nf.delete_stale_conntrack(ip)?;
        }
    }
    Ok(synced)
}

/// Reads our table back and rebuilds it atomically if it is missing or its content differs
/// from `desired`'s (a rule, chain or element deleted, added or edited behind our back).
/// Returns how it differed when it rebuilt; a table already right is left alone, so an agent
/// that starts over right tables writes nothing. Lists the whole table: for the periodic
/// check and the start, not for every change.
pub fn reconcile<R: Ruleset>(nf: &dyn Netfilter, desired: &R) -> Result<Option<Drift>> {
    let full = R::render(None, desired)?;
    let drift = match nf.list_table()? {
        None => Some(Drift::Missing),
        Some(json) => match Content::from_listing(&json) {
            Ok(listed) => {
                let differences = Content::from_script(&full)?.differences(&listed);
                (!differences.is_empty()).then_some(Drift::Differs(differences))
            }
            // No proof that the table is right: rebuilding it is safe, an error would leave
            // it as it is.
            Err(e) => Some(Drift::Unreadable(e.to_string())),
        },
    };
    if drift.is_some() {
        nf.apply(&full)?;
    }
    Ok(drift)
}

/// Runs `nft`/`conntrack` inside a namespace via [`Netns::spawn`], and sends incremental
/// changes over nf_tables netlink.
pub struct NsNetfilter<'a> {
    ns: &'a Netns,
    nfnl: Option<&'a OnceLock<NfnlSocket>>,
}

impl<'a> NsNetfilter<'a> {
    /// Incremental changes open a netlink socket each (see [`NfnlSocket`] for its cost).
    pub fn new(ns: &'a Netns) -> NsNetfilter<'a> {
        NsNetfilter { ns, nfnl: None }
    }

    /// Incremental changes go through the socket kept in `nfnl`, opened in `ns` by the first
    /// of them. Keep `nfnl` with the namespace.
    pub fn with_nfnl(ns: &'a Netns, nfnl: &'a OnceLock<NfnlSocket>) -> NsNetfilter<'a> {
        NsNetfilter {
            ns,
            nfnl: Some(nfnl),
        }
    }

    fn ns_name(&self) -> String {
        self.ns.path().display().to_string()
    }

    fn command_error(&self, action: &'static str, command: &'static str, out: &Output) -> Error {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
        if stderr.len() > STDERR_LIMIT {
            let mut cut = STDERR_LIMIT;
            while !stderr.is_char_boundary(cut) {
                cut -= 1;
            }
            stderr.truncate(cut);
            stderr.push_str(" …");
        }
        Error::Command {
            action,
            ns: self.ns_name(),
            command,
            status: out.status.to_string(),
            stderr,
        }
    }

    fn output(&self, action: &'static str, cmd: &mut Command) -> Result<Output> {
        self.ns.output(cmd).map_err(|cause| Error::Netns {
            action,
            ns: self.ns_name(),
            cause,
        })
    }
}

impl Netfilter for NsNetfilter<'_> {
    /// Over nf_tables netlink, without `nft` (see [`crate::nfnl`]).
    fn apply_changes(&self, changes: &Changes) -> Result<()> {
        let Some(slot) = self.nfnl else {
            return NfnlSocket::open(self.ns)?.apply(changes);
        };
        if slot.get().is_none() {
            // Should another thread fill the slot meanwhile, its socket serves and ours closes.
            let _ = slot.set(NfnlSocket::open(self.ns)?);
        }
        slot.get().expect("set above").apply(changes)
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        const ACTION: &str = "apply an nft batch";
        if batch.is_empty() {
            return Ok(());
        }
        let mut cmd = Command::new("nft");
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.ns.spawn(&mut cmd).map_err(|cause| Error::Netns {
            action: ACTION,
            ns: self.ns_name(),
            cause,
        })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let text = batch.as_str().as_bytes();
        // Feed stdin from another thread, so nft never blocks on a full stderr pipe meanwhile.
        let (written, out) = std::thread::scope(|s| {
            let writer = s.spawn(move || stdin.write_all(text));
            let out = child.wait_with_output();
            (writer.join().expect("stdin writer does not panic"), out)
        });
        let io_err = |cause| Error::Io {
            action: ACTION,
            ns: self.ns_name(),
            cause,
        };
        let out = out.map_err(io_err)?;
        if !out.status.success() {
            return Err(self.command_error(ACTION, "nft -f -", &out));
        }
        // A failed write with a successful nft would mean a truncated batch was applied.
        written.map_err(io_err)
    }

    fn list_table(&self) -> Result<Option<String>> {
        const ACTION: &str = "list table ip meshnet";
        let mut cmd = Command::new("nft");
        cmd.args(["-j", "list", "table"]).args(TABLE.split(' '));
        let out = self.output(ACTION, &mut cmd)?;
        if out.status.success() {
            return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
        }
        if String::from_utf8_lossy(&out.stderr).contains("No such file or directory") {
            return Ok(None);
        }
        Err(self.command_error(ACTION, "nft -j list table ip meshnet", &out))
    }

    fn delete_stale_conntrack(&self, backend: Ipv4Addr) -> Result<u64> {
        crate::conntrack::delete_stale(self.ns, backend)
    }
}

/// Records what would run; `listing` plays the table nft would list. With `changes_fail`,
/// incremental changes fail as a netlink batch does when the table is not what we think.
/// For tests only (feature `testing`).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct FakeNetfilter {
    pub applied: std::sync::Mutex<Vec<String>>,
    pub listing: std::sync::Mutex<Option<String>>,
    pub conntrack_deleted: std::sync::Mutex<Vec<Ipv4Addr>>,
    pub changes_fail: std::sync::Mutex<bool>,
}

#[cfg(any(test, feature = "testing"))]
impl Netfilter for FakeNetfilter {
    fn apply(&self, batch: &Batch) -> Result<()> {
        if !batch.is_empty() {
            self.applied.lock().unwrap().push(batch.to_string());
        }
        Ok(())
    }

    fn apply_changes(&self, changes: &Changes) -> Result<()> {
        if *self.changes_fail.lock().unwrap() {
            return Err(Error::Nfnl {
                action: "delete element ip meshnet backends { 256 . 1 }".into(),
                ns: "fake".into(),
                cause: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        self.apply(&changes.to_batch())
    }

    fn list_table(&self) -> Result<Option<String>> {
        Ok(self.listing.lock().unwrap().clone())
    }

    fn delete_stale_conntrack(&self, backend: Ipv4Addr) -> Result<u64> {
        self.conntrack_deleted.lock().unwrap().push(backend);
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fwmark, PortKey, SboxConfig, SboxService, SboxState};
    use proto::model::LbKind;

    fn sbox(backends: &[u8]) -> SboxState {
        let mut s = SboxState::new(SboxConfig {
            ingress_iface: "eth0".into(),
            ingress_subnet: "10.255.0.0/16".parse().unwrap(),
            ingress_ip: "10.255.0.2".parse().unwrap(),
            lb: LbKind::Nftables,
        });
        s.services.insert(
            Fwmark::new(256).unwrap(),
            SboxService {
                ports: [PortKey::udp(53)].into(),
                backends: backends
                    .iter()
                    .map(|b| Ipv4Addr::new(10, 255, 0, *b))
                    .collect(),
                vip: None,
            },
        );
        s
    }

    #[test]
    fn sync_applies_the_diff_and_flushes_udp_flows_of_removed_backends() {
        let nf = FakeNetfilter::default();
        let (before, after) = (sbox(&[10, 11]), sbox(&[10]));
        sync(&nf, None, &before).unwrap();
        sync(&nf, Some(&before), &after).unwrap();
        sync(&nf, Some(&after), &after).unwrap();
        let applied = nf.applied.lock().unwrap();
        assert_eq!(applied.len(), 2, "the no-op sync applies nothing");
        assert!(applied[0].starts_with("add table ip meshnet\n"));
        assert_eq!(
            applied[1],
            SboxState::render(Some(&before), &after)
                .unwrap()
                .to_string()
        );
        assert_eq!(
            *nf.conntrack_deleted.lock().unwrap(),
            vec![Ipv4Addr::new(10, 255, 0, 11)]
        );
    }

    #[test]
    fn a_failed_incremental_change_rebuilds_the_table() {
        let nf = FakeNetfilter::default();
        let (before, after) = (sbox(&[10, 11]), sbox(&[10]));
        *nf.changes_fail.lock().unwrap() = true;
        let synced = sync_report(&nf, Some(&before), &after).unwrap();
        let Synced::Rebuilt(e) = synced else {
            panic!("{synced:?}")
        };
        assert!(e.to_string().starts_with(
            "delete element ip meshnet backends { 256 . 1 } in network namespace fake"
        ));
        let applied = nf.applied.lock().unwrap();
        assert_eq!(
            *applied,
            vec![SboxState::render(None, &after).unwrap().to_string()]
        );
        // The gone backend's flows still go.
        assert_eq!(
            *nf.conntrack_deleted.lock().unwrap(),
            vec![Ipv4Addr::new(10, 255, 0, 11)]
        );
    }

    #[test]
    fn reconcile_rebuilds_only_on_drift_and_says_what_differed() {
        let nf = FakeNetfilter::default();
        let desired = crate::fixtures::sbox(LbKind::Nftables);
        let full = SboxState::render(None, &desired).unwrap().to_string();
        assert_eq!(reconcile(&nf, &desired).unwrap(), Some(Drift::Missing));
        assert_eq!(
            nf.applied.lock().unwrap().as_slice(),
            std::slice::from_ref(&full)
        );

        // A table that is right, as the kernel lists it, is left alone.
        *nf.listing.lock().unwrap() = Some(crate::fixtures::SBOX.into());
        assert_eq!(reconcile(&nf, &desired).unwrap(), None);
        assert_eq!(nf.applied.lock().unwrap().len(), 1, "nothing applied");

        for (listing, how) in [
            (
                crate::fixtures::SBOX_EDITED_ELEMENT,
                "map published: element tcp . 443 : 257 missing; \
                 map published: element tcp . 443 : 258 extra",
            ),
            (
                crate::fixtures::SBOX_MISSING_ELEMENT,
                "map backends: element 256 . 1 : 10.255.0.11 missing",
            ),
            (
                crate::fixtures::SBOX_EDITED_SVC_RULE,
                "chain svc-256 rule 1 differs: \
                 `ct mark set numgen inc mod 3` instead of `ct mark set numgen inc mod 2`",
            ),
        ] {
            *nf.listing.lock().unwrap() = Some(listing.into());
            let drift = reconcile(&nf, &desired).unwrap().expect("a drift");
            assert_eq!(drift.to_string(), how);
        }
        *nf.listing.lock().unwrap() = Some("{\"nftables\": 1}".into());
        assert_eq!(
            reconcile(&nf, &desired).unwrap(),
            Some(Drift::Unreadable(
                "parse the listing of table ip meshnet: no \"nftables\" array".into()
            ))
        );
        let applied = nf.applied.lock().unwrap();
        assert_eq!(applied.len(), 5);
        assert!(applied.iter().all(|a| *a == full), "full rebuilds");
    }
}
