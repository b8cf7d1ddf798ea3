//! Discovery that survives the loss of a bootstrap peer, with real node processes on loopback.
//!
//! Three nodes: a; b bootstraps from a; c knows only b. Through the cluster (Kademlia fed by
//! identify) c finds a and connects to it. Then b is killed for good: c and a still replicate to
//! each other. c is killed and started again, still told only of the dead b and listening on a new
//! port: it finds a again from its peer book, and a learns c's new address. A fourth node that
//! announces an address nobody sees it at is reported `unconfirmed` by `/v1/status`.

use std::path::Path;
use std::time::Duration;

use mailmesh::harness::{sample_message, wait_until, LocalNode};

const ACCOUNT: &str = "alice@example.org";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mailmesh"))
}

fn start(directory: &Path, name: &str, peers: &[String], extra: &[String]) -> LocalNode {
    LocalNode::spawn(
        binary(),
        name,
        &directory.join(name),
        "discovery-test",
        peers,
        200,
        extra,
    )
    .unwrap()
}

fn peer_ids(node: &LocalNode) -> Vec<String> {
    node.status()
        .map(|status| {
            status["peers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|peer| peer["peer_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn peer_id(node: &LocalNode) -> String {
    node.status().unwrap()["peer_id"].as_str().unwrap().to_owned()
}

fn holds(node: &LocalNode, id: &str) -> bool {
    node.messages(ACCOUNT, "INBOX")
        .map(|messages| messages.iter().any(|(held, _)| held == id))
        .unwrap_or(false)
}

#[test]
fn a_node_that_knew_only_a_vanished_bootstrap_peer_still_finds_the_cluster() {
    let directory = tempfile::tempdir().unwrap();
    let a = start(directory.path(), "a", &[], &[]);
    let a_address = a.listen_address().unwrap();
    let a_id = peer_id(&a);
    let mut b = start(directory.path(), "b", std::slice::from_ref(&a_address), &[]);
    let b_address = b.listen_address().unwrap();
    let mut c = start(directory.path(), "c", std::slice::from_ref(&b_address), &[]);
    let c_id = peer_id(&c);

    assert!(
        wait_until(Duration::from_secs(60), || peer_ids(&c).contains(&a_id)).is_some(),
        "c never connected to a, which it was never told of: c's peers {:?}",
        peer_ids(&c)
    );
    // c keeps a in its peer book for the next start.
    let book = directory.path().join("c").join("peers");
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read_to_string(&book)
            .is_ok_and(|text| text.contains(&a_id)))
        .is_some(),
        "c's peer book never named a: {:?}",
        std::fs::read_to_string(&book)
    );

    // The only peer c was told of goes away for good.
    b.kill();
    let from_c = c
        .append(
            ACCOUNT,
            "INBOX",
            &sample_message("c@example.org", "from c", "while b is gone"),
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || holds(&a, &from_c)).is_some(),
        "a never got c's message after b was gone"
    );

    // c restarts on a new port, still told only of the dead b.
    let old_address = c.listen_address().unwrap();
    c.restart().unwrap();
    let new_address = c.listen_address().unwrap();
    assert_ne!(old_address, new_address, "the restart should listen on a new port");
    assert!(
        wait_until(Duration::from_secs(60), || peer_ids(&c).contains(&a_id)
            && peer_ids(&a).contains(&c_id))
        .is_some(),
        "c did not find a again from its peer book: c's peers {:?}",
        peer_ids(&c)
    );
    let from_a = a
        .append(
            ACCOUNT,
            "INBOX",
            &sample_message("a@example.org", "from a", "after c came back"),
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || holds(&c, &from_a)).is_some(),
        "c never got a's message after its restart"
    );
    // a dials c at the address c has now (identify told it), not only the old one.
    let new_port = new_address
        .split("/tcp/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let a_knows_new_address = || {
        a.status().is_ok_and(|status| {
            status["peers"].as_array().into_iter().flatten().any(|peer| {
                peer["peer_id"] == c_id.as_str()
                    && peer["addresses"].as_array().into_iter().flatten().any(|address| {
                        address
                            .as_str()
                            .is_some_and(|text| text.contains(&format!("/tcp/{new_port}")))
                    })
            })
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), a_knows_new_address).is_some(),
        "a does not know c's new address: {:?}",
        a.status().map(|status| status["peers"].clone())
    );

    // A wrong announce: nobody sees d at 10.255.255.1, and the status says so.
    let d = start(
        directory.path(),
        "d",
        std::slice::from_ref(&a_address),
        &["--announce".into(), "/ip4/10.255.255.1/tcp/4801".into()],
    );
    let verdict = || {
        d.status()
            .map(|status| status["announce"][0]["verdict"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(60), || verdict() == "unconfirmed").is_some(),
        "d's wrong announce is not reported: {:?}",
        d.status().map(|status| status["announce"].clone())
    );
}
