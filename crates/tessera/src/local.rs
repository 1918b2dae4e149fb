//! The in-process provider: a llama.cpp engine behind the API's `Backend`.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tessera_api::{ApiError, Backend, BoxFuture, Dispatch, RoutePrefs, ServedModel};
use tessera_engine::{
    GenerationRequest, Model, Price, Scheduler, SchedulerConfig, SchedulerHandle,
};
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

/// `Backend` over one local scheduler.
pub struct LocalBackend {
    handle: SchedulerHandle,
    served: ServedModel,
    /// Shown to clients as `tessera.provider`.
    provider: String,
    price: Price,
}

impl LocalBackend {
    pub fn new(engine: &LocalEngine, price: Price) -> Self {
        let served = ServedModel {
            id: engine.model.alias.clone(),
            sha256: engine.model.sha256.clone(),
            tokenizer: engine.file.clone() as Arc<dyn Model>,
            context_length: engine.handle.context_per_sequence(),
            providers: 1,
            prices: Some((price, price)),
        };
        Self {
            handle: engine.handle.clone(),
            served,
            provider: "local".into(),
            price,
        }
    }
}

impl Backend for LocalBackend {
    fn models(&self) -> Vec<ServedModel> {
        vec![self.served.clone()]
    }

    fn submit(
        &self,
        _model: &ServedModel,
        request: GenerationRequest,
        // One provider: preferences have nothing to choose between.
        _route: &RoutePrefs,
        _ticket: &tessera_api::JobTicket,
    ) -> BoxFuture<'static, Result<Dispatch, ApiError>> {
        let result = self
            .handle
            .submit(request)
            .map(|events| Dispatch {
                events,
                provider: self.provider.clone(),
                price: self.price,
            })
            .map_err(ApiError::from);
        Box::pin(std::future::ready(result))
    }

    fn quote(&self, _model: &ServedModel, route: &RoutePrefs) -> Result<Price, ApiError> {
        match route.max_price {
            Some(cap) if self.price.input > cap.input || self.price.output > cap.output => {
                Err(ApiError::unavailable(format!(
                    "This server charges {} per prompt and {} per completion token \
                     (micro-credits), above the request's provider.max_price.",
                    self.price.input, self.price.output
                )))
            }
            _ => Ok(self.price),
        }
    }

    fn health(&self) -> Value {
        json!({
            "kind": "local",
            "active": self.handle.active(),
            "waiting": self.handle.waiting(),
            "slots": self.handle.max_sequences(),
        })
    }
}
