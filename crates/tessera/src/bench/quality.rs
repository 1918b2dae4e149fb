//! `tessera bench quality`: which quantization the default model should use.
//!
//! The published SmolLM2 file is Q4_1, and llama.cpp has no batched (GEMM)
//! kernels for Q4_1 on x86. Each candidate quantization is derived from
//! that file with llama.cpp's own `llama-quantize --allow-requantize`
//! (Tessera's Q8_0 file comes from its own deterministic requantizer,
//! checked here against llama-quantize's tensor bytes), then measured with
//! llama.cpp's own tools:
//!
//! - quality: `llama-perplexity` in KL-divergence mode against the source
//!   file, on `--chunks` × 512 tokens of English from Debian's `fortunes`
//!   package (text the model never saw as a benchmark): perplexity relative
//!   to the source's, mean KL divergence, and how often the top token
//!   agrees with the source's (teacher-forced);
//! - speed: `llama-batched-bench` with 32-token prompts and 128 generated
//!   tokens per stream at 1, 8 and 16 streams (aggregate decode), and
//!   prefill of 512 tokens.
//!
//! A candidate qualifies when its perplexity is within 1% of the source's
//! and its top token agrees at ≥ 95% of positions; the fastest at 8 streams
//! among those is the one to use.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Args)]
pub struct QualityBench {
    /// Folder with llama.cpp's tools (`scripts/llama-ref.sh` prints it).
    #[arg(long, env = "TESSERA_LLAMA_BIN")]
    pub llama_bin: PathBuf,
    /// Quantizations to derive from the published Q4_1 file with
    /// llama-quantize.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "Q4_0,Q5_0,Q5_1,Q6_K,Q4_K_M"
    )]
    pub candidates: Vec<String>,
    /// 512-token chunks of text for the KL-divergence runs.
    #[arg(long, default_value_t = 40)]
    pub chunks: usize,
    /// Threads for llama.cpp's tools (default: the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Folder of the text corpus (every file; `%` lines separate entries).
    #[arg(long, default_value = "/usr/share/games/fortunes")]
    pub corpus: PathBuf,
}

/// One file under test and its figures.
struct Candidate {
    name: String,
    path: PathBuf,
    size: u64,
    ppl_ratio: f64,
    kld: f64,
    same_top: f64,
    decode: [f64; 3],
    prefill: f64,
}

fn tool(bin: &Path, name: &str) -> anyhow::Result<Command> {
    let exe = bin.join(name);
    if !exe.is_file() {
        bail!(
            "{} is missing: run scripts/llama-ref.sh to build llama.cpp's tools",
            exe.display()
        );
    }
    Ok(Command::new(exe))
}

fn output(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: String = text
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!("{what} failed ({}):\n{tail}", out.status);
    }
    Ok(text)
}

/// The fortunes as one text: every file of the corpus folder in name
/// order, entries joined by blank lines.
fn corpus_text(dir: &Path) -> anyhow::Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "{} is missing: install Debian's `fortunes` package (scripts/deps.sh does)",
                dir.display()
            )
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_none())
        .collect();
    files.sort();
    let mut text = String::new();
    for f in files {
        let Ok(body) = std::fs::read_to_string(&f) else {
            continue; // binary .dat indexes and non-UTF-8 files
        };
        for entry in body.split("\n%\n") {
            let e = entry.trim();
            if !e.is_empty() {
                text.push_str(e);
                text.push_str("\n\n");
            }
        }
    }
    Ok(text)
}

/// A figure after `label` on the last line that has it.
fn figure(text: &str, label: &str) -> Option<f64> {
    text.lines().rev().find_map(|l| {
        let rest = l.split_once(label)?.1;
        let num: String = rest
            .trim_start_matches([' ', ':', '='])
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
            .collect();
        num.parse().ok()
    })
}

/// Aggregate decode tok/s at 1, 8 and 16 streams and prefill tok/s from
/// llama-batched-bench's table (`| PP | TG | B | N_KV | T_PP s | S_PP t/s
/// | T_TG s | S_TG t/s | T s | S t/s |`).
fn batched_speed(bin: &Path, model: &Path, threads: usize) -> anyhow::Result<([f64; 3], f64)> {
    let mut cmd = tool(bin, "llama-batched-bench")?;
    cmd.arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
        .args(["-c", "16384", "-b", "2048", "-ub", "512", "--kv-unified"])
        .args(["-npp", "32,512", "-ntg", "128", "-npl", "1,8,16"]);
    let text = output(cmd, "llama-batched-bench")?;
    let rows: Vec<Vec<f64>> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            l.split('|')
                .filter_map(|c| c.trim().parse::<f64>().ok())
                .collect::<Vec<f64>>()
        })
        .filter(|r| r.len() >= 10)
        .collect();
    let decode = |pp: f64, b: f64| {
        rows.iter()
            .find(|r| r[0] == pp && r[2] == b)
            .map_or(f64::NAN, |r| r[7])
    };
    let prefill = rows
        .iter()
        .find(|r| r[0] == 512.0 && r[2] == 1.0)
        .map_or(f64::NAN, |r| r[5]);
    Ok((
        [decode(32.0, 1.0), decode(32.0, 8.0), decode(32.0, 16.0)],
        prefill,
    ))
}

pub fn run(home: &Path, b: QualityBench) -> anyhow::Result<()> {
    let threads = b.threads.unwrap_or_else(tessera_llama::physical_cores);
    let source = crate::models::resolve_or_pull(home, tessera_models::SMOLLM2_Q4_1.alias)?;
    let derived = crate::models::resolve_or_pull(home, tessera_models::DEFAULT_MODEL.alias)?;
    let work = tempfile::tempdir()?;
    let text_path = work.path().join("fortunes.txt");
    std::fs::write(&text_path, corpus_text(&b.corpus)?)?;
    println!(
        "tessera bench quality: quantizations of SmolLM2-135M-Instruct derived from {} ({}), {threads} threads",
        source.alias,
        &source.sha256[..12]
    );
    println!(
        "text: {} ({} chunks of 512 tokens); tools: {}",
        b.corpus.display(),
        b.chunks,
        b.llama_bin.display()
    );

    // llama-quantize's own Q8_0, to check Tessera's derived file against.
    let mut files: Vec<(String, PathBuf)> = vec![
        ("Q4_1 (published)".into(), source.path.clone()),
        ("Q8_0 (tessera)".into(), derived.path.clone()),
    ];
    for q in std::iter::once("Q8_0".to_string()).chain(b.candidates.iter().cloned()) {
        let out = work.path().join(format!("{q}.gguf"));
        let mut cmd = tool(&b.llama_bin, "llama-quantize")?;
        cmd.arg("--allow-requantize")
            .arg(&source.path)
            .arg(&out)
            .arg(&q)
            .arg(threads.to_string());
        output(cmd, &format!("llama-quantize {q}"))?;
        if q == "Q8_0" {
            let same = same_tensors(&derived.path, &out)?;
            println!(
                "tessera's Q8_0 ({}) has the same tensor bytes as llama-quantize's Q8_0: {same}",
                &derived.sha256[..12]
            );
            continue;
        }
        files.push((q, out));
    }

    // The source's logits, then every candidate against them.
    let base = work.path().join("base.kld");
    let mut cmd = tool(&b.llama_bin, "llama-perplexity")?;
    cmd.arg("-m")
        .arg(&source.path)
        .arg("-f")
        .arg(&text_path)
        .args(["-c", "512", "--chunks", &b.chunks.to_string()])
        .args(["-t", &threads.to_string(), "-b", "512"])
        .arg("--kl-divergence-base")
        .arg(&base);
    let base_text = output(cmd, "llama-perplexity (base)")?;
    let base_ppl = figure(&base_text, "Final estimate: PPL")
        .context("no final perplexity in llama-perplexity's output")?;

    let mut results = Vec::new();
    for (name, path) in files {
        let (ppl_ratio, kld, same_top) = if path == source.path {
            (1.0, 0.0, 100.0)
        } else {
            let mut cmd = tool(&b.llama_bin, "llama-perplexity")?;
            cmd.arg("-m")
                .arg(&path)
                .args(["-c", "512", "--chunks", &b.chunks.to_string()])
                .args(["-t", &threads.to_string(), "-b", "512"])
                .arg("--kl-divergence-base")
                .arg(&base)
                .arg("--kl-divergence");
            let text = output(cmd, &format!("llama-perplexity ({name})"))?;
            let ppl = figure(&text, "Mean PPL(Q)").context("no Mean PPL(Q)")?;
            (
                ppl / base_ppl,
                figure(&text, "Mean    KLD").unwrap_or(f64::NAN),
                figure(&text, "Same top p").unwrap_or(f64::NAN),
            )
        };
        let (decode, prefill) = batched_speed(&b.llama_bin, &path, threads)?;
        results.push(Candidate {
            size: std::fs::metadata(&path)?.len(),
            name,
            path,
            ppl_ratio,
            kld,
            same_top,
            decode,
            prefill,
        });
    }

    println!();
    println!("source perplexity {base_ppl:.3}");
    println!(
        "  {:<18} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}  qualifies",
        "weights",
        "MiB",
        "PPL/src",
        "KLD",
        "same top",
        "1 stream",
        "8 streams",
        "16 strms",
        "prefill",
    );
    let mut best: Option<&Candidate> = None;
    for c in &results {
        let ok = c.ppl_ratio <= 1.01 && c.same_top >= 95.0;
        println!(
            "  {:<18} {:>8.1} {:>+8.2}% {:>8.4} {:>8.1}% {:>9.1} {:>9.1} {:>9.1} {:>9.1}  {}",
            c.name,
            c.size as f64 / 1048576.0,
            (c.ppl_ratio - 1.0) * 100.0,
            c.kld,
            c.same_top,
            c.decode[0],
            c.decode[1],
            c.decode[2],
            c.prefill,
            if ok { "yes" } else { "no" }
        );
        if ok && best.is_none_or(|b| c.decode[1] > b.decode[1]) {
            best = Some(c);
        }
    }
    if let Some(best) = best {
        println!(
            "fastest qualifying at 8 streams: {} ({})",
            best.name,
            best.path.display()
        );
    }
    Ok(())
}

/// Whether two GGUF files hold the same tensors with identical bytes.
fn same_tensors(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let (ta, tb) = (
        tessera_models::gguf::tensors(a)?,
        tessera_models::gguf::tensors(b)?,
    );
    if ta.len() != tb.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    for x in &ta {
        let Some(y) = tb.iter().find(|y| y.name == x.name) else {
            return Ok(false);
        };
        if x.kind != y.kind || x.dims != y.dims {
            return Ok(false);
        }
        let n = x.len.min(y.len) as usize;
        let (mut bx, mut by) = (vec![0u8; n], vec![0u8; n]);
        fa.seek(SeekFrom::Start(x.offset))?;
        fa.read_exact(&mut bx)?;
        fb.seek(SeekFrom::Start(y.offset))?;
        fb.read_exact(&mut by)?;
        // Compare the data, not the padding after it.
        let data = n.min(tessera_models::gguf::tensor_bytes(x).map_or(n, |d| d as usize));
        if bx[..data] != by[..data] {
            return Ok(false);
        }
    }
    Ok(true)
}
