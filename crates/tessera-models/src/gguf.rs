//! Just enough of the GGUF format to find each tensor's bytes in a file,
//! to derive the default model's Q8_0 file from its published Q4_1 file
//! ([`requantize_q4_1_to_q8_0`]), and two ways to alter a model: the altered
//! files a cheating provider might serve, which the auditor's tests and
//! `tessera bench audit` must catch.
//!
//! A GGUF file is a header (magic, version, tensor and key-value counts),
//! the key-values, the tensor infos (name, dimensions, type, offset), then
//! the tensor data from the next multiple of `general.alignment` (32 by
//! default). Nothing here interprets the tensors' contents.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// ggml's tensor type id of 32-bit floats.
pub const GGML_TYPE_F32: u32 = 0;
/// … of 4-bit blocks with a scale.
pub const GGML_TYPE_Q4_0: u32 = 2;
/// … of 4-bit blocks with a scale and a minimum.
pub const GGML_TYPE_Q4_1: u32 = 3;
/// … of 8-bit blocks with a scale.
pub const GGML_TYPE_Q8_0: u32 = 8;
/// llama.cpp's `LLAMA_FTYPE_MOSTLY_Q8_0`, the `general.file_type` of a
/// file whose weights are Q8_0.
const FTYPE_MOSTLY_Q8_0: u32 = 7;

/// One tensor: where its bytes are in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name (`blk.0.attn_q.weight`, …).
    pub name: String,
    /// ggml type id (2 = Q4_0, 3 = Q4_1, 0 = F32, …).
    pub kind: u32,
    /// Its dimensions, innermost first.
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

/// Elements per block of Q4_1 and Q8_0 (both 32).
const BLOCK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;
/// Bytes of one Q8_0 block: f16 scale, 32 signed bytes.
const Q8_0_BYTES: usize = 34;

/// One Q4_1 block (x = d·q + m, q in 0..16) as a Q8_0 block (x ≈ d·q, q in
/// −127..=127), exactly as llama.cpp's reference code rounds: the scale is
/// the block's largest magnitude ÷ 127 stored as f16 (round to nearest
/// even), and each value is rounded half away from zero. Rust never fuses
/// `q·d + m` into one instruction, so every machine derives the same bytes.
fn q4_1_block_to_q8_0(src: &[u8], dst: &mut [u8]) {
    let d = half::f16::from_le_bytes([src[0], src[1]]).to_f32();
    let m = half::f16::from_le_bytes([src[2], src[3]]).to_f32();
    let mut x = [0f32; BLOCK];
    for j in 0..BLOCK / 2 {
        let q = src[4 + j];
        x[j] = f32::from(q & 0x0f) * d + m;
        x[j + BLOCK / 2] = f32::from(q >> 4) * d + m;
    }
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    dst[..2].copy_from_slice(&half::f16::from_f32(scale).to_le_bytes());
    for (out, v) in dst[2..].iter_mut().zip(x) {
        *out = ((v * inverse).round() as i8) as u8;
    }
}

/// What [`requantize_q4_1_to_q8_0`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requantized {
    /// Q4_1 tensors rewritten as Q8_0.
    pub converted: usize,
    /// Tensors copied unchanged (F32 norms, the Q8_0 embedding, …).
    pub copied: usize,
}

/// Write `src` (a GGUF file whose weights are Q4_1) at `dst` with every
/// Q4_1 tensor turned into Q8_0 and `general.file_type` set to Q8_0; every
/// other key, tensor and byte order is kept, so the result is a pure
/// function of the input. Q8_0 has batched (GEMM) kernels on x86 and Q4_1
/// does not: this is how the default model gets a quantization that
/// batches, with no second 4-bit rounding (BENCHMARKS.md has the quality).
pub fn requantize_q4_1_to_q8_0(src: &Path, dst: &Path) -> io::Result<Requantized> {
    let bytes = std::fs::read(src)?;
    let file = parse(&bytes)?;
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len() * 2);
    out.extend_from_slice(&bytes[..file.kv_start]);
    let mut saw_file_type = false;
    for kv in &file.kvs {
        let raw = &bytes[kv.start..kv.end];
        if kv.key == "general.file_type" && kv.kind == 4 {
            out.extend_from_slice(&raw[..raw.len() - 4]);
            out.extend_from_slice(&FTYPE_MOSTLY_Q8_0.to_le_bytes());
            saw_file_type = true;
        } else {
            out.extend_from_slice(raw);
        }
    }
    if !saw_file_type {
        return Err(bad("no general.file_type key to update"));
    }
    // New sizes and offsets (relative to the data section), each tensor
    // padded to the alignment as the format asks.
    let mut stats = Requantized {
        converted: 0,
        copied: 0,
    };
    let mut layout = Vec::with_capacity(file.tensors.len());
    let mut offset = 0u64;
    for t in &file.tensors {
        let (kind, size) = if t.kind == GGML_TYPE_Q4_1 {
            let blocks = t.data_len / Q4_1_BYTES as u64;
            if t.data_len % Q4_1_BYTES as u64 != 0 {
                return Err(bad(format!("{}: not whole Q4_1 blocks", t.name)));
            }
            (GGML_TYPE_Q8_0, blocks * Q8_0_BYTES as u64)
        } else {
            (t.kind, t.data_len)
        };
        layout.push((kind, offset, size));
        offset = (offset + size).div_ceil(file.alignment) * file.alignment;
    }
    for (t, &(kind, rel, _)) in file.tensors.iter().zip(&layout) {
        put_string(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&rel.to_le_bytes());
    }
    let data_start = (out.len() as u64).div_ceil(file.alignment) * file.alignment;
    out.resize(data_start as usize, 0);
    for (t, &(kind, rel, size)) in file.tensors.iter().zip(&layout) {
        out.resize((data_start + rel) as usize, 0);
        let from = (file.data_start + t.rel_offset) as usize;
        let input = bytes
            .get(from..from + t.data_len as usize)
            .ok_or_else(|| bad(format!("{}: data past the end of the file", t.name)))?;
        if kind != t.kind {
            let start = out.len();
            out.resize(start + size as usize, 0);
            for (i, o) in input
                .chunks_exact(Q4_1_BYTES)
                .zip(out[start..].chunks_exact_mut(Q8_0_BYTES))
            {
                q4_1_block_to_q8_0(i, o);
            }
            stats.converted += 1;
        } else {
            out.extend_from_slice(input);
            stats.copied += 1;
        }
    }
    out.resize(
        ((out.len() as u64).div_ceil(file.alignment) * file.alignment) as usize,
        0,
    );
    let mut tmp = tempfile::NamedTempFile::new_in(dst.parent().unwrap_or(Path::new(".")))?;
    tmp.write_all(&out)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dst).map_err(|e| e.error)?;
    Ok(stats)
}

/// Bytes of `t`'s data without padding, for the types this module knows
/// (F32, F16, Q4_0, Q4_1, Q8_0).
pub fn tensor_bytes(t: &TensorInfo) -> Option<u64> {
    let elements = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    data_len(t.kind, elements)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One key-value pair's place in the file.
struct RawKv {
    key: String,
    kind: u32,
    /// Byte range of the whole pair (key, type, value).
    start: usize,
    end: usize,
}

/// One tensor as the header describes it.
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    kind: u32,
    /// Offset from the start of the data section.
    rel_offset: u64,
    /// Bytes of its data (without padding), from its type and dimensions.
    data_len: u64,
}

/// A GGUF file's header, read from memory.
struct Parsed {
    kv_start: usize,
    kvs: Vec<RawKv>,
    tensors: Vec<RawTensor>,
    alignment: u64,
    data_start: u64,
}

/// Bytes of a tensor of type `kind` with `elements` values, for the types
/// this module handles.
fn data_len(kind: u32, elements: u64) -> Option<u64> {
    let blocks = elements.checked_div(BLOCK as u64)?;
    match kind {
        GGML_TYPE_F32 => elements.checked_mul(4),
        1 => elements.checked_mul(2), // F16
        GGML_TYPE_Q4_0 if elements.is_multiple_of(BLOCK as u64) => Some(blocks * 18),
        GGML_TYPE_Q4_1 if elements.is_multiple_of(BLOCK as u64) => Some(blocks * Q4_1_BYTES as u64),
        GGML_TYPE_Q8_0 if elements.is_multiple_of(BLOCK as u64) => Some(blocks * Q8_0_BYTES as u64),
        _ => None,
    }
}

fn parse(bytes: &[u8]) -> io::Result<Parsed> {
    let mut r = Reader {
        r: io::Cursor::new(bytes),
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
    let kv_start = r.r.position() as usize;
    let mut kvs = Vec::new();
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let start = r.r.position() as usize;
        let key = r.string()?;
        let kind = r.u32()?;
        let v = r.value(kind)?;
        if key == "general.alignment" {
            alignment = u64::from(v.unwrap_or(32)).max(1);
        }
        kvs.push(RawKv {
            key,
            kind,
            start,
            end: r.r.position() as usize,
        });
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > 4 {
            return Err(bad(format!("{name}: {n_dims} dimensions")));
        }
        let dims = (0..n_dims)
            .map(|_| r.u64())
            .collect::<io::Result<Vec<_>>>()?;
        let kind = r.u32()?;
        let rel_offset = r.u64()?;
        let elements = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("{name}: too many elements")))?;
        let data_len = data_len(kind, elements)
            .ok_or_else(|| bad(format!("{name}: tensor type {kind} is not supported here")))?;
        tensors.push(RawTensor {
            name,
            dims,
            kind,
            rel_offset,
            data_len,
        });
    }
    let data_start = r.r.position().div_ceil(alignment) * alignment;
    Ok(Parsed {
        kv_start,
        kvs,
        tensors,
        alignment,
        data_start,
    })
}
