//! zstd for outgoing batches. A `ServerMessage` above `delivery.compression_threshold` goes to a
//! client that accepts zstd in its compressed form. A batch of one subscription's updates is
//! the same for every subscriber of the channel but for `sub_id`, so it is compressed once with
//! `sub_id` left out and the same bytes go to all of them, each copy naming its `sub_id` in the
//! envelope (`ServerMessage.sub_id`). Optional dictionaries, one per update type, trained from
//! samples with `routopia-realtime train-dict`, shrink small messages further.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use zstd::zstd_safe::{self, CCtx, CDict};

use crate::config::{parse_update_type, Delivery};
use crate::core::Publication;
use crate::protocol::push::{push_len, write_push};

/// Shared batches a shard remembers; a subscriber whose batch is among them gets the same
/// bytes without compressing again. Subscribers of one channel drain within a few runtime
/// turns of each other, so a short memory catches almost all of them.
const SHARED_BATCHES: usize = 256;

/// A trained zstd dictionary for one update type.
pub struct Dictionary {
    /// The id zstd writes into every frame compressed with it.
    pub id: u32,
    pub update_type: i32,
    /// The dictionary as trained, served at `GET /zstd/dictionaries/{id}`.
    pub bytes: Bytes,
    prepared: CDict<'static>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary").field("id", &self.id).field("update_type", &self.update_type).finish()
    }
}

/// Why the compression settings were refused at start.
#[derive(Debug, thiserror::Error)]
pub enum DictionaryError {
    #[error("zstd dictionary {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("two zstd dictionaries for update type {0}")]
    TwoForOneType(String),
    #[error("two zstd dictionaries with id {0}")]
    SameId(u32),
}

/// How outgoing messages are compressed, shared by every shard.
#[derive(Debug)]
pub struct ZstdSettings {
    /// Messages of at least this many bytes are compressed; 0: never.
    pub threshold: usize,
    pub level: i32,
    pub dictionaries: Vec<Dictionary>,
}

impl ZstdSettings {
    pub fn from_config(delivery: &Delivery) -> Result<Self, DictionaryError> {
        let mut dictionaries: Vec<Dictionary> = Vec::new();
        for entry in &delivery.zstd_dictionaries {
            let update_type = parse_update_type(&entry.r#type).ok_or_else(|| DictionaryError::File {
                path: entry.file.clone(),
                reason: format!("unknown update type {:?}", entry.r#type),
            })?;
            let dictionary = Dictionary::load(&entry.file, update_type, delivery.compression_level)?;
            if dictionaries.iter().any(|d| d.update_type == update_type) {
                return Err(DictionaryError::TwoForOneType(entry.r#type.clone()));
            }
            if dictionaries.iter().any(|d| d.id == dictionary.id) {
                return Err(DictionaryError::SameId(dictionary.id));
            }
            dictionaries.push(dictionary);
        }
        Ok(Self { threshold: delivery.compression_threshold, level: delivery.compression_level, dictionaries })
    }

    /// Bit `i` set for each of `ids` that names `dictionaries[i]` (ids the server does not
    /// have are ignored: the client may hold an older one).
    pub fn held_mask(&self, ids: &[u32]) -> u32 {
        self.dictionaries.iter().enumerate().filter(|(_, d)| ids.contains(&d.id)).fold(0, |mask, (i, _)| mask | 1 << i)
    }

    fn dictionary_for(&self, update_type: i32, held: u32) -> Option<usize> {
        self.dictionaries.iter().position(|d| d.update_type == update_type).filter(|&i| held & (1 << i) != 0)
    }
}

impl Dictionary {
    pub fn load(path: &Path, update_type: i32, level: i32) -> Result<Self, DictionaryError> {
        let failed = |reason: String| DictionaryError::File { path: path.to_owned(), reason };
        let bytes = std::fs::read(path).map_err(|err| failed(err.to_string()))?;
        Self::from_bytes(bytes.into(), update_type, level).map_err(failed)
    }

    pub fn from_bytes(bytes: Bytes, update_type: i32, level: i32) -> Result<Self, String> {
        let id = zstd_safe::get_dict_id_from_dict(&bytes)
            .ok_or("not a zstd dictionary (train one with `routopia-realtime train-dict`)")?
            .get();
        let prepared = CDict::try_create(&bytes, level).ok_or("zstd refused the dictionary")?;
        Ok(Self { id, update_type, bytes, prepared })
    }
}

/// What a shard's compressor did, for its counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompressionCounters {
    /// Messages sent compressed.
    pub messages: u64,
    /// Their plain and compressed sizes.
    pub plain_bytes: u64,
    pub compressed_bytes: u64,
    /// Times zstd ran (fewer than `messages` when batches were shared).
    pub compressions: u64,
    /// Messages sent with a dictionary.
    pub with_dictionary: u64,
}

/// One shard's memory of shared batches (one subscription's run of updates, encoded without
/// `sub_id`, the same for every subscriber of the channel that drains the same run) and its
/// zstd context.
pub struct SharedBatches {
    recent: RecentBatches,
    zstd: Zstd,
}

/// The batches, by the addresses of their publications, oldest forgotten first.
struct RecentBatches {
    batches: HashMap<u64, SharedBatch>,
    /// Keys in insertion order, for forgetting the oldest.
    order: VecDeque<u64>,
}

struct SharedBatch {
    /// Held so that their addresses, which identify the batch, are not reused meanwhile.
    publications: Box<[Rc<Publication>]>,
    /// Elements of `ServerMessage.frames`, one update each, without `sub_id`.
    plain: Bytes,
    /// Compressed forms made so far, by dictionary; empty bytes: not smaller than plain.
    compressed: Vec<(Option<usize>, Bytes)>,
}

/// The shard's zstd context, its settings and what it did.
struct Zstd {
    settings: Arc<ZstdSettings>,
    context: CCtx<'static>,
    counters: CompressionCounters,
}

impl SharedBatches {
    pub fn new(settings: Arc<ZstdSettings>) -> Self {
        Self {
            recent: RecentBatches { batches: HashMap::new(), order: VecDeque::new() },
            zstd: Zstd { settings, context: CCtx::create(), counters: CompressionCounters::default() },
        }
    }

    pub fn threshold(&self) -> usize {
        self.zstd.settings.threshold
    }

    /// Counters since the last call.
    pub fn take_counters(&mut self) -> CompressionCounters {
        std::mem::take(&mut self.zstd.counters)
    }

    /// Forgets the shared batches (they hold publications alive).
    pub fn forget_shared(&mut self) {
        self.recent.batches.clear();
        self.recent.order.clear();
    }

    /// The frames of a `ServerMessage` holding `publications` as updates without `sub_id`,
    /// encoded once and shared.
    pub fn shared_plain<'p, I>(&mut self, publications: I) -> Bytes
    where
        I: Iterator<Item = &'p Rc<Publication>> + Clone,
    {
        self.recent.find_or_make(publications).plain.clone()
    }

    /// Their compressed form (with the dictionary of their type when they are all of one type
    /// and the connection `held` it), made once and shared; `None` when compressing does not
    /// make it smaller.
    pub fn shared_compressed<'p, I>(&mut self, publications: I, held: u32) -> Option<Bytes>
    where
        I: Iterator<Item = &'p Rc<Publication>> + Clone,
    {
        let dictionary = self.zstd.uniform_dictionary(publications.clone().map(|p| p.update_type), held);
        let batch = self.recent.find_or_make(publications);
        let made = batch.compressed.iter().find(|(d, _)| *d == dictionary).map(|(_, bytes)| bytes.clone());
        let compressed = match made {
            Some(bytes) => bytes,
            None => {
                let bytes = self.zstd.compress(&batch.plain, dictionary).map(Bytes::from).unwrap_or_default();
                batch.compressed.push((dictionary, bytes.clone()));
                bytes
            }
        };
        if compressed.is_empty() {
            return None;
        }
        self.zstd.count_sent(batch.plain.len(), compressed.len(), dictionary);
        Some(compressed)
    }

    /// `plain` (an encoded `ServerMessage`) compressed for one connection, with the
    /// dictionary of `update_type` when the connection holds it; `None` when not smaller.
    pub fn own(&mut self, plain: &[u8], update_type: Option<i32>, held: u32) -> Option<Vec<u8>> {
        let dictionary = update_type.and_then(|t| self.zstd.settings.dictionary_for(t, held));
        let compressed = self.zstd.compress(plain, dictionary)?;
        self.zstd.count_sent(plain.len(), compressed.len(), dictionary);
        Some(compressed)
    }
}

impl RecentBatches {
    /// The batch of `publications`, made (and the oldest forgotten) if new.
    fn find_or_make<'p, I>(&mut self, publications: I) -> &mut SharedBatch
    where
        I: Iterator<Item = &'p Rc<Publication>> + Clone,
    {
        let key = batch_key(publications.clone());
        // None: new; Some(false): another batch with the same key, whose place this one takes.
        let same = self.batches.get(&key).map(|batch| {
            let mut remembered = batch.publications.iter();
            publications.clone().all(|p| remembered.next().is_some_and(|r| Rc::ptr_eq(p, r)))
                && remembered.next().is_none()
        });
        if same.is_none() {
            if self.order.len() >= SHARED_BATCHES {
                if let Some(oldest) = self.order.pop_front() {
                    self.batches.remove(&oldest);
                }
            }
            self.order.push_back(key);
        }
        let make = || {
            let mut plain = Vec::with_capacity(publications.clone().map(|p| push_len(0, p.body.len())).sum());
            for publication in publications.clone() {
                write_push(&mut plain, 0, &publication.body);
            }
            SharedBatch {
                publications: publications.clone().cloned().collect(),
                plain: plain.into(),
                compressed: Vec::new(),
            }
        };
        match self.batches.entry(key) {
            Entry::Occupied(found) if same == Some(true) => found.into_mut(),
            Entry::Occupied(mut other) => {
                other.insert(make());
                other.into_mut()
            }
            Entry::Vacant(slot) => slot.insert(make()),
        }
    }
}

impl Zstd {
    /// The dictionary for a batch whose updates are all of one type the connection holds one for.
    fn uniform_dictionary(&self, mut types: impl Iterator<Item = i32>, held: u32) -> Option<usize> {
        if held == 0 {
            return None;
        }
        let first = types.next()?;
        types.all(|t| t == first).then(|| self.settings.dictionary_for(first, held)).flatten()
    }

    fn compress(&mut self, plain: &[u8], dictionary: Option<usize>) -> Option<Vec<u8>> {
        self.counters.compressions += 1;
        let mut compressed = Vec::with_capacity(zstd_safe::compress_bound(plain.len()));
        let written = match dictionary {
            Some(i) => {
                self.context.compress_using_cdict(&mut compressed, plain, &self.settings.dictionaries[i].prepared)
            }
            None => self.context.compress(&mut compressed, plain, self.settings.level),
        };
        // Worth it only if the envelope (a few bytes more) still comes out smaller.
        written.ok().filter(|&n| n + 8 < plain.len()).map(|_| compressed)
    }

    fn count_sent(&mut self, plain: usize, compressed: usize, dictionary: Option<usize>) {
        self.counters.messages += 1;
        self.counters.plain_bytes += plain as u64;
        self.counters.compressed_bytes += compressed as u64;
        self.counters.with_dictionary += u64::from(dictionary.is_some());
    }
}

/// Identifies a batch by the addresses of its publications (kept alive by the entry).
fn batch_key<'p>(publications: impl Iterator<Item = &'p Rc<Publication>>) -> u64 {
    let mut key = 0x9e37_79b9_7f4a_7c15u64;
    for publication in publications {
        key = (key ^ Rc::as_ptr(publication) as u64).rotate_left(29).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    }
    key
}

/// Trains a dictionary of at most `max_size` bytes from samples of one update type's payloads.
pub fn train(samples: &[Vec<u8>], max_size: usize) -> std::io::Result<Vec<u8>> {
    zstd::dict::from_samples(samples, max_size)
}

/// Samples for [`train`]: each file one sample, directories read one level deep, or with
/// `lines` each non-empty line one sample.
pub fn read_samples(paths: &[PathBuf], lines: bool) -> std::io::Result<Vec<Vec<u8>>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> =
                std::fs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
            entries.retain(|p| p.is_file());
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    let mut samples = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file)?;
        if lines {
            samples.extend(bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec));
        } else if !bytes.is_empty() {
            samples.push(bytes);
        }
    }
    Ok(samples)
}

/// Mean sizes of samples: plain, zstd alone, zstd with a dictionary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Savings {
    pub plain: usize,
    pub without_dictionary: usize,
    pub with_dictionary: usize,
}

/// What `dictionary` saves on `samples`, each compressed alone as a small message is.
pub fn dictionary_savings(dictionary: &Dictionary, samples: &[Vec<u8>], level: i32) -> Savings {
    let mut context = CCtx::create();
    let mut totals = [0usize; 3];
    let mut out = Vec::new();
    for sample in samples {
        out.clear();
        out.reserve(zstd_safe::compress_bound(sample.len()));
        let without = context.compress(&mut out, sample, level).unwrap_or(sample.len());
        out.clear();
        let with = context.compress_using_cdict(&mut out, sample, &dictionary.prepared).unwrap_or(sample.len());
        totals[0] += sample.len();
        totals[1] += without;
        totals[2] += with;
    }
    let n = samples.len().max(1);
    Savings { plain: totals[0] / n, without_dictionary: totals[1] / n, with_dictionary: totals[2] / n }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::envelope;
    use crate::protocol::pb::{server_frame::Kind, ServerMessage, Update};
    use crate::protocol::push::encode_update_body;
    use prost::Message;
    use std::sync::Arc as StdArc;
    use std::time::Instant;

    fn settings(threshold: usize) -> Arc<ZstdSettings> {
        Arc::new(ZstdSettings { threshold, level: 3, dictionaries: Vec::new() })
    }

    fn publication(offset: u64, text: &str) -> Rc<Publication> {
        let update = Update { offset, r#type: 1, payload: Bytes::from(text.repeat(20)), ..Default::default() };
        Rc::new(crate::protocol::push::publication(
            StdArc::from("route:7"),
            offset,
            1,
            encode_update_body(&update),
            Instant::now(),
        ))
    }

    /// Decodes a message the way a client does: the envelope's `sub_id` fills the updates.
    fn decode(compressed: Bytes, sub_id: u32) -> Vec<Update> {
        let message = ServerMessage { frames: Vec::new(), zstd: compressed, sub_id };
        let frames =
            envelope::decode::<ServerMessage>(&message.encode_to_vec()[..], 1 << 20, &Default::default()).unwrap();
        frames
            .into_iter()
            .map(|f| match f.kind {
                Some(Kind::Update(update)) => update,
                other => panic!("not an update: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_shared_batch_is_compressed_once_and_names_no_subscriber() {
        let mut compressor = SharedBatches::new(settings(64));
        let (a, b) = (publication(1, "north ring closed "), publication(2, "detour via A10 "));
        let first = compressor.shared_compressed([&a, &b].into_iter(), 0).expect("repetitive text compresses");
        let second = compressor.shared_compressed([&a, &b].into_iter(), 0).expect("the same batch again");
        assert_eq!(first, second);
        let counters = compressor.take_counters();
        assert_eq!((counters.messages, counters.compressions), (2, 1));
        assert!(counters.compressed_bytes < counters.plain_bytes);
        let updates = decode(first, 9);
        assert_eq!(updates.iter().map(|u| (u.sub_id, u.offset)).collect::<Vec<_>>(), [(9, 1), (9, 2)]);
    }

    #[test]
    fn a_plain_shared_batch_is_encoded_once_and_names_no_subscriber() {
        let mut batches = SharedBatches::new(settings(0));
        let (a, b) = (publication(1, "north ring closed "), publication(2, "detour via A10 "));
        let first = batches.shared_plain([&a, &b].into_iter());
        let second = batches.shared_plain([&a, &b].into_iter());
        assert_eq!(first.as_ptr(), second.as_ptr(), "the same bytes, not a copy");
        let message = ServerMessage::decode(first).unwrap();
        assert!(message.frames.iter().all(|f| matches!(&f.kind, Some(Kind::Update(u)) if u.sub_id == 0)));
        assert_eq!(message.frames.len(), 2);
    }

    #[test]
    fn a_different_batch_is_not_mistaken_for_a_shared_one() {
        let mut compressor = SharedBatches::new(settings(64));
        let (a, b) = (publication(1, "north ring closed "), publication(2, "detour via A10 "));
        compressor.shared_compressed([&a, &b].into_iter(), 0).unwrap();
        let only_b = compressor.shared_compressed([&b].into_iter(), 0).unwrap();
        assert_eq!(decode(only_b, 1).iter().map(|u| u.offset).collect::<Vec<_>>(), [2]);
        assert_eq!(compressor.take_counters().compressions, 2);
    }

    #[test]
    fn incompressible_batches_stay_plain() {
        let mut compressor = SharedBatches::new(settings(16));
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..400)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let update = Update { offset: 1, r#type: 1, payload: noise.into(), ..Default::default() };
        let noisy = Rc::new(crate::protocol::push::publication(
            StdArc::from("c"),
            1,
            1,
            encode_update_body(&update),
            Instant::now(),
        ));
        assert!(compressor.shared_compressed([&noisy].into_iter(), 0).is_none());
        assert!(compressor.shared_compressed([&noisy].into_iter(), 0).is_none(), "remembered as not worth it");
        assert_eq!(compressor.take_counters().messages, 0);
    }

    #[test]
    fn a_dictionary_is_used_only_for_a_connection_that_holds_it() {
        let samples: Vec<Vec<u8>> = (0..400)
            .map(|i| {
                format!("{{\"route\":{i},\"eta_s\":{},\"steps\":[\"turn left onto Main St\"]}}", i * 7).into_bytes()
            })
            .collect();
        let trained = train(&samples, 4096).unwrap();
        let dictionary = Dictionary::from_bytes(trained.into(), 1, 3).unwrap();
        let id = dictionary.id;
        let settings = Arc::new(ZstdSettings { threshold: 16, level: 3, dictionaries: vec![dictionary] });
        assert_eq!(settings.held_mask(&[id, 12345]), 1);
        assert_eq!(settings.held_mask(&[12345]), 0);
        let mut compressor = SharedBatches::new(settings);
        let route = publication(5, "{\"route\":5,\"eta_s\":35,\"steps\":[\"turn left onto Main St\"]}");
        let with = compressor.shared_compressed([&route].into_iter(), 1).unwrap();
        assert_eq!(zstd_safe::get_dict_id_from_frame(&with).map(|id| id.get()), Some(id));
        let without = compressor.shared_compressed([&route].into_iter(), 0).unwrap();
        assert_eq!(zstd_safe::get_dict_id_from_frame(&without), None);
        assert_eq!(compressor.take_counters().with_dictionary, 1);
    }
}
