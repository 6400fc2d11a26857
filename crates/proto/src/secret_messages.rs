/// Messages that carry a secret (a pass phrase, a token, or a ticket or
/// sign-in link that holds one): their `Debug` prints `<redacted>` for it
/// (`redacted_debug!` in lib.rs). `build.rs` includes this file too.
pub const SECRET_MESSAGES: [&str; 16] = [
    ".chipsite.keyvault.v1.UnsealRequest",
    ".chipsite.keyvault.v1.CreateSiteKeyRequest",
    ".chipsite.keyvault.v1.ChangePassphraseRequest",
    ".chipsite.keyvault.v1.ImportSiteKeyRequest",
    ".chipsite.keyvault.v1.ExportSiteKeyRequest",
    ".chipsite.ticket.v1.IssuedTicket",
    ".chipsite.ticket.v1.RedeemTicketRequest",
    ".chipsite.admin.v1.UnsealVaultRequest",
    ".chipsite.admin.v1.CreateSiteKeyRequest",
    ".chipsite.admin.v1.ChangePassphraseRequest",
    ".chipsite.admin.v1.ImportSiteKeyRequest",
    ".chipsite.admin.v1.ExportSiteKeyRequest",
    ".chipsite.admin.v1.StartPeerServerRequest",
    ".chipsite.admin.v1.IssuedTicketView",
    ".chipsite.admin.v1.ConsoleTicket",
    ".chipsite.peer.v1.RedeemTallyTicketRequest",
];
