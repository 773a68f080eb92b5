//! Listings: tag lists (fetched whole from the upstream, kept for when it is
//! unreachable or the mirror is offline, paginated here), the catalog of
//! cached repositories, and referrers (the upstream's API, or the
//! `sha256-<hex>` tag schema where it has none).

use bytes::Bytes;
use http::{header, StatusCode};

use super::{offline_miss, Registry};
use crate::endpoint::{CatalogPage, TagsPage};
use crate::error::Error;
use crate::manifest::OCI_INDEX;
use crate::reference::{Digest, RepoName, Tag};
use crate::response::{self, Outcome, Reply};
use crate::routing::Route;
use crate::upstream::What;

/// The header that says a referrers answer was filtered.
const FILTERS_APPLIED: &str = "OCI-Filters-Applied";

impl Registry {
    /// `tags/list` for the name the client used.
    pub(super) async fn tags(
        &self,
        route: &Route,
        name: &RepoName,
        ns: Option<&str>,
        page: &TagsPage,
        head: bool,
    ) -> Result<Reply, Error> {
        let (tags, outcome) = self.tag_list(route).await?;
        tags_reply(name, ns, &tags, page, head, outcome)
    }

    /// The whole tag list: the one fetched within the tag TTL, else from the
    /// upstream, or the last one kept when the upstream is down or the
    /// mirror offline.
    async fn tag_list(&self, route: &Route) -> Result<(Vec<Tag>, Outcome), Error> {
        let kept = || async { self.index.tag_list(&route.key).await };
        if self.offline {
            return match kept().await {
                Some(tags) => Ok((tags, Outcome::Hit)),
                None => Err(offline_miss(What::Tags, route.key.as_str())),
            };
        }
        if let Some((at, tags)) = self.fetched_tag_lists.get(&route.key).await {
            if at.elapsed() < self.default_tag_ttl(route) {
                return Ok(((*tags).clone(), Outcome::Hit));
            }
        }
        match self.upstream(route).get_all_tags(&route.repo).await {
            Ok(tags) => {
                self.index.set_tag_list(&route.key, tags.clone()).await;
                let fetched = (std::time::Instant::now(), std::sync::Arc::new(tags.clone()));
                self.fetched_tag_lists
                    .insert(route.key.clone(), fetched)
                    .await;
                Ok((tags, Outcome::Pass))
            }
            Err(e) if e.is_upstream_outage() => match kept().await {
                Some(tags) => {
                    tracing::warn!(repo = %route.key, error = %e, "upstream unavailable; serving the tag list from cache");
                    self.metrics.stale_serve();
                    Ok((tags, Outcome::Hit))
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// `/v2/_catalog`: the repositories in the cache, as clients name them
    /// (the default upstream's without prefix, others as `registry/name`).
    pub(super) async fn catalog(&self, page: &CatalogPage, head: bool) -> Result<Reply, Error> {
        let default = format!("{}/", self.router.name(0));
        let mut names: Vec<String> = self
            .index
            .repositories()
            .await
            .iter()
            .map(|key| {
                key.as_str()
                    .strip_prefix(&default)
                    .unwrap_or(key.as_str())
                    .to_owned()
            })
            .collect();
        if let Some(h) = &self.hosted {
            names.extend(
                h.index
                    .repositories()
                    .await
                    .iter()
                    .map(|r| r.as_str().to_owned()),
            );
        }
        names.sort();
        names.dedup();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (items, next) = paginate(&names, page.n, page.last.as_ref().map(RepoName::as_str));
        let body = serde_json::json!({ "repositories": items }).to_string();
        let link = next.map(|last| {
            let q = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("n", &page.n.unwrap_or_default().to_string())
                .append_pair("last", last)
                .finish();
            format!("</v2/_catalog?{q}>; rel=\"next\"")
        });
        json_reply(body, link, head, Outcome::Hit)
    }

    /// `referrers/<digest>`: an OCI image index of the artifacts that name
    /// `digest` as their subject; empty when there are none.
    pub(super) async fn referrers(
        &self,
        route: &Route,
        digest: &Digest,
        artifact_type: Option<&str>,
        head: bool,
    ) -> Result<Reply, Error> {
        let key = (route.key.clone(), digest.clone());
        let (index, outcome) = match self.referrer_cache.get(&key).await {
            Some(b) => (b, Outcome::Hit),
            None => {
                let b = self.fetch_referrers(route, digest).await?;
                self.referrer_cache.insert(key, b.clone()).await;
                (b, Outcome::Pass)
            }
        };
        let (body, filtered) = filter_by_artifact_type(&index, artifact_type)?;
        let mut b = response::builder(StatusCode::OK)
            .header(header::CONTENT_TYPE, OCI_INDEX)
            .header(header::CONTENT_LENGTH, body.len());
        if filtered {
            b = b.header(FILTERS_APPLIED, "artifactType");
        }
        let response = b
            .body(if head {
                response::empty()
            } else {
                response::full(body)
            })
            .map_err(|e| Error::internal("building a response", e))?;
        Ok(Reply { response, outcome })
    }

    async fn fetch_referrers(&self, route: &Route, digest: &Digest) -> Result<Bytes, Error> {
        if !self.offline {
            if let Some(doc) = self
                .upstream(route)
                .get_referrers(&route.repo, digest)
                .await?
            {
                return Ok(doc.bytes);
            }
        }
        // No referrers API upstream (or offline): the tag schema's index.
        let tag = Tag::parse(&format!("{}-{}", digest.algorithm().as_str(), digest.hex()))
            .map_err(|e| Error::internal("building a referrers tag", e))?;
        match self.manifest_for_tag(route, &tag).await {
            Ok((_, m)) if is_index(&m.bytes) => Ok(m.bytes.clone()),
            Ok(_) | Err(Error::ManifestUnknown(_)) => Ok(empty_index()),
            Err(e) => Err(e),
        }
    }
}

/// The items after `last` (exclusive), at most `n` of them, and the `last`
/// of the next page when more remain. `n = 0` is an empty page.
pub fn paginate<'a>(
    items: &[&'a str],
    n: Option<u32>,
    last: Option<&str>,
) -> (Vec<&'a str>, Option<&'a str>) {
    let start = match last {
        Some(l) => items.partition_point(|i| *i <= l),
        None => 0,
    };
    let rest = &items[start..];
    let take = n.map_or(rest.len(), |n| rest.len().min(n as usize));
    let page = rest[..take].to_vec();
    let next = if take < rest.len() && take > 0 {
        page.last().copied()
    } else {
        None
    };
    (page, next)
}

/// A page of a sorted tag list, with `Link` to the next.
pub(super) fn tags_reply(
    name: &RepoName,
    ns: Option<&str>,
    tags: &[Tag],
    page: &TagsPage,
    head: bool,
    outcome: Outcome,
) -> Result<Reply, Error> {
    let tags: Vec<&str> = tags.iter().map(Tag::as_str).collect();
    let (items, next) = paginate(&tags, page.n, page.last.as_ref().map(Tag::as_str));
    let body = serde_json::json!({ "name": name.as_str(), "tags": items }).to_string();
    let link = next.map(|last| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("n", &page.n.unwrap_or_default().to_string());
        q.append_pair("last", last);
        if let Some(ns) = ns {
            q.append_pair("ns", ns);
        }
        format!("</v2/{name}/tags/list?{}>; rel=\"next\"", q.finish())
    });
    json_reply(body, link, head, outcome)
}

pub(super) fn json_reply(
    body: String,
    link: Option<String>,
    head: bool,
    outcome: Outcome,
) -> Result<Reply, Error> {
    let mut b = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(link) = link {
        b = b.header(header::LINK, link);
    }
    let response = b
        .body(if head {
            response::empty()
        } else {
            response::full(Bytes::from(body))
        })
        .map_err(|e| Error::internal("building a response", e))?;
    Ok(Reply { response, outcome })
}

fn empty_index() -> Bytes {
    Bytes::from(
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
            .to_string(),
    )
}

fn is_index(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .is_some_and(|v| v.get("manifests").is_some_and(|m| m.is_array()))
}

/// Keeps only the descriptors of `artifact_type`; `true` when filtered.
fn filter_by_artifact_type(
    index: &Bytes,
    artifact_type: Option<&str>,
) -> Result<(Bytes, bool), Error> {
    let Some(wanted) = artifact_type else {
        return Ok((index.clone(), false));
    };
    let mut v: serde_json::Value = serde_json::from_slice(index).map_err(|_| {
        Error::UpstreamFailed("upstream sent a referrers index that is not JSON".into())
    })?;
    if let Some(list) = v.get_mut("manifests").and_then(|m| m.as_array_mut()) {
        list.retain(|d| d.get("artifactType").and_then(|a| a.as_str()) == Some(wanted));
    }
    Ok((Bytes::from(v.to_string()), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ITEMS: [&str; 5] = ["a", "b", "c", "d", "e"];

    #[test]
    fn pagination_edges() {
        assert_eq!(paginate(&ITEMS, None, None), (ITEMS.to_vec(), None));
        assert_eq!(paginate(&ITEMS, Some(2), None), (vec!["a", "b"], Some("b")));
        assert_eq!(
            paginate(&ITEMS, Some(2), Some("b")),
            (vec!["c", "d"], Some("d"))
        );
        assert_eq!(paginate(&ITEMS, Some(2), Some("d")), (vec!["e"], None));
        assert_eq!(paginate(&ITEMS, Some(5), None), (ITEMS.to_vec(), None));
        assert_eq!(paginate(&ITEMS, Some(0), None), (vec![], None));
        assert_eq!(paginate(&ITEMS, None, Some("z")), (vec![], None));
        assert_eq!(
            paginate(&ITEMS, None, Some("bb")),
            (vec!["c", "d", "e"], None)
        );
        assert_eq!(paginate(&[], Some(3), None), (vec![], None));
    }

    #[test]
    fn artifact_type_filter() {
        let index = Bytes::from(
            r#"{"manifests":[{"artifactType":"application/x.sig","digest":"a"},{"artifactType":"application/x.sbom","digest":"b"}]}"#,
        );
        let (body, filtered) = filter_by_artifact_type(&index, Some("application/x.sig")).unwrap();
        assert!(filtered);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(
            filter_by_artifact_type(&index, None).unwrap(),
            (index, false)
        );
        assert!(is_index(&empty_index()));
    }
}
