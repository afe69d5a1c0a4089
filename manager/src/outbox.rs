//! What the manager sends one agent: its messages in order, except assignments, of which only
//! the newest waits. An assignment is complete, so an agent slow to read (or a burst of changes)
//! gets the newest one rather than every one in turn, and the manager holds at most one per
//! node however far the agent lags.

use std::sync::{Arc, Mutex};

use proto::agent::{Assignment, ManagerMsg};
use tokio::sync::mpsc::{self, error::SendError, UnboundedReceiver, UnboundedSender};

enum Queued {
    Msg(ManagerMsg),
    /// The newest assignment goes here, taken from the slot when this is read.
    Assign,
}

type Slot = Arc<Mutex<Option<Arc<Assignment>>>>;

fn take(slot: &Slot) -> Option<Arc<Assignment>> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// A new agent's outbox: the manager's end and the connection's.
pub fn outbox() -> (OutboxTx, OutboxRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let slot = Slot::default();
    (
        OutboxTx {
            tx,
            slot: slot.clone(),
        },
        OutboxRx { rx, slot },
    )
}

#[derive(Clone)]
pub struct OutboxTx {
    tx: UnboundedSender<Queued>,
    slot: Slot,
}

impl OutboxTx {
    /// Queues `msg`; an assignment replaces one still waiting. Fails once the connection's end
    /// is gone.
    pub fn send(&self, msg: ManagerMsg) -> Result<(), SendError<ManagerMsg>> {
        match msg {
            ManagerMsg::Assign(a) => {
                let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
                let waiting = slot.replace(a.clone()).is_some();
                if waiting {
                    return if self.tx.is_closed() {
                        Err(SendError(ManagerMsg::Assign(a)))
                    } else {
                        Ok(())
                    };
                }
                self.tx
                    .send(Queued::Assign)
                    .map_err(|_| SendError(ManagerMsg::Assign(a)))
            }
            msg => self
                .tx
                .send(Queued::Msg(msg))
                .map_err(|SendError(q)| match q {
                    Queued::Msg(m) => SendError(m),
                    Queued::Assign => unreachable!("a message was sent"),
                }),
        }
    }
}

pub struct OutboxRx {
    rx: UnboundedReceiver<Queued>,
    slot: Slot,
}

impl OutboxRx {
    fn resolve(&self, q: Queued) -> Option<ManagerMsg> {
        match q {
            Queued::Msg(m) => Some(m),
            Queued::Assign => take(&self.slot).map(ManagerMsg::Assign),
        }
    }

    /// The next message; None once the manager's end is gone.
    pub async fn recv(&mut self) -> Option<ManagerMsg> {
        loop {
            let q = self.rx.recv().await?;
            if let Some(m) = self.resolve(q) {
                return Some(m);
            }
        }
    }

    /// Whether the manager's end is gone (the session was ended).
    #[cfg(test)]
    pub fn is_closed(&self) -> bool {
        self.rx.is_closed()
    }

    /// The next message if one is waiting.
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<ManagerMsg> {
        loop {
            let q = self.rx.try_recv().ok()?;
            if let Some(m) = self.resolve(q) {
                return Some(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(revision: u64) -> ManagerMsg {
        ManagerMsg::Assign(Arc::new(Assignment {
            revision,
            ..Assignment::default()
        }))
    }

    fn kinds(rx: &mut OutboxRx) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|m| match m {
                ManagerMsg::Assign(a) => format!("assign {}", a.revision),
                m => m.kind().to_string(),
            })
            .collect()
    }

    #[test]
    fn messages_keep_their_order_and_only_the_newest_waiting_assignment_is_sent() {
        let (tx, mut rx) = outbox();
        tx.send(ManagerMsg::Managers { addrs: vec![] }).unwrap();
        tx.send(assign(1)).unwrap();
        tx.send(assign(2)).unwrap();
        tx.send(ManagerMsg::Refused { reason: "x".into() }).unwrap();
        tx.send(assign(3)).unwrap();
        assert_eq!(kinds(&mut rx), ["managers", "assign 3", "refused"]);
        // Once read, the next assignment is queued again.
        tx.send(assign(4)).unwrap();
        assert_eq!(kinds(&mut rx), ["assign 4"]);
        drop(rx);
        assert!(tx.send(assign(5)).is_err());
        assert!(tx.send(assign(6)).is_err(), "also with one waiting");
        assert!(tx.send(ManagerMsg::Managers { addrs: vec![] }).is_err());
    }
}
