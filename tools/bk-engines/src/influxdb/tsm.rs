//! Counting what a shard of an `influxd backup -portable` holds, from its bytes: the shard
//! file is a gzip'd tar of TSM files (and their tombstones); every block's CRC is checked and
//! its timestamps counted. The count of a measurement is its field values: one per (series,
//! field, timestamp), as `SELECT count(*)` sums them. Blocks of a key that overlap in time
//! (a point written again before a compaction) are decoded and their timestamps merged, so
//! the count is what the server answers for the restored shard. Tombstones (deletes not yet
//! compacted away) are not applied: `influxd restore` leaves them out (it restores only the
//! TSM files), so the deleted values come back with a restore; they are counted apart, for
//! the dump to say so.
//!
//! The format is InfluxDB 1.x's `tsdb/engine/tsm1` (file.go, timestamp.go, tombstone.go) and
//! `pkg/encoding/simple8b`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use bk_core::error::{from_io, Error, Result};

const TSM_MAGIC: u32 = 0x16D1_16D1;
const TSM_VERSION: u8 = 1;
const TOMBSTONE_V3: u32 = 0x1503;
const TOMBSTONE_V4: u32 = 0x1504;
/// Between a series key and a field name in a TSM key.
const FIELD_SEPARATOR: &[u8] = b"#!~#";
/// A block bigger than this is not one influxd writes (1000 points, 2 GiB files).
const MAX_BLOCK: u32 = 64 << 20;
/// Nor a block of more timestamps than this (influxd writes 1000 at most by default): a
/// hostile count is refused before anything is allocated for it.
const MAX_POINTS: u64 = 1 << 20;
/// A TSM key is at most 64 KiB (its length is 16 bits in the index).
const MAX_KEY: usize = 1 << 16;

/// One block of one key, as the index of its file gives it.
struct Block {
    file: usize,
    offset: u64,
    size: u32,
    min: i64,
    max: i64,
}

/// A deleted time range of a key (or of every field of a series) in one TSM file.
struct Tombstone {
    key: Vec<u8>,
    min: i64,
    max: i64,
}

/// A TSM file of the shard, extracted to the work directory.
struct TsmFile {
    stem: String,
    database: String,
    path: std::path::PathBuf,
}

/// What a shard holds.
#[derive(Default)]
pub struct ShardCounts {
    /// Field values per `database.measurement`, as a restore of the shard holds them.
    pub values: BTreeMap<String, u64>,
    /// Of those, the values that a delete not yet compacted away covers (a restore brings
    /// them back).
    pub deleted: u64,
}

/// The field values in a shard file (`what` names it in errors). TSM files are extracted
/// into `work` (private, the caller's), read, and removed.
pub fn count_shard(shard: &mut dyn Read, what: &str, work: &Path) -> Result<ShardCounts> {
    let bad = |why: String| Error::data(format!("{what}: {why}"));
    let reading = |e: io::Error| {
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            from_io(format!("reading {what}"), e)
        } else {
            bad(format!("not a readable gzip'd tar of TSM files: {e}"))
        }
    };
    let mut files: Vec<TsmFile> = Vec::new();
    let mut tombstones: HashMap<String, Vec<Tombstone>> = HashMap::new();
    let _remove = Removal(work.to_path_buf());
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(shard));
    for entry in archive.entries().map_err(reading)? {
        let mut entry = entry.map_err(reading)?;
        if !entry.header().entry_type().is_file() {
            io::copy(&mut entry, &mut io::sink()).map_err(reading)?;
            continue;
        }
        let path = entry.path().map_err(reading)?.into_owned();
        let database = path
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".tsm") {
            let extracted = work.join(format!("{}.tsm", files.len()));
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&extracted)
                .map_err(|e| Error::create(&extracted, e))?;
            io::copy(&mut entry, &mut out).map_err(reading)?;
            files.push(TsmFile {
                stem: stem.to_string(),
                database,
                path: extracted,
            });
        } else if let Some(stem) = name.strip_suffix(".tombstone") {
            let read = read_tombstones(&mut entry).map_err(|e| match e {
                Ok(why) => bad(format!("{}: {why}", path.display())),
                Err(e) => reading(e),
            })?;
            tombstones.entry(stem.to_string()).or_default().extend(read);
        } else {
            io::copy(&mut entry, &mut io::sink()).map_err(reading)?;
        }
    }
    // To the end of the gzip stream, whose CRC is checked there.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(reading)?;
    count_files(&files, &tombstones).map_err(|e| match e {
        Ok(why) => bad(why),
        Err(e) => Error::io(format!("reading {what}"), e),
    })
}

/// Removes the extracted files of a shard, whatever happens.
struct Removal(std::path::PathBuf);

impl Drop for Removal {
    fn drop(&mut self) {
        for entry in fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A failure: `Ok(why)` the data is bad, `Err` reading it failed.
type Failure = std::result::Result<String, io::Error>;

fn count_files(
    files: &[TsmFile],
    tombstones: &HashMap<String, Vec<Tombstone>>,
) -> std::result::Result<ShardCounts, Failure> {
    let mut keys: HashMap<(String, Vec<u8>), Vec<Block>> = HashMap::new();
    let mut opened = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut file = File::open(&f.path).map_err(Err)?;
        for (key, blocks) in read_index(&mut file).map_err(|e| e.map(|why| format!("{}.tsm: {why}", f.stem)))? {
            let entry = keys.entry((f.database.clone(), key)).or_default();
            entry.extend(blocks.into_iter().map(|(min, max, offset, size)| Block {
                file: i,
                offset,
                size,
                min,
                max,
            }));
        }
        opened.push(file);
    }
    let mut counts = ShardCounts::default();
    for ((database, key), mut blocks) in keys {
        blocks.sort_by_key(|b| b.min);
        let deleted: Vec<(usize, i64, i64)> = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| {
                tombstones
                    .get(&f.stem)
                    .into_iter()
                    .flatten()
                    .filter(|t| applies(&t.key, &key))
                    .map(move |t| (i, t.min, t.max))
            })
            .collect();
        let overlap = blocks.windows(2).any(|w| w[1].min <= w[0].max);
        let mut n = 0u64;
        if !overlap && deleted.is_empty() {
            for b in &blocks {
                n += read_timestamps(&mut opened[b.file], b, false)?.0;
            }
        } else {
            let (mut all, mut kept) = (Vec::new(), Vec::new());
            for b in &blocks {
                let times = read_timestamps(&mut opened[b.file], b, true)?.1;
                kept.extend(times.iter().copied().filter(|t| {
                    !deleted
                        .iter()
                        .any(|(file, min, max)| *file == b.file && (min..=max).contains(&t))
                }));
                all.extend(times);
            }
            for times in [&mut all, &mut kept] {
                times.sort_unstable();
                times.dedup();
            }
            n = all.len() as u64;
            counts.deleted += n - kept.len() as u64;
        }
        *counts
            .values
            .entry(format!("{database}.{}", measurement(&key)))
            .or_insert(0) += n;
    }
    Ok(counts)
}

/// A tombstone's key names a whole TSM key, or a series (every field of it).
fn applies(tombstone: &[u8], key: &[u8]) -> bool {
    key == tombstone
        || key
            .strip_prefix(tombstone)
            .is_some_and(|rest| rest.starts_with(FIELD_SEPARATOR))
}

/// The measurement of a TSM key: up to the first unescaped ',' (tags follow) or the field
/// separator, with line protocol's escapes of ',' and ' ' undone.
fn measurement(key: &[u8]) -> String {
    let series = match key.windows(FIELD_SEPARATOR.len()).position(|w| w == FIELD_SEPARATOR) {
        Some(i) => &key[..i],
        None => key,
    };
    let mut name = Vec::new();
    let mut i = 0;
    while i < series.len() {
        match series[i] {
            b'\\' if i + 1 < series.len() && matches!(series[i + 1], b',' | b' ') => {
                name.push(series[i + 1]);
                i += 2;
            }
            b',' => break,
            c => {
                name.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&name).into_owned()
}

type IndexEntries = Vec<(Vec<u8>, Vec<(i64, i64, u64, u32)>)>;

/// The index of a TSM file: every key with its blocks (min time, max time, offset, size).
fn read_index(file: &mut File) -> std::result::Result<IndexEntries, Failure> {
    let len = file.metadata().map_err(Err)?.len();
    let mut header = [0u8; 5];
    if len < 13 || file.read_exact(&mut header).is_err() {
        return Err(Ok("too short for a TSM file".into()));
    }
    if u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) != TSM_MAGIC || header[4] != TSM_VERSION {
        return Err(Ok("not a TSM file (version 1)".into()));
    }
    file.seek(SeekFrom::Start(len - 8)).map_err(Err)?;
    let mut footer = [0u8; 8];
    file.read_exact(&mut footer).map_err(Err)?;
    let index_at = u64::from_be_bytes(footer);
    if index_at < 5 || index_at > len - 8 {
        return Err(Ok(format!("index offset {index_at} outside the file")));
    }
    file.seek(SeekFrom::Start(index_at)).map_err(Err)?;
    let mut index = vec![0u8; (len - 8 - index_at) as usize];
    file.read_exact(&mut index).map_err(Err)?;
    let truncated = || Ok("the index is truncated".to_string());
    let mut entries = Vec::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> std::result::Result<&[u8], Failure> {
        let piece = index.get(*at..*at + n).ok_or_else(truncated)?;
        *at += n;
        Ok(piece)
    };
    while at < index.len() {
        let key_len = u16::from_be_bytes(take(&mut at, 2)?.try_into().expect("2 bytes")) as usize;
        let key = take(&mut at, key_len)?.to_vec();
        let _block_type = take(&mut at, 1)?;
        let count = u16::from_be_bytes(take(&mut at, 2)?.try_into().expect("2 bytes"));
        let mut blocks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let e = take(&mut at, 28)?;
            let min = i64::from_be_bytes(e[0..8].try_into().expect("8 bytes"));
            let max = i64::from_be_bytes(e[8..16].try_into().expect("8 bytes"));
            let offset = u64::from_be_bytes(e[16..24].try_into().expect("8 bytes"));
            let size = u32::from_be_bytes(e[24..28].try_into().expect("4 bytes"));
            if offset < 5 || !(6..=MAX_BLOCK).contains(&size) || offset + u64::from(size) > index_at || min > max {
                return Err(Ok(format!(
                    "block of {} at {offset} (+{size}) outside the data",
                    String::from_utf8_lossy(&key)
                )));
            }
            blocks.push((min, max, offset, size));
        }
        entries.push((key, blocks));
    }
    Ok(entries)
}

/// Reads a block, checks its CRC, and counts its timestamps (with `decode`, returns them too).
fn read_timestamps(file: &mut File, block: &Block, decode: bool) -> std::result::Result<(u64, Vec<i64>), Failure> {
    let mut data = vec![0u8; block.size as usize];
    file.seek(SeekFrom::Start(block.offset)).map_err(Err)?;
    file.read_exact(&mut data).map_err(Err)?;
    let crc = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
    let mut sum = flate2::Crc::new();
    sum.update(&data[4..]);
    if sum.sum() != crc {
        return Err(Ok(format!("a block at offset {} fails its CRC", block.offset)));
    }
    let bad = |why: &str| Ok(format!("block at offset {}: {why}", block.offset));
    let body = &data[5..]; // after the CRC and the block type
    let (ts_len, used) = uvarint(body).ok_or_else(|| bad("no timestamps"))?;
    let ts = body
        .get(used..used.saturating_add(ts_len as usize))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("timestamps outside the block"))?;
    let times = timestamps(ts, decode).ok_or_else(|| bad("timestamps do not decode"))?;
    if decode && times.1.first() != Some(&block.min) {
        return Err(bad("its first timestamp is not the index's"));
    }
    Ok(times)
}

/// Counts (and with `decode`, decodes) a block's timestamps: raw, RLE or simple8b-packed
/// deltas, scaled by the header's power of ten.
fn timestamps(ts: &[u8], decode: bool) -> Option<(u64, Vec<i64>)> {
    let header = ts[0];
    let scale = 10u64.checked_pow(u32::from(header & 0x0f))?;
    let first = || Some(u64::from_be_bytes(ts.get(1..9)?.try_into().ok()?));
    let mut out = Vec::new();
    let count = match header >> 4 {
        // Uncompressed: the first timestamp, then deltas, 8 bytes each.
        0 => {
            let words = &ts[1..];
            if !words.len().is_multiple_of(8) || words.is_empty() {
                return None;
            }
            if decode {
                let mut t = 0u64;
                for (i, w) in words.chunks(8).enumerate() {
                    let v = u64::from_be_bytes(w.try_into().ok()?);
                    t = if i == 0 { v } else { t.wrapping_add(v) };
                    out.push(t as i64);
                }
            }
            (words.len() / 8) as u64
        }
        // Simple8b: the first timestamp, then 64-bit words of deltas.
        1 => {
            let mut t = first()?;
            let words = &ts[9..];
            if !words.len().is_multiple_of(8) {
                return None;
            }
            if decode {
                out.push(t as i64);
            }
            let mut n = 1u64;
            for w in words.chunks(8) {
                if n > MAX_POINTS {
                    return None;
                }
                let word = u64::from_be_bytes(w.try_into().ok()?);
                n += simple8b(word, |delta| {
                    if decode {
                        t = t.wrapping_add(delta.wrapping_mul(scale));
                        out.push(t as i64);
                    }
                });
            }
            n
        }
        // RLE: the first timestamp, the delta, and how many timestamps in all.
        2 => {
            let start = first()?;
            let (delta, used) = uvarint(&ts[9..])?;
            let (n, _) = uvarint(&ts[9 + used..])?;
            if n == 0 || n > MAX_POINTS {
                return None;
            }
            if decode {
                out.extend((0..n).map(|i| start.wrapping_add(i.wrapping_mul(delta.wrapping_mul(scale))) as i64));
            }
            n
        }
        _ => return None,
    };
    Some((count, out))
}

/// Simple8b: a word's selector (its top 4 bits) says how many values of how many bits it
/// packs, lowest bits first; selectors 0 and 1 are runs of 1s. Returns the values' count.
fn simple8b(word: u64, mut each: impl FnMut(u64)) -> u64 {
    const LAYOUT: [(u64, u32); 16] = [
        (240, 0),
        (120, 0),
        (60, 1),
        (30, 2),
        (20, 3),
        (15, 4),
        (12, 5),
        (10, 6),
        (8, 7),
        (7, 8),
        (6, 10),
        (5, 12),
        (4, 15),
        (3, 20),
        (2, 30),
        (1, 60),
    ];
    let (n, bits) = LAYOUT[(word >> 60) as usize];
    for i in 0..n {
        each(if bits == 0 {
            1
        } else {
            (word >> (i * u64::from(bits))) & ((1u64 << bits) - 1)
        });
    }
    n
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// A tombstone file (format v3 or v4, what InfluxDB 1.5+ writes): a 4-byte header, then
/// gzip'd entries (key length, key, min time, max time); v4 appends one gzip member per batch.
fn read_tombstones(input: &mut dyn Read) -> std::result::Result<Vec<Tombstone>, Failure> {
    let mut header = [0u8; 4];
    match input.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Vec::new()),
        Err(e) => return Err(Err(e)),
    }
    let version = u32::from_be_bytes(header);
    if version != TOMBSTONE_V3 && version != TOMBSTONE_V4 {
        return Err(Ok(format!(
            "a tombstone file of format {version:#x}, which bk cannot read (InfluxDB before 1.5?)"
        )));
    }
    // Read entry by entry: what is kept is the entries, never the whole decompressed file.
    let mut body = io::BufReader::new(flate2::read::MultiGzDecoder::new(input));
    let bad = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => Ok("tombstones truncated".to_string()),
        _ => Ok(format!("tombstones do not decode: {e}")),
    };
    let mut out = Vec::new();
    while !io::BufRead::fill_buf(&mut body).map_err(bad)?.is_empty() {
        let mut len = [0u8; 4];
        body.read_exact(&mut len).map_err(bad)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_KEY {
            return Err(Ok(format!("a tombstone of a key of {len} bytes")));
        }
        let mut key = vec![0u8; len];
        body.read_exact(&mut key).map_err(bad)?;
        let mut times = [0u8; 16];
        body.read_exact(&mut times).map_err(bad)?;
        out.push(Tombstone {
            key,
            min: i64::from_be_bytes(times[..8].try_into().expect("8")),
            max: i64::from_be_bytes(times[8..].try_into().expect("8")),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_of_keys() {
        assert_eq!(measurement(b"cpu,host=a#!~#usage"), "cpu");
        assert_eq!(measurement(b"cpu#!~#usage"), "cpu");
        assert_eq!(measurement(b"my\\ cpu\\,x,host=a#!~#f"), "my cpu,x");
    }

    #[test]
    fn timestamps_decode_in_every_encoding() {
        // RLE: 1000, +10 ns (scale 10^1 => delta 1), 4 timestamps.
        let mut rle = vec![0x21];
        rle.extend(1000u64.to_be_bytes());
        rle.extend([1, 4]);
        assert_eq!(timestamps(&rle, true), Some((4, vec![1000, 1010, 1020, 1030])));
        // Raw: first, then deltas.
        let mut raw = vec![0x00];
        for v in [5u64, 3, 7] {
            raw.extend(v.to_be_bytes());
        }
        assert_eq!(timestamps(&raw, true), Some((3, vec![5, 8, 15])));
        // Simple8b: selector 15 (one 60-bit value) of delta 2, scale 1.
        let mut packed = vec![0x10];
        packed.extend(100u64.to_be_bytes());
        packed.extend(((15u64 << 60) | 2).to_be_bytes());
        assert_eq!(timestamps(&packed, true), Some((2, vec![100, 102])));
        assert_eq!(timestamps(&packed, false), Some((2, vec![])));
        // Selector 0: 240 deltas of 1.
        let mut ones = vec![0x10];
        ones.extend(0u64.to_be_bytes());
        ones.extend(0u64.to_be_bytes());
        assert_eq!(timestamps(&ones, false).unwrap().0, 241);
        // A hostile count is refused before anything is allocated for it.
        let mut huge = vec![0x20];
        huge.extend(0u64.to_be_bytes());
        huge.extend([1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(timestamps(&huge, true), None);
        assert_eq!(timestamps(&huge, false), None);
        // A block cut anywhere does not decode.
        for cut in 1..rle.len() {
            assert_eq!(timestamps(&rle[..cut], true), None, "cut at {cut}");
        }
    }

    /// A TSM file of float blocks (values left out: only timestamps are read), each block's
    /// timestamps raw-encoded; keys must come sorted, as in the index.
    fn tsm_file(dir: &Path, name: &str, blocks: &[(&[u8], Vec<i64>)]) -> TsmFile {
        let mut bytes = TSM_MAGIC.to_be_bytes().to_vec();
        bytes.push(TSM_VERSION);
        let mut index = Vec::new();
        for (key, times) in blocks {
            let mut ts = vec![0u8];
            for (i, t) in times.iter().enumerate() {
                let v = if i == 0 { *t } else { t - times[i - 1] };
                ts.extend((v as u64).to_be_bytes());
            }
            let mut data = vec![0u8, ts.len() as u8];
            data.extend(ts);
            let mut crc = flate2::Crc::new();
            crc.update(&data);
            let offset = bytes.len() as u64;
            bytes.extend(crc.sum().to_be_bytes());
            bytes.extend(&data);
            index.extend((key.len() as u16).to_be_bytes());
            index.extend(*key);
            index.push(0);
            index.extend(1u16.to_be_bytes());
            index.extend(times[0].to_be_bytes());
            index.extend(times[times.len() - 1].to_be_bytes());
            index.extend(offset.to_be_bytes());
            index.extend((data.len() as u32 + 4).to_be_bytes());
        }
        let index_at = bytes.len() as u64;
        bytes.extend(index);
        bytes.extend(index_at.to_be_bytes());
        let path = dir.join(format!("{name}.tsm"));
        fs::write(&path, bytes).unwrap();
        TsmFile {
            stem: name.into(),
            database: "db".into(),
            path,
        }
    }

    #[test]
    fn overlapping_blocks_count_once_and_tombstones_are_counted_apart() {
        let dir = tempfile::tempdir().unwrap();
        let a = tsm_file(
            dir.path(),
            "1",
            &[(b"cpu,h=a#!~#u", (0..10).collect()), (b"mem#!~#f", vec![1, 2])],
        );
        let b = tsm_file(dir.path(), "2", &[(b"cpu,h=a#!~#u", (5..15).collect())]);
        let none = HashMap::new();
        let counted = count_files(&[a, b], &none).unwrap();
        assert_eq!(
            counted.values,
            BTreeMap::from([("db.cpu".into(), 15), ("db.mem".into(), 2)])
        );
        assert_eq!(counted.deleted, 0);
        // A delete of 0..=6 in file 1: 0..=4 only there, 5 and 6 also in file 2 (written again).
        let a = tsm_file(dir.path(), "3", &[(b"cpu,h=a#!~#u", (0..10).collect())]);
        let b = tsm_file(dir.path(), "4", &[(b"cpu,h=a#!~#u", (5..15).collect())]);
        let tombstones = HashMap::from([(
            "3".to_string(),
            vec![Tombstone {
                key: b"cpu,h=a".to_vec(),
                min: 0,
                max: 6,
            }],
        )]);
        let counted = count_files(&[a, b], &tombstones).unwrap();
        assert_eq!(counted.values, BTreeMap::from([("db.cpu".into(), 15)]));
        assert_eq!(counted.deleted, 5);
    }

    #[test]
    fn a_damaged_block_fails_its_crc() {
        let dir = tempfile::tempdir().unwrap();
        let f = tsm_file(dir.path(), "1", &[(b"m#!~#v", vec![1, 2, 3])]);
        let mut bytes = fs::read(&f.path).unwrap();
        bytes[12] ^= 1;
        fs::write(&f.path, bytes).unwrap();
        match count_files(&[f], &HashMap::new()) {
            Err(Ok(why)) => assert!(why.contains("CRC"), "{why}"),
            other => panic!("{:?}", other.map(|c| c.values)),
        }
    }

    #[test]
    fn tombstones_name_a_key_or_its_series() {
        assert!(applies(b"cpu,host=a#!~#usage", b"cpu,host=a#!~#usage"));
        assert!(applies(b"cpu,host=a", b"cpu,host=a#!~#usage"));
        assert!(!applies(b"cpu,host=a", b"cpu,host=ab#!~#usage"));
    }
}
