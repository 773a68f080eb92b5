//! The push API of hosted repositories (issue 16), in process against a fake upstream, checking
//! the facts the OCI distribution-spec conformance suite (v1.1.1, `conformance/0*_test.go`)
//! checks in its four workflows, with the status, headers and error codes the spec asks for:
//! - `uploads`: blob uploads (POST+PUT, `POST ?digest=`, chunked PATCH, status, cancel, wrong
//!   digest, concurrent chunks, a restart in the middle, expiry);
//! - `blobs`: pushed blobs served (ranges, empty, large, sha512), their repository's only,
//!   and cross-repository mounts;
//! - `crash`: a `regmirror serve` process killed in the middle of a chunked upload;
//! - `manifests`: manifest PUT by tag and digest, GET back byte for byte, the refusals
//!   (MANIFEST_BLOB_UNKNOWN, MANIFEST_INVALID);
//! - `discovery`: tags/list, `_catalog`, referrers from pushed manifests with a subject;
//! - `management`: DELETE of manifests, tags and blobs, or its refusal;
//! - `pinning`: hosted content, and cached blobs mounted into it, outlive the cache's budget;
//! - `refusals`: pushes to mirrored repositories, the hosted quota, and hosted pulls never
//!   reaching the upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/push.rs"]
mod push;

#[path = "push_api/blobs.rs"]
mod blobs;
#[path = "push_api/crash.rs"]
mod crash;
#[path = "push_api/discovery.rs"]
mod discovery;
#[path = "push_api/management.rs"]
mod management;
#[path = "push_api/manifests.rs"]
mod manifests;
#[path = "push_api/pinning.rs"]
mod pinning;
#[path = "push_api/refusals.rs"]
mod refusals;
#[path = "push_api/uploads.rs"]
mod uploads;
