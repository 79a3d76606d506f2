//! HTML for the dashboard: escaping (every value from the database or a request goes through
//! [`esc`]), the page shell (sidebar, status bar, flash message) and the small pieces pages share.

use std::fmt::Write;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::status::StatusBar;
use crate::ops::OpsError;

/// `s` escaped for HTML text and attribute values (double- or single-quoted).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` percent-encoded for a URL query value or fragment.
pub fn url_enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The sections of the sidebar: path and name.
const SECTIONS: [(&str, &str); 3] = [
    ("/", "Events"),
    ("/functions", "Functions"),
    ("/executions", "Executions"),
];

/// A message shown once at the top of the next page (after a redirect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flash {
    pub ok: bool,
    pub text: String,
}

const FLASH_COOKIE: &str = "pgfire_flash";

impl Flash {
    pub fn ok(text: impl Into<String>) -> Flash {
        Flash {
            ok: true,
            text: text.into(),
        }
    }

    pub fn error(err: &OpsError) -> Flash {
        Flash {
            ok: false,
            text: err.to_string(),
        }
    }

    fn cookie(&self) -> String {
        let raw = format!("{}{}", if self.ok { 'o' } else { 'e' }, self.text);
        // Cookies are small: a long message is cut (on a character boundary).
        let mut end = raw.len().min(2000);
        while !raw.is_char_boundary(end) {
            end -= 1;
        }
        let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[..end]);
        format!("{FLASH_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age=60")
    }

    /// The flash a request carries, if any.
    pub fn from_headers(headers: &HeaderMap) -> Option<Flash> {
        let value = cookie(headers, FLASH_COOKIE)?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let mut chars = raw.chars();
        let ok = chars.next()? == 'o';
        Some(Flash {
            ok,
            text: chars.as_str().to_string(),
        })
    }
}

/// The value of cookie `name` in `headers`.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A 303 to `location` carrying `flash` for the next page.
pub fn redirect(location: &str, flash: Flash) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&flash.cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// A whole page: the shell around `body`.
pub struct Page {
    pub title: String,
    /// The sidebar entry it belongs to.
    pub section: &'static str,
    pub body: String,
    pub status: StatusBar,
    pub csrf: String,
    pub flash: Option<Flash>,
    pub code: StatusCode,
}

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        let mut html = String::with_capacity(self.body.len() + 4096);
        let _ = write!(
            html,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <meta name=\"csrf-token\" content=\"{csrf}\">\
             <title>{title} · pgfire</title>\
             <link rel=\"icon\" href=\"data:,\"><link rel=\"stylesheet\" href=\"/assets/app.css\">\
             <script src=\"/assets/app.js\" defer></script></head>\n<body>\
             <a class=\"skip\" href=\"#main\">Skip to content</a>\
             <header class=\"top\"><a class=\"brand\" href=\"/\">pgfire</a>{status}</header>\
             <div class=\"layout\"><nav class=\"sidebar\" aria-label=\"Sections\"><ul>",
            csrf = esc(&self.csrf),
            title = esc(&self.title),
            status = self.status.render(),
        );
        for (path, name) in SECTIONS {
            let current = if name == self.section {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(html, "<li><a href=\"{path}\"{current}>{name}</a></li>");
        }
        let _ = write!(
            html,
            "</ul></nav>\n<main id=\"main\"><h1>{}</h1>",
            esc(&self.title)
        );
        if let Some(f) = &self.flash {
            let (class, role) = if f.ok {
                ("flash ok", "status")
            } else {
                ("flash error", "alert")
            };
            let _ = write!(
                html,
                "<p class=\"{class}\" role=\"{role}\">{}</p>",
                esc(&f.text)
            );
        }
        html.push_str(&self.body);
        html.push_str("</main></div></body></html>\n");
        let mut resp = (
            self.code,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response();
        if self.flash.is_some() {
            // Shown once.
            resp.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_static("pgfire_flash=; Path=/; Max-Age=0; SameSite=Strict"),
            );
        }
        resp
    }
}

/// A hidden form field.
pub fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        esc(name),
        esc(value)
    )
}

/// `<option>`s of `values`, `selected` marked.
pub fn options<'a>(values: impl IntoIterator<Item = &'a str>, selected: Option<&str>) -> String {
    let mut out = String::new();
    for v in values {
        let sel = if Some(v) == selected { " selected" } else { "" };
        let _ = write!(out, "<option value=\"{0}\"{sel}>{0}</option>", esc(v));
    }
    out
}

/// A status word with its class, e.g. `<span class="st st-error">error</span>`.
pub fn status_badge(status: &str) -> String {
    let class: String = status
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    format!("<span class=\"st st-{class}\">{}</span>", esc(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_text_and_both_quotes() {
        assert_eq!(
            esc(r#"<script>alert('x')</script>&"y""#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;y&quot;"
        );
        assert_eq!(url_enc("a b/é"), "a%20b%2F%C3%A9");
    }

    #[test]
    fn a_flash_survives_its_cookie() {
        let f = Flash {
            ok: false,
            text: "limit reached: ünïcode; and = signs".into(),
        };
        let set = f.cookie();
        let value = set.split(';').next().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {value}")).unwrap(),
        );
        assert_eq!(Flash::from_headers(&headers), Some(f));
        assert_eq!(
            status_badge("<x>"),
            "<span class=\"st st-x\">&lt;x&gt;</span>"
        );
    }
}
