//! The training routes: federated tasks, authenticated and billed like
//! inference (the escrow is held by the coordinator behind the
//! [`Training`] seam).
//!
//! - `POST /v1/training/tasks`: create a task (JSON, see
//!   `tessera_net::federated::TaskRequest`); answers its status.
//! - `GET /v1/training/tasks`: this account's tasks.
//! - `GET /v1/training/tasks/{id}`: a task's status with every round.
//! - `POST /v1/training/tasks/{id}/cancel`: stop it; the unspent escrow is
//!   refunded.
//! - `GET /v1/training/tasks/{id}/model`: the model now, as safetensors.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use tessera_backend::{Training, TrainingError};

use crate::billing::Caller;
use crate::error::ApiError;
use crate::Api;

fn training(api: &Api) -> Result<&Arc<dyn Training>, ApiError> {
    api.config.training.as_ref().ok_or_else(|| {
        let mut e = ApiError::not_found("/v1/training");
        e.message = "This gateway runs no training tasks.".into();
        e.code = Some("training_not_offered");
        e
    })
}

fn error(e: TrainingError) -> ApiError {
    let message = e.to_string();
    match e {
        TrainingError::Invalid(_) => ApiError::invalid(message, None),
        TrainingError::NotFound(_) => {
            let mut err = ApiError::not_found("/v1/training/tasks");
            err.message = format!("{message}.");
            err.code = Some("task_not_found");
            err
        }
        TrainingError::Insufficient(_) => {
            ApiError::payment_required(message, "insufficient_credits")
        }
        TrainingError::Conflict(_) => {
            let mut err = ApiError::invalid(message, None);
            err.status = StatusCode::CONFLICT;
            err.code = Some("conflict");
            err
        }
        TrainingError::Unavailable(_) => {
            let mut err = ApiError::invalid(message, None);
            err.status = StatusCode::SERVICE_UNAVAILABLE;
            err.kind = "server_error";
            err
        }
    }
}

pub(crate) async fn create(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let t = training(&api)?;
    let body = crate::body(&api, body)?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(format!("The request body is not valid JSON: {e}."), None)
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid("A training task is a JSON object.", None));
    }
    t.create(&caller.account, value)
        .await
        .map(Json)
        .map_err(error)
}

pub(crate) async fn list(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let t = training(&api)?;
    Ok(Json(
        json!({ "object": "list", "data": t.list(&caller.account) }),
    ))
}

pub(crate) async fn status(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    training(&api)?
        .status(&caller.account, &id)
        .map(Json)
        .map_err(error)
}

pub(crate) async fn cancel(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    training(&api)?
        .cancel(&caller.account, &id)
        .await
        .map(Json)
        .map_err(error)
}

pub(crate) async fn model(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = training(&api)?.model(&caller.account, &id).map_err(error)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}.safetensors\""),
            ),
        ],
        bytes,
    )
        .into_response())
}
