//! The pages. maud escapes every value it prints, so a user name of
//! `<script>` shows as text. No page ever holds a pass phrase: pass-phrase
//! inputs are `type=password` and never filled in.

use axum::{http::header, response::IntoResponse};
use chipsite_proto::admin::v1 as ad;
use maud::{DOCTYPE, Markup, html};

use crate::Chrome;

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1b1b1b;background:#f6f7f9}\
header{background:#12324a;color:#fff;padding:.6rem 1.5rem;display:flex;gap:1rem;align-items:center;flex-wrap:wrap}\
header h1{font-size:1.1rem;margin:0 1rem 0 0}header nav{display:flex;gap:.9rem;flex:1;flex-wrap:wrap}\
header a{color:#fff}header form{margin:0}.badge{padding:.15rem .5rem;border-radius:4px;font-size:.85rem;font-weight:600}\
.ok{background:#1e7d32;color:#fff}.warn{background:#b00020;color:#fff}\
main{padding:1.5rem;max-width:72rem}\
.banner{background:#b00020;color:#fff;padding:.6rem 1.5rem;font-weight:600}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.4rem .6rem;border-bottom:1px solid #dde;vertical-align:top}\
.card{background:#fff;border:1px solid #dde;border-radius:6px;padding:1rem;margin-bottom:1rem}\
.error{color:#b00020}.done{color:#1e7d32}button,input,select{font:inherit;padding:.3rem .6rem}\
code{word-break:break-all}.qr{display:block;image-rendering:pixelated;background:#fff;padding:8px}\
.row{display:flex;gap:1rem;flex-wrap:wrap}.row>.card{flex:1;min-width:18rem}\
.caution{border-left:4px solid #b26a00;background:#fff6e5;padding:.4rem .6rem}td.origin,td.when{white-space:nowrap}";

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css")], CSS)
}

pub(crate) const SITE_LOCKED: &str = "The whole site is LOCKED DOWN: no app can connect.";

/// The header of a signed-in page: where to go, the site key at a glance,
/// sign out.
fn nav(chrome: &Chrome) -> Markup {
    html! {
        nav {
            a href="/" { "Users" }
            a href="/tickets" { "Tickets" }
            a href="/key" { "Site key" }
            a href="/peer" { "Peer server" }
            a href="/config" { "Config" }
            a href="/audit" { "Audit" }
            a href="/health" { "Health" }
        }
        @match &chrome.vault {
            Some(v) if !v.has_key => span.badge.warn { "no site key" },
            Some(v) if v.sealed => span.badge.warn { "site key SEALED" },
            Some(_) => span.badge.ok { "site key unsealed" },
            None => span.badge.warn { "admin not answering" },
        }
        form method="post" action="/signout" {
            input type="hidden" name="csrf" value=(chrome.csrf);
            button type="submit" { "Sign out" }
        }
    }
}

fn layout(title: &str, banner: Option<&str>, header_extra: Markup, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — chipsite console" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header { h1 { "chipsite console" } (header_extra) }
                @if let Some(b) = banner { div.banner role="alert" { (b) } }
                main { (body) }
            }
        }
    }
}

/// A signed-in page: the header, the lockdown banner when the site is
/// locked down, and an optional notice (a result or an error).
pub(crate) fn page(chrome: &Chrome, title: &str, notice: Option<&Notice>, body: Markup) -> Markup {
    layout(
        title,
        chrome.site_locked.then_some(SITE_LOCKED),
        nav(chrome),
        html! {
            @if let Some(n) = notice {
                @match n {
                    Notice::Done(t) => div.card { p.done role="status" { (t) } },
                    Notice::Error(t) => div.card { p.error role="alert" { (t) } },
                }
            }
            (body)
        },
    )
}

/// A line above a page's content.
pub(crate) enum Notice {
    Done(String),
    Error(String),
}

/// `cert`: the internal identity of the client certificate of this
/// connection (the HTTPS port only).
pub fn signin(token: &str, cert: Option<&str>, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {},
        html! {
            div.card {
                h2 { "Sign in" }
                @if let Some(e) = error { p.error { (e) } }
                p { "Sign in with a one-time console link: " code { "chipsctl console link" } "." }
                form method="post" action="/signin" {
                    @if token.is_empty() {
                        label { "Link or token " input name="t" type="text" autocomplete="off" required; }
                    } @else {
                        input name="t" type="hidden" value=(token);
                    }
                    " "
                    button type="submit" { "Sign in" }
                }
                @match cert {
                    Some(chipsite_tls::identity::ADMIN_CLIENT) => {
                        h3 { "Or with your certificate" }
                        form method="post" action="/signin/certificate" {
                            button type="submit" { "Sign in with the admin client certificate" }
                        }
                    }
                    Some(other) => p { "This connection's certificate (" code { (other) } ") does not open the console." },
                    None => {}
                }
            }
        },
    )
}

/// What the users page shows: the list, how it was asked for, and the
/// "New user" form (filled in again when it was refused).
pub(crate) struct UsersView<'a> {
    pub list: &'a ad::ListUsersResponse,
    pub query: &'a crate::HomeQuery,
    pub new_user: NewUser,
    pub notice: Option<Notice>,
}

/// What was typed into the "New user" form.
#[derive(Default)]
pub(crate) struct NewUser {
    pub chip_id: String,
    pub name: String,
    pub email: String,
}

/// The users page's address with `sort` and `after`, keeping the search
/// and the filters.
fn users_href(q: &crate::HomeQuery, sort: &str, after: &str) -> String {
    let mut href = format!(
        "/?q={}&status={}&lock={}&sort={}",
        urlencode(&q.q),
        urlencode(&q.status),
        urlencode(&q.lock),
        urlencode(sort)
    );
    if !after.is_empty() {
        href.push_str("&after=");
        href.push_str(&urlencode(after));
    }
    href
}

/// A column heading that sorts by `key`: ascending first, then the other
/// way; the current order is marked.
fn sort_heading(q: &crate::HomeQuery, key: &str, label: &str) -> Markup {
    let current = if q.sort.is_empty() {
        "chip_id"
    } else {
        q.sort.as_str()
    };
    let (next, mark, aria) = if current == key {
        (format!("-{key}"), " ▲", "ascending")
    } else if current.strip_prefix('-') == Some(key) {
        (key.to_owned(), " ▼", "descending")
    } else {
        (key.to_owned(), "", "none")
    };
    html! { th aria-sort=(aria) { a href=(users_href(q, &next, "")) { (label) (mark) } } }
}

pub(crate) fn home(chrome: &Chrome, v: &UsersView<'_>) -> Markup {
    let (users, q) = (v.list, v.query);
    let filtered = !q.q.is_empty() || !q.status.is_empty() || !q.lock.is_empty();
    page(
        chrome,
        "Users",
        v.notice.as_ref(),
        html! {
            div.card {
                h2 { "Users" }
                form method="get" action="/" {
                    input name="q" type="search" value=(q.q) placeholder="CHIP ID or name" aria-label="CHIP ID or name";
                    " "
                    label { "Status "
                        select name="status" {
                            option value="" selected[q.status.is_empty()] { "any" }
                            @for s in ["active", "suspended", "closed"] { option value=(s) selected[q.status == s] { (s) } }
                        }
                    } " "
                    label { "Lockdown "
                        select name="lock" {
                            option value="" selected[q.lock.is_empty()] { "any" }
                            option value="locked" selected[q.lock == "locked"] { "locked down" }
                            option value="open" selected[q.lock == "open"] { "open" }
                        }
                    } " "
                    input type="hidden" name="sort" value=(q.sort);
                    button type="submit" { "Show" }
                    @if filtered { " " a href="/" { "Clear" } }
                }
                p #total role="status" {
                    strong { (users.total) } @if users.total == 1 { " user" } @else { " users" }
                    @if filtered { " match" }
                    @if !q.after.is_empty() { " (a later page)" }
                }
                table {
                    thead { tr {
                        (sort_heading(q, "chip_id", "CHIP ID"))
                        (sort_heading(q, "name", "Name"))
                        (sort_heading(q, "status", "Status"))
                        th { "Key" }
                        th { "Lockdown" }
                        (sort_heading(q, "created", "Created"))
                    } }
                    tbody {
                        @for u in &users.users {
                            tr {
                                td { a href={ "/users/" (u.chip_id) } { code { (u.chip_id) } } }
                                td { (u.name) }
                                td { (u.status) }
                                td { @if u.has_key { "enrolled" } @else { "—" } }
                                td { @if u.locked { "LOCKED" } @else { "open" } }
                                td.when { (crate::site::when(u.created_at_ms)) }
                            }
                        }
                    }
                }
                @if users.users.is_empty() { p { "No users match." } }
                p.paging {
                    @if !q.after.is_empty() { a href=(users_href(q, &q.sort, "")) { "First page" } " " }
                    @if !users.next_page_token.is_empty() {
                        a href=(users_href(q, &q.sort, &users.next_page_token)) rel="next" { "Next page" }
                    }
                }
            }
            div.row {
                div.card #new-user {
                    h2 { "New user" }
                    form method="post" action="/users" {
                        input type="hidden" name="csrf" value=(chrome.csrf);
                        p { label { "CHIP ID " input name="chip_id" required value=(v.new_user.chip_id); } }
                        p { label { "Name " input name="name" required value=(v.new_user.name); } }
                        p { label { "E-mail " input name="email" type="email" value=(v.new_user.email); } }
                        button type="submit" { "Create" }
                    }
                }
                div.card #load-user {
                    h2 { "Load a user" }
                    p { "A JSON file from “Download JSON” or " code { "chipsctl user dump" } ". Nothing is written unless all of it is valid." }
                    form method="post" action="/users/load" enctype="multipart/form-data" {
                        input type="hidden" name="csrf" value=(chrome.csrf);
                        p { input name="file" type="file" accept="application/json,.json" required; }
                        button type="submit" { "Load" }
                    }
                }
            }
            div.card {
                strong { "Site lockdown: " }
                @if chrome.site_locked { "LOCKED DOWN " a href="/lockdown?locked=false" { "Lift…" } }
                @else { "open " a href="/lockdown?locked=true" { "Lock down the whole site…" } }
            }
        },
    )
}

/// The query-string form of `s`.
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A refused request on a signed-in page: the navigation stays, the
/// site's reason is shown, and "Back" leads to `back`.
pub(crate) fn refused(chrome: &Chrome, text: &str, back: &str) -> Markup {
    page(
        chrome,
        "Not done",
        Some(&Notice::Error(text.to_owned())),
        html! { div.card { p { a href=(back) { "Back" } } } },
    )
}

/// A page with one message, for a request without a session.
pub fn message(title: &str, text: &str) -> Markup {
    layout(
        title,
        None,
        html! { nav { a href="/" { "Back" } } },
        html! { div.card { h2 { (title) } p.error role="alert" { (text) } } },
    )
}

/// A ticket just issued, to show once.
pub struct IssuedTicket<'a> {
    pub uri: &'a str,
    pub json: &'a str,
    /// A data: URI of the QR code (SVG).
    pub qr: Option<&'a str>,
    pub expires_at_ms: i64,
}

/// What the user page shows.
pub(crate) struct UserView<'a> {
    pub user: &'a ad::User,
    pub ticket: Option<IssuedTicket<'a>>,
    /// Other connection tickets of the user still outstanding.
    pub outstanding: usize,
    pub tallies: &'a Result<Vec<chipsite_proto::tally::v1::Tally>, String>,
    pub alarms: &'a Result<Vec<chipsite_proto::events::v1::Alarm>, String>,
    /// What a form on the page did (or why it was refused).
    pub notice: Option<Notice>,
    /// What was typed into a refused form, to show again.
    pub typed: Typed,
}

/// A refused form's input, shown again in its form.
#[derive(Default)]
pub(crate) struct Typed {
    pub edit: Option<UserEdit>,
    pub alarm: String,
}

/// The "Edit" form's fields.
pub(crate) struct UserEdit {
    pub name: String,
    pub address: String,
    pub email: String,
    pub phone: String,
    pub status: String,
}

pub(crate) fn user(chrome: &Chrome, v: UserView<'_>) -> Markup {
    let (u, tallies, alarms, outstanding) = (v.user, v.tallies, v.alarms, v.outstanding);
    let contact = u.contact.clone().unwrap_or_default();
    // A refused edit comes back first on the page, as it was typed.
    let refused_edit = v.typed.edit.is_some();
    let edit = v.typed.edit.unwrap_or_else(|| UserEdit {
        name: u.name.clone(),
        address: u.address.clone(),
        email: contact.email.clone(),
        phone: contact.phone.clone(),
        status: u.status.clone(),
    });
    let path = format!("/users/{}", u.chip_id);
    let edit_card = html! {
        div.card #edit {
            h2 { "Edit" }
            form method="post" action={ (path) "/edit" } {
                input type="hidden" name="csrf" value=(chrome.csrf);
                p { label { "Name " input name="name" value=(edit.name) required; } }
                p { label { "Address " input name="address" value=(edit.address); } }
                p { label { "E-mail " input name="email" type="email" value=(edit.email); } }
                p { label { "Phone " input name="phone" value=(edit.phone); } }
                p { label { "Status "
                    select name="status" {
                        @for s in ["active", "suspended", "closed"] {
                            option value=(s) selected[s == edit.status] { (s) }
                        }
                    }
                } }
                button type="submit" { "Save" }
            }
        }
    };
    page(
        chrome,
        &u.chip_id,
        v.notice.as_ref(),
        html! {
            div.card {
                h2 { code { (u.chip_id) } " — " (u.name) }
                p {
                    "Status " strong { (u.status) } " · key " strong { @if u.has_key { "enrolled" } @else { "none" } }
                    " · " @if u.locked { strong { "LOCKED DOWN" } " " a href={ (path) "/lockdown?locked=false" } { "Lift…" } }
                    @else { "open " a href={ (path) "/lockdown?locked=true" } { "Lock down…" } }
                }
                p { a href={ "/tickets?chip_id=" (urlencode(&u.chip_id)) } { "Tickets of this user" } }
            }
            @if refused_edit { (edit_card) }
            @if let Some(t) = v.ticket {
                div.card #ticket {
                    h2 { "The new connection ticket" }
                    p { "Show this once; it works once, until " (crate::site::when(t.expires_at_ms)) "." }
                    @if let Some(qr) = t.qr { img.qr src=(qr) alt="ticket QR code" width="384" height="384"; }
                    p { "URI: " code { (t.uri) } }
                    p { "JSON: " code { (t.json) } }
                }
            }
            div.row {
                div.card {
                    h2 { "Issue a connection ticket" }
                    @if outstanding > 0 {
                        p.caution role="note" {
                            "This user already has " (outstanding) " outstanding connection ticket"
                            @if outstanding > 1 { "s" }
                            ": a new one does not revoke "
                            @if outstanding > 1 { "them" } @else { "it" }
                            ". " a href={ "/tickets?chip_id=" (urlencode(&u.chip_id)) } { "See or revoke" }
                        }
                    }
                    form method="post" action={ (path) "/ticket" } {
                        input type="hidden" name="csrf" value=(chrome.csrf);
                        button type="submit" { "Issue a ticket" }
                    }
                }
                div.card {
                    h2 { "Dump" }
                    form method="post" action={ (path) "/dump" } {
                        input type="hidden" name="csrf" value=(chrome.csrf);
                        button type="submit" { "Download JSON" }
                    }
                }
            }
            div.card #tallies {
                h2 { "Tallies" }
                @match tallies {
                    Err(why) => p { "The tally service does not answer: " (why) },
                    Ok(list) if list.is_empty() => p { "No tallies with users on other sites." },
                    Ok(list) => table {
                        thead { tr { th { "Tally" } th { "With" } th { "Role" } th { "State" } th { "Terms" } th { "Steps" } th { "Last step" } th { "Since" } } }
                        tbody {
                            @for t in list {
                                tr {
                                    td { code { (t.id) } }
                                    td { (t.peer_chip_id) br; small { code { (t.peer_site_pin) } } }
                                    td { (t.role) }
                                    td { (t.state) }
                                    td { code { (t.terms) } }
                                    td { (t.steps.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>().join(", ")) }
                                    td { (t.delivery) }
                                    td { (crate::site::when(t.updated_at_ms)) }
                                }
                            }
                        }
                    },
                }
            }
            div.card #alarms {
                h2 { "Alarms" }
                form method="post" action={ (path) "/alarm" } {
                    input type="hidden" name="csrf" value=(chrome.csrf);
                    label { "Raise an alarm " input name="text" required maxlength="1000" size="50" placeholder="Please call the office" value=(v.typed.alarm); }
                    " " button type="submit" { "Raise" }
                }
                p { small { "An open session of the user's app gets it at once; otherwise it goes out once by e-mail or text, if the user and the site have them." } }
                @match alarms {
                    Err(why) => p { "Alarms could not be listed: " (why) },
                    Ok(list) if list.is_empty() => p { "No alarms." },
                    Ok(list) => table {
                        thead { tr { th { "#" } th { "Raised" } th { "Kind" } th { "Reached the user" } th { "Seen" } th { "Text" } } }
                        tbody {
                            @for a in list {
                                tr {
                                    td { (a.id) }
                                    td.when { (crate::site::when(a.created_at_ms)) }
                                    td { (a.kind) }
                                    td { @if a.delivered_by.is_empty() { "not yet" } @else { (a.delivered_by) } }
                                    td.when { @if a.acked_at_ms == 0 { "—" } @else { (crate::site::when(a.acked_at_ms)) } }
                                    td { (a.text) }
                                }
                            }
                        }
                    },
                }
            }
            @if !refused_edit { (edit_card) }
        },
    )
}

/// What a confirmation step asks, and the form it confirms.
pub(crate) struct Ask<'a> {
    pub question: &'a str,
    /// What it does; empty: nothing more to say.
    pub explain: &'a str,
    pub action: &'a str,
    /// Hidden fields the form carries besides the CSRF token.
    pub hidden: &'a [(&'a str, &'a str)],
    pub button: &'a str,
    pub cancel: &'a str,
}

/// A confirmation step before a form that cannot be undone: the question,
/// what it does, and the form (with the CSRF token) or Cancel.
pub(crate) fn confirm(chrome: &Chrome, ask: &Ask<'_>) -> Markup {
    page(
        chrome,
        "Confirm",
        None,
        html! {
            div.card {
                h2 { (ask.question) }
                @if !ask.explain.is_empty() { p { (ask.explain) } }
                form method="post" action=(ask.action) {
                    input type="hidden" name="csrf" value=(chrome.csrf);
                    @for (name, value) in ask.hidden { input type="hidden" name=(name) value=(value); }
                    button type="submit" { (ask.button) }
                    " " a href=(ask.cancel) { "Cancel" }
                }
            }
        },
    )
}

/// Lockdown changes ask first (`chip_id` empty: the whole site).
pub(crate) fn confirm_lockdown(chrome: &Chrome, chip_id: &str, locked: bool) -> Markup {
    let (what, action) = if chip_id.is_empty() {
        ("the whole site".to_owned(), "/lockdown".to_owned())
    } else {
        (format!("user {chip_id}"), format!("/users/{chip_id}/lockdown"))
    };
    let question = if locked {
        format!("Lock down {what}?")
    } else {
        format!("Lift the lockdown of {what}?")
    };
    confirm(
        chrome,
        &Ask {
            question: &question,
            explain: if locked {
                "Open sessions are closed at once and new ones refused until it is lifted."
            } else {
                ""
            },
            action: &action,
            hidden: &[("locked", if locked { "true" } else { "false" })],
            button: if locked { "Lock down" } else { "Lift" },
            cancel: "/",
        },
    )
}
