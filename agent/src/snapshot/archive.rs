//! The snapshot format: the project directory's regular files and
//! directories as a tar (relative paths), zstd-compressed, with the SHA-256
//! of the compressed bytes. Blocking code: callers run it on blocking
//! threads.
//!
//! The agent runs as root while the project's user can change the tree
//! under it, so the tree is walked through directory descriptors
//! (`openat` with `O_NOFOLLOW`): a file or directory swapped for a symlink
//! mid-walk is skipped, never followed out of the project. Extraction goes
//! into a fresh directory only the agent can enter, and refuses every entry
//! that is not a plain relative file or directory.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use opencloud_protocol::snapshots::{HashingWriter, ZSTD_LEVEL};
use sha2::{Digest, Sha256};

/// Deeper directories are left out (each level holds a descriptor open).
const MAX_DEPTH: usize = 128;

/// What the walk of a project tree met.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub files: u64,
    pub dirs: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Symlinks, sockets, fifos, devices, unreadable or too deep entries.
    pub skipped: u64,
}

/// A tree's cheap fingerprint: SHA-256 over every entry's relative path,
/// kind, mode, size and mtime (never the contents).
pub type Fingerprint = [u8; 32];

/// What [`pack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// Lower-case hex SHA-256 of the compressed bytes.
    pub sha256: String,
    /// Compressed size.
    pub size: u64,
    pub counts: Counts,
}

/// What [`unpack`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    pub files: u64,
    pub dirs: u64,
    /// Entries refused: links, devices, absolute or `..` paths, clashes.
    pub refused: u64,
}

enum Kind {
    Dir,
    File,
}

/// Called with each entry's relative path, kind, stat, the directory it is
/// in and its name there.
type Visit<'a> = dyn FnMut(&Path, Kind, &FileStat, &Dir, &CStr) -> io::Result<()> + 'a;

/// Walks `root` depth-first in name order, calling `visit` with each
/// directory and regular file below it (not `root` itself), the directory
/// it is in and its name there.
fn walk(root: &Path, visit: &mut Visit<'_>) -> io::Result<Counts> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = Dir::open(root, flags, Mode::empty()).map_err(io::Error::from)?;
    let mut counts = Counts::default();
    let mut rel = PathBuf::new();
    walk_dir(dir, &mut rel, 0, &mut counts, visit)?;
    Ok(counts)
}

fn walk_dir(
    mut dir: Dir,
    rel: &mut PathBuf,
    depth: usize,
    counts: &mut Counts,
    visit: &mut Visit<'_>,
) -> io::Result<()> {
    let mut names: Vec<std::ffi::CString> = dir
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    names.sort();
    for name in names {
        // Gone since it was listed, or not ours to read: left out.
        let Ok(stat) = fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            counts.skipped += 1;
            continue;
        };
        rel.push(OsStr::from_bytes(name.as_bytes()));
        match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR if depth < MAX_DEPTH => {
                let flags =
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                match Dir::openat(&dir, name.as_c_str(), flags, Mode::empty()) {
                    Ok(child) => {
                        counts.dirs += 1;
                        visit(rel, Kind::Dir, &stat, &dir, &name)?;
                        walk_dir(child, rel, depth + 1, counts, visit)?;
                    }
                    Err(_) => counts.skipped += 1,
                }
            }
            SFlag::S_IFREG => {
                counts.files += 1;
                counts.bytes += stat.st_size as u64;
                visit(rel, Kind::File, &stat, &dir, &name)?;
            }
            _ => counts.skipped += 1,
        }
        rel.pop();
    }
    Ok(())
}

/// The fingerprint of the tree at `root` (see [`Fingerprint`]).
pub fn fingerprint(root: &Path) -> io::Result<Fingerprint> {
    let mut hash = Sha256::new();
    walk(root, &mut |rel, kind, stat, _, _| {
        hash.update(rel.as_os_str().as_bytes());
        hash.update([0, matches!(kind, Kind::File) as u8]);
        hash.update((stat.st_mode & 0o7777).to_le_bytes());
        if matches!(kind, Kind::File) {
            hash.update((stat.st_size as u64).to_le_bytes());
            hash.update(stat.st_mtime.to_le_bytes());
            hash.update(stat.st_mtime_nsec.to_le_bytes());
        }
        Ok(())
    })?;
    Ok(hash.finalize().into())
}

/// Exactly `remaining` bytes of a file that may change while it is read:
/// a tar entry must be as long as its header says, so a file that shrank
/// is padded with zeros and one that grew is cut (the next autosave sees
/// the change and takes it again).
struct Exactly {
    file: File,
    remaining: u64,
}

impl Read for Exactly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = match self.file.read(&mut buf[..want])? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn mtime(stat: &FileStat) -> u64 {
    stat.st_mtime.max(0) as u64
}

/// Writes the snapshot of the tree at `root` to `out`: streamed, so memory
/// stays flat whatever the project's size.
pub fn pack(root: &Path, out: impl Write) -> io::Result<Packed> {
    let hashing = HashingWriter::new(out);
    let encoder = zstd::Encoder::new(hashing, ZSTD_LEVEL)?;
    let mut builder = tar::Builder::new(encoder);
    let mut unreadable = 0u64;
    // Files of anyone but the directory's owner got in by a hard link (to
    // a file its user may not read): root reads them, so they stay out.
    let owner = std::fs::symlink_metadata(root)?.uid();
    let counts = walk(root, &mut |rel, kind, stat, dir, name| {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(mtime(stat));
        header.set_uid(0);
        header.set_gid(0);
        match kind {
            Kind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(stat.st_mode & 0o777);
                header.set_size(0);
                builder.append_data(&mut header, rel, io::empty())
            }
            Kind::File => {
                // Opened without following: a file swapped for a link
                // since it was listed is not read.
                let flags =
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
                let Ok(fd) = nix::fcntl::openat(dir, name, flags, Mode::empty()) else {
                    unreadable += 1;
                    return Ok(());
                };
                let stat = fstat(&fd).map_err(io::Error::from)?;
                if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG
                    || stat.st_uid != owner
                {
                    unreadable += 1;
                    return Ok(());
                }
                let size = stat.st_size as u64;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(stat.st_mode & 0o777);
                header.set_mtime(mtime(&stat));
                header.set_size(size);
                let data = Exactly {
                    file: File::from(fd),
                    remaining: size,
                };
                builder.append_data(&mut header, rel, data)
            }
        }
    })?;
    let encoder = builder.into_inner()?;
    let mut hashing = encoder.finish()?;
    hashing.flush()?;
    let (sha256, size) = hashing.finish();
    Ok(Packed {
        sha256,
        size,
        counts: Counts {
            skipped: counts.skipped + unreadable,
            files: counts.files - unreadable,
            ..counts
        },
    })
}

/// Who extracted files belong to: the project's user when the agent is root.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The entry's path as a safe relative path, or `None` for anything that
/// could reach outside: absolute, `..`, or empty.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Makes the directories from `dest` down to `rel` (inclusive), refusing
/// anything on the way that is not a real directory.
fn make_dirs(dest: &Path, rel: &Path, owner: Option<Owner>) -> io::Result<()> {
    let mut path = dest.to_path_buf();
    for part in rel.components() {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file is in the way",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        if let Some(owner) = owner {
            std::os::unix::fs::lchown(&path, Some(owner.uid), Some(owner.gid))?;
        }
    }
    Ok(())
}

/// Extracts a snapshot from `input` into `dest`, an existing directory
/// nobody else writes to. Only relative regular files and directories are
/// written, all inside `dest`, owned by `owner` and without
/// setuid/setgid/sticky bits; every other entry is refused and counted.
pub fn unpack(input: impl Read, dest: &Path, owner: Option<Owner>) -> io::Result<Unpacked> {
    let decoder = zstd::Decoder::new(input)?;
    let mut archive = tar::Archive::new(decoder);
    let mut done = Unpacked::default();
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let Some(rel) = entry.path().ok().and_then(|p| safe_relative(&p)) else {
            done.refused += 1;
            continue;
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let target = dest.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                if make_dirs(dest, &rel, owner).is_err() {
                    done.refused += 1;
                    continue;
                }
                // Applied at the end: a read-only directory would refuse its files.
                dir_modes.push((target, mode | 0o700));
                done.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let parent = rel.parent().unwrap_or(Path::new(""));
                if make_dirs(dest, parent, owner).is_err() {
                    done.refused += 1;
                    continue;
                }
                // Never through a link, even one that should not be there.
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc_nofollow())
                    .open(&target);
                let Ok(mut file) = file else {
                    done.refused += 1;
                    continue;
                };
                if !file.metadata()?.is_file() {
                    done.refused += 1;
                    continue;
                }
                io::copy(&mut entry, &mut file)?;
                if let Some(owner) = owner {
                    std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))?;
                }
                file.set_permissions(std::fs::Permissions::from_mode(mode | 0o600))?;
                if let Ok(mtime) = entry.header().mtime() {
                    let _ = file.set_modified(UNIX_EPOCH + Duration::from_secs(mtime));
                }
                done.files += 1;
            }
            _ => done.refused += 1,
        }
    }
    for (dir, mode) in dir_modes {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(done)
}

fn libc_nofollow() -> i32 {
    OFlag::O_NOFOLLOW.bits()
}
