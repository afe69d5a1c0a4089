//! The cluster's state in etcd, for several managers (`--store etcd://...`).
//!
//! - **Layout.** Under `/meshnet/`: `state/meta` (everything but the four tables, with the
//!   format), `state/{nodes,networks,services,tasks}/<id>` (one key per record, so a change
//!   writes only the records it touched and its size does not grow with the cluster), `ca` (the
//!   cluster's root CA and id, shared by every manager), `managers/<addr>` (each running
//!   manager, on its lease) and the election `leader`.
//! - **Leadership.** Each manager holds a lease (TTL [`LEASE_TTL`]) kept alive twice a second
//!   and campaigns on `leader`; the winner runs the orchestrator. A manager that has not renewed
//!   its lease for a TTL steps down on its own, and every write is a transaction that succeeds
//!   only while its leader key still exists with the revision it was elected at, so a deposed
//!   leader cannot write even before it notices.
//! - **Threads.** The client runs on a runtime of its own: `save` is called under the cluster's
//!   lock and waits for etcd there, which would starve the main runtime's own etcd tasks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::records::{changes, decode, Op, STATE};
use crate::state::State;
use crate::store::{Store, StoreError};

const PREFIX: &str = "/meshnet/";
const CA: &str = "/meshnet/ca";
const MANAGERS: &str = "/meshnet/managers/";
const ELECTION: &str = "/meshnet/leader";

/// A dead leader is replaced about this long after its last renewal (Kubernetes waits 15 s,
/// Swarm's raft about 10 s). etcd's own election timeout is 1 s, so shorter would depose
/// leaders on an etcd election.
pub const LEASE_TTL: i64 = 2;
const RENEW_EVERY: Duration = Duration::from_millis(500);
/// How often followers look up the leader and the managers.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Every etcd call is bounded, so a lost quorum shows as an error rather than a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Keys per page of a range read, and the largest page the client accepts (a node's record
/// holds its whole assignment, which grows with the cluster).
const PAGE_KEYS: i64 = 1000;
const MAX_PAGE_BYTES: usize = 256 * 1024 * 1024;
/// How long a starting manager waits for etcd to answer.
const READY_WAIT: Duration = Duration::from_secs(120);

/// `--store etcd://host:2379[,host:2379...]`, with `--etcd-ca`, `--etcd-cert` and `--etcd-key`
/// for TLS (then the endpoints are reached over https).
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
}

#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: String,
    pub identity: Option<(String, String)>,
}

impl EtcdConfig {
    /// Parses `etcd://host:port[,host:port...]`.
    pub fn parse(url: &str, tls: Option<EtcdTls>) -> Result<EtcdConfig, String> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{url}: a store is etcd://HOST:PORT[,HOST:PORT...]"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoints = Vec::new();
        for hp in rest.split(',').map(str::trim) {
            let ok = hp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(format!("{url}: {hp:?} is not HOST:PORT"));
            }
            endpoints.push(format!("{scheme}://{hp}"));
        }
        Ok(EtcdConfig { endpoints, tls })
    }
}

/// What a manager says about itself, in `managers/` and as the leader's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerInfo {
    /// The node address it advertises: matches a node's address in `node ls`.
    pub addr: std::net::IpAddr,
    /// Where agents reach it (ADDR:PORT).
    pub agents: String,
    /// Its TCP API (ADDR:PORT), where followers forward requests.
    pub api: String,
}

/// The cluster's CA as every manager shares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRecord {
    pub cluster_id: String,
    pub cert: String,
    pub key: String,
}

/// The leader key this manager was elected with: its writes are fenced on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub rev: i64,
}

/// What the leadership loop tells the manager.
#[derive(Debug)]
pub enum Event {
    Elected(Fence),
    /// Leadership, or the chance of it, is gone (lease lost, etcd unreachable).
    Lost(String),
    /// Who leads now (polled), and the running managers.
    View {
        leader: Option<ManagerInfo>,
        managers: Vec<ManagerInfo>,
    },
}

/// The client's runtime. Dropped from async code (a manager that gives up while starting),
/// it must not wait for its tasks there, which tokio refuses with a panic.
struct Rt(Option<tokio::runtime::Runtime>);

impl Rt {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("taken only on drop").handle()
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A connected client and the runtime it runs on.
#[derive(Clone)]
pub struct Etcd {
    rt: Arc<Rt>,
    client: Client,
    endpoints: String,
    /// The lease of the current term, if any.
    lease: Arc<Mutex<Option<i64>>>,
}

impl Etcd {
    pub async fn connect(config: &EtcdConfig) -> anyhow::Result<Etcd> {
        let rt = Arc::new(Rt(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("etcd")
                .enable_all()
                .build()
                .context("start the etcd client's runtime")?,
        )));
        // No timeout for every request: a campaign waits as long as another manager leads.
        // Calls are bounded one by one instead (`retrying`).
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        if let Some(tls) = &config.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(tls.ca.clone()));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert.clone(), key.clone()));
            }
            options = options.with_tls(t);
        }
        let endpoints = config.endpoints.clone();
        let client = rt
            .handle()
            .spawn(async move { Client::connect(endpoints, Some(options)).await })
            .await
            .context("the etcd client's runtime")?
            .with_context(|| format!("connect to etcd at {}", config.endpoints.join(",")))?;
        Ok(Etcd {
            rt,
            client,
            endpoints: config.endpoints.join(","),
            lease: Arc::new(Mutex::new(None)),
        })
    }

    /// Runs `f` on the client's runtime and waits for it from async code.
    async fn run<T, F>(&self, f: impl Fn(Client) -> F + Send + 'static) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let client = self.client.clone();
        self.rt
            .handle()
            .spawn(retrying(client, f))
            .await
            .context("the etcd client's runtime")?
            .map_err(|e| anyhow::anyhow!("etcd at {}: {e}", self.endpoints))
    }

    /// Runs `f` on the client's runtime and blocks this thread until it is done: for a save
    /// under the cluster's lock.
    fn run_blocking<T, F>(&self, f: impl Fn(Client) -> F + Send + 'static) -> Result<T, String>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let client = self.client.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.handle().spawn(async move {
            let _ = tx.send(retrying(client, f).await);
        });
        match rx.recv() {
            Ok(r) => r.map_err(|e| format!("{}: {e}", self.endpoints)),
            Err(_) => Err("the etcd client's runtime is gone".into()),
        }
    }

    /// Waits until etcd answers: members started together with the managers have no quorum
    /// for a moment, and a manager should wait that out, not exit.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WAIT;
        loop {
            match self.range(CA).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!("waiting for etcd: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.context(format!("etcd did not answer for {READY_WAIT:?}"))),
            }
        }
    }

    /// Every key under `prefix`, in key order, read in pages at one revision (a consistent
    /// view, in responses well under the gRPC message limit however big the cluster).
    async fn range(&self, prefix: &'static str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        // Prefixes end in '/' (or are whole keys): the next byte value ends the range.
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a prefix is not empty") += 1;
        let mut out = Vec::new();
        let mut start = prefix.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let (from, to) = (start.clone(), end.clone());
            let resp = self
                .run(move |c| {
                    let (from, to) = (from.clone(), to.clone());
                    async move {
                        let mut options = GetOptions::new().with_range(to).with_limit(PAGE_KEYS);
                        if revision > 0 {
                            options = options.with_revision(revision);
                        }
                        c.kv_client()
                            .max_decoding_message_size(MAX_PAGE_BYTES)
                            .get(from, Some(options))
                            .await
                    }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            out.extend(resp.kvs().iter().map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            }));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// The stored state, if a leader ever saved one.
    pub async fn load(&self) -> anyhow::Result<Option<State>> {
        decode(self.range(STATE).await?).map_err(|e| anyhow::anyhow!(e))
    }

    pub async fn ca(&self) -> anyhow::Result<Option<CaRecord>> {
        let kvs = self.range(CA).await?;
        let Some((_, v)) = kvs.into_iter().find(|(k, _)| k == CA) else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .with_context(|| format!("parse {CA} in etcd"))
    }

    /// Stores the CA unless one is there: false if another manager's was first.
    pub async fn put_ca_if_absent(&self, ca: &CaRecord) -> anyhow::Result<bool> {
        let value = serde_json::to_vec(ca)?;
        let resp = self
            .run(move |mut c| {
                let value = value.clone();
                async move {
                    c.txn(
                        Txn::new()
                            .when([Compare::create_revision(CA, CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(CA, value, None)]),
                    )
                    .await
                }
            })
            .await?;
        Ok(resp.succeeded())
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Gives up the current term's lease: leadership, if held, passes at once instead of when
    /// the lease would run out, and this manager campaigns again with a new one.
    pub async fn revoke(&self) {
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(id) = lease {
            if let Err(e) = self
                .run(move |mut c| async move { c.lease_revoke(id).await })
                .await
            {
                // Expired already, or etcd is away: then it expires on its own.
                tracing::debug!("give up the etcd lease: {e:#}");
            }
        }
    }

    /// Campaigns for leadership for as long as the manager runs, and reports what it sees.
    pub fn campaign(&self, me: ManagerInfo, events: UnboundedSender<Event>) {
        let this = self.clone();
        let tx = events.clone();
        self.rt.handle().spawn(async move {
            loop {
                let why = match this.term(&me, &tx).await {
                    Ok(()) => "the lease ended".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                // A lease that may still live would hold our old place in the election.
                this.revoke().await;
                if tx.send(Event::Lost(why)).is_err() {
                    return;
                }
                tokio::time::sleep(RENEW_EVERY).await;
            }
        });
        let this = self.clone();
        self.rt.handle().spawn(async move {
            loop {
                let view = this.view().await;
                let event = match view {
                    Ok((leader, managers)) => Event::View { leader, managers },
                    Err(e) => {
                        tracing::debug!("look up the managers in etcd: {e:#}");
                        Event::View {
                            leader: None,
                            managers: Vec::new(),
                        }
                    }
                };
                if events.send(event).is_err() {
                    return;
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
        });
    }

    /// The leader (none while an election runs) and the running managers.
    async fn view(&self) -> anyhow::Result<(Option<ManagerInfo>, Vec<ManagerInfo>)> {
        let managers = self
            .range(MANAGERS)
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        // With no leader etcd answers an error ("election: no leader"), not an empty value.
        let leader = self
            .run(|mut c| async move { c.leader(ELECTION).await })
            .await
            .ok()
            .and_then(|r| {
                r.kv()
                    .and_then(|kv| serde_json::from_slice(kv.value()).ok())
            });
        Ok((leader, managers))
    }

    /// One lease: registered, campaigning, then leading, until the lease is lost.
    async fn term(&self, me: &ManagerInfo, events: &UnboundedSender<Event>) -> anyhow::Result<()> {
        let lease = self
            .run(|mut c| async move { c.lease_grant(LEASE_TTL, None).await })
            .await
            .context("grant a lease")?
            .id();
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        let value = serde_json::to_vec(me)?;
        let key = format!("{MANAGERS}{}", me.addr);
        let v = value.clone();
        self.run(move |mut c| {
            let (key, v) = (key.clone(), v.clone());
            async move {
                c.put(key, v, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await
        .context("register in etcd")?;
        let keep = keep_alive(self.client.clone(), lease);
        tokio::pin!(keep);
        let mut campaigner = self.client.clone();
        let elected = tokio::select! {
            r = &mut keep => return r,
            r = campaigner.campaign(ELECTION, value, lease) => r.context("campaign")?,
        };
        let leader = elected
            .leader()
            .context("etcd elected us without a leader key")?;
        let fence = Fence {
            key: leader.key().to_vec(),
            rev: leader.rev(),
        };
        if events.send(Event::Elected(fence)).is_err() {
            return Ok(());
        }
        keep.await
    }
}

/// Renews `lease` twice a second until it is lost: expired, revoked, or not renewed for
/// nearly a TTL (then this manager steps down before a rival could be elected on it). A
/// keep-alive stream that breaks, as when its etcd member dies, is opened again on another.
async fn keep_alive(client: Client, lease: i64) -> anyhow::Result<()> {
    let ttl = Duration::from_secs(LEASE_TTL as u64);
    let mut renewed = Instant::now();
    let mut stream = None;
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let since = renewed.elapsed();
        if since >= ttl - RENEW_EVERY {
            bail!("the lease was not renewed for {since:?}");
        }
        if stream.is_none() {
            let mut c = client.clone();
            match tokio::time::timeout(RENEW_EVERY, c.lease_keep_alive(lease)).await {
                Ok(Ok(s)) => stream = Some(s),
                Ok(Err(e)) => tracing::debug!("open the lease's keep-alive: {e}"),
                Err(_) => tracing::debug!("open the lease's keep-alive: no answer"),
            }
        }
        let Some((keeper, responses)) = stream.as_mut() else {
            continue;
        };
        let answer = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(RENEW_EVERY, answer).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => renewed = Instant::now(),
            Ok(Ok(Some(_))) => bail!("the lease expired"),
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => stream = None,
        }
    }
}

/// Runs `f` until it succeeds, fails for a reason other than an unreachable member, or
/// [`CALL_TIMEOUT`] has passed. The client spreads calls over the endpoints, and one that is
/// down (or not up yet) fails the calls sent to it; etcd with its quorum answers on the next.
async fn retrying<T, F>(client: Client, f: impl Fn(Client) -> F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
    loop {
        let last = match tokio::time::timeout_at(deadline, f(client.clone())).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if unreachable(&e) => e.to_string(),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
            return Err(format!(
                "no member answered within {CALL_TIMEOUT:?}: {last}"
            ));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A member that cannot be reached, as opposed to an answer.
fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
        ),
        _ => false,
    }
}

/// Writes the state as [`changes`] from the last saved one, fenced on the leader key.
pub struct EtcdStore {
    etcd: Etcd,
    /// Set while this manager leads.
    fence: Arc<Mutex<Option<Fence>>>,
}

impl EtcdStore {
    pub fn new(etcd: Etcd) -> (EtcdStore, Arc<Mutex<Option<Fence>>>) {
        let fence = Arc::new(Mutex::new(None));
        (
            EtcdStore {
                etcd,
                fence: fence.clone(),
            },
            fence,
        )
    }
}

impl Store for EtcdStore {
    fn save(&mut self, prev: &State, next: &State) -> Result<(), StoreError> {
        let ops: Vec<TxnOp> = changes(prev, next)
            .map_err(|e| StoreError::Etcd(format!("encode the state: {e}")))?
            .into_iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(k, v, None),
                Op::Delete(k) => TxnOp::delete(k, None),
            })
            .collect();
        if ops.is_empty() {
            return Ok(());
        }
        let fence = self
            .fence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::NotLeader(None))?;
        let n = ops.len();
        let resp = self
            .etcd
            .run_blocking(move |mut c| {
                let (ops, fence) = (ops.clone(), fence.clone());
                async move {
                    c.txn(
                        Txn::new()
                            .when([Compare::create_revision(
                                fence.key,
                                CompareOp::Equal,
                                fence.rev,
                            )])
                            .and_then(ops),
                    )
                    .await
                }
            })
            .map_err(|e| {
                let hint = if e.contains("too many operations") {
                    format!(" (this change writes {n} keys: raise etcd's --max-txn-ops)")
                } else {
                    String::new()
                };
                StoreError::Etcd(format!("{e}{hint}"))
            })?;
        if !resp.succeeded() {
            *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(StoreError::NotLeader(None));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("etcd at {}", self.etcd.endpoints())
    }
}

/// Whether anything of a cluster is in etcd yet (for `--import`, which needs it empty).
pub async fn is_empty(etcd: &Etcd) -> anyhow::Result<bool> {
    Ok(etcd
        .range(PREFIX)
        .await?
        .iter()
        .all(|(k, _)| k.starts_with(MANAGERS) || k.starts_with(ELECTION)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        let c = EtcdConfig::parse("etcd://10.0.0.1:2379,10.0.0.2:2379", None).unwrap();
        assert_eq!(
            c.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        let tls = EtcdTls {
            ca: String::new(),
            identity: None,
        };
        let c = EtcdConfig::parse("etcd://e1:2379", Some(tls)).unwrap();
        assert_eq!(c.endpoints, ["https://e1:2379"]);
        for bad in [
            "http://e1:2379",
            "etcd://e1",
            "etcd://:2379",
            "etcd://e1:0",
            "etcd://e1:2379,",
        ] {
            assert!(EtcdConfig::parse(bad, None).is_err(), "{bad}");
        }
    }
}
