//! User pages: create, view, edit, dump (a download), load (an upload),
//! issue a connection ticket (QR, URI, JSON), lock down and lift (with a
//! confirmation step); and the site-wide lockdown. Every form carries the
//! session's CSRF token.

use std::sync::Arc;

use axum::{
    Form,
    extract::{Multipart, Path, State, multipart::MultipartRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use chipsite_proto::admin::v1 as ad;
use serde::Deserialize;

use crate::{Console, Refusal, checked, pages};

type App = State<Arc<Console>>;

/// A refused call, as a page with the site's message (already free of secrets).
pub(crate) fn failed(status: &tonic::Status) -> Response {
    use chipsite_proto::status::{ErrorCode as E, code_of};
    let code = match code_of(status) {
        E::NotFound => StatusCode::NOT_FOUND,
        E::InvalidArgument
        | E::AlreadyExists
        | E::FailedPrecondition
        | E::LockedDown
        | E::Sealed
        | E::NoSiteKey => StatusCode::UNPROCESSABLE_ENTITY,
        E::Forbidden | E::Refused | E::WrongPassphrase => StatusCode::FORBIDDEN,
        E::Throttled | E::Unavailable | E::Internal => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, pages::message("Not done", status.message())).into_response()
}

#[derive(Deserialize)]
pub(crate) struct CreateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    chip_id: String,
    #[serde(default)]
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

pub(crate) async fn show(
    State(c): App,
    headers: HeaderMap,
    Path(chip_id): Path<String>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    let mut admin = c.admin();
    let (chrome, user, tallies, outstanding, alarms) = tokio::join!(
        c.chrome(op),
        admin.get_user(ad::GetUserRequest {
            chip_id: chip_id.clone()
        }),
        tallies_of(&c, &chip_id),
        outstanding_tickets(&c, &chip_id),
        alarms_of(&c, &chip_id)
    );
    Ok(match user {
        Ok(u) => pages::user(&chrome, &u.into_inner(), None, outstanding, &tallies, &alarms).into_response(),
        Err(s) => failed(&s),
    })
}

/// The user's dump (the same JSON as `chipsctl user dump`), as a download.
pub(crate) async fn dump(
    State(c): App,
    headers: HeaderMap,
    Path(chip_id): Path<String>,
    Form(f): Form<crate::CsrfForm>,
) -> Result<Response, Refusal> {
    checked(&c, &headers, Some(&f.csrf))?;
    let json = match c
        .admin()
        .dump_user(ad::DumpUserRequest {
            chip_id: chip_id.clone(),
        })
        .await
    {
        Ok(d) => d.into_inner().json,
        Err(s) => return Ok(failed(&s)),
    };
    let mut r = ([(header::CONTENT_TYPE, "application/json")], json).into_response();
    // CHIP IDs are [a-z0-9._-]: safe in a quoted file name.
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{chip_id}.json\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

/// Largest dump file the console takes (a dump is a few hundred bytes).
const MAX_DUMP: usize = 256 * 1024;

/// Load a user from an uploaded dump: admin checks all of it before it
/// writes anything, and its refusal is shown as it is.
pub(crate) async fn load(
    State(c): App,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, Refusal> {
    // No session: refuse before reading the upload.
    if c.operator(&headers).is_none() {
        return Err(Refusal::Forbidden("sign in first"));
    }
    // Not a file upload: it has no CSRF token either.
    let Ok(mut form) = form else {
        return Err(Refusal::Forbidden(
            "the form is stale (CSRF check failed): reload the page",
        ));
    };
    let (mut csrf, mut file, mut file_name) = (String::new(), None::<Vec<u8>>, String::new());
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return Ok((
                    StatusCode::BAD_REQUEST,
                    pages::message("Not loaded", &e.body_text()),
                )
                    .into_response());
            }
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            file_name = field.file_name().unwrap_or_default().to_owned();
        }
        let bytes = match field.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return Ok((
                    StatusCode::BAD_REQUEST,
                    pages::message("Not loaded", &e.body_text()),
                )
                    .into_response());
            }
        };
        match name.as_str() {
            "csrf" => csrf = String::from_utf8_lossy(&bytes).into_owned(),
            "file" => file = Some(bytes.to_vec()),
            _ => {}
        }
    }
    checked(&c, &headers, Some(&csrf))?;
    let refuse = |why: &str| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            pages::message("Not loaded", why),
        )
            .into_response()
    };
    let Some(file) = file.filter(|f| !f.is_empty()) else {
        // A browser sends an empty part with no file name when none was chosen.
        return Ok(refuse(&if file_name.is_empty() {
            "choose a user dump file (JSON) to load".to_owned()
        } else {
            format!("bad user dump: {file_name} is empty; nothing was loaded")
        }));
    };
    if file.len() > MAX_DUMP {
        return Ok(refuse(
            "bad user dump: the file is larger than 256 KiB; nothing was loaded",
        ));
    }
    let Ok(json) = String::from_utf8(file) else {
        return Ok(refuse(
            "bad user dump: the file is not UTF-8 text; nothing was loaded",
        ));
    };
    Ok(match c.admin().load_user(ad::LoadUserRequest { json }).await {
        Ok(u) => Redirect::to(&format!("/users/{}", u.into_inner().chip_id)).into_response(),
        Err(s) => failed(&s),
    })
}

#[derive(Deserialize)]
pub(crate) struct EditForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    phone: String,
    #[serde(default)]
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
    let chrome = c.chrome(op).await;
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
    let (user, tallies, outstanding, alarms) = tokio::join!(
        admin.get_user(ad::GetUserRequest {
            chip_id: chip_id.clone()
        }),
        tallies_of(&c, &chip_id),
        outstanding_tickets(&c, &chip_id),
        alarms_of(&c, &chip_id)
    );
    let user = match user {
        Ok(u) => u.into_inner(),
        Err(s) => return failed(&s),
    };
    let qr = chipsite_model::ticket::qr_svg(&issued.uri)
        .map(|svg| format!("data:image/svg+xml;base64,{}", STANDARD.encode(svg)));
    let shown = pages::IssuedTicket {
        uri: &issued.uri,
        json: &issued.json,
        qr: qr.as_deref(),
        expires_at_ms: issued.expires_at_ms,
    };
    // The one just issued is not "already" outstanding.
    pages::user(
        &chrome,
        &user,
        Some(shown),
        outstanding.saturating_sub(1),
        &tallies,
        &alarms,
    )
    .into_response()
}

/// A user's tallies for the user page, or why they cannot be shown (the
/// page still works when the tally service does not answer).
/// The user's latest alarms, acknowledged ones too.
async fn alarms_of(c: &Console, chip_id: &str) -> Result<Vec<chipsite_proto::events::v1::Alarm>, String> {
    c.events()
        .list_alarms(chipsite_proto::events::v1::ListAlarmsRequest {
            chip_id: chip_id.to_owned(),
            include_acked: true,
            limit: 20,
            count_only: false,
        })
        .await
        .map(|r| r.into_inner().alarms)
        .map_err(|s| s.message().to_owned())
}

#[derive(Deserialize)]
pub(crate) struct AlarmForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    text: String,
}

/// Raise an alarm for the user (kind "notice"), as `chipsctl alarm raise` does.
pub(crate) async fn raise_alarm(
    State(c): App,
    headers: HeaderMap,
    Path(chip_id): Path<String>,
    Form(f): Form<AlarmForm>,
) -> Response {
    if let Err(r) = checked(&c, &headers, Some(&f.csrf)) {
        return r.into_response();
    }
    match c
        .events()
        .raise_alarms(chipsite_proto::events::v1::RaiseAlarmsRequest {
            alarms: vec![chipsite_proto::events::v1::NewAlarm {
                chip_id: chip_id.clone(),
                kind: "notice".into(),
                text: f.text.trim().to_owned(),
            }],
        })
        .await
    {
        Ok(_) => Redirect::to(&format!("/users/{chip_id}#alarms")).into_response(),
        Err(s) => failed(&s),
    }
}

/// How many connection tickets of the user are outstanding (0 if the list
/// cannot be had: the page still works, without the warning).
async fn outstanding_tickets(c: &Console, chip_id: &str) -> usize {
    c.admin()
        .list_tickets(ad::ListTicketsRequest {
            chip_id: chip_id.to_owned(),
            include_closed: false,
        })
        .await
        .map(|r| {
            r.into_inner()
                .tickets
                .iter()
                .filter(|t| t.kind == "user" && t.state == "outstanding")
                .count()
        })
        .unwrap_or(0)
}

async fn tallies_of(c: &Console, chip_id: &str) -> Result<Vec<chipsite_proto::tally::v1::Tally>, String> {
    c.admin()
        .list_tallies(chipsite_proto::tally::v1::ListTalliesRequest {
            chip_id: chip_id.to_owned(),
            limit: 100,
        })
        .await
        .map(|r| r.into_inner().tallies)
        .map_err(|s| s.message().to_owned())
}

#[derive(Deserialize)]
pub(crate) struct LockQuery {
    #[serde(default)]
    locked: bool,
}

/// The confirmation step of a lockdown change (`chip_id` empty: the site).
pub(crate) async fn confirm_lockdown(
    State(c): App,
    headers: HeaderMap,
    chip_id: Option<Path<String>>,
    crate::PageQuery(q): crate::PageQuery<LockQuery>,
) -> Response {
    let op = match checked(&c, &headers, None) {
        Ok(op) => op,
        Err(r) => return r.into_response(),
    };
    let chip_id = chip_id.map(|Path(c)| c).unwrap_or_default();
    pages::confirm_lockdown(&c.chrome(op).await, &chip_id, q.locked).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LockForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
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
