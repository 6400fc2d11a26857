//! The pages. maud escapes every value it prints, so a user name of
//! `<script>` shows as text.

use axum::{http::header, response::IntoResponse};
use chipsite_proto::admin::v1 as ad;
use maud::{DOCTYPE, Markup, html};

use crate::Operator;

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1b1b1b;background:#f6f7f9}\
header{background:#12324a;color:#fff;padding:.8rem 1.5rem;display:flex;gap:1rem;align-items:center}\
header h1{font-size:1.1rem;margin:0;flex:1}main{padding:1.5rem;max-width:70rem}\
.banner{background:#b00020;color:#fff;padding:.6rem 1.5rem;font-weight:600}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.4rem .6rem;border-bottom:1px solid #dde}\
.card{background:#fff;border:1px solid #dde;border-radius:6px;padding:1rem;margin-bottom:1rem}\
.error{color:#b00020}button,input{font:inherit;padding:.3rem .6rem}";

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css")], CSS)
}

const SITE_LOCKED: &str = "The whole site is LOCKED DOWN: no app can connect.";

fn signout(op: &Operator) -> Markup {
    html! {
        a href="/" { "Users" }
        form method="post" action="/signout" {
            input type="hidden" name="csrf" value=(op.csrf);
            button type="submit" { "Sign out" }
        }
    }
}

fn page(title: &str, banner: Option<&str>, header_extra: Markup, body: Markup) -> Markup {
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

pub fn signin(token: &str, error: Option<&str>) -> Markup {
    page(
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
            }
        },
    )
}

pub fn home(
    op: &Operator,
    lock: &ad::LockdownState,
    vault: &ad::VaultStatusView,
    users: &ad::ListUsersResponse,
    query: &str,
) -> Markup {
    let banner = lock
        .site_locked
        .then_some("The whole site is LOCKED DOWN: no app can connect.");
    page(
        "Users",
        banner,
        html! {
            form method="post" action="/signout" {
                input type="hidden" name="csrf" value=(op.csrf);
                button type="submit" { "Sign out" }
            }
        },
        html! {
            div.card {
                strong { "Site key: " }
                @if !vault.has_key { "none yet" }
                @else if vault.sealed { "SEALED" }
                @else { "unsealed" }
                " · pin " code { (vault.site_key_pin) }
            }
            div.card {
                h2 { "Users" }
                form method="get" action="/" {
                    input name="q" type="search" value=(query) placeholder="CHIP ID or name";
                    " " button type="submit" { "Search" }
                }
                table {
                    thead { tr { th { "CHIP ID" } th { "Name" } th { "Status" } th { "Key" } th { "Lockdown" } } }
                    tbody {
                        @for u in &users.users {
                            tr {
                                td { a href={ "/users/" (u.chip_id) } { code { (u.chip_id) } } }
                                td { (u.name) }
                                td { (u.status) }
                                td { @if u.has_key { "enrolled" } @else { "—" } }
                                td { @if u.locked { "LOCKED" } @else { "open" } }
                            }
                        }
                    }
                }
                @if users.users.is_empty() { p { "No users match." } }
            }
            div.card {
                h2 { "New user" }
                form method="post" action="/users" {
                    input type="hidden" name="csrf" value=(op.csrf);
                    label { "CHIP ID " input name="chip_id" required; } " "
                    label { "Name " input name="name" required; } " "
                    label { "E-mail " input name="email" type="email"; } " "
                    button type="submit" { "Create" }
                }
            }
        },
    )
}

/// A page with one message (a refusal the site explained).
pub fn message(title: &str, text: &str) -> Markup {
    page(
        title,
        None,
        html! { a href="/" { "Back" } },
        html! { div.card { h2 { (title) } p.error { (text) } } },
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

pub fn user(op: &Operator, u: &ad::User, site_locked: bool, ticket: Option<IssuedTicket<'_>>) -> Markup {
    let contact = u.contact.clone().unwrap_or_default();
    let path = format!("/users/{}", u.chip_id);
    page(
        &u.chip_id,
        site_locked.then_some(SITE_LOCKED),
        signout(op),
        html! {
            div.card {
                h2 { code { (u.chip_id) } " — " (u.name) }
                p {
                    "Status " strong { (u.status) } " · key " strong { @if u.has_key { "enrolled" } @else { "none" } }
                    " · " @if u.locked { strong { "LOCKED DOWN" } " " a href={ (path) "/lockdown?locked=false" } { "Lift…" } }
                    @else { "open " a href={ (path) "/lockdown?locked=true" } { "Lock down…" } }
                }
            }
            @if let Some(t) = ticket {
                div.card {
                    h2 { "Connection ticket" }
                    p { "Show this once; it works once, until " (t.expires_at_ms / 1000) " (Unix time)." }
                    @if let Some(qr) = t.qr { img src=(qr) alt="ticket QR code" width="320" height="320"; }
                    p { "URI: " code { (t.uri) } }
                    p { "JSON: " code { (t.json) } }
                }
            }
            div.card {
                h2 { "Connection ticket" }
                form method="post" action={ (path) "/ticket" } {
                    input type="hidden" name="csrf" value=(op.csrf);
                    button type="submit" { "Issue a ticket" }
                }
            }
            div.card {
                h2 { "Edit" }
                form method="post" action={ (path) "/edit" } {
                    input type="hidden" name="csrf" value=(op.csrf);
                    p { label { "Name " input name="name" value=(u.name) required; } }
                    p { label { "Address " input name="address" value=(u.address); } }
                    p { label { "E-mail " input name="email" type="email" value=(contact.email); } }
                    p { label { "Phone " input name="phone" value=(contact.phone); } }
                    p { label { "Status "
                        select name="status" {
                            @for s in ["active", "suspended", "closed"] {
                                option value=(s) selected[s == u.status] { (s) }
                            }
                        }
                    } }
                    button type="submit" { "Save" }
                }
            }
        },
    )
}

/// Lockdown changes ask first (`chip_id` empty: the whole site).
pub fn confirm_lockdown(op: &Operator, chip_id: &str, locked: bool) -> Markup {
    let (what, action) = if chip_id.is_empty() {
        ("the whole site".to_owned(), "/lockdown".to_owned())
    } else {
        (format!("user {chip_id}"), format!("/users/{chip_id}/lockdown"))
    };
    page(
        "Confirm",
        None,
        signout(op),
        html! {
            div.card {
                h2 { @if locked { "Lock down " (what) "?" } @else { "Lift the lockdown of " (what) "?" } }
                @if locked { p { "Open sessions are closed at once and new ones refused until it is lifted." } }
                form method="post" action=(action) {
                    input type="hidden" name="csrf" value=(op.csrf);
                    input type="hidden" name="locked" value=(locked);
                    button type="submit" { @if locked { "Lock down" } @else { "Lift" } }
                    " " a href="/" { "Cancel" }
                }
            }
        },
    )
}
