//! The HTML pages the proxy answers with when it cannot forward.

/// A short HTML page naming the service and its state, with a detail line and the last log
/// lines; every piece of text is HTML-escaped.
pub fn error_page(service: &str, state: &str, detail: &str, log_tail: &[String]) -> String {
    let (service, state, detail) = (escape(service), escape(state), escape(detail));
    let mut html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">\
         <title>{service}: {state}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}\
         pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style></head>\n\
         <body><h1>{service}: {state}</h1>\n<p>{detail}</p>\n"
    );
    if !log_tail.is_empty() {
        html.push_str("<h2>Last log lines</h2>\n<pre>");
        for line in log_tail {
            html.push_str(&escape(line));
            html.push('\n');
        }
        html.push_str("</pre>\n");
    }
    html.push_str("<p><small>pmesh-dev</small></p></body></html>\n");
    html
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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
