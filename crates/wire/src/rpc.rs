//! JSON-RPC 2.0 messages, one per frame. Batches are not supported (an
//! array is an invalid request). Every malformed input maps to a response
//! the peer can read; nothing here panics.

use serde::Serialize;
use serde_json::{Map, Value, json};

/// Error codes: JSON-RPC's own, and chipsite's (-32000 to -32099).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    Internal,
    /// The caller may not do this (wrong user, no session).
    Unauthorized,
    /// The user or the site is locked down.
    LockedDown,
    /// Too many attempts from this source.
    RateLimited,
    /// The thing named does not exist.
    NotFound,
    /// The site cannot do this now (for example, the vault is sealed).
    Unavailable,
    /// The request does not fit the state of what it names (a tally step
    /// out of turn, another step in a recorded step's place).
    Conflict,
}

impl ErrorCode {
    pub fn code(self) -> i64 {
        match self {
            Self::ParseError => -32700,
            Self::InvalidRequest => -32600,
            Self::MethodNotFound => -32601,
            Self::InvalidParams => -32602,
            Self::Internal => -32603,
            Self::Unauthorized => -32001,
            Self::LockedDown => -32002,
            Self::RateLimited => -32003,
            Self::NotFound => -32004,
            Self::Unavailable => -32005,
            Self::Conflict => -32006,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        [
            Self::ParseError,
            Self::InvalidRequest,
            Self::MethodNotFound,
            Self::InvalidParams,
            Self::Internal,
            Self::Unauthorized,
            Self::LockedDown,
            Self::RateLimited,
            Self::NotFound,
            Self::Unavailable,
            Self::Conflict,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.code(),
            message: message.into(),
            data: None,
        }
    }
}

/// A call that expects a response. `id` is a string or an integer.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Value,
    pub method: String,
    /// An object, an array, or `Null` when absent.
    pub params: Value,
}

/// A message without `id`: no response is sent (the server uses them for
/// alarms).
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub method: String,
    pub params: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Request(Request),
    Notification(Notification),
}

/// A response: a result or an error, for the request `id` (`Null` when the
/// request was too broken to have one).
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub id: Value,
    pub outcome: Result<Value, RpcError>,
}

impl Response {
    pub fn result(id: Value, result: Value) -> Self {
        Self {
            id,
            outcome: Ok(result),
        }
    }

    pub fn error(id: Value, error: RpcError) -> Self {
        Self {
            id,
            outcome: Err(error),
        }
    }

    /// The response as one frame (no line end).
    pub fn to_frame(&self) -> String {
        let body = match &self.outcome {
            Ok(result) => json!({"jsonrpc": "2.0", "id": self.id, "result": result}),
            Err(error) => json!({"jsonrpc": "2.0", "id": self.id, "error": error}),
        };
        body.to_string()
    }
}

impl Notification {
    pub fn to_frame(&self) -> String {
        json!({"jsonrpc": "2.0", "method": self.method, "params": self.params}).to_string()
    }
}

impl Request {
    pub fn to_frame(&self) -> String {
        if self.params.is_null() {
            json!({"jsonrpc": "2.0", "id": self.id, "method": self.method}).to_string()
        } else {
            json!({"jsonrpc": "2.0", "id": self.id, "method": self.method, "params": self.params}).to_string()
        }
    }
}

fn invalid(id: Value, why: &str) -> Response {
    Response::error(
        id,
        RpcError::new(ErrorCode::InvalidRequest, format!("invalid request: {why}")),
    )
}

/// Read one incoming frame. Anything that is not a JSON-RPC 2.0 request or
/// notification becomes the error response to send back.
pub fn parse(frame: &str) -> Result<Incoming, Response> {
    let value: Value = serde_json::from_str(frame).map_err(|e| {
        Response::error(
            Value::Null,
            RpcError::new(ErrorCode::ParseError, format!("parse error: {e}")),
        )
    })?;
    let Value::Object(mut m) = value else {
        return Err(invalid(
            Value::Null,
            "a message is one JSON object (batches are not supported)",
        ));
    };
    let id = match m.remove("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_))) if !id.is_f64() => Some(id),
        Some(_) => return Err(invalid(Value::Null, "id must be a string or an integer")),
    };
    let answer_to = id.clone().unwrap_or(Value::Null);
    if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(answer_to, "jsonrpc must be \"2.0\""));
    }
    let method = match m.remove("method") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => return Err(invalid(answer_to, "method must be a non-empty string")),
    };
    let params = match m.remove("params") {
        None => Value::Null,
        Some(p @ (Value::Object(_) | Value::Array(_))) => p,
        Some(_) => return Err(invalid(answer_to, "params must be an object or an array")),
    };
    if let Some(extra) = m.keys().find(|k| k.as_str() != "jsonrpc") {
        return Err(invalid(answer_to, &format!("unknown member {extra:?}")));
    }
    Ok(match id {
        Some(id) => Incoming::Request(Request { id, method, params }),
        None => Incoming::Notification(Notification { method, params }),
    })
}

/// Read one frame from the server side of a connection (a client's view):
/// a response, or a notification.
pub fn parse_from_server(frame: &str) -> Result<Result<Response, Notification>, RpcError> {
    let bad = |why: &str| RpcError::new(ErrorCode::ParseError, format!("bad message from server: {why}"));
    let value: Value = serde_json::from_str(frame).map_err(|e| bad(&e.to_string()))?;
    let Value::Object(mut m): Value = value else {
        return Err(bad("not an object"));
    };
    if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(bad("jsonrpc must be \"2.0\""));
    }
    if let Some(Value::String(method)) = m.remove("method") {
        let params = m.remove("params").unwrap_or(Value::Null);
        return Ok(Err(Notification { method, params }));
    }
    let id = m.remove("id").ok_or_else(|| bad("no id"))?;
    match (m.remove("result"), m.remove("error")) {
        (Some(result), None) => Ok(Ok(Response::result(id, result))),
        (None, Some(Value::Object(e))) => Ok(Ok(Response::error(
            id,
            error_of(e).ok_or_else(|| bad("malformed error"))?,
        ))),
        _ => Err(bad("a response has exactly one of result and error")),
    }
}

fn error_of(mut e: Map<String, Value>) -> Option<RpcError> {
    Some(RpcError {
        code: e.get("code")?.as_i64()?,
        message: e.get("message")?.as_str()?.to_owned(),
        data: e.remove("data"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn code_of(r: Result<Incoming, Response>) -> i64 {
        match r {
            Err(Response { outcome: Err(e), .. }) => e.code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn requests_and_notifications_parse() {
        let r = parse(r#"{"jsonrpc":"2.0","id":7,"method":"status","params":{}}"#).unwrap();
        assert_eq!(
            r,
            Incoming::Request(Request {
                id: json!(7),
                method: "status".into(),
                params: json!({})
            })
        );
        let n = parse(r#"{"jsonrpc":"2.0","method":"ping"}"#).unwrap();
        assert_eq!(
            n,
            Incoming::Notification(Notification {
                method: "ping".into(),
                params: Value::Null
            })
        );
    }

    #[test]
    fn malformed_input_gets_the_right_error() {
        assert_eq!(code_of(parse("{")), -32700);
        assert_eq!(code_of(parse("")), -32700);
        assert_eq!(code_of(parse("[]")), -32600);
        assert_eq!(code_of(parse(r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#)), -32600);
        assert_eq!(
            code_of(parse(r#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#)),
            -32600
        );
        assert_eq!(
            code_of(parse(r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#)),
            -32600
        );
        assert_eq!(code_of(parse(r#"{"jsonrpc":"2.0","id":1,"method":3}"#)), -32600);
        assert_eq!(
            code_of(parse(r#"{"jsonrpc":"2.0","id":1,"method":"x","params":5}"#)),
            -32600
        );
        assert_eq!(
            code_of(parse(r#"{"jsonrpc":"2.0","id":1,"method":"x","extra":true}"#)),
            -32600
        );
        // The id is echoed when it could be read.
        let Err(r) = parse(r#"{"jsonrpc":"2.0","id":"a","method":""}"#) else {
            panic!()
        };
        assert_eq!(r.id, json!("a"));
    }

    #[test]
    fn responses_round_trip_through_frames() {
        let ok = Response::result(json!(1), json!({"status": "ok"}));
        assert_eq!(parse_from_server(&ok.to_frame()).unwrap().unwrap(), ok);
        let err = Response::error(json!("x"), RpcError::new(ErrorCode::LockedDown, "locked down"));
        assert_eq!(parse_from_server(&err.to_frame()).unwrap().unwrap(), err);
        let n = Notification {
            method: "alarm".into(),
            params: json!({"id": 3}),
        };
        assert_eq!(parse_from_server(&n.to_frame()).unwrap().unwrap_err(), n);
        assert_eq!(ErrorCode::from_code(-32002), Some(ErrorCode::LockedDown));
    }
}
