//! `GET /` and `GET /dashboard`: the operators' web page (ARCHITECTURE.md, "The dashboard"), one HTML page with
//! its CSS and JavaScript modules embedded in the binary from `assets/dashboard/`, so a deployment has nothing
//! else to install or serve. The page talks only to this API (its routes and `/api/job/{id}/events`) with the
//! caller's own bearer token; the `Content-Security-Policy` sent with it forbids any other origin, so it makes
//! no request outside the service.
//!
//! These routes are open (the page holds no data; it asks for a token and every API call it makes is checked)
//! and are left out of the OpenAPI document, which describes the JSON API.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa_axum::router::OpenApiRouter;

use super::ApiState;
use super::error::ApiError;
use super::extract::ApiPath;

/// One embedded file of the page.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// The file name under `/dashboard/`.
    pub name: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its text.
    pub body: &'static str,
}

/// Every file of the page: the HTML first, then what it loads.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../assets/dashboard/index.html"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../assets/dashboard/style.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../assets/dashboard/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../assets/dashboard/api.js"),
    },
    Asset {
        name: "graph.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../assets/dashboard/graph.js"),
    },
];

/// What the page may load and contact: this origin only; no inline script, no frames, no other host.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                      connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .route("/", get(page))
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/{file}", get(asset))
}

/// The file named `name`, if the page has one.
pub fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|asset| asset.name == name)
}

fn serve(asset: &Asset) -> Response {
    let mut response = (StatusCode::OK, asset.body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // Revalidated each load, so a new binary's page is never mixed with an old script.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn page() -> Response {
    serve(&ASSETS[0])
}

async fn asset(ApiPath(file): ApiPath<String>) -> Result<Response, ApiError> {
    find(&file).map(serve).ok_or_else(|| {
        let known: Vec<&str> = ASSETS.iter().map(|asset| asset.name).collect();
        ApiError::not_found("asset_not_found", format!("the dashboard has no file `{file}`"))
            .with_details(serde_json::json!({ "available": known }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget for the whole page: HTML, CSS and JavaScript together.
    const BUDGET: usize = 200 * 1024;

    #[test]
    fn the_page_weighs_under_its_budget() {
        let total: usize = ASSETS.iter().map(|asset| asset.body.len()).sum();
        assert!(total < BUDGET, "the dashboard weighs {total} bytes, over the budget of {BUDGET}");
    }

    #[test]
    fn the_page_loads_every_embedded_file_and_nothing_else() {
        let html = ASSETS[0].body;
        let scripts = ASSETS.iter().filter(|asset| asset.name.ends_with(".js"));
        for asset in &ASSETS[1..] {
            let loaded = html.contains(&format!("/dashboard/{}", asset.name))
                || scripts.clone().any(|script| script.body.contains(&format!("./{}", asset.name)));
            assert!(loaded, "{} is embedded but nothing loads it", asset.name);
        }
        // The SVG namespace is a name, not an address the page fetches.
        for asset in ASSETS {
            let text = asset.body.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "{} names another origin", asset.name);
        }
    }
}
