//! User pages: create, view, edit, issue a connection ticket (QR, URI,
//! JSON), lock down and lift (with a confirmation step); and the site-wide
//! lockdown. Every form carries the session's CSRF token.

use std::sync::Arc;

use axum::{
    Form,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use chipsite_proto::admin::v1 as ad;
use chipsite_ticket::render::PublishedTicket;
use serde::Deserialize;

use crate::{Console, checked, pages};

type App = State<Arc<Console>>;

/// A refused call, as a page with the site's message (already free of secrets).
fn failed(status: &tonic::Status) -> Response {
    let code = match status.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument | tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, pages::message("Not done", status.message())).into_response()
}

/// Whether the whole site is locked down (shown on every page).
async fn site_locked(c: &Console) -> bool {
    c.admin()
        .get_lockdown(ad::GetLockdownRequest::default())
        .await
        .is_ok_and(|l| l.into_inner().site_locked)
}

#[derive(Deserialize)]
pub(crate) struct CreateForm {
    #[serde(default)]
    csrf: String,
    chip_id: String,
    name: String,
    #[serde(default)]
    email: String,
}

pub(crate) async fn create(State(c): App, headers: HeaderMap, Form(f): Form<CreateForm>) -> Response {
    if let Err(r) = checked(&c, &headers, Some(&f.csrf)) {
        return r.into_response();
    }
    match c
        .admin()
        .create_user(ad::CreateUserRequest {
            chip_id: f.chip_id.trim().to_owned(),
            name: f.name,
            address: String::new(),
            contact: Some(ad::Contact {
                email: f.email,
                phone: String::new(),
            }),
        })
        .await
    {
        Ok(u) => Redirect::to(&format!("/users/{}", u.into_inner().chip_id)).into_response(),
        Err(s) => failed(&s),
    }
}

pub(crate) async fn show(State(c): App, headers: HeaderMap, Path(chip_id): Path<String>) -> Response {
    let op = match checked(&c, &headers, None) {
        Ok(op) => op,
        Err(r) => return r.into_response(),
    };
    match c.admin().get_user(ad::GetUserRequest { chip_id }).await {
        Ok(u) => pages::user(&op, &u.into_inner(), site_locked(&c).await, None).into_response(),
        Err(s) => failed(&s),
    }
}

#[derive(Deserialize)]
pub(crate) struct EditForm {
    #[serde(default)]
    csrf: String,
    name: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    phone: String,
    status: String,
}

pub(crate) async fn edit(
    State(c): App,
    headers: HeaderMap,
    Path(chip_id): Path<String>,
    Form(f): Form<EditForm>,
) -> Response {
    if let Err(r) = checked(&c, &headers, Some(&f.csrf)) {
        return r.into_response();
    }
    match c
        .admin()
        .update_user(ad::UpdateUserRequest {
            chip_id: chip_id.clone(),
            name: Some(f.name),
            address: Some(f.address),
            email: Some(f.email),
            phone: Some(f.phone),
            status: Some(f.status),
        })
        .await
    {
        Ok(_) => Redirect::to(&format!("/users/{chip_id}")).into_response(),
        Err(s) => failed(&s),
    }
}

pub(crate) async fn ticket(
    State(c): App,
    headers: HeaderMap,
    Path(chip_id): Path<String>,
    Form(f): Form<crate::CsrfForm>,
) -> Response {
    let op = match checked(&c, &headers, Some(&f.csrf)) {
        Ok(op) => op,
        Err(r) => return r.into_response(),
    };
    let mut admin = c.admin();
    let issued = match admin
        .issue_user_ticket(ad::IssueUserTicketRequest {
            chip_id: chip_id.clone(),
            ttl_seconds: 0,
        })
        .await
    {
        Ok(t) => t.into_inner(),
        Err(s) => return failed(&s),
    };
    let user = match admin.get_user(ad::GetUserRequest { chip_id }).await {
        Ok(u) => u.into_inner(),
        Err(s) => return failed(&s),
    };
    let qr = PublishedTicket::from_uri(&issued.uri)
        .ok()
        .and_then(|t| t.qr_svg())
        .map(|svg| format!("data:image/svg+xml;base64,{}", STANDARD.encode(svg)));
    let shown = pages::IssuedTicket {
        uri: &issued.uri,
        json: &issued.json,
        qr: qr.as_deref(),
        expires_at_ms: issued.expires_at_ms,
    };
    pages::user(&op, &user, site_locked(&c).await, Some(shown)).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LockQuery {
    locked: bool,
}

/// The confirmation step of a lockdown change (`chip_id` empty: the site).
pub(crate) async fn confirm_lockdown(
    State(c): App,
    headers: HeaderMap,
    chip_id: Option<Path<String>>,
    Query(q): Query<LockQuery>,
) -> Response {
    let op = match checked(&c, &headers, None) {
        Ok(op) => op,
        Err(r) => return r.into_response(),
    };
    let chip_id = chip_id.map(|Path(c)| c).unwrap_or_default();
    pages::confirm_lockdown(&op, &chip_id, q.locked).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LockForm {
    #[serde(default)]
    csrf: String,
    locked: bool,
}

pub(crate) async fn set_lockdown(
    State(c): App,
    headers: HeaderMap,
    chip_id: Option<Path<String>>,
    Form(f): Form<LockForm>,
) -> Response {
    if let Err(r) = checked(&c, &headers, Some(&f.csrf)) {
        return r.into_response();
    }
    let chip_id = chip_id.map(|Path(c)| c).unwrap_or_default();
    match c
        .admin()
        .set_lockdown(ad::SetLockdownRequest {
            chip_id: chip_id.clone(),
            locked: f.locked,
        })
        .await
    {
        Ok(_) if chip_id.is_empty() => Redirect::to("/").into_response(),
        Ok(_) => Redirect::to(&format!("/users/{chip_id}")).into_response(),
        Err(s) => failed(&s),
    }
}
