//! One command line for every subcommand: `--config`, `--data-dir`, `--upstream` and
//! `--offline` are accepted by each, apply where they can (`prefetch --upstream` is where the
//! mirror it starts fetches from; `prefetch --offline` only checks the cache) and are said to
//! have no effect where they cannot (a command that reads the cache only), and each `--help`
//! ends with an example.

use crate::common::{random_bytes, FakeUpstream};
use crate::prefetch::regmirror;
use crate::REPO;

const SUBCOMMANDS: [&str; 7] = ["serve", "gc", "ls", "du", "prefetch", "export", "import"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_help_names_the_common_options_and_ends_with_an_example() {
    for sub in SUBCOMMANDS {
        let run = regmirror(&[sub, "--help"], &[]).await;
        assert!(run.ok, "{sub} --help:\n{}", run.show());
        for option in ["--config", "--data-dir", "--upstream", "--offline"] {
            assert!(
                run.stdout.contains(option),
                "{sub} --help: {option}\n{}",
                run.show()
            );
        }
        let out = run.stdout.trim_end();
        let at = out
            .rfind("Example:")
            .unwrap_or_else(|| panic!("{sub} --help has no example:\n{out}"));
        let mut example = out[at..].lines().skip(1);
        assert!(
            example
                .next()
                .is_some_and(|l| l.starts_with(&format!("  regmirror {sub} "))),
            "{sub} --help ends with an example of {sub}:\n{out}"
        );
        assert!(
            example.all(|l| l.starts_with("    ")),
            "nothing follows the example of {sub}:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_common_options_are_accepted_where_they_apply_and_said_useless_where_not() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image(REPO, "v1", vec![random_bytes(300, 90)]);
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let image = format!("{REPO}:v1");
    let url = fake.url();

    // Before: `prefetch --upstream` was refused, with clap suggesting --user.
    let run = regmirror(
        &["prefetch", "--upstream", &url, "--data-dir", dir, &image],
        &[],
    )
    .await;
    assert!(run.ok, "prefetch --upstream:\n{}", run.show());
    for (d, _) in img.blobs() {
        assert_eq!(fake.blob_gets(&d), 1, "fetched from --upstream: {d}");
    }
    assert!(!run.stderr.contains("warning"), "{}", run.show());

    // Offline, prefetch checks the cache: what is there passes, what is not fails.
    fake.reset_counts();
    let run = regmirror(&["prefetch", "--offline", "--data-dir", dir, &image], &[]).await;
    assert!(
        run.ok,
        "prefetch --offline of a cached image:\n{}",
        run.show()
    );
    let run = regmirror(
        &[
            "prefetch",
            "--offline",
            "--data-dir",
            dir,
            &format!("{REPO}:nope"),
        ],
        &[],
    )
    .await;
    assert!(
        !run.ok,
        "prefetch --offline of an image not cached:\n{}",
        run.show()
    );
    assert!(fake.requests().is_empty(), "offline: {:?}", fake.requests());

    for sub in ["ls", "du", "gc"] {
        let run = regmirror(&[sub, "--offline", "--data-dir", dir], &[]).await;
        assert!(run.ok, "{sub} --offline:\n{}", run.show());
        assert!(!run.stderr.contains("warning"), "{sub}: {}", run.show());
        let run = regmirror(&[sub, "--upstream", &url, "--data-dir", dir], &[]).await;
        assert!(run.ok, "{sub} --upstream:\n{}", run.show());
        assert!(
            run.stderr.contains("--upstream has no effect"),
            "{sub} says --upstream does not apply:\n{}",
            run.show()
        );
    }
    let ls = regmirror(&["ls", "--offline", "--data-dir", dir], &[]).await;
    assert!(ls.stdout.contains(REPO), "{}", ls.show());

    let archive = data.path().join("out.tar");
    let run = regmirror(
        &[
            "export",
            "--offline",
            "--data-dir",
            dir,
            "-o",
            archive.to_str().unwrap(),
            &image,
        ],
        &[],
    )
    .await;
    assert!(run.ok, "export --offline:\n{}", run.show());
    let other = tempfile::tempdir().unwrap();
    let run = regmirror(
        &[
            "import",
            "--offline",
            "--upstream",
            &url,
            "--data-dir",
            other.path().to_str().unwrap(),
            archive.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(run.ok, "import --offline --upstream:\n{}", run.show());
    assert!(
        run.stderr.contains("--upstream has no effect"),
        "{}",
        run.show()
    );
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}
