//! The in-process engine: resolve the model, load it into llama.cpp, start
//! its scheduler (`tessera serve`, providers and benchmarks share this).

use std::path::Path;
use std::sync::Arc;

use tessera_backend::LocalBackend;
use tessera_core::Price;
use tessera_engine::{Scheduler, SchedulerConfig, SchedulerHandle};
use tessera_llama::{EngineConfig, LlamaEngine, LlamaModelFile};
use tessera_models::ResolvedModel;

use crate::EngineArgs;

/// A loaded model with its scheduler running.
pub struct LocalEngine {
    pub scheduler: Scheduler,
    pub handle: SchedulerHandle,
    pub model: ResolvedModel,
    pub file: Arc<LlamaModelFile>,
    pub config: EngineConfig,
}

/// Resolve (pulling if needed), load and start the engine `args` describe.
/// `proofs`: build an audit proof of every answer (providers do; it needs
/// the engine's hidden states, which costs some prefill speed).
pub fn start(home: &Path, args: &EngineArgs, proofs: bool) -> anyhow::Result<LocalEngine> {
    let model = crate::models::resolve_or_pull(home, &args.model)?;
    let file = LlamaModelFile::load(&model.path)?;
    let config = EngineConfig {
        slots: args.slots.max(1),
        context_per_slot: args.context.max(16),
        threads: args.threads.unwrap_or_else(tessera_llama::physical_cores),
        hidden_states: proofs,
        ..EngineConfig::default()
    };
    let engine_file = file.clone();
    let engine_config = config.clone();
    let (scheduler, handle) =
        Scheduler::spawn(file.clone(), SchedulerConfig::default(), move || {
            Ok(Box::new(LlamaEngine::new(&engine_file, engine_config)?)
                as Box<dyn tessera_engine::Engine>)
        })?;
    Ok(LocalEngine {
        scheduler,
        handle,
        model,
        file,
        config,
    })
}

impl LocalEngine {
    /// The API's backend over this engine, at `price`.
    pub fn backend(&self, price: Price) -> LocalBackend {
        LocalBackend::new(
            self.handle.clone(),
            &self.model.alias,
            &self.model.sha256,
            price,
        )
    }
}
