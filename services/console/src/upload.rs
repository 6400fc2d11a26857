//! File uploads (`multipart/form-data`): the user dump (`/users/load`) and
//! the site key (`/key/import`) read theirs the same way.

use axum::{
    extract::{Multipart, multipart::MultipartRejection},
    http::HeaderMap,
};
use zeroize::Zeroizing;

use crate::{Console, Operator, Refusal, checked};

/// An upload as it arrived: its text fields (pass phrases among them, so
/// they are wiped when dropped) and its one file, named `file`.
#[derive(Default)]
pub(crate) struct Upload {
    fields: Vec<(String, Zeroizing<String>)>,
    /// The file's name as the browser sent it (empty when none was chosen).
    pub file_name: String,
    pub file: Option<Vec<u8>>,
}

impl Upload {
    /// A text field's value; empty when it was not sent.
    pub fn field(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Read an upload. Refused without a session, before anything is read;
/// not multipart, or without the session's CSRF token, refused as a stale
/// form. `Ok(Err(why))`: the body did not arrive whole (nothing to check
/// the token against; the caller shows why and does nothing).
pub(crate) async fn read(
    c: &Console,
    headers: &HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<(Operator, Result<Upload, String>), Refusal> {
    let Some(op) = c.operator(headers) else {
        return Err(Refusal::Forbidden("sign in first"));
    };
    // Not a file upload: it has no CSRF token either.
    let Ok(mut form) = form else {
        return Err(Refusal::Forbidden(
            "the form is stale (CSRF check failed): reload the page",
        ));
    };
    let mut upload = Upload::default();
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return Ok((
                    op,
                    Err(format!("the upload did not arrive whole: {}", e.body_text())),
                ));
            }
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            upload.file_name = field.file_name().unwrap_or_default().to_owned();
        }
        let bytes = match field.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return Ok((
                    op,
                    Err(format!("the upload did not arrive whole: {}", e.body_text())),
                ));
            }
        };
        if name == "file" {
            upload.file = Some(bytes.to_vec());
        } else {
            upload
                .fields
                .push((name, Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned())));
        }
    }
    checked(c, headers, Some(upload.field("csrf")))?;
    Ok((op, Ok(upload)))
}
