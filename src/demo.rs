//! `mailmesh demo`: three real node processes on 127.0.0.1, driven through their HTTP APIs.
//!
//! It appends to one mailbox on all three at once, makes conflicting flag changes, expunges a
//! message, kills one node with SIGKILL, writes while it is down, restarts it, and prints how long
//! each step took to converge and how many bytes the nodes spent on sync and gossip.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use crate::harness::{digests_agree, sample_message, wait_until, wait_until_every, LocalNode};

const ACCOUNT: &str = "demo@example.org";
const MAILBOX: &str = "INBOX";
const CONVERGENCE_LIMIT: Duration = Duration::from_secs(60);

fn converge(step: &str, nodes: &[&LocalNode], extra: impl Fn() -> bool) -> anyhow::Result<Duration> {
    match wait_until_every(Duration::from_millis(2), CONVERGENCE_LIMIT, || {
        digests_agree(nodes) && extra()
    }) {
        Some(elapsed) => {
            println!("  {step:<48} converged in {:>7.1} ms", elapsed.as_secs_f64() * 1000.0);
            Ok(elapsed)
        }
        None => {
            for node in nodes {
                eprintln!("  {}: digest {}", node.name, node.digest().unwrap_or_default());
            }
            bail!(
                "{step}: the nodes did not converge within {} s",
                CONVERGENCE_LIMIT.as_secs()
            )
        }
    }
}

fn traffic(nodes: &[&LocalNode]) -> (f64, f64) {
    let mut sync = 0.0;
    let mut gossip = 0.0;
    for node in nodes {
        sync += node.metric_sum("mailmesh_sync_bytes_total").unwrap_or(0.0);
        gossip += node.metric_sum("mailmesh_gossip_bytes_total").unwrap_or(0.0);
    }
    (sync, gossip)
}

/// Runs the demo with node processes started from `binary`.
pub fn run(binary: &Path, keep: bool) -> anyhow::Result<()> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let root = std::env::temp_dir().join(format!("mailmesh-demo-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let result = run_in(binary, &root);
    if keep || result.is_err() {
        println!("data and logs kept in {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

fn run_in(binary: &Path, root: &Path) -> anyhow::Result<()> {
    let cluster = "demo";
    let gossip_ms = 250;
    let started = Instant::now();
    println!("mailmesh demo: three nodes on 127.0.0.1 (data in {})", root.display());
    let alpha = LocalNode::spawn(binary, "alpha", &root.join("alpha"), cluster, &[], gossip_ms, &[])?;
    let seed = alpha.listen_address()?;
    let bravo = LocalNode::spawn(
        binary,
        "bravo",
        &root.join("bravo"),
        cluster,
        &[seed.clone()],
        gossip_ms,
        &[],
    )?;
    let mut charlie = LocalNode::spawn(
        binary,
        "charlie",
        &root.join("charlie"),
        cluster,
        &[seed],
        gossip_ms,
        &[],
    )?;
    let peers_up = wait_until(Duration::from_secs(30), || {
        [&alpha, &bravo, &charlie].iter().all(|node| {
            node.status()
                .map(|status| status["peers"].as_array().map(Vec::len).unwrap_or(0) >= 2)
                .unwrap_or(false)
        })
    })
    .context("the three nodes did not all connect to each other within 30 s")?;
    println!(
        "  {:<48} connected in {:>7.1} ms",
        "three nodes, full mesh",
        peers_up.as_secs_f64() * 1000.0
    );

    // 1. Concurrent appends to the same mailbox on all three nodes.
    let per_node = 20;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = [&alpha, &bravo, &charlie]
            .into_iter()
            .map(|node| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for index in 0..per_node {
                        let raw = sample_message(
                            &format!("{}@example.org", node.name),
                            &format!("Hello {index} from {}", node.name),
                            "Appended concurrently on three sites.",
                        );
                        node.append(ACCOUNT, MAILBOX, &raw)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("an append thread panicked"))??;
        }
        Ok(())
    })?;
    let nodes = [&alpha, &bravo, &charlie];
    converge("60 concurrent appends on 3 nodes, all survive", &nodes, || {
        nodes.iter().all(|node| {
            node.messages(ACCOUNT, MAILBOX)
                .map(|list| list.len() == 3 * per_node)
                .unwrap_or(false)
        })
    })?;

    // 2. Conflicting flag changes on one message at the same moment.
    let messages = alpha.messages(ACCOUNT, MAILBOX)?;
    let (target, _) = messages.first().context("no messages")?.clone();
    let flags_path = format!("{}/messages/{target}/flags", LocalNode::mailbox_path(ACCOUNT, MAILBOX));
    std::thread::scope(|scope| {
        scope.spawn(|| alpha.send("POST", &flags_path, br#"{"add":["\\Flagged","\\Seen"]}"#));
        scope.spawn(|| bravo.send("POST", &flags_path, br#"{"remove":["\\Flagged"],"add":["$Important"]}"#));
        scope.spawn(|| charlie.send("POST", &flags_path, br#"{"remove":["\\Seen"]}"#));
    });
    converge("conflicting flag changes on 3 nodes", &nodes, || true)?;
    let flags: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            node.messages(ACCOUNT, MAILBOX)
                .ok()
                .and_then(|list| list.into_iter().find(|(id, _)| id == &target).map(|(_, flags)| flags))
                .unwrap_or_default()
        })
        .collect();
    if flags.iter().any(|set| set != &flags[0]) {
        bail!("flags differ after convergence: {flags:?}");
    }
    println!("  {:<48} {:?} on every node", "winning flags", flags[0]);

    // 3. Expunge one message on charlie.
    let expunge_path = format!("{}/messages/{target}", LocalNode::mailbox_path(ACCOUNT, MAILBOX));
    let response = charlie.send("DELETE", &expunge_path, &[])?;
    if response.status != 204 {
        bail!("expunge answered {}", response.status);
    }
    converge("expunge on one node", &nodes, || {
        nodes.iter().all(|node| {
            node.get(&expunge_path)
                .map(|response| response.status == 404)
                .unwrap_or(false)
        })
    })?;

    // 3b. A mailbox created on alpha, renamed on charlie, and an email moved into it on bravo:
    // the email keeps its ID everywhere.
    let mailboxes_path = format!("/v1/accounts/{}/mailboxes", ACCOUNT.replace('@', "%40"));
    let created = alpha.send("POST", &mailboxes_path, br#"{"name":"Projects"}"#)?;
    if created.status != 201 {
        bail!("creating a mailbox answered {}: {}", created.status, created.text());
    }
    let mailbox_id = created.json()["id"].as_str().unwrap_or_default().to_owned();
    converge("a mailbox created on alpha", &nodes, || {
        charlie
            .get(&LocalNode::mailbox_path(ACCOUNT, "Projects"))
            .is_ok_and(|response| response.status == 200)
    })?;
    let renamed = charlie.send(
        "PATCH",
        &format!("{mailboxes_path}/{mailbox_id}"),
        br#"{"name":"Projects 2026"}"#,
    )?;
    if renamed.status != 200 {
        bail!("renaming the mailbox answered {}: {}", renamed.status, renamed.text());
    }
    let moving = alpha
        .messages(ACCOUNT, MAILBOX)?
        .first()
        .map(|(id, _)| id.clone())
        .unwrap_or_default();
    converge("renamed on charlie", &nodes, || {
        bravo
            .get(&LocalNode::mailbox_path(ACCOUNT, "Projects 2026"))
            .is_ok_and(|response| response.status == 200)
    })?;
    let moved = bravo.send(
        "POST",
        &format!("/v1/accounts/{}/emails/{moving}/move", ACCOUNT.replace('@', "%40")),
        format!(r#"{{"mailbox":"{mailbox_id}"}}"#).as_bytes(),
    )?;
    if moved.status != 200 {
        bail!("moving an email answered {}: {}", moved.status, moved.text());
    }
    converge("an email moved on bravo, same ID everywhere", &nodes, || {
        nodes.iter().all(|node| {
            node.messages(ACCOUNT, "Projects 2026")
                .is_ok_and(|list| list.iter().any(|(id, _)| id == &moving))
        })
    })?;
    let moved_back = alpha.send(
        "POST",
        &format!("/v1/accounts/{}/emails/{moving}/move", ACCOUNT.replace('@', "%40")),
        format!(r#"{{"mailbox":"{MAILBOX}"}}"#).as_bytes(),
    )?;
    if moved_back.status != 200 {
        bail!("moving the email back answered {}", moved_back.status);
    }
    converge("and moved back on alpha", &nodes, || {
        nodes.iter().all(|node| {
            node.messages(ACCOUNT, MAILBOX)
                .is_ok_and(|list| list.iter().any(|(id, _)| id == &moving))
        })
    })?;

    // 4. Kill charlie with SIGKILL, write while it is down, restart it.
    charlie.kill();
    for index in 0..30 {
        let raw = sample_message(
            "late@example.org",
            &format!("Written while charlie is down {index}"),
            "Catch up.",
        );
        if index % 2 == 0 { &alpha } else { &bravo }.append(ACCOUNT, MAILBOX, &raw)?;
    }
    let restart_started = Instant::now();
    charlie.restart()?;
    let nodes = [&alpha, &bravo, &charlie];
    let catch_up = converge("charlie killed, 30 writes, restarted, catches up", &nodes, || true)?;
    let total = charlie.messages(ACCOUNT, MAILBOX)?.len();
    if total != 3 * per_node - 1 + 30 {
        bail!(
            "charlie holds {total} live messages after catching up, expected {}",
            3 * per_node - 1 + 30
        );
    }
    println!(
        "  {:<48} {:>7.1} ms including process start",
        "restart to agreement",
        (restart_started.elapsed().as_secs_f64() * 1000.0).max(catch_up.as_secs_f64() * 1000.0)
    );

    let (sync_bytes, gossip_bytes) = traffic(&nodes);
    println!(
        "  {:<48} {:>9.0} bytes",
        "reconciliation and pull traffic (all nodes)", sync_bytes
    );
    println!("  {:<48} {:>9.0} bytes", "gossip payloads (all nodes)", gossip_bytes);
    println!("  {:<48} {}", "final digest", alpha.digest()?);
    println!(
        "demo finished in {:.1} s: every step converged",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
