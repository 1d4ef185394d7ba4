//! Admin routes of the proxy (mount them on a loopback listener): `GET /admin/instances`;
//! `POST /admin/drain {"decode": URL}` takes a decode instance out of the rotation and
//! migrates its live requests to the others (by free KV blocks); `POST /admin/undrain
//! {"decode": URL}` puts it back; `POST /admin/add {"pool", "url", "admin"?}` and
//! `POST /admin/remove {"pool", "url"}` change a pool's members.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use splitserve_server::http::with_admin_token;

use std::sync::Arc;

use crate::pool::Instance;
use crate::proxy::error;
use crate::Proxy;

pub fn admin_router(proxy: Proxy) -> Router {
    Router::new()
        .route("/admin/instances", get(instances))
        .route("/admin/drain", post(drain))
        .route("/admin/undrain", post(undrain))
        .route("/admin/add", post(add))
        .route("/admin/remove", post(remove))
        .with_state(proxy)
}

async fn instances(State(p): State<Proxy>) -> Response {
    let list = |i: usize| -> Vec<Value> {
        p.0.pools[i]
            .instances()
            .iter()
            .map(|x| x.describe())
            .collect()
    };
    Json(json!({"prefill": list(0), "decode": list(1)})).into_response()
}

fn bad(code: StatusCode, msg: String) -> Box<Response> {
    Box::new(error(code, "invalid_request_error", msg))
}

/// The pool named in an admin body (`"pool": "prefill" | "decode"`) and the body.
fn pool_of<'a>(
    p: &'a Proxy,
    body: &Bytes,
) -> Result<(&'a crate::pool::Pool, Value), Box<Response>> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    let pool = match v["pool"].as_str() {
        Some("prefill") => &p.0.pools[0],
        Some("decode") => &p.0.pools[1],
        _ => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "give \"pool\": \"prefill\" or \"decode\"".into(),
            ))
        }
    };
    Ok((pool, v))
}

/// `POST /admin/add {"pool", "url", "admin"?}`: a new member of a pool.
async fn add(State(p): State<Proxy>, body: Bytes) -> Response {
    let (pool, v) = match pool_of(&p, &body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let Some(url) = v["url"].as_str() else {
        return *bad(StatusCode::BAD_REQUEST, "give \"url\"".into());
    };
    let admin = v["admin"]
        .as_str()
        .map(|a| a.trim_end_matches('/').to_string());
    match pool.add(url, admin) {
        Ok(()) => {
            tracing::info!(pool = pool.name, url, "instance added");
            Json(json!({"pool": pool.name, "added": url.trim_end_matches('/')})).into_response()
        }
        Err(e) => *bad(StatusCode::CONFLICT, e),
    }
}

/// `POST /admin/remove {"pool", "url"}`: no new requests go to that member; those under
/// way finish.
async fn remove(State(p): State<Proxy>, body: Bytes) -> Response {
    let (pool, v) = match pool_of(&p, &body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let Some(url) = v["url"].as_str() else {
        return *bad(StatusCode::BAD_REQUEST, "give \"url\"".into());
    };
    if pool.instances().len() <= 1 && pool.find(url.trim_end_matches('/')).is_some() {
        return *bad(
            StatusCode::CONFLICT,
            format!("{url} is the {} pool's last instance", pool.name),
        );
    }
    if pool.remove(url) {
        tracing::info!(pool = pool.name, url, "instance removed");
        Json(json!({"pool": pool.name, "removed": url.trim_end_matches('/')})).into_response()
    } else {
        *bad(
            StatusCode::NOT_FOUND,
            format!("{url} is not a member of the {} pool", pool.name),
        )
    }
}

/// The decode instance `url` named in an admin body, or the error response.
fn decode_instance(p: &Proxy, body: &Bytes) -> Result<Arc<Instance>, Box<Response>> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    let url = v["decode"].as_str().ok_or_else(|| {
        bad(
            StatusCode::BAD_REQUEST,
            "give the decode instance as {\"decode\": URL}".into(),
        )
    })?;
    let url = url.trim_end_matches('/');
    let inst = p.decode_pool().find(url).ok_or_else(|| {
        bad(
            StatusCode::NOT_FOUND,
            format!("{url} is not a decode instance of this proxy"),
        )
    })?;
    if inst.admin.is_none() {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "this proxy was started without --decode-admin URLs".into(),
        ));
    }
    Ok(inst)
}

async fn drain(State(p): State<Proxy>, body: Bytes) -> Response {
    let inst = match decode_instance(&p, &body) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let admin = inst.admin.clone().unwrap_or_default();
    let targets: Vec<String> = p
        .decode_pool()
        .instances()
        .iter()
        .filter(|x| x.url != inst.url && x.in_rotation.load(Ordering::Relaxed))
        .filter_map(|x| x.admin.clone())
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
    let r = with_admin_token(p.0.client.post(format!("{admin}/admin/drain")))
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
    let inst = match decode_instance(&p, &body) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let admin = inst.admin.clone().unwrap_or_default();
    let r = with_admin_token(p.0.client.post(format!("{admin}/admin/undrain")))
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
