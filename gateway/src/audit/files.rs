//! The JSONL copies of the store: `audit-YYYYMMDD.jsonl` in the audit directory, one record per
//! line, opened with `O_APPEND`, synced per batch, never renamed or truncated; and the `stdout`
//! sink for containers (one line per record, which lands in ContainerLogV2).
//!
//! Files are written after the store has flushed a batch, so the store is the copy of record:
//! at start the writer reads the last complete line of the newest file and appends whatever the
//! store holds beyond it. A line torn by a crash mid-write (power loss, disk full) is ended with
//! a newline and left in place; the verifier reports it and checks the chain across it.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use super::record::parse_day;

/// Prefix and suffix of the daily files.
pub const FILE_PREFIX: &str = "audit-";
pub const FILE_SUFFIX: &str = ".jsonl";
/// The last checkpoint record, replaced atomically at every checkpoint: the verifier's anchor
/// against a truncated tail.
pub const CHECKPOINT_HEAD_FILE: &str = "audit-checkpoint.json";
/// Mode of audit files: the gateway writes, its group (the log collector) reads.
const AUDIT_FILE_MODE: u32 = 0o640;
/// Mode of the audit directory when we create it.
const AUDIT_DIRECTORY_MODE: u32 = 0o750;
/// How much of a file's end is read to find its last complete line (a record is at most
/// 32 KiB).
const TAIL_BYTES_MAX: u64 = 64 * 1024;
/// The newest files whose last records are compared at open.
const LAST_RECORD_FILES_MAX: usize = 8;

/// The daily files of one audit directory.
#[derive(Debug)]
pub struct JsonlFiles {
    directory: PathBuf,
    /// `YYYYMMDD` of the open file, and the file.
    open: Option<(String, File)>,
    /// `Seq` of the last record in the files (0: none).
    written_up_to: u64,
    /// The last record found at open.
    last_line: Option<Vec<u8>>,
    /// `YYYYMMDD` of the newest file found at open.
    newest_day: Option<String>,
}

impl JsonlFiles {
    /// Opens `directory` (created if missing) and finds the last record written to it.
    pub fn open(directory: &Path) -> io::Result<JsonlFiles> {
        DirBuilder::new()
            .recursive(true)
            .mode(AUDIT_DIRECTORY_MODE)
            .create(directory)?;
        let files = list(directory)?;
        let newest_day = files.last().and_then(|(_, path)| {
            path.file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_prefix(FILE_PREFIX))
                .and_then(|rest| rest.strip_suffix(FILE_SUFFIX))
                .map(str::to_owned)
        });
        // The record with the highest `Seq` among the newest files, not merely the newest
        // file's last: after a clock that ran ahead was set right, the file dated ahead is
        // newest by name while later records went to today's file. Further back only while
        // nothing is found (files whose every line is torn).
        let mut last: Option<(u64, Vec<u8>)> = None;
        for (examined, (_, path)) in files.iter().rev().enumerate() {
            if examined >= LAST_RECORD_FILES_MAX && last.is_some() {
                break;
            }
            let mut file = OpenOptions::new().read(true).append(true).open(path)?;
            let mut tail = read_tail(&mut file)?;
            if !tail.is_empty() && !tail.ends_with(b"\n") {
                // A torn line: end it so the next record starts a line of its own. A record
                // torn just before its line feed is whole, and counts as written.
                file.write_all(b"\n")?;
                file.sync_data()?;
                tail.push(b'\n');
            }
            if let Some(found) = last_record(&tail)
                && last.as_ref().is_none_or(|(seq, _)| found.0 > *seq)
            {
                last = Some(found);
            }
        }
        Ok(JsonlFiles {
            directory: directory.to_owned(),
            open: None,
            written_up_to: last.as_ref().map_or(0, |(seq, _)| *seq),
            last_line: last.map(|(_, line)| line),
            newest_day,
        })
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The last record the files held when opened (its JSON line).
    pub fn last_line(&self) -> Option<&[u8]> {
        self.last_line.as_deref()
    }

    /// `Seq` of the last record in the files (0: none).
    pub fn written_up_to(&self) -> u64 {
        self.written_up_to
    }

    /// `YYYYMMDD` of the newest file there was at open: records never go to an older day's
    /// file, even when the clock was set back, or the files would no longer be in `Seq` order.
    pub fn newest_day(&self) -> Option<&str> {
        self.newest_day.as_deref()
    }

    /// Appends `lines` (records in `Seq` order, without newlines) to the file of `day` in one
    /// write and syncs it. Records at or below [`JsonlFiles::written_up_to`] are skipped.
    pub fn append<'a>(
        &mut self,
        day: &str,
        lines: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> io::Result<()> {
        let mut buffer = Vec::with_capacity(64 * 1024);
        let mut last = self.written_up_to;
        for (seq, line) in lines {
            if seq <= last {
                continue;
            }
            buffer.extend_from_slice(line);
            buffer.push(b'\n');
            last = seq;
        }
        if buffer.is_empty() {
            return Ok(());
        }
        let file = self.file_for(day)?;
        file.write_all(&buffer)?;
        file.sync_data()?;
        self.written_up_to = last;
        Ok(())
    }

    fn file_for(&mut self, day: &str) -> io::Result<&mut File> {
        let reopen = self
            .open
            .as_ref()
            .is_none_or(|(open_day, _)| open_day != day);
        if reopen {
            let path = self
                .directory
                .join(format!("{FILE_PREFIX}{day}{FILE_SUFFIX}"));
            let created = !path.exists();
            let file = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(AUDIT_FILE_MODE)
                .open(&path)?;
            if created {
                File::open(&self.directory)?.sync_all()?;
            }
            self.open = Some((day.to_owned(), file));
        }
        match &mut self.open {
            Some((_, file)) => Ok(file),
            None => Err(io::Error::other("no audit file open")),
        }
    }

    /// Replaces the checkpoint head file with `line` (the newest checkpoint record).
    pub fn write_checkpoint_head(&self, line: &[u8]) -> io::Result<()> {
        let mut contents = line.to_vec();
        contents.push(b'\n');
        super::key::write_atomically(
            &self.directory.join(CHECKPOINT_HEAD_FILE),
            &contents,
            AUDIT_FILE_MODE,
        )
    }

    /// Deletes the oldest daily files while they are older than `retention_days` or the files
    /// total more than `bytes_max`, but never today's, never one younger than `days_min` days,
    /// and never one holding a record after `exported_up_to`. `today` is the wall clock's day
    /// (for today's file and `days_min`) and the day files age by (for `retention_days`).
    /// Returns the deleted paths.
    pub fn remove_expired(
        &mut self,
        (wall_today, age_today): (u64, u64),
        retention_days: u64,
        days_min: u64,
        bytes_max: u64,
        exported_up_to: u64,
    ) -> io::Result<Vec<PathBuf>> {
        let files = list(&self.directory)?;
        let mut sizes = Vec::with_capacity(files.len());
        for (_, path) in &files {
            sizes.push(fs::metadata(path)?.len());
        }
        let mut total: u64 = sizes.iter().sum();
        let mut removed = Vec::new();
        for ((day, path), size) in files.iter().zip(sizes) {
            if *day >= wall_today || wall_today.saturating_sub(*day) < days_min.max(1) {
                break;
            }
            if age_today.saturating_sub(*day) <= retention_days && total <= bytes_max {
                break;
            }
            let mut file = File::open(path)?;
            let exported =
                last_record(&read_tail(&mut file)?).is_none_or(|(seq, _)| seq <= exported_up_to);
            if !exported {
                break;
            }
            fs::remove_file(path)?;
            total = total.saturating_sub(size);
            removed.push(path.clone());
        }
        if !removed.is_empty() {
            File::open(&self.directory)?.sync_all()?;
        }
        Ok(removed)
    }
}

/// The `audit-YYYYMMDD.jsonl` files of `directory` as (days since 1970, path), oldest first.
pub fn list(directory: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(directory)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(day) = name
            .strip_prefix(FILE_PREFIX)
            .and_then(|rest| rest.strip_suffix(FILE_SUFFIX))
        else {
            continue;
        };
        if day.len() != 8 {
            continue;
        }
        if let Some(days) = parse_day(day) {
            files.push((days, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

fn read_tail(file: &mut File) -> io::Result<Vec<u8>> {
    let length = file.metadata()?.len();
    let start = length.saturating_sub(TAIL_BYTES_MAX);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    Ok(tail)
}

/// `Seq` and line of the last complete line of `tail` that is a record.
fn last_record(tail: &[u8]) -> Option<(u64, Vec<u8>)> {
    let complete = match tail.iter().rposition(|&byte| byte == b'\n') {
        Some(end) => &tail[..end],
        None => return None,
    };
    complete
        .split(|&byte| byte == b'\n')
        .rev()
        .find_map(|line| {
            let value: serde_json::Value = serde_json::from_slice(line).ok()?;
            let seq = value.get(super::record::SEQ)?.as_u64()?;
            Some((seq, line.to_vec()))
        })
}

/// One line per record on standard output (where the container runtime takes it to
/// ContainerLogV2: the writer passes lines without content text that must stay local).
#[derive(Debug, Default)]
pub struct StdoutSink;

impl StdoutSink {
    pub fn write<L: AsRef<[u8]>>(&self, lines: impl IntoIterator<Item = L>) -> io::Result<()> {
        let mut buffer = Vec::with_capacity(64 * 1024);
        for line in lines {
            buffer.extend_from_slice(line.as_ref());
            buffer.push(b'\n');
        }
        let mut stdout = io::stdout().lock();
        stdout.write_all(&buffer)?;
        stdout.flush()
    }
}
