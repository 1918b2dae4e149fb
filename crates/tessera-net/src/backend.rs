//! The network behind the API's `Backend` seam: requests become jobs routed
//! to providers.

use futures::future::BoxFuture;
use serde_json::Value;
use tessera_backend::{
    Backend, Dispatch, Health, JobError, JobTicket, Quote, RoutePrefs, ServedModel,
};
use tessera_core::{AuditStatus, GenerationRequest};

use crate::audit::Origin;
use crate::gateway::Gateway;
use crate::job::RoutedJob;
use crate::router::Need;

/// `Backend` that routes jobs to providers over the network.
pub struct NetworkBackend {
    gateway: Gateway,
}

impl NetworkBackend {
    /// Serve the API from `gateway`'s providers.
    pub fn new(gateway: Gateway) -> Self {
        NetworkBackend { gateway }
    }
}

impl Backend for NetworkBackend {
    fn models(&self) -> Vec<ServedModel> {
        self.gateway
            .models()
            .iter()
            .map(|m| {
                let (providers, context, prices) = self.gateway.directory().serving(&m.sha256);
                let mut m = m.clone();
                m.providers = providers;
                m.prices = prices;
                if context > 0 {
                    m.context_length = context;
                }
                m
            })
            .collect()
    }

    fn quote(&self, model: &ServedModel, route: &RoutePrefs) -> Result<Quote, JobError> {
        self.gateway.directory().quote(&Need {
            sha256: &model.sha256,
            tokens: 0,
            exclude: &[],
            prefs: route,
            probe: false,
            prefix: None,
        })
    }

    fn submit(
        &self,
        model: &ServedModel,
        request: GenerationRequest,
        route: &RoutePrefs,
        ticket: &JobTicket,
    ) -> BoxFuture<'static, Result<Dispatch, JobError>> {
        let job = RoutedJob::new(
            self.gateway.job_setup(&model.sha256),
            model.clone(),
            request,
            route.clone(),
            ticket.clone(),
            Origin::Client,
        );
        Box::pin(job.dispatch())
    }

    fn audits(&self) -> bool {
        self.gateway.audits_any()
    }

    fn audit_status(&self, id: &str) -> AuditStatus {
        self.gateway
            .all_audits()
            .find_map(|a| a.status(id))
            .unwrap_or(AuditStatus::NotAudited)
    }

    fn audit_report(&self, id: &str, account: &str) -> Option<Value> {
        self.gateway
            .all_audits()
            .find_map(|a| a.report(id, account))
    }

    fn health(&self) -> Health {
        Health::Gateway {
            providers: self
                .gateway
                .directory()
                .describe()
                .into_iter()
                .filter_map(|s| serde_json::to_value(s).ok())
                .collect(),
            discovered: self.gateway.discovery().map(|d| d.describe()),
        }
    }
}
