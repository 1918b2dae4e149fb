//! llama.cpp behind Tessera's [`Model`] and [`Engine`] traits.
//!
//! This is the only crate that compiles llama.cpp (through the `llama-cpp-2`
//! bindings, pinned exactly in the workspace). [`LlamaModelFile`] holds the
//! weights and answers tokenizer and template questions from any thread;
//! [`LlamaEngine`] is one context (KV cache shared by many sequences) that
//! the scheduler drives from its own thread. [`direct`] is a minimal
//! llama.cpp generation loop that `tessera bench engine` compares against.

pub mod direct;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use tessera_core::Token;
use tessera_engine::{
    BatchEntry, BatchOutput, ChatMessage, Engine, EngineError, Model, ModelInfo, SeqId,
};

/// llama.cpp's global state; it may be initialised only once per process.
fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let enabled = std::env::var_os("TESSERA_LLAMA_LOG").is_some();
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(enabled),
            );
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Load(format!("llama.cpp backend: {e}")))
}

/// Physical CPU cores (hyper-threads share one core's arithmetic units, so
/// llama.cpp gains nothing from them); falls back to the logical count.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cores = std::collections::HashSet::new();
    for cpu in 0..logical {
        let base = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let core = std::fs::read_to_string(format!("{base}/core_id"));
        let pkg = std::fs::read_to_string(format!("{base}/physical_package_id"));
        match (core, pkg) {
            (Ok(c), Ok(p)) => {
                cores.insert((p.trim().to_string(), c.trim().to_string()));
            }
            _ => return logical,
        }
    }
    cores.len().clamp(1, logical)
}

/// A GGUF model loaded into memory.
pub struct LlamaModelFile {
    model: Arc<LlamaModel>,
    template: Option<LlamaChatTemplate>,
    info: ModelInfo,
}

impl LlamaModelFile {
    /// Load a GGUF file (memory-mapped, CPU only unless a GPU feature is on).
    pub fn load(path: &Path) -> Result<Arc<Self>, EngineError> {
        if !path.is_file() {
            return Err(EngineError::Load(format!(
                "{} is not a file",
                path.display()
            )));
        }
        let backend = backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let vocab = model.vocab();
        let eog_tokens = vocab
            .tokens()
            .filter(|t| vocab.is_eog(*t))
            .map(|t| t.0)
            .collect();
        let name = model
            .meta_val_str("general.name")
            .unwrap_or_else(|_| "unnamed".into());
        let info = ModelInfo {
            name,
            n_vocab: usize::try_from(model.n_vocab()).unwrap_or(0),
            n_embd: usize::try_from(model.n_embd()).unwrap_or(0),
            n_ctx_train: model.n_ctx_train() as usize,
            eog_tokens,
        };
        let template = model.chat_template(None).ok();
        Ok(Arc::new(Self {
            model: Arc::new(model),
            template,
            info,
        }))
    }

    /// Bytes of KV cache one token position takes (f16 keys and values).
    pub fn kv_bytes_per_token(&self) -> u64 {
        let m = &self.model;
        let head_dim = m.n_embd() as u64 / u64::from(m.n_head().max(1));
        2 * u64::from(m.n_layer()) * head_dim * u64::from(m.n_head_kv()) * 2
    }

    /// The underlying llama.cpp model, for the direct benchmark loop.
    pub fn llama(&self) -> &LlamaModel {
        &self.model
    }
}

impl Model for LlamaModelFile {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Template(e.to_string()))?;
        // Models without a template fall back to ChatML, which llama.cpp knows.
        let fallback;
        let template = match &self.template {
            Some(t) => t,
            None => {
                fallback = LlamaChatTemplate::new("chatml")
                    .map_err(|e| EngineError::Template(e.to_string()))?;
                &fallback
            }
        };
        self.model
            .apply_chat_template(template, &chat, true)
            .map_err(|e| EngineError::Template(e.to_string()))
    }

    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<Token>, EngineError> {
        let vocab = self.model.vocab();
        let add_special = add_bos && vocab.should_add_bos();
        Ok(vocab
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .map(|t| t.0)
            .collect())
    }

    fn token_bytes(&self, token: Token) -> Vec<u8> {
        if token < 0 || token as usize >= self.info.n_vocab {
            return Vec::new();
        }
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token), false, None)
    }
}

/// Sizes and threads of one evaluation context.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together (continuous-batching slots).
    pub slots: usize,
    /// Positions (prompt + output) each sequence may use.
    pub context_per_slot: usize,
    /// Most tokens per `decode` call.
    pub batch: usize,
    /// CPU threads for llama.cpp.
    pub threads: usize,
    /// Also return final hidden states (the auditor's prefill needs them).
    /// Off for serving: llama.cpp then computes outputs for every token of
    /// a batch, which costs about 10% of prefill speed and a 100 MB buffer.
    pub hidden_states: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            slots: 16,
            context_per_slot: 2048,
            batch: 512,
            threads: physical_cores(),
            hidden_states: false,
        }
    }
}

/// One llama.cpp context with a KV cache shared by `slots` sequences.
pub struct LlamaEngine {
    // Field order matters: `ctx` borrows from `_model` and must drop first.
    ctx: LlamaContext<'static>,
    _model: Arc<LlamaModel>,
    batch: LlamaBatch<'static>,
    config: EngineConfig,
    n_vocab: usize,
    n_embd: usize,
}

impl LlamaEngine {
    /// Create a context for `file` sized by `config`.
    pub fn new(file: &LlamaModelFile, config: EngineConfig) -> Result<Self, EngineError> {
        let backend = backend()?;
        let model = file.model.clone();
        // SAFETY: the context borrows the model, which lives in an `Arc` that
        // this struct owns and drops after the context (field order above).
        let model_ref: &'static LlamaModel = unsafe { &*Arc::as_ptr(&model) };
        let n_ctx = (config.slots * config.context_per_slot) as u32;
        let threads = i32::try_from(config.threads.max(1)).unwrap_or(1);
        let mut params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(config.batch as u32)
            .with_n_ubatch(config.batch as u32)
            .with_n_seq_max(config.slots as u32)
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        if config.hidden_states {
            params = params
                .with_embeddings(true)
                .with_pooling_type(LlamaPoolingType::None);
        }
        let ctx = model_ref
            .new_context(backend, params)
            .map_err(|e| EngineError::Load(format!("cannot create a llama.cpp context: {e}")))?;
        Ok(Self {
            ctx,
            _model: model,
            batch: LlamaBatch::new(config.batch, 1),
            n_vocab: file.info.n_vocab,
            n_embd: file.info.n_embd,
            config,
        })
    }
}

impl Engine for LlamaEngine {
    fn decode(
        &mut self,
        entries: &[BatchEntry],
        want_hidden: bool,
        out: &mut BatchOutput,
    ) -> Result<(), EngineError> {
        if entries.len() > self.config.batch {
            return Err(EngineError::Decode(format!(
                "batch of {} exceeds {}",
                entries.len(),
                self.config.batch
            )));
        }
        if want_hidden && !self.config.hidden_states {
            return Err(EngineError::Decode(
                "this context was built without hidden states".into(),
            ));
        }
        self.batch.clear();
        for e in entries {
            self.batch
                .add(LlamaToken(e.token), e.pos as i32, &[e.seq], e.output)
                .map_err(|err| EngineError::Decode(err.to_string()))?;
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
        out.logits.clear();
        out.hidden.clear();
        for (i, e) in entries.iter().enumerate() {
            if !e.output {
                continue;
            }
            let row = self.ctx.get_logits_ith(i as i32);
            out.logits
                .extend_from_slice(&row[..self.n_vocab.min(row.len())]);
            if want_hidden {
                let h = self
                    .ctx
                    .embeddings_ith(i as i32)
                    .map_err(|e| EngineError::Decode(format!("hidden state: {e}")))?;
                out.hidden.extend_from_slice(&h[..self.n_embd.min(h.len())]);
            }
        }
        Ok(())
    }

    fn clear_sequence(&mut self, seq: SeqId) {
        if let Ok(seq) = u32::try_from(seq) {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq), None, None);
        }
    }

    fn truncate_sequence(&mut self, seq: SeqId, keep: usize) -> bool {
        match (u32::try_from(seq), u32::try_from(keep)) {
            (Ok(seq), Ok(keep)) => self
                .ctx
                .clear_kv_cache_seq(Some(seq), Some(keep), None)
                .unwrap_or(false),
            _ => false,
        }
    }

    fn max_sequences(&self) -> usize {
        self.config.slots
    }

    fn max_batch(&self) -> usize {
        self.config.batch
    }

    fn context_per_sequence(&self) -> usize {
        self.config.context_per_slot
    }

    fn hidden_states(&self) -> bool {
        self.config.hidden_states
    }
}

/// A weight format llama.cpp's quantizer can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// 4-bit blocks with one scale.
    Q4_0,
    /// 8-bit blocks with one scale.
    Q8_0,
}

/// Write `src` requantized to `to` at `dst` with llama.cpp's own quantizer
/// (requantizing already-quantized weights allowed). Q4_0 is the cheaper
/// model a cheating provider might serve (tests and `tessera bench audit`
/// check that the auditor tells it apart); Q8_0 is what the default model's
/// derivation in `tessera-models` is checked against.
pub fn requantize(
    src: &Path,
    dst: &Path,
    to: Quantization,
    threads: usize,
) -> Result<(), EngineError> {
    backend()?;
    let path = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| EngineError::Load(format!("{} has a NUL byte", p.display())))
    };
    let (inp, out) = (path(src)?, path(dst)?);
    let ftype = match to {
        Quantization::Q4_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_0,
        Quantization::Q8_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q8_0,
    };
    // SAFETY: plain C calls with valid NUL-terminated paths and a params
    // struct initialised by llama.cpp itself.
    let rc = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.ftype = ftype;
        params.allow_requantize = true;
        params.nthread = i32::try_from(threads.max(1)).unwrap_or(1);
        llama_cpp_sys_2::llama_model_quantize(inp.as_ptr(), out.as_ptr(), &params)
    };
    if rc != 0 {
        return Err(EngineError::Load(format!(
            "llama.cpp could not requantize {} (code {rc})",
            src.display()
        )));
    }
    Ok(())
}
