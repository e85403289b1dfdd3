//! What an unexpected HTTP status means, said the same way for every source: 404 is
//! [`NetError::NotFound`], 401 and 403 say which option gives credentials, a 400 over https
//! that the client certificate may be missing or refused (nginx with `ssl_verify_client on`
//! answers so after a TLS 1.3 handshake).

use reqwest::StatusCode;

use super::{HttpAuth, NetError};

/// The error for `status` from the URL shown as `shown` (`https`: it was an https URL;
/// `has_secrets`: the URL carries a userinfo or query string, e.g. a presigned URL).
pub fn status_error(
    shown: &str,
    https: bool,
    has_secrets: bool,
    status: StatusCode,
    auth: &HttpAuth,
) -> NetError {
    let url = shown.to_owned();
    match status {
        StatusCode::NOT_FOUND => NetError::NotFound { url, http: true },
        StatusCode::BAD_REQUEST if https => NetError::Tls {
            url,
            reason: if auth.client_cert.is_some() {
                "server answered HTTP 400: it may have refused the client certificate \
                 (--client-cert: is it signed by a CA the server trusts, and not expired?)"
            } else {
                "server answered HTTP 400: it may require a client certificate \
                 (mutual TLS); give --client-cert PEM --client-key PEM"
            }
            .into(),
        },
        StatusCode::FORBIDDEN => NetError::Forbidden {
            url,
            hint: if has_secrets {
                "the signature (query string) or credentials of the URL were refused; give \
                 a fresh URL (serve: POST /v1/target-urls or `streamboot target-urls`; \
                 otherwise --target)"
            } else {
                "the server refuses access; give credentials (--header-file, \
                 --bearer-token-file) or a signed URL with --target"
            },
        },
        StatusCode::UNAUTHORIZED if auth.bearer_token_file.is_some() => NetError::Unauthorized {
            url,
            status: status.as_u16(),
            hint: "the bearer token was refused, also after reading --bearer-token-file \
                   again; put a valid token in that file",
        },
        StatusCode::UNAUTHORIZED => NetError::Unauthorized {
            url,
            status: status.as_u16(),
            hint: if has_secrets {
                "the credentials or the signature in the URL were refused (expired \
                 presigned URL?); give credentials in a file (--bearer-token-file, \
                 --header-file) or a fresh signed URL"
            } else {
                "the server wants credentials; give them in a file (--bearer-token-file \
                 FILE, or --header-file FILE with an Authorization header), never on the \
                 command line"
            },
        },
        status => NetError::Status {
            url,
            status: status.as_u16(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_never_advise_credentials_on_the_command_line() {
        for secrets in [false, true] {
            let e = status_error(
                "https://h/x",
                true,
                secrets,
                StatusCode::UNAUTHORIZED,
                &HttpAuth::default(),
            )
            .to_string();
            assert!(
                e.contains("--bearer-token-file") && e.contains("--header-file"),
                "{e}"
            );
            assert!(
                !e.contains("--target") && !e.contains("user:password"),
                "{e}"
            );
        }
        let nf = status_error(
            "http://h/x",
            false,
            false,
            StatusCode::NOT_FOUND,
            &HttpAuth::default(),
        );
        assert!(matches!(nf, NetError::NotFound { http: true, .. }), "{nf}");
    }
}
