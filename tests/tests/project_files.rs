#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! A project's files on My projects (issue 15, item 5): the owner uploads
//! a zip as a new version, lists the versions, downloads any of them as a
//! zip and restores an older one as a new version. Others get 404; hostile
//! or oversized zips are refused with their reason and store nothing; a
//! project with a live session refuses uploads and restores.

use std::io::{Cursor, Read, Write};

use opencloud_e2e::control::ControlOptions;
use opencloud_e2e::external::register_external;
use opencloud_e2e::upstream::loopback;
use opencloud_e2e::user::TestUser;
use opencloud_e2e::TestStack;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use zip::write::SimpleFileOptions;

/// The trial's storage quota in these tests, in MiB.
const QUOTA_MIB: usize = 3;

async fn stack() -> TestStack {
    TestStack::control_only_with(ControlOptions {
        env: vec![(
            "OPENCLOUD_CONTROL__BILLING__TRIAL__STORAGE_MIB".into(),
            QUOTA_MIB.to_string(),
        )],
        ..Default::default()
    })
    .await
    .unwrap()
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        zip.start_file(*name, stored).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// A zip's files, name and contents, in its order.
fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    let mut found = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        if entry.is_dir() {
            continue;
        }
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        found.push((entry.name().to_owned(), data));
    }
    found
}

async fn upload(user: &TestUser, project: u64, body: Vec<u8>) -> (StatusCode, Value) {
    let r = user
        .request(Method::POST, &format!("/api/v1/projects/{project}/archive"))
        .header("content-type", "application/zip")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn download(user: &TestUser, project: u64, query: &str) -> (StatusCode, String, Vec<u8>) {
    let r = user
        .request(
            Method::GET,
            &format!("/api/v1/projects/{project}/archive{query}"),
        )
        .send()
        .await
        .unwrap();
    let status = r.status();
    let disposition = r
        .headers()
        .get("content-disposition")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, disposition, r.bytes().await.unwrap().to_vec())
}

async fn version_rows(stack: &TestStack, project: u64) -> u64 {
    stack
        .db
        .count(&format!("project_versions WHERE project_id = {project}"))
        .await
}

fn owned(name: &str, data: &[u8]) -> (String, Vec<u8>) {
    (name.to_owned(), data.to_vec())
}

#[tokio::test]
async fn zips_go_in_and_out_as_versions_and_older_ones_come_back() {
    let stack = stack().await;
    let user = stack.new_user().await;
    let other = stack.new_user().await;
    let project = user.create_project("My Thesis").await;

    // Attacks first. Someone else's project is not there for them.
    let good = zip_of(&[("notes.md", b"# one"), ("data/a.csv", b"x,y\n1,2\n")]);
    for (method, path) in [
        (Method::GET, format!("/api/v1/projects/{project}/versions")),
        (Method::GET, format!("/api/v1/projects/{project}/archive")),
        (
            Method::POST,
            format!("/api/v1/projects/{project}/versions/1/restore"),
        ),
    ] {
        let r = other.request(method, &path).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = upload(&other, project, good.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Each hostile zip is refused with its reason; nothing is stored.
    let bomb = {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let deflated =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("zeros", deflated).unwrap();
        zip.write_all(&vec![0u8; 2 << 20]).unwrap();
        zip.finish().unwrap().into_inner()
    };
    let symlink = {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        zip.add_symlink("passwd", "/etc/passwd", SimpleFileOptions::default())
            .unwrap();
        zip.finish().unwrap().into_inner()
    };
    let over_quota = zip_of(&[("big.bin", &vec![7u8; (QUOTA_MIB + 1) << 20])]);
    for (body, status, words) in [
        (
            zip_of(&[("../x", b"x")]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "\"..\"",
        ),
        (
            zip_of(&[("/etc/x", b"x")]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "absolute",
        ),
        (
            zip_of(&[("C:/x", b"x")]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "drive letter",
        ),
        (symlink, StatusCode::UNPROCESSABLE_ENTITY, "symbolic link"),
        (bomb, StatusCode::UNPROCESSABLE_ENTITY, "zip bomb"),
        (
            b"not a zip at all".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not a zip",
        ),
        (over_quota, StatusCode::PAYLOAD_TOO_LARGE, "MiB"),
    ] {
        let (got, answer) = upload(&user, project, body).await;
        assert_eq!(got, status, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(words), "{words}: {answer}");
    }
    assert_eq!(version_rows(&stack, project).await, 0, "nothing was stored");
    let (status, _, _) = download(&user, project, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no version yet");

    // A good zip becomes version 1, listed and downloadable as it was.
    let (status, answer) = upload(&user, project, good).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["version"], 1);
    let list = user
        .get_json(&format!("/api/v1/projects/{project}/versions"))
        .await;
    assert_eq!(list["versions"][0]["version"], 1, "{list}");
    assert_eq!(list["versions"][0]["reason"], "upload", "{list}");
    assert_eq!(list["versions"][0]["damaged"], false, "{list}");
    let (status, disposition, bytes) = download(&user, project, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(disposition, "attachment; filename=\"My_Thesis-v1.zip\"");
    assert_eq!(
        unzip(&bytes),
        vec![
            owned("notes.md", b"# one"),
            owned("data/a.csv", b"x,y\n1,2\n")
        ]
    );

    // A second upload replaces the files; restoring 1 brings them back as 3.
    let (status, answer) = upload(&user, project, zip_of(&[("notes.md", b"# two")])).await;
    assert_eq!(
        (status, answer["version"].clone()),
        (StatusCode::CREATED, json!(2))
    );
    let (_, _, bytes) = download(&user, project, "").await;
    assert_eq!(unzip(&bytes), vec![owned("notes.md", b"# two")]);
    let (status, answer) = user
        .post(
            &format!("/api/v1/projects/{project}/versions/1/restore"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, answer["version"].clone()),
        (StatusCode::CREATED, json!(3)),
        "{answer}"
    );
    let (_, disposition, bytes) = download(&user, project, "").await;
    assert!(disposition.contains("-v3.zip"), "{disposition}");
    assert_eq!(unzip(&bytes)[0], owned("notes.md", b"# one"));
    // Nothing was overwritten: version 2 is still there as it was.
    let (_, _, bytes) = download(&user, project, "?version=2").await;
    assert_eq!(unzip(&bytes), vec![owned("notes.md", b"# two")]);
    let list = user
        .get_json(&format!("/api/v1/projects/{project}/versions"))
        .await;
    let reasons: Vec<_> = list["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons, ["restore", "upload", "upload"]);
    let (status, _) = user
        .post(
            &format!("/api/v1/projects/{project}/versions/9/restore"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // With a live session, its next autosave would overwrite: refused.
    let pool = mysql_async::Pool::new(stack.db.url.as_str());
    let _external = register_external(&pool, &stack.host_ca(), user.id, project, loopback(9))
        .await
        .unwrap();
    let _ = pool.disconnect().await;
    let (status, answer) = upload(&user, project, zip_of(&[("a", b"a")])).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stop the session first"),
        "{answer}"
    );
    let (status, _) = user
        .post(
            &format!("/api/v1/projects/{project}/versions/2/restore"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(version_rows(&stack, project).await, 3);
}

/// The upload form's body, built as a browser sends it.
fn multipart(csrf: &str, zip: &[u8]) -> (String, Vec<u8>) {
    let boundary = "----oc-test-boundary-7d1f";
    let mut body = Vec::new();
    write!(
        body,
        "--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"zip\"; filename=\"p.zip\"\r\n\
         Content-Type: application/zip\r\n\r\n"
    )
    .unwrap();
    body.extend_from_slice(zip);
    write!(body, "\r\n--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn the_project_page_uploads_lists_downloads_and_restores() {
    let stack = stack().await;
    let user = stack.new_user().await;
    let project = user.create_project("Paper").await;
    let page = format!("/projects/{project}");
    let csrf = opencloud_e2e::hidden_input(&user.page(&page).await, "csrf");
    let post_upload = |csrf: String, zip: Vec<u8>| {
        let (content_type, body) = multipart(&csrf, &zip);
        user.request(Method::POST, &format!("/projects/{project}/files/upload"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    // Without the form's token nothing is read or stored.
    let r = post_upload("forged".into(), zip_of(&[("a", b"a")]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A hostile zip: the page again, with why, and nothing stored.
    let r = post_upload(csrf.clone(), zip_of(&[("../evil", b"x")]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = r.text().await.unwrap();
    assert!(html.contains("id=\"files-error\""), "{html}");
    assert_eq!(version_rows(&stack, project).await, 0);

    for (n, text) in [(1, &b"first"[..]), (2, b"second")] {
        let r = post_upload(csrf.clone(), zip_of(&[("main.py", text)]))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()["location"], format!("{page}?stored={n}"));
    }
    let html = user.page(&format!("{page}?stored=2")).await;
    assert!(html.contains("Stored as version 2"), "{html}");
    assert!(html.contains("data-version=\"1\""), "{html}");
    assert!(html.contains(&format!("/projects/{project}/files/1/restore")));

    let r = user
        .post_form(
            &format!("/projects/{project}/files/1/restore"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], format!("{page}?stored=3"));
    let r = user
        .request(
            Method::GET,
            &format!("/projects/{project}/files/download?version=3"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.bytes().await.unwrap();
    assert_eq!(unzip(&bytes), vec![owned("main.py", b"first")]);
}
