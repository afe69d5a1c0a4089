//! Incremental changes of our table as data: map elements added or deleted, per-object chains
//! added, flushed, refilled or deleted. One list of [`Step`]s feeds both executors: rendered as
//! `nft -f` text ([`Changes::to_batch`]) or encoded as one nf_tables netlink batch
//! ([`crate::nfnl`]), so both paths apply the very same transition.

use std::fmt;
use std::net::Ipv4Addr;

use crate::render::Batch;
use crate::{Fwmark, PortKey};

/// The key of a map element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// `mark`: a service's fwmark.
    Mark(Fwmark),
    /// `mark . mark`: a service's fwmark and a round-robin slot.
    Slot(Fwmark, u32),
    /// `inet_proto . inet_service`: a published port.
    Port(PortKey),
    /// `ipv4_addr`: a VIP.
    Ip(Ipv4Addr),
}

/// The data of a map element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Mark(Fwmark),
    Ip(Ipv4Addr),
    /// `jump <chain>` in a verdict map.
    Jump(String),
}

/// One change, in the order the transaction applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    DeleteElements {
        map: &'static str,
        keys: Vec<Key>,
    },
    AddElements {
        map: &'static str,
        elements: Vec<(Key, Value)>,
    },
    AddChain(String),
    /// Deletes every rule of the chain.
    FlushChain(String),
    /// Appends `ct mark set numgen inc mod <modulus>` to the chain.
    AddRoundRobin {
        chain: String,
        modulus: u32,
    },
    /// Flushes the chain, then deletes it (older kernels refuse to delete a chain with rules).
    DeleteChain(String),
}

/// An incremental transition of our table; empty when nothing changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    steps: Vec<Step>,
}

impl Changes {
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Appends a step; element steps without elements are dropped.
    pub(crate) fn push(&mut self, step: Step) {
        let empty = match &step {
            Step::DeleteElements { keys, .. } => keys.is_empty(),
            Step::AddElements { elements, .. } => elements.is_empty(),
            _ => false,
        };
        if !empty {
            self.steps.push(step);
        }
    }

    /// The same transition as an `nft -f` script.
    pub fn to_batch(&self) -> Batch {
        let mut b = Batch::default();
        for step in &self.steps {
            match step {
                Step::DeleteElements { map, keys } => {
                    let keys: Vec<String> = keys.iter().map(Key::to_string).collect();
                    b.elements("delete", map, &keys);
                }
                Step::AddElements { map, elements } => {
                    let elements: Vec<String> =
                        elements.iter().map(|(k, v)| format!("{k} : {v}")).collect();
                    b.elements("add", map, &elements);
                }
                Step::AddChain(name) => b.add_chain(name),
                Step::FlushChain(name) => b.flush_chain(name),
                Step::AddRoundRobin { chain, modulus } => {
                    b.add_rule(chain, format_args!("ct mark set numgen inc mod {modulus}"))
                }
                Step::DeleteChain(name) => b.delete_chain(name),
            }
        }
        b
    }
}

impl fmt::Display for Key {
    /// As in an nft element list: `257`, `257 . 1`, `udp . 53`, `10.0.9.2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Mark(m) => write!(f, "{m}"),
            Key::Slot(m, slot) => write!(f, "{m} . {slot}"),
            Key::Port(p) => f.write_str(&p.nft()),
            Key::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Mark(m) => write!(f, "{m}"),
            Value::Ip(ip) => write!(f, "{ip}"),
            Value::Jump(chain) => write!(f, "jump {chain}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_render_as_nft_statements() {
        let m = Fwmark::new(257).unwrap();
        let mut c = Changes::default();
        c.push(Step::DeleteElements {
            map: "vips",
            keys: vec![],
        });
        c.push(Step::DeleteElements {
            map: "backends",
            keys: vec![Key::Slot(m, 1)],
        });
        c.push(Step::FlushChain("svc-257".into()));
        c.push(Step::AddRoundRobin {
            chain: "svc-257".into(),
            modulus: 2,
        });
        c.push(Step::AddElements {
            map: "published",
            elements: vec![(Key::Port(PortKey::udp(53)), Value::Mark(m))],
        });
        c.push(Step::AddElements {
            map: "services",
            elements: vec![(Key::Mark(m), Value::Jump("svc-257".into()))],
        });
        c.push(Step::DeleteChain("svc-258".into()));
        assert_eq!(c.steps().len(), 6, "an empty element step is dropped");
        assert_eq!(
            c.to_batch().as_str(),
            "delete element ip meshnet backends { 257 . 1 }\n\
             flush chain ip meshnet svc-257\n\
             add rule ip meshnet svc-257 ct mark set numgen inc mod 2\n\
             add element ip meshnet published { udp . 53 : 257 }\n\
             add element ip meshnet services { 257 : jump svc-257 }\n\
             flush chain ip meshnet svc-258\n\
             delete chain ip meshnet svc-258\n"
        );
    }
}
