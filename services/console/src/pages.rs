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
                                td { code { (u.chip_id) } }
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
        },
    )
}
