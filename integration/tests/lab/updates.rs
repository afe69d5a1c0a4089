//! More replacements under the load of `crate::rolling` (lab tier, nftables): an update whose
//! new tasks never get healthy, other tasks coming and going beside a service, and `service
//! rm`. (The node drain is in `crate::rolling`, run on both tiers.)

use integration::cluster::{bin, CONVERGE_TIMEOUT};
use proto::model::UpdateState;

use crate::discovery::sleeper;
use crate::rolling::{assert_no_failures, cluster, inspect, under_load, wait_tag, web};

#[test]
fn an_update_that_never_gets_healthy_pauses_while_the_old_tasks_serve() {
    let c = cluster();
    web(
        &c,
        &["--health-http", "8080/tag", "--health-interval", "1s"],
    );
    let probe = sleeper(&c, "probe", "app");
    wait_tag(&c, "v1");
    // Nothing listens on 8081: the new tasks never pass their check.
    let t = under_load(&c, &probe, || {
        let out = c
            .meshctl(&[
                "service",
                "update",
                "--env-add",
                "HELLO_TAG=broken",
                "--health-http",
                "8081/",
                "--health-retries",
                "2",
                "--health-interval",
                "200ms",
                "web",
            ])
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("paused"), "{err}");
    });
    assert_no_failures("a failing update", &t, &c);
    let s = inspect(&c);
    let status = s.update_status.unwrap();
    assert_eq!(status.state, UpdateState::Paused, "{}", status.message);
    wait_tag(&c, "v1");
    // Back to the spec that worked, the way it was rolled out.
    let t = under_load(&c, &probe, || {
        c.meshctl_ok(&["service", "rollback", "web"]).unwrap();
    });
    assert_no_failures("rollback of a failed update", &t, &c);
    let tasks = c.wait_running("web", 3).unwrap();
    assert!(tasks.iter().all(|t| t.health.is_some()));
}

/// Other tasks coming and going on the same nodes and networks must not disturb a service's
/// traffic. (They did: a bridge without its own MAC took its lowest port's, so every task
/// added or removed could move the gateway's MAC under the published path's cached neighbour
/// entries, stalling replies for seconds.)
#[test]
fn other_tasks_coming_and_going_disturb_no_request() {
    let c = cluster();
    web(&c, &["--health-http", "8080/tag"]);
    let probe = sleeper(&c, "probe", "app");
    wait_tag(&c, "v1");
    let hello = bin("hello-server").display().to_string();
    c.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "other",
        "--replicas",
        "0",
        "--network",
        "app",
        "--detach",
        "--",
        &hello,
        "--port",
        "8080",
    ])
    .unwrap();
    let t = under_load(&c, &probe, || {
        for _ in 0..6 {
            c.meshctl_ok(&["service", "scale", "other=6"]).unwrap();
            c.meshctl_ok(&["service", "scale", "other=0"]).unwrap();
        }
    });
    assert_no_failures("churn", &t, &c);
}

/// `service rm` frees the name, ports and networks at once (so `service rm web && network rm
/// app` works and a new `web` can publish port 80 right away), and its tasks still stop.
#[test]
fn a_removed_service_frees_its_name_and_network_at_once_and_its_tasks_stop() {
    let c = cluster();
    let old = web(&c, &["--health-http", "8080/tag"]);
    c.meshctl_ok(&["service", "rm", "web"]).unwrap();
    c.meshctl_ok(&["network", "rm", "app"]).unwrap();
    c.hello_service("web", 1, &["--publish", "80:8080"])
        .unwrap();
    c.wait_for(
        CONVERGE_TIMEOUT,
        "the removed service's processes gone",
        |_| {
            old.iter()
                .all(|t| {
                    let pid = t.pid.expect("a running task has a pid");
                    !std::path::Path::new(&format!("/proc/{pid}/ns/net")).exists()
                })
                .then_some(())
        },
    )
    .unwrap();
}
