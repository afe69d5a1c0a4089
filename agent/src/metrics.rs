//! The agent's metrics, served on `--metrics-listen` (prefix `meshnet_agent_`).

use mesh_metrics::Registry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::lifecycle::{Phase, TaskRecord};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Of a pass: `ok`, or `incomplete` when an action failed (the pass is retried); of a DNS
    /// query: how it was answered; of a health check: `pass` or `fail`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

/// Handles to the metrics; clones share the values.
#[derive(Clone)]
pub struct AgentMetrics {
    passes: Family<ResultLabel, Counter>,
    pass_seconds: Histogram,
    applied_revision: Gauge,
    tasks: Family<PhaseLabel, Gauge>,
    pub manager_connected: Gauge,
    dns_queries: Family<ResultLabel, Counter>,
    repairs: Family<KindLabel, Counter>,
    health_checks: Family<ResultLabel, Counter>,
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        AgentMetrics {
            passes: Family::default(),
            // 1 ms to ~16 s.
            pass_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            applied_revision: Gauge::default(),
            tasks: Family::default(),
            manager_connected: Gauge::default(),
            dns_queries: Family::default(),
            repairs: Family::default(),
            health_checks: Family::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "reconcile_passes",
            "Reconcile passes (observe, plan, apply) by result",
            self.passes.clone(),
        );
        registry.register(
            "reconcile_pass_seconds",
            "Duration of reconcile passes",
            self.pass_seconds.clone(),
        );
        registry.register(
            "applied_revision",
            "Revision of the last assignment applied without error",
            self.applied_revision.clone(),
        );
        registry.register(
            "tasks",
            "Tasks known to the agent, by phase",
            self.tasks.clone(),
        );
        registry.register(
            "manager_connected",
            "1 while the agent's connection to the manager is up",
            self.manager_connected.clone(),
        );
        registry.register(
            "dns_queries",
            "Queries to the embedded DNS resolver by result: answered, empty (a cluster name \
             without that record type), forwarded, servfail, formerr, notimp, dropped",
            self.dns_queries.clone(),
        );
        registry.register(
            "repairs",
            "Actions that put back what drifted from the applied state (deleted or altered by \
             someone else), by kind of object",
            self.repairs.clone(),
        );
        registry.register(
            "health_checks",
            "Health check probes of tasks, by result: pass or fail",
            self.health_checks.clone(),
        );
    }

    pub fn health_check(&self, passed: bool) {
        let result = if passed { "pass" } else { "fail" };
        self.health_checks
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    pub fn repair(&self, kind: &str) {
        self.repairs
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// The counter of queries to the embedded resolver with this result: taken once, so that
    /// counting a query costs no label lookup.
    pub fn dns_queries(&self, result: &str) -> Counter {
        self.dns_queries
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .clone()
    }

    /// One pass: its duration, whether it completed, and the tasks' phases after it.
    pub fn pass<'a>(
        &self,
        seconds: f64,
        errors: usize,
        records: impl IntoIterator<Item = &'a TaskRecord>,
    ) {
        self.pass_seconds.observe(seconds);
        let result = if errors == 0 { "ok" } else { "incomplete" };
        self.passes
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        let mut counts = [0i64; 3];
        for r in records {
            counts[match r.phase {
                Phase::Starting => 0,
                Phase::Running { .. } => 1,
                Phase::Exited { .. } => 2,
            }] += 1;
        }
        for (phase, n) in ["starting", "running", "exited"].into_iter().zip(counts) {
            self.tasks
                .get_or_create(&PhaseLabel {
                    phase: phase.into(),
                })
                .set(n);
        }
    }

    pub fn applied(&self, revision: u64) {
        self.applied_revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_counted_with_its_tasks() {
        let m = AgentMetrics::new();
        let mut registry = Registry::with_prefix("meshnet_agent");
        m.register(&mut registry);
        m.pass(0.002, 0, []);
        m.pass(0.004, 2, []);
        m.applied(7);
        m.manager_connected.set(1);
        let answered = m.dns_queries("answered");
        answered.inc();
        m.dns_queries("answered").inc();
        m.dns_queries("formerr").inc();
        m.repair("route");
        m.repair("route");
        m.health_check(true);
        m.health_check(false);
        m.health_check(false);
        let text = mesh_metrics::render(&registry);
        for line in [
            "meshnet_agent_reconcile_passes_total{result=\"ok\"} 1",
            "meshnet_agent_reconcile_passes_total{result=\"incomplete\"} 1",
            "meshnet_agent_reconcile_pass_seconds_count 2",
            "meshnet_agent_applied_revision 7",
            "meshnet_agent_tasks{phase=\"running\"} 0",
            "meshnet_agent_manager_connected 1",
            "meshnet_agent_dns_queries_total{result=\"answered\"} 2",
            "meshnet_agent_dns_queries_total{result=\"formerr\"} 1",
            "meshnet_agent_repairs_total{kind=\"route\"} 2",
            "meshnet_agent_health_checks_total{result=\"pass\"} 1",
            "meshnet_agent_health_checks_total{result=\"fail\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
