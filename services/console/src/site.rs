//! Site pages: tickets (list, revoke), the site key (unseal, seal, create,
//! change the pass phrase), the peer server (start, stop), configuration,
//! the audit log and health. Every form carries the session's CSRF token;
//! a pass phrase is read from a form, passed to admin and dropped: no page,
//! log line or error holds it.

use std::sync::Arc;

use axum::{
    Form,
    extract::{Multipart, Path, State, multipart::MultipartRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use chipsite_proto::admin::v1 as ad;
use maud::{Markup, html};
use serde::Deserialize;
use zeroize::Zeroize;

use crate::{
    Chrome, Console, CsrfForm, Refusal, checked,
    pages::{self, Notice, page, urlencode},
    users::failed,
};

type App = State<Arc<Console>>;

/// A Unix time in milliseconds, as `2026-11-25 19:30:54 UTC`.
pub(crate) fn when(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) {
        Ok(t) => format!(
            "{}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => ms.to_string(),
    }
}

/// What a form did, as the notice of the page it returns to.
fn outcome<T>(r: Result<tonic::Response<T>, tonic::Status>, done: &str) -> Notice {
    match r {
        Ok(_) => Notice::Done(done.to_owned()),
        Err(s) => Notice::Error(s.message().to_owned()),
    }
}

/// A page after a form: 422 when its notice is a refusal.
fn with_notice(chrome: &Chrome, title: &str, notice: Option<Notice>, body: Markup) -> Response {
    let status = match notice {
        Some(Notice::Error(_)) => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::OK,
    };
    (status, page(chrome, title, notice.as_ref(), body)).into_response()
}

// ---- tickets ----

#[derive(Deserialize)]
pub(crate) struct TicketsQuery {
    #[serde(default)]
    chip_id: String,
    #[serde(default)]
    all: bool,
}

pub(crate) async fn tickets(
    State(c): App,
    headers: HeaderMap,
    crate::PageQuery(q): crate::PageQuery<TicketsQuery>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    Ok(tickets_page(&c, c.chrome(op).await, &q, None).await)
}

async fn tickets_page(c: &Console, chrome: Chrome, q: &TicketsQuery, notice: Option<Notice>) -> Response {
    let listed = c
        .admin()
        .list_tickets(ad::ListTicketsRequest {
            chip_id: q.chip_id.trim().to_owned(),
            include_closed: q.all,
        })
        .await;
    let tickets = match listed {
        Ok(t) => t.into_inner().tickets,
        Err(s) => return failed(&chrome, &s, "/tickets"),
    };
    let body = html! {
        div.card {
            h2 { @if q.all { "All tickets" } @else { "Outstanding tickets" } }
            form method="get" action="/tickets" {
                label { "CHIP ID " input name="chip_id" type="search" value=(q.chip_id); } " "
                label { input name="all" type="checkbox" value="true" checked[q.all]; " include used, expired and revoked" } " "
                button type="submit" { "Show" }
            }
            table {
                thead { tr { th { "Ticket" } th { "Kind" } th { "CHIP ID" } th { "Issued" } th { "Expires" } th { "State" } th {} } }
                tbody {
                    @for t in &tickets {
                        tr {
                            td { code { (t.id) } }
                            td { @if t.kind == "console" { "console sign-in" } @else { (t.kind) } }
                            td { @if t.chip_id.is_empty() { "—" } @else { a href={ "/users/" (t.chip_id) } { (t.chip_id) } } }
                            td { (when(t.created_at_ms)) }
                            td { (when(t.expires_at_ms)) }
                            td { (t.state) }
                            td {
                                @if t.state == "outstanding" {
                                    a href={ "/tickets/" (t.id) "/revoke" } { "Revoke…" }
                                }
                            }
                        }
                    }
                }
            }
            @if tickets.is_empty() { p { "No tickets." } }
        }
    };
    with_notice(&chrome, "Tickets", notice, body)
}

/// Revoking asks first (as lockdowns do).
pub(crate) async fn confirm_revoke(
    State(c): App,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    Ok(pages::confirm(
        &c.chrome(op).await,
        &pages::Ask {
            question: &format!("Revoke ticket {id}?"),
            explain: "It can no longer be redeemed; the user needs a new one.",
            action: &format!("/tickets/{id}/revoke"),
            hidden: &[],
            button: "Revoke",
            cancel: "/tickets",
        },
    )
    .into_response())
}

pub(crate) async fn revoke_ticket(
    State(c): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let r = c
        .admin()
        .revoke_ticket(ad::RevokeTicketRequest { id: id.clone() })
        .await;
    let notice = outcome(r, &format!("Ticket {id} revoked."));
    let q = TicketsQuery {
        chip_id: String::new(),
        all: false,
    };
    Ok(tickets_page(&c, c.chrome(op).await, &q, Some(notice)).await)
}

// ---- site key ----

/// Sealing asks first: nothing is signed until the pass phrase is given again.
pub(crate) async fn confirm_seal(State(c): App, headers: HeaderMap) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    Ok(pages::confirm(
        &c.chrome(op).await,
        &pages::Ask {
            question: "Seal the site key?",
            explain: "The site forgets the unsealed key: no enrollment, session certificate, ticket or tally step is signed until someone unseals it with the pass phrase.",
            action: "/key/seal",
            hidden: &[],
            button: "Seal",
            cancel: "/key",
        },
    )
    .into_response())
}

pub(crate) async fn key(State(c): App, headers: HeaderMap) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    Ok(key_page(c.chrome(op).await, None))
}

/// A pass-phrase field: never filled in, never autocompleted into a page.
fn secret(name: &str, label: &str) -> Markup {
    html! { p { label { (label) " " input name=(name) type="password" autocomplete="off" required; } } }
}

fn key_page(chrome: Chrome, notice: Option<Notice>) -> Response {
    let body = html! {
        @match &chrome.vault {
            None => div.card { p.error { "The admin service did not answer; reload the page." } },
            Some(v) => {
                div.card {
                    h2 { "Site key" }
                    p {
                        @if !v.has_key { span.badge.warn { "no site key" } " Create one below." }
                        @else if v.sealed { span.badge.warn { "SEALED" } " Nothing can be signed until it is unsealed." }
                        @else { span.badge.ok { "unsealed" } }
                    }
                    @if v.has_key {
                        p { "Pin (what apps and peers pin): " code { (v.site_key_pin) } }
                        p { "Created " (when(v.key_created_at_ms)) }
                    }
                }
                div.row {
                    @if v.has_key && v.sealed {
                        div.card {
                            h2 { "Unseal" }
                            form method="post" action="/key/unseal" {
                                input type="hidden" name="csrf" value=(chrome.csrf);
                                (secret("passphrase", "Pass phrase"))
                                button type="submit" { "Unseal" }
                            }
                        }
                    }
                    @if v.has_key && !v.sealed {
                        div.card {
                            h2 { "Seal" }
                            p { "Forget the unsealed key until the pass phrase is given again." }
                            p { a href="/key/seal" { "Seal…" } }
                        }
                    }
                    @if v.has_key {
                        div.card {
                            h2 { "Change the pass phrase" }
                            form method="post" action="/key/passphrase" {
                                input type="hidden" name="csrf" value=(chrome.csrf);
                                (secret("old", "Current pass phrase"))
                                (secret("new", "New pass phrase"))
                                (secret("confirm", "New pass phrase again"))
                                button type="submit" { "Change" }
                            }
                        }
                    }
                    @if v.has_key {
                        div.card #export {
                            h2 { "Export" }
                            p { "Download the site key as it is stored: an encrypted PKCS#8 PEM file that only the current pass phrase opens (as " code { "chipsctl key export" } ")." }
                            form method="post" action="/key/export" {
                                input type="hidden" name="csrf" value=(chrome.csrf);
                                (secret("passphrase", "Current pass phrase"))
                                button type="submit" { "Download the encrypted key" }
                            }
                        }
                    }
                    div.card #import {
                        h2 { "Import" }
                        p { "Replace the site key with an encrypted PKCS#8 PEM file (an export, or one made with openssl). The key keeps the file's pass phrase." }
                        @if v.has_key { p.error { "The pin changes unless the file holds the same key: every app and peer must be told of it." } }
                        form method="post" action="/key/import" enctype="multipart/form-data" {
                            input type="hidden" name="csrf" value=(chrome.csrf);
                            p { label { "Key file " input name="file" type="file" accept=".pem,.key,application/x-pem-file" required; } }
                            (secret("passphrase", "The file's pass phrase"))
                            @if v.has_key { (secret("old", "Current pass phrase")) }
                            button type="submit" { "Import" }
                        }
                    }
                    div.card {
                        h2 { @if v.has_key { "Create a new site key" } @else { "Create the site key" } }
                        @if v.has_key { p.error { "A new site key changes the pin: every app and peer must be told of it." } }
                        form method="post" action="/key/create" {
                            input type="hidden" name="csrf" value=(chrome.csrf);
                            @if v.has_key { (secret("old", "Current pass phrase")) }
                            (secret("new", "Pass phrase"))
                            (secret("confirm", "Pass phrase again"))
                            button type="submit" { "Create" }
                        }
                    }
                }
            }
        }
    };
    with_notice(&chrome, "Site key", notice, body)
}

/// A form with pass phrases; they are wiped when it is dropped.
#[derive(Deserialize)]
pub(crate) struct SecretForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    passphrase: String,
    #[serde(default)]
    old: String,
    #[serde(default)]
    new: String,
    #[serde(default)]
    confirm: String,
}

impl Drop for SecretForm {
    fn drop(&mut self) {
        self.passphrase.zeroize();
        self.old.zeroize();
        self.new.zeroize();
        self.confirm.zeroize();
    }
}

impl SecretForm {
    /// The new pass phrase, if it was typed the same twice.
    pub(crate) fn confirmed(&self) -> Result<String, Notice> {
        if self.new.is_empty() {
            return Err(Notice::Error("type a pass phrase".into()));
        }
        if self.new != self.confirm {
            return Err(Notice::Error(
                "the two new pass phrases differ; nothing was changed".into(),
            ));
        }
        Ok(self.new.clone())
    }
}

pub(crate) async fn unseal(
    State(c): App,
    headers: HeaderMap,
    Form(f): Form<SecretForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let r = c
        .admin()
        .unseal_vault(ad::UnsealVaultRequest {
            passphrase: f.passphrase.clone(),
        })
        .await;
    let notice = outcome(r, "The site key is unsealed.");
    Ok(key_page(c.chrome(op).await, Some(notice)))
}

pub(crate) async fn seal(
    State(c): App,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let r = c.admin().seal_vault(ad::SealVaultRequest {}).await;
    let notice = outcome(r, "The site key is sealed.");
    Ok(key_page(c.chrome(op).await, Some(notice)))
}

pub(crate) async fn create_key(
    State(c): App,
    headers: HeaderMap,
    Form(f): Form<SecretForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let notice = match f.confirmed() {
        Ok(passphrase) => {
            let r = c
                .admin()
                .create_site_key(ad::CreateSiteKeyRequest {
                    passphrase,
                    current_passphrase: f.old.clone(),
                })
                .await;
            outcome(r, "A new site key was created; it is unsealed.")
        }
        Err(n) => n,
    };
    Ok(key_page(c.chrome(op).await, Some(notice)))
}

pub(crate) async fn change_passphrase(
    State(c): App,
    headers: HeaderMap,
    Form(f): Form<SecretForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let notice = match f.confirmed() {
        Ok(new_passphrase) => {
            let r = c
                .admin()
                .change_passphrase(ad::ChangePassphraseRequest {
                    old_passphrase: f.old.clone(),
                    new_passphrase,
                })
                .await;
            outcome(r, "The pass phrase was changed.")
        }
        Err(n) => n,
    };
    Ok(key_page(c.chrome(op).await, Some(notice)))
}

/// The site key as stored (encrypted under the current pass phrase), as a
/// download; a refusal shows the key page with why.
pub(crate) async fn export_key(
    State(c): App,
    headers: HeaderMap,
    Form(f): Form<SecretForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let r = c
        .admin()
        .export_site_key(ad::ExportSiteKeyRequest {
            passphrase: f.passphrase.clone(),
        })
        .await;
    Ok(match r {
        Ok(pem) => (
            [
                (header::CONTENT_TYPE, "application/x-pem-file"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"chipsite-site-key.pem\"",
                ),
            ],
            pem.into_inner().encrypted_pem,
        )
            .into_response(),
        Err(s) => key_page(c.chrome(op).await, Some(Notice::Error(s.message().to_owned()))),
    })
}

/// Largest key file the console takes (an encrypted P-256 key is under 1 KiB).
const MAX_KEY_FILE: usize = 64 * 1024;

/// Replace the site key with an uploaded encrypted PEM file: its pass
/// phrase, and the current one when there is a key. The pass phrases are
/// wiped once sent; the page says what happened.
pub(crate) async fn import_key(
    State(c): App,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, Refusal> {
    let (op, upload) = crate::upload::read(&c, &headers, form).await?;
    let refused = |why: String| Notice::Error(format!("{why}; the site key was not changed"));
    let notice = match upload {
        Err(why) => refused(why),
        Ok(u) if u.file.as_ref().is_some_and(|f| f.len() > MAX_KEY_FILE) => {
            refused("the key file is larger than 64 KiB: it is not a key".into())
        }
        Ok(u) => match u
            .file
            .as_deref()
            .map(String::from_utf8_lossy)
            .filter(|pem| !pem.trim().is_empty())
        {
            None => refused("choose an encrypted key file (PEM); an empty file holds no key".into()),
            Some(pem) => {
                let r = c
                    .admin()
                    .import_site_key(ad::ImportSiteKeyRequest {
                        encrypted_pem: pem.into_owned(),
                        passphrase: u.field("passphrase").to_owned(),
                        current_passphrase: u.field("old").to_owned(),
                    })
                    .await;
                match r {
                    Ok(v) => {
                        let v = v.into_inner();
                        Notice::Done(format!(
                            "The site key was imported; it is {}. Its pin: {}",
                            if v.sealed { "sealed" } else { "unsealed" },
                            v.site_key_pin
                        ))
                    }
                    Err(s) => Notice::Error(s.message().to_owned()),
                }
            }
        },
    };
    Ok(key_page(c.chrome(op).await, Some(notice)))
}

// ---- peer server ----

pub(crate) async fn peer(State(c): App, headers: HeaderMap) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    Ok(peer_page(&c, c.chrome(op).await, None).await)
}

async fn peer_page(c: &Console, chrome: Chrome, notice: Option<Notice>) -> Response {
    let state = match c.admin().get_peer_server(ad::GetPeerServerRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(s) => return failed(&chrome, &s, "/"),
    };
    let running = state.desired == "running";
    // The peer gateway may be down: the page still starts and stops the
    // peer server (admin's desired state), and says why it lists no peers.
    let (peers, unlisted) = match c
        .admin()
        .list_peers(chipsite_proto::peer::v1::ListPeersRequest {})
        .await
    {
        Ok(p) => (p.into_inner().sites, None),
        Err(s) => (vec![], Some(s.message().to_owned())),
    };
    let body = html! {
        div.card {
            h2 { "Peer server" }
            p {
                @if running { span.badge.ok { "running" } } @else { span.badge.warn { "stopped" } }
                @if state.changed_at_ms > 0 { " since " (when(state.changed_at_ms)) }
            }
            p { "The peer server is what other sites connect to for tallies and lifts. Starting it needs the site key's pass phrase." }
            @if running {
                form method="post" action="/peer/stop" {
                    input type="hidden" name="csrf" value=(chrome.csrf);
                    button type="submit" { "Stop" }
                }
            } @else {
                form method="post" action="/peer/start" {
                    input type="hidden" name="csrf" value=(chrome.csrf);
                    (secret("passphrase", "Pass phrase"))
                    button type="submit" { "Start" }
                }
            }
        }
        div.card {
            h2 { "Peer sites" }
            @if let Some(why) = &unlisted {
                p { span.badge.warn { "unavailable" } " The peer gateway did not answer: " (why) }
            } @else if peers.is_empty() {
                p { "No peer sites yet: a user redeems another site's tally ticket, or another site redeems one of ours." }
            } @else {
                table {
                    thead { tr { th { "Site" } th { "Key pin" } th { "Last contact" } th { "Sessions (out / in)" } th { "Outbox" } th { "Links (ours ↔ theirs)" } } }
                    tbody {
                        @for site in &peers {
                            tr {
                                td { code { (site.host) ":" (site.port) } }
                                td { code { (site.site_pin) } }
                                td {
                                    @if site.last_contact_ms == 0 { "none since the peer gateway started" }
                                    @else { (when(site.last_contact_ms)) " — " (site.last_outcome) }
                                }
                                td { (site.sessions_out) " / " (site.sessions_in) }
                                td { (site.outbox_depth) }
                                td {
                                    @for l in &site.links {
                                        a href={ "/users/" (l.chip_id) } { (l.chip_id) } " ↔ " (l.peer_chip_id) " (" (l.via) ")" br;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    with_notice(&chrome, "Peer server", notice, body)
}

pub(crate) async fn start_peer(
    State(c): App,
    headers: HeaderMap,
    Form(f): Form<SecretForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let r = c
        .admin()
        .start_peer_server(ad::StartPeerServerRequest {
            passphrase: f.passphrase.clone(),
        })
        .await;
    let notice = outcome(r, "The peer server is starting.");
    Ok(peer_page(&c, c.chrome(op).await, Some(notice)).await)
}

pub(crate) async fn stop_peer(
    State(c): App,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let r = c.admin().stop_peer_server(ad::StopPeerServerRequest {}).await;
    let notice = outcome(r, "The peer server is stopping.");
    Ok(peer_page(&c, c.chrome(op).await, Some(notice)).await)
}

// ---- configuration ----

pub(crate) async fn config(State(c): App, headers: HeaderMap) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    Ok(config_page(&c, c.chrome(op).await, None, None).await)
}

/// The configuration page; after a refused change, its row shows the
/// value as it was typed (`typed`: key and value).
async fn config_page(
    c: &Console,
    chrome: Chrome,
    notice: Option<Notice>,
    typed: Option<(&str, &str)>,
) -> Response {
    let (values, changed) = match c.admin().get_site_config(ad::GetSiteConfigRequest {}).await {
        Ok(v) => {
            let v = v.into_inner();
            let mut values: Vec<(String, String)> = v.values.into_iter().collect();
            values.sort();
            (values, v.changed)
        }
        Err(s) => return failed(&chrome, &s, "/"),
    };
    let shown = |k: &str, v: &str| match typed {
        Some((key, value)) if key == k => value.to_owned(),
        _ => v.to_owned(),
    };
    let body = html! {
        div.card {
            h2 { "Site configuration" }
            p { "Defaults for the whole site. Every value is checked before anything is saved; “Reset” goes back to the built-in default. A password or token inside a value is shown as ****: saving it as shown keeps it." }
            table {
                thead { tr { th { "Key" } th { "Set" } th { "Value" } th {} } }
                tbody {
                    @for (k, v) in &values {
                        tr {
                            td { code { (k) } }
                            td.origin {
                                @if changed.contains(k) { strong { "changed" } } @else { "default" }
                            }
                            td {
                                form method="post" action="/config" {
                                    input type="hidden" name="csrf" value=(chrome.csrf);
                                    input type="hidden" name="key" value=(k);
                                    input name="value" value=(shown(k, v)) aria-label=(k) size="40";
                                    " " button type="submit" { "Save" }
                                }
                            }
                            td {
                                form method="post" action="/config" {
                                    input type="hidden" name="csrf" value=(chrome.csrf);
                                    input type="hidden" name="key" value=(k);
                                    input type="hidden" name="reset" value="true";
                                    button type="submit" { "Reset" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    with_notice(&chrome, "Configuration", notice, body)
}

#[derive(Deserialize)]
pub(crate) struct ConfigForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    reset: bool,
}

pub(crate) async fn set_config(
    State(c): App,
    headers: HeaderMap,
    Form(f): Form<ConfigForm>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, Some(&f.csrf))?;
    let req = if f.reset {
        ad::UpdateSiteConfigRequest {
            set: Default::default(),
            reset: vec![f.key.clone()],
        }
    } else {
        ad::UpdateSiteConfigRequest {
            set: [(f.key.clone(), f.value.trim().to_owned())].into(),
            reset: vec![],
        }
    };
    let r = c.admin().update_site_config(req).await;
    let done = if f.reset {
        format!("{} is back to its default.", f.key)
    } else {
        format!("{} saved.", f.key)
    };
    let notice = outcome(r, &done);
    let typed = matches!(notice, Notice::Error(_)).then_some((f.key.as_str(), f.value.as_str()));
    Ok(config_page(&c, c.chrome(op).await, Some(notice), typed).await)
}

// ---- audit ----

#[derive(Deserialize)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    source: String,
    #[serde(default)]
    q: String,
    /// Entries per page.
    #[serde(default)]
    limit: Option<u32>,
    /// The previous page's next_page_token: older entries.
    #[serde(default)]
    after: String,
}

pub(crate) async fn audit(
    State(c): App,
    headers: HeaderMap,
    crate::PageQuery(q): crate::PageQuery<AuditQuery>,
) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let source = match q.source.as_str() {
        "admin" | "ticket" => q.source.clone(),
        _ => String::new(),
    };
    let mut admin = c.admin();
    let (chrome, listed) = tokio::join!(
        c.chrome(op),
        admin.list_audit(ad::ListAuditRequest {
            limit,
            source: source.clone(),
            contains: q.q.trim().to_owned(),
            page_token: q.after.clone(),
        })
    );
    let (entries, next) = match listed {
        Ok(l) => {
            let l = l.into_inner();
            (l.entries, l.next_page_token)
        }
        Err(s) => return Ok(failed(&chrome, &s, "/audit")),
    };
    let here = format!(
        "/audit?source={}&q={}&limit={limit}",
        urlencode(&source),
        urlencode(&q.q)
    );
    let body = html! {
        div.card {
            h2 { "Audit log" }
            p { "Every admin action and every ticket attempt, newest first." }
            form method="get" action="/audit" {
                label { "Source "
                    select name="source" {
                        option value="" selected[source.is_empty()] { "all" }
                        option value="admin" selected[source == "admin"] { "admin actions" }
                        option value="ticket" selected[source == "ticket"] { "ticket attempts" }
                    }
                } " "
                label { "Containing " input name="q" type="search" value=(q.q) placeholder="user, action, outcome, address"; } " "
                label { "Per page " input name="limit" type="number" min="1" max="1000" value=(limit); } " "
                button type="submit" { "Filter" }
            }
            table {
                thead { tr { th { "When" } th { "Source" } th { "Who" } th { "Action" } th { "Subject" } th { "Outcome" } } }
                tbody {
                    @for e in &entries {
                        tr {
                            td.when { (when(e.at_ms)) }
                            td { (e.source) }
                            td { (e.actor) }
                            td { (e.action) }
                            td { code { (e.subject) } }
                            td title=(e.outcome) { (chipsite_model::audit::outcome_words(&e.outcome)) }
                        }
                    }
                }
            }
            @if entries.is_empty() { p { "Nothing matches." } }
            p.paging {
                @if !q.after.is_empty() { a href=(here) { "Newest" } " " }
                @if !next.is_empty() { a href={ (here) "&after=" (urlencode(&next)) } rel="next" { "Older entries" } }
            }
        }
    };
    Ok(page(&chrome, "Audit", None, body).into_response())
}

// ---- health ----

pub(crate) async fn health(State(c): App, headers: HeaderMap) -> Result<Response, Refusal> {
    let op = checked(&c, &headers, None)?;
    let (chrome, services) = tokio::join!(c.chrome(op), c.health());
    let body = html! {
        div.card {
            h2 { "Health" }
            table {
                thead { tr { th { "Service" } th { "Listens on" } th { "State" } } }
                tbody {
                    @for (name, addr, ok, detail) in &services {
                        tr {
                            td { (name) }
                            td { code { (addr) } }
                            td { @if *ok { span.badge.ok { "up" } } @else { span.badge.warn { "DOWN" } } " " (detail) }
                        }
                    }
                }
            }
            @if services.is_empty() { p { "This console was started without a list of services to check." } }
        }
    };
    Ok(page(&chrome, "Health", None, body).into_response())
}
