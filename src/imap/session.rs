//! One IMAP session's state and commands (RFC 3501, with IDLE, UIDPLUS's APPENDUID, ID, ENABLE,
//! NAMESPACE, UNSELECT, SPECIAL-USE, CONDSTORE and QRESYNC, ESEARCH), over the mail service only.
//!
//! The session writes its responses into a buffer the driver sends ([`Session::take_output`]) and
//! says what the driver must do next ([`Next`]): it knows nothing of sockets or TLS. A selected
//! mailbox is a [`View`]: the client's numbering of the messages (sequence number = position,
//! UIDs from the node-local UID map). After each command the view is brought up to date from the
//! mailbox's modseq log, which yields the unsolicited EXISTS, FETCH and EXPUNGE responses;
//! expunges wait while a FETCH, STORE or SEARCH runs (RFC 3501 7.4.1).
//!
//! CONDSTORE and QRESYNC (RFC 7162) use the node's modseqs: a message's MODSEQ is the modseq of
//! its last change here and HIGHESTMODSEQ the mailbox's log position ([`MailService::changes`]),
//! both node-local like the UIDs, so a client that moves to another node sees a new UIDVALIDITY
//! and starts over. With QRESYNC enabled, expunges are told as VANISHED with UIDs.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use imap_codec::imap_types::command::{CommandBody, FetchModifier, SelectParameter, StoreModifier};
use imap_codec::imap_types::core::AString;
use imap_codec::imap_types::extensions::sort::{SortCriterion, SortKey as ImapSortKey};
use imap_codec::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName, Section};
use imap_codec::imap_types::flag::{StoreResponse, StoreType};
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use imap_codec::imap_types::status::StatusDataItemName;

use super::message::{self, Parsed, SectionText};
use super::reader::{ListOptions, Request, SearchReturn};
use crate::accounts::Password;
use crate::model::{Flag, MessageId};
use crate::service::uids::UidIndex;
use crate::service::{Delivery, Email, MailService, Query, ServiceError, SortKey};

/// The hierarchy delimiter of mailbox names.
pub const DELIMITER: char = '/';

/// What the driver does after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Send the output, then start TLS on the connection.
    StartTls,
    /// Send the output, then idle until DONE (the tag of the IDLE command).
    Idle(String),
    /// Send `+ ` and read the client's SASL response as a raw line.
    AuthenticateResponse(String),
    /// Send the output and close.
    Close,
}

/// How the connection reached us.
#[derive(Clone, Copy, Debug)]
pub struct Connection {
    pub address: IpAddr,
    pub secure: bool,
    /// STARTTLS can be offered (TLS is configured and not yet on).
    pub tls_available: bool,
    /// Logins are allowed in the clear (loopback, or `imap_allow_plaintext`).
    pub plaintext_allowed: bool,
}

impl Connection {
    fn may_log_in(&self) -> bool {
        self.secure || self.plaintext_allowed
    }
}

struct Slot {
    uid: u32,
    id: MessageId,
    /// Expunged, but the client has not been told yet.
    gone: bool,
}

/// The selected mailbox as the client knows it.
struct View {
    account: String,
    /// The service's name of the mailbox.
    mailbox: String,
    read_only: bool,
    uid_validity: u32,
    /// The mailbox modseq the view is up to date with.
    modseq: u64,
    slots: Vec<Slot>,
    /// How many messages the client was told of (the last EXISTS less the EXPUNGEs since).
    announced: usize,
}

impl View {
    fn last_uid(&self) -> u32 {
        self.slots.last().map(|slot| slot.uid).unwrap_or(0)
    }
}

enum State {
    NotAuthenticated,
    Authenticated { account: String },
    Selected { account: String, view: View },
    LoggedOut,
}

/// What the client enabled (RFC 5161 ENABLE, or a CONDSTORE-enabling command): for the session.
#[derive(Clone, Copy, Debug, Default)]
struct Enabled {
    /// FETCH responses carry MODSEQ (RFC 7162 3.1).
    condstore: bool,
    /// Expunges are told as VANISHED; SELECT takes QRESYNC (RFC 7162 3.2).
    qresync: bool,
    /// IMAP4rev2 (RFC 9051): SEARCH answers ESEARCH, no RECENT.
    rev2: bool,
}

/// One session.
pub struct Session {
    service: MailService,
    uids: Arc<UidIndex>,
    connection: Connection,
    state: State,
    enabled: Enabled,
    /// What the running command told of each message's flags (and modseq): the refresh after it
    /// does not repeat the same FETCH unsolicited.
    reported: HashMap<MessageId, String>,
    output: Vec<u8>,
    /// The server's count of logged-in sessions per account, if it limits them.
    account_counts: Option<super::Counts<String>>,
    /// This session's place in that count, once logged in: held for its drop, which gives the
    /// place back when the session ends.
    #[allow(dead_code)]
    account_slot: Option<super::Slot<String>>,
}

/// A command's failure, as the tagged answer says it.
enum Failure {
    No(String),
    Bad(String),
    /// The command wrote its own tagged answer (LOGOUT, STARTTLS) or has none yet (IDLE).
    Handled,
}

impl From<ServiceError> for Failure {
    fn from(error: ServiceError) -> Self {
        let code = match &error {
            ServiceError::NoSuchMailbox(_) => "[NONEXISTENT] ",
            ServiceError::TooLarge { .. } => "[TOOBIG] ",
            ServiceError::StorageFull(_) => "[OVERQUOTA] ",
            ServiceError::Authentication(_) => "[AUTHENTICATIONFAILED] ",
            error if error.is_temporary() => "[UNAVAILABLE] ",
            _ => "",
        };
        Failure::No(format!("{code}{error}"))
    }
}

type Outcome = Result<String, Failure>;

impl Session {
    pub fn new(service: MailService, uids: Arc<UidIndex>, connection: Connection) -> Session {
        Session {
            service,
            uids,
            connection,
            state: State::NotAuthenticated,
            enabled: Enabled::default(),
            reported: HashMap::new(),
            output: Vec::new(),
            account_counts: None,
            account_slot: None,
        }
    }

    /// Refuses a login (`NO [LIMIT]`) once the account has as many sessions as `counts` allows.
    pub fn with_account_limit(mut self, counts: super::Counts<String>) -> Session {
        self.account_counts = Some(counts);
        self
    }

    /// The greeting, with the capabilities.
    pub fn greeting(&mut self) -> Vec<u8> {
        format!("* OK [CAPABILITY {}] mailmesh IMAP ready\r\n", self.capabilities()).into_bytes()
    }

    /// Responses written so far.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// The account logged in, if any.
    pub fn account(&self) -> Option<&str> {
        match &self.state {
            State::Authenticated { account } | State::Selected { account, .. } => Some(account),
            _ => None,
        }
    }

    /// Whether a mailbox is selected (IDLE then reports its changes).
    pub fn selected_mailbox(&self) -> Option<&str> {
        match &self.state {
            State::Selected { view, .. } => Some(&view.mailbox),
            _ => None,
        }
    }

    /// The connection now runs over TLS.
    pub fn tls_started(&mut self) {
        self.connection.secure = true;
        self.connection.tls_available = false;
    }

    fn capabilities(&self) -> String {
        // Both revisions (RFC 9051 6.3.1): a client enables IMAP4rev2 with ENABLE.
        let mut capabilities = vec![
            "IMAP4rev1",
            "IMAP4rev2",
            "LITERAL+",
            "SASL-IR",
            "ID",
            "ENABLE",
            "IDLE",
            "NAMESPACE",
        ];
        capabilities.extend(["UNSELECT", "UIDPLUS", "MOVE", "SPECIAL-USE", "CHILDREN", "SORT"]);
        capabilities.extend([
            "CONDSTORE",
            "QRESYNC",
            "ESEARCH",
            "LIST-EXTENDED",
            "LIST-STATUS",
            "BINARY",
        ]);
        if matches!(self.state, State::NotAuthenticated) {
            if self.connection.tls_available {
                capabilities.push("STARTTLS");
            }
            if self.connection.may_log_in() {
                capabilities.push("AUTH=PLAIN");
            } else {
                capabilities.push("LOGINDISABLED");
            }
        }
        capabilities.join(" ")
    }

    fn untagged(&mut self, text: &str) {
        self.output.extend_from_slice(b"* ");
        self.output.extend_from_slice(text.as_bytes());
        self.output.extend_from_slice(b"\r\n");
    }

    fn tagged(&mut self, tag: &str, status: &str, text: &str) {
        self.output
            .extend_from_slice(format!("{tag} {status} {text}\r\n").as_bytes());
    }

    /// Answers a command the reader refused.
    pub fn refused(&mut self, tag: Option<&str>, reason: &str, too_big: bool) {
        match (tag, too_big) {
            (Some(tag), true) => self.tagged(tag, "NO", &format!("[TOOBIG] {reason}")),
            (Some(tag), false) => self.tagged(tag, "BAD", reason),
            (None, _) => self.untagged(&format!("BAD {reason}")),
        }
    }

    /// Runs one command, with what the reader found beside it (ESEARCH's `RETURN (...)`, an
    /// extended LIST's options).
    pub async fn handle(&mut self, request: Request) -> Next {
        let Request {
            command,
            search_return,
            list,
        } = request;
        let tag = command.tag.inner().to_owned();
        let (result, next) = self.dispatch(&tag, command.body, search_return, list).await;
        match result {
            Ok(text) => self.tagged(&tag, "OK", &text),
            Err(Failure::No(text)) => self.tagged(&tag, "NO", &text),
            Err(Failure::Bad(text)) => self.tagged(&tag, "BAD", &text),
            Err(Failure::Handled) => {}
        }
        next
    }

    async fn dispatch(
        &mut self,
        tag: &str,
        body: CommandBody<'static>,
        search_return: Option<SearchReturn>,
        list: Option<ListOptions>,
    ) -> (Outcome, Next) {
        let authenticated = !matches!(self.state, State::NotAuthenticated | State::LoggedOut);
        let selected = matches!(self.state, State::Selected { .. });
        let result = match body {
            CommandBody::Capability => {
                let line = format!("CAPABILITY {}", self.capabilities());
                self.untagged(&line);
                Ok("CAPABILITY done".into())
            }
            CommandBody::Noop | CommandBody::Check => {
                self.refresh(true).await;
                Ok("NOOP done".into())
            }
            CommandBody::Logout => {
                self.untagged("BYE logging out");
                self.state = State::LoggedOut;
                self.tagged(tag, "OK", "LOGOUT done");
                return (Ok(String::new()), Next::Close).pipe_close();
            }
            CommandBody::Id { .. } => {
                self.untagged("ID (\"name\" \"mailmesh\")");
                Ok("ID done".into())
            }
            CommandBody::StartTLS if !authenticated => {
                if !self.connection.tls_available {
                    Err(Failure::Bad("STARTTLS is not available here".into()))
                } else {
                    self.tagged(tag, "OK", "begin TLS now");
                    return (Ok(String::new()), Next::StartTls).pipe_close();
                }
            }
            CommandBody::Login { username, password } if !authenticated => {
                let login = String::from_utf8_lossy(username.as_ref()).into_owned();
                let password = String::from_utf8_lossy(password.declassify().as_ref()).into_owned();
                self.log_in(login, password).await
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } if !authenticated => {
                if !mechanism.to_string().eq_ignore_ascii_case("PLAIN") {
                    Err(Failure::No("only AUTHENTICATE PLAIN is offered".into()))
                } else if !self.connection.may_log_in() {
                    Err(Failure::No("[PRIVACYREQUIRED] log in over TLS".into()))
                } else {
                    match initial_response {
                        Some(response) => self.plain(response.declassify().to_vec()).await,
                        None => return (Ok(String::new()), Next::AuthenticateResponse(tag.to_owned())).pipe_close(),
                    }
                }
            }
            CommandBody::Enable { capabilities } if authenticated => {
                let mut enabled = Vec::new();
                for capability in capabilities.as_ref() {
                    let name = capability.to_string().to_ascii_uppercase();
                    let flag = match name.as_str() {
                        "CONDSTORE" => &mut self.enabled.condstore,
                        "QRESYNC" => &mut self.enabled.qresync,
                        "IMAP4REV2" => &mut self.enabled.rev2,
                        _ => continue,
                    };
                    if !*flag {
                        *flag = true;
                        enabled.push(name);
                    }
                }
                // QRESYNC implies CONDSTORE (RFC 7162 3.2.3).
                self.enabled.condstore |= self.enabled.qresync;
                let mut line = "ENABLED".to_owned();
                for name in enabled {
                    line.push(' ');
                    line.push_str(&name);
                }
                self.untagged(&line);
                Ok("ENABLE done".into())
            }
            CommandBody::Namespace if authenticated => {
                self.untagged(&format!("NAMESPACE ((\"\" \"{DELIMITER}\")) NIL NIL"));
                Ok("NAMESPACE done".into())
            }
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } if authenticated => match list {
                Some(options) => self.list(&reference, &options.patterns.clone(), "LIST", Some(&options)),
                None => self.list(&reference, &[pattern_bytes(&mailbox_wildcard)], "LIST", None),
            },
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } if authenticated => self.list(&reference, &[pattern_bytes(&mailbox_wildcard)], "LSUB", None),
            CommandBody::Subscribe { mailbox } if authenticated => self.subscribe(&mailbox, true).await,
            CommandBody::Unsubscribe { mailbox } if authenticated => self.subscribe(&mailbox, false).await,
            CommandBody::Status { mailbox, item_names } if authenticated => {
                let account = self.account().unwrap_or_default().to_owned();
                self.status(&account, &mailbox_name(&mailbox), &item_names)
                    .map(|()| "STATUS done".to_owned())
            }
            CommandBody::Select { mailbox, parameters } if authenticated => {
                self.select(&mailbox, false, parameters).await
            }
            CommandBody::Examine { mailbox, parameters } if authenticated => {
                self.select(&mailbox, true, parameters).await
            }
            CommandBody::Create { mailbox } if authenticated => self.create(&mailbox).await,
            CommandBody::Delete { mailbox } if authenticated => self.delete(&mailbox).await,
            CommandBody::Rename { from, to } if authenticated => self.rename(&from, &to).await,
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } if authenticated => {
                let bytes = match message {
                    imap_codec::imap_types::extensions::binary::LiteralOrLiteral8::Literal(literal) => {
                        literal.data().to_vec()
                    }
                    imap_codec::imap_types::extensions::binary::LiteralOrLiteral8::Literal8(literal) => {
                        literal.data.to_vec()
                    }
                };
                let flags: Vec<String> = flags.iter().map(|flag| flag.to_string()).collect();
                let received = date.map(|date| date.as_ref().timestamp_millis().max(0) as u64);
                self.append(&mailbox, flags, received, bytes).await
            }
            CommandBody::Unselect if selected => {
                self.state = State::Authenticated {
                    account: self.account().unwrap_or_default().to_owned(),
                };
                Ok("UNSELECT done".into())
            }
            CommandBody::Close if selected => {
                let _ = self.expunge_deleted(None).await;
                self.state = State::Authenticated {
                    account: self.account().unwrap_or_default().to_owned(),
                };
                Ok("CLOSE done".into())
            }
            CommandBody::Expunge if selected => self.expunge(None).await,
            CommandBody::ExpungeUid { sequence_set } if selected => self.expunge(Some(sequence_set)).await,
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } if selected => self.fetch(&sequence_set, macro_or_item_names, uid, &modifiers).await,
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } if selected => {
                let flags: Vec<String> = flags.iter().map(|flag| flag.to_string()).collect();
                let unchanged_since = modifiers.iter().find_map(|modifier| match modifier {
                    StoreModifier::UnchangedSince(modseq) => Some(*modseq),
                });
                self.store(&sequence_set, kind, response, flags, uid, unchanged_since)
                    .await
            }
            CommandBody::Search { criteria, uid, .. } if selected => {
                self.search(tag, criteria.as_ref(), uid, search_return).await
            }
            CommandBody::Sort {
                sort_criteria,
                search_criteria,
                uid,
                ..
            } if selected => self.sort(sort_criteria.as_ref(), search_criteria.as_ref(), uid).await,
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } if selected => self.copy(&sequence_set, &mailbox, uid).await,
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } if selected => self.move_to(&sequence_set, &mailbox, uid).await,
            CommandBody::Idle if authenticated => {
                return (Ok(String::new()), Next::Idle(tag.to_owned())).pipe_close();
            }
            CommandBody::Login { .. } | CommandBody::Authenticate { .. } | CommandBody::StartTLS => {
                Err(Failure::Bad("already logged in".into()))
            }
            _ if !authenticated => Err(Failure::Bad("log in first".into())),
            _ if !selected => Err(Failure::Bad("select a mailbox first".into())),
            _ => Err(Failure::Bad("command not supported".into())),
        };
        (result, Next::Continue)
    }

    // ---------------------------------------------------------------------------------------------
    // Login
    // ---------------------------------------------------------------------------------------------

    async fn log_in(&mut self, login: String, password: String) -> Outcome {
        if !self.connection.may_log_in() {
            return Err(Failure::No(
                "[PRIVACYREQUIRED] LOGIN is disabled here without TLS".into(),
            ));
        }
        match self
            .service
            .authenticate(login, Password::new(password), self.connection.address)
            .await
        {
            Ok(account) => {
                if let Some(counts) = &self.account_counts {
                    match counts.take(account.as_str().to_owned()) {
                        Some(slot) => self.account_slot = Some(slot),
                        None => {
                            return Err(Failure::No(
                                "[LIMIT] this account has too many sessions open; log out of one first".into(),
                            ))
                        }
                    }
                }
                self.state = State::Authenticated {
                    account: account.as_str().to_owned(),
                };
                Ok(format!("[CAPABILITY {}] logged in", self.capabilities()))
            }
            Err(ServiceError::Authentication(error)) => {
                tracing::debug!("IMAP login refused: {error}");
                Err(Failure::No("[AUTHENTICATIONFAILED] invalid credentials".into()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// A SASL PLAIN message: authorization identity, NUL, login, NUL, password.
    async fn plain(&mut self, response: Vec<u8>) -> Outcome {
        let mut fields = response.split(|&byte| byte == 0);
        let (Some(authorize), Some(login), Some(password), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(Failure::Bad("malformed PLAIN response".into()));
        };
        if !authorize.is_empty() && authorize != login {
            return Err(Failure::No("[AUTHORIZATIONFAILED] cannot act as another user".into()));
        }
        let login = String::from_utf8_lossy(login).into_owned();
        let password = String::from_utf8_lossy(password).into_owned();
        self.log_in(login, password).await
    }

    /// The client's answer to `+ ` after AUTHENTICATE PLAIN (base64, or `*` to cancel).
    pub async fn authenticate_response(&mut self, tag: &str, line: &[u8]) {
        use base64::Engine;
        let result = if line == b"*" {
            Err(Failure::Bad("AUTHENTICATE cancelled".into()))
        } else {
            match base64::engine::general_purpose::STANDARD.decode(line) {
                Ok(response) => self.plain(response).await,
                Err(_) => Err(Failure::Bad("the response is not base64".into())),
            }
        };
        match result {
            Ok(text) => self.tagged(tag, "OK", &text),
            Err(Failure::No(text)) => self.tagged(tag, "NO", &text),
            Err(Failure::Bad(text)) => self.tagged(tag, "BAD", &text),
            Err(Failure::Handled) => {}
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Mailboxes
    // ---------------------------------------------------------------------------------------------

    /// LIST and LSUB (RFC 3501 6.3.8, 6.3.9), and the extended LIST (RFC 5258) when `options` are
    /// given: several patterns, selection by subscription or special use, RECURSIVEMATCH's
    /// CHILDINFO, and a STATUS after each mailbox (RFC 5819). Every listed mailbox says whether it
    /// has children and its special use, asked or not (both RFCs allow it).
    fn list(
        &mut self,
        reference: &Mailbox<'_>,
        patterns: &[Vec<u8>],
        kind: &str,
        options: Option<&ListOptions>,
    ) -> Outcome {
        let account = self.account().unwrap_or_default().to_owned();
        let reference = mailbox_name(reference);
        let options = options.cloned().unwrap_or_default();
        if patterns.iter().all(|pattern| pattern.is_empty()) {
            self.untagged(&format!("{kind} (\\Noselect) \"{DELIMITER}\" \"\""));
            return Ok(format!("{kind} done"));
        }
        let patterns: Vec<String> = patterns
            .iter()
            .filter(|pattern| !pattern.is_empty())
            .map(|pattern| {
                crate::import::decode_modified_utf7(&format!("{reference}{}", String::from_utf8_lossy(pattern)))
            })
            .collect();
        let mailboxes = self.service.mailboxes(&account)?;
        let selected = |mailbox: &crate::service::MailboxSummary| {
            (!options.subscribed || mailbox.subscribed)
                && (!options.special_use || special_use(mailbox).is_some())
                && (kind != "LSUB" || mailbox.subscribed)
        };
        let matches = |name: &str| patterns.iter().any(|pattern| wildcard_matches(pattern, name));
        let below = |parent: &str, name: &str| {
            name.len() > parent.len() && name.starts_with(parent) && name[parent.len()..].starts_with(DELIMITER)
        };
        for mailbox in &mailboxes {
            let name = &mailbox.name;
            if !matches(name) {
                continue;
            }
            let selected_below: Vec<&crate::service::MailboxSummary> = mailboxes
                .iter()
                .filter(|other| below(name, &other.name) && selected(other))
                .collect();
            // RFC 5258 3.3: a parent that is not selected is listed only for a selected
            // descendant the patterns do not list themselves.
            if !selected(mailbox)
                && !(options.recursive_match && selected_below.iter().any(|other| !matches(&other.name)))
            {
                continue;
            }
            let children = mailboxes.iter().any(|other| below(name, &other.name));
            let mut attributes = vec![if children { "\\HasChildren" } else { "\\HasNoChildren" }];
            attributes.extend(special_use(mailbox));
            if options.return_subscribed && mailbox.subscribed {
                attributes.push("\\Subscribed");
            }
            let mut line = format!("* {kind} ({}) \"{DELIMITER}\" ", attributes.join(" ")).into_bytes();
            message::string(&mut line, encode_modified_utf7(name).as_bytes());
            if options.recursive_match && !selected_below.is_empty() {
                line.extend_from_slice(b" (\"CHILDINFO\" (\"SUBSCRIBED\"))");
            }
            line.extend_from_slice(b"\r\n");
            self.output.extend_from_slice(&line);
            if !options.status.is_empty() {
                self.status(&account, name, &options.status)?;
            }
        }
        Ok(format!("{kind} done"))
    }

    /// SUBSCRIBE and UNSUBSCRIBE (RFC 3501 6.3.6, 6.3.7): the mailbox's replicated `subscribed`
    /// register, so LSUB on every node of the cluster lists it.
    async fn subscribe(&mut self, mailbox: &Mailbox<'_>, subscribed: bool) -> Outcome {
        let account = self.account().unwrap_or_default().to_owned();
        let id = self.service.find_mailbox(&account, &mailbox_name(mailbox))?;
        let update = crate::service::MailboxUpdate {
            subscribed: Some(subscribed),
            ..Default::default()
        };
        self.service.update_mailbox(&account, id, update).await?;
        Ok(format!("{} done", if subscribed { "SUBSCRIBE" } else { "UNSUBSCRIBE" }))
    }

    /// A STATUS response for a mailbox (for STATUS, and after each mailbox of LIST-STATUS).
    fn status(&mut self, account: &str, name: &str, items: &[StatusDataItemName]) -> Result<(), Failure> {
        let summary = self.service.mailbox_at(account, name)?;
        let numbering = self.service.uid_sync(&self.uids, account, name)?;
        let mut values = Vec::new();
        for item in items {
            match item {
                StatusDataItemName::Messages => values.push(format!("MESSAGES {}", summary.total)),
                StatusDataItemName::Recent => values.push("RECENT 0".to_owned()),
                StatusDataItemName::UidNext => values.push(format!("UIDNEXT {}", numbering.uid_next)),
                StatusDataItemName::UidValidity => values.push(format!("UIDVALIDITY {}", numbering.uid_validity)),
                StatusDataItemName::Unseen => values.push(format!("UNSEEN {}", summary.unseen)),
                StatusDataItemName::HighestModSeq => {
                    self.enabled.condstore = true;
                    values.push(format!("HIGHESTMODSEQ {}", highest_modseq(numbering.modseq)))
                }
                _ => {}
            }
        }
        let mut line = b"* STATUS ".to_vec();
        message::string(&mut line, encode_modified_utf7(name).as_bytes());
        line.extend_from_slice(format!(" ({})\r\n", values.join(" ")).as_bytes());
        self.output.extend_from_slice(&line);
        Ok(())
    }

    async fn select(&mut self, mailbox: &Mailbox<'_>, read_only: bool, parameters: Vec<SelectParameter>) -> Outcome {
        let account = self.account().unwrap_or_default().to_owned();
        let mut resync = None;
        for parameter in parameters {
            match parameter {
                SelectParameter::CondStore => self.enabled.condstore = true,
                SelectParameter::QResync { .. } if !self.enabled.qresync => {
                    return Err(Failure::Bad("ENABLE QRESYNC first".into()));
                }
                SelectParameter::QResync {
                    uid_validity,
                    mod_sequence_value,
                    known_uids,
                    ..
                } => resync = Some((uid_validity.get(), mod_sequence_value.get(), known_uids)),
            }
        }
        // A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1).
        self.state = State::Authenticated {
            account: account.clone(),
        };
        let name = mailbox_name(mailbox);
        self.service.mailbox_at(&account, &name)?;
        let snapshot = self.service.uid_snapshot_after(&self.uids, &account, &name, 0)?;
        let mut view = View {
            announced: 0,
            account: account.clone(),
            mailbox: name,
            read_only,
            uid_validity: snapshot.state.uid_validity,
            modseq: snapshot.state.modseq,
            slots: snapshot
                .messages
                .into_iter()
                .map(|(uid, id)| Slot { uid, id, gone: false })
                .collect(),
        };
        self.untagged("FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)");
        if read_only {
            self.untagged("OK [PERMANENTFLAGS ()] read-only");
        } else {
            self.untagged("OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] flags kept");
        }
        self.untagged(&format!("{} EXISTS", view.slots.len()));
        view.announced = view.slots.len();
        if !self.enabled.rev2 {
            self.untagged("0 RECENT");
        }
        self.untagged(&format!("OK [UIDVALIDITY {}] UIDs valid", view.uid_validity));
        self.untagged(&format!(
            "OK [UIDNEXT {}] next UID",
            snapshot.state.uid_next.max(view.last_uid() + 1)
        ));
        self.untagged(&format!(
            "OK [HIGHESTMODSEQ {}] modseqs kept",
            highest_modseq(view.modseq)
        ));
        if let Some((uid_validity, since, known)) =
            resync.filter(|(uid_validity, ..)| *uid_validity == view.uid_validity)
        {
            let _ = uid_validity;
            self.resync(&view, since, known.as_ref())?;
        }
        self.state = State::Selected { account, view };
        Ok(if read_only {
            "[READ-ONLY] EXAMINE done"
        } else {
            "[READ-WRITE] SELECT done"
        }
        .into())
    }

    /// QRESYNC's part of SELECT (RFC 7162 3.2.5): the UIDs that vanished since `since`, then a
    /// FETCH of every message changed since.
    fn resync(&mut self, view: &View, since: u64, known: Option<&SequenceSet>) -> Result<(), Failure> {
        let vanished: Vec<u32> = match known {
            // The client said what it holds: whatever of it is not here any more vanished.
            Some(known) => uids_in(known, view.last_uid())
                .filter(|uid| view.slots.binary_search_by_key(uid, |slot| slot.uid).is_err())
                .collect(),
            None => self
                .service
                .vanished_since(&self.uids, &view.account, &view.mailbox, since)?
                .into_iter()
                .filter(|uid| view.slots.binary_search_by_key(uid, |slot| slot.uid).is_err())
                .collect(),
        };
        if !vanished.is_empty() {
            self.untagged(&format!("VANISHED (EARLIER) {}", compact_set(&vanished)));
        }
        let changed = self.changed_since(view, since)?;
        for (index, slot) in view.slots.iter().enumerate() {
            if !changed.as_ref().is_none_or(|changed| changed.contains(&slot.id)) {
                continue;
            }
            let email = match self.service.email_record(&view.account, slot.id) {
                Ok(email) => email,
                Err(ServiceError::NoSuchMessage(_)) => continue,
                Err(error) => return Err(error.into()),
            };
            let modseq = self.service.email_modseq(&view.account, slot.id).unwrap_or(view.modseq);
            if modseq <= since {
                continue;
            }
            self.untagged(&format!(
                "{} FETCH (UID {} FLAGS ({}) MODSEQ ({modseq}))",
                index + 1,
                slot.uid,
                flag_list(&email.flags)
            ));
        }
        Ok(())
    }

    /// The messages of the view's mailbox changed (or created) since a modseq; `None` when the
    /// log cannot say, and every message must be looked at.
    fn changed_since(&self, view: &View, since: u64) -> Result<Option<HashSet<MessageId>>, Failure> {
        let mailbox = self.service.find_mailbox(&view.account, &view.mailbox)?;
        let changes = self.service.changes(&view.account, mailbox, since, 1_000_000)?;
        if changes.cannot_calculate {
            return Ok(None);
        }
        Ok(Some(changes.created.into_iter().chain(changes.updated).collect()))
    }

    async fn append(
        &mut self,
        mailbox: &Mailbox<'_>,
        flags: Vec<String>,
        received: Option<u64>,
        raw: Vec<u8>,
    ) -> Outcome {
        let account = self.account().unwrap_or_default().to_owned();
        let name = mailbox_name(mailbox);
        if let Err(error) = self.service.mailbox_at(&account, &name) {
            return match error {
                ServiceError::NoSuchMailbox(_) => Err(Failure::No("[TRYCREATE] no such mailbox".into())),
                error => Err(error.into()),
            };
        }
        let flags = crate::service::parse_flags(&flags).map_err(Failure::from)?;
        let delivered = self
            .service
            .deliver(Delivery {
                account: account.clone(),
                mailbox: crate::service::MailboxTarget::Path(name.clone()),
                raw,
                flags,
                received_millis: received,
                skip_duplicate: false,
            })
            .await?;
        let numbering = self.service.uid_sync(&self.uids, &account, &name)?;
        let uid = self.service.uid_of(&self.uids, &account, &name, delivered.id)?;
        self.refresh(true).await;
        Ok(match uid {
            Some(uid) => format!("[APPENDUID {} {uid}] APPEND done", numbering.uid_validity),
            None => "APPEND done".into(),
        })
    }

    /// CREATE (RFC 3501 6.3.3): the mailbox and any missing levels above it; a trailing `/`
    /// only says the client means to make children.
    async fn create(&mut self, mailbox: &Mailbox<'_>) -> Outcome {
        let account = self.account().unwrap_or_default().to_owned();
        let name = mailbox_name(mailbox);
        let name = name.strip_suffix(DELIMITER).unwrap_or(&name);
        match self.service.create_mailbox(&account, name, None).await {
            Ok(_) => Ok("CREATE done".into()),
            Err(ServiceError::MailboxExists(_)) => Err(Failure::No("[ALREADYEXISTS] the mailbox exists".into())),
            Err(ServiceError::Invalid(reason)) => Err(Failure::No(format!("[CANNOT] {reason}"))),
            Err(error) => Err(error.into()),
        }
    }

    /// DELETE (RFC 3501 6.3.4): the mailbox and the messages in it; not the INBOX, and not a
    /// mailbox with children.
    async fn delete(&mut self, mailbox: &Mailbox<'_>) -> Outcome {
        let account = self.account().unwrap_or_default().to_owned();
        let id = self.service.find_mailbox(&account, &mailbox_name(mailbox))?;
        match self.service.delete_mailbox(&account, id).await {
            Ok(_) => Ok("DELETE done".into()),
            Err(ServiceError::MailboxHasChildren(_)) => Err(Failure::No(
                "[INUSE] the mailbox has children: delete them first".into(),
            )),
            Err(ServiceError::Invalid(reason)) => Err(Failure::No(format!("[CANNOT] {reason}"))),
            Err(error) => Err(error.into()),
        }
    }

    /// RENAME (RFC 3501 6.3.5): the mailbox keeps its ID, its messages, its UIDs and its
    /// children, which move with it.
    async fn rename(&mut self, from: &Mailbox<'_>, to: &Mailbox<'_>) -> Outcome {
        let account = self.account().unwrap_or_default().to_owned();
        let id = self.service.find_mailbox(&account, &mailbox_name(from))?;
        match self.service.rename_mailbox(&account, id, &mailbox_name(to)).await {
            Ok(_) => Ok("RENAME done".into()),
            Err(ServiceError::MailboxExists(_)) => Err(Failure::No("[ALREADYEXISTS] the new name exists".into())),
            Err(ServiceError::Invalid(reason)) => Err(Failure::No(format!("[CANNOT] {reason}"))),
            Err(error) => Err(error.into()),
        }
    }

    /// MOVE (RFC 6851): each message keeps its ID and gets a UID in the target; the untagged
    /// COPYUID comes first, then the EXPUNGEs of the moved messages.
    async fn move_to(&mut self, set: &SequenceSet, mailbox: &Mailbox<'_>, uid: bool) -> Outcome {
        let target = mailbox_name(mailbox);
        let Some(view) = self.view() else {
            return Err(Failure::Bad("select a mailbox first".into()));
        };
        if view.read_only {
            return Err(Failure::No("[READ-ONLY] the mailbox was opened with EXAMINE".into()));
        }
        let account = view.account.clone();
        let target_id = match self.service.find_mailbox(&account, &target) {
            Ok(id) => id,
            Err(ServiceError::NoSuchMailbox(_)) => return Err(Failure::No("[TRYCREATE] no such mailbox".into())),
            Err(error) => return Err(error.into()),
        };
        let mut moved = Vec::new();
        for (_, slot_uid, id) in self.chosen(set, uid) {
            match self.service.move_email(&account, id, target_id).await {
                Ok(_) => moved.push((slot_uid, id)),
                Err(ServiceError::NoSuchMessage(_)) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        let numbering = self.service.uid_sync(&self.uids, &account, &target)?;
        let mut sources = Vec::new();
        let mut targets = Vec::new();
        for (source_uid, id) in moved {
            if let Some(target_uid) = self.service.uid_of(&self.uids, &account, &target, id)? {
                sources.push(source_uid.to_string());
                targets.push(target_uid.to_string());
            }
        }
        if !sources.is_empty() {
            self.untagged(&format!(
                "OK [COPYUID {} {} {}] moved",
                numbering.uid_validity,
                sources.join(","),
                targets.join(",")
            ));
        }
        self.refresh(true).await;
        Ok("MOVE done".into())
    }

    async fn copy(&mut self, set: &SequenceSet, mailbox: &Mailbox<'_>, uid: bool) -> Outcome {
        let target = mailbox_name(mailbox);
        let Some(view) = self.view() else {
            return Err(Failure::Bad("select a mailbox first".into()));
        };
        let account = view.account.clone();
        if let Err(error) = self.service.mailbox_at(&account, &target) {
            return match error {
                ServiceError::NoSuchMailbox(_) => Err(Failure::No("[TRYCREATE] no such mailbox".into())),
                error => Err(error.into()),
            };
        }
        let chosen = self.chosen(set, uid);
        let mut pairs = Vec::new();
        for (_, slot_uid, id) in chosen {
            let email = match self.service.email(&account, id) {
                Ok(email) => email,
                Err(ServiceError::NoSuchMessage(_)) => continue,
                Err(error) => return Err(error.into()),
            };
            let raw = self.service.raw(&account, id)?;
            let delivered = self
                .service
                .deliver(Delivery {
                    account: account.clone(),
                    mailbox: crate::service::MailboxTarget::Path(target.clone()),
                    raw,
                    flags: email.flags,
                    received_millis: Some(email.received_millis),
                    skip_duplicate: false,
                })
                .await?;
            pairs.push((slot_uid, delivered.id));
        }
        let numbering = self.service.uid_sync(&self.uids, &account, &target)?;
        let mut sources = Vec::new();
        let mut targets = Vec::new();
        for (source_uid, id) in pairs {
            if let Some(target_uid) = self.service.uid_of(&self.uids, &account, &target, id)? {
                sources.push(source_uid.to_string());
                targets.push(target_uid.to_string());
            }
        }
        self.refresh(uid).await;
        if sources.is_empty() {
            return Ok("COPY done".into());
        }
        Ok(format!(
            "[COPYUID {} {} {}] COPY done",
            numbering.uid_validity,
            sources.join(","),
            targets.join(",")
        ))
    }

    // ---------------------------------------------------------------------------------------------
    // The selected mailbox
    // ---------------------------------------------------------------------------------------------

    fn view(&self) -> Option<&View> {
        match &self.state {
            State::Selected { view, .. } => Some(view),
            _ => None,
        }
    }

    /// Brings the view up to date and writes EXISTS, FETCH and (when `expunges_allowed`) EXPUNGE.
    pub async fn refresh(&mut self, expunges_allowed: bool) {
        if let Err(error) = self.try_refresh(expunges_allowed) {
            tracing::debug!("IMAP refresh failed: {error}");
        }
        self.reported.clear();
    }

    fn try_refresh(&mut self, expunges_allowed: bool) -> Result<(), ServiceError> {
        let State::Selected { view, .. } = &mut self.state else {
            return Ok(());
        };
        let changes = self.service.changes(
            &view.account,
            self.service.find_mailbox(&view.account, &view.mailbox)?,
            view.modseq,
            100_000,
        )?;
        let mut updated = HashSet::new();
        if changes.cannot_calculate {
            // Too much changed (or the log was rebuilt): compare the whole numbering.
            let snapshot = self
                .service
                .uid_snapshot_after(&self.uids, &view.account, &view.mailbox, 0)?;
            if snapshot.state.uid_validity != view.uid_validity {
                self.output
                    .extend_from_slice(b"* BYE the mailbox was renumbered; select it again\r\n");
                self.state = State::LoggedOut;
                return Ok(());
            }
            let live: HashSet<u32> = snapshot.messages.iter().map(|(uid, _)| *uid).collect();
            for slot in &mut view.slots {
                slot.gone |= !live.contains(&slot.uid);
                // Flags may have changed: tell them all again.
                updated.insert(slot.id);
            }
            let last = view.last_uid();
            view.slots.extend(
                snapshot
                    .messages
                    .into_iter()
                    .filter(|(uid, _)| *uid > last)
                    .map(|(uid, id)| Slot { uid, id, gone: false }),
            );
            view.modseq = snapshot.state.modseq;
        } else {
            let expunged: HashSet<MessageId> = changes.expunged.iter().copied().collect();
            updated.extend(changes.updated.iter().copied());
            for slot in &mut view.slots {
                slot.gone |= expunged.contains(&slot.id);
            }
            // Every message numbered after the view's last UID is new to the client; numbering
            // runs after the changes were read, so it covers every creation they list.
            let snapshot =
                self.service
                    .uid_snapshot_after(&self.uids, &view.account, &view.mailbox, view.last_uid())?;
            view.slots.extend(
                snapshot
                    .messages
                    .into_iter()
                    .filter(|(_, id)| !expunged.contains(id))
                    .map(|(uid, id)| Slot { uid, id, gone: false }),
            );
            view.modseq = changes.modseq;
        }
        let mut lines = Vec::new();
        if expunges_allowed {
            let mut index = 0;
            let mut expunged = 0;
            let mut vanished = Vec::new();
            let qresync = self.enabled.qresync;
            view.slots.retain(|slot| {
                if slot.gone {
                    if qresync {
                        vanished.push(slot.uid);
                    } else {
                        lines.push(format!("{} EXPUNGE", index + 1));
                    }
                    expunged += 1;
                    false
                } else {
                    index += 1;
                    true
                }
            });
            if !vanished.is_empty() {
                lines.push(format!("VANISHED {}", compact_set(&vanished)));
            }
            view.announced -= expunged;
        }
        if view.slots.len() != view.announced {
            lines.push(format!("{} EXISTS", view.slots.len()));
            view.announced = view.slots.len();
        }
        for (index, slot) in view.slots.iter().enumerate() {
            if slot.gone || !updated.contains(&slot.id) {
                continue;
            }
            if let Ok(email) = self.service.email_record(&view.account, slot.id) {
                let modseq = match self.enabled.condstore {
                    true => self.service.email_modseq(&view.account, slot.id).ok(),
                    false => None,
                };
                if self.reported.get(&slot.id) == Some(&reported_key(&email.flags, modseq)) {
                    continue;
                }
                let modseq = modseq.map(|modseq| format!(" MODSEQ ({modseq})")).unwrap_or_default();
                lines.push(format!(
                    "{} FETCH (UID {} FLAGS ({}){modseq})",
                    index + 1,
                    slot.uid,
                    flag_list(&email.flags)
                ));
            }
        }
        for line in lines {
            self.untagged(&line);
        }
        Ok(())
    }

    /// The messages of the view changed since its modseq (the next refresh tells their flags).
    fn pending_updates(&self) -> HashSet<MessageId> {
        let Some(view) = self.view() else {
            return HashSet::new();
        };
        let Ok(mailbox) = self.service.find_mailbox(&view.account, &view.mailbox) else {
            return HashSet::new();
        };
        match self.service.changes(&view.account, mailbox, view.modseq, 100_000) {
            Ok(changes) if !changes.cannot_calculate => changes.updated.into_iter().collect(),
            _ => HashSet::new(),
        }
    }

    /// The messages a set names: (sequence number, UID, ID), ascending.
    fn chosen(&self, set: &SequenceSet, by_uid: bool) -> Vec<(u32, u32, MessageId)> {
        let Some(view) = self.view() else {
            return Vec::new();
        };
        let largest = if by_uid {
            view.last_uid()
        } else {
            view.slots.len() as u32
        };
        view.slots
            .iter()
            .enumerate()
            .map(|(index, slot)| (index as u32 + 1, slot.uid, slot.id))
            .filter(|(sequence, uid, _)| set_contains(set, if by_uid { *uid } else { *sequence }, largest))
            .collect()
    }

    async fn fetch(
        &mut self,
        set: &SequenceSet,
        items: MacroOrMessageDataItemNames<'static>,
        by_uid: bool,
        modifiers: &[FetchModifier],
    ) -> Outcome {
        let mut changed_since = None;
        let mut vanished = false;
        for modifier in modifiers {
            match modifier {
                FetchModifier::ChangedSince(modseq) => changed_since = Some(modseq.get()),
                FetchModifier::Vanished => vanished = true,
            }
        }
        if vanished && !(by_uid && self.enabled.qresync && changed_since.is_some()) {
            return Err(Failure::Bad(
                "VANISHED needs UID FETCH, CHANGEDSINCE and QRESYNC enabled".into(),
            ));
        }
        let mut items: Vec<MessageDataItemName<'static>> = match items {
            MacroOrMessageDataItemNames::Macro(name) => {
                name.expand().into_iter().map(|item| item.into_static_name()).collect()
            }
            MacroOrMessageDataItemNames::MessageDataItemNames(items) => items,
        };
        if by_uid && !items.iter().any(|item| matches!(item, MessageDataItemName::Uid)) {
            items.insert(0, MessageDataItemName::Uid);
        }
        // CHANGEDSINCE implies MODSEQ (RFC 7162 3.1.4.1); both enable CONDSTORE.
        if changed_since.is_some() && !items.iter().any(|item| matches!(item, MessageDataItemName::ModSeq)) {
            items.push(MessageDataItemName::ModSeq);
        }
        if items.iter().any(|item| matches!(item, MessageDataItemName::ModSeq)) {
            self.enabled.condstore = true;
        }
        let view = self.view().expect("selected");
        let (account, read_only) = (view.account.clone(), view.read_only);
        let mut chosen = self.chosen(set, by_uid);
        if let Some(since) = changed_since {
            if vanished {
                let largest = view.last_uid();
                let gone: Vec<u32> = self
                    .service
                    .vanished_since(&self.uids, &view.account, &view.mailbox, since)?
                    .into_iter()
                    .filter(|uid| set_contains(set, *uid, largest))
                    .filter(|uid| view.slots.binary_search_by_key(uid, |slot| slot.uid).is_err())
                    .collect();
                if !gone.is_empty() {
                    self.untagged(&format!("VANISHED (EARLIER) {}", compact_set(&gone)));
                }
            }
            let view = self.view().expect("selected");
            if let Some(changed) = self.changed_since(view, since)? {
                chosen.retain(|(_, _, id)| changed.contains(id));
            }
        }
        let wants_modseq = self.enabled.condstore;
        // Only what changed since the view's modseq would come again in the refresh: the rest
        // need not be remembered (a 100,000-message FETCH stays one pass).
        let pending = self.pending_updates();
        let needs_raw = items.iter().any(|item| {
            !matches!(
                item,
                MessageDataItemName::Uid
                    | MessageDataItemName::Flags
                    | MessageDataItemName::InternalDate
                    | MessageDataItemName::Rfc822Size
                    | MessageDataItemName::ModSeq
            )
        });
        let marks_seen = !read_only
            && items.iter().any(|item| {
                matches!(
                    item,
                    MessageDataItemName::BodyExt { peek: false, .. }
                        | MessageDataItemName::Rfc822
                        | MessageDataItemName::Rfc822Text
                        | MessageDataItemName::Binary { peek: false, .. }
                )
            });
        let mut failed = false;
        for (sequence, uid, id) in chosen {
            // FETCH items come from the record and the bytes; the listing is never needed.
            let mut email = match self.service.email_record(&account, id) {
                Ok(email) => email,
                Err(ServiceError::NoSuchMessage(_)) => {
                    failed = true;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let raw = if needs_raw {
                match self.service.raw(&account, id) {
                    Ok(raw) => Some(raw),
                    Err(ServiceError::NoSuchMessage(_)) => {
                        failed = true;
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                }
            } else {
                None
            };
            let mut flags_changed = false;
            if marks_seen && !email.flags.contains(&Flag::Seen) {
                email = self
                    .service
                    .set_flags(&account, id, vec![Flag::Seen], Vec::new())
                    .await?;
                flags_changed = true;
            }
            let modseq = match wants_modseq {
                true => match self.service.email_modseq(&account, id) {
                    Ok(modseq) => modseq,
                    Err(ServiceError::NoSuchMessage(_)) => {
                        failed = true;
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                },
                false => 0,
            };
            if changed_since.is_some_and(|since| modseq <= since) {
                continue;
            }
            let parsed = raw.as_deref().map(Parsed::new);
            let mut line = format!("* {sequence} FETCH (").into_bytes();
            let mut first = true;
            let mut flags_written = false;
            let mut modseq_written = false;
            for item in &items {
                if !first {
                    line.push(b' ');
                }
                first = false;
                write_item(&mut line, item, uid, modseq, &email, raw.as_deref(), parsed.as_ref())?;
                flags_written |= matches!(item, MessageDataItemName::Flags);
                modseq_written |= matches!(item, MessageDataItemName::ModSeq);
            }
            if flags_changed && !flags_written {
                line.extend_from_slice(format!(" FLAGS ({})", flag_list(&email.flags)).as_bytes());
                if wants_modseq && !modseq_written {
                    line.extend_from_slice(format!(" MODSEQ ({modseq})").as_bytes());
                }
                flags_written = true;
                modseq_written = wants_modseq;
            }
            if flags_written && (modseq_written || !wants_modseq) && (flags_changed || pending.contains(&id)) {
                self.reported
                    .insert(id, reported_key(&email.flags, modseq_written.then_some(modseq)));
            }
            line.extend_from_slice(b")\r\n");
            self.output.extend_from_slice(&line);
        }
        self.refresh(by_uid).await;
        if failed {
            return Err(Failure::No("some of the messages were expunged".into()));
        }
        Ok(format!("{}FETCH done", if by_uid { "UID " } else { "" }))
    }

    async fn store(
        &mut self,
        set: &SequenceSet,
        kind: StoreType,
        response: StoreResponse,
        flags: Vec<String>,
        by_uid: bool,
        unchanged_since: Option<u64>,
    ) -> Outcome {
        let view = self.view().expect("selected");
        if view.read_only {
            return Err(Failure::No("[READ-ONLY] the mailbox is read-only".into()));
        }
        let account = view.account.clone();
        let flags = crate::service::parse_flags(&flags).map_err(Failure::from)?;
        if unchanged_since.is_some() {
            self.enabled.condstore = true;
        }
        // A conditional STORE answers FETCH with MODSEQ even when silent (RFC 7162 3.1.3).
        let answer = response == StoreResponse::Answer || unchanged_since.is_some();
        let mut modified = Vec::new();
        for (sequence, uid, id) in self.chosen(set, by_uid) {
            let (add, remove) = match kind {
                StoreType::Add => (flags.clone(), Vec::new()),
                StoreType::Remove => (Vec::new(), flags.clone()),
                StoreType::Replace => {
                    let current = match self.service.email(&account, id) {
                        Ok(email) => email.flags,
                        Err(ServiceError::NoSuchMessage(_)) => continue,
                        Err(error) => return Err(error.into()),
                    };
                    let remove = current.into_iter().filter(|flag| !flags.contains(flag)).collect();
                    (flags.clone(), remove)
                }
            };
            // UNCHANGEDSINCE is checked where the change is written (the store's single writer),
            // so a concurrent writer cannot change the message between the check and the STORE.
            let written = match unchanged_since {
                Some(limit) => {
                    self.service
                        .set_flags_unchanged_since(&account, id, add, remove, limit)
                        .await
                }
                None => self.service.set_flags(&account, id, add, remove).await.map(Some),
            };
            let email = match written {
                Ok(Some(email)) => email,
                Ok(None) => {
                    modified.push(if by_uid { uid } else { sequence });
                    continue;
                }
                Err(ServiceError::NoSuchMessage(_)) => continue,
                Err(error) => return Err(error.into()),
            };
            if !answer && !self.enabled.condstore {
                // .SILENT: the client knows what it set (RFC 3501 6.4.6); no FETCH follows.
                self.reported.insert(id, reported_key(&email.flags, None));
            }
            if answer {
                let uid_item = if by_uid { format!("UID {uid} ") } else { String::new() };
                let modseq = match self.enabled.condstore {
                    true => self.service.email_modseq(&account, id).ok(),
                    false => None,
                };
                self.reported.insert(id, reported_key(&email.flags, modseq));
                let modseq = modseq.map(|modseq| format!(" MODSEQ ({modseq})")).unwrap_or_default();
                self.untagged(&format!(
                    "{sequence} FETCH ({uid_item}FLAGS ({}){modseq})",
                    flag_list(&email.flags)
                ));
            }
        }
        self.refresh(by_uid).await;
        let command = if by_uid { "UID STORE" } else { "STORE" };
        if !modified.is_empty() {
            return Ok(format!(
                "[MODIFIED {}] {command} done, except where changed since",
                compact_set(&modified)
            ));
        }
        Ok(format!("{command} done"))
    }

    async fn expunge_deleted(&mut self, only: Option<&SequenceSet>) -> Result<(), Failure> {
        let view = self.view().expect("selected");
        if view.read_only {
            return Err(Failure::No("[READ-ONLY] the mailbox is read-only".into()));
        }
        let account = view.account.clone();
        let candidates: Vec<(u32, u32, MessageId)> = match only {
            Some(set) => self.chosen(set, true),
            None => view
                .slots
                .iter()
                .enumerate()
                .map(|(index, slot)| (index as u32 + 1, slot.uid, slot.id))
                .collect(),
        };
        for (_, _, id) in candidates {
            match self.service.email(&account, id) {
                Ok(email) if email.flags.contains(&Flag::Deleted) => match self.service.destroy(&account, id).await {
                    Ok(()) | Err(ServiceError::NoSuchMessage(_)) => {}
                    Err(error) => return Err(error.into()),
                },
                Ok(_) | Err(ServiceError::NoSuchMessage(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    async fn expunge(&mut self, only: Option<SequenceSet>) -> Outcome {
        self.expunge_deleted(only.as_ref()).await?;
        self.refresh(true).await;
        Ok("EXPUNGE done".into())
    }

    /// SEARCH, answered as ESEARCH (RFC 4731) when the client asked `RETURN (...)` or enabled
    /// IMAP4rev2; a MODSEQ key adds the highest modseq found (RFC 7162 3.1.5).
    async fn search(
        &mut self,
        tag: &str,
        criteria: &[SearchKey<'static>],
        by_uid: bool,
        search_return: Option<SearchReturn>,
    ) -> Outcome {
        let found = self.matching(criteria).await?;
        let numbers: Vec<u32> = found
            .iter()
            .map(|(sequence, uid, _)| if by_uid { *uid } else { *sequence })
            .collect();
        let highest = if criteria.iter().any(has_modseq_key) {
            self.enabled.condstore = true;
            let account = self.account().unwrap_or_default().to_owned();
            found
                .iter()
                .filter_map(|(_, _, id)| self.service.email_modseq(&account, *id).ok())
                .max()
        } else {
            None
        };
        let search_return = search_return.or(self.enabled.rev2.then_some(SearchReturn {
            all: true,
            ..SearchReturn::default()
        }));
        let line = match search_return {
            Some(options) => {
                let mut line = format!("ESEARCH (TAG \"{tag}\")");
                if by_uid {
                    line.push_str(" UID");
                }
                if let (true, Some(min)) = (options.min, numbers.first()) {
                    line.push_str(&format!(" MIN {min}"));
                }
                if let (true, Some(max)) = (options.max, numbers.last()) {
                    line.push_str(&format!(" MAX {max}"));
                }
                if options.count {
                    line.push_str(&format!(" COUNT {}", numbers.len()));
                }
                if options.all && !numbers.is_empty() {
                    line.push_str(&format!(" ALL {}", compact_set(&numbers)));
                }
                if let Some(highest) = highest.filter(|_| !numbers.is_empty()) {
                    line.push_str(&format!(" MODSEQ {highest}"));
                }
                line
            }
            None => {
                let mut line = String::with_capacity(7 + numbers.len() * 7);
                line.push_str("SEARCH");
                for number in &numbers {
                    line.push(' ');
                    line.push_str(&number.to_string());
                }
                if let Some(highest) = highest.filter(|_| !numbers.is_empty()) {
                    line.push_str(&format!(" (MODSEQ {highest})"));
                }
                line
            }
        };
        self.untagged(&line);
        self.refresh(by_uid).await;
        Ok(format!("{}SEARCH done", if by_uid { "UID " } else { "" }))
    }

    /// SORT (RFC 5256) from the sort indexes: the matching messages in the order of the first
    /// criterion (later criteria only break ties as the index does, by arrival).
    async fn sort(&mut self, criteria: &[SortCriterion], search: &[SearchKey<'static>], by_uid: bool) -> Outcome {
        let first = criteria
            .first()
            .ok_or_else(|| Failure::Bad("no sort criterion".into()))?;
        let key = match first.key {
            ImapSortKey::Arrival => SortKey::Received,
            ImapSortKey::Date => SortKey::Date,
            ImapSortKey::From | ImapSortKey::DisplayFrom => SortKey::From,
            ImapSortKey::Subject => SortKey::Subject,
            ImapSortKey::Size => SortKey::Size,
            _ => return Err(Failure::Bad("sorting by CC or TO is not supported".into())),
        };
        let mut found = self.matching(search).await?;
        let view = self.view().expect("selected");
        let (account, mailbox) = (view.account.clone(), view.mailbox.clone());
        // By ID, to look up each message of the index's order (no hashing of 100,000 IDs).
        found.sort_unstable_by_key(|(_, _, id)| *id);
        let ordered = self.service.sorted_ids(&account, &mailbox, key, first.reverse)?;
        let mut line = Vec::with_capacity(8 + found.len() * 7);
        line.extend_from_slice(b"* SORT");
        for id in ordered {
            if let Ok(index) = found.binary_search_by_key(&id, |(_, _, id)| *id) {
                let (sequence, uid, _) = found[index];
                line.push(b' ');
                write_number(&mut line, if by_uid { uid } else { sequence });
            }
        }
        line.extend_from_slice(b"\r\n");
        self.output.extend_from_slice(&line);
        self.refresh(by_uid).await;
        Ok(format!("{}SORT done", if by_uid { "UID " } else { "" }))
    }

    /// The messages of the view that match every key: (sequence number, UID, ID), ascending.
    async fn matching(&self, criteria: &[SearchKey<'static>]) -> Result<Vec<(u32, u32, MessageId)>, Failure> {
        let view = self.view().expect("selected");
        let slots: Vec<(u32, u32, MessageId)> = view
            .slots
            .iter()
            .enumerate()
            .map(|(index, slot)| (index as u32 + 1, slot.uid, slot.id))
            .collect();
        if criteria.iter().all(|key| matches!(key, SearchKey::All)) {
            return Ok(slots);
        }
        let (account, mailbox) = (view.account.clone(), view.mailbox.clone());
        let largest_sequence = view.slots.len() as u32;
        let largest_uid = view.last_uid();
        // Full-text keys are answered by the search index, once each.
        let mut texts = Vec::new();
        for key in criteria {
            collect_texts(key, &mut texts);
        }
        let mut text_hits: HashMap<String, HashSet<MessageId>> = HashMap::new();
        for text in texts {
            if text_hits.contains_key(&text) {
                continue;
            }
            let result = self
                .service
                .query(
                    &account,
                    self.service.find_mailbox(&account, &mailbox)?,
                    Query {
                        search: Some(text.clone()),
                        sort: SortKey::Received,
                        descending: false,
                        position: 0,
                        limit: usize::MAX / 2,
                    },
                )
                .await?;
            text_hits.insert(text, result.emails.into_iter().map(|email| email.id).collect());
        }
        let mut found = Vec::new();
        for (sequence, uid, id) in slots {
            let email = match self.service.email(&account, id) {
                Ok(email) => email,
                Err(_) => continue,
            };
            let mut candidate = Candidate {
                service: &self.service,
                account: &account,
                sequence,
                uid,
                largest_sequence,
                largest_uid,
                email: &email,
                raw: None,
                text_hits: &text_hits,
            };
            if criteria.iter().all(|key| candidate.matches(key)) {
                found.push((sequence, uid, id));
            }
        }
        Ok(found)
    }

    /// The changes of the selected mailbox, for IDLE.
    pub async fn idle_update(&mut self) {
        self.refresh(true).await;
    }

    /// IDLE ended with DONE.
    pub fn idle_done(&mut self, tag: &str) {
        self.tagged(tag, "OK", "IDLE done");
    }

    /// Whether the session logged out (or was closed by the server).
    pub fn logged_out(&self) -> bool {
        matches!(self.state, State::LoggedOut)
    }
}

trait PipeClose {
    fn pipe_close(self) -> (Outcome, Next);
}

impl PipeClose for (Outcome, Next) {
    /// A command that wrote its own tagged answer: the caller must not write another.
    fn pipe_close(self) -> (Outcome, Next) {
        (Err(Failure::Handled), self.1)
    }
}

trait StaticName {
    fn into_static_name(self) -> MessageDataItemName<'static>;
}

impl StaticName for MessageDataItemName<'_> {
    fn into_static_name(self) -> MessageDataItemName<'static> {
        bounded_static::IntoBoundedStatic::into_static(self)
    }
}

/// One message as SEARCH looks at it; its bytes are read only when a key needs them.
struct Candidate<'a> {
    service: &'a MailService,
    account: &'a str,
    sequence: u32,
    uid: u32,
    largest_sequence: u32,
    largest_uid: u32,
    email: &'a Email,
    raw: Option<Vec<u8>>,
    text_hits: &'a HashMap<String, HashSet<MessageId>>,
}

/// Whether a search has a MODSEQ key anywhere (its answer then carries the highest modseq).
fn has_modseq_key(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::ModSequence { .. } => true,
        SearchKey::And(keys) => keys.as_ref().iter().any(has_modseq_key),
        SearchKey::Or(left, right) => has_modseq_key(left) || has_modseq_key(right),
        SearchKey::Not(key) => has_modseq_key(key),
        _ => false,
    }
}

impl Candidate<'_> {
    fn raw(&mut self) -> &[u8] {
        if self.raw.is_none() {
            self.raw = Some(self.service.raw(self.account, self.email.id).unwrap_or_default());
        }
        self.raw.as_deref().unwrap_or_default()
    }

    fn header_contains(&mut self, name: &str, needle: &AString<'_>) -> bool {
        let needle = String::from_utf8_lossy(needle.as_ref()).to_lowercase();
        match message::header_value(self.raw(), name) {
            Some(value) => value.to_lowercase().contains(&needle),
            None => false,
        }
    }

    fn has(&self, flag: Flag) -> bool {
        self.email.flags.contains(&flag)
    }

    fn text_hit(&self, text: &AString<'_>) -> bool {
        let text = String::from_utf8_lossy(text.as_ref()).into_owned();
        self.text_hits
            .get(&text)
            .is_some_and(|hits| hits.contains(&self.email.id))
    }

    fn sent_day(&mut self) -> Option<chrono::NaiveDate> {
        let millis = self.email.date_millis?;
        chrono::DateTime::from_timestamp_millis(millis as i64).map(|date| date.date_naive())
    }

    fn internal_day(&self) -> Option<chrono::NaiveDate> {
        chrono::DateTime::from_timestamp_millis(self.email.received_millis as i64).map(|date| date.date_naive())
    }

    fn matches(&mut self, key: &SearchKey<'_>) -> bool {
        match key {
            SearchKey::And(keys) => keys.as_ref().iter().all(|key| self.matches(key)),
            SearchKey::Or(left, right) => self.matches(left) || self.matches(right),
            SearchKey::Not(key) => !self.matches(key),
            SearchKey::SequenceSet(set) => set_contains(set, self.sequence, self.largest_sequence),
            SearchKey::Uid(set) => set_contains(set, self.uid, self.largest_uid),
            SearchKey::All => true,
            SearchKey::Answered => self.has(Flag::Answered),
            SearchKey::Unanswered => !self.has(Flag::Answered),
            SearchKey::Deleted => self.has(Flag::Deleted),
            SearchKey::Undeleted => !self.has(Flag::Deleted),
            SearchKey::Draft => self.has(Flag::Draft),
            SearchKey::Undraft => !self.has(Flag::Draft),
            SearchKey::Flagged => self.has(Flag::Flagged),
            SearchKey::Unflagged => !self.has(Flag::Flagged),
            SearchKey::Seen | SearchKey::Old => self.has(Flag::Seen) || matches!(key, SearchKey::Old),
            SearchKey::Unseen => !self.has(Flag::Seen),
            SearchKey::New | SearchKey::Recent => false,
            SearchKey::Keyword(keyword) => self.has(Flag::Keyword(keyword.inner().to_owned())),
            SearchKey::Unkeyword(keyword) => !self.has(Flag::Keyword(keyword.inner().to_owned())),
            SearchKey::Larger(size) => self.email.size > *size as u64,
            SearchKey::Smaller(size) => self.email.size < *size as u64,
            SearchKey::Before(date) => self.internal_day().is_some_and(|day| day < *date.as_ref()),
            SearchKey::On(date) => self.internal_day().is_some_and(|day| day == *date.as_ref()),
            SearchKey::Since(date) => self.internal_day().is_some_and(|day| day >= *date.as_ref()),
            SearchKey::SentBefore(date) => self.sent_day().is_some_and(|day| day < *date.as_ref()),
            SearchKey::SentOn(date) => self.sent_day().is_some_and(|day| day == *date.as_ref()),
            SearchKey::SentSince(date) => self.sent_day().is_some_and(|day| day >= *date.as_ref()),
            SearchKey::From(text) => self.header_contains("From", text),
            SearchKey::To(text) => self.header_contains("To", text),
            SearchKey::Cc(text) => self.header_contains("Cc", text),
            SearchKey::Bcc(text) => self.header_contains("Bcc", text),
            SearchKey::Subject(text) => self.header_contains("Subject", text),
            SearchKey::Header(name, text) => {
                let name = String::from_utf8_lossy(name.as_ref()).into_owned();
                if text.as_ref().is_empty() {
                    message::header_value(self.raw(), &name).is_some()
                } else {
                    self.header_contains(&name, text)
                }
            }
            SearchKey::Body(text) | SearchKey::Text(text) => self.text_hit(text),
            // Per-flag modseqs are not kept: the message's modseq stands for each (RFC 7162 3.1.5).
            SearchKey::ModSequence { modseq, .. } => self
                .service
                .email_modseq(self.account, self.email.id)
                .is_ok_and(|found| found >= *modseq),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

fn collect_texts(key: &SearchKey<'_>, texts: &mut Vec<String>) {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().for_each(|key| collect_texts(key, texts)),
        SearchKey::Or(left, right) => {
            collect_texts(left, texts);
            collect_texts(right, texts);
        }
        SearchKey::Not(key) => collect_texts(key, texts),
        SearchKey::Body(text) | SearchKey::Text(text) => {
            texts.push(String::from_utf8_lossy(text.as_ref()).into_owned())
        }
        _ => {}
    }
}

/// Writes one FETCH data item; fails only for a BINARY part that cannot be decoded.
fn write_item(
    out: &mut Vec<u8>,
    item: &MessageDataItemName<'_>,
    uid: u32,
    modseq: u64,
    email: &Email,
    raw: Option<&[u8]>,
    parsed: Option<&Parsed<'_>>,
) -> Result<(), Failure> {
    let raw = raw.unwrap_or_default();
    match item {
        MessageDataItemName::Uid => out.extend_from_slice(format!("UID {uid}").as_bytes()),
        MessageDataItemName::ModSeq => out.extend_from_slice(format!("MODSEQ ({modseq})").as_bytes()),
        MessageDataItemName::Flags => out.extend_from_slice(format!("FLAGS ({})", flag_list(&email.flags)).as_bytes()),
        MessageDataItemName::InternalDate => {
            out.extend_from_slice(format!("INTERNALDATE \"{}\"", internal_date(email.received_millis)).as_bytes())
        }
        MessageDataItemName::Rfc822Size => out.extend_from_slice(format!("RFC822.SIZE {}", email.size).as_bytes()),
        MessageDataItemName::Envelope => {
            out.extend_from_slice(b"ENVELOPE ");
            if let Some(parsed) = parsed {
                parsed.envelope(out);
            }
        }
        MessageDataItemName::BodyStructure => {
            out.extend_from_slice(b"BODYSTRUCTURE ");
            if let Some(parsed) = parsed {
                parsed.body_structure(out, true);
            }
        }
        MessageDataItemName::Body => {
            out.extend_from_slice(b"BODY ");
            if let Some(parsed) = parsed {
                parsed.body_structure(out, false);
            }
        }
        MessageDataItemName::Rfc822 => {
            out.extend_from_slice(b"RFC822 ");
            message::literal(out, raw);
        }
        MessageDataItemName::Rfc822Header => {
            out.extend_from_slice(b"RFC822.HEADER ");
            let header = parsed
                .and_then(|parsed| parsed.section(&[], &SectionText::Header))
                .unwrap_or_default();
            message::literal(out, &header);
        }
        MessageDataItemName::Rfc822Text => {
            out.extend_from_slice(b"RFC822.TEXT ");
            let text = parsed
                .and_then(|parsed| parsed.section(&[], &SectionText::Text))
                .unwrap_or_default();
            message::literal(out, &text);
        }
        MessageDataItemName::BodyExt { section, partial, .. } => {
            let (path, text, label) = section_parts(section.as_ref());
            let bytes = parsed
                .and_then(|parsed| parsed.section(&path, &text))
                .unwrap_or_default();
            out.extend_from_slice(format!("BODY[{label}]").as_bytes());
            write_partial(out, &bytes, *partial, message::literal);
        }
        MessageDataItemName::Binary { section, partial, .. } => {
            let path: Vec<u32> = section.iter().map(|number| number.get()).collect();
            let label = path.iter().map(u32::to_string).collect::<Vec<_>>().join(".");
            let bytes = decoded(parsed, &path)?;
            out.extend_from_slice(format!("BINARY[{label}]").as_bytes());
            write_partial(out, &bytes, *partial, message::binary_literal);
        }
        MessageDataItemName::BinarySize { section } => {
            let path: Vec<u32> = section.iter().map(|number| number.get()).collect();
            let label = path.iter().map(u32::to_string).collect::<Vec<_>>().join(".");
            let size = decoded(parsed, &path)?.len();
            out.extend_from_slice(format!("BINARY.SIZE[{label}] {size}").as_bytes());
        }
    }
    Ok(())
}

/// BINARY's content of a part (RFC 3516): decoded, or the answer that refuses the FETCH.
fn decoded(parsed: Option<&Parsed<'_>>, path: &[u32]) -> Result<Vec<u8>, Failure> {
    match parsed.map(|parsed| parsed.binary(path)) {
        Some(Ok(Some(bytes))) => Ok(bytes),
        Some(Ok(None)) | None => Err(Failure::No(format!(
            "the message has no part {}",
            path.iter().map(u32::to_string).collect::<Vec<_>>().join(".")
        ))),
        Some(Err(message::BinaryError::UnknownEncoding(encoding))) => Err(Failure::No(format!(
            "[UNKNOWN-CTE] the part's Content-Transfer-Encoding {encoding} is not known here"
        ))),
        Some(Err(message::BinaryError::Corrupt(reason))) => Err(Failure::No(format!("[PARSE] {reason}"))),
    }
}

/// Writes a section's data, or the `<origin>` part of it asked for, with `literal`.
fn write_partial(
    out: &mut Vec<u8>,
    bytes: &[u8],
    partial: Option<(u32, NonZeroU32)>,
    literal: fn(&mut Vec<u8>, &[u8]),
) {
    match partial {
        Some((origin, length)) => {
            let start = (origin as usize).min(bytes.len());
            let end = start.saturating_add(length.get() as usize).min(bytes.len());
            out.extend_from_slice(format!("<{origin}> ").as_bytes());
            literal(out, &bytes[start..end]);
        }
        None => {
            out.push(b' ');
            literal(out, bytes);
        }
    }
}

/// A section's part path, what it asks for, and how the response names it.
fn section_parts(section: Option<&Section<'_>>) -> (Vec<u32>, SectionText, String) {
    let path_of = |part: Option<&imap_codec::imap_types::fetch::Part>| -> Vec<u32> {
        part.map(|part| part.0.as_ref().iter().map(|number| number.get()).collect())
            .unwrap_or_default()
    };
    let label_of = |path: &[u32], suffix: &str| -> String {
        let mut label = path.iter().map(u32::to_string).collect::<Vec<_>>().join(".");
        if !suffix.is_empty() {
            if !label.is_empty() {
                label.push('.');
            }
            label.push_str(suffix);
        }
        label
    };
    let names_of = |names: &imap_codec::imap_types::core::Vec1<AString<'_>>| -> Vec<String> {
        names
            .as_ref()
            .iter()
            .map(|name| String::from_utf8_lossy(name.as_ref()).into_owned())
            .collect()
    };
    match section {
        None => (Vec::new(), SectionText::Full, String::new()),
        Some(Section::Part(part)) => {
            let path = path_of(Some(part));
            let label = label_of(&path, "");
            (path, SectionText::Full, label)
        }
        Some(Section::Header(part)) => {
            let path = path_of(part.as_ref());
            let label = label_of(&path, "HEADER");
            (path, SectionText::Header, label)
        }
        Some(Section::Text(part)) => {
            let path = path_of(part.as_ref());
            let label = label_of(&path, "TEXT");
            (path, SectionText::Text, label)
        }
        Some(Section::Mime(part)) => {
            let path = path_of(Some(part));
            let label = label_of(&path, "MIME");
            (path, SectionText::Mime, label)
        }
        Some(Section::HeaderFields(part, names)) | Some(Section::HeaderFieldsNot(part, names)) => {
            let not = matches!(section, Some(Section::HeaderFieldsNot(..)));
            let path = path_of(part.as_ref());
            let names = names_of(names);
            let mut quoted = Vec::new();
            for (index, name) in names.iter().enumerate() {
                if index > 0 {
                    quoted.push(b' ');
                }
                // Echoed as the client will look for it: an atom when it is one (as Dovecot does).
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
                {
                    quoted.extend_from_slice(name.as_bytes());
                } else {
                    message::string(&mut quoted, name.as_bytes());
                }
            }
            let suffix = format!(
                "{} ({})",
                if not { "HEADER.FIELDS.NOT" } else { "HEADER.FIELDS" },
                String::from_utf8_lossy(&quoted)
            );
            let label = label_of(&path, &suffix);
            (path, SectionText::HeaderFields { names, not }, label)
        }
    }
}

/// Whether a sequence set holds `number`, `*` being `largest`.
fn set_contains(set: &SequenceSet, number: u32, largest: u32) -> bool {
    let value = |item: &SeqOrUid| match item {
        SeqOrUid::Value(value) => value.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|sequence| match sequence {
        Sequence::Single(item) => value(item) == number,
        Sequence::Range(low, high) => {
            let (low, high) = (value(low), value(high));
            (low.min(high)..=low.max(high)).contains(&number)
        }
    })
}

/// A LIST pattern's bytes.
fn pattern_bytes(pattern: &ListMailbox<'_>) -> Vec<u8> {
    match pattern {
        ListMailbox::Token(token) => token.as_ref().to_vec(),
        ListMailbox::String(string) => string.as_ref().to_vec(),
    }
}

/// A mailbox name as the service knows it: `INBOX` in any case is INBOX, modified UTF-7 decoded.
pub fn mailbox_name(mailbox: &Mailbox<'_>) -> String {
    match mailbox {
        Mailbox::Inbox => "INBOX".to_owned(),
        Mailbox::Other(other) => {
            // IMAP4rev1 clients name mailboxes in modified UTF-7; the service keeps UTF-8.
            let name = crate::import::decode_modified_utf7(&String::from_utf8_lossy(other.as_ref()));
            if name.eq_ignore_ascii_case("INBOX") {
                "INBOX".to_owned()
            } else {
                name
            }
        }
    }
}

/// A mailbox's special-use attribute (RFC 6154): from its role (which JMAP sets too), else from
/// a well-known name.
fn special_use(mailbox: &crate::service::MailboxSummary) -> Option<&'static str> {
    use crate::mailbox::Role;
    match mailbox.role {
        Some(Role::Sent) => return Some("\\Sent"),
        Some(Role::Drafts) => return Some("\\Drafts"),
        Some(Role::Trash) => return Some("\\Trash"),
        Some(Role::Junk) => return Some("\\Junk"),
        Some(Role::Archive) => return Some("\\Archive"),
        Some(Role::Inbox) | None => {}
    }
    match mailbox.name.to_ascii_lowercase().as_str() {
        "sent" | "sent items" | "sent messages" => Some("\\Sent"),
        "drafts" => Some("\\Drafts"),
        "trash" | "deleted items" => Some("\\Trash"),
        "junk" | "spam" => Some("\\Junk"),
        "archive" => Some("\\Archive"),
        _ => None,
    }
}

/// LIST's wildcards: `*` matches anything, `%` anything but the delimiter. INBOX without case.
pub fn wildcard_matches(pattern: &str, name: &str) -> bool {
    fn inner(pattern: &[char], name: &[char]) -> bool {
        match pattern.first() {
            None => name.is_empty(),
            Some('*') => (0..=name.len()).any(|skip| inner(&pattern[1..], &name[skip..])),
            Some('%') => (0..=name.len())
                .take_while(|&skip| skip == 0 || name[skip - 1] != DELIMITER)
                .any(|skip| inner(&pattern[1..], &name[skip..])),
            Some(&character) => name.first() == Some(&character) && inner(&pattern[1..], &name[1..]),
        }
    }
    let (pattern, name) = if name == "INBOX" {
        (pattern.to_ascii_uppercase(), name.to_owned())
    } else {
        (pattern.to_owned(), name.to_owned())
    };
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    inner(&pattern, &name)
}

/// Encodes a name in IMAP's modified UTF-7 (RFC 3501 5.1.3): printable ASCII as it is, `&` as
/// `&-`, every other run as UTF-16 in base64 (`,` for `/`, no padding) between `&` and `-`.
pub fn encode_modified_utf7(name: &str) -> String {
    use base64::Engine;
    let alphabet = base64::alphabet::Alphabet::new("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")
        .expect("a valid base64 alphabet");
    let engine = base64::engine::GeneralPurpose::new(
        &alphabet,
        base64::engine::GeneralPurposeConfig::new().with_encode_padding(false),
    );
    let mut out = String::with_capacity(name.len());
    let mut run: Vec<u16> = Vec::new();
    let flush = |run: &mut Vec<u16>, out: &mut String| {
        if !run.is_empty() {
            let bytes: Vec<u8> = run.iter().flat_map(|unit| unit.to_be_bytes()).collect();
            out.push('&');
            out.push_str(&engine.encode(bytes));
            out.push('-');
            run.clear();
        }
    };
    for character in name.chars() {
        if (' '..='~').contains(&character) {
            flush(&mut run, &mut out);
            if character == '&' {
                out.push_str("&-");
            } else {
                out.push(character);
            }
        } else {
            let mut units = [0u16; 2];
            run.extend_from_slice(character.encode_utf16(&mut units));
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Writes a number in decimal without an allocation.
fn write_number(out: &mut Vec<u8>, number: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut rest = number;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// What a FETCH told of a message's flags and modseq, to compare with what a refresh would tell.
fn reported_key(flags: &[Flag], modseq: Option<u64>) -> String {
    format!("{}|{modseq:?}", flag_list(flags))
}

/// HIGHESTMODSEQ as told: at least 1, since 0 would mean no modseqs are kept (RFC 7162 3.1.2.1).
fn highest_modseq(modseq: u64) -> u64 {
    modseq.max(1)
}

/// Ascending numbers as a sequence set: `1:3,5,7:9`.
pub fn compact_set(numbers: &[u32]) -> String {
    let mut out = String::new();
    let mut index = 0;
    while index < numbers.len() {
        let start = numbers[index];
        let mut end = start;
        while index + 1 < numbers.len() && numbers[index + 1] == end.wrapping_add(1) {
            index += 1;
            end = numbers[index];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        index += 1;
    }
    out
}

/// The numbers a set names, ascending, `*` being `largest` and nothing above `largest`.
fn uids_in(set: &SequenceSet, largest: u32) -> impl Iterator<Item = u32> {
    let value = |item: &SeqOrUid| match item {
        SeqOrUid::Value(value) => value.get(),
        SeqOrUid::Asterisk => largest,
    };
    let mut ranges: Vec<(u32, u32)> = set
        .0
        .as_ref()
        .iter()
        .map(|sequence| match sequence {
            Sequence::Single(item) => (value(item), value(item)),
            Sequence::Range(low, high) => {
                let (low, high) = (value(low), value(high));
                (low.min(high), low.max(high))
            }
        })
        .map(|(low, high)| (low, high.min(largest)))
        .filter(|(low, high)| low <= high)
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (low, high) in ranges {
        match merged.last_mut() {
            Some(last) if low <= last.1.saturating_add(1) => last.1 = last.1.max(high),
            _ => merged.push((low, high)),
        }
    }
    merged.into_iter().flat_map(|(low, high)| low..=high)
}

fn flag_list(flags: &[Flag]) -> String {
    flags.iter().map(Flag::as_str).collect::<Vec<_>>().join(" ")
}

/// INTERNALDATE's form: `17-Jul-1996 02:44:25 +0000`.
fn internal_date(millis: u64) -> String {
    chrono::DateTime::from_timestamp_millis(millis as i64)
        .unwrap_or_default()
        .format("%d-%b-%Y %H:%M:%S +0000")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_names_in_modified_utf7() {
        assert_eq!(encode_modified_utf7("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(encode_modified_utf7("A&B"), "A&-B");
        assert_eq!(encode_modified_utf7("日本語/Sent"), "&ZeVnLIqe-/Sent");
        for name in ["Entwürfe", "A&B", "日本語/Sent", "plain", "😀 mail"] {
            assert_eq!(crate::import::decode_modified_utf7(&encode_modified_utf7(name)), name);
        }
    }

    #[test]
    fn list_wildcards() {
        assert!(wildcard_matches("*", "INBOX"));
        assert!(wildcard_matches("inbox", "INBOX"));
        assert!(wildcard_matches("%", "Sent"));
        assert!(!wildcard_matches("%", "Archive/2026"));
        assert!(wildcard_matches("Archive/%", "Archive/2026"));
        assert!(wildcard_matches("*26", "Archive/2026"));
    }

    #[test]
    fn sequence_sets_with_a_star() {
        let set = SequenceSet::try_from("2:*").unwrap();
        assert!(!set_contains(&set, 1, 5));
        assert!(set_contains(&set, 5, 5));
        let set = SequenceSet::try_from("9:*").unwrap();
        assert!(
            set_contains(&set, 5, 5),
            "n:* holds the last message even when n is above it"
        );
    }

    #[test]
    fn sets_are_written_compactly_and_read_in_order() {
        assert_eq!(compact_set(&[1, 2, 3, 5, 7, 8, 9]), "1:3,5,7:9");
        assert_eq!(compact_set(&[4]), "4");
        assert_eq!(compact_set(&[]), "");
        let mut written = Vec::new();
        for number in [0, 7, 10, 4_294_967_295] {
            write_number(&mut written, number);
            written.push(b',');
        }
        assert_eq!(written, b"0,7,10,4294967295,");
        let set = SequenceSet::try_from("7:5,1,2:3,9:*").unwrap();
        assert_eq!(uids_in(&set, 10).collect::<Vec<_>>(), vec![1, 2, 3, 5, 6, 7, 9, 10]);
        assert_eq!(uids_in(&set, 6).collect::<Vec<_>>(), vec![1, 2, 3, 5, 6]);
    }

    #[test]
    fn internal_dates_use_the_imap_form() {
        assert_eq!(internal_date(0), "01-Jan-1970 00:00:00 +0000");
    }
}
