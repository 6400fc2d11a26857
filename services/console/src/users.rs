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

use crate::{
    Chrome, Console, HomeQuery, Refusal, checked,
    pages::{self, NewUser, Notice, Typed, UserEdit},
};

type App = State<Arc<Console>>;

/// The HTTP status of a refused call, and the notice with the site's
/// message (already free of secrets).
pub(crate) fn refusal(status: &tonic::Status) -> (StatusCode, Notice) {
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
    (code, Notice::Error(status.message().to_owned()))
}

/// A refused call with no form page to go back to: a page with the
/// navigation, the site's message and "Back" to `back`.
pub(crate) fn failed(chrome: &Chrome, status: &tonic::Status, back: &str) -> Response {
    let (code, _) = refusal(status);
    (code, pages::refused(chrome, status.message(), back)).into_response()
}

/// The users page (`/`) for `q`; after a refused form, with its notice and
/// what was typed into "New user".
pub(crate) async fn users_page(
    c: &Console,
    chrome: &Chrome,
    q: &HomeQuery,
    new_user: NewUser,
    notice: Option<(StatusCode, Notice)>,
) -> Response {
    let locked = match q.lock.as_str() {
        "" => None,
        "locked" => Some(true),
        "open" => Some(false),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                pages::refused(chrome, "lock must be locked or open", "/"),
            )
                .into_response();
        }
    };
    let listed = c
        .admin()
        .list_users(ad::ListUsersRequest {
            query: q.q.trim().to_owned(),
            page_size: crate::PAGE_SIZE,
            page_token: q.after.clone(),
            sort: q.sort.clone(),
            status: q.status.clone(),
            locked,
        })
        .await;
    let list = match listed {
        Ok(l) => l.into_inner(),
        Err(s) => return failed(chrome, &s, "/"),
    };
    let (code, notice) = match notice {
        Some((code, n)) => (code, Some(n)),
        None => (StatusCode::OK, None),
    };
    let view = pages::UsersView {
        list: &list,
        query: q,
        new_user,
        notice,
    };
    (code, pages::home(chrome, &view)).into_response()
}

/// The user page; after a form, with its notice and (when refused) what
/// was typed; with the ticket just issued, if any.
async fn user_page(
    c: &Console,
    chrome: &Chrome,
    chip_id: &str,
    ticket: Option<pages::IssuedTicket<'_>>,
    notice: Option<(StatusCode, Notice)>,
    typed: Typed,
) -> Response {
    let mut admin = c.admin();
    let (user, tallies, outstanding, alarms) = tokio::join!(
        admin.get_user(ad::GetUserRequest {
            chip_id: chip_id.to_owned()
        }),
        tallies_of(c, chip_id),
        outstanding_tickets(c, chip_id),
        alarms_of(c, chip_id)
    );
    let user = match user {
        Ok(u) => u.into_inner(),
        Err(s) => return failed(chrome, &s, "/"),
    };
    let (code, notice) = match notice {
        Some((code, n)) => (code, Some(n)),
        None => (StatusCode::OK, None),
    };
    // The one just issued is not "already" outstanding.
    let outstanding = outstanding.saturating_sub(usize::from(ticket.is_some()));
    let view = pages::UserView {
        user: &user,
        ticket,
        outstanding,
        tallies: &tallies,
        alarms: &alarms,
        notice,
        typed,
    };
    (code, pages::user(chrome, view)).into_response()
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
    let op = match checked(&c, &headers, Some(&f.csrf)) {
        Ok(op) => op,
        Err(r) => return r.into_response(),
    };
    let created = c
        .admin()
        .create_user(ad::CreateUserRequest {
            chip_id: f.chip_id.trim().to_owned(),
            name: f.name.clone(),
            address: String::new(),
            contact: Some(ad::Contact {
                email: f.email.clone(),
                phone: String::new(),
            }),
        })
        .await;
    match created {
        Ok(u) => Redirect::to(&format!("/users/{}", u.into_inner().chip_id)).into_response(),
        // The users page again, the form as it was typed.
        Err(s) => {
            let typed = NewUser {
                chip_id: f.chip_id,
                name: f.name,
                email: f.email,
            };
            let chrome = c.chrome(op).await;
            users_page(&c, &chrome, &HomeQuery::default(), typed, Some(refusal(&s))).await
        }
    }
}

pub(crate) async fn show(
    State(c): App,
    headers: HeaderMap,
    Path(chip_id): Path<String>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    let chrome = c.chrome(op).await;
    Ok(user_page(&c, &chrome, &chip_id, None, None, Typed::default()).await)
}

/// The user's dump (the same JSON as `chipsctl user dump`), as a download.
pub(crate) async fn dump(
    State(c): App,
    headers: HeaderMap,
    Path(chip_id): Path<String>,
    Form(f): Form<crate::CsrfForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let json = match c
        .admin()
        .dump_user(ad::DumpUserRequest {
            chip_id: chip_id.clone(),
        })
        .await
    {
        Ok(d) => d.into_inner().json,
        Err(s) => {
            let chrome = c.chrome(op).await;
            let back = format!("/users/{}", pages::urlencode(&chip_id));
            return Ok(failed(&chrome, &s, &back));
        }
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
    let (op, upload) = crate::upload::read(&c, &headers, form).await?;
    // A refused upload: the users page again, with why (a file input
    // cannot be filled in again: the operator chooses the file again).
    let refused = async |code: StatusCode, why: String| {
        let chrome = c.chrome(op.clone()).await;
        let notice = Notice::Error(format!("{why} (choose the file again to retry)"));
        users_page(
            &c,
            &chrome,
            &HomeQuery::default(),
            NewUser::default(),
            Some((code, notice)),
        )
        .await
    };
    let upload = match upload {
        Ok(u) => u,
        Err(why) => return Ok(refused(StatusCode::BAD_REQUEST, why).await),
    };
    let (file, file_name) = (upload.file, upload.file_name);
    let refuse = async |why: &str| refused(StatusCode::UNPROCESSABLE_ENTITY, why.to_owned()).await;
    let Some(file) = file.filter(|f| !f.is_empty()) else {
        // A browser sends an empty part with no file name when none was chosen.
        return Ok(refuse(&if file_name.is_empty() {
            "choose a user dump file (JSON) to load".to_owned()
        } else {
            format!("bad user dump: {file_name} is empty; nothing was loaded")
        })
        .await);
    };
    if file.len() > MAX_DUMP {
        return Ok(refuse("bad user dump: the file is larger than 256 KiB; nothing was loaded").await);
    }
    let Ok(json) = String::from_utf8(file) else {
        return Ok(refuse("bad user dump: the file is not UTF-8 text; nothing was loaded").await);
    };
    Ok(match c.admin().load_user(ad::LoadUserRequest { json }).await {
        Ok(u) => Redirect::to(&format!("/users/{}", u.into_inner().chip_id)).into_response(),
        Err(s) => {
            let (code, _) = refusal(&s);
            refused(code, s.message().to_owned()).await
        }
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
    let op = match checked(&c, &headers, Some(&f.csrf)) {
        Ok(op) => op,
        Err(r) => return r.into_response(),
    };
    let updated = c
        .admin()
        .update_user(ad::UpdateUserRequest {
            chip_id: chip_id.clone(),
            name: Some(f.name.clone()),
            address: Some(f.address.clone()),
            email: Some(f.email.clone()),
            phone: Some(f.phone.clone()),
            status: Some(f.status.clone()),
        })
        .await;
    match updated {
        Ok(_) => Redirect::to(&format!("/users/{chip_id}")).into_response(),
        // The user page again, the form as it was typed.
        Err(s) => {
            let typed = Typed {
                edit: Some(UserEdit {
                    name: f.name,
                    address: f.address,
                    email: f.email,
                    phone: f.phone,
                    status: f.status,
                }),
                ..Typed::default()
            };
            let chrome = c.chrome(op).await;
            user_page(&c, &chrome, &chip_id, None, Some(refusal(&s)), typed).await
        }
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
    let issued = match c
        .admin()
        .issue_user_ticket(ad::IssueUserTicketRequest {
            chip_id: chip_id.clone(),
            ttl_seconds: 0,
        })
        .await
    {
        Ok(t) => t.into_inner(),
        Err(s) => return user_page(&c, &chrome, &chip_id, None, Some(refusal(&s)), Typed::default()).await,
    };
    let qr = chipsite_model::ticket::qr_svg(&issued.uri)
        .map(|svg| format!("data:image/svg+xml;base64,{}", STANDARD.encode(svg)));
    let shown = pages::IssuedTicket {
        uri: &issued.uri,
        json: &issued.json,
        qr: qr.as_deref(),
        expires_at_ms: issued.expires_at_ms,
    };
    user_page(&c, &chrome, &chip_id, Some(shown), None, Typed::default()).await
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
    let op = match checked(&c, &headers, Some(&f.csrf)) {
        Ok(op) => op,
        Err(r) => return r.into_response(),
    };
    let raised = c
        .events()
        .raise_alarms(chipsite_proto::events::v1::RaiseAlarmsRequest {
            alarms: vec![chipsite_proto::events::v1::NewAlarm {
                chip_id: chip_id.clone(),
                kind: "notice".into(),
                text: f.text.trim().to_owned(),
            }],
        })
        .await;
    match raised {
        Ok(_) => Redirect::to(&format!("/users/{chip_id}#alarms")).into_response(),
        Err(s) => {
            let typed = Typed {
                alarm: f.text,
                ..Typed::default()
            };
            let chrome = c.chrome(op).await;
            user_page(&c, &chrome, &chip_id, None, Some(refusal(&s)), typed).await
        }
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
    let op = match checked(&c, &headers, Some(&f.csrf)) {
        Ok(op) => op,
        Err(r) => return r.into_response(),
    };
    let chip_id = chip_id.map(|Path(c)| c).unwrap_or_default();
    let set = c
        .admin()
        .set_lockdown(ad::SetLockdownRequest {
            chip_id: chip_id.clone(),
            locked: f.locked,
        })
        .await;
    match set {
        Ok(_) if chip_id.is_empty() => Redirect::to("/").into_response(),
        Ok(_) => Redirect::to(&format!("/users/{chip_id}")).into_response(),
        Err(s) => {
            let chrome = c.chrome(op).await;
            if chip_id.is_empty() {
                users_page(
                    &c,
                    &chrome,
                    &HomeQuery::default(),
                    NewUser::default(),
                    Some(refusal(&s)),
                )
                .await
            } else {
                user_page(&c, &chrome, &chip_id, None, Some(refusal(&s)), Typed::default()).await
            }
        }
    }
}
