//! The in-process provider: one engine scheduler behind [`Backend`].

use std::sync::Arc;

use futures::future::BoxFuture;
use tessera_core::{GenerationRequest, Price};
use tessera_engine::{Event, Model, SchedulerHandle};
use tokio::sync::mpsc;

use crate::{
    Backend, Dispatch, Health, JobError, JobEvent, JobTicket, Quote, RoutePrefs, ServedModel,
};

/// `Backend` over one local scheduler (`tessera serve`): one provider, so
/// preferences have nothing to choose between except the price cap.
pub struct LocalBackend {
    handle: SchedulerHandle,
    served: ServedModel,
    price: Price,
    /// Hashes accounts into prefix-cache keys (randomly seeded per process).
    keys: std::collections::hash_map::RandomState,
}

/// Shown to clients as `tessera.provider`.
const PROVIDER: &str = "local";

impl LocalBackend {
    /// Serve `handle`'s model under `alias`/`sha256` at `price`.
    pub fn new(handle: SchedulerHandle, alias: &str, sha256: &str, price: Price) -> Self {
        let served = ServedModel {
            id: alias.to_string(),
            sha256: sha256.to_string(),
            tokenizer: handle.model().clone() as Arc<dyn Model>,
            context_length: handle.context_per_sequence(),
            providers: 1,
            prices: Some((price, price)),
        };
        Self {
            handle,
            served,
            price,
            keys: std::collections::hash_map::RandomState::new(),
        }
    }
}

/// Pass the scheduler's events on as job events until the answer ends or
/// the client goes away (dropping the scheduler's receiver cancels it).
async fn forward(mut from: mpsc::UnboundedReceiver<Event>, to: mpsc::UnboundedSender<JobEvent>) {
    loop {
        let event = tokio::select! {
            e = from.recv() => e,
            _ = to.closed() => return,
        };
        let (out, last) = match event {
            Some(Event::Token(t)) => (JobEvent::Token(t), false),
            Some(Event::Done {
                finish_reason,
                usage,
                text,
            }) => (
                JobEvent::Done {
                    finish_reason,
                    usage,
                    text,
                },
                true,
            ),
            Some(Event::Error(e)) => (JobEvent::Error(e.into()), true),
            Some(Event::Proof { .. }) => continue,
            None => (JobEvent::Error(JobError::ShuttingDown), true),
        };
        if to.send(out).is_err() || last {
            return;
        }
    }
}

impl Backend for LocalBackend {
    fn models(&self) -> Vec<ServedModel> {
        vec![self.served.clone()]
    }

    fn quote(&self, _model: &ServedModel, route: &RoutePrefs) -> Result<Quote, JobError> {
        if route.affords(&self.price) {
            Ok(Quote {
                hold: self.price,
                cheapest: self.price,
                ceiling: self.price,
            })
        } else {
            Err(JobError::OverPriceCap)
        }
    }

    fn submit(
        &self,
        _model: &ServedModel,
        mut request: GenerationRequest,
        _route: &RoutePrefs,
        ticket: &JobTicket,
    ) -> BoxFuture<'static, Result<Dispatch, JobError>> {
        // A chat's next turn reuses the KV cache of its history, for the
        // same account only.
        if !ticket.account.is_empty() {
            use std::hash::BuildHasher;
            request.cache = Some(tessera_core::PrefixCache {
                key: self.keys.hash_one(&ticket.account),
                tag: ticket.id.clone(),
            });
        }
        let result = self.handle.submit(request).map(|events| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(forward(events, tx));
            Dispatch {
                events: rx,
                provider: PROVIDER.into(),
                price: self.price,
                receipts_required: false,
                wrap_up: None,
            }
        });
        Box::pin(std::future::ready(result.map_err(JobError::from)))
    }

    fn health(&self) -> Health {
        Health::Local {
            active: self.handle.active(),
            waiting: self.handle.waiting(),
            slots: self.handle.max_sequences(),
        }
    }
}
