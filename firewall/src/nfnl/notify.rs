//! Notifications of nf_tables changes (multicast group [`NFNLGRP_NFTABLES`]): which of them
//! change our table.

use super::wire::{self, HEADERS};
use super::{
    NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4, NFTA_TABLE, NFT_MSG_DELCHAIN, NFT_MSG_DELRULE,
    NFT_MSG_DELSETELEM, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWSETELEM, TABLE_NAME,
};
use crate::TABLE;

/// nf_tables' multicast group (linux/netfilter/nfnetlink.h): a socket that joins it hears of
/// every change to its namespace's ruleset.
pub const NFNLGRP_NFTABLES: u32 = 7;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;

/// The changes to our table in one datagram of nf_tables notifications, for the log
/// (`nf_tables: rule deleted in table ip meshnet`). Every message that changes a table's
/// content names its table in attribute 1 (`NFTA_*_TABLE`); the others (a new generation,
/// flowtables, objects) and other tables are not ours. A message cut short ends the reading.
pub fn our_table_changes(datagram: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for msg in wire::whole_messages(datagram) {
        if msg.kind >> 8 != NFNL_SUBSYS_NFTABLES {
            continue;
        }
        let verb = match msg.kind & 0xff {
            NFT_MSG_NEWTABLE => "table added",
            NFT_MSG_DELTABLE => "table deleted",
            NFT_MSG_NEWCHAIN => "chain added or changed",
            NFT_MSG_DELCHAIN => "chain deleted",
            NFT_MSG_NEWRULE => "rule added or changed",
            NFT_MSG_DELRULE => "rule deleted",
            NFT_MSG_NEWSET => "set added",
            NFT_MSG_DELSET => "set deleted",
            NFT_MSG_NEWSETELEM => "element added",
            NFT_MSG_DELSETELEM => "element deleted",
            _ => continue,
        };
        // nfgenmsg's family, then the attributes.
        if msg.bytes.get(16) != Some(&NFPROTO_IPV4) {
            continue;
        }
        let attrs = msg.bytes.get(HEADERS..).and_then(wire::attrs);
        let table = attrs
            .into_iter()
            .flatten()
            .find(|(kind, _, _)| *kind == NFTA_TABLE)
            .map(|(_, _, name)| name.split(|b| *b == 0).next().unwrap_or_default());
        if table == Some(TABLE_NAME.as_bytes()) {
            out.push(format!("nf_tables: {verb} in table {TABLE}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{attr_str, begin_msg, end_msg};

    /// An nf_tables notification of `msg` in table `family table`.
    fn nft_msg(msg: u16, family: u8, table: &str) -> Vec<u8> {
        let mut m = Vec::new();
        let start = begin_msg(&mut m, (NFNL_SUBSYS_NFTABLES << 8) | msg, 0, 0, family, 0);
        attr_str(&mut m, NFTA_TABLE, table);
        end_msg(&mut m, start);
        m
    }

    #[test]
    fn only_changes_to_our_table_count() {
        let datagram = [
            nft_msg(8, NFPROTO_IPV4, "meshnet"),
            nft_msg(14, NFPROTO_IPV4, "filter"),
            nft_msg(2, 1, "meshnet"),
            nft_msg(15, NFPROTO_IPV4, "meshnet"),
            nft_msg(12, NFPROTO_IPV4, "meshnet"),
        ]
        .concat();
        assert_eq!(
            our_table_changes(&datagram),
            [
                "nf_tables: rule deleted in table ip meshnet",
                "nf_tables: element added in table ip meshnet"
            ]
        );
        let table = nft_msg(2, NFPROTO_IPV4, "meshnet");
        for cut in 0..table.len() {
            assert!(our_table_changes(&table[..cut]).is_empty(), "cut at {cut}");
        }
        // Whole messages before one cut short still count.
        let mut two = nft_msg(6, NFPROTO_IPV4, "meshnet");
        two.extend_from_slice(&table[..table.len() - 1]);
        assert_eq!(
            our_table_changes(&two),
            ["nf_tables: rule added or changed in table ip meshnet"]
        );
    }
}
