//! A hosted repository's life as skopeo sees it: pushed images are listed (`skopeo list-tags`,
//! the catalog), outlive a restart of the mirror, and are deleted (`skopeo delete`) only once
//! the operator turns `hosted.delete` on, the other tag staying.

use std::time::Duration;

use crate::hosted::{listing, output_text, small_image, start_hosted_mirror, write_config};
use crate::mirror::Options;
use crate::procs::{run, run_ok};
use crate::skopeo::Skopeo;
use crate::world::World;

const LIMIT: Duration = Duration::from_secs(120);

/// `skopeo list-tags docker://REPO`, sorted.
async fn list_tags(skopeo: &Skopeo, repo: &str) -> Vec<String> {
    let mut cmd = skopeo.command("list-tags");
    cmd.arg("--tls-verify=false")
        .arg(format!("docker://{repo}"));
    let out = run_ok(&mut cmd, LIMIT).await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list-tags json");
    let mut tags: Vec<String> = listed["Tags"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    tags.sort();
    tags
}

/// `skopeo delete docker://REFERENCE`: its output, whether it succeeded or not.
async fn delete(skopeo: &Skopeo, reference: &str) -> std::process::Output {
    let mut cmd = skopeo.command("delete");
    cmd.arg("--tls-verify=false")
        .arg(format!("docker://{reference}"));
    run(&mut cmd, LIMIT).await
}

/// Two images pushed as `myorg/app:v1` and `:v2` are listed by `skopeo list-tags` and the
/// catalog; `skopeo delete` of v1 fails while `hosted.delete` is off (and v1 still pulls);
/// after a restart with `hosted.delete = true` both still pull with their digests, the delete
/// succeeds, v1 no longer pulls nor is listed, and v2 pulls as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_images_outlive_a_restart_and_go_only_with_hosted_delete() {
    let mut world = World::upstream_only(&[]).await;
    start_hosted_mirror(&mut world, "", &[], 200).await;
    let skopeo = Skopeo::plain(&world.dir("skopeo"));
    let mut pushed = Vec::new();
    for tag in ["v1", "v2"] {
        let layout = world.dir(&format!("layout-{tag}"));
        let image = small_image(&layout, tag, &format!("myorg/app:{tag}"), 32 << 10);
        let addr = world.mirror().addr();
        skopeo
            .push(
                &format!("oci:{}:{tag}", layout.display()),
                &format!("{addr}/myorg/app:{tag}"),
            )
            .await;
        pushed.push((tag, image.blob.digest));
    }
    let addr = world.mirror().addr();
    assert_eq!(
        list_tags(&skopeo, &format!("{addr}/myorg/app")).await,
        ["v1", "v2"],
        "skopeo list-tags of myorg/app"
    );
    let catalog = reqwest::get(format!("http://{addr}/v2/_catalog"))
        .await
        .expect("GET /v2/_catalog")
        .bytes()
        .await
        .expect("the catalog");
    let catalog: serde_json::Value = serde_json::from_slice(&catalog).expect("catalog json");
    assert!(
        catalog["repositories"]
            .as_array()
            .is_some_and(|r| r.iter().any(|n| n == "myorg/app")),
        "the catalog should list myorg/app: {catalog}"
    );

    let mark = world.mirror().log_mark();
    let out = delete(&skopeo, &format!("{addr}/myorg/app:v1")).await;
    assert!(
        !out.status.success(),
        "skopeo delete succeeded with hosted.delete off: {}",
        output_text(&out)
    );
    let deletes: Vec<_> = world
        .mirror()
        .served_since(mark)
        .into_iter()
        .filter(|s| s.method == "DELETE")
        .collect();
    assert!(
        !deletes.is_empty() && deletes.iter().all(|s| s.status >= 400),
        "the mirror should have refused skopeo's DELETE:\n{}",
        listing(&deletes)
    );
    let got = skopeo
        .pull_to_dir(
            &format!("{addr}/myorg/app:v1"),
            &world.dir("v1-kept"),
            false,
        )
        .await;
    assert_eq!(got, pushed[0].1, "myorg/app:v1 after the refused delete");

    let config = write_config(&world.dir("ops"), "");
    world
        .restart_mirror(&Options {
            config: Some(config),
            ..Options::env(&[("REGMIRROR_HOSTED_DELETE", "true")])
        })
        .await;
    let addr = world.mirror().addr();
    for (tag, digest) in &pushed {
        let got = skopeo
            .pull_to_dir(
                &format!("{addr}/myorg/app:{tag}"),
                &world.dir(&format!("{tag}-restarted")),
                false,
            )
            .await;
        assert_eq!(&got, digest, "myorg/app:{tag} after a restart");
    }

    let out = delete(&skopeo, &format!("{addr}/myorg/app:v1")).await;
    assert!(
        out.status.success(),
        "skopeo delete with hosted.delete = true failed: {}",
        output_text(&out)
    );
    let out = skopeo
        .try_pull_to_dir(&format!("{addr}/myorg/app:v1"), &world.dir("v1-gone"))
        .await;
    assert!(
        !out.status.success(),
        "myorg/app:v1 still pulls after skopeo delete: {}",
        output_text(&out)
    );
    assert_eq!(
        list_tags(&skopeo, &format!("{addr}/myorg/app")).await,
        ["v2"],
        "skopeo list-tags after the delete of v1"
    );
    let got = skopeo
        .pull_to_dir(
            &format!("{addr}/myorg/app:v2"),
            &world.dir("v2-kept"),
            false,
        )
        .await;
    assert_eq!(got, pushed[1].1, "myorg/app:v2 after the delete of v1");
}
