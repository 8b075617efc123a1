#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Untrusted content served by a session cannot act as the user on the
//! platform, nor read another session — checked in Chromium.

use std::time::{Duration, Instant};

use opencloud_e2e::agents::eventually;
use opencloud_e2e::browser::{log_in, Browser};
use opencloud_e2e::jupyter::{JupyterServer, XSRF};
use opencloud_e2e::upstream::{capture_upstream, loopback};
use opencloud_e2e::TestStack;
use opencloud_e2e::PASSWORD;
use reqwest::StatusCode;
use serde_json::{json, Value};

const PROBE: &str = r#"<!doctype html><html><body><pre id="out">running</pre><script>
async function attempt(url) {
  try {
    const r = await fetch(url, {credentials: "include"});
    return "read " + r.status + " " + (await r.text()).slice(0, 200);
  } catch (e) {
    return "blocked " + e;
  }
}
(async () => {
  const out = {
    platform: await attempt("PLATFORM/api/v1/me"),
    other: await attempt("OTHER/api/contents"),
    cookies: (() => { try { return document.cookie; } catch (e) { return ""; } })(),
  };
  document.getElementById("out").textContent = JSON.stringify(out);
  document.title = "probed";
})();
</script></body></html>"#;

#[tokio::test]
async fn a_sessions_scripts_cannot_read_the_platform_api_or_another_session() {
    let stack = TestStack::with_gateway().await.unwrap();
    let jupyter = JupyterServer::start().await.unwrap();
    let (other_port, other_captured) = capture_upstream().await;
    let platform = stack.gateway().platform();
    let user = stack.new_user().await;
    let (email, token) = (user.email.clone(), user.token.clone());
    let mine = stack.session_for(&user, jupyter.target()).await;
    let other = stack.session_for(&user, loopback(other_port)).await;
    let mine_origin = stack.gateway().session_origin(&mine);
    let other_origin = stack.gateway().session_origin(&other);

    // The probe page goes into the project through the Jupyter contents API.
    let session_http = stack.gateway().client(&[&mine], false);
    let probe = PROBE
        .replace("PLATFORM", &platform)
        .replace("OTHER", &other_origin);
    eventually("writing the probe", Duration::from_secs(20), || async {
        let r = session_http
            .put(format!("{mine_origin}/api/contents/probe.html"))
            .bearer_auth(&token)
            // Jupyter's XSRF check is on: the pair a page of its own sends.
            .header("cookie", format!("_xsrf={XSRF}"))
            .header("x-xsrftoken", XSRF)
            .json(&json!({"type": "file", "format": "text", "content": probe}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        println!("writing the probe: {status}");
        (status == StatusCode::CREATED || status == StatusCode::OK).then_some(())
    })
    .await;

    let browser = Browser::start().await.unwrap();
    log_in(&browser, &platform, &email, PASSWORD).await.unwrap();
    // Enter both sessions, so the browser holds cookies for each origin.
    for sid in [&other, &mine] {
        browser
            .goto(&format!("{platform}/sessions/{sid}/enter"))
            .await
            .unwrap();
        browser.wait_for_path("/lab").await.unwrap();
    }
    // Opened from the session's own page, as Lab opens a file: Jupyter
    // serves /files/ only with a same-origin Referer (its check against
    // cross-site inclusion is on now that no token is injected).
    browser
        .client
        .execute(
            "location.href = arguments[0]",
            vec![json!(format!("{mine_origin}/files/probe.html"))],
        )
        .await
        .unwrap();
    let started = Instant::now();
    while browser.client.title().await.unwrap() != "probed" {
        if started.elapsed() > Duration::from_secs(30) {
            let url = browser.client.current_url().await.unwrap();
            let source = browser.page_source().await.unwrap_or_default();
            panic!("the probe did not finish at {url}:\n{source}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out: Value = serde_json::from_str(&browser.text("#out").await.unwrap()).unwrap();
    println!("probe results: {out}");
    let platform_result = out["platform"].as_str().unwrap();
    assert!(
        platform_result.starts_with("blocked"),
        "the session read the platform: {platform_result}"
    );
    assert!(!platform_result.contains(&email));
    let other_result = out["other"].as_str().unwrap();
    assert!(
        other_result.starts_with("blocked"),
        "the session read another session: {other_result}"
    );
    assert_eq!(out["cookies"], "", "no cookie is readable from script");

    // The same probe from a page of the session origin itself (Lab, not
    // sandboxed like /files/): the origin boundary alone must hold.
    browser.goto(&format!("{mine_origin}/lab")).await.unwrap();
    browser.wait_for_path("/lab").await.unwrap();
    let script = format!(
        "const done = arguments[arguments.length - 1];\n\
         const attempt = async (url) => {{ try {{ const r = await fetch(url, {{credentials: 'include'}}); \
         return 'read ' + r.status + ' ' + (await r.text()).slice(0, 200); }} catch (e) {{ return 'blocked ' + e; }} }};\n\
         Promise.all([attempt('{platform}/api/v1/me'), attempt('{other_origin}/api/contents')])\
           .then(([p, o]) => done(JSON.stringify({{platform: p, other: o, cookies: document.cookie, origin: location.origin}})));"
    );
    let raw = browser.client.execute_async(&script, vec![]).await.unwrap();
    let out: Value = serde_json::from_str(raw.as_str().unwrap()).unwrap();
    println!("probe from the session origin: {out}");
    assert_eq!(out["origin"], mine_origin.as_str());
    assert!(
        out["platform"].as_str().unwrap().starts_with("blocked"),
        "{out}"
    );
    assert!(
        out["other"].as_str().unwrap().starts_with("blocked"),
        "{out}"
    );
    let cookies = out["cookies"].as_str().unwrap();
    assert!(
        !cookies.contains("oc_s") && !cookies.contains("oc_session"),
        "our cookies are HttpOnly: {out}"
    );

    // The other session's upstream never saw the user's credentials.
    for head in other_captured.heads() {
        assert!(!head.contains(&token), "{head}");
        assert!(!head.contains("oc_s="), "{head}");
    }
    browser.close().await;
}
