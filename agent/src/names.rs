//! The names of the kernel objects the agent owns, in one place: the planner, the kernel side,
//! cleanup and the watchers must agree on them, and a restarted agent finds its objects by them.
//! Names follow Docker's where Swarm users look for them (`1-<id>` sandboxes, `ingress_sbox`).

/// The node's gateway bridge (Swarm's `docker_gwbridge`).
pub const GWBRIDGE: &str = "mesh_gwbridge";
/// The routing mesh's namespace, in the agent's netns dir.
pub const INGRESS_SBOX: &str = "ingress_sbox";
/// ingress_sbox's leg on the ingress overlay.
pub const SBOX_INGRESS_IF: &str = "eth0";
/// An `lb_<network>` namespace's leg on its network.
pub const LB_IF: &str = "eth0";
/// The name of the bridge in every sandbox.
pub const BRIDGE: &str = "br0";
/// The name of the VXLAN device in every sandbox.
pub const VXLAN: &str = "vxlan0";

/// The namespace file name of a network's sandbox, as Docker names it (`1-` + 10 id chars).
pub fn sandbox_name(network_id: &str) -> String {
    let id: String = network_id.chars().take(10).collect();
    format!("1-{id}")
}

/// The sandbox-side name of a task's endpoint on a network: stable, so a restarted agent finds
/// it, and short enough for IFNAMSIZ.
pub fn veth_name(task: &str, network_id: &str) -> String {
    // FNV-1a: a fixed, dependency-free hash (std's hasher is not stable across releases).
    let mut h: u32 = 0x811c_9dc5;
    for b in task.bytes().chain([b'/']).chain(network_id.bytes()) {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    format!("veth{:07x}", h & 0x0fff_ffff)
}

/// The node end of a task's gwbridge leg: stable per task, and marked as ours by `mgw`.
pub fn gw_veth_name(task: &str) -> String {
    format!("mgw{}", &veth_name(task, GWBRIDGE)[4..])
}
