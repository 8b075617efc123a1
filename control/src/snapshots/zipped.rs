//! Zips to snapshots and back (issue 15, "My projects" files). Blocking
//! code: callers run it on blocking threads.
//!
//! An uploaded zip is untrusted: every entry must be a plain relative file
//! or directory (the snapshot format's own rule), and its sizes are checked
//! as declared and again as really decompressed, since declared sizes lie.
//! Nothing is written anywhere but the caller's `out` until the whole zip
//! passed.

use std::collections::HashSet;
use std::io::{self, Read, Seek, Write};

use opencloud_protocol::snapshots::{HashingWriter, ZSTD_LEVEL};
use sha2::{Digest, Sha256};

use crate::error::AppError;

/// At most this many entries in an uploaded zip.
pub const MAX_ENTRIES: usize = 100_000;
/// An entry larger than [`RATIO_FROM`] may expand at most this much.
pub const MAX_RATIO: u64 = 200;
pub const RATIO_FROM: u64 = 1 << 20;

/// A snapshot written from a zip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// Lower-case hex SHA-256 of the compressed bytes.
    pub sha256: String,
    pub size: u64,
    pub files: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

fn refuse(message: String) -> AppError {
    AppError::invalid("zip", message)
}

/// The entry's name as a safe relative path (components joined by `/`,
/// `.` dropped), or why not.
pub fn safe_name(raw: &[u8]) -> Result<String, String> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    let Ok(name) = std::str::from_utf8(raw) else {
        return Err(format!(
            "The entry \"{shown}\" has a name that is not UTF-8."
        ));
    };
    if name.contains('\\') || name.contains('\0') {
        return Err(format!(
            "The entry \"{shown}\" has a backslash or NUL in its name; zips use / between folders."
        ));
    }
    if name.starts_with('/') {
        return Err(format!(
            "The entry \"{shown}\" has an absolute path; only paths inside the project are allowed."
        ));
    }
    let bytes = name.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(format!(
            "The entry \"{shown}\" starts with a drive letter; only paths inside the project are allowed."
        ));
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "The entry \"{shown}\" has \"..\" in its path; only paths inside the project are allowed."
                ))
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(format!("The entry \"{shown}\" has an empty name."));
    }
    Ok(parts.join("/"))
}

/// Exactly `declared` bytes of an entry, refusing one that really holds
/// more (or less) than its header says.
struct Counted<'a, R> {
    inner: R,
    name: &'a str,
    remaining: u64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            // One more byte would mean the declared size lied.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(format!(
                    "The entry \"{}\" holds more than the size its header declares (a zip bomb?).",
                    self.name
                ))),
            };
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::other(format!(
                "The entry \"{}\" holds less than the size its header declares.",
                self.name
            )));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// The entry count the zip's end record declares (zip64's when it has
/// one), read before the zip crate loads every central entry into memory.
fn declared_entries(input: &mut (impl Read + Seek)) -> io::Result<Option<u64>> {
    let len = input.seek(io::SeekFrom::End(0))?;
    // The end record (22 bytes) follows at most a 64 KiB comment.
    let tail_len = len.min(22 + 65_535 + 20);
    input.seek(io::SeekFrom::Start(len - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    input.read_exact(&mut tail)?;
    input.rewind()?;
    let Some(end) = tail.windows(4).rposition(|w| w == b"PK\x05\x06") else {
        return Ok(None);
    };
    let Some(count) = tail.get(end + 10..end + 12) else {
        return Ok(None);
    };
    let count = u16::from_le_bytes([count[0], count[1]]);
    if count != u16::MAX {
        return Ok(Some(u64::from(count)));
    }
    // Zip64: the locator right before the end record names the record.
    let Some(locator) = end.checked_sub(20).and_then(|at| tail.get(at..at + 20)) else {
        return Ok(None);
    };
    if &locator[..4] != b"PK\x06\x07" {
        return Ok(None);
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&locator[8..16]);
    input.seek(io::SeekFrom::Start(u64::from_le_bytes(offset)))?;
    let mut record = [0u8; 40];
    let found = input.read_exact(&mut record);
    input.rewind()?;
    if found.is_err() || &record[..4] != b"PK\x06\x06" {
        return Ok(None);
    }
    let mut count = [0u8; 8];
    count.copy_from_slice(&record[32..40]);
    Ok(Some(u64::from_le_bytes(count)))
}

/// Converts the zip `input` to a snapshot (tar + zstd) written to `out`,
/// refusing (422, or 413 over `quota_bytes` of content) any hostile or
/// broken zip. `mtime` stamps every entry.
pub fn zip_to_snapshot(
    mut input: impl Read + Seek,
    out: impl Write,
    quota_bytes: u64,
    mtime: u64,
) -> Result<Converted, AppError> {
    let too_many = |n: u64| {
        refuse(format!(
            "The zip has {n} entries, more than the {MAX_ENTRIES} allowed."
        ))
    };
    match declared_entries(&mut input) {
        Ok(Some(n)) if n > MAX_ENTRIES as u64 => return Err(too_many(n)),
        Ok(_) => {}
        Err(e) => {
            return Err(refuse(format!(
                "The zip cannot be read ({e}); nothing was stored."
            )))
        }
    }
    let mut archive = zip::ZipArchive::new(input).map_err(|e| {
        refuse(format!(
            "This is not a zip file that can be read ({e}); nothing was stored."
        ))
    })?;
    if archive.len() > MAX_ENTRIES {
        return Err(too_many(archive.len() as u64));
    }
    // First the headers only: names, kinds and declared sizes.
    let mut names = Vec::with_capacity(archive.len());
    let mut seen = HashSet::new();
    let mut declared = 0u64;
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
            .map_err(|e| refuse(format!("The zip is damaged ({e}); nothing was stored.")))?;
        let name = safe_name(entry.name_raw()).map_err(refuse)?;
        if entry.is_symlink() {
            return Err(refuse(format!(
                "The entry \"{name}\" is a symbolic link; only files and folders are allowed."
            )));
        }
        let is_dir = entry.is_dir();
        if let Some(mode) = entry.unix_mode() {
            let kind = mode & 0o170000;
            if kind != 0 && kind != 0o100000 && kind != 0o040000 {
                return Err(refuse(format!(
                    "The entry \"{name}\" is neither a file nor a folder."
                )));
            }
        }
        let size = entry.size();
        if size > RATIO_FROM && size / entry.compressed_size().max(1) > MAX_RATIO {
            return Err(refuse(format!(
                "The entry \"{name}\" expands more than {MAX_RATIO} times (a zip bomb?); nothing was stored."
            )));
        }
        declared = declared.saturating_add(size);
        if !seen.insert(name.clone()) {
            return Err(refuse(format!("The entry \"{name}\" is in the zip twice.")));
        }
        names.push((name, is_dir, size));
    }
    let over_quota = |bytes: u64| {
        AppError::QuotaExceeded(format!(
            "The zip's files come to {} MiB, more than the {} MiB of storage the project's owner has; nothing was stored.",
            bytes.div_ceil(1 << 20),
            quota_bytes / (1 << 20)
        ))
    };
    if declared > quota_bytes {
        return Err(over_quota(declared));
    }
    let io_refusal = |e: io::Error| refuse(format!("{e} Nothing was stored."));
    let hashing = HashingWriter::new(out);
    let encoder = zstd::Encoder::new(hashing, ZSTD_LEVEL).map_err(io_refusal)?;
    let mut builder = tar::Builder::new(encoder);
    let (mut files, mut bytes) = (0u64, 0u64);
    for (i, (name, is_dir, size)) in names.iter().enumerate() {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        if *is_dir {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, name, io::empty())
                .map_err(io_refusal)?;
            continue;
        }
        let entry = archive
            .by_index(i)
            .map_err(|e| refuse(format!("The entry \"{name}\" cannot be read ({e}).")))?;
        // Sizes are counted as really decompressed, and stop at the quota.
        bytes += size;
        if bytes > quota_bytes {
            return Err(over_quota(bytes));
        }
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(*size);
        let data = Counted {
            inner: entry,
            name,
            remaining: *size,
        };
        builder
            .append_data(&mut header, name, data)
            .map_err(io_refusal)?;
        files += 1;
    }
    let encoder = builder.into_inner().map_err(io_refusal)?;
    let mut hashing = encoder.finish().map_err(io_refusal)?;
    hashing.flush().map_err(io_refusal)?;
    let (sha256, size) = hashing.finish();
    Ok(Converted {
        sha256,
        size,
        files,
        bytes,
    })
}

/// Hashes what is read through it; at its end, fails unless it matched.
pub struct Checked<R> {
    pub inner: R,
    pub hash: Sha256,
    pub expected: String,
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let actual = hex::encode(self.hash.clone().finalize());
            if actual != self.expected {
                return Err(io::Error::other(
                    "the stored snapshot does not match its SHA-256",
                ));
            }
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Writes the snapshot `input` (tar + zstd) to `out` as a zip, entry by
/// entry: memory stays flat whatever the project's size. Only plain
/// relative files and directories are carried over. The zip is finished
/// only once all of `input` was read, so a failed [`Checked`] leaves it
/// broken rather than quietly wrong.
pub fn snapshot_to_zip(input: impl Read, out: impl Write) -> io::Result<()> {
    use zip::write::SimpleFileOptions;
    let decoder = zstd::Decoder::new(input)?;
    let mut archive = tar::Archive::new(decoder);
    let mut zip = zip::ZipWriter::new_stream(out);
    let options = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o644);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path_bytes().into_owned();
        let Ok(name) = safe_name(&raw) else { continue };
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                zip.add_directory(&name, options.unix_permissions(0o755))
                    .map_err(io::Error::other)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size()?;
                zip.start_file(&name, options.large_file(size >= u64::from(u32::MAX)))
                    .map_err(io::Error::other)?;
                io::copy(&mut entry, &mut zip)?;
            }
            _ => {}
        }
    }
    // The rest (tar padding, the zstd frame's end) passes the check too.
    let mut rest = archive.into_inner().finish();
    io::copy(&mut rest, &mut io::sink())?;
    zip.finish().map_err(io::Error::other)?.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use zip::write::SimpleFileOptions;

    const QUOTA: u64 = 100 << 20;

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in entries {
            if name.ends_with('/') {
                zip.add_directory(*name, SimpleFileOptions::default())
                    .unwrap();
            } else {
                let stored =
                    SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
                zip.start_file(*name, stored).unwrap();
                zip.write_all(data).unwrap();
            }
        }
        zip.finish().unwrap().into_inner()
    }

    fn convert(zip: &[u8], quota: u64) -> Result<(Converted, Vec<u8>), AppError> {
        let mut out = Vec::new();
        let done = zip_to_snapshot(Cursor::new(zip), &mut out, quota, 1_700_000_000)?;
        Ok((done, out))
    }

    fn refused(zip: &[u8]) -> String {
        match convert(zip, QUOTA) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn paths_outside_the_project_are_refused() {
        for (name, words) in [
            ("../x", "\"..\""),
            ("a/../../x", "\"..\""),
            ("/etc/x", "absolute"),
            ("C:/x", "drive letter"),
            ("a\\..\\x", "backslash"),
        ] {
            let message = refused(&zip_of(&[(name, b"x")]));
            assert!(message.contains(words), "{name}: {message}");
        }
        assert_eq!(safe_name(b"./a//b/").unwrap(), "a/b");
    }

    #[test]
    fn symlinks_are_refused() {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        zip.add_symlink("link", "/etc/passwd", SimpleFileOptions::default())
            .unwrap();
        let message = refused(&zip.finish().unwrap().into_inner());
        assert!(message.contains("symbolic link"), "{message}");
    }

    #[test]
    fn not_a_zip_and_too_many_entries_are_refused() {
        assert!(refused(b"hello, not a zip").contains("not a zip"));
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for i in 0..=MAX_ENTRIES {
            zip.add_directory(format!("d{i}/"), SimpleFileOptions::default())
                .unwrap();
        }
        let bytes = zip.finish().unwrap().into_inner();
        let message = refused(&bytes);
        assert!(message.contains("100001 entries"), "{message}");
        assert_eq!(
            declared_entries(&mut Cursor::new(&bytes)).unwrap(),
            Some(MAX_ENTRIES as u64 + 1)
        );
        // A short zip's count, and a body too short to be a zip.
        let small = zip_of(&[("a", b"a"), ("b/", b"")]);
        assert_eq!(declared_entries(&mut Cursor::new(&small)).unwrap(), Some(2));
        assert_eq!(declared_entries(&mut Cursor::new(b"PK")).unwrap(), None);
    }

    /// A stored entry whose header says 1 KiB while it holds 2 MiB.
    fn lying_zip() -> Vec<u8> {
        let real = vec![b'a'; 2 << 20];
        let mut bytes = zip_of(&[("bomb.txt", &real)]);
        // Patch the declared size (local header at 0 and the central
        // directory's copy) down to 1 KiB; the compressed size stays.
        let find =
            |bytes: &[u8], sig: &[u8]| bytes.windows(4).position(|w| w == sig).expect("signature");
        let local = find(&bytes, b"PK\x03\x04");
        bytes[local + 22..local + 26].copy_from_slice(&1024u32.to_le_bytes());
        let central = find(&bytes, b"PK\x01\x02");
        bytes[central + 24..central + 28].copy_from_slice(&1024u32.to_le_bytes());
        bytes
    }

    #[test]
    fn bombs_are_refused_by_declared_and_by_real_sizes() {
        // Deflated zeros: far over 200:1.
        let zeros = vec![0u8; 8 << 20];
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        zip.start_file(
            "zeros",
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated),
        )
        .unwrap();
        zip.write_all(&zeros).unwrap();
        let message = refused(&zip.finish().unwrap().into_inner());
        assert!(message.contains("expands more than"), "{message}");
        let message = refused(&lying_zip());
        assert!(
            message.contains("more than the size its header declares"),
            "{message}"
        );
        // Over the quota as declared.
        let data = vec![7u8; 3 << 20];
        let err = convert(&zip_of(&[("big", &data)]), 2 << 20).unwrap_err();
        assert!(matches!(err, AppError::QuotaExceeded(_)), "{err}");
    }

    #[test]
    fn a_good_zip_goes_to_a_snapshot_and_back() {
        let zip = zip_of(&[
            ("dir/", b""),
            ("dir/a.txt", b"alpha"),
            ("./b.ipynb", b"{\"cells\": []}"),
        ]);
        let (done, snapshot) = convert(&zip, QUOTA).unwrap();
        assert_eq!((done.files, done.bytes), (2, 18));
        assert_eq!(done.sha256, hex::encode(Sha256::digest(&snapshot)));
        let mut back = Vec::new();
        let checked = Checked {
            inner: Cursor::new(&snapshot),
            hash: Sha256::new(),
            expected: done.sha256.clone(),
        };
        snapshot_to_zip(checked, &mut back).unwrap();
        let mut archive = zip::ZipArchive::new(Cursor::new(back)).unwrap();
        let mut found = Vec::new();
        for i in 0..archive.len() {
            let mut entry = archive.by_index(i).unwrap();
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            found.push((entry.name().to_owned(), text));
        }
        assert_eq!(
            found,
            vec![
                ("dir/".to_owned(), String::new()),
                ("dir/a.txt".to_owned(), "alpha".to_owned()),
                ("b.ipynb".to_owned(), "{\"cells\": []}".to_owned()),
            ]
        );
        // A damaged snapshot never becomes a finished zip.
        let checked = Checked {
            inner: Cursor::new(&snapshot),
            hash: Sha256::new(),
            expected: "0".repeat(64),
        };
        assert!(snapshot_to_zip(checked, &mut Vec::new()).is_err());
    }
}
