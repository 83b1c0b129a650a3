//! Who is calling and what they may do: bearer tokens with roles (checked
//! by their SHA-256, in constant time), short-lived tickets for the live
//! feed (EventSource cannot send headers), and the check of a route's role.
//! Routes declare their role in their OpenAPI `security` scopes; the
//! [`RoleMap`] built from that document is what is enforced, so the
//! document and the server cannot disagree.

use super::{ApiError, ApiState};
use crate::config::{HttpConfig, Role};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::collections::HashMap;

/// The caller of a request, put in its extensions once authenticated.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Caller {
    /// The token's name in `http.tokens` (`admin` for `http.token`,
    /// `anonymous` when the API is open).
    pub name: String,
    #[schema(value_type = String, example = "staff")]
    pub role: Role,
}

/// The configured tokens, by the SHA-256 of their secret.
pub struct Tokens {
    entries: Vec<(String, Role, [u8; 32])>,
}

impl Tokens {
    pub fn from_config(http: &HttpConfig) -> Self {
        use sha2::{Digest, Sha256};
        let mut entries: Vec<_> = http
            .tokens
            .iter()
            .map(|(name, t)| (name.clone(), t.role, t.digest()))
            .collect();
        if let Some(t) = &http.token {
            entries.push((
                "admin".into(),
                Role::Admin,
                Sha256::digest(t.expose().as_bytes()).into(),
            ));
        }
        Self { entries }
    }

    /// No token at all: every caller is an anonymous admin.
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller a bearer token belongs to. Every configured digest is
    /// compared, each without an early exit, so timing tells nothing.
    pub fn check(&self, given: &str) -> Option<Caller> {
        use sha2::{Digest, Sha256};
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let mut found = None;
        for (name, role, d) in &self.entries {
            if constant_time_eq(&digest, d) {
                found = Some(Caller {
                    name: name.clone(),
                    role: *role,
                });
            }
        }
        found
    }

    pub(super) fn by_name(&self, name: &str) -> Option<Caller> {
        self.entries
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(n, r, _)| Caller {
                name: n.clone(),
                role: *r,
            })
    }
}

/// Compares without an early exit, so timing does not reveal the token.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

/// How long a live-feed ticket opens the feed.
pub const TICKET_SECS: i64 = 60;

/// A ticket: `hex(token name).expiry.hex(mac)`, signed with the key that
/// signs unsubscribe links, which every instance shares, so a ticket made by
/// one instance opens the feed on another behind the same load balancer.
pub fn issue_ticket(s: &ApiState, caller: &Caller, now: i64) -> Option<String> {
    let signer = s.signer.as_ref()?;
    let expiry = now + TICKET_SECS;
    let body = format!("{}.{expiry}", hex::encode(&caller.name));
    Some(format!(
        "{body}.{}",
        hex::encode(signer.tag(b"live-ticket", body.as_bytes()))
    ))
}

/// The token name a genuine, unexpired ticket was made for.
fn verify_ticket(s: &ApiState, ticket: &str, now: i64) -> Option<String> {
    let (body, tag) = ticket.rsplit_once('.')?;
    let tag = hex::decode(tag).ok()?;
    if !s
        .signer
        .as_ref()?
        .verify_tag(b"live-ticket", body.as_bytes(), &tag)
    {
        return None;
    }
    let (name, expiry) = body.split_once('.')?;
    if expiry.parse::<i64>().ok()? < now {
        return None;
    }
    String::from_utf8(hex::decode(name).ok()?).ok()
}

fn query_param<'a>(req: &'a Request, key: &str) -> Option<&'a str> {
    req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    })
}

/// Authenticates every `/api` request: a bearer token in the header, or a
/// ticket on the live feed. A token in the query string is refused outright:
/// it lands in proxy logs and browser history.
pub async fn authenticate(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    if query_param(&req, "token").is_some() {
        return ApiError(
            StatusCode::BAD_REQUEST,
            "a token is not accepted in the query string (it ends up in logs and browser history): \
             send `Authorization: Bearer <token>`, or for /api/live a ticket from POST /api/live/ticket"
                .into(),
        )
        .into_response();
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let caller = if s.tokens.is_open() {
        Some(Caller {
            name: "anonymous".into(),
            role: Role::Admin,
        })
    } else if let Some(given) = bearer {
        s.tokens.check(given)
    } else if req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| p.as_str() == "/api/live")
    {
        query_param(&req, "ticket")
            .and_then(|t| verify_ticket(&s, t, chrono::Utc::now().timestamp()))
            // The token's role now, not when the ticket was made.
            .and_then(|name| s.tokens.by_name(&name))
    } else {
        None
    };
    let Some(caller) = caller else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response();
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The role each route needs, read from the OpenAPI document's security
/// scopes: `(method, path template) -> role`.
#[derive(Default)]
pub struct RoleMap(HashMap<(Method, String), Role>);

impl RoleMap {
    /// Reads `paths.*.*.security[*].bearer[0]` of the document.
    pub fn from_openapi(doc: &serde_json::Value) -> Self {
        let mut map = HashMap::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let Ok(method) = method.to_uppercase().parse::<Method>() else {
                    continue;
                };
                let role = op["security"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|req| req["bearer"][0].as_str())
                    .find_map(|r| serde_json::from_value::<Role>(r.into()).ok());
                if let Some(role) = role {
                    map.insert((method, path.clone()), role);
                }
            }
        }
        Self(map)
    }

    pub fn get(&self, method: &Method, path: &str) -> Option<Role> {
        self.0.get(&(method.clone(), path.to_string())).copied()
    }
}

/// Lets a request through only if its caller's role reaches the route's.
/// A route missing from the map needs `admin`: forgetting to declare a role
/// fails closed.
pub async fn authorize(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let needed = s.roles.get(req.method(), &path).unwrap_or(Role::Admin);
    let Some(caller) = req.extensions().get::<Caller>() else {
        return ApiError(StatusCode::UNAUTHORIZED, "not authenticated".into()).into_response();
    };
    if caller.role < needed {
        let body = serde_json::json!({
            "error": format!(
                "the token `{}` has the role `{}`; {} {path} needs the role `{needed}`",
                caller.name, caller.role, req.method()
            ),
            "role": caller.role,
            "role_needed": needed,
        });
        return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TokenConfig, TokenDigest};

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn tokens_are_found_by_secret_or_hash_and_named() {
        let mut http = HttpConfig {
            token: Some("the-old-admin-token".into()),
            ..Default::default()
        };
        http.tokens.insert(
            "callcentre".into(),
            TokenConfig {
                role: Role::Staff,
                token: None,
                token_sha256: Some(TokenDigest(
                    <sha2::Sha256 as sha2::Digest>::digest(b"call-centre-secret").into(),
                )),
            },
        );
        let t = Tokens::from_config(&http);
        assert!(!t.is_open());
        let c = t.check("call-centre-secret").unwrap();
        assert_eq!((c.name.as_str(), c.role), ("callcentre", Role::Staff));
        let a = t.check("the-old-admin-token").unwrap();
        assert_eq!((a.name.as_str(), a.role), ("admin", Role::Admin));
        assert!(t.check("call-centre-secreT").is_none());
        assert!(Tokens::from_config(&HttpConfig::default()).is_open());
    }
}
