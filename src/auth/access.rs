//! Who may do what where: `auth.anonymous_pull` and the `[[auth.access]]`
//! rules as one pure decision over (user, action, repository). Policy only:
//! it neither checks credentials (the [`Authenticator`](super::Authenticator)
//! does, before) nor decides which repositories take writes at all (the
//! registry does, after).

use crate::cache::policy::glob_match;
use crate::config::AuthConfig;
use crate::endpoint::{Action, Endpoint};

/// The access policy of one configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Users are configured (`auth.htpasswd`); without them everything is
    /// open.
    users: bool,
    /// Requests without credentials may pull.
    anonymous_pull: bool,
    /// Empty: every user may do everything.
    rules: Vec<Rule>,
}

/// One `[[auth.access]]`: `users` may do `actions` on `repos` (globs).
#[derive(Debug, Clone)]
struct Rule {
    users: Vec<String>,
    repos: Vec<String>,
    actions: Vec<Action>,
}

impl Rule {
    fn grants(&self, user: &str, action: Action, repo: Option<&str>) -> bool {
        self.actions.contains(&action)
            && self.users.iter().any(|u| glob_match(u, user))
            && match repo {
                Some(repo) => self.repos.iter().any(|r| glob_match(r, repo)),
                // The catalog names every repository: only a glob that
                // matches every name grants it.
                None => self
                    .repos
                    .iter()
                    .any(|r| !r.is_empty() && r.bytes().all(|c| c == b'*')),
            }
    }
}

/// What the policy says of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// An authenticated user that no rule lets do it (403 `DENIED`).
    Denied(Denial),
    /// No credentials, and a client without them may not do this (401 with
    /// the challenge, so the client logs in and tries again); what it asked,
    /// unless it was the ping.
    Unauthenticated(Option<Want>),
}

/// What was asked: an action on a repository, or on the whole registry
/// (`repo` unset: the catalog).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub action: Action,
    pub repo: Option<String>,
}

impl std::fmt::Display for Want {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = self.action.as_str();
        match (&self.repo, self.action) {
            (Some(repo), Action::Push) => write!(f, "{action} to {repo}"),
            (Some(repo), Action::Pull | Action::Delete) => write!(f, "{action} from {repo}"),
            (None, _) => write!(f, "{action} the catalog"),
        }
    }
}

/// A refused user and what they asked (never a password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub user: String,
    pub want: Want,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "user {:?} may not {}: no auth.access rule grants it",
            self.user, self.want
        )?;
        if self.want.repo.is_none() {
            write!(
                f,
                " (the catalog needs {} on repos = [\"*\"])",
                self.want.action.as_str()
            )?;
        }
        Ok(())
    }
}

impl Policy {
    /// The policy of `config`; `users`: clients authenticate (an htpasswd
    /// file is loaded), else everything is open.
    pub fn new(config: &AuthConfig, users: bool) -> Self {
        let rules = config
            .access
            .iter()
            .map(|r| Rule {
                users: r.users.clone(),
                repos: r.repos.clone(),
                // Validated at load; an unknown word grants nothing.
                actions: r.actions.iter().filter_map(|a| Action::parse(a)).collect(),
            })
            .collect();
        Self {
            users,
            anonymous_pull: config.anonymous_pull,
            rules,
        }
    }

    /// May `user` (`None`: a request without credentials) do `action` on
    /// `repo` (`None`: the catalog)?
    pub fn allows(&self, user: Option<&str>, action: Action, repo: Option<&str>) -> bool {
        if !self.users {
            return true;
        }
        // What a client without credentials may do, a user may too: a
        // logged-in client sends its credentials on every request.
        if self.anonymous_pull && action == Action::Pull {
            return true;
        }
        let Some(user) = user else {
            return false;
        };
        self.rules.is_empty() || self.rules.iter().any(|r| r.grants(user, action, repo))
    }

    /// The decision for a parsed request: its own action on its repository
    /// and, for a mount, pull on the repository it mounts from. The ping
    /// needs a user (when there are users) even with `anonymous_pull`: its
    /// challenge is what makes `docker login` and `docker push` send
    /// credentials at all.
    pub fn decide(&self, user: Option<&str>, endpoint: &Endpoint) -> Decision {
        if !self.users {
            return Decision::Allowed;
        }
        if matches!(endpoint, Endpoint::Ping) {
            return match user {
                Some(_) => Decision::Allowed,
                None => Decision::Unauthenticated(None),
            };
        }
        let own = (endpoint.action(), endpoint.name());
        let from = endpoint.reads_from().map(|from| (Action::Pull, Some(from)));
        for (action, repo) in std::iter::once(own).chain(from) {
            let repo = repo.map(|r| r.as_str());
            if self.allows(user, action, repo) {
                continue;
            }
            let want = Want {
                action,
                repo: repo.map(str::to_owned),
            };
            return match user {
                Some(user) => Decision::Denied(Denial {
                    user: user.to_owned(),
                    want,
                }),
                None => Decision::Unauthenticated(Some(want)),
            };
        }
        Decision::Allowed
    }

    /// Whether a request without credentials goes on without a check:
    /// `endpoint` is the parsed request (`None`: it did not parse, and is
    /// answered with its parse error, which tells nothing; let through when
    /// it is a read, `read`, and anonymous clients may read).
    pub fn lets_in_anonymous(&self, endpoint: Option<&Endpoint>, read: bool) -> bool {
        match endpoint {
            Some(endpoint) => self.decide(None, endpoint) == Decision::Allowed,
            None => !self.users || (self.anonymous_pull && read),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccessRule;
    use crate::endpoint::{CatalogPage, TagsPage, UploadOp, UploadStart};
    use crate::reference::{Digest, Reference, RepoName, UploadId};

    fn rule(users: &[&str], repos: &[&str], actions: &[&str]) -> AccessRule {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        AccessRule {
            users: strings(users),
            repos: strings(repos),
            actions: strings(actions),
        }
    }

    fn policy(anonymous_pull: bool, rules: Vec<AccessRule>) -> Policy {
        let config = AuthConfig {
            anonymous_pull,
            access: rules,
            ..AuthConfig::default()
        };
        Policy::new(&config, true)
    }

    fn name(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    fn digest() -> Digest {
        Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap()
    }

    fn manifest(repo: &str) -> Endpoint {
        Endpoint::Manifest {
            name: name(repo),
            reference: Reference::parse("v1").unwrap(),
        }
    }

    fn put(repo: &str) -> Endpoint {
        Endpoint::PutManifest {
            name: name(repo),
            reference: Reference::parse("v1").unwrap(),
        }
    }

    fn delete(repo: &str) -> Endpoint {
        Endpoint::DeleteBlob {
            name: name(repo),
            digest: digest(),
        }
    }

    fn mount(repo: &str, from: &str) -> Endpoint {
        Endpoint::StartUpload {
            name: name(repo),
            start: UploadStart::Mount {
                digest: digest(),
                from: Some(name(from)),
            },
        }
    }

    fn catalog() -> Endpoint {
        Endpoint::Catalog {
            page: CatalogPage::default(),
        }
    }

    fn denied(user: &str, action: Action, repo: &str) -> Decision {
        Decision::Denied(Denial {
            user: user.into(),
            want: Want {
                action,
                repo: Some(repo.into()),
            },
        })
    }

    fn unauthenticated(action: Action, repo: &str) -> Decision {
        Decision::Unauthenticated(Some(Want {
            action,
            repo: Some(repo.to_owned()),
        }))
    }

    #[test]
    fn without_users_everything_is_open() {
        let config = AuthConfig {
            // Rules without users name nobody; they narrow nothing.
            access: vec![rule(&["ci"], &["myorg/*"], &["pull"])],
            ..AuthConfig::default()
        };
        let open = Policy::new(&config, false);
        for e in [
            manifest("a/b"),
            put("x"),
            delete("x"),
            mount("x", "y"),
            Endpoint::Ping,
        ] {
            assert_eq!(open.decide(None, &e), Decision::Allowed, "{e:?}");
        }
        assert!(open.lets_in_anonymous(None, false));
    }

    #[test]
    fn without_rules_every_user_may_do_everything_and_nobody_anonymous() {
        let p = policy(false, vec![]);
        for e in [
            Endpoint::Ping,
            manifest("library/alpine"),
            put("myorg/app"),
            delete("myorg/app"),
            mount("myorg/app", "library/alpine"),
            catalog(),
        ] {
            assert_eq!(p.decide(Some("anyone"), &e), Decision::Allowed, "{e:?}");
            assert!(
                matches!(p.decide(None, &e), Decision::Unauthenticated(_)),
                "{e:?}"
            );
            assert!(!p.lets_in_anonymous(Some(&e), true), "{e:?}");
        }
        assert_eq!(
            p.decide(None, &put("myorg/app")),
            unauthenticated(Action::Push, "myorg/app")
        );
        assert!(!p.lets_in_anonymous(None, true));
    }

    #[test]
    fn rules_grant_each_user_their_actions_on_their_repositories() {
        let p = policy(
            false,
            vec![
                rule(&["ci"], &["myorg/*"], &["pull", "push"]),
                rule(&["*"], &["library/*"], &["pull"]),
                rule(&["admin-*"], &["*"], &["pull", "push", "delete"]),
            ],
        );
        let table = [
            ("ci", put("myorg/app"), Decision::Allowed),
            ("ci", put("myorg/team/app"), Decision::Allowed),
            ("ci", manifest("myorg/app"), Decision::Allowed),
            ("ci", manifest("library/alpine"), Decision::Allowed),
            (
                "ci",
                delete("myorg/app"),
                denied("ci", Action::Delete, "myorg/app"),
            ),
            (
                "ci",
                put("other/app"),
                denied("ci", Action::Push, "other/app"),
            ),
            ("ci", put("myorg"), denied("ci", Action::Push, "myorg")),
            ("bob", manifest("library/alpine"), Decision::Allowed),
            (
                "bob",
                manifest("myorg/app"),
                denied("bob", Action::Pull, "myorg/app"),
            ),
            (
                "bob",
                put("myorg/app"),
                denied("bob", Action::Push, "myorg/app"),
            ),
            (
                "bob",
                put("library/alpine"),
                denied("bob", Action::Push, "library/alpine"),
            ),
            ("bob", Endpoint::Ping, Decision::Allowed),
            ("admin-eu", delete("myorg/app"), Decision::Allowed),
            ("admin-eu", put("anything/at/all"), Decision::Allowed),
            (
                "admin",
                put("myorg/app"),
                denied("admin", Action::Push, "myorg/app"),
            ),
        ];
        for (user, endpoint, want) in table {
            assert_eq!(p.decide(Some(user), &endpoint), want, "{user} {endpoint:?}");
        }
        // An upload's other requests are pushes too (its status, its cancel).
        let upload = |op| Endpoint::Upload {
            name: name("myorg/app"),
            id: UploadId::new(),
            op,
        };
        for op in [UploadOp::Status, UploadOp::Append, UploadOp::Cancel] {
            assert_eq!(p.decide(Some("ci"), &upload(op.clone())), Decision::Allowed);
            assert_eq!(
                p.decide(Some("bob"), &upload(op)),
                denied("bob", Action::Push, "myorg/app")
            );
        }
    }

    #[test]
    fn the_catalog_needs_pull_on_every_repository() {
        let p = policy(
            false,
            vec![
                rule(&["ci"], &["myorg/*"], &["pull"]),
                rule(&["ops"], &["*"], &["pull"]),
            ],
        );
        assert_eq!(p.decide(Some("ops"), &catalog()), Decision::Allowed);
        let refused = p.decide(Some("ci"), &catalog());
        let Decision::Denied(d) = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(d.want.repo, None);
        assert_eq!(
            d.to_string(),
            "user \"ci\" may not pull the catalog: no auth.access rule grants it \
             (the catalog needs pull on repos = [\"*\"])"
        );
    }

    #[test]
    fn anonymous_clients_may_pull_but_never_push_delete_or_ping() {
        let p = policy(true, vec![rule(&["ci"], &["myorg/*"], &["push"])]);
        let tags = Endpoint::TagsList {
            name: name("myorg/app"),
            page: TagsPage::default(),
        };
        for e in [
            manifest("myorg/app"),
            manifest("library/alpine"),
            tags,
            catalog(),
        ] {
            assert_eq!(p.decide(None, &e), Decision::Allowed, "{e:?}");
            assert!(p.lets_in_anonymous(Some(&e), true), "{e:?}");
            // A user may do what a client without credentials may.
            assert_eq!(p.decide(Some("bob"), &e), Decision::Allowed, "{e:?}");
        }
        assert_eq!(
            p.decide(None, &put("myorg/app")),
            unauthenticated(Action::Push, "myorg/app")
        );
        assert_eq!(
            p.decide(None, &delete("myorg/app")),
            unauthenticated(Action::Delete, "myorg/app")
        );
        assert_eq!(
            p.decide(None, &Endpoint::Ping),
            Decision::Unauthenticated(None)
        );
        for e in [put("myorg/app"), delete("myorg/app"), Endpoint::Ping] {
            assert!(!p.lets_in_anonymous(Some(&e), true), "{e:?}");
        }
        // A request that did not parse: its error for a read, the challenge for a write.
        assert!(p.lets_in_anonymous(None, true));
        assert!(!p.lets_in_anonymous(None, false));
        assert_eq!(p.decide(Some("ci"), &put("myorg/app")), Decision::Allowed);
        assert_eq!(
            p.decide(Some("bob"), &put("myorg/app")),
            denied("bob", Action::Push, "myorg/app")
        );
    }

    #[test]
    fn a_mount_needs_push_on_the_target_and_pull_on_its_source() {
        let p = policy(
            false,
            vec![
                rule(&["ci"], &["myorg/*"], &["pull", "push"]),
                rule(&["ci"], &["library/*"], &["pull"]),
            ],
        );
        assert_eq!(
            p.decide(Some("ci"), &mount("myorg/app", "library/alpine")),
            Decision::Allowed
        );
        assert_eq!(
            p.decide(Some("ci"), &mount("myorg/app", "secret/app")),
            denied("ci", Action::Pull, "secret/app")
        );
        assert_eq!(
            p.decide(Some("ci"), &mount("library/alpine", "myorg/app")),
            denied("ci", Action::Push, "library/alpine")
        );
        let anonymous = policy(true, vec![]);
        assert_eq!(
            anonymous.decide(None, &mount("myorg/app", "library/alpine")),
            unauthenticated(Action::Push, "myorg/app")
        );
        // Without `from` it is an upload like any other: push on the target.
        let open_upload = Endpoint::StartUpload {
            name: name("myorg/app"),
            start: UploadStart::Mount {
                digest: digest(),
                from: None,
            },
        };
        assert_eq!(p.decide(Some("ci"), &open_upload), Decision::Allowed);
    }

    #[test]
    fn a_denial_names_user_action_and_repository() {
        let d = Denial {
            user: "bob".into(),
            want: Want {
                action: Action::Push,
                repo: Some("myorg/app".into()),
            },
        };
        assert_eq!(
            d.to_string(),
            "user \"bob\" may not push to myorg/app: no auth.access rule grants it"
        );
        let pull = Want {
            action: Action::Pull,
            repo: Some("myorg/app".into()),
        };
        assert_eq!(pull.to_string(), "pull from myorg/app");
    }
}
