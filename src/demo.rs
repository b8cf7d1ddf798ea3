//! `mailmesh demo`: three real node processes on 127.0.0.1, driven through their HTTP APIs.
//!
//! It appends to one mailbox on all three at once, makes conflicting flag changes, expunges a
//! message, kills one node with SIGKILL, writes while it is down, restarts it, and prints how long
//! each step took to converge and how many bytes the nodes spent on sync and gossip. The nodes
//! share an accounts file and an operator token, as a site would: the harness speaks to the
//! operator API with the token, and a JMAP client logs in to the demo account with HTTP Basic,
//! asks bravo for the newest messages of the inbox without downloading it, and carries the
//! state it got from alpha over to charlie after charlie has been killed and has caught up.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::harness::{digests_agree, sample_message, wait_until, wait_until_every, LocalNode};

const ACCOUNT: &str = "demo@example.org";
/// The demo account's password; the accounts file holds only its Argon2id hash.
const PASSWORD: &str = "demo password";
const JMAP_MAIL: &str = "urn:ietf:params:jmap:mail";
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
    let (site, token) = site_configuration(root)?;
    let mut alpha = LocalNode::spawn(binary, "alpha", &root.join("alpha"), cluster, &[], gossip_ms, &site)?;
    alpha.token = Some(token.clone());
    let seed = alpha.listen_address()?;
    let mut bravo = LocalNode::spawn(
        binary,
        "bravo",
        &root.join("bravo"),
        cluster,
        &[seed.clone()],
        gossip_ms,
        &site,
    )?;
    bravo.token = Some(token.clone());
    let mut charlie = LocalNode::spawn(
        binary,
        "charlie",
        &root.join("charlie"),
        cluster,
        &[seed],
        gossip_ms,
        &site,
    )?;
    charlie.token = Some(token);
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

    // 3c. A webmail's view over JMAP: the newest five messages of the inbox and its count, asked
    // of bravo, without downloading the mailbox.
    let account_id = jmap_account(&bravo)?;
    let asked = Instant::now();
    let inbox = inbox_id(&bravo, &account_id)?;
    let responses = bravo.jmap(
        ACCOUNT,
        PASSWORD,
        json!([
            ["Email/query", {
                "accountId": account_id,
                "filter": {"inMailbox": inbox},
                "sort": [{"property": "receivedAt", "isAscending": false}],
                "limit": 5,
                "calculateTotal": true,
            }, "query"],
            ["Email/get", {
                "accountId": account_id,
                "#ids": {"resultOf": "query", "name": "Email/query", "path": "/ids"},
                "properties": ["subject", "receivedAt"],
            }, "get"],
        ]),
    )?;
    let answered = asked.elapsed();
    let total = responses[0][1]["total"].as_u64().unwrap_or(0);
    let live = 3 * per_node - 1;
    if total != live as u64 {
        bail!("JMAP Email/query on bravo counts {total} messages in the inbox, expected {live}");
    }
    let subjects: Vec<&str> = responses[1][1]["list"]
        .as_array()
        .map(|list| list.iter().filter_map(|email| email["subject"].as_str()).collect())
        .unwrap_or_default();
    if subjects.len() != 5 {
        bail!("JMAP Email/get on bravo returned {} of the newest 5", subjects.len());
    }
    println!(
        "  {:<48} {total} in all, newest 5 in {:>5.1} ms",
        "JMAP on bravo: Email/query + Email/get",
        answered.as_secs_f64() * 1000.0
    );
    println!("  {:<48} {}", "", subjects.join(" | "));
    // The client's state, as alpha gives it, before charlie goes down.
    let state = alpha.jmap(
        ACCOUNT,
        PASSWORD,
        json!([["Email/get", {"accountId": account_id, "ids": []}, "state"]]),
    )?[0][1]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // 4. Kill charlie with SIGKILL, write while it is down, restart it.
    charlie.kill();
    let mut written_while_down = Vec::new();
    for index in 0..30 {
        let raw = sample_message(
            "late@example.org",
            &format!("Written while charlie is down {index}"),
            "Catch up.",
        );
        written_while_down.push(if index % 2 == 0 { &alpha } else { &bravo }.append(ACCOUNT, MAILBOX, &raw)?);
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

    // 4b. The JMAP client fails over: alpha's state, handed to charlie, gives exactly the 30
    // messages written while charlie was down.
    let (created, others) = email_changes(&charlie, &account_id, &state)?;
    written_while_down.sort();
    if created != written_while_down || others != 0 {
        bail!(
            "Email/changes on charlie from alpha's state listed {} created (expected the {} written while it was down) and {others} updated or destroyed",
            created.len(),
            written_while_down.len()
        );
    }
    println!(
        "  {:<48} {} created, as written elsewhere",
        "JMAP state from alpha, Email/changes on charlie",
        created.len()
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

/// Writes the site's accounts file (the demo account, its password hashed with Argon2id) and
/// operator token into `root`; returns the node flags naming them, and the token.
fn site_configuration(root: &Path) -> anyhow::Result<(Vec<String>, String)> {
    let hash = crate::accounts::hash_password(PASSWORD).map_err(anyhow::Error::msg)?;
    let accounts = root.join("accounts");
    std::fs::write(&accounts, format!("{ACCOUNT}:{hash}\n"))?;
    let token = format!("demo-token-{:016x}", rand::random::<u64>());
    let token_file = root.join("token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    let flags = vec![
        "--accounts-file".to_owned(),
        accounts.display().to_string(),
        "--http-token-file".to_owned(),
        token_file.display().to_string(),
    ];
    Ok((flags, token))
}

/// The demo account's JMAP account ID, from the session resource.
fn jmap_account(node: &LocalNode) -> anyhow::Result<String> {
    let session = node.jmap_send(ACCOUNT, PASSWORD, "GET", "/.well-known/jmap", &Value::Null)?;
    session["primaryAccounts"][JMAP_MAIL]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("the JMAP session names no mail account: {session}"))
}

/// The ID of the account's inbox, by role.
fn inbox_id(node: &LocalNode, account_id: &str) -> anyhow::Result<String> {
    let responses = node.jmap(
        ACCOUNT,
        PASSWORD,
        json!([["Mailbox/query", {"accountId": account_id, "filter": {"role": "inbox"}}, "inbox"]]),
    )?;
    responses[0][1]["ids"][0]
        .as_str()
        .map(str::to_owned)
        .context("Mailbox/query found no mailbox with the inbox role")
}

/// Email/changes from `state` until there are no more: the created IDs, sorted, and how many
/// were updated or destroyed.
fn email_changes(node: &LocalNode, account_id: &str, state: &str) -> anyhow::Result<(Vec<String>, usize)> {
    let mut since = state.to_owned();
    let mut created = Vec::new();
    let mut others = 0;
    for _ in 0..1000 {
        let responses = node.jmap(
            ACCOUNT,
            PASSWORD,
            json!([["Email/changes", {"accountId": account_id, "sinceState": since, "maxChanges": 16}, "changes"]]),
        )?;
        let changes = &responses[0][1];
        let ids = |name: &str| -> Vec<String> {
            changes[name]
                .as_array()
                .map(|list| list.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default()
        };
        created.extend(ids("created"));
        others += ids("updated").len() + ids("destroyed").len();
        since = changes["newState"].as_str().unwrap_or_default().to_owned();
        if changes["hasMoreChanges"] != Value::Bool(true) {
            created.sort();
            return Ok((created, others));
        }
    }
    bail!("Email/changes on {} still had more changes after 1000 calls", node.name)
}
