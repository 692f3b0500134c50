//! Ordered routing rules: the first rule whose every condition holds decides. Conditions read
//! only the facts, signals and state passed in; each rule's verdict (matched, or the first
//! condition that failed) is kept for explanations.

/// The kinds of content a scan of text cannot read, as `attachments` names them. `tokens` is a
/// prompt or input given as token ids: what text they stand for depends on a vocabulary the
/// gateway does not know for a cloud model.
pub const ATTACHMENT_KINDS: [&str; 5] = ["image", "audio", "video", "file", "tokens"];

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub conditions: Conditions,
    pub action: Action,
}

/// What a rule requires; an empty list or `None` places no requirement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conditions {
    /// Exact paths, or prefixes written with a trailing `*`.
    pub paths: Vec<String>,
    /// Upper-case methods.
    pub methods: Vec<String>,
    /// Lower-case header name and value; value `*` requires only presence.
    pub headers: Vec<(String, String)>,
    /// Requested models (client-visible names).
    pub models: Vec<String>,
    /// Caller identities (API key ids).
    pub callers: Vec<String>,
    /// Whether the request carries anything sensitive (an entity or a classification label
    /// listed in the policy as sensitive).
    pub sensitive: Option<bool>,
    /// Any of these entity types was found.
    pub entities: Vec<String>,
    /// The request's classification label is one of these (lower case).
    pub classifications: Vec<String>,
    /// Content of one of these kinds is attached ([`ATTACHMENT_KINDS`]; `*`: any kind).
    pub attachments: Vec<String>,
    /// Complexity at least this.
    pub complexity_min: Option<f32>,
    /// Complexity below this.
    pub complexity_max: Option<f32>,
    /// The local model's queue is at least this deep.
    pub local_queue_min: Option<u64>,
    /// The local model's KV cache is at least this full (0..=1).
    pub local_kv_use_min: Option<f32>,
    /// The named pool has (true) or lacks (false) an available backend.
    pub pool_available: Option<(String, bool)>,
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Serve on this local model.
    Local { model: String },
    /// Forward to this pool; `model` replaces the requested model when set.
    Cloud { pool: String, model: Option<String> },
    /// Replace sensitive values with placeholders, forward, and restore them in the answer.
    RedactThenCloud { pool: String, model: Option<String> },
    /// Refuse with this status and message.
    Reject { status: u16, message: String },
}

impl Action {
    /// The pool a cloud action targets.
    pub fn pool(&self) -> Option<&str> {
        match self {
            Action::Cloud { pool, .. } | Action::RedactThenCloud { pool, .. } => Some(pool),
            Action::Local { .. } | Action::Reject { .. } => None,
        }
    }
}

/// One rule's outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub rule: String,
    /// `None` when every condition held; else the first condition that did not.
    pub failed: Option<&'static str>,
}

/// What a rule's conditions read beyond the request itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inputs<'a> {
    pub facts: &'a crate::RequestFacts<'a>,
    pub sensitive: bool,
    pub local_queue: u64,
    pub local_kv_use: f32,
    /// Pools and whether any of their backends is available; an unknown pool counts as
    /// available (the forwarder finds out).
    pub pools: &'a [(&'a str, bool)],
}

impl Inputs<'_> {
    pub(crate) fn pool_available(&self, pool: &str) -> bool {
        self.pools
            .iter()
            .find(|(name, _)| *name == pool)
            .is_none_or(|(_, available)| *available)
    }
}

impl Conditions {
    /// The first condition that does not hold, or `None` when all do.
    pub(crate) fn first_failure(&self, inputs: &Inputs<'_>) -> Option<&'static str> {
        let facts = inputs.facts;
        if !self.paths.is_empty()
            && !self.paths.iter().any(|pattern| {
                let matches = |path: &str| match pattern.strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix),
                    None => path == pattern,
                };
                matches(facts.path) || facts.operation_path.is_some_and(matches)
            })
        {
            return Some("path");
        }
        if !self.methods.is_empty()
            && !self
                .methods
                .iter()
                .any(|method| method.eq_ignore_ascii_case(facts.method))
        {
            return Some("method");
        }
        for (name, value) in &self.headers {
            let found = facts
                .headers
                .iter()
                .find(|(header, _)| header.eq_ignore_ascii_case(name));
            match found {
                Some((_, actual)) if value == "*" || actual == value => {}
                _ => return Some("headers"),
            }
        }
        if !self.models.is_empty()
            && !facts
                .requested_model
                .is_some_and(|model| self.models.iter().any(|wanted| wanted == model))
        {
            return Some("model");
        }
        if !self.callers.is_empty()
            && !facts
                .caller
                .is_some_and(|caller| self.callers.iter().any(|wanted| wanted == caller))
        {
            return Some("caller");
        }
        if self
            .sensitive
            .is_some_and(|wanted| wanted != inputs.sensitive)
        {
            return Some("sensitive");
        }
        if !self.entities.is_empty()
            && !facts
                .sensitivity
                .entities
                .iter()
                .any(|found| self.entities.iter().any(|wanted| wanted == found))
        {
            return Some("entities");
        }
        if !self.classifications.is_empty()
            && !facts.sensitivity.classification.is_some_and(|label| {
                self.classifications
                    .iter()
                    .any(|wanted| wanted.eq_ignore_ascii_case(label))
            })
        {
            return Some("classification");
        }
        if !self.attachments.is_empty()
            && !facts.attachments.iter().any(|kind| {
                self.attachments
                    .iter()
                    .any(|wanted| wanted == "*" || wanted == kind)
            })
        {
            return Some("attachments");
        }
        if self
            .complexity_min
            .is_some_and(|minimum| facts.complexity < minimum)
        {
            return Some("complexity_min");
        }
        if self
            .complexity_max
            .is_some_and(|maximum| facts.complexity >= maximum)
        {
            return Some("complexity_max");
        }
        if self
            .local_queue_min
            .is_some_and(|minimum| inputs.local_queue < minimum)
        {
            return Some("local_queue_min");
        }
        if self
            .local_kv_use_min
            .is_some_and(|minimum| inputs.local_kv_use < minimum)
        {
            return Some("local_kv_use_min");
        }
        if let Some((pool, wanted)) = &self.pool_available
            && inputs.pool_available(pool) != *wanted
        {
            return Some("pool_available");
        }
        None
    }
}
