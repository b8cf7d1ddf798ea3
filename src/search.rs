//! Full-text search over from, to, subject and body, on a tantivy index next to the store.
//!
//! The index is a cache: never replicated, rebuildable. The store queues an add or a drop for it
//! in the same RocksDB batch as the record change ([`crate::store::SearchTask`]); [`SearchIndex::catch_up`]
//! applies the queue and only then removes the tasks, so a crash at any point at worst indexes a
//! record twice (adds first delete by key, so twice is once). Every search first catches up, so
//! results are never older than the last acknowledged write, and results are checked against the
//! store so an expunged message drops out at once.
//!
//! The background updater feeds the writer as tasks arrive but commits only every few seconds
//! (or when a search asks): each commit makes a segment that tantivy later merges, and committing
//! twice a second on a busy node spent about half of its CPU in indexing and merges.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tantivy::collector::{Count, TopDocs};
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, Value, FAST, STORED, STRING, TEXT};
use tantivy::{doc, DocAddress, Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term};

use crate::mail;
use crate::model::{MailboxId, MessageId};
use crate::store::{SearchTask, SortKey, Store, StoreError};

/// Why a search or an index update failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("search index: {0}")]
    Index(#[from] tantivy::TantivyError),
    #[error("search index directory: {0}")]
    Directory(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Fields {
    key: Field,
    id: Field,
    mailbox: Field,
    from: Field,
    to: Field,
    subject: Field,
    body: Field,
    received: Field,
    date: Field,
    size: Field,
    from_key: Field,
    subject_key: Field,
}

/// The writer and what it holds that is not committed yet.
struct Writer {
    writer: IndexWriter<TantivyDocument>,
    /// The highest queue sequence handed to the writer (scans start after it).
    fed: u64,
    /// The highest queue sequence committed and removed from the queue.
    committed: u64,
    last_commit: Instant,
}

/// When [`SearchIndex::update`] commits what it fed to the writer.
#[derive(Debug, Clone, Copy)]
pub enum Commit {
    /// Before returning (searches, and callers that need the index current).
    Now,
    /// Once this long has passed since the last commit.
    After(Duration),
}

/// The words of `text` as the index cuts its text fields into terms (tantivy's default
/// tokenizer: runs of letters and digits, lower-cased, words over 40 bytes dropped), each with
/// its byte range in `text`: what a search snippet marks.
pub fn words(text: &str) -> Vec<(std::ops::Range<usize>, String)> {
    use tantivy::tokenizer::TokenStream as _;
    let Some(mut analyzer) = tantivy::tokenizer::TokenizerManager::default().get("default") else {
        return Vec::new();
    };
    let mut stream = analyzer.token_stream(text);
    let mut found = Vec::new();
    while stream.advance() {
        let token = stream.token();
        found.push((token.offset_from..token.offset_to, token.text.clone()));
    }
    found
}

/// The node's full-text index.
pub struct SearchIndex {
    index: Index,
    writer: Mutex<Writer>,
    reader: IndexReader,
    fields: Fields,
}

fn mailbox_term(mailbox: u128) -> String {
    format!("{mailbox:032x}")
}

fn document_key(mailbox: u128, id: MessageId) -> String {
    format!("{mailbox:032x}/{id}")
}

/// Search results: the matching IDs (best `cap` by relevance) and how many matched in all.
#[derive(Debug, Default)]
pub struct SearchHits {
    pub ids: Vec<MessageId>,
    pub total: usize,
}

impl SearchIndex {
    /// Opens or creates the index in `path`.
    pub fn open(path: &Path) -> Result<SearchIndex, SearchError> {
        std::fs::create_dir_all(path).map_err(|error| SearchError::Directory(error.to_string()))?;
        let mut builder = Schema::builder();
        let key = builder.add_text_field("key", STRING);
        let id = builder.add_text_field("id", STRING | STORED);
        let mailbox = builder.add_text_field("mailbox", STRING);
        let from = builder.add_text_field("from", TEXT);
        let to = builder.add_text_field("to", TEXT);
        let subject = builder.add_text_field("subject", TEXT);
        let body = builder.add_text_field("body", TEXT);
        // Sort keys as fast fields, so a search sorted by any order pages inside tantivy.
        let received = builder.add_u64_field("received", FAST);
        let date = builder.add_u64_field("date", FAST);
        let size = builder.add_u64_field("size", FAST);
        let from_key = builder.add_text_field("from_key", STRING | FAST);
        let subject_key = builder.add_text_field("subject_key", STRING | FAST);
        let schema = builder.build();
        let directory =
            tantivy::directory::MmapDirectory::open(path).map_err(|error| SearchError::Directory(error.to_string()))?;
        let index = Index::open_or_create(directory, schema)?;
        // One indexing thread with a 32 MiB arena: segments flush sooner, memory stays bounded.
        let writer = index.writer_with_num_threads(1, 32 * 1024 * 1024)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        Ok(SearchIndex {
            index,
            writer: Mutex::new(Writer {
                writer,
                fed: 0,
                committed: 0,
                last_commit: Instant::now(),
            }),
            reader,
            fields: Fields {
                key,
                id,
                mailbox,
                from,
                to,
                subject,
                body,
                received,
                date,
                size,
                from_key,
                subject_key,
            },
        })
    }

    /// Applies every queued task from the store and commits; returns how many were applied.
    pub fn catch_up(&self, store: &Store) -> Result<usize, SearchError> {
        self.update(store, Commit::Now, usize::MAX)
    }

    /// Feeds queued tasks from the store to the writer, at most `most` of them, and commits as
    /// `commit` says (only then are the tasks removed from the queue); returns how many were fed.
    ///
    /// Tantivy queues up to 10,000 fed documents, bodies included, for its indexing thread.
    /// Feeding a backlog whole once raised a node's peak RSS by 150 MB, so a backlog is fed
    /// 1,000 at a time with a commit after each, which waits for the thread to take them.
    pub fn update(&self, store: &Store, commit: Commit, most: usize) -> Result<usize, SearchError> {
        const FEED_CHUNK: usize = 1000;
        let mut state = self
            .writer
            .lock()
            .map_err(|_| SearchError::Directory("index writer poisoned".into()))?;
        let state = &mut *state;
        let mut handled = 0;
        while handled < most {
            let tasks = store.search_tasks(state.fed, FEED_CHUNK.min(most - handled))?;
            if tasks.is_empty() {
                break;
            }
            for (_, task) in &tasks {
                self.apply(store, &mut state.writer, task)?;
            }
            state.fed = tasks.iter().map(|(sequence, _)| *sequence).max().unwrap_or(state.fed);
            handled += tasks.len();
            if tasks.len() == FEED_CHUNK && handled < most {
                self.commit(store, state)?; // more may follow: drain tantivy's queue first
            }
        }
        let due = match commit {
            Commit::Now => true,
            Commit::After(interval) => state.last_commit.elapsed() >= interval,
        };
        if due {
            self.commit(store, state)?;
        }
        Ok(handled)
    }

    /// Commits what was fed, if anything, then drops it from the store's queue.
    fn commit(&self, store: &Store, state: &mut Writer) -> Result<(), SearchError> {
        if state.fed > state.committed {
            state.writer.commit()?;
            store.finish_search_tasks(state.fed)?;
            state.committed = state.fed;
            state.last_commit = Instant::now();
            self.reader.reload()?;
        }
        Ok(())
    }

    /// Hands one queued task to the writer.
    fn apply(
        &self,
        store: &Store,
        writer: &mut IndexWriter<TantivyDocument>,
        task: &SearchTask,
    ) -> Result<(), SearchError> {
        match task {
            SearchTask::Add {
                mailbox,
                container,
                id,
                blob,
            } => {
                let key = document_key(*mailbox, *id);
                writer.delete_term(Term::from_field_text(self.fields.key, &key));
                let container = MailboxId(*container);
                let Some(record) = store.record(container, *id)? else {
                    return Ok(());
                };
                let listing = store
                    .local_state(container, *id)?
                    .and_then(|state| state.listing)
                    .unwrap_or_default();
                let raw = store.blob(blob)?.unwrap_or_default();
                let text = mail::search_text(&raw);
                let text_key = |sort: SortKey| String::from_utf8_lossy(&sort.key(&record, &listing)).into_owned();
                writer.add_document(doc!(
                    self.fields.received => record.received_millis,
                    self.fields.date => listing.date_millis.unwrap_or(record.received_millis),
                    self.fields.size => record.size,
                    self.fields.from_key => text_key(SortKey::From),
                    self.fields.subject_key => text_key(SortKey::Subject),
                    self.fields.key => key,
                    self.fields.id => id.to_string(),
                    self.fields.mailbox => mailbox_term(*mailbox),
                    self.fields.from => text.from,
                    self.fields.to => text.to,
                    self.fields.subject => text.subject,
                    self.fields.body => text.body,
                ))?;
            }
            SearchTask::Remove { id } => {
                // The key needs the mailbox; the id alone is unique on this node's records, so
                // drop by id.
                writer.delete_term(Term::from_field_text(self.fields.id, &id.to_string()));
            }
        }
        Ok(())
    }

    /// Messages of one mailbox matching `text` (tantivy query syntax, read leniently), in a sort
    /// order, `limit` of them after skipping `offset`; live ones only.
    #[allow(clippy::too_many_arguments)]
    pub fn search(
        &self,
        store: &Store,
        mailbox: MailboxId,
        text: &str,
        sort: SortKey,
        descending: bool,
        offset: usize,
        limit: usize,
    ) -> Result<SearchHits, SearchError> {
        self.catch_up(store)?;
        let container = store.container_of(mailbox)?;
        let parser = tantivy::query::QueryParser::for_index(
            &self.index,
            vec![self.fields.from, self.fields.to, self.fields.subject, self.fields.body],
        );
        let (user_query, _errors) = parser.parse_query_lenient(text);
        let in_mailbox: Box<dyn Query> = Box::new(TermQuery::new(
            Term::from_field_text(self.fields.mailbox, &mailbox_term(mailbox.0)),
            IndexRecordOption::Basic,
        ));
        let query = BooleanQuery::new(vec![(Occur::Must, in_mailbox), (Occur::Must, user_query)]);
        let searcher = self.reader.searcher();
        let order = if descending { Order::Desc } else { Order::Asc };
        let top = TopDocs::with_limit(limit.max(1)).and_offset(offset);
        let (addresses, total): (Vec<DocAddress>, usize) = match sort {
            SortKey::Received | SortKey::Date | SortKey::Size => {
                let field = match sort {
                    SortKey::Received => "received",
                    SortKey::Date => "date",
                    _ => "size",
                };
                let (found, total) = searcher.search(&query, &(top.order_by_fast_field::<u64>(field, order), Count))?;
                (found.into_iter().map(|(_, address)| address).collect(), total)
            }
            SortKey::From | SortKey::Subject => {
                let field = if sort == SortKey::From {
                    "from_key"
                } else {
                    "subject_key"
                };
                let (found, total) = searcher.search(&query, &(top.order_by_string_fast_field(field, order), Count))?;
                (found.into_iter().map(|(_, address)| address).collect(), total)
            }
        };
        let mut hits = SearchHits {
            ids: Vec::with_capacity(addresses.len()),
            total,
        };
        if limit == 0 {
            return Ok(hits);
        }
        for address in addresses {
            let document: TantivyDocument = searcher.doc(address)?;
            let Some(id) = document
                .get_first(self.fields.id)
                .and_then(|value| value.as_str())
                .and_then(|s| s.parse().ok())
            else {
                continue;
            };
            if store
                .local_state(container, id)?
                .is_some_and(|state| state.listing.is_some() && state.view == mailbox.0)
            {
                hits.ids.push(id);
            } else {
                hits.total = hits.total.saturating_sub(1);
            }
        }
        Ok(hits)
    }

    /// Deletes every document (before a rebuild from the store's queue).
    pub fn clear(&self) -> Result<(), SearchError> {
        let mut state = self
            .writer
            .lock()
            .map_err(|_| SearchError::Directory("index writer poisoned".into()))?;
        state.writer.delete_all_documents()?;
        state.writer.commit()?;
        state.last_commit = Instant::now();
        // Tasks fed but not committed were dropped with the rest; they are still queued.
        state.fed = state.committed;
        self.reader.reload()?;
        Ok(())
    }
}
