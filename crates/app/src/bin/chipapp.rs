//! `chipapp`: plays the mobile app in a terminal. Enroll with a user ticket,
//! keep the key in a state file, run commands, follow alarms.
//!
//! ```text
//! chipapp enroll 'chipsite:user?h=…' --chip-id alice     # or a file holding the ticket
//! chipapp status
//! chipapp tally-ticket
//! chipapp tally-redeem 'chipsite:tally?…'                # link with a user on another site
//! chipapp tally-offer bob 'sha256//…' --terms '{"limit":1000}'
//! chipapp tally-accept tly_…                             # or tally-reject, tally-close
//! chipapp tallies
//! chipapp alarms
//! chipapp ack 3
//! chipapp follow                                          # alarms as they come
//! chipapp call status '{}'                                # any method
//! ```

use std::path::PathBuf;

use anyhow::{Context, bail};
use chipsite_app::{AppKey, AppState, Session, enroll};
use chipsite_model::PublishedTicket;
use chipsite_model::tally::{Kind, Party};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "chipapp",
    version,
    about = "A reference mobile-app client of a chipsite user gateway"
)]
struct Cli {
    /// Where the app keeps its CHIP ID, site, pinned site key and private key.
    #[arg(long, global = true, env = "CHIPAPP_STATE", default_value = "chipapp.json")]
    state: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a key and enroll it with a user ticket (a `chipsite:user?…` URI,
    /// ticket JSON, or a file holding either).
    Enroll {
        ticket: String,
        #[arg(long)]
        chip_id: String,
        /// Replace an existing state file.
        #[arg(long)]
        force: bool,
    },
    /// The user's status.
    Status,
    /// Ask for a tally ticket for this user.
    TallyTicket {
        #[arg(long)]
        ttl_seconds: Option<u32>,
    },
    /// Hand in a tally ticket another site's user gave you (a
    /// `chipsite:tally?…` URI, ticket JSON, or a file holding either): this
    /// site introduces you to theirs, and you are linked.
    TallyRedeem { ticket: String },
    /// List your tallies with their signed steps.
    Tallies,
    /// Offer a tally to a user you are linked with (their CHIP ID and their
    /// site's key pin, as `tally-redeem` printed them), signed with your key.
    TallyOffer {
        peer_chip_id: String,
        peer_site_pin: String,
        /// The terms, a JSON object (what you both sign).
        #[arg(long, default_value = "{}")]
        terms: String,
    },
    /// Accept a tally offered to you.
    TallyAccept { id: String },
    /// Reject a tally offered to you.
    TallyReject { id: String },
    /// Close an open tally.
    TallyClose { id: String },
    /// List alarms (unacknowledged ones, or all).
    Alarms {
        #[arg(long)]
        all: bool,
    },
    /// Acknowledge an alarm.
    Ack { id: i64 },
    /// Subscribe and print alarms as they arrive, until the site closes.
    Follow,
    /// Call any method with JSON params.
    Call { method: String, params: Option<String> },
}

fn read_ticket(arg: &str) -> anyhow::Result<PublishedTicket> {
    let text = if arg.starts_with("chipsite:") || arg.trim_start().starts_with('{') {
        arg.to_owned()
    } else {
        std::fs::read_to_string(arg).with_context(|| format!("reading ticket file {arg}"))?
    };
    let text = text.trim();
    let ticket = if text.starts_with('{') {
        PublishedTicket::from_json(text)?
    } else {
        PublishedTicket::from_uri(text)?
    };
    Ok(ticket)
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let call = |method: &'static str, params: Value| {
        let state = cli.state.clone();
        async move {
            let state = AppState::load(&state)
                .context("no enrolled app here (run `chipapp enroll` first, or pass --state)")?;
            let session = Session::open(&state).await?;
            let result = session.call(method, params).await?;
            session.close().await;
            anyhow::Ok(result)
        }
    };
    match &cli.command {
        Command::Enroll {
            ticket,
            chip_id,
            force,
        } => {
            if cli.state.exists() && !force {
                bail!(
                    "{} exists (an app is enrolled there); pass --force to replace it",
                    cli.state.display()
                );
            }
            let ticket = read_ticket(ticket)?;
            let key = AppKey::generate()?;
            enroll(&ticket, chip_id, &key).await?;
            AppState::new(&ticket, chip_id, &key).save(&cli.state)?;
            println!(
                "enrolled {chip_id} at {}:{}; key and pinned site key saved in {}",
                ticket.host,
                ticket.port,
                cli.state.display()
            );
        }
        Command::Status => print(&call("status", json!({})).await?),
        Command::TallyTicket { ttl_seconds } => {
            let params = match ttl_seconds {
                Some(t) => json!({"ttl_seconds": t}),
                None => json!({}),
            };
            let r = call("tally_ticket", params).await?;
            match r.get("uri").and_then(Value::as_str) {
                Some(uri) => println!("{uri}"),
                None => print(&r),
            }
        }
        Command::TallyRedeem { ticket } => {
            let ticket = read_ticket(ticket)?;
            let uri = ticket.to_uri();
            print(&call("tally.redeem", json!({"ticket": uri})).await?)
        }
        Command::Tallies => print(&call("tally.list", json!({})).await?),
        Command::TallyOffer { .. }
        | Command::TallyAccept { .. }
        | Command::TallyReject { .. }
        | Command::TallyClose { .. } => {
            let state =
                AppState::load(&cli.state).context("no enrolled app here (run `chipapp enroll` first)")?;
            let key = AppKey::from_pem(&state.key_pem)?;
            let me = state.party()?;
            let session = Session::open(&state).await?;
            let tally = match &cli.command {
                Command::TallyOffer {
                    peer_chip_id,
                    peer_site_pin,
                    terms,
                } => {
                    let terms: Value =
                        serde_json::from_str(terms).context("--terms must be a JSON object")?;
                    let to = Party {
                        chip_id: peer_chip_id.clone(),
                        site: peer_site_pin.clone(),
                    };
                    session.offer_tally(&me, &to, &terms, &key).await?
                }
                Command::TallyAccept { id } => session.answer_tally(id, Kind::Accept, &me, &key).await?,
                Command::TallyReject { id } => session.answer_tally(id, Kind::Reject, &me, &key).await?,
                Command::TallyClose { id } => session.answer_tally(id, Kind::Close, &me, &key).await?,
                _ => Value::Null,
            };
            session.close().await;
            print(&tally);
        }
        Command::Alarms { all } => print(&call("alarms.list", json!({"include_acked": all})).await?),
        Command::Ack { id } => print(&call("alarms.ack", json!({"id": id})).await?),
        Command::Follow => {
            let state =
                AppState::load(&cli.state).context("no enrolled app here (run `chipapp enroll` first)")?;
            let session = Session::open(&state).await?;
            session.call("alarms.subscribe", json!({})).await?;
            eprintln!("following alarms for {} (Ctrl-C to stop)", state.chip_id);
            while let Some(note) = session.next_notification().await {
                println!("{}", json!({"method": note.method, "params": note.params}));
                if note.method == "closed" {
                    break;
                }
            }
        }
        Command::Call { method, params } => {
            let params: Value = match params {
                Some(p) => serde_json::from_str(p).context("params must be JSON")?,
                None => json!({}),
            };
            let state =
                AppState::load(&cli.state).context("no enrolled app here (run `chipapp enroll` first)")?;
            let session = Session::open(&state).await?;
            print(&session.call(method, params).await?);
            session.close().await;
        }
    }
    Ok(())
}
