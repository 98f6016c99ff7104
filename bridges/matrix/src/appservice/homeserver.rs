//! The homeserver's client-server API, called as the application service (with
//! identity assertion for puppets) or as the bot account.

use super::*;

#[derive(Debug)]
pub(super) enum HsError {
    /// The homeserver answered with an error.
    Refused { status: u16, errcode: String, error: String },
    /// No answer.
    Unreachable(String),
}

impl HsError {
    pub(super) fn errcode(&self) -> Option<&str> {
        match self {
            HsError::Refused { errcode, .. } => Some(errcode),
            HsError::Unreachable(_) => None,
        }
    }

    pub(super) fn delivery(self, what: &str) -> DeliveryError {
        match self {
            HsError::Unreachable(e) => {
                DeliveryError::Unavailable(format!("{what}: the Matrix homeserver cannot be reached: {e}"))
            }
            HsError::Refused { status, errcode, error } => {
                let text = format!("{what}: the Matrix homeserver refused it ({errcode}: {error})");
                match status {
                    429 | 500.. => DeliveryError::Unavailable(text),
                    403 => DeliveryError::Forbidden(text),
                    _ => DeliveryError::Rejected(text),
                }
            }
        }
    }
}

impl std::fmt::Display for HsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HsError::Refused { status, errcode, error } => write!(f, "HTTP {status} {errcode}: {error}"),
            HsError::Unreachable(e) => write!(f, "no answer: {e}"),
        }
    }
}

pub(super) struct Homeserver {
    pub(super) base: String,
    /// The application service's token, or the bot's access token once logged in.
    pub(super) token: StdMutex<String>,
    pub(super) http: Result<reqwest::Client, String>,
}

impl Homeserver {
    /// Call `path` (with its query, if any) as the bot, or as `as_user` (identity assertion).
    pub(super) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        as_user: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, HsError> {
        let body = body.map(|b| (b.to_string().into_bytes(), "application/json".to_owned()));
        self.call_raw(method, path, as_user, body, Duration::from_secs(60)).await
    }

    pub(super) async fn call_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        as_user: Option<&str>,
        body: Option<(Vec<u8>, String)>,
        timeout: Duration,
    ) -> Result<Value, HsError> {
        let http = self.http.as_ref().map_err(|e| HsError::Unreachable(format!("no HTTP client: {e}")))?;
        let mut url = format!("{}{path}", self.base.trim_end_matches('/'));
        if let Some(user) = as_user {
            url.push(if path.contains('?') { '&' } else { '?' });
            url.push_str(&format!("user_id={}", enc(user)));
        }
        let token = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut request = http.request(method.clone(), &url).timeout(timeout);
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        if let Some((bytes, content_type)) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type).body(bytes);
        }
        let response = request.send().await.map_err(|e| HsError::Unreachable(e.to_string()))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| HsError::Unreachable(e.to_string()))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let field = |k: &str| value.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
            let errcode = Some(field("errcode")).filter(|c| !c.is_empty()).unwrap_or_else(|| "M_UNKNOWN".into());
            let error = field("error");
            debug!(%method, path, status = status.as_u16(), %errcode, %error, "homeserver refused a request");
            return Err(HsError::Refused { status: status.as_u16(), errcode, error });
        }
        Ok(value)
    }
}
