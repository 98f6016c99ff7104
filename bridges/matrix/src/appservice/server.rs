//! The application service's HTTP server: the homeserver's transactions and
//! user queries, authorised by its token.

use super::*;

pub(super) async fn serve(listener: TcpListener, portals: Weak<Portals>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "application service: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let portals = portals.clone();
        tokio::spawn(
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let portals = portals.clone();
                    async move {
                        let response = match portals.upgrade() {
                            Some(p) => handle(&p, req).await,
                            None => json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"errcode": "M_UNKNOWN"})),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    debug!(peer = %peer, error = %e, "application service connection ended");
                }
            }
            .in_current_span(),
        );
    }
}

pub(super) fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub(super) fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({"errcode": errcode, "error": error}))
}

pub(super) async fn handle(portals: &Portals, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let Some(config) = portals.appservice() else { return matrix_error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "") };
    match authorize(req.headers(), req.uri().query(), config.hs_token.expose()) {
        Ok(()) => {}
        Err(StatusCode::UNAUTHORIZED) => {
            return matrix_error(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "no hs_token in the request");
        }
        Err(status) => {
            warn!(path = req.uri().path(), "application service request with a wrong token refused");
            return matrix_error(status, "M_FORBIDDEN", "wrong hs_token");
        }
    }
    match route(req.method(), req.uri().path()) {
        Route::Transaction(id) => {
            let body = match Limited::new(req.into_body(), MAX_TRANSACTION_BYTES).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return matrix_error(StatusCode::BAD_REQUEST, "M_BAD_JSON", &format!("unreadable body: {e}")),
            };
            match parse_transaction(&body) {
                Ok(txn) => {
                    if portals.transaction(&id, txn).await {
                        json_response(StatusCode::OK, &json!({}))
                    } else {
                        matrix_error(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "the gateway is shutting down")
                    }
                }
                Err(e) => matrix_error(StatusCode::BAD_REQUEST, "M_BAD_JSON", &e),
            }
        }
        Route::User(user) if portals.knows_user(&user) => json_response(StatusCode::OK, &json!({})),
        Route::User(_) => matrix_error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "no such user on this gateway"),
        Route::Room(_) => matrix_error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "this gateway provides no room aliases"),
        Route::Ping => json_response(StatusCode::OK, &json!({})),
        Route::Unknown => matrix_error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "unknown endpoint"),
    }
}
