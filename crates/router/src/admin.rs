//! Admin routes of the proxy (mount them on a loopback listener): `GET /admin/instances`;
//! `POST /admin/drain {"decode": URL}` takes a decode instance out of the rotation and
//! migrates its live requests to the others (by free KV blocks); `POST /admin/undrain
//! {"decode": URL}` puts it back.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::proxy::error;
use crate::Proxy;

pub fn admin_router(proxy: Proxy) -> Router {
    Router::new()
        .route("/admin/instances", get(instances))
        .route("/admin/drain", post(drain))
        .route("/admin/undrain", post(undrain))
        .with_state(proxy)
}

async fn instances(State(p): State<Proxy>) -> Response {
    let list = |i: usize| -> Vec<Value> {
        p.0.pools[i]
            .instances
            .iter()
            .map(|x| x.describe())
            .collect()
    };
    Json(json!({"prefill": list(0), "decode": list(1)})).into_response()
}

/// The index of decode instance `url` named in an admin body, or the error response.
fn decode_index(p: &Proxy, body: &Bytes) -> Result<usize, Box<Response>> {
    let bad = |code, msg: String| Box::new(error(code, "invalid_request_error", msg));
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    let url = v["decode"].as_str().ok_or_else(|| {
        bad(
            StatusCode::BAD_REQUEST,
            "give the decode instance as {\"decode\": URL}".into(),
        )
    })?;
    let url = url.trim_end_matches('/');
    let pool = p.decode_pool();
    let i = pool
        .instances
        .iter()
        .position(|x| x.url == url)
        .ok_or_else(|| {
            bad(
                StatusCode::NOT_FOUND,
                format!("{url} is not a decode instance of this proxy"),
            )
        })?;
    if pool.instances[i].admin.is_none() {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "this proxy was started without --decode-admin URLs".into(),
        ));
    }
    Ok(i)
}

async fn drain(State(p): State<Proxy>, body: Bytes) -> Response {
    let i = match decode_index(&p, &body) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let pool = p.decode_pool();
    let inst = &pool.instances[i];
    let admin = inst.admin.clone().unwrap_or_default();
    let targets: Vec<String> = pool
        .instances
        .iter()
        .enumerate()
        .filter(|(j, x)| *j != i && x.in_rotation.load(Ordering::Relaxed))
        .filter_map(|(_, x)| x.admin.clone())
        .collect();
    if targets.is_empty() {
        return error(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "no other decode instance in rotation to take its requests",
        );
    }
    // Out of rotation first, so nothing new lands there while its requests move.
    inst.in_rotation.store(false, Ordering::Relaxed);
    let url = &inst.url;
    tracing::info!(decode = %url, targets = ?targets, "draining decode instance");
    let r =
        p.0.client
            .post(format!("{admin}/admin/drain"))
            .json(&json!({ "targets": targets }))
            .timeout(Duration::from_secs(600))
            .send()
            .await;
    match r {
        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
            Ok(mut v) => {
                v["decode"] = json!(url);
                v["in_rotation"] = json!(false);
                Json(v).into_response()
            }
            Err(e) => error(StatusCode::BAD_GATEWAY, "upstream_error", e.to_string()),
        },
        Ok(r) => refused("drain", &admin, r).await,
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("{url} is out of rotation, but its admin endpoint {admin} failed: {e}"),
        ),
    }
}

/// An instance's admin endpoint said no.
async fn refused(what: &str, admin: &str, r: reqwest::Response) -> Response {
    let st = r.status();
    let text = r.text().await.unwrap_or_default();
    error(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        format!("{what} of {admin} failed ({st}): {text}"),
    )
}

async fn undrain(State(p): State<Proxy>, body: Bytes) -> Response {
    let i = match decode_index(&p, &body) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let inst = &p.decode_pool().instances[i];
    let admin = inst.admin.clone().unwrap_or_default();
    let r =
        p.0.client
            .post(format!("{admin}/admin/undrain"))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
    match r {
        Ok(r) if r.status().is_success() => {
            inst.in_rotation.store(true, Ordering::Relaxed);
            Json(json!({"decode": inst.url, "in_rotation": true})).into_response()
        }
        Ok(r) => refused("undrain", &admin, r).await,
        Err(e) => error(StatusCode::BAD_GATEWAY, "upstream_error", format!("{e}")),
    }
}
