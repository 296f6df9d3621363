//! `GET /`: the status page. Plain HTML, no scripts and no external assets, which the browser
//! reloads every two seconds: each batch's state, a progress bar, requests done and failed,
//! completion tokens per second and the time left.

use std::fmt::Write as _;

use axum::extract::State;
use axum::response::Html;

use crate::serve::api::AppState;
use crate::serve::api_error::ApiError;
use crate::serve::batch::{BatchRecord, BatchStatus};

/// Batches shown, newest first.
const SHOWN: u32 = 100;
/// Seconds between reloads.
const REFRESH_SECS: u32 = 2;

/// The page.
///
/// # Errors
/// 500 on a database error.
pub async fn status_page(State(state): State<AppState>) -> Result<Html<String>, ApiError> {
    let running = state.queue.running();
    let (batches, _) = state
        .blocking(|s| Ok(s.store.batches(None, SHOWN)?))
        .await?;
    Ok(Html(render(&batches, running.as_deref())))
}

fn render(batches: &[BatchRecord], running: Option<&str>) -> String {
    let mut rows = String::new();
    for b in batches {
        let done = b.counts.completed + b.counts.failed;
        let state = match b.status {
            BatchStatus::InProgress if Some(b.id.as_str()) != running => "queued",
            s => s.as_str(),
        };
        let _ = writeln!(
            rows,
            "<tr class=\"batch\" id=\"{id}\"><td><code>{id}</code></td><td class=\"state\">{state}</td>\
             <td><progress max=\"{total}\" value=\"{done}\"></progress></td>\
             <td class=\"done\">{done} of {total}</td><td class=\"failed\">{failed}</td>\
             <td class=\"rate\">{rate}</td><td class=\"eta\">{eta}</td><td>{endpoint}</td></tr>",
            id = escape(&b.id),
            total = b.counts.total.max(1),
            failed = b.counts.failed,
            rate = b
                .tokens_per_sec()
                .map_or("-".into(), |r| format!("{r:.1} tok/s")),
            eta = b.eta_secs().map_or("-".into(), duration),
            endpoint = escape(&b.endpoint),
        );
    }
    if batches.is_empty() {
        rows.push_str("<tr><td colspan=\"8\">no batches yet</td></tr>\n");
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>infer-batch</title><style>\
         body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{padding:.3em .8em;text-align:left;border-bottom:1px solid #ddd}}\
         progress{{width:12em}}</style></head><body>\
         <h1>infer-batch</h1><p>Batches, newest first; this page reloads every \
         {REFRESH_SECS} seconds.</p><table><thead><tr><th>batch</th><th>state</th>\
         <th>progress</th><th>requests done</th><th>failed</th><th>decode</th><th>time left</th>\
         <th>endpoint</th></tr></thead><tbody>\n{rows}</tbody></table></body></html>\n"
    )
}

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{:.1} h", s as f64 / 3600.0),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::batch::Counts;

    #[test]
    fn a_running_batch_shows_its_progress_and_a_waiting_one_is_queued() {
        let mut a = BatchRecord::new(
            "batch_a".into(),
            "/v1/chat/completions".into(),
            "f".into(),
            None,
            1,
        );
        a.status = BatchStatus::InProgress;
        a.counts = Counts {
            total: 10,
            completed: 3,
            failed: 1,
        };
        a.completion_tokens = 200;
        a.run_seconds = 4.0;
        let mut b = a.clone();
        b.id = "batch_b<".into();
        b.counts = Counts {
            total: 5,
            completed: 0,
            failed: 0,
        };
        let html = render(&[a, b], Some("batch_a"));
        assert!(
            html.contains(
                "<td class=\"state\">in_progress</td><td><progress max=\"10\" value=\"4\">"
            ),
            "{html}"
        );
        assert!(
            html.contains("4 of 10") && html.contains("50.0 tok/s") && html.contains("6 s"),
            "{html}"
        );
        assert!(
            html.contains("batch_b&lt;") && html.contains(">queued<"),
            "{html}"
        );
        assert!(
            !html.contains("http://") && !html.contains("<script"),
            "no external assets"
        );
    }
}
