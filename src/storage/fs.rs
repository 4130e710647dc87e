//! The filesystem driver: every path is relative to the storage root. Atomicity comes from
//! write-to-temp + fsync + rename + fsync of the parent directory, so a `kill -9` at any instant
//! leaves either the old file or the complete new one.

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::AsyncSeekExt;

use super::{Driver, Reader, StagedFile, Writer};
use crate::oci::Digest;

/// Where staged writes live; on the same filesystem as everything else so renames are atomic.
const TMP_DIR: &str = "tmp";

pub struct FsDriver {
    root: PathBuf,
}

impl FsDriver {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        // Staged writes never outlive the process that made them: what is left here is from a
        // crash or a fill cut short by shutdown, and is never visible.
        let _ = std::fs::remove_dir_all(root.join(TMP_DIR));
        std::fs::create_dir_all(root.join(TMP_DIR))?;
        Ok(FsDriver { root })
    }

    /// Open a store another process may be serving (gc): staged writes are left alone.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join(TMP_DIR))?;
        Ok(FsDriver { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn full(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }
}

/// A temp-file name nobody else uses.
pub fn unique_name() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Replace the file at `path` with `content`, atomically and durably: a new file (with `mode`)
/// beside it is written and fsynced, renamed over it, and the folder fsynced, so a crash leaves
/// the old content or the new, never a mix, and the new survives a power loss once this returns.
/// Missing folders are created (durably too). The one write-then-rename of regmirror: the store,
/// the token key, htpasswd, TLS material and the access log all use it.
pub fn atomic_write(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    create_dirs_durably_blocking(&dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", unique_name()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn create_dirs_durably_blocking(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// `create_dir_all`, then fsync the parent of every folder it created, so the new entries survive
/// a power loss as surely as the file renamed into them.
async fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if tokio::fs::try_exists(d).await? {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    tokio::fs::create_dir_all(dir).await?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent() {
            sync_dir(parent).await?;
        }
    }
    Ok(())
}

async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all()).await.map_err(io::Error::other)?
}

fn not_found_is_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl Driver for FsDriver {
    async fn get(&self, path: &str) -> io::Result<Option<Vec<u8>>> {
        not_found_is_none(tokio::fs::read(self.full(path)).await)
    }

    async fn put(&self, path: &str, content: &[u8]) -> io::Result<()> {
        let (full, content) = (self.full(path), content.to_vec());
        tokio::task::spawn_blocking(move || atomic_write(&full, &content, 0o644)).await.map_err(io::Error::other)?
    }

    async fn put_private(&self, path: &str, content: &[u8]) -> io::Result<()> {
        let (full, content) = (self.full(path), content.to_vec());
        tokio::task::spawn_blocking(move || atomic_write(&full, &content, 0o600)).await.map_err(io::Error::other)?
    }

    async fn delete(&self, path: &str) -> io::Result<()> {
        let full = self.full(path);
        let result = match tokio::fs::symlink_metadata(&full).await {
            Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(&full).await,
            Ok(_) => tokio::fs::remove_file(&full).await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn list(&self, path: &str) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let Some(mut dir) = not_found_is_none(tokio::fs::read_dir(self.full(path)).await)? else {
            return Ok(out);
        };
        while let Some(entry) = dir.next_entry().await? {
            if let Ok(name) = entry.file_name().into_string() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn size(&self, path: &str) -> io::Result<Option<u64>> {
        Ok(not_found_is_none(tokio::fs::metadata(self.full(path)).await)?.filter(|m| m.is_file()).map(|m| m.len()))
    }

    async fn stat(&self, path: &str) -> io::Result<Option<(u64, u64)>> {
        let Some(m) = not_found_is_none(tokio::fs::metadata(self.full(path)).await)? else { return Ok(None) };
        let mtime =
            m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        Ok(m.is_file().then_some((m.len(), mtime)))
    }

    async fn open_read(&self, path: &str, offset: u64) -> io::Result<Option<Reader>> {
        let Some(mut f) = not_found_is_none(tokio::fs::File::open(self.full(path)).await)? else {
            return Ok(None);
        };
        if offset > 0 {
            f.seek(io::SeekFrom::Start(offset)).await?;
        }
        // tokio reads through a buffer of at most 2 MiB per blocking call; ask for large ones.
        f.set_max_buf_size(1 << 20);
        Ok(Some(Box::new(f)))
    }

    async fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Option<bytes::Bytes>> {
        let full = self.full(path);
        tokio::task::spawn_blocking(move || {
            let Some(file) = not_found_is_none(std::fs::File::open(full))? else { return Ok(None) };
            let mut buf = Vec::with_capacity(len);
            while buf.len() < len {
                let filled = buf.len();
                match pread_into_spare(&file, &mut buf, offset + filled as u64) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Some(bytes::Bytes::from(buf)))
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn open_append(&self, path: &str) -> io::Result<Writer> {
        let f = tokio::fs::OpenOptions::new().append(true).open(self.full(path)).await?;
        Ok(Box::new(f))
    }

    async fn truncate(&self, path: &str, len: u64) -> io::Result<()> {
        let f = tokio::fs::OpenOptions::new().write(true).open(self.full(path)).await?;
        f.set_len(len).await?;
        f.sync_all().await
    }

    async fn create_staged(&self, path: &str) -> io::Result<Box<dyn StagedFile>> {
        let full = self.full(path);
        tokio::task::spawn_blocking(move || {
            if let Some(parent) = full.parent() {
                std::fs::create_dir_all(parent)?;
            }
            Ok(Box::new(DirectStaging::create(&full)?) as Box<dyn StagedFile>)
        })
        .await
        .map_err(io::Error::other)?
    }

    fn discard_staged(&self, path: &str) {
        let _ = std::fs::remove_file(self.full(path));
    }

    async fn touch(&self, path: &str) -> io::Result<()> {
        let full = self.full(path);
        tokio::task::spawn_blocking(move || match std::fs::File::options().write(true).open(full) {
            Ok(f) => f.set_modified(std::time::SystemTime::now()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn commit(&self, from: &str, to: &str, _expected: &Digest) -> io::Result<()> {
        let (from, to) = (self.full(from), self.full(to));
        tokio::fs::File::open(&from).await?.sync_all().await?;
        let parent = to.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        create_dirs_durably(&parent).await?;
        tokio::fs::rename(&from, &to).await?;
        sync_dir(&parent).await
    }

    fn staging_path(&self) -> String {
        format!("{TMP_DIR}/{}", unique_name())
    }

    fn available(&self) -> io::Result<Option<u64>> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.root.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: `path` is a valid C string; `stat` is written by statvfs before it is read.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64)))
    }
}

/// Read at `offset` into `buf`'s spare capacity and extend it by what was read. Serving a blob
/// reads every byte into a new buffer, and zeroing each one first made that a fifth slower here.
fn pread_into_spare(file: &std::fs::File, buf: &mut Vec<u8>, offset: u64) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: `spare` is valid for writes of `spare.len()` bytes and pread writes at most that
    // many; uninitialised bytes are never read.
    let n = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), offset) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel initialised the first `n` spare bytes.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Size of the blocks a staged blob is written in.
const DIRECT_BLOCK: usize = 1 << 20;
/// Alignment `O_DIRECT` asks of buffers, lengths and offsets (covers 512 and 4096-byte sectors).
const DIRECT_ALIGN: usize = 4096;

/// A staging file written in whole aligned blocks with `O_DIRECT` where the filesystem allows.
/// A fill writes every byte of a blob once and may never read it back; written through the page
/// cache it would first claim as much fresh memory as the blob is large, which costs the writer
/// more than the write itself (and, on VMs that back guest memory lazily, several times more), and
/// pushes hotter blobs out of the cache. Readers of a growing file still read through the page
/// cache; the kernel keeps the two views coherent. The unaligned tail, and every write on a
/// filesystem that refuses `O_DIRECT`, go through an ordinary descriptor.
struct DirectStaging {
    file: std::fs::File,
    direct: Option<std::fs::File>,
    block: AlignedBlock,
    /// Bytes in the file.
    on_disk: u64,
}

impl DirectStaging {
    fn create(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
        let direct = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok();
        Ok(DirectStaging { file, direct, block: AlignedBlock::default(), on_disk: 0 })
    }

    /// Write what the block has gathered: with O_DIRECT while that works, else buffered.
    fn write_block(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if !self.block.is_aligned() {
            self.direct = None;
        }
        if let Some(direct) = &self.direct {
            match direct.write_all_at(self.block.filled(), self.on_disk) {
                Ok(()) => {
                    self.on_disk += self.block.len as u64;
                    self.block.clear();
                    return Ok(());
                }
                // Refused after all (some filesystems accept the flag but not the write).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        self.write_buffered_block()
    }

    fn write_buffered_block(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(self.block.filled(), self.on_disk)?;
        self.on_disk += self.block.len as u64;
        self.block.clear();
        Ok(())
    }
}

impl StagedFile for DirectStaging {
    fn append(&mut self, mut bytes: &[u8]) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        while !bytes.is_empty() && self.direct.is_some() {
            let taken = self.block.fill_from(bytes);
            bytes = &bytes[taken..];
            if self.block.is_full() {
                self.write_block()?;
            }
        }
        if self.direct.is_none() {
            // Without O_DIRECT (refused, or given up on): what is gathered goes first.
            self.write_buffered_block()?;
            self.file.write_all_at(bytes, self.on_disk)?;
            self.on_disk += bytes.len() as u64;
        }
        Ok(self.on_disk)
    }

    fn finish(&mut self) -> io::Result<u64> {
        // The tail is not a whole block: O_DIRECT would refuse it.
        self.write_buffered_block()?;
        Ok(self.on_disk)
    }
}

/// A `DIRECT_BLOCK`-sized buffer at a `DIRECT_ALIGN`-aligned address, allocated on first use.
#[derive(Default)]
struct AlignedBlock {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBlock {
    fn fill_from(&mut self, bytes: &[u8]) -> usize {
        if self.storage.is_empty() {
            self.storage = vec![0; DIRECT_BLOCK + DIRECT_ALIGN];
            // `align_offset` may decline (usize::MAX): `is_aligned` then says so.
            self.start = self.storage.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        }
        let n = bytes.len().min(DIRECT_BLOCK - self.len);
        let at = self.start + self.len;
        self.storage[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    fn is_aligned(&self) -> bool {
        (self.storage.as_ptr() as usize + self.start).is_multiple_of(DIRECT_ALIGN)
    }

    fn is_full(&self) -> bool {
        self.len == DIRECT_BLOCK
    }

    fn filled(&self) -> &[u8] {
        &self.storage[self.start.min(self.storage.len())..][..self.len]
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `data` in uneven chunks; after `give_up_after` appends the O_DIRECT descriptor is
    /// dropped, as when a filesystem refuses a direct write half way.
    fn stage(give_up_after: Option<usize>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staged");
        let data: Vec<u8> = (0..(3 * DIRECT_BLOCK + 777)).map(|i| (i % 253) as u8).collect();
        let mut staged = DirectStaging::create(&path).unwrap();
        let (mut pos, mut readable) = (0, 0);
        for (n, size) in [1usize, 4095, DIRECT_BLOCK + 1, 100_000].iter().cycle().enumerate() {
            if pos == data.len() {
                break;
            }
            if Some(n) == give_up_after {
                staged.direct = None;
            }
            let end = (pos + size).min(data.len());
            let now = staged.append(&data[pos..end]).unwrap();
            assert!(now >= readable && now <= end as u64, "readable bytes only grow, and only up to what was appended");
            assert_eq!(std::fs::read(&path).unwrap()[..now as usize], data[..now as usize]);
            (pos, readable) = (end, now);
        }
        assert_eq!(staged.finish().unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[tokio::test]
    async fn read_at_returns_what_the_file_has() {
        let dir = tempfile::tempdir().unwrap();
        let driver = FsDriver::new(dir.path()).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        driver.put("f", &data).await.unwrap();
        let mid = driver.read_at("f", 1_000_001, 1 << 20).await.unwrap().unwrap();
        assert_eq!(mid, data[1_000_001..1_000_001 + (1 << 20)]);
        let tail = driver.read_at("f", 2_999_990, 100).await.unwrap().unwrap();
        assert_eq!(tail, data[2_999_990..], "fewer bytes only where the file ends");
        assert!(driver.read_at("f", 5_000_000, 10).await.unwrap().unwrap().is_empty());
        assert!(driver.read_at("absent", 0, 10).await.unwrap().is_none());
    }

    #[test]
    fn staged_blobs_are_written_whole_in_any_chunking() {
        stage(None);
    }

    #[test]
    fn staged_blobs_survive_losing_o_direct_half_way() {
        // After the third append, part of a block is gathered and not yet written.
        stage(Some(3));
    }
}
