//! Just enough of the GGUF format to find each tensor's bytes in a file,
//! and two ways to alter a model with that: the altered files a cheating
//! provider might serve, which the auditor's tests and `tessera bench audit`
//! must catch.
//!
//! A GGUF file is a header (magic, version, tensor and key-value counts),
//! the key-values, the tensor infos (name, dimensions, type, offset), then
//! the tensor data from the next multiple of `general.alignment` (32 by
//! default). Nothing here interprets the tensors' contents.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// One tensor: where its bytes are in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml type id (2 = Q4_0, 3 = Q4_1, 0 = F32, …).
    pub kind: u32,
    pub dims: Vec<u64>,
    /// Absolute offset of its data in the file.
    pub offset: u64,
    /// Bytes up to the next tensor (or the end of the file), padding included.
    pub len: u64,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

struct Reader<R> {
    r: R,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> io::Result<u32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> io::Result<u64> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }
    fn string(&mut self) -> io::Result<String> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(bad(format!("a string of {n} bytes")));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b)?;
        String::from_utf8(b).map_err(|_| bad("a string that is not UTF-8"))
    }
    fn skip(&mut self, n: u64) -> io::Result<()> {
        io::copy(&mut (&mut self.r).take(n), &mut io::sink()).and_then(|copied| {
            if copied == n {
                Ok(())
            } else {
                Err(bad("the file ends early"))
            }
        })
    }
    /// Read a value of GGUF type `t`; returns it if it is a u32 (for
    /// `general.alignment`).
    fn value(&mut self, t: u32) -> io::Result<Option<u32>> {
        match t {
            0 | 1 | 7 => self.skip(1)?,
            2 | 3 => self.skip(2)?,
            4 => return self.u32().map(Some),
            5 | 6 => self.skip(4)?,
            10..=12 => self.skip(8)?,
            8 => {
                self.string()?;
            }
            9 => {
                let inner = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.value(inner)?;
                }
            }
            other => return Err(bad(format!("unknown value type {other}"))),
        }
        Ok(None)
    }
}

/// Every tensor of the GGUF file at `path`, in file order.
pub fn tensors(path: &Path) -> io::Result<Vec<TensorInfo>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut r = Reader {
        r: BufReader::new(file),
    };
    if &r.bytes::<4>()? != b"GGUF" {
        return Err(bad("not a GGUF file"));
    }
    let version = r.u32()?;
    if version < 2 {
        return Err(bad(format!("GGUF version {version} is too old")));
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = r.string()?;
        let t = r.u32()?;
        let v = r.value(t)?;
        if key == "general.alignment" {
            alignment = u64::from(v.unwrap_or(32)).max(1);
        }
    }
    let mut list = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        let dims = (0..n_dims)
            .map(|_| r.u64())
            .collect::<io::Result<Vec<_>>>()?;
        let kind = r.u32()?;
        let offset = r.u64()?;
        list.push(TensorInfo {
            name,
            kind,
            dims,
            offset,
            len: 0,
        });
    }
    let pos = r.r.stream_position()?;
    let data = pos.div_ceil(alignment) * alignment;
    for t in &mut list {
        t.offset += data;
    }
    let mut ends: Vec<u64> = list.iter().map(|t| t.offset).collect();
    ends.sort_unstable();
    for t in &mut list {
        let next = ends
            .iter()
            .find(|&&o| o > t.offset)
            .copied()
            .unwrap_or(size);
        t.len = next - t.offset;
    }
    Ok(list)
}

/// Copy `src` to `dst`, then let `edit` change tensors' bytes in `dst`.
fn altered(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&[TensorInfo], &mut File) -> io::Result<usize>,
) -> io::Result<usize> {
    std::fs::copy(src, dst)?;
    let list = tensors(dst)?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dst)?;
    let n = edit(&list, &mut f)?;
    f.sync_all()?;
    Ok(n)
}

/// A model with transformer blocks `layers` skipped: their attention output
/// and feed-forward down projections zeroed, so each adds nothing to the
/// residual stream (for every quantization, all-zero bytes are zero
/// weights). Returns the tensors zeroed.
pub fn skip_layers(src: &Path, dst: &Path, layers: &[usize]) -> io::Result<usize> {
    altered(src, dst, |list, f| {
        let mut n = 0;
        for t in list {
            let hit = layers.iter().any(|l| {
                t.name == format!("blk.{l}.attn_output.weight")
                    || t.name == format!("blk.{l}.ffn_down.weight")
            });
            if hit {
                f.seek(SeekFrom::Start(t.offset))?;
                f.write_all(&vec![0u8; t.len as usize])?;
                n += 1;
            }
        }
        Ok(n)
    })
}

/// A different model of the same shape and tokenizer: the transformer
/// blocks in reverse order (block i gets block n-1-i's weights). Returns
/// the tensors moved.
pub fn reverse_layers(src: &Path, dst: &Path) -> io::Result<usize> {
    let list = tensors(src)?;
    let blocks = list
        .iter()
        .filter_map(|t| {
            t.name
                .strip_prefix("blk.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    let mut source = File::open(src)?;
    altered(src, dst, |list, f| {
        let mut n = 0;
        for t in list {
            let Some(rest) = t.name.strip_prefix("blk.") else {
                continue;
            };
            let Some((i, suffix)) = rest.split_once('.') else {
                continue;
            };
            let Ok(i) = i.parse::<usize>() else { continue };
            let other = format!("blk.{}.{suffix}", blocks - 1 - i);
            let Some(o) = list.iter().find(|o| o.name == other) else {
                continue;
            };
            if o.kind != t.kind || o.dims != t.dims || o.name == t.name {
                continue;
            }
            let mut b = vec![0u8; o.len.min(t.len) as usize];
            source.seek(SeekFrom::Start(o.offset))?;
            source.read_exact(&mut b)?;
            f.seek(SeekFrom::Start(t.offset))?;
            f.write_all(&b)?;
            n += 1;
        }
        Ok(n)
    })
}
