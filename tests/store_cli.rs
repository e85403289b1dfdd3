//! The chunk-store commands of the CLI on real images: keygen, publish (signed), stats, gc.

mod common;

use std::collections::HashSet;

use common::disk::{cli_err, cli_ok};

#[test]
fn publish_two_related_images_and_report_sharing() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 65536usize;
    let v1 = common::random_bytes(1, 40 * chunk);
    let mut v2 = v1.clone();
    v2[5 * chunk..9 * chunk].copy_from_slice(&common::random_bytes(2, 4 * chunk)); // 4 changed chunks
    v2[20 * chunk..22 * chunk].fill(0); // 2 zero chunks
    let (p1, p2) = (dir.path().join("v1.img"), dir.path().join("v2.img"));
    std::fs::write(&p1, &v1).unwrap();
    std::fs::write(&p2, &v2).unwrap();
    let st = dir.path().join("store");
    let key = dir.path().join("k");
    cli_ok(&["keygen", key.to_str().unwrap()]);
    let k = format!("{}.key", key.display());
    for (p, n) in [(&p1, "v1"), (&p2, "v2")] {
        cli_ok(&[
            "publish",
            p.to_str().unwrap(),
            "--store",
            st.to_str().unwrap(),
            "--name",
            n,
            "--key",
            &k,
        ]);
    }
    // Independent count: distinct non-zero chunks of both images.
    let distinct: HashSet<&[u8]> = v1
        .chunks(chunk)
        .chain(v2.chunks(chunk))
        .filter(|c| c.iter().any(|&b| b != 0))
        .collect();
    let objects = walk(&st.join("chunks"));
    assert_eq!(
        objects,
        distinct.len(),
        "store holds each distinct chunk once"
    );
    let out = cli_ok(&["--json", "store", "stats", st.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stats"]["images"].as_array().unwrap().len(), 2, "{out}");
    // Nothing unreferenced yet: gc deletes nothing.
    let out = cli_ok(&["--json", "store", "gc", st.to_str().unwrap()]);
    assert_eq!(
        walk(&st.join("chunks")),
        distinct.len(),
        "gc removed referenced chunks: {out}"
    );
    // Deleting v2's index leaves its 4 unique chunks unreferenced.
    std::fs::remove_file(st.join("indexes/v2.idx")).unwrap();
    cli_ok(&["store", "gc", st.to_str().unwrap()]);
    assert_eq!(
        walk(&st.join("chunks")),
        40,
        "gc did not remove exactly v2's unique chunks"
    );
    // A missing key is a clear one-line error.
    cli_err(&[
        "publish",
        p1.to_str().unwrap(),
        "--store",
        st.to_str().unwrap(),
        "--name",
        "x",
        "--key",
        "/nonexistent.key",
    ]);
}

fn walk(d: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += walk(&e.path());
        } else {
            n += 1;
        }
    }
    n
}
